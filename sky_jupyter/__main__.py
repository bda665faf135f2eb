"""``python -m sky_jupyter demo | status``: a console demo on the Local provider, and the pools on record."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import sky_jupyter as sky


@sky.compute
def describe(x: int) -> str:
    info = sky.instance_info()
    print(f"working on {x} as rank {info.rank} of {info.world_size}")
    return f"rank {info.rank}: {x} squared is {x * x}"


@sky.compute
def fail() -> None:
    raise ValueError("remote errors come back with their own type")


def demo(nodes: int) -> int:
    t0 = time.perf_counter()
    with sky.ComputePool(provider=sky.Local(), nodes=nodes, name="demo") as pool:
        print(f"pool of {nodes} local nodes ready in {time.perf_counter() - t0:.2f} s")
        print("one node  (>>):", describe(7) >> pool)
        print("all nodes (@): ", describe(3) @ pool)
        print("gather:        ", sky.gather(*(describe(i) for i in range(4))) >> pool)
        try:
            fail() >> pool
        except ValueError as exc:
            print(f"caught {type(exc).__name__}: {exc}")
        t1 = time.perf_counter()
        for _ in range(200):
            sky.compute(int)() >> pool
        print(f"200 round trips: {(time.perf_counter() - t1) / 200 * 1e3:.2f} ms each")
    _demo_cell(nodes)
    print("pool shut down; nothing left running")
    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "01-quickstart.ipynb"
    if notebook.exists():
        return quickstart(notebook)
    return 0


def quickstart(path: Path) -> int:
    """Execute a notebook through a real Jupyter kernel, printing each code cell and what it output."""
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError:
        print("(install sky-jupyter[notebook] to run the quickstart notebook)")
        return 0
    from jupyter_client.manager import KernelManager

    print(f"\n=== running {path.name} through a Jupyter kernel ===")
    nb = nbformat.read(path, as_version=4)
    # IPC sockets in a folder of our own, not TCP: nothing listens on the network, and ipykernel has no reason to
    # warn that its TCP channels are unencrypted.
    sockets = tempfile.mkdtemp(prefix="sky-kernel-")
    try:
        km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "kernel"))
        NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        print("In: " + cell.source.replace("\n", "\n    "))
        for out in cell.outputs:
            if out.output_type == "stream":
                print(out.text, end="")
            elif "data" in out:
                print(out.data.get("text/plain", ""))
            elif out.output_type == "error":
                print(f"{out.ename}: {out.evalue}")
                return 1
    print(f"=== {path.name}: every cell ran ===")
    return 0


def _demo_cell(nodes: int) -> None:
    """The same through a %%sky cell, in an IPython shell, when IPython is installed."""
    try:
        from IPython.core.interactiveshell import InteractiveShell
    except ImportError:
        print("(install sky-jupyter[notebook] to also see a %%sky cell)")
        return
    try:
        from .notebook import load_ipython_extension  # noqa: F401
    except ImportError:
        return
    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext sky_jupyter")
    shell.run_cell("data = list(range(10))")
    cell = (f"%%sky --nodes {nodes} --pool demo-cell\nimport sky_jupyter as sky\n"
            "total = sum(sky.shard(data))\nprint('my part sums to', total)")
    print(">>> " + cell.replace("\n", "\n... "))
    shell.run_cell(cell)
    shell.run_cell("print('back in the notebook: total =', total)")
    shell.run_cell("%sky down --all")


def status() -> int:
    from . import state

    pools = state.all_pools()
    if not pools:
        print("no pools on record")
    for p in pools:
        print(f"{p.name}: {p.provider_repr} nodes={p.nodes} hosts={[h.get('addr') for h in p.hosts]} client pid "
              f"{p.client_pid}")
    return 0


def _nodes(text: str) -> int:
    """``--nodes``: a whole number from 1 (argparse reports anything else as a one-line usage error)."""
    try:
        nodes = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if nodes < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {nodes}")
    return nodes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sky_jupyter", description="A console demo on the Local "
                                     "provider, a notebook run through a Jupyter kernel, and the pools on record.")
    sub = parser.add_subparsers(dest="command", required=True)
    # argparse %-formats help strings: "%%%%sky" is shown as "%%sky".
    d = sub.add_parser("demo", help="run functions and a %%%%sky cell on local worker processes")
    d.add_argument("--nodes", type=_nodes, default=2, help="local nodes to start (default: 2)")
    q = sub.add_parser("quickstart", help="run a notebook through a Jupyter kernel and print its outputs")
    q.add_argument("path", nargs="?", default="notebooks/01-quickstart.ipynb")
    sub.add_parser("status", help="list pools recorded in ~/.sky_jupyter/pools")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return demo(args.nodes)
        if args.command == "quickstart":
            path = Path(args.path)
            if not path.is_file():
                q.error(f"no notebook at {path} (from {Path.cwd()}); give the path of an .ipynb file")
            return quickstart(path)
        return status()
    except sky.SkyError as exc:  # said in one line, as the notebook does
        print(f"{parser.prog}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
