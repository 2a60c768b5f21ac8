"""Replica chunking: simulate and differentiate replicas in blocks and sum their
gradient contributions, so peak memory does not grow with the replica count."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from controlmd.distributed import Shard
from controlmd.errors import ControlMDError
from controlmd.estimators.base import (
    GradientEstimate,
    GradientEstimator,
    RolloutBatch,
    _flatten,
    _grad_or_zeros,
    _unflatten,
    _variance_stats,
)
from controlmd.protocols import Protocol
from controlmd.tasks.base import Task

Tensor = torch.Tensor


@dataclass
class _Segment:
    """A contiguous block of replicas (global indices ``first ... first + count - 1``) of
    one variance group, simulated as one batch."""

    group: int
    first: int
    count: int


@dataclass
class _SegmentGradient:
    """What one segment contributes: sums over its replicas.

    Attributes:
        grads: sum over the segment's replicas of each replica's gradient contribution (for
            the score function with a pending baseline: explicit + ``k L_i dlog p_i``).
        score: ``sum_i dlog p_i / dtheta`` when the leave-one-out baseline is applied after
            all segments (``None`` otherwise).
        loss_sum: sum of the per-replica task losses (detached).
    """

    grads: list[Tensor]
    score: list[Tensor] | None
    loss_sum: Tensor


class _ChunkedEstimator(GradientEstimator):
    """Estimators that sum per-replica gradient contributions over blocks of at most
    ``chunk`` replicas, so that peak memory is that of one block.

    The variance groups are contiguous blocks of the global replica indices (group ``g``
    holds replicas ``g B / G ... (g + 1) B / G - 1``), so a block never straddles two groups
    and the per-group gradients come at no extra cost. The task's loss must be a mean over
    replicas (``replica_mean_loss``).
    """

    chunk: int

    def check(self, task: Task[Any], protocol: Protocol, params: Sequence[nn.Parameter]) -> None:
        super().check(task, protocol, params)
        if self.chunk and not task.replica_mean_loss:
            raise ControlMDError(
                f"chunk = {self.chunk} needs a loss that is a mean over replicas; task "
                f"{task.name!r} couples replicas (replica_mean_loss is False); use chunk = 0"
            )

    @abstractmethod
    def segment(
        self, batch: RolloutBatch, seed: int, first: int, count: int, *, whole_batch: bool
    ) -> _SegmentGradient:
        """Gradient contributions of replicas ``first ... first + count - 1`` (global);
        ``whole_batch``: the segment is every replica of the batch (one process, one
        segment)."""

    def estimate(self, batch: RolloutBatch, seed: int, with_variance: bool) -> GradientEstimate:
        params, B = batch.params, batch.replicas
        # a loss that couples replicas is only evaluated on the whole batch: no groups
        with_variance = with_variance and batch.task.replica_mean_loss
        n_groups = max(batch.grad_groups, 1) if with_variance else 1
        segments = _segments(batch.shard, B, n_groups, self.chunk)
        single = len(segments) == 1 and not batch.dist.enabled
        sums = [[torch.zeros_like(p) for p in params] for _ in range(n_groups)]
        scores: list[list[Tensor]] = [
            [torch.zeros_like(p) for p in params] for _ in range(n_groups)
        ]
        loss_sums = torch.zeros(n_groups, dtype=torch.float64)
        counts = torch.zeros(n_groups, dtype=torch.float64)
        for seg in segments:
            out = self.segment(batch, seed, seg.first, seg.count, whole_batch=single)
            for acc, g in zip(sums[seg.group], out.grads):
                acc.add_(g.detach())
            if out.score is not None:
                for acc, g in zip(scores[seg.group], out.score):
                    acc.add_(g.detach())
            loss_sums[seg.group] += out.loss_sum.detach().to(torch.float64)
            counts[seg.group] += seg.count
        # scale-out: sums over all ranks' replicas
        flat_sums = torch.stack([_flatten(gs) for gs in sums])
        flat_scores = torch.stack([_flatten(gs) for gs in scores])
        flat_sums, flat_scores, loss_sums, counts = batch.dist.all_reduce_sum(
            [flat_sums, flat_scores, loss_sums, counts]
        )
        loss_total = loss_sums.sum()
        # leave-one-out baseline: w_i = k L_i - S / (B - 1); the k L_i part is in the sums
        per_group = flat_sums - (loss_total / max(B - 1, 1)).to(flat_sums) * flat_scores
        penalty = batch.protocol.penalty()
        penalty_grads = _grad_or_zeros(penalty, params, retain=False)
        grad_flat = per_group.sum(0) / B
        grads = [
            g.view_as(p) + pg
            for g, p, pg in zip(_unflatten(grad_flat, params), params, penalty_grads)
        ]
        loss = (loss_total / B).to(torch.float64)
        stats: dict[str, float] = {}
        if with_variance and n_groups >= 2:
            rows = per_group / counts.clamp(min=1).to(per_group).unsqueeze(1)
            stats = _variance_stats(rows, grads)
        md_steps = B * batch.task.n_steps
        return GradientEstimate(loss + penalty.detach(), loss, grads, stats, md_steps)


def _segments(shard: Shard, replicas: int, n_groups: int, chunk: int) -> list[_Segment]:
    """This rank's blocks: contiguous groups cut into pieces of at most ``chunk`` replicas."""
    out: list[_Segment] = []
    for g in range(n_groups):
        lo = max(g * replicas // n_groups, shard.first)
        hi = min((g + 1) * replicas // n_groups, shard.stop)
        size = chunk if chunk > 0 else max(hi - lo, 1)
        out.extend(_Segment(g, a, min(size, hi - a)) for a in range(lo, hi, size))
    return out
