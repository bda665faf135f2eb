"""What a %%sky cell defines or changes comes back to the notebook: classes, functions, namedtuples, enums and
dataclasses defined on a node travel by value (instances too); notebook values a cell changed in place come back
with a notice; ``%sky pull`` fetches what stayed on a node, or says in one line why it cannot. Real IPython shell,
real Local worker processes."""

from __future__ import annotations

import pytest

pytest.importorskip("IPython")
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import sky_jupyter as sky
from sky_jupyter.notebook.manager import manager
from sky_jupyter.worker.cells import _NO_SHELL, CellRunner
from tests.shell import ok, run


def fails(ip: InteractiveShell, source: str, kind: type[BaseException] = UsageError) -> str:
    """Run a cell that must fail with ``kind``; returns the error's message."""
    result, out, err = run(ip, source)
    error = result.error_in_exec or result.error_before_exec
    assert isinstance(error, kind), (error, out, err)
    return str(error)


def sent(rank: int = 0, pool: str = "default") -> list[str]:
    return manager().pools[pool].last_sent.get(rank, [])


def notices(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("sky: ")]


# -- definitions made on a node -------------------------------------------------------------------------------

def test_a_torch_model_defined_and_trained_on_the_node_runs_in_the_notebook(shell):
    torch = pytest.importorskip("torch")
    ok(shell, """
        %%sky
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = torch.nn.Linear(4, 16)
                self.fc2 = torch.nn.Linear(16, 1)

            def forward(self, x):
                return self.fc2(torch.relu(self.fc1(x)))

        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x = torch.randn(32, 4)
        y = x.sum(dim=1, keepdim=True)
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        with torch.no_grad():
            on_node = model(x)
    """)
    ns = shell.user_ns
    assert isinstance(ns["Net"], type) and isinstance(ns["model"], ns["Net"])  # the class the notebook has now
    with torch.no_grad():
        assert torch.allclose(ns["model"](ns["x"]), ns["on_node"], atol=1e-6)

    # Trained further in a later cell: the cell bound nothing new, yet the notebook gets the node's model.
    _, _, err = ok(shell, """
        %%sky
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            after = model(x)
    """)
    assert "model" in "".join(notices(err)), err
    assert "model" not in sent()  # the node had it: nothing was shipped
    with torch.no_grad():
        assert not torch.allclose(ns["after"], ns["on_node"])
        assert torch.allclose(ns["model"](ns["x"]), ns["after"], atol=1e-6)
    ok(shell, "local = 1")  # the notebook's copy did not change, so the node keeps its own: nothing re-sent
    ok(shell, "%%sky\nsame = bool(torch.equal(model(x), after))")
    assert shell.user_ns["same"] is True and "model" not in sent()


def test_functions_namedtuples_enums_and_dataclasses_defined_on_a_node_work_in_the_notebook(shell):
    ok(shell, """
        %%sky
        import dataclasses
        import enum
        from collections import namedtuple

        OFFSET = 1

        def remote_fn(v):
            return v * 3 + OFFSET

        Point = namedtuple("Point", "x y")

        class Color(enum.Enum):
            RED = 1
            BLUE = 2

        @dataclasses.dataclass
        class Config:
            lr: float = 0.1
            layers: list = dataclasses.field(default_factory=list)

            def scaled(self, k):
                return Config(self.lr * k, list(self.layers))

        pt = Point(1, 2)
        color = Color.BLUE
        cfg = Config(0.5, [1, 2])
    """)
    ns = shell.user_ns
    assert ns["remote_fn"](2) == 7
    assert isinstance(ns["pt"], ns["Point"]) and ns["pt"]._replace(x=5) == ns["Point"](5, 2)
    assert ns["color"] is ns["Color"].BLUE and ns["Color"]["RED"].value == 1
    assert isinstance(ns["cfg"], ns["Config"]) and ns["cfg"].scaled(2) == ns["Config"](1.0, [1, 2])
    import dataclasses

    assert [f.name for f in dataclasses.fields(ns["cfg"])] == ["lr", "layers"]
    assert ns["Config"]() == ns["Config"](0.1, [])
    # Sent back to the node, they are the node's own again.
    ok(shell, "%%sky\nsame = (type(cfg) is Config, color is Color.BLUE, remote_fn(1))")
    assert ns["same"] == (True, True, 4)


