"""``@sky.compute`` and the pending computations it produces: ``>>`` one node, ``@`` every node, ``&`` chain."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

if TYPE_CHECKING:
    from .pool import ComputePool

P = ParamSpec("P")
R = TypeVar("R")


def _pool(other: object, op: str) -> ComputePool:
    from .pool import ComputePool

    if not isinstance(other, ComputePool):
        raise TypeError(f"the right side of {op} must be a sky.ComputePool, not {type(other).__name__}; "
                        f"write fn(...) {op} pool inside `with sky.ComputePool(...) as pool:`.")
    return other


@dataclass(frozen=True, slots=True)
class PendingCompute(Generic[R]):
    """A function call not yet run: ``>> pool`` runs it on one node, ``@ pool`` on every node."""

    fn: Callable[..., R]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

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
    """Several pending computations: ``>> pool`` runs them at once across nodes, results in order."""

    items: tuple[PendingCompute[Any], ...]

    def __and__(self, other: PendingCompute[Any] | PendingGroup) -> PendingGroup:
        if isinstance(other, PendingGroup):
            return PendingGroup((*self.items, *other.items))
        if isinstance(other, PendingCompute):
            return PendingGroup((*self.items, other))
        raise TypeError(f"cannot chain {type(other).__name__} with &: both sides must be sky.compute calls")

    def __rshift__(self, pool: ComputePool) -> tuple[Any, ...]:
        return _pool(pool, ">>").gather(self.items)

    def __matmul__(self, pool: ComputePool) -> list[tuple[Any, ...]]:
        target = _pool(pool, "@")
        per_item = [target.broadcast(item) for item in self.items]
        return [tuple(results[rank] for results in per_item) for rank in range(len(target.workers))]


def gather(*pendings: PendingCompute[Any]) -> PendingGroup:
    """Run several computations at once: ``sky.gather(a(), b()) >> pool`` returns a tuple in order."""
    for i, item in enumerate(pendings):
        if not isinstance(item, PendingCompute):
            raise TypeError(f"sky.gather argument {i} is {type(item).__name__}, not a sky.compute call; "
                            f"call the function: gather(fn(x), ...)")
    return PendingGroup(tuple(pendings))


class Compute(Generic[P, R]):
    """What ``@sky.compute`` returns: calling it builds a PendingCompute; ``.local(...)`` runs it here."""

    def __init__(self, fn: Callable[P, R]) -> None:
        if not callable(fn):
            raise TypeError(f"@sky.compute decorates a function, not {type(fn).__name__}")
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> PendingCompute[R]:
        return PendingCompute(self.fn, args, kwargs)

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<sky.compute {getattr(self.fn, '__qualname__', self.fn)!s}>"

    def __reduce__(self):  # a Compute travels as its function, re-wrapped on arrival
        return (Compute, (self.fn,))


def compute(fn: Callable[P, R]) -> Compute[P, R]:
    """Mark ``fn`` as runnable on a pool: ``fn(args) >> pool`` (one node) or ``fn(args) @ pool`` (all)."""
    return Compute(fn)
