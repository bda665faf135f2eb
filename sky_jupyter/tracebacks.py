"""Tracebacks that point at the user's own lines.

cloudpickle replaces the file name of code it ships by value with ``<dynamic-code>``, so a node cannot say
which file a frame came from, nor show its source. The client still has the code objects and the source (script
files, notebook cells in ``linecache``): it maps each ``<dynamic-code>`` frame back by function name and line.

In a notebook, this package's own frames are noise around an error it raised on purpose: the shell shows a
:class:`~sky_jupyter.SkyError` with the user's frames only (:func:`show_sky_error`).
"""

from __future__ import annotations

import linecache
import os
import re
import sys
import types
from collections.abc import Iterable, Iterator
from typing import Any

_FRAME = re.compile(r'^(\s*)File "<dynamic-code>", line (\d+), in (.+)$')


def _codes(obj: Any, depth: int = 0) -> Iterator[types.CodeType]:
    code = getattr(obj, "__code__", None) or (obj if isinstance(obj, types.CodeType) else None)
    if code is None:
        fn = getattr(obj, "fn", None)  # a sky.compute wrapper
        if fn is not None and depth < 3:
            yield from _codes(fn, depth + 1)
        return
    stack = [code]
    while stack:
        c = stack.pop()
        yield c
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))


def _last_line(code: types.CodeType) -> int:
    lines = [line for _, _, line in code.co_lines() if line is not None]
    return max(lines, default=code.co_firstlineno)


def localize(tb: str, objects: Iterable[Any]) -> str:
    """Rewrite ``<dynamic-code>`` frames of ``tb`` with the file and source line of the matching code object."""
    if "<dynamic-code>" not in tb:
        return tb
    index: dict[str, list[tuple[int, int, str]]] = {}
    for obj in objects:
        for code in _codes(obj):
            index.setdefault(code.co_name, []).append((code.co_firstlineno, _last_line(code), code.co_filename))
    out = []
    for line in tb.splitlines():
        m = _FRAME.match(line)
        if m:
            indent, lineno, name = m.group(1), int(m.group(2)), m.group(3)
            for first, last, filename in index.get(name.strip(), ()):
                if first <= lineno <= last:
                    out.append(f'{indent}File "{filename}", line {lineno}, in {name}')
                    source = linecache.getline(filename, lineno).strip()
                    if source:
                        out.append(f"{indent}    {source}")
                    break
            else:
                out.append(line)
        else:
            out.append(line)
    return "\n".join(out) + ("\n" if tb.endswith("\n") else "")


# -- this package's own frames, left out of what a notebook shows -------------------------------------------------
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _ours(frame: types.FrameType) -> bool:
    return os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE)


def without_our_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` less the frames of this package's own files: what is left is the user's code (and the shell's)."""
    kept = []
    while tb is not None:
        if not _ours(tb.tb_frame):
            kept.append(tb)
        tb = tb.tb_next
    chain = None
    for entry in reversed(kept):
        chain = types.TracebackType(chain, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return chain


def show_sky_error(shell: Any, etype: type[BaseException], value: BaseException, tb: types.TracebackType | None,
                   tb_offset: int | None = None) -> list[str]:
    """IPython's handler for :class:`~sky_jupyter.SkyError` (``shell.set_custom_exc``): the error with the user's
    own frames only, or as the error renders itself (a remote error: the node's traceback). ``%tb`` still shows
    every frame."""
    render = getattr(value, "_render_traceback_", None)
    if render is not None:
        stb = render()
    else:
        chained: list[tuple[BaseException, types.TracebackType | None]] = []
        cursor: BaseException | None = value
        while cursor is not None and all(cursor is not e for e, _ in chained):  # each one shown, trimmed alike
            chained.append((cursor, tb if cursor is value else cursor.__traceback__))
            cursor = cursor.__cause__ or (None if cursor.__suppress_context__ else cursor.__context__)
        try:
            for exc, own in chained:
                exc.__traceback__ = without_our_frames(own)
            stb = shell.InteractiveTB.structured_traceback(etype, value, value.__traceback__, tb_offset=tb_offset)
        finally:
            for exc, own in chained:
                exc.__traceback__ = own
    shell._showtraceback(etype, value, stb)
    # As IPython's own display of an error leaves it: %tb (every frame) and %debug find it; %pdb on debugs it.
    sys.last_type, sys.last_value, sys.last_traceback = etype, value, tb
    if sys.version_info >= (3, 12):
        setattr(sys, "last_exc", value)  # noqa: B010 - not in 3.11's typing
    if shell.call_pdb:
        shell.debugger(force=True)
    return stb
