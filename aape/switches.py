"""Process-wide switches read from `AAPE_*` environment variables.

They are for settings that belong to a process rather than to a run (how malloc behaves, whether a
compiled loop is used), so they stay out of params.yaml. Each is a small set of words, the first
being the default; anything else is refused with a one-line message naming the variable.
"""

from __future__ import annotations

import os

from aape.errors import AAPEError


def choice(name: str, choices: tuple[str, ...], error: type[AAPEError], hint: str = "") -> str:
    """The value of switch `name`, lower-cased; unset means choices[0]. `error` is raised otherwise."""
    value = os.environ.get(name, choices[0]).strip().lower()
    if value not in choices:
        advice = f"; {hint}" if hint else ""
        raise error(f"{name}={value!r} is not one of {', '.join(choices)}{advice}")
    return value
