"""The mixed estimator: the score function across the horizon, pathwise within its last
window."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from controlmd._validation import check_int
from controlmd.dynamics.base import State
from controlmd.errors import ControlMDError
from controlmd.estimators.base import RolloutBatch
from controlmd.estimators.score import ScoreEstimator, score_rollout
from controlmd.protocols import Protocol
from controlmd.tasks.base import Task

Tensor = torch.Tensor

PATHWISE_GRADIENTS = ("direct", "checkpoint")
"""Simulation gradient paths that differentiate the last window exactly."""


class MixedEstimator(ScoreEstimator):
    """Score function for the steps before the last of ``windows`` equal windows, pathwise
    derivative through the last window.

    With ``s`` the first step of the last window, the expected loss splits exactly as
    ``d<L>/dtheta = < (L - b) dlog P[x_1..x_s | theta]/dtheta > + < dL/dtheta |_{x_s} >``:
    the positions up to step ``s`` are sampled (their path density is the score-function
    estimator's), and the rest of the episode, from ``x_s`` held fixed (momenta and
    accumulators keep their dependence on theta), is differentiated pathwise. Both terms are
    unbiased, so the estimator is unbiased; the pathwise part sees only the last window, so
    it does not inherit the whole chain's exploding derivative, and the steps where the
    pathwise derivative is informative (those close to the end) do not pay the score
    function's variance. The loss must have a pathwise derivative (refused at the first
    estimate otherwise, e.g. assembly's ``surrogate = "yield"``).

    With one window it is the pathwise estimator on the task's loss (the trainer and the
    config ask for ``windows >= 2``). The last window is differentiated with the trainer's
    ``gradient`` path, ``direct`` or ``checkpoint`` (same gradient, less memory). The state
    at the window boundary is continued by ``task.advance``, which evaluates the force afresh
    there (at ``t_s + eps``, as every restart does) where a plain rollout keeps the previous
    step's force (at ``t_s - eps``): for a protocol continuous at ``t_s`` the trajectory
    differs from the plain one by ``O(eps)`` (~1e-8).
    """

    name = "mixed"
    requires = ("score", "pathwise")

    def __init__(self, *, chunk: int = 0, windows: int = 1) -> None:
        super().__init__(chunk=chunk)
        check_int("windows", windows)
        self.windows = windows

    def check(self, task: Task[Any], protocol: Protocol, params: Sequence[nn.Parameter]) -> None:
        super().check(task, protocol, params)
        if self.windows > task.n_steps:
            raise ControlMDError(
                f"windows = {self.windows} exceeds the task's n_steps = {task.n_steps}"
            )

    @staticmethod
    def check_gradient(gradient: str) -> None:
        """Refuse a simulation gradient path that would not differentiate the last window in
        full (the trainer calls this at construction)."""
        if gradient not in PATHWISE_GRADIENTS:
            raise ControlMDError(
                f"estimator = 'mixed' differentiates its last window in full; gradient = "
                f"{gradient!r} would not; use one of {list(PATHWISE_GRADIENTS)}"
            )

    def last_window_start(self, n_steps: int) -> int:
        """The first step of the pathwise window (the last of ``windows`` equal shares)."""
        return (self.windows - 1) * n_steps // self.windows

    def rollout(
        self, batch: RolloutBatch, seed: int, first: int, count: int
    ) -> tuple[State, Tensor]:
        task = batch.task
        self.check_gradient(batch.simulate_options.get("gradient", "direct"))
        start = self.last_window_start(task.n_steps)
        state, log_p = score_rollout(
            task, batch.protocol, count, seed, first_replica=first, n_steps=start
        )
        final = task.advance(state, batch.protocol, task.n_steps - start, **batch.simulate_options)
        if not task.loss(final).requires_grad:
            raise ControlMDError(
                f"estimator = 'mixed' differentiates the loss through its last window, but task "
                f"{task.name!r}'s loss has no pathwise derivative (e.g. assembly's surrogate = "
                "'yield', a count of clusters); the last window's effect would be lost. Use a "
                "smooth surrogate or estimator = 'score'"
            )
        return final, log_p
