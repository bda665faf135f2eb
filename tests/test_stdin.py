"""``input()``, ``getpass.getpass()`` and ``sys.stdin`` on a node reach whoever waits for the work: the notebook's
input box in a real Jupyter kernel (driven by jupyter_client as JupyterLab drives it, stdin channel included), the
client's own ``input()`` for ``@sky.compute`` calls from a plain Python program. Without an input box (nbclient,
``jupyter execute``) the node's call fails at once, and Stop while a node waits stops it, both keeping the node's
worker and namespace."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")

from tests.shell import kernelspec

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Executed:
    """One execute request: its reply, its iopub messages in order, the input requests it made."""

    reply: dict[str, Any]
    iopub: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[dict[str, Any]] = field(default_factory=list)

    def text(self, name: str | None = None) -> str:
        return "".join(m["content"]["text"] for m in self.iopub
                       if m["msg_type"] == "stream" and name in (None, m["content"]["name"]))

    def streams(self) -> list[dict[str, Any]]:
        return [m["content"] for m in self.iopub if m["msg_type"] == "stream"]


class Kernel:
    """A real ipykernel driven over jupyter_client, as a front end with an input box (``allow_stdin``) or without."""

    def __init__(self) -> None:
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3")

    def run(self, code: str, allow_stdin: bool = True, answers: tuple[str, ...] = (), interrupt: bool = False,
            on_iopub: Any = None, timeout: float = 180) -> Executed:
        """Execute ``code``; answer its input requests with ``answers`` in turn (or interrupt the kernel at the
        first one); ``on_iopub(msg)`` sees each of its iopub messages as it arrives. Returns once its reply and all
        its output (up to the idle status) arrived."""
        msg_id = self.kc.execute(code, allow_stdin=allow_stdin)
        pending = list(answers)
        done = Executed({})
        idle = False
        end = time.monotonic() + timeout
        while not (done.reply and idle):
            assert time.monotonic() < end, f"no reply to {code[:60]!r} within {timeout} s: {done}"
            try:
                request = self.kc.get_stdin_msg(timeout=0.01)
            except queue.Empty:
                pass
            else:
                done.prompts.append(request["content"])
                if interrupt:
                    self.km.interrupt_kernel()
                else:
                    self.kc.input(pending.pop(0))
            try:
                msg = self.kc.get_iopub_msg(timeout=0.01)
            except queue.Empty:
                pass
            else:
                if msg["parent_header"].get("msg_id") == msg_id:
                    done.iopub.append(msg)
                    if on_iopub is not None:
                        on_iopub(msg)
                    idle = msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
            try:
                reply = self.kc.get_shell_msg(timeout=0.01)
            except queue.Empty:
                pass
            else:
                if reply["parent_header"].get("msg_id") == msg_id:
                    done.reply = reply["content"]
        return done

    def ok(self, code: str, **kwargs: Any) -> Executed:
        done = self.run(code, **kwargs)
        assert done.reply["status"] == "ok", (done.reply, done.text())
        return done

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def start_kernel(folder: Path, pool: str) -> Kernel:
    """A kernel with the extension loaded and ``pool`` (one Local node) as its default, interactive output."""
    os.environ["JUPYTER_PATH"] = str(kernelspec(folder))
    os.environ["SKY_JUPYTER_PLAIN"] = "0"  # the kernel's environment: live output, as in JupyterLab
    try:
        kernel = Kernel()
    finally:
        del os.environ["JUPYTER_PATH"], os.environ["SKY_JUPYTER_PLAIN"]
    kernel.ok(f"%load_ext sky_jupyter\n%sky config pool={pool} torch=false")
    return kernel


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):
    k = start_kernel(tmp_path_factory.mktemp("stdin-kernel"), "stdin")
    try:
        yield k
    finally:
        k.run("%sky down --all")
        k.close()


def worker_pid(kernel: Kernel) -> int:
    kernel.ok("%%sky\nimport os\nworker_pid = os.getpid()")
    return int(kernel.ok("print(worker_pid)").text().strip())


def test_input_on_the_node_is_answered_in_the_notebooks_input_box(kernel):
    done = kernel.ok('%%sky\nprint("before the prompt")\nname = input("name? ")\nprint("hello", name)',
                     answers=("ada",))
    assert done.prompts == [{"prompt": "name? ", "password": False}]
    assert done.text() == "before the prompt\nhello ada\n"  # what was printed before the prompt came first
    assert kernel.ok("print(name.upper())").text() == "ADA\n"  # the answer came back to the notebook too


def test_stdin_readline_on_the_node_asks_too(kernel):
    kernel.ok("%%sky\nimport sys\nline = sys.stdin.readline()", answers=("one line",))
    assert kernel.ok("print(repr(line))").text() == "'one line\\n'\n"


def test_getpass_answer_never_shows_in_the_notebook(kernel):
    secret = "hunter2-sky-never-shown"
    done = kernel.ok('%%sky\nimport getpass\npassword = getpass.getpass("token? ")\nsize = len(password)\nsize',
                     answers=(secret,))
    assert done.prompts == [{"prompt": "token? ", "password": True}]
    later = kernel.ok("print(size)")
    assert later.text() == f"{len(secret)}\n"
    assert secret not in json.dumps([m["content"] for m in done.iopub + later.iopub])


def test_without_an_input_box_the_cell_fails_at_once_and_the_namespace_stays(kernel):
    pid = worker_pid(kernel)
    done = kernel.run('%%sky\nkept = "still here"\nanswer = input("name? ")', allow_stdin=False)
    assert done.reply["status"] == "error"
    assert done.reply["ename"] == "StdinNotImplementedError", done.reply
    assert "no input box" in done.reply["evalue"] and "node 0" in done.reply["evalue"]
    assert done.prompts == []
    assert kernel.ok("%%sky\nprint(kept)").text() == "still here\n"
    assert worker_pid(kernel) == pid  # the same worker: not restarted


def test_stop_while_the_node_waits_for_input_keeps_the_worker(kernel):
    pid = worker_pid(kernel)
    done = kernel.run('%%sky\nkept_too = 7\nanswer = input("stop me? ")', interrupt=True)
    assert done.prompts == [{"prompt": "stop me? ", "password": False}]
    assert done.reply["status"] == "error" and done.reply["ename"] == "KeyboardInterrupt", done.reply
    assert kernel.ok("%%sky\nprint(kept_too)").text() == "7\n"
    assert worker_pid(kernel) == pid  # stopped by the interrupt, not replaced after its 10 s grace


def test_two_nodes_ask_in_turn_each_prompt_labelled(kernel):
    done = kernel.ok('%%sky --nodes 2\nimport sky_jupyter as sky\nwho = input("who? ")\n'
                     'print("rank", sky.instance_info().rank, "got", who)', answers=("first", "second"))
    assert sorted(p["prompt"] for p in done.prompts) == ["[node 0] who? ", "[node 1] who? "]
    asked_first = done.prompts[0]["prompt"].removeprefix("[node ")[0]  # the node whose prompt came first
    answers = {asked_first: "first", "1" if asked_first == "0" else "0": "second"}
    assert sorted(done.text().splitlines()) == [f"[node {r}] rank {r} got {answers[r]}" for r in ("0", "1")]


def test_a_background_cell_cannot_ask(kernel):
    kernel.ok('%%sky --bg\ntry:\n    input("nobody? ")\nexcept Exception as exc:\n'
              '    refused = f"{type(exc).__name__}: {exc}"')
    kernel.ok("%sky wait")
    text = kernel.ok("print(refused)").text()
    assert text.startswith("StdinNotImplementedError:") and "background" in text and "no input box" in text


# -- @sky.compute from a plain Python program: the caller's own input() and getpass() ---------------------------
CLIENT = """\
import getpass, sys
import sky_jupyter as sky

