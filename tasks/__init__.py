"""Prefect tasks: thin wrappers around the library's stage entry points (`aape.stages`)."""
