"""Running cells in a real IPython shell (the ``shell`` fixture's), and a kernelspec for real Jupyter kernels."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output


def run(ip: InteractiveShell, source: str):
    """Run a cell; return (result, stdout, stderr)."""
    with capture_output(display=True) as cap:
        result = ip.run_cell(textwrap.dedent(source).strip("\n") + "\n", store_history=True)
    return result, cap.stdout, cap.stderr


def ok(ip: InteractiveShell, source: str):
    """Run a cell that must succeed; (result, stdout, stderr)."""
    result, out, err = run(ip, source)
    if not result.success:
        raise AssertionError(f"cell failed: {result.error_in_exec or result.error_before_exec!r}\n{out}\n{err}")
    return result, out, err


def kernelspec(folder: Path) -> Path:
    """A ``python3`` kernelspec that runs this interpreter (the venv's), found first through JUPYTER_PATH."""
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (sky tests)", "language": "python"}))
    return folder
