"""``python -m sky_jupyter demo | status``: a console demo on the Local provider, and the pools on record."""

from __future__ import annotations

import argparse
import sys
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
    print(f"\n=== running {path.name} through a Jupyter kernel ===")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
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
            "total = sum(sky.shard(data))\nprint('my part sums to', total)\ntotal")
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
        print(f"{p['name']}: {p.get('provider_repr')} nodes={p.get('nodes')} hosts="
              f"{[h.get('addr') for h in p.get('hosts', [])]} client pid {p.get('client_pid')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sky_jupyter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run functions and a %%sky cell on local worker processes")
    d.add_argument("--nodes", type=int, default=2)
    q = sub.add_parser("quickstart", help="run a notebook through a Jupyter kernel and print its outputs")
    q.add_argument("path", nargs="?", default="notebooks/01-quickstart.ipynb")
    sub.add_parser("status", help="list pools recorded in ~/.sky_jupyter/pools")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.nodes)
    if args.command == "quickstart":
        return quickstart(Path(args.path))
    return status()


if __name__ == "__main__":
    sys.exit(main())
