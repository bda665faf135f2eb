"""Secret values known to this process, and redaction of them from anything shown or logged.

On the client, everything that comes back from nodes passes through here (task output, display bundles,
exceptions and their tracebacks), so it runs on every chunk of output: the known values are kept as one snapshot,
rebuilt when a value is registered, and a text holding none of them costs a few substring searches.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

MASK = "***"
MIN_SECRET_LENGTH = 6  # shorter values would mask ordinary words
#: Environment variables whose values are secrets wherever they are set; a pool registers them when it starts.
SECRET_ENVIRONMENT = ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@dataclass(frozen=True, slots=True)
class _Known:
    values: tuple[str, ...]  # longest first: where two overlap, the longer is masked whole
    pattern: re.Pattern[str]
    breaks_lines: bool  # some value holds a line break, so a chunk ending with one may still end inside a secret


_known: _Known | None = None
_lock = threading.Lock()


def register(value: str | None) -> None:
    """Remember ``value`` as a secret: :func:`redact` hides it from every message and log line."""
    global _known
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    with _lock:
        values = set(_known.values) if _known is not None else set()
        if value in values:
            return
        values.add(value)
        ordered = tuple(sorted(values, key=len, reverse=True))
        _known = _Known(ordered, re.compile("|".join(map(re.escape, ordered))),
                        any("\n" in v or "\r" in v for v in ordered))


def register_environment(environ: Mapping[str, str] = os.environ) -> None:
    """Register the values of :data:`SECRET_ENVIRONMENT` set in ``environ`` (tokens and cloud credentials)."""
    for name in SECRET_ENVIRONMENT:
        register(environ.get(name))


def redact(text: str) -> str:
    known = _known
    if known is None or not text:
        return text
    for value in known.values:  # a substring search per value is several times cheaper than the regex's scan
        if value in text:
            return known.pattern.sub(MASK, text)
    return text


def holds_secret(text: str) -> bool:
    known = _known
    return known is not None and any(value in text for value in known.values)


def redact_strings(obj: Any, depth: int = 0) -> Any:
    """``obj`` with every string in it redacted, through dicts, lists and tuples (a display bundle, a JSON value)."""
    if isinstance(obj, str):
        return redact(obj)
    if depth > 50 or _known is None:
        return obj
    if isinstance(obj, dict):
        return {k: redact_strings(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_strings(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact_strings(v, depth + 1) for v in obj)
    return obj


class StreamRedactor:
    """Redaction for text that arrives in chunks, each stream under its own key (a task's stdout, say).

    A secret split between two chunks would pass :func:`redact` in both halves, so the end of a chunk that could be
    the start of a secret is held back and put in front of the stream's next chunk; :meth:`flush` lets it go when
    the stream ends. Only such an end is held (a chunk ending with a line break, as most do, holds nothing), so
    output waits only while it may be part of a secret.
    """

    def __init__(self) -> None:
        self._held: dict[Hashable, str] = {}

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def feed(self, key: Hashable, text: str) -> str:
        """What of ``text`` (after what was held for ``key``) can be shown now, redacted."""
        if self._held:
            text = self._held.pop(key, "") + text
        known = _known
        if known is None or not text:
            return text
        text = redact(text)
        if text[-1] in "\r\n" and not known.breaks_lines:
            return text
        keep = _secret_start_at_end(known, text)
        if keep:
            self._held[key] = text[-keep:]
            return text[:-keep]
        return text

    def flush(self, key: Hashable) -> str:
        """What is held for ``key``: the stream ended, so it was not the start of a secret after all."""
        return self._held.pop(key, "") if self._held else ""

    def take(self, other: StreamRedactor) -> None:
        """Carry on the streams ``other`` was holding (a connection replaced by another to the same worker)."""
        self._held.update(other._held)
        other._held.clear()


def _secret_start_at_end(known: _Known, text: str) -> int:
    """The length of the longest end of ``text`` that is the start (not the whole) of a known secret."""
    longest = 0
    for value in known.values:
        window = text[-(len(value) - 1):]
        first = value[0]
        i = window.find(first)
        while i != -1 and len(window) - i > longest:
            if value.startswith(window[i:]):
                longest = len(window) - i
                break
            i = window.find(first, i + 1)
    return longest
