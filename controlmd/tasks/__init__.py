"""Benchmark tasks. Every module in this package is imported so its task registers itself."""

from __future__ import annotations

import importlib
import pkgutil

from controlmd.tasks.base import ControlChannels, Task, get_task, register_task, task_names

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ControlChannels", "Task", "get_task", "register_task", "task_names"]
