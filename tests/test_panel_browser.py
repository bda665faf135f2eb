"""The panel in a real browser: JupyterLab started here on 127.0.0.1 (a free port, a token, a tmp root folder, this
venv's python3 kernel) and Debian's Chromium driven by Playwright. Nothing but loopback is contacted."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update"]
ARTIFACTS = ROOT / "tests" / "artifacts"
DOCS_SCREENSHOT = ROOT / "docs" / "panel.png"
TOKEN = "hf_skytestFakeBrowserPanelSecret0123456789"


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return (f"Chromium not found at {CHROMIUM}: install Debian's package with `apt-get install -y chromium` "
                f"(tests/run.sh does this when run as root)")
    for module, extra in (("playwright", "playwright"), ("jupyterlab", "jupyterlab"), ("nbformat", "nbformat")):
        if importlib.util.find_spec(module) is None:
            return f"the {extra} package is missing here: pip install -e '.[test]'"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]


@dataclass
class Lab:
    url: str
    token: str
    root: Path  # the server's root_dir, where the notebooks are
    home: Path  # everything the server and its kernels write
    log: Path

    def open_url(self, notebook: str) -> str:
        # ?reset: a fresh workspace, so an earlier test's notebook is not restored beside this one
        return f"{self.url}/lab/tree/{notebook}?reset&token={self.token}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(path: Path, sources: list[str]) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    home = tmp_path_factory.mktemp("lab")
    root = home / "root"
    root.mkdir()
    settings = home / "settings" / "@jupyter-widgets" / "jupyterlab-manager"
    settings.mkdir(parents=True)
    # Save widget state with the notebook (off by default): the token test must see what a saved state holds.
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"saveState": True}))
    notifications = home / "settings" / "@jupyterlab" / "apputils-extension"
    notifications.mkdir(parents=True)
    # No news and no update checks: nothing may leave loopback (and no prompt covers the page).
    (notifications / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    _notebook(root / "panel.ipynb", [
        "%load_ext sky_jupyter",
        "%sky panel",
        "%%sky\nimport sky_jupyter as sky\nprint('hello from node', sky.instance_info().rank)",
    ])
    _notebook(root / "token.ipynb", [
        "%load_ext sky_jupyter",
        "%sky panel",
        "from sky_jupyter.notebook.manager import manager\n"
        "print('kernel token:', manager().settings.public()['hf_token'])",
    ])
    port = _free_port()
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "SKY_JUPYTER_PLAIN"))}
    env.update({
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "SKY_JUPYTER_HOME": str(home / "sky_home"),
        "IPYTHONDIR": str(home / "ipython"),
    })
    log = home / "lab.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.expose_app_in_browser=True",
             *(["--allow-root"] if os.geteuid() == 0 else [])],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                request = urllib.request.Request(f"{url}/api/status", headers={"Authorization": f"token {token}"})
                with urllib.request.urlopen(request, timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Lab(url, token, root, home, log)
    finally:
        proc.send_signal(signal.SIGTERM)  # the server shuts its kernels down; their pools go with them
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        yield page
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)  # how the page looked at the end: the first look on a failure
        page.screenshot(path=str(ARTIFACTS / f"last-{request.node.name}.png"), full_page=True)
        context.close()


def open_notebook(page: Any, lab: Lab, name: str) -> None:
    page.goto(lab.open_url(name))
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell")
    # Ready when this page's own connection to the notebook's kernel is up and the kernel is idle (the status
    # indicators in the page read "Idle" before the connection exists; a cell run then is dropped).
    page.wait_for_function("""() => {
        const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
        const kernel = widget && widget.sessionContext && widget.sessionContext.session
            && widget.sessionContext.session.kernel;
        return !!kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle';
    }""")


def run_cell(page: Any, index: int) -> Any:
    """Select the cell and press Shift+Enter, as a person would; returns the cell's locator."""
    cell = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    return cell


def wait_run(cell: Any) -> None:
    """Wait until the cell has run (its prompt shows an execution count)."""
    cell.page.wait_for_function(
        "(el) => /\\[\\d+\\]/.test(el.textContent)", arg=cell.locator(".jp-InputPrompt").element_handle())


def test_choose_two_local_nodes_launch_run_a_cell_and_shut_down(lab: Lab, page: Any):
    open_notebook(page, lab, "panel.ipynb")
    wait_run(run_cell(page, 0))
    run_cell(page, 1)
    panel = page.locator(".sky-panel")
    panel.wait_for()

    page.select_option(".sky-provider select", "local")
    page.fill(".sky-nodes input", "2")
    page.press(".sky-nodes input", "Enter")
    page.locator(".sky-torch button", has_text="off").click()
    page.click(".sky-launch")
    page.wait_for_function("document.querySelectorAll('.sky-node-row[data-state=\"ready\"]').length === 2")
    page.locator(".sky-state", has_text="2 of 2 nodes ready").wait_for()
    page.locator(".sky-log", has_text="ready: 2 nodes").wait_for()
    rows = page.locator(".sky-node-row").all_inner_texts()
    assert len(rows) == 2 and all("127.0.0.1" in r and "n/a" in r for r in rows)

    sky_cell = run_cell(page, 2)
    sky_cell.locator(".jp-OutputArea-output", has_text="hello from node 0").wait_for()
    sky_cell.locator(".jp-OutputArea-output", has_text="hello from node 1").wait_for()
    output = sky_cell.locator(".jp-OutputArea").inner_text()
    assert "hello from node 0" in output and "hello from node 1" in output

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "panel.png"), full_page=True)
    panel.screenshot(path=str(ARTIFACTS / "panel-widget.png"))
    if not DOCS_SCREENSHOT.exists() or os.environ.get("SKY_UPDATE_DOCS_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(ARTIFACTS / "panel-widget.png", DOCS_SCREENSHOT)

    page.click(".sky-down")
    page.locator(".sky-table", has_text="No nodes").wait_for()
    assert "shut down" in page.locator(".sky-log").inner_text()


def test_the_token_is_nowhere_in_the_saved_notebook(lab: Lab, page: Any):
    import nbformat

    open_notebook(page, lab, "token.ipynb")
    wait_run(run_cell(page, 0))
    run_cell(page, 1)
    page.locator(".sky-panel").wait_for()
    page.fill(".sky-token input", TOKEN)
    page.press(".sky-token input", "Enter")
    page.locator(".sky-token-set").wait_for()
    assert page.input_value(".sky-token input") == ""
    check = run_cell(page, 2)
    check.locator(".jp-OutputArea-output", has_text="kernel token: set").wait_for()  # it reached the kernel

    path = lab.root / "token.ipynb"
    before = path.stat().st_mtime_ns
    check.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + 30
    while path.stat().st_mtime_ns == before and time.monotonic() < deadline:
        time.sleep(0.1)
    saved = path.read_text()
    nb = nbformat.reads(saved, as_version=4)
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    passwords = [m for m in state.values() if m["model_name"] == "PasswordModel"]
    assert passwords and all(m["state"].get("value", "") == "" for m in passwords)  # saved, and empty
    assert "kernel token: set" in saved
    assert TOKEN not in saved
    leaks = [p for p in lab.home.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaks == [], f"the token was written to {leaks}"
