"""Baselines of the equal-budget comparison, each run under one :class:`BudgetTracker`.

=================  ==========================================================================
algo               what is optimized
=================  ==========================================================================
``gradient``       a ``K``-piece protocol by :class:`controlmd.trainer.Trainer` (gradients
                   through the simulation)
``ppo``, ``sac``   a stable-baselines3 policy on :class:`~controlmd_envs.vec_env.BatchedControlVecEnv`
                   (``vec_env = "batched"``, the default) or ``SubprocVecEnv`` / ``DummyVecEnv``
``cma_es``         the ``K x k`` normalized piece values by CMA-ES (:class:`controlmd.search.CMAES`)
``random_search``  the same values by uniform random search (:class:`controlmd.search.RandomSearch`)
=================  ==========================================================================

Every method starts from the middle of the control bounds (normalized action 0: a fresh
RL policy's mean, CMA-ES's ``x0``, random search's first candidate, a fresh
``PiecewiseConstant``) and controls the same ``K`` pieces.

Budget: the tracker counts every forward replica-step, training and evaluation alike,
and stops a method when its next unit of work (a PPO/SAC vector step, a trainer
iteration, a search generation: the largest seen so far) plus the final evaluation would
exceed the budget, or when the wall cap is reached; no run exceeds the budget, and each
ends within one unit (plus one skipped evaluation) of it. Evaluations (the task's exact metric on the
same held-out replicas for every method) happen each time the spent budget crosses the
next of ``eval_points`` log-spaced thresholds. A policy observing time only is evaluated
as the ``K``-piece protocol of its deterministic actions (the env replays such a protocol
exactly); a feedback policy by batched env rollouts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from controlmd.callbacks import AbortAfter, Callback
from controlmd.errors import ControlMDError
from controlmd.evaluation import Evaluation, evaluate
from controlmd.logger import JSONLinesSink, Logger, TensorBoardSink
from controlmd.protocols import PiecewiseConstant, Protocol
from controlmd.search import CMAES, ProtocolSearch, RandomSearch, actions_to_protocol
from controlmd.tasks.base import Task
from controlmd.trainer import Trainer
from controlmd_envs.control_env import ReplicaBatch

__all__ = [
    "ALGOS",
    "VEC_ENVS",
    "BudgetTracker",
    "CurvePoint",
    "PolicyEvaluable",
    "make_vec_env",
    "run_gradient",
    "run_sb3",
    "run_search",
]

ALGOS = ("gradient", "ppo", "sac", "cma_es", "random_search")
ENV_KEYS = (
    "n_envs",
    "vec_env",
    "observation",
    "shaping",
    "shaping_gamma",
    "reward_scale",
    "feature_scale",
)
"""Keys of an RL method's section that configure the env rather than the algorithm."""
VEC_ENVS = ("batched", "subproc", "dummy")
"""How an RL method's ``n_envs`` environments are stepped (``vec_env``): ``batched``, all
replicas as one batched simulation in this process
(:class:`~controlmd_envs.vec_env.BatchedControlVecEnv`, one simulation call per control
interval); ``subproc``, one :class:`~controlmd_envs.control_env.ControlEnv` per worker
process (stable-baselines3's ``SubprocVecEnv``: the simulations run in parallel, for tasks
whose single replica is expensive); ``dummy``, the same envs one after another in this
process (``DummyVecEnv``, for debugging)."""


@dataclass
class CurvePoint:
    """One evaluation: total MD replica-steps and wall time spent so far, the metric."""

    md_steps: int
    wall_s: float
    metric: float
    se: float
    replicas: int


@dataclass
class PolicyEvaluable:
    """A feedback policy ``obs [B, n_obs] -> actions [B, k]`` and the env settings it observes."""

    policy: Callable[[np.ndarray], np.ndarray]
    control_interval: int
    observation: str
    feature_scale: Any = 1.0


Evaluable = Protocol | PolicyEvaluable