@sky.compute
def ask():
    import getpass, sys
    print("before the prompt", flush=True)
    name = input("name? ")
    password = getpass.getpass("password? ")
    line = sys.stdin.readline()
    return name, len(password), line

@sky.compute
def ask_twice(i):
    return input(f"item {{i}}? ")

with sky.ComputePool(provider=sky.Local(), nodes=1, name="stdin-api",
                     worker=sky.Worker(concurrency={concurrency}, executor={executor!r})) as pool:
    print("RESULT", ask() >> pool, flush=True)
    print("ITEMS", sky.gather(ask_twice(1), ask_twice(2)) >> pool, flush=True)
    try:
        ask() >> pool
    except EOFError as exc:
        print("EOF", exc, flush=True)
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("concurrency,executor", [(1, "thread"), (2, "thread"), (2, "process")],
                         ids=["main-thread", "slot-threads", "forked"])
def test_a_compute_call_asks_the_callers_own_input(tmp_path, concurrency, executor):
    secret = "s3cret-never-echoed"
    script = tmp_path / "client.py"
    script.write_text(CLIENT.format(concurrency=concurrency, executor=executor))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], input=f"ada\n{secret}\nthird\nx\ny\n", text=True,
                          capture_output=True, env=env, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "before the prompt\nname? " in out  # the task's output came before its prompt
    assert "RESULT ('ada', 19, 'third\\n')" in out, out
    assert "ITEMS ('x', 'y')" in out or "ITEMS ('y', 'x')" in out, out
    # Stdin ran out: the node's input() raised EOFError, saying where it was asked.
    assert "EOF input() on node 0" in out, out
    assert secret not in out and secret not in done.stderr


def test_a_compute_call_can_be_stopped_while_it_waits_for_input(tmp_path):
    """Ctrl-C in the caller while its input() asks for the node: the call stops, the worker and its state stay."""
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent("""\
        import os
        import sky_jupyter as sky

        @sky.compute
        def ask():
            import sys
            sys.sky_test_kept = "still here"  # lost if the worker process were replaced (exec)
            return input("never answered? ")

        @sky.compute
        def state():
            import sys
            return os.getpid(), getattr(sys, "sky_test_kept", None)

        with sky.ComputePool(provider=sky.Local(), nodes=1, name="stdin-stop") as pool:
            before = state() >> pool
            try:
                ask() >> pool
            except KeyboardInterrupt:
                print("STOPPED", flush=True)
            print("AFTER", (state() >> pool) == (before[0], "still here"), flush=True)
        """))
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = b""
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        end = time.monotonic() + 120
        while b"never answered? " not in out:  # the caller's input() asks now, on a pipe nobody writes to
            assert time.monotonic() < end and proc.poll() is None, (out, proc.stderr.read() if proc.stderr else b"")
            out += proc.stdout.read() or b""
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, err = proc.communicate(timeout=60)
        out += rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"STOPPED" in out and b"AFTER True" in out, (out, err[-3000:])
