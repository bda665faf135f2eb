"""``sky.plugins.joblib()`` and ``sky.plugins.sklearn()``: joblib's ``Parallel`` (and so scikit-learn's
``n_jobs``: grid searches, cross-validation, forests) spread over every worker of the pool.

While a pool with the plugin runs, joblib's default backend in the thread that started it is ``"sky"`` with
``n_jobs=-1`` (one job per worker of the pool); ``joblib.parallel_config(backend="sky")`` selects it anywhere else.
Each batch joblib dispatches is one task, sent with ``>>`` semantics to the least busy worker; its completion lets
joblib dispatch the next. Inside a task, nested ``Parallel`` calls run in threads on that worker (joblib's default
for nested work). joblib and scikit-learn are imported only where used (the client and the workers).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError
from ..image import Image
from ..plugin import Cluster, Plugin

BACKEND = "sky"


def _run_batch(batch: Any) -> Any:
    """On a worker: one joblib batch (a ``BatchedCalls``), its list of results."""
    return batch()


class _Job:
    """What joblib waits on for one batch: a pool call."""

    def __init__(self, call: Any) -> None:
        self.call = call

    def get(self, timeout: float | None = None) -> Any:
        return self.call.wait(timeout)


def _backend_class() -> type:
    """joblib's backend base is imported on first use, so the plugin costs nothing until a pool starts."""
    from joblib.parallel import ParallelBackendBase

    class SkyBackend(ParallelBackendBase):
        """joblib batches as tasks on a running ComputePool's workers."""

        supports_retrieve_callback = False
        supports_timeout = True

        def __init__(self, pool: Any = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.pool = pool
            self.calls: list[Any] = []  # this backend's calls not known to be done

        def __getstate__(self) -> dict[str, Any]:  # nested copies travel with batches; the pool stays here
            return {**self.__dict__, "pool": None, "calls": []}

        def effective_n_jobs(self, n_jobs: int | None) -> int:
            if self.pool is None or not self.pool.running:
                raise ConfigError("joblib backend 'sky' has no running pool: start a sky.ComputePool with "
                                  "plugins=[sky.plugins.joblib()] first (or leave joblib's backend as it was).")
            workers = len(self.pool.workers)
            if n_jobs is None or n_jobs < 0:
                return max(1, workers + 1 + n_jobs) if n_jobs is not None and n_jobs < -1 else workers
            return max(1, n_jobs)

        def submit(self, func: Any, callback: Any = None) -> _Job:
            from ..compute import PendingCompute

            def done() -> None:  # joblib dispatches the next batch from here: not on the connection's reader
                if callback is not None:
                    threading.Thread(target=callback, args=(None,), daemon=True, name="sky-joblib").start()

            call = self.pool.submit(PendingCompute(_run_batch, (func,)), on_done=done)
            self.calls = [c for c in self.calls if not c.done()] + [call]
            return _Job(call)

        def abort_everything(self, ensure_ready: bool = True) -> None:
            """A batch failed: the batches still running are interrupted (not the pool's other work)."""
            for call in self.calls:
                if not call.done():
                    call.interrupt()
            self.calls = []

    return SkyBackend


def joblib(n_jobs: int = -1) -> Plugin:
    """joblib's ``Parallel`` across the pool's workers; ``n_jobs`` is the default while the pool runs (-1: one job
    per worker). Installs joblib on the nodes."""
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0:
        raise ConfigError(f"joblib n_jobs must be a non-zero whole number (-1: one per worker), got {n_jobs!r}")

    def transform(image: Image, cluster: Cluster) -> Image:
        return image.with_pip("joblib")

    @contextlib.contextmanager
    def around_client(pool: Any) -> Iterator[None]:
        try:
            import joblib as joblib_module
        except ImportError:
            raise ConfigError("sky.plugins.joblib() needs joblib on this machine too: pip install joblib") from None
        backend = _backend_class()
        joblib_module.register_parallel_backend(BACKEND, lambda **kw: backend(pool=pool, **kw))
        with joblib_module.parallel_config(backend=BACKEND, n_jobs=n_jobs):
            yield

    return Plugin.create("joblib").with_transform(transform).with_around_client(around_client)


def sklearn(n_jobs: int = -1) -> Plugin:
    """scikit-learn on the nodes, with its ``n_jobs`` work (grid searches, cross-validation, ensembles) spread over
    the pool's workers through :func:`joblib`."""
    base = joblib(n_jobs)

    def transform(image: Image, cluster: Cluster) -> Image:
        return image.with_pip("scikit-learn", "joblib")

    assert base.around_client is not None
    return Plugin.create("sklearn").with_transform(transform).with_around_client(base.around_client)
