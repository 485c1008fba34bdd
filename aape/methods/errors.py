"""The methods' error: what a method cannot do with this input or configuration, and what to change."""

from __future__ import annotations

from aape.errors import AAPEError


class MethodError(AAPEError, ValueError):
    """A method cannot be trained or applied as configured; the message names the method and the fix."""
