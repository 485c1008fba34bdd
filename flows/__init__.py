"""Prefect flows composing the stage tasks of `tasks/`."""
