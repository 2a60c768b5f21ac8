"""The gradient trainer: optimize a protocol against a task's surrogate loss.

:class:`Trainer` has stable-baselines3's shape: the constructor validates and stores,
``_setup()`` builds the optimizer, ``learn(iterations, callbacks=...)`` runs; evaluation,
checkpointing, histograms, early stopping and the progress bar are callbacks
(:mod:`controlmd.callbacks`). The trainer only talks to the :class:`~controlmd.tasks.Task`
contract, so every task trains the same way; the gradient comes from an estimator
(:mod:`controlmd.estimators`).

Budgets: ``md_steps`` counts forward replica-steps (training, L-BFGS line searches and
evaluations); ``grad_steps`` the replica-steps differentiated through; ``wall_s`` the wall
time including evaluations. Seeds: training iteration ``i`` uses the batch seed
``seed + i`` (``seed`` for every iteration with ``frozen_noise``), held-out evaluations
``seed + EVAL_SEED_OFFSET`` (:mod:`controlmd.rng`, per-replica streams). L-BFGS
re-evaluates with the same seed inside an iteration (common random numbers across its line
search).

Scale-out (:mod:`controlmd.distributed`): with a ``distributed`` context (``torchrun``) each
rank simulates an equal, contiguous share of the replicas (``first_replica``, so replica ``i``
gets the same noise for any number of ranks); the loss, the gradient and the
gradient-variance statistics are averaged over ranks (means over all ``replicas``),
evaluations are split over ranks and their sums reduced, and only rank 0 writes files. The
world size must divide ``replicas``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from controlmd._validation import check_choice, check_int, check_positive
from controlmd.callbacks import Callback, CallbackList, ProgressBar
from controlmd.distributed import DistributedContext
from controlmd.errors import ConfigError, ControlMDError
from controlmd.estimators import (
    ESTIMATORS,
    GradientEstimate,
    GradientEstimator,
    MixedEstimator,
    RolloutBatch,
    make_estimator,
    total_norm,
)
from controlmd.evaluation import Evaluation, evaluate
from controlmd.logger import Logger
from controlmd.protocols import Protocol
from controlmd.rng import EVAL_SEED_OFFSET
from controlmd.tasks.base import Task

Tensor = torch.Tensor

__all__ = ["LR_SCHEDULES", "OPTIMIZERS", "SIMULATION_GRADIENTS", "Trainer", "task_parameters"]

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "lbfgs")
SIMULATION_GRADIENTS = ("direct", "checkpoint", "truncated", "adjoint")
LR_SCHEDULES = ("constant", "cosine", "exponential", "step")


def build_estimator(
    name: str,
    *,
    chunk: int = 0,
    windows: int = 1,
    window_weights: Sequence[float] | None = None,
    gradient: str = "direct",
    optimizer: str = "adam",
) -> GradientEstimator:
    """The estimator ``name`` with its options (:func:`~controlmd.estimators.make_estimator`),
    checked against the simulation ``gradient`` path and the ``optimizer`` it will serve:
    ``mixed`` needs its last window differentiated in full, and L-BFGS's line search needs
    the gradient of the objective it compares (not a surrogate's). The one check of these
    options, for the :class:`Trainer` and the config's ``[train]`` section alike."""
    est = make_estimator(name, chunk=chunk, windows=windows, window_weights=window_weights)
    if isinstance(est, MixedEstimator):
        est.check_gradient(gradient)
    if optimizer == "lbfgs" and name in ("score", "multiwindow", "mixed"):
        raise ControlMDError(
            f"optimizer = 'lbfgs' cannot use estimator = {name!r} (its gradient is not that of "
            "the objective the line search compares); use 'pathwise' or 'forward'"
        )
    return est


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
    :param estimator: a name of :data:`controlmd.estimators.ESTIMATORS` (``pathwise``,
        ``score``, ``multiwindow``, ``mixed``, ``forward``), among those the task declares in
        ``capabilities`` (``multiwindow`` wherever ``pathwise`` applies, ``mixed`` where both
        ``pathwise`` and ``score`` do).
    :param chunk: replicas simulated and differentiated at once (0: all); the gradient is
        summed over blocks, so peak memory does not grow with ``replicas`` (``pathwise``,
        ``score``, ``multiwindow``, ``mixed``).
    :param windows: windows of the ``multiwindow`` and ``mixed`` estimators (equal shares of
        the horizon).
    :param window_weights: one weight >= 0 per window (``multiwindow``; default all 1).
    :param lr_schedule: ``constant``, ``cosine`` (to ``lr_min`` at ``schedule_iterations``),
        ``exponential`` (``lr * lr_gamma**i``) or ``step`` (``lr * lr_gamma**(i // lr_step)``).
    :param schedule_iterations: horizon of the cosine schedule (default: the ``iterations``
        of the first :meth:`learn` call).
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
        task: Task[Any],
        protocol: Protocol,
        *,
        optimizer: str = "adam",
        lr: float = 1e-2,
        replicas: int = 256,
        gradient: str = "direct",
        window: int | None = None,
        clip: float | None = None,
        estimator: str = "pathwise",
        chunk: int = 0,
        windows: int = 1,
        window_weights: Sequence[float] | None = None,
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
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("gradient", gradient, SIMULATION_GRADIENTS)
        check_choice("estimator", estimator, list(ESTIMATORS))
        check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
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
        if gradient == "adjoint" and not task.capabilities.adjoint:
            raise ControlMDError(
                f"gradient = 'adjoint' needs deterministic ODE dynamics; task {task.name!r} does not "
                "support it (capabilities.adjoint is False); use 'direct', 'checkpoint' or 'truncated'"
            )
        if schedule_iterations is not None:
            check_int("schedule_iterations", schedule_iterations)
        try:
            task.check_protocol(protocol)
        except ControlMDError as exc:
            raise ControlMDError(f"protocol {exc}") from None
        params = [p for p in protocol.parameters() if p.requires_grad] + task_parameters(task)
        if not params:
            raise ControlMDError(
                f"protocol {type(protocol).__name__} has no trainable parameters (and task {task.name!r} "
                "exposes none through parameters())"
            )
        n_params = sum(p.numel() for p in params)
        check_int("chunk", chunk, minimum=0)
        self._estimator = build_estimator(
            estimator,
            chunk=chunk,
            windows=windows,
            window_weights=window_weights,
            gradient=gradient,
            optimizer=optimizer,
        )
        self._estimator.check(task, protocol, params)
        self.task = task
        self.protocol = protocol
        self.optimizer_name = optimizer
        self.lr = float(lr)
        self.replicas = replicas
        self.gradient = gradient
        self.window = window
        self.clip = float(clip) if clip else None
        self.estimator = estimator
        self.chunk = chunk
        self.windows = windows
        self.window_weights = list(window_weights or [])
        self.lr_schedule = lr_schedule
        self.lr_min = float(lr_min)
        self.lr_gamma = float(lr_gamma)
        self.lr_step = lr_step
        self.schedule_iterations = schedule_iterations
        self._schedule_horizon = schedule_iterations
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
        task: Task[Any],
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
                chunk=t["chunk"],
                windows=t["windows"],
                window_weights=t["window_weights"] or None,
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
        T = self._schedule_horizon or 1
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (
            1.0 + math.cos(math.pi * min(iteration, T) / T)
        )

    # ------------------------------------------------------------------ training loop

    def learn(
        self,
        iterations: int,
        callbacks: Sequence[Callback] | Callback | None = None,
        *,
        progress: bool | None = None,
    ) -> Trainer:
        """Train until ``iterations`` iterations in total have been done.

        A resumed trainer (:meth:`load_state_dict`) continues from its checkpoint's
        iteration. Callbacks (:class:`controlmd.callbacks.Callback`) run after every
        iteration; one returning ``False`` stops training.

        :param progress: show a progress bar (default: when stderr is a terminal and no
            :class:`~controlmd.callbacks.ProgressBar` is among the callbacks).
        """
        check_int("iterations", iterations, minimum=0)
        if self._schedule_horizon is None:
            self._schedule_horizon = max(iterations, 1)
        given = (
            list(callbacks) if isinstance(callbacks, Sequence) else [callbacks] if callbacks else []
        )
        if progress is None:
            progress = sys.stderr.isatty() and not any(isinstance(c, ProgressBar) for c in given)
        if progress:
            given.append(ProgressBar(iterations))
        callback = CallbackList(given)
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
            for key, value in info.items():
                if key.startswith("grad_snr/"):  # per-entry |mean| / SE (e.g. per protocol piece)
                    log.record(f"train/{key}", value)
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
            estimate = self.estimate_gradient(seed, with_variance=with_variance and not info)
            objective, loss, grads = estimate.objective, estimate.loss, estimate.grads
            for p, g in zip(self.parameters(), grads):
                p.grad = g.detach().clone()
            norm = total_norm(grads)
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.parameters(), self.clip)
            if not info:
                info.update(
                    loss=float(loss),
                    objective=float(objective),
                    grad_norm=norm,
                    lr=lr,
                    **estimate.stats,
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

    def estimate_gradient(self, seed: int, *, with_variance: bool = False) -> GradientEstimate:
        """One gradient estimate of the objective at the current parameters from a batch
        seeded ``seed`` (counted in the budgets; the parameters are not updated)."""
        estimate = self._estimator.estimate(self._batch(), seed, with_variance)
        self.md_steps += estimate.md_steps
        self.grad_steps += estimate.md_steps
        return estimate

    def _batch(self) -> RolloutBatch:
        options: dict[str, Any] = {"gradient": self.gradient}
        if self.window is not None and self.gradient in ("checkpoint", "truncated"):
            options["window"] = self.window
        return RolloutBatch(
            task=self.task,
            protocol=self.protocol,
            params=self.parameters(),
            replicas=self.replicas,
            shard=self.shard,
            dist=self.dist,
            simulate_options=options,
            grad_groups=self.grad_groups,
        )

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
        with torch.no_grad():
            value = self.task.exact_metric(self.protocol)
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
            "task_state": self.task.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.protocol.load_state_dict(state["protocol"])
        with torch.no_grad():
            for p, saved in zip(task_parameters(self.task), state.get("task_parameters", [])):
                p.copy_(saved)
        self.task.load_state_dict(state.get("task_state") or {})
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.md_steps = int(state["md_steps"])
        self.grad_steps = int(state["grad_steps"])
        self.last = dict(state.get("last", {}))
        self._wall_offset = float(state["wall_s"])
        self._cpu_offset = float(state.get("cpu_s", 0.0))
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()


def task_parameters(task: Task[Any]) -> list[nn.Parameter]:
    """Trainable parameters a task owns (its :meth:`~controlmd.tasks.Task.parameters`): a
    learning task's Hamiltonian (``rdf_inverse``'s pair potential), optimized together with
    the protocol's (kind ``none`` when the task has no control channels)."""
    return [p for p in task.parameters() if p.requires_grad]
