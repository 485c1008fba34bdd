"""Adapters to outside systems (MLflow). The only part of `aape` that imports them."""
