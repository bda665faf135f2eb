"""The example notebooks run under nbval (see notebooks/); this checks that nbval would catch a notebook whose
stored output no longer matches what its code produces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def _nbval(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SKY_JUPYTER_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", str(path),
                           "--rootdir", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_nbval_passes_the_quickstart_and_fails_a_tampered_copy(tmp_path):
    good = tmp_path / "good.ipynb"
    shutil.copy(ROOT / "notebooks" / "01-quickstart.ipynb", good)
    nb = nbformat.read(good, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("scaled[:4]"))
    assert cell.outputs[0]["data"]["text/plain"] == "([0, 3, 6, 9], 135)"
    cell.outputs[0]["data"]["text/plain"] = "([0, 3, 6, 9], 136)"
    bad = tmp_path / "bad.ipynb"
    nbformat.write(nb, bad)

    passed = _nbval(good, tmp_path)
    assert passed.returncode == 0, passed.stdout[-3000:]
    failed = _nbval(bad, tmp_path)
    assert failed.returncode != 0
    assert "136" in failed.stdout and "135" in failed.stdout
