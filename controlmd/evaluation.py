"""Scoring a protocol with a task's exact metric on fresh replicas.

:func:`evaluate` is what every reported number goes through: the trainer's held-out and
before/after scores, the compare harness, sweeps and ``controlmd eval``.
:func:`evaluate_paired` scores a protocol and a baseline on the same fresh replicas
(common random numbers: the same initial states and noise), so their difference has a
paired standard error far below the two unpaired ones.

Where a task's final states carry ``aux["field_cost"]`` (``[B]``, ``integral mean_i
|F_i|^2 dt`` of its spatial control field), its replica mean is reported beside the metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from controlmd._validation import check_int
from controlmd.distributed import DistributedContext
from controlmd.dynamics.base import State
from controlmd.errors import ControlMDError
from controlmd.protocols import Protocol
from controlmd.tasks.base import Task

Tensor = torch.Tensor

__all__ = [
    "Evaluation",
    "PairedEvaluation",
    "constant_protocol",
    "evaluate",
    "evaluate_paired",
    "mean_se",
    "pareto_front",
]


@dataclass(frozen=True)
class Evaluation:
    """Mean of the exact metric over ``n`` replicas and its standard error.

    Attributes:
        mean, se: mean and standard error of the per-replica metric.
        n: number of replicas.
        md_steps: forward replica-steps spent (``n * task.n_steps``).
        field_cost: replica mean of the field cost ``integral mean_i |F_i|^2 dt``
            (force units squared times time), ``None`` when the task has no spatial field.
    """

    mean: float
    se: float
    n: int
    md_steps: int
    field_cost: float | None = None


@dataclass(frozen=True)
class PairedEvaluation:
    """A protocol and a baseline scored on the same ``n`` replicas.

    Attributes:
        mean, se: the protocol's metric (mean and standard error over replicas).
        baseline_mean, baseline_se: the baseline's.
        paired_difference: ``mean - baseline_mean`` (the mean per-replica difference).
        paired_se: standard error of the per-replica difference.
        n: replicas.
        field_cost, baseline_field_cost: replica means of the field cost (``None``
            without a spatial field).
        md_steps: forward replica-steps spent (both protocols).
    """

    mean: float
    se: float
    baseline_mean: float
    baseline_se: float
    paired_difference: float
    paired_se: float
    n: int
    field_cost: float | None
    baseline_field_cost: float | None
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
    total, total_sq, cost_total, done = 0.0, 0.0, 0.0, part.first
    has_cost = False
    while done < part.stop:
        b = min(chunk, part.stop - done)
        values, cost = _score(task, protocol, b, seed, done)
        total += float(values.sum())
        total_sq += float((values * values).sum())
        if cost is not None:
            has_cost = True
            cost_total += float(cost.sum())
        done += b
    if distributed is not None and distributed.enabled:  # scale-out: sums over ranks
        sums = distributed.all_reduce_sum(
            [torch.tensor([total, total_sq, cost_total], dtype=torch.float64)]
        )[0]
        total, total_sq, cost_total = float(sums[0]), float(sums[1]), float(sums[2])
    mean = total / n_replicas
    return Evaluation(
        mean,
        _se(total_sq / n_replicas - mean * mean, n_replicas),
        n_replicas,
        n_replicas * task.n_steps,
        cost_total / n_replicas if has_cost else None,
    )


def evaluate_paired(
    task: Task[Any],
    protocol: Protocol,
    baseline: Protocol,
    n_replicas: int,
    seed: int,
    *,
    chunk: int = 10_000,
) -> PairedEvaluation:
    """Score ``protocol`` and ``baseline`` on the same ``n_replicas`` fresh replicas (batch
    seed ``seed``: identical initial states and noise streams, i.e. common random numbers).

    :param task: the task whose ``metric`` is reported.
    :param protocol: the protocol to score.
    :param baseline: the protocol it is compared with.
    :param n_replicas: replicas (>= 2, for a standard error).
    :param seed: batch seed; any seed works, including ones never used in training.
    :param chunk: replicas simulated at once (>= 1); the result does not depend on it.
    :raises ControlMDError: when a metric is not finite.
    """
    check_int("n_replicas", n_replicas, minimum=2)
    check_int("chunk", chunk)
    parts: dict[str, list[Tensor]] = {"a": [], "b": [], "cost_a": [], "cost_b": []}
    done = 0
    while done < n_replicas:
        b = min(chunk, n_replicas - done)
        for key, p in (("a", protocol), ("b", baseline)):
            values, field_cost = _score(task, p, b, seed, done)
            parts[key].append(values)
            if field_cost is not None:
                parts["cost_" + key].append(field_cost.detach().to(torch.float64))
        done += b
    a, b_ = torch.cat(parts["a"]), torch.cat(parts["b"])
    diff = a - b_
    n = n_replicas

    def cost(key: str) -> float | None:
        return float(torch.cat(parts[key]).mean()) if parts[key] else None

    return PairedEvaluation(
        mean=float(a.mean()),
        se=_se(float(a.var(correction=0)), n),
        baseline_mean=float(b_.mean()),
        baseline_se=_se(float(b_.var(correction=0)), n),
        paired_difference=float(diff.mean()),
        paired_se=_se(float(diff.var(correction=0)), n),
        n=n,
        field_cost=cost("cost_a"),
        baseline_field_cost=cost("cost_b"),
        md_steps=2 * n * task.n_steps,
    )


def constant_protocol(task: Task[Any]) -> Protocol:
    """The task's no-control value ``default_control()`` held over the horizon (a
    ``table`` protocol without bounds, so the value is exact; the empty protocol for a task
    with no channels).

    :raises ControlMDError: when the task has no no-control value.
    """
    from controlmd.protocols import NoControl, Tabulated

    value = task.default_control()
    if value is None:
        raise ControlMDError(f"task {task.name!r} has no no-control value (default_control)")
    if value.numel() == 0:
        return NoControl(t_final=task.horizon)
    return Tabulated(times=[0.0], values=value.reshape(1, -1), t_final=task.horizon)


def _score(
    task: Task[Any], protocol: Protocol, n: int, seed: int, first: int
) -> tuple[Tensor, Tensor | None]:
    """Per-replica metric ``[n]`` (float64) of replicas ``first .. first + n - 1`` and their
    field cost ``[n]`` (``None`` when the final states carry none)."""
    with torch.no_grad():
        state = task.rollout(protocol, n, seed, first_replica=first, gradient="none")
        values = task.metric(state).detach().to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).nonzero()[0, 0]) + first
        raise ControlMDError(
            f"task {task.name!r}: metric is not finite for replica {bad} (seed {seed})"
        )
    cost = state.aux.get("field_cost") if isinstance(state, State) else None
    return values, None if cost is None else cost.detach().to(torch.float64)


def pareto_front(
    points: list[dict[str, Any]], *, cost: str, metric: str = "mean"
) -> list[dict[str, Any]]:
    """The points no other point beats in both ``point[metric]`` (higher) and
    ``point[cost]`` (lower), cheapest first: the front of a metric-vs-control-cost curve
    (e.g. yield vs ``field_cost``, folded fraction vs ``fluence``)."""
    front = [
        p
        for p in points
        if not any(
            q[metric] >= p[metric]
            and q[cost] <= p[cost]
            and (q[metric], q[cost]) != (p[metric], p[cost])
            for q in points
        )
    ]
    return sorted(front, key=lambda p: p[cost])


def mean_se(values: Tensor) -> tuple[float, float]:
    """Mean of per-replica ``values`` ``[n]`` and its standard error (the unbiased sample
    standard deviation over ``sqrt(n)``; NaN for ``n < 2``). For paired protocols pass the
    per-replica differences."""
    v = values.detach().to(torch.float64).reshape(-1)
    n = v.numel()
    se = _se(float(v.var(correction=0)), n) if n > 1 else float("nan")
    return float(v.mean()), se


def _se(population_variance: float, n: int) -> float:
    """Standard error of a mean of ``n`` values from their population variance (the
    unbiased variance ``* n / (n - 1)``, divided by ``n``)."""
    var = max(population_variance, 0.0) * n / max(n - 1, 1)
    return math.sqrt(var / n)
