"""``%sky panel``: an ipywidgets panel that sets what bare ``%%sky`` cells use, starts and stops the pool, and
shows every node the notebook's pool manager runs, whether the panel or a cell started it (and, where a node runs
several worker processes, each of them under its node).

The panel holds no settings of its own: each valid field change goes straight to ``manager().configure``, and
``%sky config`` changes come back to the fields through the manager's events. The HuggingFace token is read into
the kernel the moment it is entered and the field is emptied in the same step, so no token is ever part of the
widget state a notebook saves. Launch and Shut down run on a background thread, so the notebook stays usable while
nodes bootstrap; their messages go to the panel's log (JupyterLab drops plain prints from widget callbacks).
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
from traitlets import Unicode

from ..errors import ConfigError, SkyError
from ..redaction import redact
from .manager import PROVIDERS, PoolManager, PoolRequest, Settings, manager, parse_workers_per_node, torch_by_default

if TYPE_CHECKING:
    from ..node import RemoteWorker
    from ..state import PoolRecord

TORCH_CHOICES = {"auto": None, "on": True, "off": False}
WORKER_CHOICES = ("auto", "1", "2", "4", "8")
MAX_NODES = 512
_ERROR = "color: var(--jp-error-color1, #c62828)"
_MUTED = "color: var(--jp-ui-font-color2, #666)"
_CELL = "padding: 2px 10px; text-align: left; border-bottom: 1px solid var(--jp-border-color2, #ddd)"


class SecretField(widgets.Password):
    """A password field whose value the kernel never echoes back to the browser (ipywidgets echoes by default)."""

    value = Unicode("", help="What was typed; the panel empties it as soon as it has read it.").tag(
        sync=True, echo_update=False)


@dataclass
class NodeProgress:
    """What the panel knows about one node's bootstrap, from the pool's progress callback."""

    phase: str = ""
    lines: int = 0
    finished: str = ""  # "done", "cached" (bootstrapped before) or "" while it runs
    seen: float = field(default_factory=time.time)


def price_note(accelerator: str | None, nodes: int, provider: str, spot: bool) -> tuple[str, str]:
    """(note, problem) for the accelerator field: the instance type and hourly price it maps to, or what is wrong."""
    name = (accelerator or "").strip()
    try:
        from .. import accelerators
    except ImportError:  # the AWS table ships with the AWS provider; without it there is nothing to show
        return ("", "") if not name else (f"{name} (no price table in this version)", "")
    try:
        row = accelerators.lookup(name or None)
    except ConfigError as exc:
        return "", str(exc)
    if provider == "local":
        where = "Local: runs here, no cost"
    elif provider == "ssh":
        where = "SSH: your own machines, no cost counted"
    elif row.price_per_hour is None:
        where = (f"No list price in the table ({accelerators.PRICES_REGION}, {accelerators.PRICES_DATE}): cost "
                 "not counted")
    else:
        total = row.price_per_hour * nodes
        where = (f"${total:.2f}/h for {nodes} node{'s' if nodes != 1 else ''} on demand "
                 f"({accelerators.PRICES_REGION}, {accelerators.PRICES_DATE})" + ("; spot costs less" if spot else ""))
    gpus = f"{row.gpus}x {row.gpu_memory_gib} GiB" if row.gpus else "no GPU"
    price = f"${row.price_per_hour:.2f}/h per node" if row.price_per_hour is not None else "price unknown"
    return f"{row.name}: {row.instance_type} on AWS ({gpus}), {price}. {where}.", ""


def hourly_price(provider: str, accelerator: str | None) -> float | None:
    """USD per node and hour for a running node, or None where nothing is billed through us (Local, SSH)."""
    if provider != "aws":
        return None
    try:
        from .. import accelerators

        return accelerators.lookup(accelerator).price_per_hour
    except (ImportError, ConfigError):
        return None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"


def _memory(rss: int | None) -> str:
    if rss is None:
        return ""
    if rss >= 1 << 30:
        return f"{rss / (1 << 30):.1f} GiB"
    return f"{rss / (1 << 20):.0f} MiB"


def _worker_rss(worker: RemoteWorker) -> int | None:
    """The worker's resident memory as its last heartbeat reported it (None before the first); never waits."""
    link = worker.link
    rss = link.last_pong.get("rss") if link is not None else None
    return rss if isinstance(rss, int) and not isinstance(rss, bool) else None


