"""Which code travels by value: functions, classes and modules a worker could not import by name.

cloudpickle already ships ``__main__`` by value. Modules loaded from the user's own files (beside the notebook
or script, a test module, a folder put on ``sys.path``) are registered to travel by value too; modules from the
standard library or an installed distribution travel by name and are imported on the node.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from types import ModuleType

import cloudpickle

_checked: set[str] = set()
_by_value: set[str] = set()
_system_roots: tuple[str, ...] | None = None
_PACKAGE_ROOT = os.path.dirname(os.path.abspath(__file__))


def _roots() -> tuple[str, ...]:
    global _system_roots
    if _system_roots is None:
        paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
        paths.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
        paths.add(site.getusersitepackages())
        paths.update({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
        _system_roots = tuple(sorted({os.path.realpath(p) + os.sep for p in paths if p}))
    return _system_roots


def is_user_module(module: ModuleType) -> bool:
    """True for a module loaded from the user's own files rather than from Python or an installed package."""
    name = module.__name__
    if name in ("__main__", "__mp_main__") or name.split(".")[0] == "sky_jupyter":
        return False
    path = getattr(module, "__file__", None)
    if not path:
        return False
    real = os.path.realpath(path)
    return not real.startswith(_roots()) and not real.startswith(_PACKAGE_ROOT + os.sep)


def register_user_modules() -> None:
    """Register every imported user module (top-most user package) to be pickled by value. Cheap when
    nothing new was imported since the last call."""
    if len(_checked) == len(sys.modules):
        return
    for name, module in list(sys.modules.items()):
        if name in _checked:
            continue
        _checked.add(name)
        if not isinstance(module, ModuleType) or not is_user_module(module):
            continue
        top = name
        parts = name.split(".")
        for i in range(1, len(parts)):  # register the top-most package that is itself a user module
            parent = sys.modules.get(".".join(parts[:i]))
            if isinstance(parent, ModuleType) and is_user_module(parent):
                top = ".".join(parts[:i])
                break
        if top not in _by_value:
            try:
                cloudpickle.register_pickle_by_value(sys.modules[top])
                _by_value.add(top)
            except (ValueError, KeyError):
                pass
