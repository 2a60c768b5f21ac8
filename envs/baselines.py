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

Budget: the tracker counts training forward replica-steps only (evaluations are counted
apart, ``eval_md_steps``, and not charged), and stops a method when its next unit of work
(a PPO/SAC vector step, a trainer iteration, a search generation: the largest seen so
far) would exceed the budget, or when the wall cap is reached; no run exceeds the
budget. Learning curve: the start, then an evaluation at the first unit-of-work boundary
(trainer iteration, PPO/SAC rollout, search generation) at or after each threshold of
:func:`eval_thresholds` (log-spaced, 2 per decade of training MD steps, plus the end), all
on the same held-out replicas with the task's exact metric. A policy observing time only
is evaluated as the ``K``-piece protocol of its deterministic actions (the env replays such
a protocol exactly); a feedback policy by batched env rollouts. Actions outside [-1, 1] by
float rounding are clipped (gymnasium's convention for ``Box`` actions); a NaN action is
an error naming the method and the training MD step.
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
from controlmd.search import (
    CMAES,
    PROTOCOL_MARGIN,
    ProtocolSearch,
    RandomSearch,
    actions_to_protocol,
)
from controlmd.tasks.base import Task
from controlmd.trainer import Trainer
from controlmd_envs.control_env import ReplicaBatch

__all__ = [
    "ALGOS",
    "PROTOCOL_MARGIN",
    "VEC_ENVS",
    "BudgetTracker",
    "CurvePoint",
    "PolicyEvaluable",
    "checked_actions",
    "eval_thresholds",
    "evaluate_policy",
    "make_vec_env",
    "policy_protocol",
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
    """One evaluation on the held-out replicas.

    ``md_steps``: training MD replica-steps spent so far (evaluations excluded);
    ``cpu_s`` / ``wall_s``: CPU and wall seconds of training so far (forward and backward
    passes, evaluations excluded); ``metric`` / ``se``: the exact metric's mean and
    standard error over ``replicas``.
    """

    md_steps: int
    cpu_s: float
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


def checked_actions(actions: Any, *, method: str, md_steps: int) -> np.ndarray:
    """A policy's normalized actions as float64, clipped to ``[-1, 1]`` (gymnasium's
    convention for ``Box`` actions: values outside by float rounding are clipped).

    :raises ControlMDError: a NaN action, naming the method and the training MD step.
    """
    a = np.asarray(actions, dtype=np.float64)
    if np.isnan(a).any():
        raise ControlMDError(
            f"{method}: the policy's action is NaN at training MD step {md_steps} "
            f"(actions {np.array2string(a.reshape(-1), precision=4, threshold=20)})"
        )
    return np.clip(a, -1.0, 1.0)


def policy_protocol(actions: Any, task: Task, *, method: str, md_steps: int) -> PiecewiseConstant:
    """The ``K``-piece protocol of a time-only policy's actions ``[K, k]`` (clipped, see
    :func:`checked_actions` and :data:`PROTOCOL_MARGIN`)."""
    a = checked_actions(actions, method=method, md_steps=md_steps)
    return actions_to_protocol(a, task)


def evaluate_policy(
    task: Task,
    candidate: PolicyEvaluable,
    n_replicas: int,
    seed: int,
    *,
    chunk: int,
    method: str = "policy",
    md_steps: int = 0,
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
            raw = np.asarray(candidate.policy(obs), dtype=np.float64).reshape(b, -1)
            actions = checked_actions(raw, method=method, md_steps=md_steps)
            obs, _, _, terms = batch.step(actions)
        values.append(terms["metric"])
        done += b
    v = np.concatenate(values)
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0
    return Evaluation(float(v.mean()), se, int(v.size), int(v.size) * task.n_steps)


def eval_thresholds(first_unit: int, budget: int, per_decade: int = 2) -> list[int]:
    """Training-MD-step thresholds of the learning curve: the first unit of work, then
    ``10^(j / per_decade)`` above it and below ``budget``, then ``budget``.

    >>> eval_thresholds(640, 200_000)
    [640, 1000, 3162, 10000, 31622, 100000, 200000]
    """
    first_unit = max(int(first_unit), 1)
    out = [first_unit]
    j = math.floor(per_decade * math.log10(first_unit)) + 1
    while (t := int(10.0 ** (j / per_decade))) < budget:
        if t > out[-1]:
            out.append(t)
        j += 1
    if budget > out[-1]:
        out.append(int(budget))
    return out


class BudgetTracker:
    """Counts a method's training MD steps, evaluates it on schedule and says when to stop.

    Budget: ``budget_md_steps`` training forward replica-steps; evaluations are counted
    separately (``eval_md_steps``) and not charged to it. A method stops when its next
    unit of work (the largest seen so far) would exceed the budget, or at the wall cap.

    Learning curve: the start (0 training steps), then one evaluation at the first
    unit-of-work boundary (a :meth:`step` call) at or after each threshold of
    :func:`eval_thresholds` (2 per decade from the first unit to the budget), and one at
    the end (:meth:`finish`), all on the same ``eval_replicas`` held-out replicas
    (``eval_seed``, common to every method and seed), with the task's exact metric. The
    final evaluation uses ``final_replicas`` other replicas (``final_seed``).

    :param task: the task.
    :param budget_md_steps: training forward replica-steps allowed.
    :param eval_replicas: replicas of each curve evaluation.
    :param final_replicas: replicas of the final evaluation.
    :param eval_seed: batch seed of the curve evaluations (the same for every method).
    :param final_seed: batch seed of the final evaluation.
    :param wall_cap_s: wall-time cap of the run (s, evaluations included).
    :param chunk: replicas simulated at once during evaluations.
    :param initial: the evaluation of the common starting protocol, if already done.
    :param logger: where ``eval/metric``, ``eval/metric_se``, ``eval/cpu_s`` and
        ``eval/wall_s`` go, at step = training MD replica-steps.
    :param method: the method's name (error messages).
    :param evals_per_decade: thresholds per decade of training MD steps.
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
        wall_cap_s: float,
        chunk: int = 1024,
        initial: Evaluation | None = None,
        logger: Logger | None = None,
        method: str = "method",
        evals_per_decade: int = 2,
    ) -> None:
        if budget_md_steps < 1:
            raise ControlMDError(f"budget_md_steps must be >= 1, got {budget_md_steps}")
        self.task = task
        self.budget = int(budget_md_steps)
        self.eval_replicas = eval_replicas
        self.final_replicas = final_replicas
        self.eval_seed = eval_seed
        self.final_seed = final_seed
        self.wall_cap_s = float(wall_cap_s)
        self.chunk = chunk
        self.method = method
        self.evals_per_decade = evals_per_decade
        self.logger = logger if logger is not None else Logger()
        self.thresholds: list[int] | None = None
        self.unit = 0
        self.train_md_steps = 0
        self.eval_md_steps = 0
        self.grad_steps = 0
        self.eval_cpu_s = 0.0
        self.eval_wall_s = 0.0
        self.points: list[CurvePoint] = []
        self.final: CurvePoint | None = None
        self.stop_reason: str | None = None
        self._initial = initial
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()

    @property
    def md_steps(self) -> int:
        """Training MD replica-steps spent so far (the budget's measure)."""
        return self.train_md_steps

    @property
    def wall_s(self) -> float:
        """Wall seconds since :meth:`start`, evaluations included."""
        return time.perf_counter() - self._t0

    @property
    def train_wall_s(self) -> float:
        """Wall seconds of training (evaluations excluded)."""
        return self.wall_s - self.eval_wall_s

    @property
    def train_cpu_s(self) -> float:
        """CPU seconds of this process spent training (forward and backward passes;
        evaluations excluded; subprocess env workers not included)."""
        return time.process_time() - self._c0 - self.eval_cpu_s

    def start(self, initial: Evaluable) -> None:
        """Start the clocks and evaluate the starting point (0 training steps)."""
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()
        if self._initial is not None:
            self._record(self._initial)
        else:
            self.evaluate(initial)

    def exhausted(self) -> bool:
        """True once the next unit of training (the largest seen so far) would exceed the
        budget, or the wall cap is reached."""
        if self.unit and self.train_md_steps + self.unit > self.budget:
            self.stop_reason = "budget"
        elif self.wall_s >= self.wall_cap_s:
            self.stop_reason = "wall_cap"
        return self.stop_reason is not None

    def count(self, train_md_steps: int, grad_steps: int = 0) -> bool:
        """Report the method's training steps so far (a unit of work ended).

        :return: whether the method may go on.
        """
        self.unit = max(self.unit, int(train_md_steps) - self.train_md_steps)
        self.train_md_steps = int(train_md_steps)
        self.grad_steps = int(grad_steps)
        if self.thresholds is None and self.unit > 0:
            self.thresholds = eval_thresholds(self.unit, self.budget, self.evals_per_decade)
        return not self.exhausted()

    def evaluate_due(self, current: Callable[[], Evaluable]) -> None:
        """Evaluate ``current()`` if the training steps crossed the next threshold."""
        if not self.thresholds or self.train_md_steps < self.thresholds[0]:
            return
        while self.thresholds and self.train_md_steps >= self.thresholds[0]:
            self.thresholds.pop(0)
        if self.points and self.points[-1].md_steps == self.train_md_steps:
            return
        self.evaluate(current())

    def step(
        self, train_md_steps: int, current: Callable[[], Evaluable], grad_steps: int = 0
    ) -> bool:
        """:meth:`count`, then :meth:`evaluate_due` (a unit-of-work boundary).

        :return: whether the method may go on.
        """
        self.count(train_md_steps, grad_steps)
        self.evaluate_due(current)
        return not self.exhausted()

    def evaluate(self, candidate: Evaluable, *, final: bool = False) -> Evaluation:
        """The exact metric of ``candidate`` on the curve (or final) replicas; its cost
        goes to ``eval_md_steps`` and its time is not charged to training."""
        n, seed = (
            (self.final_replicas, self.final_seed)
            if final
            else (self.eval_replicas, self.eval_seed)
        )
        w0, c0 = time.perf_counter(), time.process_time()
        if isinstance(candidate, PolicyEvaluable):
            result = evaluate_policy(
                self.task,
                candidate,
                n,
                seed,
                chunk=self.chunk,
                method=self.method,
                md_steps=self.train_md_steps,
            )
        else:
            result = evaluate(self.task, candidate, n, seed, chunk=self.chunk)
        self.eval_wall_s += time.perf_counter() - w0
        self.eval_cpu_s += time.process_time() - c0
        return self._record(result, final=final)

    def finish(self, candidate: Evaluable) -> CurvePoint:
        """The end of training: the last curve point (unless one was just taken) and the
        final evaluation (``final_replicas``, ``final_seed``)."""
        self.stop_reason = self.stop_reason or "done"
        if not self.points or self.points[-1].md_steps != self.train_md_steps:
            self.evaluate(candidate)
        self.evaluate(candidate, final=True)
        assert self.final is not None
        return self.final

    def _record(self, result: Evaluation, *, final: bool = False) -> Evaluation:
        self.eval_md_steps += result.md_steps
        point = CurvePoint(
            self.train_md_steps,
            self.train_cpu_s,
            self.train_wall_s,
            result.mean,
            result.se,
            result.n,
        )
        if final:
            self.final = point
            return result
        self.points.append(point)
        self.logger.record("eval/metric", result.mean)
        self.logger.record("eval/metric_se", result.se)
        self.logger.record("eval/cpu_s", point.cpu_s)
        self.logger.record("eval/wall_s", point.wall_s)
        self.logger.dump(self.train_md_steps)
        return result

    def summary(self) -> dict[str, Any]:
        """The run's record: budgets, eval costs, the curve and the final evaluation."""
        return {
            "md_steps": self.train_md_steps,
            "eval_md_steps": self.eval_md_steps,
            "grad_steps": self.grad_steps,
            "cpu_s": self.train_cpu_s,
            "wall_s": self.wall_s,
            "eval_cpu_s": self.eval_cpu_s,
            "eval_wall_s": self.eval_wall_s,
            "stop_reason": self.stop_reason,
            "curve": [asdict(p) for p in self.points],
            "final": None if self.final is None else asdict(self.final),
        }


def run_logger(run_dir: Path) -> Logger:
    """The tracker's logger of a run folder: TensorBoard (``tb/``) and ``progress.jsonl``."""
    return Logger([TensorBoardSink(run_dir / "tb"), JSONLinesSink(run_dir / "progress.jsonl")])


def _midpoint_protocol(task: Task, n_pieces: int) -> PiecewiseConstant:
    return actions_to_protocol(np.zeros((n_pieces, task.controls.dim)), task)


class _MDStepLogger(Logger):
    """A logger whose ``dump`` writes at x = ``md_steps()`` (training MD replica-steps)
    whatever step its caller gives (the trainer dumps at its iteration)."""

    def __init__(self, sinks: list[Any], md_steps: Callable[[], int]) -> None:
        super().__init__(sinks)
        self._md_steps = md_steps

    def dump(self, step: int) -> None:
        super().dump(self._md_steps())


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

    The trainer is built by :meth:`controlmd.trainer.Trainer.from_config` from the
    resolved ``[train]`` keys (``iterations`` only sets the horizon of the lr schedule;
    the budget ends training). Its ``train/...`` scalars go to ``tb/`` at x = training MD
    replica-steps.
    """
    protocol = _midpoint_protocol(task, n_pieces)
    holder: list[Trainer] = []
    logger = _MDStepLogger(
        [TensorBoardSink(run_dir / "tb")], lambda: holder[0].md_steps if holder else 0
    )
    trainer = Trainer.from_config(
        {"experiment": {"seed": seed}, "train": train}, task, protocol, logger=logger
    )
    holder.append(trainer)
    callbacks: list[Callback] = [_TrackerCallback(tracker)]
    abort_after = AbortAfter.from_env()  # CONTROLMD_ABORT_AFTER: a hard exit, for resume tests
    if abort_after is not None:
        callbacks.append(abort_after)
    tracker.start(protocol)
    if not tracker.exhausted():
        trainer.learn(2**62, callbacks, progress=False)
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
    (``random_search``: ``replicas``, ``batch``) until the tracker stops it (a generation
    is the unit of work). ``train/best_metric`` (the best candidate's metric on its
    training batch) goes to ``tb/`` at x = training MD replica-steps."""
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
    logger = Logger([TensorBoardSink(run_dir / "tb")])

    def generation(s: ProtocolSearch) -> bool:
        # the best training-batch metric so far (task sign), at x = training MD steps
        logger.record("train/best_metric", -s.sign * s.best_score)
        logger.dump(s.md_steps)
        return tracker.step(s.md_steps, s.incumbent)

    tracker.start(_midpoint_protocol(task, n_pieces))
    if not tracker.exhausted():
        search.learn(2**62, generation)
    logger.close()
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
        "report_start_value": False,  # the harness writes the start value itself
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
    method: str | None = None,
) -> Evaluable:
    """PPO or SAC (stable-baselines3, ``MlpPolicy``) on the vector env :func:`make_vec_env`.

    Every vector step is counted (the budget stops training between two); the policy is
    evaluated at the start of a rollout (after a policy update: the unit of work) once a
    threshold is crossed. SB3's ``train/``, ``rollout/`` scalars go to ``tb/`` at x =
    training MD replica-steps (``num_timesteps * control_interval``).

    :param env: :data:`ENV_KEYS` settings (``n_envs`` replicas; ``vec_env`` how they are stepped).
    :param params: keyword arguments of the SB3 algorithm.
    :param method: the method's name in error messages (default: ``algo``).
    :return: the trained policy as a ``K``-piece protocol (time-only observations) or a
        :class:`PolicyEvaluable`.
    :raises ControlMDError: a NaN action (during training or evaluation), naming the
        method and the training MD step.
    """
    import gymnasium as gym
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Logger as SB3Logger
    from stable_baselines3.common.logger import TensorBoardOutputFormat
    from stable_baselines3.common.vec_env import VecMonitor

    name = method or algo

    class _MDStepTensorBoard(TensorBoardOutputFormat):
        # SB3 dumps at step = env steps of all envs; one env step is control_interval MD steps
        def write(self, key_values: Any, key_excluded: Any, step: int = 0) -> None:
            super().write(key_values, key_excluded, step * control_interval)

    venv = make_vec_env(task, env, control_interval=control_interval, seed=seed)
    try:
        cls = {"ppo": PPO, "sac": SAC}[algo]
        model = cls("MlpPolicy", VecMonitor(venv), seed=seed, device="cpu", verbose=0, **params)
        model.set_logger(SB3Logger(str(run_dir / "tb"), [_MDStepTensorBoard(str(run_dir / "tb"))]))
        _zero_mean_action(model)
        K = task.n_steps // control_interval

        def current() -> Evaluable:
            if env["observation"] == "time":
                grid = (np.arange(K, dtype=np.float32) / K).reshape(K, 1)
                actions, _ = model.predict(grid, deterministic=True)
                return policy_protocol(actions, task, method=name, md_steps=tracker.md_steps)
            return PolicyEvaluable(
                lambda obs: model.predict(obs.astype(np.float32), deterministic=True)[0],
                control_interval,
                env["observation"],
                env["feature_scale"],
            )

        class _Budget(BaseCallback):
            # every env step of every env simulates control_interval MD steps of one replica
            def _on_step(self) -> bool:
                return tracker.count(self.num_timesteps * control_interval)

            def _on_rollout_start(self) -> None:
                tracker.evaluate_due(current)

        tracker.start(current())
        if not tracker.exhausted():
            try:
                model.learn(
                    total_timesteps=max(tracker.budget // control_interval, 1), callback=_Budget()
                )
            except gym.error.InvalidAction as exc:
                raise ControlMDError(
                    f"{name}: invalid action at training MD step {tracker.md_steps}: {exc}"
                ) from None
        model.save(run_dir / "model.zip")
        result = current()
    finally:
        venv.close()
    if isinstance(result, Protocol):
        result.save(run_dir / "protocol.pt")
        result.write_table(run_dir / "protocol.csv")
    return result
