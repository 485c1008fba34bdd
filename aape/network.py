"""The one network probe: can a host be reached at all, answered within seconds, so that an offline
machine fails fast with instructions instead of hanging in a download."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def host_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host opens: its port, else 80 for http, else 443.
    A bare host name ('huggingface.co') counts as https."""
    parsed = urlparse(url)
    host = parsed.hostname or url
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # includes DNS failure (socket.gaierror) and timeouts
        return False
