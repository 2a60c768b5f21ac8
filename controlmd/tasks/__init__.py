"""Tasks: the :class:`Task` contract, the registry, and the shipped benchmark systems.

The shipped task modules (``trap_drag``, ``polymer_fold``, ``assembly``, ``isomerization``,
``rdf_inverse``) are imported when a task is first named, not when this package is.
"""

from __future__ import annotations

from controlmd.tasks.base import ControlChannels, Task, TaskCapabilities
from controlmd.tasks.registry import get_task, register_task, task_class, task_names

__all__ = [
    "ControlChannels",
    "Task",
    "TaskCapabilities",
    "get_task",
    "register_task",
    "task_class",
    "task_names",
]
