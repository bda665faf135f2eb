"""The node side needs only the standard library and cloudpickle: the client ships the package to nodes as is.

A worker runs under an import guard that refuses every other top-level module, and serves a handshake, a setup,
tasks, a cell, a pull and a heartbeat to this test; a static pass over the worker package's sources catches the
imports that only run sometimes (in a function, or tried and let fail).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sky_jupyter as sky
from sky_jupyter import protocol as P
from sky_jupyter.node import WorkerLink

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`

ROOT = Path(sky.__file__).resolve().parents[1]
PACKAGE = ROOT / "sky_jupyter"
#: Modules outside sky_jupyter/worker/ that the worker imports; they keep the same rule.
SHARED = {"sky_jupyter.errors", "sky_jupyter.info", "sky_jupyter.protocol", "sky_jupyter.store"}
#: What ``import sky_jupyter`` loads besides (its functions may import the client's machinery: a node never calls them).
PUBLIC = {"sky_jupyter", "sky_jupyter.compute"}
#: What node code may import in a function, when the node has it (cells run in an IPython shell there; xxhash, where
#: present, hashes the values a cell reads to see whether it changed them).
OPTIONAL = {"IPython", "traitlets", "xxhash"}
NODE_TOP_LEVEL = set(sys.stdlib_module_names) | {"cloudpickle", "sky_jupyter"}

# Runs first in the worker's interpreter (python -I, so no PYTHONPATH or user site): refuse every other top-level
# import, remember what was refused, then run the package as ``python -m sky_jupyter.worker`` does.
GUARD = """
import sys
from importlib.machinery import PathFinder

class NodeImportGuard:
    allowed = set(sys.stdlib_module_names) | {"cloudpickle", "sky_jupyter"}
    refused = []
    loaded_before = set(sys.modules)

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in cls.allowed:
            return None
        if PathFinder.find_spec(name, path) is not None:  # not a module absent anyway (pickle tries "org")
            cls.refused.append(name)
        raise ModuleNotFoundError(f"a worker may not import {name!r}", name=name)

sys.meta_path.insert(0, NodeImportGuard)
sys.path.insert(0, ROOT)
import runpy
runpy.run_module("sky_jupyter.worker", run_name="__main__", alter_sys=True)
"""

# A cell run on the guarded worker: what it has imported and what the guard refused.
REPORT = """
import sys
import sky_jupyter as sky
guard = next(f for f in sys.meta_path if f.__name__ == "NodeImportGuard")
report = {"refused": sorted(set(guard.refused)), "package": sky.__file__, "rank": sky.instance_info().rank,
          "loaded": sorted(m for m in set(sys.modules) - guard.loaded_before
                           if m.partition(".")[0] not in sys.stdlib_module_names)}
