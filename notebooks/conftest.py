"""nbval runs the example notebooks. The HuggingFace ones need a Hub: a local Hub server with tiny generated
models stands in for it (HF_ENDPOINT, HF_TOKEN and a fresh HF_HOME in the kernels' environment). The notebooks'
code stays what a user would write."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDS_HUB = {"02-huggingface-finetune.ipynb", "03-distributed-training.ipynb", "04-batch-inference.ipynb"}
_stack = contextlib.ExitStack()
_hub_started = False


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("SKY_JUPYTER_HOME", tempfile.mkdtemp(prefix="sky-nb-home-"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Start the Hub before the first HuggingFace notebook's kernel starts (it inherits this environment)."""
    global _hub_started
    if item.path.name not in NEEDS_HUB or _hub_started:
        return
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.hub import running_hub

    root = Path(tempfile.mkdtemp(prefix="sky-nb-hub-"))
    hub = _stack.enter_context(running_hub(root / "repos"))
    os.environ.update(hub.env(root / "hf_home"))
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    _hub_started = True


def pytest_sessionfinish(session: pytest.Session) -> None:
    _stack.close()
