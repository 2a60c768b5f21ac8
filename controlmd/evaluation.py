"""Scoring a protocol with a task's exact metric on fresh replicas.

:func:`evaluate` is what every reported number goes through: the trainer's held-out and
before/after scores, the compare harness, sweeps and ``controlmd eval``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from controlmd._validation import check_int
from controlmd.distributed import DistributedContext
from controlmd.errors import ControlMDError
from controlmd.protocols import Protocol
from controlmd.tasks.base import Task

__all__ = ["Evaluation", "evaluate"]


@dataclass(frozen=True)
class Evaluation:
    """Mean of the exact metric over ``n`` replicas and its standard error.

    Attributes:
        mean, se: mean and standard error of the per-replica metric.
        n: number of replicas.
        md_steps: forward replica-steps spent (``n * task.n_steps``).
    """

    mean: float
    se: float
    n: int
    md_steps: int


def evaluate(
    task: Task[Any],
    protocol: Protocol,
    n_replicas: int,
    seed: int,
    *,
    chunk: int = 10_000,
    distributed: DistributedContext | None = None,
) -> Evaluation:
    """Score ``protocol`` with the task's exact metric on ``n_replicas`` fresh replicas.

    Replicas are simulated ``chunk`` at a time (per-replica streams make the result
    independent of ``chunk``), without gradients. With ``distributed``, each rank scores a
    contiguous block of the replicas and the sums are reduced over ranks (any
    ``n_replicas``); every rank returns the same result.

    :param task: the task whose ``metric`` is reported.
    :param protocol: the protocol to score.
    :param n_replicas: fresh replicas (>= 1), batch seed ``seed``.
    :param chunk: replicas simulated at once (>= 1).
    :raises ControlMDError: when the metric is not finite for some replica.
    """
    check_int("n_replicas", n_replicas)
    check_int("chunk", chunk)
    part = (distributed or DistributedContext()).split(n_replicas)
    total, total_sq, done = 0.0, 0.0, part.first
    with torch.no_grad():
        while done < part.stop:
            b = min(chunk, part.stop - done)
            state = task.rollout(protocol, b, seed, first_replica=done, gradient="none")
            values = task.metric(state).detach().to(torch.float64)
            if not bool(torch.isfinite(values).all()):
                bad = int((~torch.isfinite(values)).nonzero()[0, 0]) + done
                raise ControlMDError(
                    f"task {task.name!r}: metric is not finite for replica {bad} (seed {seed})"
                )
            total += float(values.sum())
            total_sq += float((values * values).sum())
            done += b
    if distributed is not None and distributed.enabled:  # scale-out: sums over ranks
        sums = distributed.all_reduce_sum([torch.tensor([total, total_sq], dtype=torch.float64)])[0]
        total, total_sq = float(sums[0]), float(sums[1])
    mean = total / n_replicas
    var = max(total_sq / n_replicas - mean * mean, 0.0) * n_replicas / max(n_replicas - 1, 1)
    return Evaluation(mean, math.sqrt(var / n_replicas), n_replicas, n_replicas * task.n_steps)
