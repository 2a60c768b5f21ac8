"""Gradient estimators: d(expected loss)/d(theta) from simulated replicas.

An estimator turns one batch of rollouts into a gradient of the objective
``<loss> + protocol penalty`` with respect to the trainable parameters (the protocol's, then
the task's own). The trainer selects one by name (``[train] estimator``); a task declares
which it supports in ``capabilities.estimators``.

* ``"pathwise"`` (default): differentiate the surrogate loss through the simulation with
  the noise held fixed (reparameterization); the path through the steps is the simulate
  option ``gradient``: ``"direct"``, ``"checkpoint"`` (recompute windows of ``window``
  steps), ``"truncated"`` (detach every ``window`` steps) or ``"adjoint"``.
* ``"score"``: pathwise at fixed trajectory plus the score-function (REINFORCE) term, for
  stochastic overdamped dynamics (Engel, Smith & Brenner, PRX 13, 041032 (2023)):
  ``grad <L> = < dL/dtheta |_path > + < (L - b) dlog P[path | theta] / dtheta >``.
  Positions are detached after every step, accumulators (the protocol work) keep their
  explicit dependence on theta, and ``log P`` is the sum of the Gaussian transition
  log-densities of the integrator (mean and width read off the integrator's own step at
  zero and unit noise, so Euler–Maruyama and the exact OU step are both handled);
  ``b`` is the leave-one-out mean of the per-replica losses.
* ``"forward"``: forward-mode AD, one dual-number rollout per protocol parameter (for
  protocols with few parameters; at most :data:`MAX_FORWARD_PARAMETERS`).

Every estimator also returns, when asked, the spread of the gradient over replica groups
(``grad_var``, ``grad_rel_std``), and counts the replica-steps it simulated.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from controlmd.distributed import DistributedContext, Shard, local_groups
from controlmd.dynamics.base import Integrator, State
from controlmd.errors import ControlMDError
from controlmd.protocols import Protocol
from controlmd.tasks.base import Task

Tensor = torch.Tensor

__all__ = [
    "ESTIMATORS",
    "MAX_FORWARD_PARAMETERS",
    "ForwardEstimator",
    "GradientEstimate",
    "GradientEstimator",
    "PathwiseEstimator",
    "RolloutBatch",
    "ScoreEstimator",
    "make_estimator",
]

MAX_FORWARD_PARAMETERS = 64


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

    def check(self, task: Task[Any], protocol: Protocol, params: Sequence[nn.Parameter]) -> None:
        """Raise :class:`ControlMDError` naming why this estimator cannot train ``task``."""
        if self.name not in task.capabilities.estimators:
            raise ControlMDError(
                f"estimator = {self.name!r} is not supported by task {task.name!r}; it supports "
                f"{list(task.capabilities.estimators)}"
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
            var = float(flat.var(dim=0, unbiased=True).sum()) / flat.shape[0]
            norm = total_norm(grads)
            stats = {
                "grad_var": var,
                "grad_rel_std": math.sqrt(var) / norm if norm > 0 else math.inf,
            }
        md_steps = batch.replicas * batch.task.n_steps
        return GradientEstimate(objective_value, value, grads, stats, md_steps)


class PathwiseEstimator(_SurrogateEstimator):
    """Differentiate the loss through the simulation (reparameterization)."""

    name = "pathwise"

    def surrogate(
        self, batch: RolloutBatch, seed: int, with_variance: bool
    ) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        task = batch.task
        state = task.rollout(
            batch.protocol,
            batch.shard.count,
            seed,
            first_replica=batch.shard.first,
            **batch.simulate_options,
        )
        loss = task.loss(state)
        penalty = batch.protocol.penalty()
        groups: list[Tensor | None] = []
        if with_variance:
            groups = [
                weight * (task.loss(slice_state(state, idx)) + penalty) if idx else None
                for idx, weight in local_groups(batch.shard, batch.grad_groups)
            ]
        return loss + penalty, loss.detach(), groups


class ScoreEstimator(_SurrogateEstimator):
    """Pathwise term at fixed trajectory plus the score-function term (overdamped)."""

    name = "score"

    def check(self, task: Task[Any], protocol: Protocol, params: Sequence[nn.Parameter]) -> None:
        super().check(task, protocol, params)
        integrator = task.integrator(protocol)
        if not integrator.stochastic:
            raise ControlMDError(
                f"estimator = 'score' needs stochastic dynamics; task {task.name!r} uses "
                f"{type(integrator).__name__}, which is deterministic; use 'pathwise'"
            )
        state = task.initial_state(1, 0)
        if not isinstance(state, State) or state.P is not None:
            raise ControlMDError(
                f"estimator = 'score' is implemented for overdamped dynamics (Gaussian position "
                f"transitions); task {task.name!r} has momenta; use 'pathwise'"
            )

    def surrogate(
        self, batch: RolloutBatch, seed: int, with_variance: bool
    ) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        task, B = batch.task, batch.shard.count
        state = task.initial_state(B, seed, first_replica=batch.shard.first)
        integrator = task.integrator(batch.protocol)
        log_p = torch.zeros(B, dtype=torch.float64)
        with torch.enable_grad():
            for _ in range(task.n_steps):
                nxt = integrator.step(state)
                R_next = nxt.R.detach()
                log_p = log_p + transition_log_prob(integrator, state, R_next)
                state = nxt.replace(R=R_next)
        explicit = task.loss(state)
        per_replica = torch.stack([task.loss(slice_state(state, [i])).detach() for i in range(B)])
        everyone = batch.dist.all_gather(per_replica)  # scale-out: the baseline uses all replicas
        baseline = (everyone.sum() - per_replica) / max(batch.replicas - 1, 1)
        weights = (per_replica - baseline).to(log_p)
        penalty = batch.protocol.penalty()
        objective = explicit + (weights * log_p).mean() + penalty
        groups: list[Tensor | None] = []
        if with_variance:
            for idx, weight in local_groups(batch.shard, batch.grad_groups):
                if not idx:
                    groups.append(None)
                    continue
                ix = torch.as_tensor(idx)
                groups.append(
                    weight
                    * (
                        task.loss(slice_state(state, idx))
                        + (weights[ix] * log_p[ix]).mean()
                        + penalty
                    )
                )
        return objective, explicit.detach(), groups


class ForwardEstimator(GradientEstimator):
    """Forward-mode AD: one dual-number rollout per protocol parameter."""

    name = "forward"

    def check(self, task: Task[Any], protocol: Protocol, params: Sequence[nn.Parameter]) -> None:
        super().check(task, protocol, params)
        if [p for p in task.parameters() if p.requires_grad]:
            raise ControlMDError(
                "estimator = 'forward' differentiates protocol parameters only; use 'pathwise'"
            )
        if protocol.feedback:
            raise ControlMDError("estimator = 'forward' supports open-loop protocols only")
        n_params = sum(p.numel() for p in params)
        if n_params > MAX_FORWARD_PARAMETERS:
            raise ControlMDError(
                f"estimator = 'forward' costs one rollout per parameter; the protocol has "
                f"{n_params} (allowed: <= {MAX_FORWARD_PARAMETERS}); use estimator = 'pathwise'"
            )

    def estimate(self, batch: RolloutBatch, seed: int, with_variance: bool) -> GradientEstimate:
        protocol = batch.protocol
        names = [n for n, p in protocol.named_parameters() if p.requires_grad]
        params = batch.params
        grads = [torch.zeros_like(p) for p in params]
        objective = _RolloutObjective(
            batch.task,
            protocol,
            batch.shard.count,
            batch.simulate_options,
            first_replica=batch.shard.first,
        )
        value = torch.zeros((), dtype=torch.float64)
        rollouts = 0
        for k, (name, p) in enumerate(zip(names, params)):
            for j in range(p.numel()):
                tangent = torch.zeros_like(p)
                tangent.view(-1)[j] = 1.0
                with fwAD.dual_level():
                    swapped = {
                        f"protocol.{n}": (
                            fwAD.make_dual(q.detach().requires_grad_(True), tangent)
                            if n == name
                            else q.detach().requires_grad_(True)
                        )
                        for n, q in zip(names, params)
                    }
                    out = torch.func.functional_call(objective, swapped, (seed,))
                    primal, tangent_out = fwAD.unpack_dual(out)
                grads[k].view(-1)[j] = tangent_out.detach()
                value = primal.detach()
                rollouts += 1
        loss = value - protocol.penalty().detach()
        value, loss, *grads = batch.dist.all_reduce_mean([value, loss, *grads])
        md_steps = batch.replicas * batch.task.n_steps * rollouts
        return GradientEstimate(value, loss, grads, {}, md_steps)


ESTIMATORS: dict[str, type[GradientEstimator]] = {
    cls.name: cls for cls in (PathwiseEstimator, ScoreEstimator, ForwardEstimator)
}
"""Estimator name -> class (``[train] estimator``)."""


def make_estimator(name: str) -> GradientEstimator:
    """The estimator registered as ``name``; an unknown name lists the valid ones."""
    if name not in ESTIMATORS:
        raise ControlMDError(
            f"unknown estimator {name!r}; expected one of: {', '.join(ESTIMATORS)}"
        )
    return ESTIMATORS[name]()


class _RolloutObjective(nn.Module):
    """``loss(rollout(protocol))`` as a module, so ``functional_call`` can swap parameters."""

    def __init__(
        self,
        task: Task[Any],
        protocol: Protocol,
        replicas: int,
        options: dict[str, Any],
        *,
        first_replica: int = 0,
    ) -> None:
        super().__init__()
        self.task = task
        self.protocol = protocol
        self.replicas = replicas
        self.first_replica = first_replica
        self.options = options

    def forward(self, seed: int) -> Tensor:
        with torch.enable_grad():
            state = self.task.rollout(
                self.protocol, self.replicas, seed, first_replica=self.first_replica, **self.options
            )
            return self.task.loss(state) + self.protocol.penalty()


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


class _ConstantNoise:
    """Stands in for a ReplicaRNG: every draw is ``value`` (reads off a step's mean and width)."""

    def __init__(self, value: float, n_replicas: int) -> None:
        self.value = value
        self.n_replicas = n_replicas

    def randn(self, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.full((self.n_replicas, *shape), self.value, dtype=dtype)


def transition_log_prob(integrator: Integrator, state: State, R_next: Tensor) -> Tensor:
    """``log p(R_next | state; theta)`` ``[B]`` (up to a constant) of an additive-noise step.

    One step at zero noise gives the mean, one at unit noise the mean plus the width; both
    carry their dependence on the protocol parameters.
    """
    B = state.n_replicas
    mean = integrator.step(state.replace(rng=_ConstantNoise(0.0, B))).R  # type: ignore[arg-type]
    shifted = integrator.step(state.replace(rng=_ConstantNoise(1.0, B))).R  # type: ignore[arg-type]
    displacement = integrator.space.displacement
    width = displacement(shifted, mean)
    z = displacement(R_next, mean) / width
    return -(0.5 * z * z + torch.log(width.abs())).sum(dim=(-2, -1))