def test_a_notebook_class_comes_back_as_the_notebooks_own(shell):
    ok(shell, """
        class Box:
            def __init__(self, v):
                self.v = v
            def doubled(self):
                return Box(self.v * 2)
        box = Box(4)
    """)
    doubled = shell.user_ns["Box"].doubled
    ok(shell, "%%sky\nbig = box.doubled()\nBox2 = Box")
    assert type(shell.user_ns["big"]) is shell.user_ns["Box"] and shell.user_ns["Box2"] is shell.user_ns["Box"]
    assert shell.user_ns["Box"].doubled is doubled  # not replaced by the node's copy


def test_pull_fetches_what_a_cell_defined_and_left_on_the_node(shell):
    ok(shell, """
        %%sky --no-pull
        class Later:
            def __init__(self, v):
                self.v = v
        def later_fn(v):
            return v + 1
        kept = Later(3)
    """)
    assert "kept" not in shell.user_ns
    _, out, _ = ok(shell, "%sky pull kept")
    assert "pulled kept from node 0" in out
    assert type(shell.user_ns["kept"]).__name__ == "Later" and shell.user_ns["kept"].v == 3
    ok(shell, "%sky pull Later")
    assert isinstance(shell.user_ns["kept"], shell.user_ns["Later"])
    ok(shell, "%sky pull later_fn")
    assert shell.user_ns["later_fn"](1) == 2


def test_pull_of_a_name_the_node_lacks_is_one_line_naming_the_node(shell):
    message = fails(shell, "%sky pull never_defined_anywhere")
    assert "node 0" in message and "'never_defined_anywhere'" in message and "\n" not in message
    assert "never_defined_anywhere" not in shell.user_ns


def test_pull_of_a_generator_says_in_one_line_why_it_stays(shell):
    ok(shell, "%%sky\ngen = (i for i in range(3))")
    handle = shell.user_ns["gen"]
    assert isinstance(handle, sky.remote.Remote) and "generator" in handle.reason
    message = fails(shell, "%sky pull gen")
    assert "stays on node 0" in message and "generator" in message and "\n" not in message
    assert shell.user_ns["gen"] is handle  # nothing claimed, nothing bound
    ok(shell, "%%sky\nitems = list(gen)")
    assert shell.user_ns["items"] == [0, 1, 2]


def test_a_pulled_value_is_not_sent_back_when_read(shell):
    np = pytest.importorskip("numpy")
    ok(shell, "%%sky --no-pull\nimport numpy as np\npulled = np.ones(100_000)")
    ok(shell, "%sky pull pulled")
    assert isinstance(shell.user_ns["pulled"], np.ndarray)
    ok(shell, "%%sky\nsummed = float(pulled.sum())")
    assert shell.user_ns["summed"] == 100_000 and "pulled" not in sent()
    # The node watches the pulled copy too: changed in place there, it comes back.
    _, _, err = ok(shell, "%%sky\npulled[0] = 5")
    assert shell.user_ns["pulled"][0] == 5 and "pulled" in "".join(notices(err))


def test_pull_option_for_a_name_the_cell_did_not_bind_says_so(shell):
    _, _, err = ok(shell, "%%sky --pull not_there_either\nz = 1")
    assert notices(err) == ["sky: --pull: node 0 has no variable 'not_there_either' (the cell did not bind it); "
                            "nothing came back for it"]


# -- notebook values a cell changed in place ------------------------------------------------------------------

def test_inputs_a_cell_changed_in_place_come_back_with_one_notice(shell):
    np = pytest.importorskip("numpy")
    ok(shell, """
        class Cfg:
            def __init__(self):
                self.lr = 0.1
        cfg = Cfg()
        d = {"k": [1]}
        untouched = {"k": [1]}
    """)
    shell.user_ns["arr"] = np.zeros(4)
    _, _, err = ok(shell, """
        %%sky
        cfg.lr *= 2
        d["k"].append(2)
        arr[1] = 5
        seen = len(untouched)
    """)
    assert notices(err) == ["sky: the cell changed arr, cfg, d on node 0; the notebook has the node's copies now"]
    ns = shell.user_ns
    assert ns["cfg"].lr == 0.2 and type(ns["cfg"]) is ns["Cfg"]
    assert ns["d"] == {"k": [1, 2]} and ns["untouched"] == {"k": [1]}
    assert ns["arr"].tolist() == [0, 5, 0, 0]
    # The notebook and the node have the same copies: the next cell ships nothing and sees the same values.
    _, _, err = ok(shell, "%%sky\nseen = (cfg.lr, d['k'][-1], float(arr[1]))")
    assert ns["seen"] == (0.2, 2, 5.0) and sent() == [] and notices(err) == []
    # A change made in the notebook afterwards is shipped: the node does not keep a stale copy.
    ns["arr"][2] = 7
    ok(shell, "%%sky\nseen = float(arr[2])")
    assert ns["seen"] == 7.0 and sent() == ["arr"]


