"""``@sky.compute`` and the pending computations it produces: ``>>`` one worker, ``@`` every worker, ``&`` chain,
``sky.gather`` several at once (all together, or streamed as they finish)."""

from __future__ import annotations

import contextvars
import functools
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

if TYPE_CHECKING:
    from .pool import ComputePool

P = ParamSpec("P")
R = TypeVar("R")


class Target:
    """What ``>>`` and ``@`` hand a computation to. :class:`sky_jupyter.ComputePool` is the one kind there is; it
    derives from this class so that this module can recognise it without importing the pool's module (which
    imports this one)."""

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def run(self, pending: PendingCompute[Any]) -> Any:
        raise NotImplementedError

    def broadcast(self, pending: PendingCompute[Any]) -> list[Any]:
        raise NotImplementedError


_entered: contextvars.ContextVar[Target | None] = contextvars.ContextVar("sky_active_pool", default=None)


def enter(target: Target) -> contextvars.Token[Target | None]:
    """Make ``target`` what ``fn() >> sky`` runs on in this context, until :func:`leave` with the token."""
    return _entered.set(target)


def leave(token: contextvars.Token[Target | None]) -> None:
    _entered.reset(token)


def active_pool() -> Target | None:
    """The innermost pool entered with ``with`` in this context (what ``fn() >> sky`` runs on), if it runs."""
    pool = _entered.get()
    return pool if pool is not None and pool.running else None


def _pool(other: object, op: str) -> ComputePool:
    """The pool on the right of ``>>``/``@``: a ComputePool, or the ``sky_jupyter`` module itself (Skyward's
    ``fn() >> sky``), which stands for the innermost pool entered with ``with`` in this context."""
    found: object = other
    if isinstance(other, types.ModuleType) and other.__name__ == "sky_jupyter":
        found = active_pool()
        if found is None:
            raise TypeError(f"fn(...) {op} sky needs a pool entered with `with sky.ComputePool(...):` (or "
                            f"sky.pool(...)) around it; none is.")
    if not isinstance(found, Target):
        raise TypeError(f"the right side of {op} must be a sky.ComputePool, not {type(other).__name__}; "
                        f"write fn(...) {op} pool inside `with sky.ComputePool(...) as pool:`.")
    return found  # type: ignore[return-value]  # the one Target there is


@dataclass(frozen=True, slots=True)
class PendingCompute(Generic[R]):
    """A function call not yet run: ``>> pool`` runs it on one node, ``@ pool`` on every node."""

    fn: Callable[..., R]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None  # seconds it may run on a worker before it is interrupted (TimeoutError)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))

    def __rshift__(self, pool: ComputePool) -> R:
        return _pool(pool, ">>").run(self)

    def __matmul__(self, pool: ComputePool) -> list[R]:
        return _pool(pool, "@").broadcast(self)

    def __and__(self, other: PendingCompute[Any] | PendingGroup) -> PendingGroup:
        return PendingGroup((self,)) & other

    def local(self) -> R:
        return self.fn(*self.args, **self.kwargs)


@dataclass(frozen=True, slots=True)
class PendingGroup:
    """Several pending computations: ``>> pool`` runs them at once across workers and returns a tuple in order;
    with ``stream`` it returns an iterator that yields each value as soon as it can (``ordered``: in order, each as
    soon as it and those before it are done; else as they finish)."""

    items: tuple[PendingCompute[Any], ...]
    stream: bool = False
    ordered: bool = True

    def __and__(self, other: PendingCompute[Any] | PendingGroup) -> PendingGroup:
        if isinstance(other, PendingGroup):
            return PendingGroup((*self.items, *other.items))
        if isinstance(other, PendingCompute):
            return PendingGroup((*self.items, other))
        raise TypeError(f"cannot chain {type(other).__name__} with &: both sides must be sky.compute calls")

    def __rshift__(self, pool: ComputePool) -> tuple[Any, ...] | Iterator[Any]:
        target = _pool(pool, ">>")
        if self.stream:
            return target.stream(self.items, ordered=self.ordered)
        return target.gather(self.items)

    def __matmul__(self, pool: ComputePool) -> list[tuple[Any, ...]]:
        target = _pool(pool, "@")
        per_item = [target.broadcast(item) for item in self.items]
        return [tuple(results[rank] for results in per_item) for rank in range(len(target.workers))]


def gather(*pendings: PendingCompute[Any], stream: bool = False, ordered: bool = True) -> PendingGroup:
    """Run several computations at once: ``sky.gather(a(), b()) >> pool`` returns a tuple in order.

    ``stream=True``: an iterator instead, yielding each value as soon as it can: in order (``ordered=True``), or as
    the tasks finish (``ordered=False``). An error is raised where its value would come; leaving the loop early
    interrupts the tasks still running."""
    for i, item in enumerate(pendings):
        if not isinstance(item, PendingCompute):
            raise TypeError(f"sky.gather argument {i} is {type(item).__name__}, not a sky.compute call; "
                            f"call the function: gather(fn(x), ...)")
    return PendingGroup(tuple(pendings), stream=bool(stream), ordered=bool(ordered))


class Compute(Generic[P, R]):
    """What ``@sky.compute`` returns: calling it builds a PendingCompute; ``.local(...)`` runs it here."""

    def __init__(self, fn: Callable[P, R], timeout: float | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"@sky.compute decorates a function, not {type(fn).__name__}")
        self.fn = fn
        self.timeout = _check_timeout(timeout)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> PendingCompute[R]:
        return PendingCompute(self.fn, args, kwargs, self.timeout)

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<sky.compute {getattr(self.fn, '__qualname__', self.fn)!s}>"

    def __reduce__(self):  # a Compute travels as its function, re-wrapped on arrival
        return (Compute, (self.fn, self.timeout))


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise TypeError(f"@sky.compute(timeout=...) takes a positive number of seconds, got {timeout!r}")
    return float(timeout)


@overload
def compute(fn: Callable[P, R], *, timeout: float | None = None) -> Compute[P, R]: ...
@overload
def compute(fn: None = None, *, timeout: float | None = None) -> Callable[[Callable[P, R]], Compute[P, R]]: ...


def compute(fn: Callable[P, R] | None = None, *, timeout: float | None = None
            ) -> Compute[P, R] | Callable[[Callable[P, R]], Compute[P, R]]:
    """Mark ``fn`` as runnable on a pool: ``fn(args) >> pool`` (one worker) or ``fn(args) @ pool`` (all).

    ``@sky.compute(timeout=60)``: a call still running on a worker after 60 s is interrupted there and raises
    TimeoutError here."""
    if fn is None:
        _check_timeout(timeout)
        return lambda f: Compute(f, timeout)
    return Compute(fn, timeout)
