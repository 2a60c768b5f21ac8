"""Pathwise estimators: the surrogate differentiated through the simulation with the
noise held fixed, over the whole horizon or window by window (``multiwindow``)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from controlmd._validation import check_int
from controlmd.distributed import local_groups
from controlmd.dynamics.base import State
from controlmd.errors import ControlMDError
from controlmd.estimators.base import (
    GradientEstimate,
    RolloutBatch,
    _grad_or_zeros,
    _SurrogateEstimator,
    slice_state,
)
from controlmd.estimators.chunked import _ChunkedEstimator, _SegmentGradient
from controlmd.protocols import Protocol
from controlmd.tasks.base import Task

Tensor = torch.Tensor


class PathwiseEstimator(_SurrogateEstimator):
    """Differentiate the loss through the simulation (reparameterization); with ``chunk``,
    in blocks of at most ``chunk`` replicas (the multi-window estimator with one window)."""

    name = "pathwise"

    def __init__(self, *, chunk: int = 0) -> None:
        check_int("chunk", chunk, minimum=0)
        self.chunk = chunk

    def check(self, task: Task[Any], protocol: Protocol, params: Sequence[nn.Parameter]) -> None:
        super().check(task, protocol, params)
        if self.chunk:
            MultiWindowEstimator(chunk=self.chunk).check(task, protocol, params)

    def estimate(self, batch: RolloutBatch, seed: int, with_variance: bool) -> GradientEstimate:
        if self.chunk:
            return MultiWindowEstimator(chunk=self.chunk).estimate(batch, seed, with_variance)
        return super().estimate(batch, seed, with_variance)

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


class MultiWindowEstimator(_ChunkedEstimator):
    """Multi-window pathwise: the horizon cut into ``windows`` windows, window ``k``'s own
    surrogate (the task loss at its end) differentiated through window ``k`` only.

    ``grad = sum_k w_k d L(x_{s_k}) / dtheta |_{x_{s_{k-1}} fixed}``: a biased estimator of
    the gradient of the final loss (early windows are credited for the loss at their own end,
    not for what it leads to), but a finite one, whose variance does not grow with the
    horizon the way the full pathwise derivative of a chaotic chain does. With one window it
    is the pathwise estimator.
    """

    name = "multiwindow"

    def __init__(
        self, *, chunk: int = 0, windows: int = 1, window_weights: Sequence[float] | None = None
    ) -> None:
        check_int("chunk", chunk, minimum=0)
        check_int("windows", windows)
        if window_weights is not None:
            if len(window_weights) != windows:
                raise ControlMDError(
                    f"window_weights has {len(window_weights)} entries; expected one per window "
                    f"(windows = {windows})"
                )
            bad = [w for w in window_weights if not (math.isfinite(w) and w >= 0)]
            if bad:
                raise ControlMDError(f"window_weights must be finite and >= 0, got {bad}")
        self.chunk = chunk
        self.windows = windows
        self.window_weights = (
            [1.0] * windows if window_weights is None else [float(w) for w in window_weights]
        )

    def check(self, task: Task[Any], protocol: Protocol, params: Sequence[nn.Parameter]) -> None:
        # the multi-window estimator applies wherever the pathwise one does
        if "pathwise" not in task.capabilities.estimators:
            raise ControlMDError(
                f"estimator = 'multiwindow' differentiates through the simulation like "
                f"'pathwise', which task {task.name!r} does not support"
            )
        if self.chunk and not task.replica_mean_loss:
            raise ControlMDError(
                f"chunk = {self.chunk} needs a loss that is a mean over replicas; task "
                f"{task.name!r} couples replicas (replica_mean_loss is False); use chunk = 0"
            )
        if self.windows > task.n_steps:
            raise ControlMDError(
                f"windows = {self.windows} exceeds the task's n_steps = {task.n_steps}"
            )
        if not isinstance(task.initial_state(1, 0), State):
            raise ControlMDError(
                f"estimator = 'multiwindow' cuts particle States at window ends; task "
                f"{task.name!r} has another state type; use 'pathwise'"
            )

    def bounds(self, n_steps: int) -> list[tuple[int, int]]:
        """``(first step, end step)`` of each window: equal shares of ``n_steps``."""
        ends = [k * n_steps // self.windows for k in range(self.windows + 1)]
        return list(itertools.pairwise(ends))

    def segment(
        self, batch: RolloutBatch, seed: int, first: int, count: int, *, whole_batch: bool
    ) -> _SegmentGradient:
        task, params = batch.task, batch.params
        options = {k: v for k, v in batch.simulate_options.items() if k != "gradient"}
        options["gradient"] = batch.simulate_options.get("gradient", "direct")
        grads = [torch.zeros_like(p) for p in params]
        state: Any = task.initial_state(count, seed, first_replica=first)
        loss = torch.zeros((), dtype=torch.float64)
        for (a, b), weight in zip(self.bounds(task.n_steps), self.window_weights):
            with torch.enable_grad():
                state = task.advance(state.detach(), batch.protocol, b - a, **options)
                loss = task.loss(state) * count
            if weight > 0:
                for acc, g in zip(grads, _grad_or_zeros(loss, params, retain=False)):
                    acc.add_(weight * g)
        return _SegmentGradient(grads, None, loss.detach())
