"""Finding a task class by name: shipped tasks, registered classes, ``module:Class`` paths and
installed plugins.

``[task] name`` in an experiment file (and ``get_task``, the envs' ``task=`` argument) is
resolved in this order:

1. a name registered with :func:`register_task` (the shipped tasks register lazily: their
   modules are imported only when named);
2. ``"package.module:ClassName"``: imported and checked to be a :class:`Task` subclass;
3. a name in the ``controlmd.tasks`` entry-point group of an installed package, e.g. in its
   ``pyproject.toml``::

       [project.entry-points."controlmd.tasks"]
       breathing_trap = "my_tasks.trap:BreathingTrap"

An unknown name lists the valid ones.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, TypeVar

from controlmd._validation import check_choice
from controlmd.errors import ControlMDError
from controlmd.tasks.base import Task

__all__ = ["ENTRY_POINT_GROUP", "get_task", "register_task", "task_class", "task_names"]

ENTRY_POINT_GROUP = "controlmd.tasks"

_BUILTIN: dict[str, str] = {
    "assembly": "controlmd.tasks.assembly:Assembly",
    "isomerization": "controlmd.tasks.isomerization:Isomerization",
    "polymer_fold": "controlmd.tasks.polymer_fold:PolymerFold",
    "rdf_inverse": "controlmd.tasks.rdf_inverse:RDFInverse",
    "trap_drag": "controlmd.tasks.trap_drag:TrapDrag",
}
"""Shipped tasks: name -> ``module:Class`` (imported when first named)."""

_TASKS: dict[str, type[Task[Any]]] = {}
"""Classes registered by :func:`register_task` (and shipped ones once imported)."""

TaskT = TypeVar("TaskT", bound=type[Task[Any]])


def register_task(cls: TaskT) -> TaskT:
    """Class decorator: make a task constructible by its ``name`` from configs."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ControlMDError(f"register_task expects a Task subclass, got {cls!r}")
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """Registered, shipped and installed (entry-point) task names."""
    return sorted(set(_TASKS) | set(_BUILTIN) | set(_entry_points()))


def task_class(name: str) -> type[Task[Any]]:
    """The task class for ``name`` (see the module docstring for how names resolve)."""
    if not isinstance(name, str) or not name:
        raise ControlMDError(f"task name must be a non-empty string, got {name!r}")
    if name in _TASKS:
        return _TASKS[name]
    if name in _BUILTIN:
        cls = _load(_BUILTIN[name], f"task {name!r}")
        _TASKS.setdefault(name, cls)
        return cls
    if ":" in name:
        return _load(name, f"task {name!r}")
    plugins = _entry_points()
    if name in plugins:
        return _load(plugins[name], f"task {name!r} (entry point of group {ENTRY_POINT_GROUP!r})")
    check_choice("task", name, [*task_names(), "module:Class"])
    raise AssertionError("unreachable")  # check_choice raised


def get_task(name: str, **params: Any) -> Task[Any]:
    """Build the task ``name`` with constructor arguments ``params``."""
    return task_class(name)(**params)


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load(path: str, what: str) -> type[Task[Any]]:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ControlMDError(f"{what}: expected 'package.module:ClassName', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ControlMDError(f"{what}: cannot import module {module_name!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ControlMDError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Task)):
        raise ControlMDError(f"{what}: {path!r} is not a controlmd Task subclass, got {obj!r}")
    return obj
