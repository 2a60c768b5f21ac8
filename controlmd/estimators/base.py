"""What every estimator shares: the batch it is handed, the estimate it returns, the
base classes and the gradient helpers; see :mod:`controlmd.estimators`."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from controlmd.distributed import DistributedContext, Shard
from controlmd.dynamics.base import State
from controlmd.errors import ControlMDError
from controlmd.protocols import Protocol
from controlmd.tasks.base import Task

Tensor = torch.Tensor


MAX_FORWARD_PARAMETERS = 64
MAX_SNR_LOGGED = 32
"""Gradient entries whose signal-to-noise ratio is reported (``grad_snr/<j>``)."""


@dataclass
class RolloutBatch:
    """What an estimator needs for one gradient: the task, the protocol and parameters, and
    this process's share of the replicas.

    Attributes:
        task, protocol: what is simulated.
        params: the trainable parameters (protocol's, then the task's).
        replicas: replicas of the whole batch (all ranks).
        shard: this rank's contiguous block of them.
        dist: the process group (a one-process context by default).
        simulate_options: keyword arguments of ``task.rollout`` (``gradient``, ``window``).
        grad_groups: replica groups for the gradient-variance statistics.
    """

    task: Task[Any]
    protocol: Protocol
    params: list[nn.Parameter]
    replicas: int
    shard: Shard
    dist: DistributedContext = field(default_factory=DistributedContext)
    simulate_options: dict[str, Any] = field(default_factory=dict)
    grad_groups: int = 8


@dataclass
class GradientEstimate:
    """One gradient estimate (means over all ranks' replicas).

    Attributes:
        objective: value of ``loss + penalty`` (0-d, detached).
        loss: value of the task loss (0-d, detached).
        grads: gradient of the objective, one tensor per parameter.
        stats: ``grad_var`` and ``grad_rel_std`` when the variance was asked for.
        md_steps: forward replica-steps simulated (all ranks).
    """

    objective: Tensor
    loss: Tensor
    grads: list[Tensor]
    stats: dict[str, float]
    md_steps: int


class GradientEstimator(ABC):
    """Base class: :meth:`check` refuses what the estimator cannot do, :meth:`estimate`
    returns a :class:`GradientEstimate`."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    """Estimators the task must support for this one to apply (default: its own name)."""

    def check(self, task: Task[Any], protocol: Protocol, params: Sequence[nn.Parameter]) -> None:
        """Raise :class:`ControlMDError` naming why this estimator cannot train ``task``."""
        missing = [
            n for n in self.requires or (self.name,) if n not in task.capabilities.estimators
        ]
        if missing:
            needs = "" if missing == [self.name] else f" (it needs {' and '.join(missing)})"
            raise ControlMDError(
                f"estimator = {self.name!r} is not supported by task {task.name!r}{needs}; it "
                f"supports {list(task.capabilities.estimators)}"
            )

    @abstractmethod
    def estimate(self, batch: RolloutBatch, seed: int, with_variance: bool) -> GradientEstimate:
        """A gradient from one batch of rollouts seeded ``seed``."""


class _SurrogateEstimator(GradientEstimator):
    """Estimators whose gradient is that of a scalar surrogate built from one rollout."""

    @abstractmethod
    def surrogate(
        self, batch: RolloutBatch, seed: int, with_variance: bool
    ) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        """``(surrogate objective, detached task loss, per-group surrogates)``; a group
        with no replica on this rank is ``None``."""

    def estimate(self, batch: RolloutBatch, seed: int, with_variance: bool) -> GradientEstimate:
        objective, value, group_objectives = self.surrogate(batch, seed, with_variance)
        params = batch.params
        grads = _grad(objective, params, retain=bool(group_objectives))
        objective_value = value + batch.protocol.penalty().detach()
        # scale-out: means over ranks of the local means = means over all replicas
        objective_value, value, *grads = batch.dist.all_reduce_mean(
            [objective_value, value, *grads]
        )
        stats: dict[str, float] = {}
        if group_objectives:
            last = max((j for j, g in enumerate(group_objectives) if g is not None), default=-1)
            per_group = [
                [torch.zeros_like(p) for p in params]
                if g is None
                else _grad(g, params, retain=j < last)
                for j, g in enumerate(group_objectives)
            ]
            flat = torch.stack([torch.cat([g.flatten() for g in gs]) for gs in per_group])
            flat = batch.dist.all_reduce_sum([flat])[0]  # scale-out: group members on every rank
            stats = _variance_stats(flat, grads)
        md_steps = batch.replicas * batch.task.n_steps
        return GradientEstimate(objective_value, value, grads, stats, md_steps)


def _flatten(grads: Sequence[Tensor]) -> Tensor:
    return torch.cat([g.flatten() for g in grads])


def _unflatten(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for p in params:
        out.append(flat[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


def _variance_stats(rows: Tensor, grads: Sequence[Tensor]) -> dict[str, float]:
    """Spread of the per-group gradients ``rows`` ``[G, n_params]``: ``grad_var`` (trace of
    the covariance of the full-batch gradient), ``grad_rel_std``, and for the first
    :data:`MAX_SNR_LOGGED` parameter entries the signal-to-noise ratio ``|mean| / SE``
    (``grad_snr/<j>``; ``SE`` from the spread over groups)."""
    G = rows.shape[0]
    per_entry = rows.var(dim=0, unbiased=True) / G
    var = float(per_entry.sum())
    norm = total_norm(grads)
    stats = {"grad_var": var, "grad_rel_std": math.sqrt(var) / norm if norm > 0 else math.inf}
    mean = rows.mean(0)
    for j in range(min(MAX_SNR_LOGGED, mean.numel())):
        se = math.sqrt(float(per_entry[j]))
        stats[f"grad_snr/{j}"] = abs(float(mean[j])) / se if se > 0 else math.inf
    return stats


def _grad_or_zeros(output: Tensor, params: list[nn.Parameter], *, retain: bool) -> list[Tensor]:
    if not output.requires_grad:
        return [torch.zeros_like(p) for p in params]
    return _grad(output, params, retain=retain)


def per_replica_losses(task: Task[Any], state: State) -> Tensor:
    """Each replica's task loss ``[B]`` (detached), from one-replica slices of ``state``."""
    with torch.no_grad():
        return torch.stack(
            [task.loss(slice_state(state, [i])).detach() for i in range(state.n_replicas)]
        ).to(torch.float64)


def _grad(output: Tensor, params: list[nn.Parameter], *, retain: bool) -> list[Tensor]:
    grads = torch.autograd.grad(output, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def total_norm(grads: Sequence[Tensor]) -> float:
    """Euclidean norm of a list of gradient tensors."""
    return float(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads)))  # type: ignore[arg-type]


def slice_state(state: State, index: Sequence[int]) -> State:
    """The replicas ``index`` of a state (for per-replica and per-group losses)."""
    ix = torch.as_tensor(index, dtype=torch.long)
    B = state.n_replicas

    def take(x: Tensor | None) -> Tensor | None:
        if x is None or x.ndim == 0 or x.shape[0] != B:
            return x
        return x[ix]

    return state.replace(
        R=state.R[ix], P=take(state.P), aux={k: take(v) for k, v in state.aux.items()}, rng=None
    )
