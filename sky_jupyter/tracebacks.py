"""Remote tracebacks that point at the user's own lines.

cloudpickle replaces the file name of code it ships by value with ``<dynamic-code>``, so a node cannot say
which file a frame came from, nor show its source. The client still has the code objects and the source (script
files, notebook cells in ``linecache``): it maps each ``<dynamic-code>`` frame back by function name and line.
"""

from __future__ import annotations

import linecache
import re
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