def evaluate_policy(
    task: Task, candidate: PolicyEvaluable, n_replicas: int, seed: int, *, chunk: int
) -> Evaluation:
    """Exact metric of a policy over ``n_replicas`` env episodes (replica ``i`` of batch ``seed``)."""
    batch = ReplicaBatch(
        task,
        control_interval=candidate.control_interval,
        observation=candidate.observation,
        feature_scale=candidate.feature_scale,
    )
    values: list[np.ndarray] = []
    done = 0
    while done < n_replicas:
        b = min(chunk, n_replicas - done)
        obs = batch.reset(b, seed, first_replica=done)
        terms: dict[str, np.ndarray] = {}
        while not batch.done:
            actions = np.clip(
                np.asarray(candidate.policy(obs), dtype=np.float64).reshape(b, -1), -1.0, 1.0
            )
            obs, _, _, terms = batch.step(actions)
        values.append(terms["metric"])
        done += b
    v = np.concatenate(values)
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0
    return Evaluation(float(v.mean()), se, int(v.size), int(v.size) * task.n_steps)


class BudgetTracker:
    """Counts a method's MD steps, evaluates it on schedule and says when to stop.

    :param task: the task.
    :param budget_md_steps: total forward replica-steps allowed, evaluations included.
    :param eval_replicas: replicas of each scheduled evaluation.
    :param final_replicas: replicas of the final evaluation (its cost is reserved).
    :param eval_seed: batch seed of the scheduled evaluations (the same for every method).
    :param final_seed: batch seed of the final evaluation.
    :param eval_points: scheduled evaluations: the initial one, then one each time the
        spent steps cross ``B_train * 2^-(eval_points - 1 - j)``, ``j = 1 .. eval_points - 2``
        (``B_train`` = budget minus the final evaluation), then the final one.
    :param wall_cap_s: wall-time cap of the run (s).
    :param chunk: replicas simulated at once during evaluations.
    :param initial: the evaluation of the common starting protocol, if already done (its
        cost is charged all the same; it is identical for every run).
    :param logger: where ``compare/metric``, ``compare/metric_se`` and ``compare/wall_s``
        go, at step = MD steps spent.
    """

    def __init__(
        self,
        task: Task,
        *,
        budget_md_steps: int,
        eval_replicas: int,
        final_replicas: int,
        eval_seed: int,
        final_seed: int,
        eval_points: int,
        wall_cap_s: float,
        chunk: int = 1024,
        initial: Evaluation | None = None,
        logger: Logger | None = None,
    ) -> None:
        self.task = task
        self.budget = int(budget_md_steps)
        self.eval_replicas = eval_replicas
        self.final_replicas = final_replicas
        self.eval_seed = eval_seed
        self.final_seed = final_seed
        self.wall_cap_s = float(wall_cap_s)
        self.chunk = chunk
        self.logger = logger if logger is not None else Logger()
        self.final_cost = final_replicas * task.n_steps
        trainable = self.budget - self.final_cost
        if trainable <= eval_replicas * task.n_steps:
            raise ControlMDError(
                f"budget_md_steps = {self.budget} leaves nothing to train after the initial evaluation "
                f"({eval_replicas} x {task.n_steps}) and the final one ({final_replicas} x {task.n_steps})"
            )
        self.thresholds = [
            int(trainable * 2.0 ** -(eval_points - 1 - j)) for j in range(1, eval_points - 1)
        ]
        self.eval_cost = eval_replicas * task.n_steps
        self.unit = 0
        self.train_md_steps = 0
        self.eval_md_steps = 0
        self.grad_steps = 0
        self.points: list[CurvePoint] = []
        self.final: CurvePoint | None = None
        self.stop_reason: str | None = None
        self._initial = initial
        self._t0 = time.perf_counter()

    @property
    def md_steps(self) -> int:
        """Everything spent so far: training plus evaluation replica-steps."""
        return self.train_md_steps + self.eval_md_steps

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self._t0

    def start(self, initial: Evaluable) -> None:
        """Start the clock and evaluate the starting point."""
        self._t0 = time.perf_counter()
        if self._initial is not None:
            self._record(self._initial)
        else:
            self.evaluate(initial)

    def exhausted(self) -> bool:
        """True once the next unit of training (the largest seen so far) and the final
        evaluation would no longer fit in the budget, or the wall cap is reached."""
        if self.md_steps + self.unit + self.final_cost > self.budget:
            self.stop_reason = "budget"
        elif self.wall_s >= self.wall_cap_s:
            self.stop_reason = "wall_cap"
        return self.stop_reason is not None

    def step(
        self, train_md_steps: int, current: Callable[[], Evaluable], grad_steps: int = 0
    ) -> bool:
        """Report the method's training steps so far; evaluate ``current()`` when due (and
        when it fits in the budget).

        :return: whether the method may go on.
        """
        self.unit = max(self.unit, int(train_md_steps) - self.train_md_steps)
        self.train_md_steps = int(train_md_steps)
        self.grad_steps = int(grad_steps)
        if self.thresholds and self.md_steps >= self.thresholds[0]:
            while self.thresholds and self.md_steps >= self.thresholds[0]:
                self.thresholds.pop(0)
            if self.md_steps + self.eval_cost + self.final_cost <= self.budget:
                self.evaluate(current())
        return not self.exhausted()

    def evaluate(self, candidate: Evaluable, *, final: bool = False) -> Evaluation:
        n, seed = (
            (self.final_replicas, self.final_seed)
            if final
            else (self.eval_replicas, self.eval_seed)
        )
        if isinstance(candidate, PolicyEvaluable):
            result = evaluate_policy(self.task, candidate, n, seed, chunk=self.chunk)
        else:
            result = evaluate(self.task, candidate, n, seed, chunk=self.chunk)
        return self._record(result, final=final)

    def finish(self, candidate: Evaluable) -> CurvePoint:
        """The final evaluation (``final_replicas``, ``final_seed``), counted in the budget."""
        self.stop_reason = self.stop_reason or "done"
        self.evaluate(candidate, final=True)
        assert self.final is not None
        return self.final

    def _record(self, result: Evaluation, *, final: bool = False) -> Evaluation:
        self.eval_md_steps += result.md_steps
        point = CurvePoint(self.md_steps, self.wall_s, result.mean, result.se, result.n)
        if final:
            self.final = point
        else:
            self.points.append(point)
        self.logger.record("compare/metric", result.mean)
        self.logger.record("compare/metric_se", result.se)
        self.logger.record("compare/wall_s", point.wall_s)
        self.logger.dump(self.md_steps)
        return result

    def summary(self) -> dict[str, Any]:
        return {
            "md_steps": self.md_steps,
            "train_md_steps": self.train_md_steps,
            "eval_md_steps": self.eval_md_steps,
            "grad_steps": self.grad_steps,
            "wall_s": self.wall_s,
            "stop_reason": self.stop_reason,
            "curve": [asdict(p) for p in self.points],
            "final": None if self.final is None else asdict(self.final),
        }


