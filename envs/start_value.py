"""The start value of a task: the metric of its env's initial protocol.

Every env starts from zero actions, i.e. every control channel held at the midpoint of its
bounds for the whole horizon (``actions_to_protocol(zeros)``). The *start value* is that
protocol's exact metric on a fixed set of replicas: replicas ``0 .. START_REPLICAS - 1`` of
the batch seeded ``START_SEED``, which are the held-out evaluation replicas of a comparison
with ``experiment.seed = 0`` and ``eval_replicas = 128`` (``m0`` there is the same number).
A deterministic task (``capabilities.deterministic``: every replica is the same) is scored
on one replica.
One function computes it for the docs table (``python -m controlmd_envs.start_value``), the
envs' final-step ``info["start_value"]`` and the ``start_value`` of compare output.

The value is computed once per process and task configuration (it costs one evaluation of
``START_REPLICAS`` replicas over the horizon: seconds for the small tasks, ~10 s for the
default ``polymer_fold``).
"""

from __future__ import annotations

import json
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from controlmd.evaluation import evaluate
from controlmd.rng import EVAL_SEED_OFFSET
from controlmd.search import actions_to_protocol
from controlmd.tasks.base import Task

__all__ = ["START_REPLICAS", "START_SEED", "StartValue", "start_value", "task_key"]

START_REPLICAS = 128
"""Replicas the start value is averaged over."""
START_SEED = EVAL_SEED_OFFSET
"""Batch seed of those replicas (a comparison's evaluation seed for ``experiment.seed = 0``)."""


@dataclass(frozen=True)
class StartValue:
    """The start value of one task configuration (units: the task's metric)."""

    task: str
    metric_name: str
    mean: float
    se: float
    exact: float | None
    """The noise-free metric of the initial protocol, where the task has ``exact_metric``."""
    replicas: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric_name": self.metric_name,
            "mean": self.mean,
            "se": self.se,
            "exact": self.exact,
            "replicas": self.replicas,
            "seed": self.seed,
        }


def task_key(task: Task | str, task_kwargs: dict[str, Any] | None = None) -> str | None:
    """The configuration of a task given by name (its name and keyword arguments as
    sorted JSON), under which its start value is cached; ``None`` for a Task object."""
    if not isinstance(task, str):
        return None
    from controlmd_envs import ENV_IDS

    name = ENV_IDS.get(task, task)
    return json.dumps([name, task_kwargs or {}], sort_keys=True, default=str)


_BY_KEY: dict[str, StartValue] = {}
_BY_TASK: weakref.WeakKeyDictionary[Task, StartValue] = weakref.WeakKeyDictionary()


def start_value(task: Task, *, key: str | None = None) -> StartValue:
    """The metric of ``task``'s initial env protocol (zero actions: every channel at the
    midpoint of its bounds) on :data:`START_REPLICAS` replicas of the batch seeded
    :data:`START_SEED`.

    :param task: the task.
    :param key: a description of the task's configuration (e.g. its name and keyword
        arguments as JSON) under which the value is cached for this process; ``None``
        caches it on the task object (for as long as the object lives).
    """
    cached = _BY_KEY.get(key) if key is not None else _BY_TASK.get(task)
    if cached is None:
        protocol = actions_to_protocol(np.zeros((1, task.controls.dim)), task)
        replicas = 1 if task.capabilities.deterministic else START_REPLICAS
        result = evaluate(task, protocol, replicas, START_SEED)
        exact = task.exact_metric(protocol)
        cached = StartValue(
            task=task.name,
            metric_name=task.metric_name,
            mean=result.mean,
            se=result.se,
            exact=None if exact is None else float(exact),
            replicas=replicas,
            seed=START_SEED,
        )
        if key is not None:
            _BY_KEY[key] = cached
        else:
            _BY_TASK[task] = cached
    return cached


def main(argv: list[str] | None = None) -> int:
    """Print the start value of every registered env's task (default settings) as JSON lines."""
    import controlmd_envs
    from controlmd.tasks import get_task

    names = (argv if argv is not None else sys.argv[1:]) or sorted(
        set(controlmd_envs.ENV_IDS.values())
    )
    for name in names:
        value = start_value(get_task(name), key=task_key(name))
        print(json.dumps(value.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
