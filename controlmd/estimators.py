"""Gradient estimators: d(expected loss)/d(theta) from simulated replicas.

An estimator turns one batch of rollouts into a gradient of the objective
``<loss> + protocol penalty`` with respect to the trainable parameters (the protocol's, then
the task's own). The trainer selects one by name (``[train] estimator``); a task declares
which it supports in ``capabilities.estimators``.

* ``"pathwise"`` (default): differentiate the surrogate loss through the simulation with
  the noise held fixed (reparameterization); the path through the steps is the simulate
  option ``gradient``: ``"direct"``, ``"checkpoint"`` (recompute windows of ``window``
  steps), ``"truncated"`` (detach every ``window`` steps) or ``"adjoint"``.
* ``"score"``: pathwise at fixed trajectory plus the score-function (REINFORCE) term
  (Engel, Smith & Brenner, PRX 13, 041032 (2023)):
  ``grad <L> = < dL/dtheta |_path > + < (L - b) dlog P[path | theta] / dtheta >``.
  The path is the sequence of positions, detached after every step; momenta and
  accumulators (the protocol work) keep their explicit dependence on theta. For overdamped
  dynamics ``log P`` is the sum of the Gaussian transition log-densities of the integrator
  (mean and width read off the integrator's own step at zero and unit noise, so
  Euler–Maruyama and the exact OU step are both handled); for Langevin BAOAB it is the
  Gaussian density of the O step's velocity noise, recovered from consecutive positions
  (:meth:`~controlmd.dynamics.langevin.Langevin.score_step`). NVE and Nosé–Hoover dynamics
  are deterministic: no score term, refused. ``b`` is the leave-one-out mean of the
  per-replica losses over the whole batch.
* ``"multiwindow"``: the horizon cut into ``windows`` equal windows; window ``k``'s surrogate
  (the task loss at its end, weighted by ``window_weights[k]``) is differentiated through
  window ``k`` only and the windows' gradients are summed. Biased (an early window is
  credited with the loss at its own end, not with the final outcome) but finite; with one
  window it is the pathwise estimator.
* ``"forward"``: forward-mode AD, one dual-number rollout per protocol parameter (for
  protocols with few parameters; at most :data:`MAX_FORWARD_PARAMETERS`).

``chunk`` (``pathwise``, ``score``, ``multiwindow``): replicas are simulated and
differentiated in blocks of at most ``chunk``, and the per-replica gradient contributions
summed, so peak memory does not grow with the replica count (the score function's
leave-one-out baseline is applied after the last block, from the sums of ``L_i dlog P_i``
and ``dlog P_i``).

Every estimator also returns, when asked, the spread of the gradient over replica groups
(``grad_var``, ``grad_rel_std``, and ``grad_snr/<j>`` = |mean| / SE of the first
:data:`MAX_SNR_LOGGED` gradient entries), and counts the replica-steps it simulated.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from controlmd._validation import check_int
from controlmd.distributed import DistributedContext, Shard, local_groups
from controlmd.dynamics.base import Integrator, State, jump_steps
from controlmd.dynamics.langevin import Langevin
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
    "MultiWindowEstimator",
    "PathwiseEstimator",
    "RolloutBatch",
    "ScoreEstimator",
    "make_estimator",
    "per_replica_losses",
    "score_rollout",
]

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
            stats = _variance_stats(flat, grads)
        md_steps = batch.replicas * batch.task.n_steps
        return GradientEstimate(objective_value, value, grads, stats, md_steps)


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
        integrator = task.integrator(protocol)
        if not integrator.stochastic:
            raise ControlMDError(
                f"estimator = 'score' needs stochastic dynamics with a known path density; task "
                f"{task.name!r} uses {type(integrator).__name__}, which is deterministic: its only "
                "randomness is the initial state, which does not depend on the protocol, so there "
                "is no score term. Use 'pathwise' or 'multiwindow'"
            )
        state = task.initial_state(1, 0)
        if not isinstance(state, State):
            raise ControlMDError(
                f"estimator = 'score' needs particle States; task {task.name!r} has "
                f"{type(state).__name__}; use 'pathwise'"
            )
        if state.P is not None and not isinstance(integrator, Langevin):
            raise ControlMDError(
                f"estimator = 'score' knows the path density of overdamped dynamics and of "
                f"Langevin BAOAB; task {task.name!r} uses {type(integrator).__name__}; use 'pathwise'"
            )

    def segment(
        self, batch: RolloutBatch, seed: int, first: int, count: int, *, whole_batch: bool
    ) -> _SegmentGradient:
        task, params, B = batch.task, batch.params, batch.replicas
        with torch.enable_grad():
            state, log_p = score_rollout(task, batch.protocol, count, seed, first_replica=first)
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
    task: Task[Any], protocol: Protocol, n_replicas: int, seed: int, *, first_replica: int = 0
) -> tuple[State, Tensor]:
    """One episode along a position path held fixed for the score-function estimator.

    :return: the final state (positions detached; momenta and accumulators with their
        explicit dependence on the protocol) and ``log P[path | theta]`` ``[B]`` (up to a
        constant), the sum of the transition log-densities of every step.
    """
    state = task.initial_state(n_replicas, seed, first_replica=first_replica)
    integrator = task.integrator(protocol)
    log_p = torch.zeros(n_replicas, dtype=torch.float64)
    # as in simulate(): the cached force is refreshed at the start and at protocol jumps,
    # and times come from the step count
    t_start = state.t
    jumps = jump_steps(integrator, float(t_start), task.n_steps)
    state = integrator.prepare(state.replace(R=state.R.detach()))
    for k in range(1, task.n_steps + 1):
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
    cls.name: cls
    for cls in (PathwiseEstimator, ScoreEstimator, MultiWindowEstimator, ForwardEstimator)
}
"""Estimator name -> class (``[train] estimator``)."""


def make_estimator(
    name: str, *, chunk: int = 0, windows: int = 1, window_weights: Sequence[float] | None = None
) -> GradientEstimator:
    """The estimator registered as ``name``; an unknown name lists the valid ones.

    :param chunk: replicas simulated at once (0: all); ``pathwise``, ``score`` and
        ``multiwindow``.
    :param windows: number of windows (``multiwindow`` only).
    :param window_weights: one weight >= 0 per window (``multiwindow`` only; default all 1).
    """
    if name not in ESTIMATORS:
        raise ControlMDError(
            f"unknown estimator {name!r}; expected one of: {', '.join(ESTIMATORS)}"
        )
    if name != "multiwindow" and (windows != 1 or window_weights):
        raise ControlMDError(
            f"windows / window_weights apply to estimator = 'multiwindow' only, got estimator = "
            f"{name!r} with windows = {windows}, window_weights = {list(window_weights or [])}"
        )
    if name == "multiwindow":
        return MultiWindowEstimator(
            chunk=chunk, windows=windows, window_weights=list(window_weights or []) or None
        )
    if name == "forward":
        if chunk:
            raise ControlMDError(
                f"chunk = {chunk} does not apply to estimator = 'forward' (one dual-number "
                "rollout per parameter); use chunk = 0"
            )
        return ForwardEstimator()
    return ESTIMATORS[name](chunk=chunk)  # type: ignore[call-arg]


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
    mean = integrator.step(state.replace(rng=_ConstantNoise(0.0, B))).R
    shifted = integrator.step(state.replace(rng=_ConstantNoise(1.0, B))).R
    displacement = integrator.space.displacement
    width = displacement(shifted, mean)
    z = displacement(R_next, mean) / width
    return -(0.5 * z * z + torch.log(width.abs())).sum(dim=(-2, -1))