def run_logger(run_dir: Path) -> Logger:
    """The tracker's logger of a run folder: TensorBoard (``tb/``) and ``progress.jsonl``."""
    return Logger([TensorBoardSink(run_dir / "tb"), JSONLinesSink(run_dir / "progress.jsonl")])


def _midpoint_protocol(task: Task, n_pieces: int) -> PiecewiseConstant:
    return actions_to_protocol(np.zeros((n_pieces, task.controls.dim)), task)


class _TrackerCallback(Callback):
    """Trainer callback: report steps to the tracker, stop when it says so."""

    def __init__(self, tracker: BudgetTracker) -> None:
        self.tracker = tracker

    def on_step(self) -> bool:
        t = self.trainer
        return self.tracker.step(t.md_steps, lambda: t.protocol, grad_steps=t.grad_steps)


def run_gradient(
    task: Task,
    tracker: BudgetTracker,
    *,
    train: dict[str, Any],
    n_pieces: int,
    seed: int,
    run_dir: Path,
) -> Protocol:
    """Gradient-based training of a ``K``-piece protocol until the tracker stops it.

    :param train: resolved ``[train]`` keys of the trainer (``iterations`` only sets the
        horizon of the cosine schedule; the budget ends training).
    """
    protocol = _midpoint_protocol(task, n_pieces)
    logger = Logger([TensorBoardSink(run_dir / "tb")])
    trainer = Trainer(
        task,
        protocol,
        optimizer=train["optimizer"],
        lr=train["lr"],
        replicas=train["replicas"],
        gradient=train["gradient"],
        window=train["window"] or None,
        clip=train["clip"] or None,
        estimator=train["estimator"],
        lr_schedule=train["lr_schedule"],
        lr_min=train["lr_min"],
        lr_gamma=train["lr_gamma"],
        lr_step=train["lr_step"],
        schedule_iterations=max(train["iterations"], 1),
        momentum=train["momentum"],
        weight_decay=train["weight_decay"],
        lbfgs_max_iter=train["lbfgs_max_iter"],
        frozen_noise=train["frozen_noise"],
        grad_groups=train["grad_groups"],
        variance_every=train["variance_every"],
        seed=seed,
        logger=logger,
    )
    callbacks: list[Callback] = [_TrackerCallback(tracker)]
    abort_after = AbortAfter.from_env()  # CONTROLMD_ABORT_AFTER: a hard exit, for resume tests
    if abort_after is not None:
        callbacks.append(abort_after)
    tracker.start(protocol)
    if not tracker.exhausted():
        trainer.learn(2**62, callbacks)
    logger.close()
    protocol.save(run_dir / "protocol.pt")
    protocol.write_table(run_dir / "protocol.csv")
    return protocol


