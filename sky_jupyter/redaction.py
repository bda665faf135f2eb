"""Secret values known to this process, and redaction of them from anything shown or logged."""

from __future__ import annotations

import threading

MASK = "***"
MIN_SECRET_LENGTH = 6  # shorter values would mask ordinary words

_secrets: set[str] = set()
_lock = threading.Lock()


def register(value: str | None) -> None:
    """Remember ``value`` as a secret: :func:`redact` hides it from every message and log line."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    for value in sorted(_secrets, key=len, reverse=True):
        if value in text:
            text = text.replace(value, MASK)
    return text
