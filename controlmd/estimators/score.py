"""The score-function (likelihood-ratio) estimator with a leave-one-out baseline, for
overdamped dynamics and underdamped Langevin (BAOAB)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from controlmd._validation import check_int
from controlmd.dynamics.base import Integrator, State, jump_steps
from controlmd.dynamics.langevin import Langevin
from controlmd.errors import ControlMDError
from controlmd.estimators.base import RolloutBatch, _grad_or_zeros, per_replica_losses
from controlmd.estimators.chunked import _ChunkedEstimator, _SegmentGradient
from controlmd.protocols import Protocol
from controlmd.tasks.base import Task

Tensor = torch.Tensor


class ScoreEstimator(_ChunkedEstimator):
    """Pathwise term at fixed trajectory plus the score-function term, for stochastic
    dynamics whose path density is known: overdamped (Gaussian position transitions) and
    underdamped Langevin BAOAB (Gaussian velocity noise in the O step)."""

    name = "score"

    def __init__(self, *, chunk: int = 0) -> None:
        check_int("chunk", chunk, minimum=0)
        self.chunk = chunk

    def check(self, task: Task[Any], protocol: Protocol, params: Sequence[nn.Parameter]) -> None:
        super().check(task, protocol, params)
        if protocol.field_cost_weight > 0:
            raise ControlMDError(
                f"estimator = {self.name!r} steps the integrator itself and does not accumulate the "
                f"field cost, so [protocol] field_cost_weight = {protocol.field_cost_weight!r} "
                "would be ignored; use 'pathwise' (or 'multiwindow'), or field_cost_weight = 0"
            )
        integrator = task.integrator(protocol)
        if not integrator.stochastic:
            raise ControlMDError(
                f"estimator = {self.name!r} needs stochastic dynamics with a known path density; task "
                f"{task.name!r} uses {type(integrator).__name__}, which is deterministic: its only "
                "randomness is the initial state, which does not depend on the protocol, so there "
                "is no score term. Use 'pathwise' or 'multiwindow'"
            )
        state = task.initial_state(1, 0)
        if not isinstance(state, State):
            raise ControlMDError(
                f"estimator = {self.name!r} needs particle States; task {task.name!r} has "
                f"{type(state).__name__}; use 'pathwise'"
            )
        if state.P is not None and not isinstance(integrator, Langevin):
            raise ControlMDError(
                f"estimator = {self.name!r} knows the path density of overdamped dynamics and of "
                f"Langevin BAOAB; task {task.name!r} uses {type(integrator).__name__}; use 'pathwise'"
            )
        if isinstance(integrator, Langevin) and integrator.track_work:
            raise ControlMDError(
                f"estimator = {self.name!r} steps Langevin along a fixed position path "
                f"(Langevin.score_step), which does not count work or heat; task {task.name!r} "
                "tracks work (track_work = True); use 'pathwise'"
            )

    def rollout(
        self, batch: RolloutBatch, seed: int, first: int, count: int
    ) -> tuple[State, Tensor]:
        """Final states of replicas ``first ... first + count - 1`` (their explicit dependence
        on the parameters kept) and ``log P`` ``[count]`` of the score-function part."""
        return score_rollout(batch.task, batch.protocol, count, seed, first_replica=first)

    def segment(
        self, batch: RolloutBatch, seed: int, first: int, count: int, *, whole_batch: bool
    ) -> _SegmentGradient:
        task, params, B = batch.task, batch.params, batch.replicas
        with torch.enable_grad():
            state, log_p = self.rollout(batch, seed, first, count)
            explicit = task.loss(state) * count
        L = per_replica_losses(task, state)
        log_p = log_p.to(torch.float64)
        if whole_batch:  # the baseline is known now: one backward pass
            baseline = (L.sum() - L) / max(B - 1, 1)
            surrogate = explicit + ((L - baseline) * log_p).sum()
            grads = _grad_or_zeros(surrogate, params, retain=False)
            # the framework subtracts S/(B-1) * score; here it is already applied
            return _SegmentGradient(grads, None, L.sum())
        k = B / max(B - 1, 1)
        grads = _grad_or_zeros(explicit + k * (L * log_p).sum(), params, retain=True)
        score = _grad_or_zeros(log_p.sum(), params, retain=False)
        return _SegmentGradient(grads, score, L.sum())


def score_rollout(
    task: Task[Any],
    protocol: Protocol,
    n_replicas: int,
    seed: int,
    *,
    first_replica: int = 0,
    n_steps: int | None = None,
) -> tuple[State, Tensor]:
    """An episode (or its first ``n_steps`` steps; default the task's ``n_steps``) along a
    position path held fixed for the score-function estimator.

    :return: the state after the last step (positions detached; momenta and accumulators
        with their explicit dependence on the protocol) and ``log P[path | theta]`` ``[B]``
        (up to a constant), the sum of the transition log-densities of every step.
    """
    state = task.initial_state(n_replicas, seed, first_replica=first_replica)
    integrator = task.integrator(protocol)
    log_p = torch.zeros(n_replicas, dtype=torch.float64)
    # as in simulate(): the cached force is refreshed at the start and at protocol jumps,
    # and times come from the step count
    t_start = state.t
    steps = task.n_steps if n_steps is None else n_steps
    jumps = jump_steps(integrator, float(t_start), steps)
    state = integrator.prepare(state.replace(R=state.R.detach()))
    for k in range(1, steps + 1):
        if isinstance(integrator, Langevin):
            state, lp = integrator.score_step(state)
        else:
            nxt = integrator.step(state)
            R_next = nxt.R.detach()
            lp = transition_log_prob(integrator, state, R_next)
            state = nxt.replace(R=R_next)
        log_p = log_p + lp
        state = state.replace(t=t_start + k * integrator.dt)
        if k in jumps:
            state = integrator.prepare(state)
    return state, log_p


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
    mean = integrator.step(state.replace(rng=_ConstantNoise(0.0, B))).R
    shifted = integrator.step(state.replace(rng=_ConstantNoise(1.0, B))).R
    displacement = integrator.space.displacement
    width = displacement(shifted, mean)
    z = displacement(R_next, mean) / width
    return -(0.5 * z * z + torch.log(width.abs())).sum(dim=(-2, -1))