def _workers_note(pool: Any) -> str:
    """What follows a node count in messages: " (N workers)" where nodes run several workers, else nothing."""
    return f" ({len(pool.workers)} workers)" if pool.several_per_node else ""


def _node_state(workers: list[RemoteWorker]) -> str:
    """A node's state from its workers': ready when all are, else the first one's that is not."""
    return next((w.state for w in workers if w.state != "ready"), "ready")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


class Panel:
    """The widgets, wired to a pool manager. ``panel()`` gives the kernel's one panel; display it to see it."""

    def __init__(self, mgr: PoolManager | None = None) -> None:
        self.manager = mgr or manager()
        self.messages: list[str] = []  # everything written to the log area, for tests and `panel.messages`
        self.errors: dict[str, str] = {}  # field -> what is wrong with its current value
        self.progress: dict[tuple[str, int], NodeProgress] = {}
        self._since: dict[str, float] = {}  # pool -> when it started provisioning (cost counts from there)
        self._phases: dict[str, list[str]] = {}  # pool -> its bootstrap phase names, for "phase k of n"
        self._syncing = False  # True while fields are set from the manager's settings (do not write them back)
        self._closed = False
        self._launching: str | None = None
        self._lock = threading.RLock()
        self._log_lock = threading.Lock()
        self._work = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sky-panel")
        self._tick = threading.Event()
        self._ticker: threading.Thread | None = None
        self._build()
        self.sync_from_settings(self.manager.settings)
        self.manager.listeners.append(self._on_event)
        self.manager.progress_listeners.append(self._on_progress)
        self.refresh()
        self._wake()

    # -- widgets -------------------------------------------------------------------------------------------
    def _build(self) -> None:
        style = {"description_width": "110px"}
        wide = widgets.Layout(width="320px")

        def note(name: str) -> widgets.HTML:
            return widgets.HTML("", layout=widgets.Layout(margin="0 0 0 12px")).add_class(f"sky-{name}-note")

        self.provider = widgets.Dropdown(options=list(PROVIDERS), description="Provider", style=style,
                                         layout=wide).add_class("sky-provider")
        self.hosts = widgets.Text(description="SSH hosts", placeholder="user@host1, user@host2", style=style,
                                  continuous_update=False, layout=wide).add_class("sky-hosts")
        self.nodes = widgets.BoundedIntText(value=1, min=0, max=MAX_NODES, description="Nodes", style=style,
                                            layout=wide).add_class("sky-nodes")
        self.accelerator = widgets.Combobox(options=self._known_accelerators(), ensure_option=False,
                                            placeholder="none (CPU)", description="Accelerator", style=style,
                                            continuous_update=False, layout=wide).add_class("sky-accelerator")
        self.spot = widgets.Checkbox(description="Spot instances (AWS)", style=style,
                                     indent=True).add_class("sky-spot")
        self.token = SecretField(description="HF token", placeholder="hf_... then Enter", style=style,
                                 continuous_update=False, layout=wide).add_class("sky-token")
        self.hf = widgets.Checkbox(description="HuggingFace", indent=False, layout=widgets.Layout(width="130px"),
                                   tooltip="transformers, datasets, ... and a Hub login on every node",
                                   ).add_class("sky-hf")
        self.torch = widgets.ToggleButtons(options=list(TORCH_CHOICES), style={"button_width": "52px"},
                                           tooltips=["on when nodes > 1", "always", "never"]).add_class("sky-torch")
        self.workers = widgets.Combobox(options=list(WORKER_CHOICES), ensure_option=False, placeholder="auto",
                                        description="Workers/node", style=style, continuous_update=False,
                                        tooltip="worker processes per node: auto (one per GPU with torch.distributed, "
                                                "else one) or a whole number", layout=wide).add_class("sky-workers")
        self.idle = widgets.BoundedFloatText(value=30, min=0, max=7 * 24 * 60, step=5, description="Idle (min)",
                                             style=style, layout=wide).add_class("sky-idle")
        self.notes = {name: note(name) for name in ("provider", "hosts", "nodes", "workers", "accelerator", "token",
                                                      "idle")}
        self.launch_button = widgets.Button(description="Launch", button_style="primary", icon="play",
                                            tooltip="start the pool with these settings").add_class("sky-launch")
        self.down_button = widgets.Button(description="Shut down", button_style="warning", icon="stop",
                                          tooltip="stop the pool; its remote namespace is lost").add_class("sky-down")
        self.attach_button = widgets.Button(description="Attach", icon="link", layout=widgets.Layout(display="none"),
                                            tooltip="take over the pool a kernel that stopped left running, with "
                                                    "its remote namespace").add_class("sky-attach")
        self.detached_note = widgets.HTML("").add_class("sky-detached-note")
        self.state = widgets.HTML("").add_class("sky-state")
        self.table = widgets.HTML("").add_class("sky-table")
        self.log = widgets.Output(layout=widgets.Layout(max_height="160px", overflow="auto",
                                                        border="1px solid var(--jp-border-color2, #ddd)"))
        self.log.add_class("sky-log")

        def row(widget: widgets.Widget, name: str | None = None) -> widgets.HBox:
            parts = [widget] + ([self.notes[name]] if name else [])
            return widgets.HBox(parts, layout=widgets.Layout(align_items="center"))

        self.hosts_row = row(self.hosts, "hosts")
        self.view = widgets.VBox([
            widgets.HTML(f"<b>sky_jupyter</b> <span style='{_MUTED}'>settings here are what bare "
                         f"<code>%%sky</code> cells use</span>"),
            row(self.provider, "provider"), self.hosts_row, row(self.nodes, "nodes"),
            row(self.workers, "workers"),
            row(self.accelerator, "accelerator"), self.spot, row(self.token, "token"),
            widgets.HBox([widgets.HTML("<div style='text-align: right'>Plugins</div>",
                                       layout=widgets.Layout(width="110px", margin="0 8px 0 0"))
                          .add_class("sky-label"), self.hf, widgets.HTML("torch.distributed&nbsp;"), self.torch],
                         layout=widgets.Layout(align_items="center")),
            row(self.idle, "idle"),
            widgets.HBox([self.launch_button, self.attach_button, self.down_button, self.state],
                         layout=widgets.Layout(align_items="center", margin="6px 0")),
            self.detached_note, self.table, self.log,
        ]).add_class("sky-panel")

        self.provider.observe(self._on_provider, "value")
        self.hosts.observe(self._on_hosts, "value")
        self.nodes.observe(self._on_nodes, "value")
        self.workers.observe(self._on_workers, "value")
        self.accelerator.observe(self._on_accelerator, "value")
        self.spot.observe(self._on_spot, "value")
        self.token.observe(self._on_token, "value")
        self.hf.observe(lambda change: self._write(hf=bool(change["new"])), "value")
        self.torch.observe(lambda change: self._write(torch=TORCH_CHOICES[change["new"]]), "value")
        self.idle.observe(self._on_idle, "value")
        self.launch_button.on_click(self._guarded(self.launch))
        self.down_button.on_click(self._guarded(self.shut_down))
        self.attach_button.on_click(self._guarded(self.attach))

    @staticmethod
    def _known_accelerators() -> list[str]:
        try:
            from .. import accelerators
        except ImportError:
            return []
        return accelerators.known()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = self.view._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):  # where widgets cannot show (a terminal, a static page): a short line
            bundle["text/plain"] = "sky_jupyter panel (a widget: open this notebook in JupyterLab or Notebook 7)"
        return bundle

    def children(self) -> list[widgets.Widget]:
        """Every widget of the panel, containers included."""
        found: list[widgets.Widget] = []

        def walk(widget: widgets.Widget) -> None:
            found.append(widget)
            for child in getattr(widget, "children", ()):
                walk(child)

        walk(self.view)
        return found

    # -- fields -> settings ---------------------------------------------------------------------------------
    def _problem(self, name: str, message: str) -> None:
        if message:
            self.errors[name] = message
        else:
            self.errors.pop(name, None)
        self.notes[name].value = f"<span style='{_ERROR}'>{html.escape(message, quote=False)}</span>" if message else ""

    def _write(self, **changes: Any) -> None:
        if self._syncing:
            return
        try:
            self.manager.configure(**changes)
        except ConfigError as exc:
            self.say(f"not saved: {exc}", error=True)

    def _on_provider(self, change: dict[str, Any]) -> None:
        self.hosts_row.layout.display = "" if change["new"] == "ssh" else "none"
        self._check_hosts()
        self._write(provider=change["new"])
        self._show_price()

    def _check_hosts(self) -> bool:
        needed = self.provider.value == "ssh" and not self._host_list()
        self._problem("hosts", "the SSH provider needs hosts: user@addr, comma-separated" if needed else "")
        return not needed

    def _host_list(self) -> tuple[str, ...]:
        return tuple(h.strip() for h in self.hosts.value.split(",") if h.strip())

    def _on_hosts(self, change: dict[str, Any]) -> None:
        self._check_hosts()
        self._write(hosts=self._host_list())

    def _on_nodes(self, change: dict[str, Any]) -> None:
        nodes = change["new"]
        if nodes < 1:
            self._problem("nodes", f"a pool needs at least 1 node (got {nodes})")
            return
        self._problem("nodes", "")
        self._write(nodes=int(nodes))
        self._show_price()

    def _on_workers(self, change: dict[str, Any]) -> None:
        try:
            per_node = parse_workers_per_node(change["new"].strip() or "auto")
        except ConfigError as exc:
            self._problem("workers", str(exc))
            return
        self._problem("workers", "")
        self._write(workers_per_node=per_node)

    def _on_spot(self, change: dict[str, Any]) -> None:
        self._write(spot=bool(change["new"]))
        self._show_price()

    def _on_accelerator(self, change: dict[str, Any]) -> None:
        if self._show_price():
            self._write(accelerator=change["new"].strip() or None)

    def _show_price(self) -> bool:
        nodes = max(self.nodes.value, 1)
        text, problem = price_note(self.accelerator.value, nodes, self.provider.value, self.spot.value)
        self._problem("accelerator", problem)
        if not problem:
            self.notes["accelerator"].value = f"<span style='{_MUTED}'>{html.escape(text, quote=False)}</span>"
        return not problem

    def _on_token(self, change: dict[str, Any]) -> None:
        entered = change["new"]
        if not entered:
            return
        # Empty the field in this same call: the token never stays in the widget (nor in saved widget state).
        self.token.value = ""
        from ..plugins.huggingface import check_token

        try:
            token = check_token(entered, "the panel")
        except ConfigError as exc:
            self._problem("token", str(exc))
            return
        self._problem("token", "")
        self._write(hf_token=token)
        self._show_token()

    def _show_token(self) -> None:
        if "token" in self.errors:
            return
        if self.manager.settings.hf_token:
            self.notes["token"].value = "<span class='sky-token-set'>&#10003; token set</span>"
        else:
            self.notes["token"].value = f"<span style='{_MUTED}'>no token (HF_TOKEN or hf auth login are used)</span>"

    def _on_idle(self, change: dict[str, Any]) -> None:
        minutes = change["new"]
        if not minutes > 0:
            self._problem("idle", "the idle timeout must be more than 0 minutes")
            return
        self._problem("idle", "")
        self._write(idle_timeout=float(minutes) * 60)

    def sync_from_settings(self, settings: Settings) -> None:
        """Show ``settings`` in the fields (at start, and when ``%sky config`` changes them)."""
        with self._lock:
            self._syncing = True
            try:
                self.provider.value = settings.provider
                self.hosts.value = ", ".join(settings.hosts)
                self.hosts_row.layout.display = "" if settings.provider == "ssh" else "none"
                if "nodes" not in self.errors:
                    self.nodes.value = min(settings.nodes, MAX_NODES)
                if "workers" not in self.errors:
                    self.workers.value = str(settings.workers_per_node)
                if "accelerator" not in self.errors:
                    self.accelerator.value = settings.accelerator or ""
                self.spot.value = settings.spot
                self.hf.value = settings.hf
                self.torch.value = next(k for k, v in TORCH_CHOICES.items() if v == settings.torch)
                if "idle" not in self.errors:
                    self.idle.value = round(settings.idle_timeout / 60, 2)
            finally:
                self._syncing = False
            self._check_hosts()
            self._show_price()
            self._show_token()

    # -- actions ------------------------------------------------------------------------------------------
    def _guarded(self, action: Callable[[], Any]) -> Callable[[Any], None]:
        def on_click(_button: Any) -> None:
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - a click has no caller to raise to: show it in the log
                self.say(f"{type(exc).__name__}: {exc}", error=True)
        return on_click

    def problems(self) -> list[str]:
        self._check_hosts()
        return [f"{name}: {message}" for name, message in self.errors.items()]

    def request(self) -> PoolRequest:
        """What Launch asks of the pool manager: what a bare ``%%sky`` cell would ask, from the same settings."""

        settings = self.manager.settings
        existing = self.manager.pools.get(settings.pool)
        running_pool = existing.pool if existing is not None and existing.pool.running else None
        size = max(settings.nodes, running_pool.size if running_pool is not None else 0)
        # None (the default): the manager decides, as for a bare cell (a pool it started so gets torch as it grows).
        return PoolRequest(name=settings.pool, provider=settings.provider, nodes=size,
                           accelerator=settings.accelerator, hf=settings.hf, torch=settings.torch,
                           workers_per_node=settings.workers_per_node)

    def launch(self) -> Any:
        """Start (or grow) the pool with the panel's settings, on a background thread. Returns its future, or
        None when a field is invalid (then nothing starts)."""
        problems = self.problems()
        if problems:
            self.say("not launched, fix first: " + "; ".join(problems), error=True)
            return None
        request = self.request()
        with self._lock:
            if self._launching:
                self.say(f"pool {self._launching!r} is already starting")
                return None
            self._launching = request.name
        self.launch_button.disabled = True
        self.launch_button.description = "Launching..."
        per_node = request.workers_per_node
        self.say(f"launching pool {request.name!r}: {_plural(request.nodes, 'node')} on {request.provider}"
                 + (f", {per_node} workers per node" if per_node != "auto" and per_node != 1 else "")
                 + (f", {request.accelerator}" if request.accelerator else "")
                 + (", HuggingFace" if request.hf else "")
                 + (", torch.distributed" if request.torch or (request.torch is None and torch_by_default(
                     request.provider, request.nodes)) else ""))
        self._wake()
        return self._work.submit(self._launch, request)

    def _launch(self, request: PoolRequest) -> None:
        started = time.monotonic()
        try:
            existing = self.manager.pools.get(request.name)
            before = existing.pool.size if existing is not None and existing.pool.running else 0
            npool = self.manager.ensure(request)
            if before and npool.pool.size == before:
                self.say(f"pool {request.name!r} is already running with {_plural(before, 'node')}"
                         f"{_workers_note(npool.pool)}")
            else:
                self.say(f"pool {request.name!r} ready: {_plural(npool.pool.size, 'node')}"
                         f"{_workers_note(npool.pool)} in {time.monotonic() - started:.1f} s; bare %%sky cells run "
                         f"there")
        except SkyError as exc:
            hint = (" (or click Attach, or Shut down)" if "%sky attach" in str(exc)
                    else " (or click Shut down)" if "%sky down" in str(exc) else "")
            self.say(f"launch failed: {exc}{hint}", error=True)
        except Exception as exc:  # noqa: BLE001 - on a background thread: the log is the only place to report it
            self.say(f"launch failed: {type(exc).__name__}: {exc}", error=True)
        finally:
            with self._lock:
                self._launching = None
            self.launch_button.disabled = False
            self.launch_button.description = "Launch"
            self.refresh()

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every Launch and Shut down clicked so far has finished (for scripts and tests)."""
        self._work.submit(lambda: None).result(timeout)

    def shut_down(self) -> Any:
        """Stop the configured pool, on the background thread (after a launch in progress has finished)."""
        name = self.manager.settings.pool
        if self._launching:
            self.say(f"pool {self._launching!r} is still starting; it is shut down as soon as it is up")
        return self._work.submit(self._shut_down, name)

    def attach(self) -> Any:
        """Take over the configured pool that a kernel which stopped left running, on the background thread.
        What that kernel's last cell still runs there writes into the log."""
        return self._work.submit(self._attach, self.manager.settings.pool)

    def _attach(self, name: str) -> None:
        # Its output is labelled as the pool labels it: by node with one worker per node, else by worker rank.
        record = self._detached()
        several = record is not None and len(record.workers) > len(record.hosts)

        def sink(rank: int) -> Any:
            label = f"rank {rank}" if several else f"node {rank}"

            def write(kind: str, meta: Any) -> None:
                text = meta.get("text") if kind == "stream" else meta.get("data", {}).get("text/plain")
                if text:
                    self.say(f"[{label}] {str(text).rstrip()}")
            return write

        try:
            npool = self.manager.attach(name, leftover_sink=sink)
        except Exception as exc:  # noqa: BLE001 - on a background thread: the log is the only place to report it
            self.say(f"attaching to {name!r} failed: {exc}", error=True)
        else:
            pool = npool.pool
            self.say(f"attached to pool {name!r}: {_plural(pool.size, 'node')}{_workers_note(pool)}, "
                     f"their namespaces as the stopped kernel left them")
            ranks = sorted({call.node.rank for call in pool.leftovers})
            if ranks:
                word = "rank" if pool.several_per_node else "node"
                several = len(ranks) > 1
                self.say(f"{word}{'s' if several else ''} {', '.join(map(str, ranks))} still run"
                         f"{'' if several else 's'} what the stopped kernel started; its output comes here")
        self.refresh()
        self._wake()

    def _detached(self) -> PoolRecord | None:
        """The record of the configured pool when a kernel that stopped left it running."""
        name = self.manager.settings.pool
        return next((p for p in self.manager.detached() if p.name == name), None)

    def _shut_down(self, name: str) -> None:
        if name not in self.manager.pools and self._detached() is None:
            self.say(f"no pool {name!r} is running; nothing to shut down")
            return
        try:
            self.manager.down(name)
        except Exception as exc:  # noqa: BLE001 - on a background thread: the log is the only place to report it
            self.say(f"shutting down {name!r} failed: {type(exc).__name__}: {exc}", error=True)
        self.refresh()

    # -- what the manager reports -------------------------------------------------------------------------
    def _on_event(self, event: str, name: str) -> None:
        if self._closed:
            return
        if event == "settings":
            if not self._syncing:
                self.sync_from_settings(self.manager.settings)
            return
        if event == "starting":
            self._since[name] = time.time()
            self._phases.pop(name, None)
            for key in [k for k in list(self.progress) if k[0] == name]:
                self.progress.pop(key, None)
            pool = self.manager.starting.get(name)
            size = f" ({pool.size} node{'s' if pool.size != 1 else ''} on {pool.provider.name})" if pool else ""
            self.say(f"pool {name!r} starting{size}")
        elif event == "grown":
            npool = self.manager.pools.get(name)
            self.say(f"pool {name!r} grew to {npool.pool.size if npool else '?'} nodes")
        elif event in ("stopped", "idle-stopped"):
            self._since.pop(name, None)
            for key in [k for k in list(self.progress) if k[0] == name]:
                self.progress.pop(key, None)
            self.say(f"pool {name!r} shut down" + (" after its idle timeout" if event == "idle-stopped" else ""))
        elif event == "start-failed":
            self.say(f"pool {name!r} did not start", error=True)
        elif event == "started" and self._launching != name:
            npool = self.manager.pools.get(name)
            self.say(f"pool {name!r} ready ({npool.pool.size if npool else '?'} nodes, started by a cell)")
        self.refresh()
        self._wake()

    def _on_progress(self, name: str, rank: int, phase: str, line: str) -> None:
        if self._closed:
            return
        node = self.progress.setdefault((name, rank), NodeProgress())
        if name not in self._phases:
            self._phases[name] = self._phase_names(name)
        if line:
            node.lines += 1
            if line.startswith(("warning:", "error:")):
                self.say(f"{name} node {rank} {phase}: {line}", error=line.startswith("error:"))
            return  # the ticker shows the line count; a table per line would flood the browser
        if phase in ("done", "cached"):
            node.finished = phase
        else:
            node.phase = phase
        self.refresh()

    def _phase_names(self, name: str) -> list[str]:
        pool = self.manager.starting.get(name) or getattr(self.manager.pools.get(name), "pool", None)
        if pool is None:
            return []
        from ..plugin import bootstrap_ops

        plan = pool.provider.plan(pool.image, bootstrap_ops(pool.plugins, pool.cluster))
        return [phase.name for phase in plan.phases]

    # -- the node table ---------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One row per node the manager knows of: starting pools first, then running ones. Each row's ``workers``
        lists the node's worker processes once they are up (rank over the pool, worker number on the node, state,
        tasks in flight, resident memory in bytes as the last heartbeat told, or None)."""
        now = time.time()
        rows: list[dict[str, Any]] = []
        pools = [(name, pool, False) for name, pool in list(self.manager.starting.items())]
        pools += [(name, npool.pool, True) for name, npool in list(self.manager.pools.items())]
        for name, pool, running in pools:
            by_node: dict[int, list[RemoteWorker]] = {}
            for worker in list(pool.workers):
                by_node.setdefault(worker.node, []).append(worker)
            hosts = list(pool.hosts)
            since = self._since.get(name) or pool.started_at or now
            price = hourly_price(pool.provider.name, pool.accelerator)
            for node in range(max(pool.size, len(hosts), max(by_node, default=-1) + 1)):
                progress = self.progress.get((name, node))
                workers = by_node.get(node, [])
                if workers and (running or all(w.state == "ready" for w in workers)):
                    state = _node_state(workers)
                elif progress is not None and not progress.finished:
                    state = "bootstrapping"
                elif progress is not None or workers:
                    state = "starting worker"
                else:
                    state = "provisioning" if node >= len(hosts) else "provisioned"
                uptime = now - min(since, progress.seen if progress else since)
                rows.append({
                    "pool": name, "node": node, "provider": pool.provider.name,
                    "address": workers[0].host.display if workers else (
                        hosts[node].display if node < len(hosts) else ""),
                    "state": state, "phase": self._phase_text(name, progress), "uptime_s": uptime,
                    "cost": None if price is None else price * uptime / 3600,
                    "fraction": self._fraction(name, progress),
                    "workers": [{"rank": w.rank, "worker": w.local_rank, "state": w.state,
                                 "in_flight": w.in_flight(), "rss": _worker_rss(w)} for w in workers],
                })
        return rows

    def _phase_text(self, name: str, progress: NodeProgress | None) -> str:
        if progress is None:
            return ""
        if progress.finished == "cached":
            return "done (bootstrapped before)"
        if progress.finished:
            return "done"
        names = self._phases.get(name) or []
        where = f" ({names.index(progress.phase) + 1}/{len(names)})" if progress.phase in names else ""
        lines = f", {progress.lines} lines" if progress.lines else ""
        return f"{progress.phase or 'starting'}{where}{lines}"

    def _fraction(self, name: str, progress: NodeProgress | None) -> float | None:
        if progress is None:
            return None
        if progress.finished:
            return 1.0
        names = self._phases.get(name) or []
        return names.index(progress.phase) / len(names) if progress.phase in names else None

    def refresh(self) -> None:
        """Redraw the node table and the status line (from any thread)."""
        with self._lock:
            rows = self.rows()
            self.table.value = self._render(rows)
            if self._launching:
                state = f"starting pool {html.escape(self._launching)}..."
            elif rows:
                ready = sum(1 for r in rows if r["state"] == "ready")
                state = f"{ready} of {_plural(len(rows), 'node')} ready"
                if any(len(r["workers"]) > 1 for r in rows):
                    state += f" ({_plural(sum(len(r['workers']) for r in rows), 'worker')})"
            else:
                state = "no pool running"
            self.state.value = f"<span style='{_MUTED}; margin-left: 10px'>{state}</span>"
            left = self._detached()
            self.attach_button.layout.display = "" if left else "none"
            self.detached_note.value = "" if not left else (
                f"<span style='color: var(--jp-warn-color1, #b36b00)'>Pool {html.escape(left.name)} "
                f"({html.escape(left.provider)}, {len(left.hosts)} nodes) was left "
                f"running by a kernel that stopped. Attach takes it over with its remote namespace; Shut down "
                f"stops it.</span>")

    @staticmethod
    def _render(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return f"<p style='{_MUTED}'>No nodes. Launch starts the pool; so does the first %%sky cell.</p>"
        head = ("pool", "node", "address", "state", "bootstrap", "uptime", "cost so far")
        out = ["<table class='sky-nodes-table' style='border-collapse: collapse; font-size: 12px'><thead><tr>"]
        out += [f"<th style='{_CELL}'>{h}</th>" for h in head]
        out.append("</tr></thead><tbody>")
        for r in rows:
            bar = ""
            if r["fraction"] is not None and 0 < r["fraction"] < 1:
                bar = f"<progress value='{r['fraction']:.2f}' max='1' style='width: 60px'></progress> "
            elif r["state"] == "bootstrapping":
                bar = "<progress style='width: 60px'></progress> "
            cost = "n/a" if r["cost"] is None else f"${r['cost']:.2f}"
            workers = r["workers"]
            node = str(r["node"]) + (f" ({len(workers)} workers)" if len(workers) > 1 else "")
            cells = (r["pool"], node, r["address"], r["state"], None, _duration(r["uptime_s"]), cost)
            out.append(f"<tr class='sky-node-row' data-state='{html.escape(r['state'])}'>")
            for i, cell in enumerate(cells):
                text = (bar + html.escape(r["phase"]) or "-") if cell is None else html.escape(cell)
                out.append(f"<td class='sky-col-{head[i].split()[0]}' style='{_CELL}'>{text}</td>")
            out.append("</tr>")
            if len(workers) > 1:  # a node with several workers: one row each under it
                out += [Panel._render_worker(w, len(workers)) for w in workers]
        out.append("</tbody></table>")
        return "".join(out)

    @staticmethod
    def _render_worker(w: dict[str, Any], per_node: int) -> str:
        """A worker's row under its node: its rank, its number on the node, its state, what it runs, its memory."""
        busy = f"busy ({_plural(w['in_flight'], 'task')})" if w["in_flight"] else "idle"
        memory = _memory(w["rss"])
        cells = (("pool", ""), ("node", f"&#8627; rank {w['rank']}"),
                 ("address", f"worker {w['worker']} of {per_node}"), ("state", html.escape(w["state"])))
        out = [f"<tr class='sky-worker-row' data-state='{html.escape(w['state'])}' data-rank='{w['rank']}'>"]
        out += [f"<td class='sky-col-{name}' style='{_CELL}{'' if name == 'state' else '; ' + _MUTED}'>{text}</td>"
                for name, text in cells]
        out.append(f"<td class='sky-col-activity' colspan='3' style='{_CELL}'>"
                   f"<span class='sky-worker-busy'>{busy}</span>"
                   + (f"<span style='{_MUTED}'> &middot; </span><span class='sky-worker-memory'>{memory}</span>"
                      if memory else "") + "</td>")
        out.append("</tr>")
        return "".join(out)

    def _wake(self) -> None:
        """Keep the table moving (phases, uptime, cost) while anything starts or runs."""
        with self._lock:
            self._tick.set()
            if self._ticker is None and not self._closed:
                self._ticker = threading.Thread(target=self._tick_loop, daemon=True, name="sky-panel-refresh")
                self._ticker.start()

    def _tick_loop(self) -> None:
        while True:
            with self._lock:
                busy = bool(self._launching or self.manager.starting)
                if self._closed or not (busy or self.manager.pools):
                    self._ticker = None
                    return
                self._tick.clear()
            self.refresh()
            self._tick.wait(0.5 if busy else 5.0)

    # -- log ----------------------------------------------------------------------------------------------
    def say(self, message: str, error: bool = False) -> None:
        """A line in the panel's log area (secrets redacted)."""
        line = f"{time.strftime('%H:%M:%S')} {redact(message)}\n"
        with self._log_lock:
            self.messages.append(line.rstrip("\n"))
            if error:
                self.log.append_stderr(line)
            else:
                self.log.append_stdout(line)
            if len(self.log.outputs) > 200:
                self.log.outputs = self.log.outputs[-200:]

    def close(self) -> None:
        """Detach from the manager and close the widgets (pools keep running)."""
        self._closed = True
        self._tick.set()
        for listeners, fn in ((self.manager.listeners, self._on_event),
                              (self.manager.progress_listeners, self._on_progress)):
            if fn in listeners:
                listeners.remove(fn)
        self._work.shutdown(wait=True)
        for widget in self.children():
            widget.close()

    @property
    def closed(self) -> bool:
        return self._closed


_panel: Panel | None = None
_panel_lock = threading.Lock()


def panel() -> Panel:
    """The kernel's widget panel (created on first use; showing it again shows the same panel)."""
    global _panel
    with _panel_lock:
        if _panel is None or _panel.closed:
            _panel = Panel(manager())
        return _panel
