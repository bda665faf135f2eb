"""Secret values known to this process, and redaction of them from anything shown or logged."""

from __future__ import annotations

import threading

_secrets: set[str] = set()
_lock = threading.Lock()


def register(value: str | None) -> None:
    """Remember ``value`` as a secret: :func:`redact` hides it from every message and log line."""
    if value and len(value) >= 6:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    for value in sorted(_secrets, key=len, reverse=True):
        if value in text:
            text = text.replace(value, "***")
    return text