report
"""


@pytest.fixture
def guarded_worker(tmp_path):
    """A worker process started under the import guard; yields (port, pid, secret)."""
    secret = "boundary-" + P.new_nonce()
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below, after the worker
    proc = subprocess.Popen([sys.executable, "-I", "-c", GUARD.replace("ROOT", repr(str(ROOT)))], cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"secret": secret, "exit_with_stdin": True}).encode() + b"\n")
        proc.stdin.flush()
        line = proc.stdout.readline().decode()
        assert line.startswith(P.READY), (tmp_path / "worker.log").read_text()
        ready = json.loads(line[len(P.READY):])
        yield ready["port"], ready["pid"], secret
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the worker's cue to shut down
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _ask(io: P.FrameIO, kind: P.ClientKind, task_id: int, meta: object = None, payload: list | tuple = ()
         ) -> tuple[str, object, list[str]]:
    """Send one job and collect its answer: (RESULT or ERROR, the value or the error's meta, the output)."""
    io.send(kind, task_id, meta, payload)
    output = []
    while True:
        got, tid, got_meta, frames = io.recv()
        assert tid == task_id, (got, tid, got_meta)
        if got == P.STREAM:
            output.append(got_meta["text"])
        elif got == P.RESULT:
            return got, P.loads(frames), output
        else:
            assert got == P.ERROR, got
            return got, got_meta, output


def test_a_worker_runs_with_nothing_but_the_standard_library_and_cloudpickle(guarded_worker):
    import socket

    port, pid, secret = guarded_worker
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    io = P.FrameIO(sock.makefile("rb"), sock.sendall, sock.close)
    try:
        reply = WorkerLink.handshake(io, secret, "the guarded worker")
        assert reply["pid"] == pid and reply["ok"]
        info = {"rank": 0, "world_size": 1, "head_addr": "127.0.0.1", "node_addrs": ["127.0.0.1"],
                "accelerator": None, "pool_name": "boundary"}
        kind, value, _ = _ask(io, P.SETUP, 1, {"info": info}, P.dumps([]))
        assert kind == P.RESULT and value["pid"] == pid
        assert _ask(io, P.TASK, 2, None, P.dumps((os.getpid, (), {})))[:2] == (P.RESULT, pid)
        kind, value, output = _ask(io, P.TASK, 3, None, P.dumps((lambda: print("from the node") or 42, (), {})))
        assert (kind, value, "".join(output)) == (P.RESULT, 42, "from the node\n")
        kind, meta, _ = _ask(io, P.TASK, 4, None, P.dumps((lambda: 1 / 0, (), {})))
        assert kind == P.ERROR and meta["type"] == "ZeroDivisionError"
        kind, value, _ = _ask(io, P.CELL, 5, {"code": REPORT, "filename": "<boundary>", "binds": ["report"]})
        assert kind == P.RESULT, value
        report = value["value"]
        pulled = _ask(io, P.PULL, 6, {"names": ["report", "absent"]})[1]
        assert P.loads(pulled["values"]["report"]) == report and pulled["missing"] == ["absent"]
        io.send(P.PING, 7)
        assert io.recv()[0] == P.PONG
    finally:
        io.close()
    assert report["package"].startswith(str(PACKAGE)) and report["rank"] == 0
    # The cell looked for IPython (the node has none here) and ran as plain Python; nothing else was refused.
    assert set(report["refused"]) <= OPTIONAL, report["refused"]
    loaded = set(report["loaded"])
    assert {m.partition(".")[0] for m in loaded} <= {"cloudpickle", "sky_jupyter"}, loaded
    ours = {m for m in loaded if m.startswith("sky_jupyter")}
    assert all(m.startswith("sky_jupyter.worker") for m in ours - SHARED - PUBLIC), ours - SHARED - PUBLIC


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module name, whether imported at module level) for each import in a module of the package,
    leaving out those under ``if TYPE_CHECKING:``."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = importlib.util.resolve_name("." * child.level + (child.module or ""), package)
                # ``from .. import protocol`` imports a module; ``from .errors import SkyError`` a name of one.
                found.extend((base if child.module else f"{base}.{alias.name}", top) for alias in child.names)
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def test_node_code_imports_only_what_nodes_have():
    """Every import in sky_jupyter/worker/ and the modules it shares with the client, run or not: the standard
    library, cloudpickle, the worker package, the shared modules; IPython and traitlets only inside functions."""
    files = sorted((PACKAGE / "worker").glob("*.py"))
    files += [PACKAGE / f"{name.removeprefix('sky_jupyter.')}.py" for name in sorted(SHARED)]
    bad = []
    for path in files:
        for name, top in _imports(path):
            first = name.partition(".")[0]
            if first == "sky_jupyter":
                ok = name in SHARED | {"sky_jupyter"} or name.startswith("sky_jupyter.worker")
            else:
                ok = first in NODE_TOP_LEVEL or (not top and first in OPTIONAL)
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}: {name}" + ("" if top else " (in a function)"))
    assert not bad, "node code imports what nodes may not have:\n" + "\n".join(bad)
