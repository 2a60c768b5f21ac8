"""Gradient-based protocol optimization over replica ensembles.

:class:`Trainer` has stable-baselines3's shape: the constructor validates and stores,
``_setup()`` builds the optimizer, ``learn(iterations, callbacks=...)`` runs; evaluation,
checkpointing, histograms, early stopping and the progress bar are callbacks
(:mod:`controlmd.callbacks`). The trainer only talks to the :class:`~controlmd.tasks.Task`
interface, so every task trains the same way.

Gradient estimators (``estimator``):

* ``"pathwise"`` (default): differentiate the surrogate loss through the simulation with
  the noise held fixed (reparameterization); the path through the steps is ``gradient``:
  ``"direct"``, ``"checkpoint"`` (recompute windows of ``window`` steps), ``"truncated"``
  (detach every ``window`` steps) or ``"adjoint"`` (tasks with ``supports_adjoint``).
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

Budgets: ``md_steps`` counts forward replica-steps (training, L-BFGS line searches and
evaluations); ``grad_steps`` the replica-steps differentiated through; ``wall_s`` the wall
time including evaluations. Seeds: training iteration ``i`` uses the batch seed
``seed + i`` (``seed`` for every iteration with ``frozen_noise``), held-out evaluations
``seed + EVAL_SEED_OFFSET``, the before/after scoring ``seed + FINAL_SEED_OFFSET`` (all
with per-replica streams, see :mod:`controlmd.rng`). L-BFGS re-evaluates with the same
seed inside an iteration (common random numbers across its line search).

Scale-out (:mod:`controlmd.distributed`): with a ``distributed`` context (``torchrun``) each
rank simulates an equal, contiguous share of the replicas (``first_replica``, so replica ``i``
gets the same noise for any number of ranks); the loss, the gradient and the
gradient-variance statistics are averaged over ranks (means over all ``replicas``),
evaluations are split over ranks and their sums reduced, and only rank 0 writes files. The
world size must divide ``replicas``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from controlmd._validation import check_choice, check_int, check_positive
from controlmd.checkpoint import atomic_write_json, load_checkpoint, set_rng_state
from controlmd.distributed import DistributedContext, local_groups
from controlmd.dynamics.base import State
from controlmd.errors import ConfigError, ControlMDError
from controlmd.logging import JSONLinesSink, Logger, TensorBoardSink
from controlmd.protocols import Protocol
from controlmd.tasks.base import Task

Tensor = torch.Tensor

__all__ = [
    "EVAL_SEED_OFFSET",
    "FINAL_SEED_OFFSET",
    "RESCORE_SEED_OFFSET",
    "Evaluation",
    "RunResult",
    "Trainer",
    "evaluate",
    "run_experiment",
    "task_parameters",
]

# torch's CPU generators keep only the low 32 bits of a seed, and replica i of a batch
# seeded s draws from s + i * 1_000_003 (mod 2**32). These offsets were searched so that,
# for base seeds < 2000 and < 10_000 training iterations, no training stream of a batch of
# up to 200_000 replicas coincides with an evaluation stream, nor two evaluation batches.
EVAL_SEED_OFFSET = 828_979_348
FINAL_SEED_OFFSET = 1_877_134_342
RESCORE_SEED_OFFSET = 573_356_475
MAX_FORWARD_PARAMETERS = 64

_OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "lbfgs")
_GRADIENTS = ("direct", "checkpoint", "truncated", "adjoint")
_ESTIMATORS = ("pathwise", "score", "forward")
_SCHEDULES = ("constant", "cosine", "exponential", "step")


@dataclass(frozen=True)
class Evaluation:
    """Mean of the exact metric over ``n`` replicas and its standard error."""

    mean: float
    se: float
    n: int
    md_steps: int


def evaluate(
    task: Task,
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
                raise ControlMDError(f"task {task.name!r}: metric is not finite for some replicas")
            total += float(values.sum())
            total_sq += float((values * values).sum())
            done += b
    if distributed is not None and distributed.enabled:  # scale-out: sums over ranks
        sums = distributed.all_reduce_sum([torch.tensor([total, total_sq], dtype=torch.float64)])[0]
        total, total_sq = float(sums[0]), float(sums[1])
    mean = total / n_replicas
    var = max(total_sq / n_replicas - mean * mean, 0.0) * n_replicas / max(n_replicas - 1, 1)
    return Evaluation(mean, math.sqrt(var / n_replicas), n_replicas, n_replicas * task.n_steps)


class Trainer:
    """Optimize a protocol against a task's surrogate loss.

    :param task: the task (its ``loss`` is minimized, its ``metric`` reported).
    :param protocol: the protocol to train (its parameters are updated in place).
    :param optimizer: ``adam``, ``adamw``, ``sgd``, ``rmsprop`` or ``lbfgs`` (L-BFGS draws the
        same noise for every evaluation within an iteration).
    :param lr: learning rate (> 0).
    :param replicas: replicas per training rollout.
    :param gradient: ``direct``, ``checkpoint``, ``truncated`` or ``adjoint``.
    :param window: steps per checkpoint / truncation window (required by those paths).
    :param clip: maximum gradient norm (``None`` or 0: no clipping).
    :param estimator: ``pathwise``, ``score`` or ``forward`` (see the module docstring).
    :param lr_schedule: ``constant``, ``cosine`` (to ``lr_min`` at ``schedule_iterations``),
        ``exponential`` (``lr * lr_gamma**i``) or ``step`` (``lr * lr_gamma**(i // lr_step)``).
    :param schedule_iterations: horizon of the cosine schedule.
    :param momentum: momentum of ``sgd`` / ``rmsprop``.
    :param weight_decay: weight decay of the torch optimizers.
    :param lbfgs_max_iter: L-BFGS iterations per training iteration.
    :param frozen_noise: reuse the training seed every iteration (sample-average problem).
    :param grad_groups: replica groups for the gradient-variance estimate (>= 2).
    :param variance_every: iterations between variance estimates (0: never).
    :param seed: base seed of the training and evaluation streams.
    :param logger: where scalars go (default: a logger without sinks).
    :param distributed: rank and world size (:func:`controlmd.distributed.init_distributed`);
        the world size must divide ``replicas``. Default: one process.
    """

    def __init__(
        self,
        task: Task,
        protocol: Protocol,
        *,
        optimizer: str = "adam",
        lr: float = 1e-2,
        replicas: int = 256,
        gradient: str = "direct",
        window: int | None = None,
        clip: float | None = None,
        estimator: str = "pathwise",
        lr_schedule: str = "constant",
        lr_min: float = 0.0,
        lr_gamma: float = 0.5,
        lr_step: int = 100,
        schedule_iterations: int | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lbfgs_max_iter: int = 20,
        frozen_noise: bool = False,
        grad_groups: int = 8,
        variance_every: int = 10,
        seed: int = 0,
        logger: Logger | None = None,
        distributed: DistributedContext | None = None,
    ) -> None:
        if not isinstance(task, Task):
            raise ControlMDError(f"task must be a controlmd Task, got {type(task).__name__}")
        if not isinstance(protocol, Protocol):
            raise ControlMDError(
                f"protocol must be a controlmd Protocol, got {type(protocol).__name__}"
            )
        check_choice("optimizer", optimizer, _OPTIMIZERS)
        check_choice("gradient", gradient, _GRADIENTS)
        check_choice("estimator", estimator, _ESTIMATORS)
        check_choice("lr_schedule", lr_schedule, _SCHEDULES)
        check_positive("lr", lr)
        check_positive("lr_min", lr_min, allow_zero=True)
        check_positive("lr_gamma", lr_gamma)
        check_int("lr_step", lr_step)
        check_int("replicas", replicas)
        # scale-out: this rank's replicas (refuses a world size that does not divide them)
        dist_ctx = distributed if distributed is not None else DistributedContext()
        shard = dist_ctx.shard(replicas)
        if dist_ctx.enabled and not task.replica_mean_loss:
            raise ControlMDError(
                f"task {task.name!r} cannot be trained on {dist_ctx.world_size} processes: its loss couples "
                "replicas (replica_mean_loss is False), so the mean of the ranks' losses is not the "
                "loss of the whole batch; run it on one process"
            )
        check_int("lbfgs_max_iter", lbfgs_max_iter)
        check_int("grad_groups", grad_groups, minimum=2)
        check_int("variance_every", variance_every, minimum=0)
        check_int("seed", seed, minimum=0)
        check_positive("momentum", momentum, allow_zero=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        if clip is not None:
            check_positive("clip", clip, allow_zero=True)
        if gradient in ("checkpoint", "truncated"):
            if window is None:
                raise ControlMDError(f"gradient = {gradient!r} needs a window (steps per segment)")
            check_int("window", window)
        if gradient == "adjoint" and not getattr(task, "supports_adjoint", False):
            raise ControlMDError(
                f"gradient = 'adjoint' needs deterministic ODE dynamics; task {task.name!r} does not "
                "support it (supports_adjoint is False); use 'direct', 'checkpoint' or 'truncated'"
            )
        if schedule_iterations is not None:
            check_int("schedule_iterations", schedule_iterations)
        elif lr_schedule == "cosine":
            raise ControlMDError("lr_schedule = 'cosine' needs schedule_iterations (its horizon)")
        params = [p for p in protocol.parameters() if p.requires_grad] + task_parameters(task)
        if not params:
            raise ControlMDError(
                f"protocol {type(protocol).__name__} has no trainable parameters (and task {task.name!r} "
                "exposes none through parameters())"
            )
        if estimator == "forward" and task_parameters(task):
            raise ControlMDError(
                "estimator = 'forward' differentiates protocol parameters only; use 'pathwise'"
            )
        n_params = sum(p.numel() for p in params)
        if estimator == "forward" and n_params > MAX_FORWARD_PARAMETERS:
            raise ControlMDError(
                f"estimator = 'forward' costs one rollout per parameter; the protocol has {n_params} "
                f"(allowed: <= {MAX_FORWARD_PARAMETERS}); use estimator = 'pathwise'"
            )
        if estimator == "score":
            _check_score_dynamics(task, protocol)
        if optimizer == "lbfgs" and estimator == "score":
            raise ControlMDError(
                "optimizer = 'lbfgs' cannot use estimator = 'score' (a surrogate, not the objective)"
            )
        if protocol.feedback and estimator == "forward":
            raise ControlMDError("estimator = 'forward' supports open-loop protocols only")
        self.task = task
        self.protocol = protocol
        self.optimizer_name = optimizer
        self.lr = float(lr)
        self.replicas = replicas
        self.gradient = gradient
        self.window = window
        self.clip = float(clip) if clip else None
        self.estimator = estimator
        self.lr_schedule = lr_schedule
        self.lr_min = float(lr_min)
        self.lr_gamma = float(lr_gamma)
        self.lr_step = lr_step
        self.schedule_iterations = schedule_iterations
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.lbfgs_max_iter = lbfgs_max_iter
        self.frozen_noise = bool(frozen_noise)
        self.grad_groups = min(grad_groups, replicas) if replicas >= 2 else 0
        self.variance_every = variance_every if replicas >= 2 else 0
        self.seed = seed
        self.logger = logger if logger is not None else Logger()
        self.dist = dist_ctx
        self.shard = shard
        self.n_parameters = n_params
        self.iteration = 0
        self.md_steps = 0
        self.grad_steps = 0
        self.last: dict[str, float] = {}
        self._wall_offset = 0.0
        self._cpu_offset = 0.0
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()
        self._setup()

    @classmethod
    def from_config(
        cls,
        cfg: dict[str, dict[str, Any]],
        task: Task,
        protocol: Protocol,
        logger: Logger | None = None,
        distributed: DistributedContext | None = None,
    ) -> Trainer:
        """A trainer from a resolved experiment config's ``[train]`` section."""
        t = cfg["train"]
        try:
            return cls(
                task,
                protocol,
                optimizer=t["optimizer"],
                lr=t["lr"],
                replicas=t["replicas"],
                gradient=t["gradient"],
                window=t["window"] or None,
                clip=t["clip"] or None,
                estimator=t["estimator"],
                lr_schedule=t["lr_schedule"],
                lr_min=t["lr_min"],
                lr_gamma=t["lr_gamma"],
                lr_step=t["lr_step"],
                schedule_iterations=max(t["iterations"], 1),
                momentum=t["momentum"],
                weight_decay=t["weight_decay"],
                lbfgs_max_iter=t["lbfgs_max_iter"],
                frozen_noise=t["frozen_noise"],
                grad_groups=t["grad_groups"],
                variance_every=t["variance_every"],
                seed=cfg["experiment"]["seed"],
                logger=logger,
                distributed=distributed,
            )
        except ControlMDError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"[train] {exc}") from None

    def _setup(self) -> None:
        params = self.parameters()
        self.dist.broadcast_(params)  # scale-out: every rank starts from rank 0's parameters
        if self.optimizer_name == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=self.lr, weight_decay=self.weight_decay
            )
        elif self.optimizer_name == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        elif self.optimizer_name == "sgd":
            self.optimizer = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        elif self.optimizer_name == "rmsprop":
            self.optimizer = torch.optim.RMSprop(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        else:
            self.optimizer = torch.optim.LBFGS(
                params, lr=self.lr, max_iter=self.lbfgs_max_iter, line_search_fn="strong_wolfe"
            )

    def parameters(self) -> list[nn.Parameter]:
        """Trainable protocol parameters, then those of the task (see :func:`task_parameters`)."""
        return [p for p in self.protocol.parameters() if p.requires_grad] + task_parameters(
            self.task
        )

    @property
    def wall_s(self) -> float:
        """Wall time of this training (across resumes), evaluations included."""
        return self._wall_offset + time.perf_counter() - self._t0

    @property
    def cpu_s(self) -> float:
        """CPU time of this process (all its threads) spent on this training, across resumes:
        on a shared machine, where wall time is inflated by other jobs, the honest cost."""
        return self._cpu_offset + time.process_time() - self._c0

    def train_seed(self, iteration: int) -> int:
        return self.seed if self.frozen_noise else self.seed + iteration

    def lr_at(self, iteration: int) -> float:
        if self.lr_schedule == "constant":
            return self.lr
        if self.lr_schedule == "exponential":
            return self.lr * self.lr_gamma**iteration
        if self.lr_schedule == "step":
            return self.lr * self.lr_gamma ** (iteration // self.lr_step)
        T = self.schedule_iterations or 1
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (
            1.0 + math.cos(math.pi * min(iteration, T) / T)
        )

    # ------------------------------------------------------------------ training loop

    def learn(self, iterations: int, callbacks: Sequence[Any] | Any | None = None) -> Trainer:
        """Train until ``iterations`` iterations in total have been done.

        A resumed trainer (:meth:`load_state_dict`) continues from its checkpoint's
        iteration. Callbacks (:class:`controlmd.callbacks.Callback`) run after every
        iteration; one returning ``False`` stops training.
        """
        from controlmd.callbacks import CallbackList

        check_int("iterations", iterations, minimum=0)
        callback = CallbackList(callbacks)
        callback.init_callback(self)
        callback.on_training_start()
        while self.iteration < iterations:
            info = self.train_step()
            log = self.logger
            log.record("train/loss", info["loss"])
            log.record("train/grad_norm", info["grad_norm"])
            log.record("train/lr", info["lr"])
            if "grad_var" in info:
                log.record("train/grad_var", info["grad_var"])
                log.record("train/grad_rel_std", info["grad_rel_std"])
            log.record("budget/md_steps", self.md_steps)
            log.record("budget/grad_steps", self.grad_steps)
            log.record("time/wall_s", self.wall_s)
            log.record("time/cpu_s", self.cpu_s)
            go_on = callback.on_step()
            log.dump(self.iteration)
            if go_on is False:
                break
        callback.on_training_end()
        return self

    def train_step(self) -> dict[str, float]:
        """One optimizer iteration; returns loss, gradient norm (before clipping), lr."""
        i = self.iteration
        lr = self.lr_at(i)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        seed = self.train_seed(i)
        with_variance = (
            self.variance_every > 0 and i % self.variance_every == 0 and self.estimator != "forward"
        )
        info: dict[str, float] = {}

        def closure() -> Tensor:
            objective, loss, grads, stats = self._gradient(seed, with_variance and not info)
            for p, g in zip(self.parameters(), grads):
                p.grad = g.detach().clone()
            norm = _total_norm(grads)
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.parameters(), self.clip)
            if not info:
                info.update(
                    loss=float(loss), objective=float(objective), grad_norm=norm, lr=lr, **stats
                )
            return objective

        if self.optimizer_name == "lbfgs":
            self.optimizer.step(closure)  # type: ignore[arg-type]
        else:
            closure()
            self.optimizer.step()
        self.iteration += 1
        self.last = info
        return info

    def _gradient(
        self, seed: int, with_variance: bool
    ) -> tuple[Tensor, Tensor, list[Tensor], dict[str, float]]:
        """``(objective value, task loss, gradient of the objective, variance stats)``."""
        if self.estimator == "forward":
            objective_value, value, grads, stats = self._forward_gradient(seed)
            objective_value, value, *grads = self.dist.all_reduce_mean(
                [objective_value, value, *grads]
            )
            return objective_value, value, grads, stats
        objective, value, group_objectives = (
            self._score_objective(seed, with_variance)
            if self.estimator == "score"
            else self._pathwise_objective(seed, with_variance)
        )
        params = self.parameters()
        grads = _grad(objective, params, retain=bool(group_objectives))
        objective_value = value + self.protocol.penalty().detach()
        # scale-out: means over ranks of the local means = means over all replicas
        objective_value, value, *grads = self.dist.all_reduce_mean([objective_value, value, *grads])
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
            flat = self.dist.all_reduce_sum([flat])[0]  # scale-out: group members on every rank
            var = float(flat.var(dim=0, unbiased=True).sum()) / flat.shape[0]
            norm = _total_norm(grads)
            stats = {
                "grad_var": var,
                "grad_rel_std": math.sqrt(var) / norm if norm > 0 else math.inf,
            }
        return objective_value, value, grads, stats

    def _count(self, replicas: int, rollouts: int = 1) -> None:
        steps = replicas * self.task.n_steps * rollouts
        self.md_steps += steps
        self.grad_steps += steps

    def _simulate_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"gradient": self.gradient}
        if self.window is not None and self.gradient in ("checkpoint", "truncated"):
            options["window"] = self.window
        return options

    def _pathwise_objective(
        self, seed: int, with_variance: bool
    ) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        state = self.task.rollout(
            self.protocol,
            self.shard.count,
            seed,
            first_replica=self.shard.first,
            **self._simulate_options(),
        )
        self._count(self.replicas)
        loss = self.task.loss(state)
        penalty = self.protocol.penalty()
        groups: list[Tensor | None] = []
        if with_variance:
            groups = [
                weight * (self.task.loss(_slice_state(state, idx)) + penalty) if idx else None
                for idx, weight in self._groups()
            ]
        return loss + penalty, loss.detach(), groups

    def _score_objective(
        self, seed: int, with_variance: bool
    ) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        B = self.shard.count
        state = self.task.initial_state(B, seed, first_replica=self.shard.first)
        integrator = self.task.integrator(self.protocol)
        log_p = torch.zeros(B, dtype=torch.float64)
        with torch.enable_grad():
            for _ in range(self.task.n_steps):
                nxt = integrator.step(state)
                R_next = nxt.R.detach()
                log_p = log_p + _transition_log_prob(integrator, state, R_next)
                state = nxt.replace(R=R_next)
        self._count(self.replicas)
        explicit = self.task.loss(state)
        per_replica = torch.stack(
            [self.task.loss(_slice_state(state, [i])).detach() for i in range(B)]
        )
        everyone = self.dist.all_gather(per_replica)  # scale-out: the baseline uses all replicas
        baseline = (everyone.sum() - per_replica) / max(self.replicas - 1, 1)
        weights = (per_replica - baseline).to(log_p)
        penalty = self.protocol.penalty()
        objective = explicit + (weights * log_p).mean() + penalty
        groups: list[Tensor | None] = []
        if with_variance:
            for idx, weight in self._groups():
                if not idx:
                    groups.append(None)
                    continue
                ix = torch.as_tensor(idx)
                groups.append(
                    weight
                    * (
                        self.task.loss(_slice_state(state, idx))
                        + (weights[ix] * log_p[ix]).mean()
                        + penalty
                    )
                )
        return objective, explicit.detach(), groups

    def _forward_gradient(self, seed: int) -> tuple[Tensor, Tensor, list[Tensor], dict[str, float]]:
        names = [n for n, p in self.protocol.named_parameters() if p.requires_grad]
        params = self.parameters()
        grads = [torch.zeros_like(p) for p in params]
        objective = _RolloutObjective(
            self.task,
            self.protocol,
            self.shard.count,
            self._simulate_options(),
            first_replica=self.shard.first,
        )
        value = torch.zeros((), dtype=torch.float64)
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
                self._count(self.replicas)
        return value, value - self.protocol.penalty().detach(), grads, {}

    def _groups(self) -> list[tuple[list[int], float]]:
        """Per replica group ``g, g+G, ...``: its members on this rank and their share of it."""
        return local_groups(self.shard, self.grad_groups)

    # ------------------------------------------------------------------ evaluation, state

    def evaluate(
        self, n_replicas: int, seed: int | None = None, *, chunk: int = 10_000
    ) -> Evaluation:
        """Exact metric of the current protocol on held-out replicas (counted in md_steps)."""
        result = evaluate(
            self.task,
            self.protocol,
            n_replicas,
            self.seed + EVAL_SEED_OFFSET if seed is None else seed,
            chunk=chunk,
            distributed=self.dist,
        )
        self.md_steps += result.md_steps
        return result

    def exact_metric(self) -> float | None:
        """The task's exact (noise-free) metric of the current protocol, where it has one."""
        exact = getattr(self.task, "exact_metric", None)
        if exact is None:
            return None
        with torch.no_grad():
            value = exact(self.protocol)
        return None if value is None else float(value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "md_steps": self.md_steps,
            "grad_steps": self.grad_steps,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "last": dict(self.last),
            "task_parameters": [p.detach().clone() for p in task_parameters(self.task)],
            "task_state": self.task.state_dict()
            if callable(getattr(self.task, "state_dict", None))
            else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.protocol.load_state_dict(state["protocol"])
        with torch.no_grad():
            for p, saved in zip(task_parameters(self.task), state.get("task_parameters", [])):
                p.copy_(saved)
        if state.get("task_state") is not None:
            self.task.load_state_dict(state["task_state"])  # type: ignore[attr-defined]
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.md_steps = int(state["md_steps"])
        self.grad_steps = int(state["grad_steps"])
        self.last = dict(state.get("last", {}))
        self._wall_offset = float(state["wall_s"])
        self._cpu_offset = float(state.get("cpu_s", 0.0))
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()


class _RolloutObjective(nn.Module):
    """``loss(rollout(protocol))`` as a module, so ``functional_call`` can swap parameters."""

    def __init__(
        self,
        task: Task,
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


def task_parameters(task: Task) -> list[nn.Parameter]:
    """Trainable parameters a task owns, through its optional ``parameters()`` hook: a
    learning task's Hamiltonian (``rdf_inverse``'s pair potential), optimized together with
    the protocol's (kind ``none`` when the task has no control channels). Tasks with such
    parameters may also provide ``state_dict()`` / ``load_state_dict()`` (saved in the
    checkpoint) and ``finish_run(run_dir, logger, step)`` (called after the final
    evaluation, before ``extras()``, to write task-specific files and figures)."""
    hook = getattr(task, "parameters", None)
    return [p for p in hook() if p.requires_grad] if callable(hook) else []


def _grad(output: Tensor, params: list[nn.Parameter], *, retain: bool) -> list[Tensor]:
    grads = torch.autograd.grad(output, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _total_norm(grads: Sequence[Tensor]) -> float:
    return float(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads)))  # type: ignore[arg-type]


def _slice_state(state: State, index: Sequence[int]) -> State:
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


def _check_score_dynamics(task: Task, protocol: Protocol) -> None:
    integrator = task.integrator(protocol)
    if not getattr(integrator, "stochastic", False):
        raise ControlMDError(
            f"estimator = 'score' needs stochastic dynamics; task {task.name!r} uses "
            f"{type(integrator).__name__}, which is deterministic; use 'pathwise'"
        )
    state = task.initial_state(1, 0)
    if state.P is not None:
        raise ControlMDError(
            f"estimator = 'score' is implemented for overdamped dynamics (Gaussian position "
            f"transitions); task {task.name!r} has momenta; use 'pathwise'"
        )


def _transition_log_prob(integrator: Any, state: State, R_next: Tensor) -> Tensor:
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


# ---------------------------------------------------------------------- experiment runs


@dataclass
class RunResult:
    """Outcome of :func:`run_experiment`: the run folder and the contents of metrics.json."""

    run_dir: Path
    metrics: dict[str, Any]


def run_experiment(
    cfg: dict[str, dict[str, Any]],
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    runs_root: str | Path = "runs",
    progress: bool | None = None,
    distributed: DistributedContext | None = None,
) -> RunResult:
    """Train the protocol of a resolved config and write a run directory.

    Everything is validated and built before the first file is written. The folder is
    ``resume`` (continuing its checkpoint), else ``out``, else
    ``runs_root/<experiment>/<YYYYmmdd-HHMMSS>_seed<k>/``. It receives ``config.toml``,
    ``metrics.json``, ``protocol.pt`` (+ ``protocol.csv``, ``protocol_initial.pt``),
    ``protocol.png``, ``progress.jsonl``, ``tb/`` (TensorBoard) and ``checkpoint.pt``.

    With ``distributed`` (``torchrun``), every rank trains its share of the replicas and
    returns the same result; only rank 0 writes the folder (whose name it chooses and sends
    to the others). A resumed run reads its checkpoint on every rank (shared file system).

    :raises ConfigError: bad config, or a resume folder of another experiment / setup.
    """
    from controlmd.callbacks import (
        AbortAfter,
        CheckpointCallback,
        EvalCallback,
        HistogramCallback,
        ProgressBar,
    )
    from controlmd.config import build_protocol, build_task, read_run_config, write_config

    checkpoint = None
    if resume is not None:
        resume = Path(resume)
        saved = read_run_config(resume)
        _check_resumable(saved, cfg, resume)
        cfg = {
            **saved,
            "logging": cfg["logging"],
            "train": {**saved["train"], "iterations": cfg["train"]["iterations"]},
        }
        checkpoint = load_checkpoint(resume / "checkpoint.pt")
    seed = cfg["experiment"]["seed"]
    torch.manual_seed(seed)
    task = build_task(cfg)
    protocol = build_protocol(cfg, task)
    initial = copy.deepcopy(protocol)
    dist_ctx = distributed if distributed is not None else DistributedContext()
    trainer = Trainer.from_config(cfg, task, protocol, distributed=dist_ctx)
    abort_after = AbortAfter.from_env()
    if checkpoint is not None:
        try:
            trainer.load_state_dict(checkpoint["trainer"])
            initial.load_state_dict(checkpoint["initial_protocol"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError(f"checkpoint in {resume} does not match its config: {exc}") from None
        set_rng_state(checkpoint["rng"])
    run_dir = resume if resume is not None else _new_run_dir(cfg, out, runs_root)
    run_dir = Path(dist_ctx.broadcast_object(str(run_dir)))  # scale-out: rank 0's choice
    writer = dist_ctx.is_main  # scale-out: only rank 0 writes files
    log_cfg, eval_cfg = cfg["logging"], cfg["eval"]

    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None and writer:
        write_config(cfg, run_dir / "config.toml")
        initial.save(run_dir / "protocol_initial.pt")
    # the checkpoint of iteration i was written after every event of step i was flushed
    purge = trainer.iteration + 1 if checkpoint is not None else None
    sinks: list[Any] = (
        [JSONLinesSink(run_dir / "progress.jsonl", purge_step=purge)] if writer else []
    )
    if log_cfg["tensorboard"] and writer:
        sinks.append(TensorBoardSink(run_dir / "tb", purge_step=purge))
    logger = Logger(sinks)
    trainer.logger = logger
    final_seed = seed + FINAL_SEED_OFFSET
    chunk = eval_cfg["chunk"]

    if checkpoint is None:
        before = trainer.evaluate(eval_cfg["final_replicas"], final_seed, chunk=chunk)
        start = {
            "metric_initial": before.mean,
            "metric_initial_se": before.se,
            "metric_exact_initial": trainer.exact_metric(),
        }
        if log_cfg["tensorboard"] and writer and protocol.dim > 0:
            logger.record_figure("protocol/u", _protocol_figure(task, {"initial": initial}), 0)
    else:
        start = checkpoint["start"]

    def payload() -> dict[str, Any]:
        return {"start": start, "initial_protocol": initial.state_dict(), "config": cfg}

    evaluator = EvalCallback(every=eval_cfg["every"], n_replicas=eval_cfg["replicas"], chunk=chunk)
    callbacks: list[Any] = [evaluator]
    if log_cfg["histogram_every"] and log_cfg["tensorboard"] and writer:
        callbacks.append(HistogramCallback(log_cfg["histogram_every"]))
    if writer:
        callbacks.append(
            CheckpointCallback(
                run_dir / "checkpoint.pt", every=log_cfg["checkpoint_every"], payload=payload
            )
        )
    show = log_cfg["progress"] if progress is None else progress
    if show and writer:
        callbacks.append(ProgressBar(cfg["train"]["iterations"], evaluator))
    if abort_after is not None:
        callbacks.append(abort_after)
    trainer.learn(cfg["train"]["iterations"], callbacks)

    after = trainer.evaluate(eval_cfg["final_replicas"], final_seed, chunk=chunk)
    finish = getattr(task, "finish_run", None)
    if callable(finish) and writer:  # task-specific files and figures, before extras()
        finish(run_dir, logger, trainer.iteration)
    metrics: dict[str, Any] = {
        "experiment": cfg["experiment"]["name"],
        "task": task.name,
        "method": "gradient",
        "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "units": task.units,
        "metric_initial": start["metric_initial"],
        "metric_final": after.mean,
        "metric_initial_se": start["metric_initial_se"],
        "metric_final_se": after.se,
        "eval_replicas": after.n,
        "md_steps": trainer.md_steps,
        "grad_steps": trainer.grad_steps,
        "wall_s": trainer.wall_s,
        "cpu_s": trainer.cpu_s,
        "seed": seed,
        "iterations": trainer.iteration,
        "protocol_kind": protocol.kind,
        "protocol_parameters": trainer.n_parameters,
        "estimator": trainer.estimator,
        "gradient": trainer.gradient,
        "optimizer": trainer.optimizer_name,
        "replicas": trainer.replicas,
        "world_size": dist_ctx.world_size,
    }
    exact_final = trainer.exact_metric()
    if exact_final is not None:
        metrics["metric_exact_initial"] = start["metric_exact_initial"]
        metrics["metric_exact_final"] = exact_final
    metrics = _json_clean({**task.extras(), **metrics})  # task extras never shadow the core keys
    if not writer:  # scale-out: the other ranks are done
        logger.close()
        return RunResult(run_dir, metrics)

    protocol.save(run_dir / "protocol.pt")
    protocol.write_table(run_dir / "protocol.csv")
    if (log_cfg["plots"] or log_cfg["tensorboard"]) and protocol.dim > 0:
        figure = _protocol_figure(task, {"initial": initial, "trained": protocol})
        if log_cfg["plots"]:
            from controlmd.plotting import save_figure

            save_figure(figure, run_dir / "protocol.png")
        if log_cfg["tensorboard"]:
            logger.record_figure("protocol/u", figure, trainer.iteration)
    final_scalars = {
        "outcome/metric_final": after.mean,
        "outcome/metric_initial": start["metric_initial"],
    }
    logger.record_hparams(_hparams(cfg), final_scalars)
    logger.record("outcome/metric", after.mean)
    logger.record("budget/md_steps", trainer.md_steps)
    logger.record("time/wall_s", trainer.wall_s)
    logger.dump(trainer.iteration)
    logger.close()
    # checkpoint.pt stays the one written when training ended (before the final scoring),
    # so resuming a finished run re-scores it to the same numbers
    atomic_write_json(run_dir / "metrics.json", metrics)
    return RunResult(run_dir, metrics)


def _check_resumable(
    saved: dict[str, dict[str, Any]], cfg: dict[str, dict[str, Any]], run_dir: Path
) -> None:
    if saved["experiment"]["name"] != cfg["experiment"]["name"]:
        raise ConfigError(
            f"--resume {run_dir}: that run belongs to experiment {saved['experiment']['name']!r}, "
            f"not {cfg['experiment']['name']!r}"
        )
    for section in ("experiment", "task", "protocol", "train", "eval"):
        for key in sorted(set(saved[section]) | set(cfg[section])):
            if section == "train" and key == "iterations":
                continue
            a, b = saved[section].get(key), cfg[section].get(key)
            if a != b:
                raise ConfigError(
                    f"--resume {run_dir}: [{section}] {key} = {b!r} differs from the run's {a!r}; "
                    "a resumed run keeps its config (only train.iterations and [logging] may change)"
                )


def _new_run_dir(
    cfg: dict[str, dict[str, Any]], out: str | Path | None, runs_root: str | Path
) -> Path:
    if out is not None:
        path = Path(out)
        if (path / "config.toml").exists() or (path / "checkpoint.pt").exists():
            raise ConfigError(
                f"--out {path} already holds a run; use --resume {path} to continue it"
            )
        return path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(runs_root) / cfg["experiment"]["name"] / f"{stamp}_seed{cfg['experiment']['seed']}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}_{n}")
    return path


def _protocol_figure(task: Task, protocols: dict[str, Protocol]) -> Any:
    from controlmd.plotting import plot_protocols

    tables = {label: p.sample(400) for label, p in protocols.items()}
    reference = getattr(task, "reference_protocol", None)
    if reference is not None:
        ref = reference()
        if ref is not None:
            tables["reference"] = ref
    return plot_protocols(
        tables,
        channel_names=task.controls.names,
        units=task.controls.units,
        title=f"{task.name}: u(t)",
    )


def _hparams(cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in ("task", "protocol", "train"):
        for key, value in cfg[section].items():
            out[f"{section}.{key}"] = value
    out["experiment.seed"] = cfg["experiment"]["seed"]
    return out


def _json_clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Tensor):
        return _json_clean(obj.tolist())
    return obj