def run_search(
    algo: str,
    task: Task,
    tracker: BudgetTracker,
    *,
    params: dict[str, Any],
    n_pieces: int,
    seed: int,
    run_dir: Path,
) -> Protocol:
    """CMA-ES (``cma_es``: ``replicas``, ``sigma0``, ``popsize``) or random search
    (``random_search``: ``replicas``, ``batch``) until the tracker stops it."""
    search: ProtocolSearch
    if algo == "cma_es":
        search = CMAES(
            task,
            n_pieces=n_pieces,
            replicas=params["replicas"],
            seed=seed,
            sigma0=params["sigma0"],
            popsize=params["popsize"] or None,
        )
    elif algo == "random_search":
        search = RandomSearch(
            task, n_pieces=n_pieces, replicas=params["replicas"], seed=seed, batch=params["batch"]
        )
    else:
        raise ControlMDError(f"unknown search algo {algo!r}; expected cma_es or random_search")
    tracker.start(_midpoint_protocol(task, n_pieces))
    if not tracker.exhausted():
        search.learn(2**62, lambda s: tracker.step(s.md_steps, s.incumbent))
    protocol = search.incumbent()
    protocol.save(run_dir / "protocol.pt")
    protocol.write_table(run_dir / "protocol.csv")
    return protocol


def _zero_mean_action(model: Any) -> None:
    """Zero the layer that outputs the policy's mean action, so that a fresh policy's
    deterministic action is 0 (the middle of the bounds, the common start); its
    gradients are not zero, so it trains as usual."""
    layer = model.actor.mu if hasattr(model, "actor") else model.policy.action_net
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()


class _ControlEnvFactory:
    """Picklable ``() -> ControlEnv`` of one sub-environment (built in its worker process)."""

    def __init__(self, task: Task, settings: dict[str, Any], threads: int | None) -> None:
        self.task, self.settings, self.threads = task, settings, threads

    def __call__(self) -> Any:
        from controlmd_envs.control_env import ControlEnv

        if self.threads is not None:  # a SubprocVecEnv worker: one core's worth of torch threads
            torch.set_num_threads(self.threads)
        return ControlEnv(self.task, **self.settings)