def test_an_unchanged_input_gives_no_notice_and_is_not_sent_again(shell):
    np = pytest.importorskip("numpy")
    shell.user_ns["readonly"] = np.arange(1000)
    _, _, err = ok(shell, "%%sky\nfirst = int(readonly.sum())")
    assert sent() == ["readonly"] and notices(err) == []
    _, _, err = ok(shell, "%%sky\nsecond = int(readonly[:10].sum())")
    assert sent() == [] and notices(err) == [] and shell.user_ns["second"] == 45
    assert manager().pools["default"].last_rehash[0] >= 0  # the node re-hashed it, and said how long that took


def test_without_pull_the_notebook_keeps_its_copy_and_the_node_its_own(shell):
    ok(shell, "nopull_d = {'k': [1]}")
    _, _, err = ok(shell, "%%sky --no-pull\nnopull_d['k'].append(2)")
    assert notices(err) == ["sky: the cell changed nopull_d on node 0; the notebook keeps its own copy (--no-pull): "
                            "`%sky pull nopull_d` fetches the node's"]
    assert shell.user_ns["nopull_d"] == {"k": [1]}
    ok(shell, "%%sky\nnode_sees = list(nopull_d['k'])")
    assert shell.user_ns["node_sees"] == [1, 2] and sent() == []


def test_a_changed_input_over_the_pull_budget_comes_back_as_a_handle(shell):
    np = pytest.importorskip("numpy")
    shell.user_ns["large"] = np.zeros(1 << 18)  # 2 MB
    ok(shell, "%%sky\nn = len(large)")
    manager().configure(pull_budget=1 << 20)
    try:
        _, _, err = ok(shell, "%%sky\nlarge[0] = 1")
    finally:
        manager().configure(pull_budget=64 << 20)
    handle = shell.user_ns["large"]
    assert isinstance(handle, sky.remote.Remote)
    assert notices(err) == ["sky: the cell changed large on node 0; the notebook has the node's copy now (a "
                            "sky.Remote handle for large: over the pull budget)"]
    ok(shell, "%%sky\nfirst_item = float(large[0])")
    assert shell.user_ns["first_item"] == 1.0


def test_only_the_first_ranks_copy_comes_back_and_the_others_keep_theirs(shell):
    ok(shell, "shared = {'k': []}")
    _, _, err = ok(shell, """
        %%sky --nodes 2 --pool two
        import sky_jupyter as sky
        shared["k"].append(sky.instance_info().rank)
    """)
    assert notices(err) == ["sky: the cell changed shared on node 0; the notebook has the node's copy now"]
    assert shell.user_ns["shared"] == {"k": [0]}
    result, _, _ = ok(shell, "%%sky --nodes 2 --pool two --show-all\nshared['k']")
    assert repr(result.result) == "[node 0] [0]\n[node 1] [1]"  # node 1 kept its own
    assert sent(0, "two") == [] and sent(1, "two") == []


# -- top-level await ----------------------------------------------------------------------------------------

def test_top_level_await_runs_on_the_node(shell):
    ok(shell, "%%sky\nimport asyncio\nawait asyncio.sleep(0)\nawaited = 5")
    assert shell.user_ns["awaited"] == 5
    result, _, _ = ok(shell, "%%sky\nawait asyncio.sleep(0, result=7)")
    assert repr(result.result) == "7"
    ok(shell, "%%sky\n!true\nafter_magic = await asyncio.sleep(0, result=8)")  # IPython syntax: the shell's path
    assert shell.user_ns["after_magic"] == 8


def test_top_level_await_runs_on_a_node_without_ipython():
    runner = CellRunner({"__name__": "__main__"})
    runner._shell = _NO_SHELL  # as on a node that has no IPython
    code = "import asyncio\nq = asyncio.Queue()\nawait q.put(1)\nawait asyncio.sleep(0, result=3)"
    result = runner.run({"code": code, "binds": ["asyncio", "q"]}, [])
    assert result["value"] == 3
    # The event loop stays from cell to cell: what a cell made on it is usable in the next.
    assert runner.run({"code": "await q.get()"}, [])["value"] == 1