def make_vec_env(task: Task, env: dict[str, Any], *, control_interval: int, seed: int) -> Any:
    """The stable-baselines3 ``VecEnv`` of an RL method's env settings.

    :param env: :data:`ENV_KEYS` settings; ``vec_env`` (default ``batched``) picks one of
        :data:`VEC_ENVS`, ``n_envs`` the number of environments.
    :param seed: the batched env's first batch seed (replica ``i``: ``replica_seed(seed, i)``);
        ``subproc`` / ``dummy`` envs are seeded by stable-baselines3 (env ``i``: ``seed + i``)
        when the algorithm is built with ``seed``.
    """
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    from controlmd_envs.vec_env import BatchedControlVecEnv

    kind = env.get("vec_env", "batched")
    settings = {
        "control_interval": control_interval,
        "observation": env["observation"],
        "shaping": env["shaping"],
        "shaping_gamma": env["shaping_gamma"],
        "reward_scale": env["reward_scale"],
        "feature_scale": env["feature_scale"],
    }
    if kind == "batched":
        return BatchedControlVecEnv(task, env["n_envs"], seed=seed, **settings)
    if kind == "subproc":
        return SubprocVecEnv([_ControlEnvFactory(task, settings, 1) for _ in range(env["n_envs"])])
    if kind == "dummy":
        return DummyVecEnv([_ControlEnvFactory(task, settings, None) for _ in range(env["n_envs"])])
    raise ControlMDError(f"vec_env: unknown value {kind!r}; expected one of: {', '.join(VEC_ENVS)}")


def run_sb3(
    algo: str,
    task: Task,
    tracker: BudgetTracker,
    *,
    env: dict[str, Any],
    params: dict[str, Any],
    control_interval: int,
    seed: int,
    run_dir: Path,
) -> Evaluable:
    """PPO or SAC (stable-baselines3, ``MlpPolicy``) on the vector env :func:`make_vec_env`.

    :param env: :data:`ENV_KEYS` settings (``n_envs`` replicas; ``vec_env`` how they are stepped).
    :param params: keyword arguments of the SB3 algorithm.
    :return: the trained policy as a ``K``-piece protocol (time-only observations) or a
        :class:`PolicyEvaluable`.
    """
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.vec_env import VecMonitor

    venv = make_vec_env(task, env, control_interval=control_interval, seed=seed)
    try:
        cls = {"ppo": PPO, "sac": SAC}[algo]
        model = cls("MlpPolicy", VecMonitor(venv), seed=seed, device="cpu", verbose=0, **params)
        model.set_logger(configure(str(run_dir / "tb"), ["tensorboard"]))
        _zero_mean_action(model)
        K = task.n_steps // control_interval

        def current() -> Evaluable:
            if env["observation"] == "time":
                grid = (np.arange(K, dtype=np.float32) / K).reshape(K, 1)
                actions, _ = model.predict(grid, deterministic=True)
                return actions_to_protocol(
                    np.clip(np.asarray(actions, dtype=np.float64), -1.0, 1.0), task
                )
            return PolicyEvaluable(
                lambda obs: model.predict(obs.astype(np.float32), deterministic=True)[0],
                control_interval,
                env["observation"],
                env["feature_scale"],
            )

        class _Budget(BaseCallback):
            # every env step of every env simulates control_interval MD steps of one replica
            def _on_step(self) -> bool:
                return tracker.step(self.num_timesteps * control_interval, current)

        tracker.start(current())
        if not tracker.exhausted():
            model.learn(
                total_timesteps=max(tracker.budget // control_interval, 1), callback=_Budget()
            )
        model.save(run_dir / "model.zip")
        result = current()
    finally:
        venv.close()
    if isinstance(result, Protocol):
        result.save(run_dir / "protocol.pt")
        result.write_table(run_dir / "protocol.csv")
    return result
