"""A gymnasium environment around any controlmd :class:`~controlmd.tasks.Task`.

:class:`ControlEnv` lets an agent choose the task's control ``u`` for each control interval
of ``m`` MD steps; an episode is the task's horizon, i.e. ``K = n_steps / m`` agent steps,
and controls exactly what a ``K``-piece :class:`~controlmd.protocols.PiecewiseConstant`
protocol controls. The engine underneath, :class:`ReplicaBatch`, steps ``B`` replicas as
one batched simulation with one action per replica; the single-replica env and the
stable-baselines3 vector env (:mod:`controlmd_envs.vec_env`) share it, so their episodes
are identical replica by replica.

The env talks to the task through the Task interface only (``initial_state``,
``advance``, ``metric``, ``observe``, ``controls``, ``n_steps``, ``dt``,
``higher_is_better``); units are the task's (see its module docstring).

Seeding: ``reset(seed=x)`` starts replica ``x`` of the task's batch seeded 0 (the replica
whose streams are seeded ``replica_seed(0, x) = x * 1_000_003``), so envs seeded ``s + i``
(what gymnasium's ``SyncVectorEnv`` / ``AsyncVectorEnv`` and stable-baselines3 give env
``i`` for seed ``s``) are replicas ``s .. s + B - 1`` of one batch: exactly the replicas of
the batched vector env reset with seed ``s`` (:mod:`controlmd_envs.vec_env`). ``reset()``
without a seed draws the replica from the env's ``np_random``. Envs pickle by their
constructor arguments (gymnasium's ``EzPickle``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import EzPickle

from controlmd.dynamics.base import State
from controlmd.errors import ControlMDError
from controlmd.protocols import Protocol
from controlmd.search import actions_to_protocol, protocol_to_actions
from controlmd.tasks.base import Task
from controlmd_envs.start_value import StartValue, start_value, task_key

Tensor = torch.Tensor

__all__ = [
    "ACTION_ROUNDING",
    "MAX_DEFAULT_INTERVALS",
    "OBSERVATIONS",
    "SEED_BOUND",
    "ControlEnv",
    "EpisodeControl",
    "ReplicaBatch",
    "actions_to_protocol",
    "check_actions",
    "default_control_interval",
    "make_task",
    "protocol_to_actions",
]

OBSERVATIONS = ("time", "features", "state")
"""Observation kinds: the time fraction only (open loop), plus task features, plus the state."""

MAX_DEFAULT_INTERVALS = 20
"""The default control interval gives at most this many agent steps per episode."""

SEED_BOUND = 2**32
"""Env seeds (replica indices of the seed-0 batch) are drawn below this bound: replica
``x`` draws from ``x * 1_000_003 mod 2**32`` (torch keeps 32 bits), distinct for every
``x < 2**32``."""

ACTION_ROUNDING = 1e-6
"""Actions outside [-1, 1] by at most this much (float rounding) are clipped to it
(gymnasium's convention for ``Box`` actions); farther outside is an error."""


def make_task(task: Task | str, task_kwargs: dict[str, Any] | None = None) -> Task:
    """The task itself, or the registered task ``task`` (a task name or an env id such as
    ``"controlmd/TrapDrag-v0"``) built with ``task_kwargs``.

    :raises ControlMDError: unknown task name (the message lists the valid ones), or
        ``task_kwargs`` given with a task object.
    """
    if isinstance(task, Task):
        if task_kwargs:
            raise ControlMDError(
                "task_kwargs are only used with a task name, not with a Task object"
            )
        return task
    if not isinstance(task, str):
        raise ControlMDError(
            f"task must be a controlmd Task or a registered task name, got {task!r}"
        )
    from controlmd.tasks import get_task
    from controlmd_envs import ENV_IDS

    return get_task(ENV_IDS.get(task, task), **(task_kwargs or {}))


def default_control_interval(n_steps: int, max_intervals: int = MAX_DEFAULT_INTERVALS) -> int:
    """The smallest divisor ``m`` of ``n_steps`` with ``n_steps / m <= max_intervals``."""
    for m in range(1, n_steps + 1):
        if n_steps % m == 0 and n_steps // m <= max_intervals:
            return m
    return n_steps


class EpisodeControl(Protocol):
    """Per-replica piecewise-constant control, filled in piece by piece as an episode runs.

    Piece ``j`` covers ``[j T/K, (j+1) T/K)`` and is located exactly as
    :meth:`PiecewiseConstant.piece_index` does, so an episode that sets pieces
    ``0 .. K-1`` is the same protocol as a ``K``-piece
    :class:`~controlmd.protocols.PiecewiseConstant` (for each replica). Unlike
    :class:`~controlmd.protocols.HeldControl`, which forgets the previous value, the
    dynamics still see piece ``j - 1`` at times before the boundary: tasks that evaluate
    the control at the start of a step (the work ``E(x_n, t_{n+1}) - E(x_n, t_n)`` of
    ``trap_drag``) count the jump between pieces.

    Args:
        dim: channels ``k``.
        t_final: horizon ``T``.
        n_pieces: ``K``.
        release_fraction, release_value: the release window of
            :class:`~controlmd.protocols.Protocol` (every channel switched smoothly to
            ``release_value``, the task's no-control value, over ``[T (1 - f) - 0.02 T,
            T (1 - f)]`` and held there; the agent's actions there are ignored).
    """

    values: Tensor  # buffer [B, K, k]

    def __init__(
        self,
        *,
        dim: int,
        t_final: float,
        n_pieces: int,
        release_fraction: float = 0.0,
        release_value: Tensor | None = None,
    ) -> None:
        super().__init__(
            dim=dim,
            t_final=t_final,
            release_fraction=release_fraction,
            release_value=release_value,
        )
        self.n_pieces = n_pieces
        self.register_buffer("values", torch.zeros(1, n_pieces, dim, dtype=torch.float64))

    def start(self, n_replicas: int) -> None:
        """Forget the previous episode (``B`` replicas, all pieces zero)."""
        self.values = torch.zeros(n_replicas, self.n_pieces, self.dim, dtype=torch.float64)

    def set(self, piece: int, u: Tensor) -> None:
        """Piece ``piece`` (and, until they are set, the later ones) holds ``u`` ``[B, k]``."""
        values = self.values.clone()
        values[:, piece:, :] = u.detach().to(torch.float64).unsqueeze(1)
        self.values = values

    def piece_index(self, t: Tensor) -> Tensor:
        idx = torch.floor(t / self.t_final * self.n_pieces).long()
        return idx.clamp(0, self.n_pieces - 1)

    def raw(self, t: Tensor) -> Tensor:
        raise NotImplementedError  # forward is overridden

    def forward(self, t: Tensor | float, obs: Tensor | None = None) -> Tensor:
        """``t`` 0-d -> ``[B, k]``; ``t`` ``[T]`` -> ``[T, B, k]``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim == 0:
            return self.released(t, self.values[:, self.piece_index(t)])
        t = t.reshape(-1)
        return self.released(t, self.values[:, self.piece_index(t)].transpose(0, 1))

    def released(self, t: Tensor, u: Tensor) -> Tensor:
        """``u`` (leading dimension ``t``'s, if any) with the release window applied."""
        if self.release_fraction == 0.0 or self.release_value is None:
            return u
        w = self.release_weight(t).reshape(*t.shape, *([1] * (u.ndim - t.ndim)))
        u0 = self.release_value.to(u)
        return torch.where(w >= 1.0, u0, (1.0 - w) * u + w * u0)

    def breakpoints(self) -> list[float]:
        return [self.t_final * j / self.n_pieces for j in range(1, self.n_pieces)]

    def replica(self, i: int) -> Protocol:
        """Replica ``i``'s pieces as an open-loop protocol (``t`` 0-d -> ``[k]``, ``[T]`` ->
        ``[T, k]``, like a ``K``-piece :class:`PiecewiseConstant`), e.g. for
        ``task.exact_metric``."""
        return _ReplicaPieces(self, self.values[i])


class _ReplicaPieces(Protocol):
    """The ``K`` pieces ``[K, k]`` of one replica of an :class:`EpisodeControl`."""

    values: Tensor  # buffer [K, k]

    def __init__(self, control: EpisodeControl, values: Tensor) -> None:
        super().__init__(dim=control.dim, t_final=control.t_final)
        self.n_pieces = control.n_pieces
        self.register_buffer("values", values.clone())
        self._control = control

    def raw(self, t: Tensor) -> Tensor:
        raise NotImplementedError  # forward is overridden

    def forward(self, t: Tensor | float, obs: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        u = self.values[self._control.piece_index(t.reshape(-1))].reshape(*t.shape, self.dim)
        return self._control.released(t, u)

    def breakpoints(self) -> list[float]:
        return [self.t_final * j / self.n_pieces for j in range(1, self.n_pieces)]


class ReplicaBatch:
    """``B`` replicas of one task, stepped together, each under its own held control.

    The engine of :class:`ControlEnv` (``B = 1``) and of the vector env. Actions are not
    validated here (the envs do it at their boundary).

    :param task: the task (only its public interface is used).
    :param control_interval: MD steps per action ``m``; must divide ``task.n_steps``
        (default: :func:`default_control_interval`).
    :param observation: ``"time"`` (``[t/T]``), ``"features"`` (``[t/T, tanh(f / s)]`` with
        ``f = task.observe(state)``) or ``"state"`` (``[t/T, tanh(x / s)]`` with ``x`` the
        flattened positions and, if present, momenta of one replica).
    :param shaping: weight ``w >= 0`` of the potential-based shaping term (see
        :class:`ControlEnv`).
    :param shaping_gamma: ``gamma`` of the shaping term (1: undiscounted).
    :param reward_scale: positive factor on every reward (leaves the optimum unchanged).
    :param feature_scale: ``s``, scalar or one value per observed quantity (> 0).
    :param start_key: the task's configuration under which its start value is cached
        (:func:`~controlmd_envs.start_value.start_value`; ``None``: the task object).
    :param release_fraction: ``f`` in ``[0, 0.5)``: on the last fraction ``f`` of the horizon
        every channel is the task's no-control value (``task.default_control()``), as
        ``[protocol] release_fraction`` does for a trained protocol (0: off).
    """

    def __init__(
        self,
        task: Task,
        *,
        control_interval: int | None = None,
        observation: str = "time",
        shaping: float = 0.0,
        shaping_gamma: float = 1.0,
        reward_scale: float = 1.0,
        feature_scale: float | Sequence[float] = 1.0,
        start_key: str | None = None,
        release_fraction: float = 0.0,
    ) -> None:
        if not isinstance(task, Task):
            raise ControlMDError(f"task must be a controlmd Task, got {type(task).__name__}")
        if observation not in OBSERVATIONS:
            raise ControlMDError(
                f"unknown observation {observation!r}; expected one of: {', '.join(OBSERVATIONS)}"
            )
        if task.controls.dim < 1:
            # only design tasks (rdf_inverse) name their parameters; Task does not declare it
            named = getattr(task, "named_parameters", None)
            names = [n for n, _ in named()] if named is not None else []
            raise ControlMDError(
                f"task {task.name!r} has no env: it has no time-dependent control "
                f"(controls.dim = 0) for an agent to set step by step; its parameters "
                f"({', '.join(names) or 'none'}) are fitted "
                "once for the whole simulation (a design problem: controlmd run / controlmd ibi)"
            )
        if control_interval is None:
            control_interval = default_control_interval(task.n_steps)
        if (
            isinstance(control_interval, bool)
            or not isinstance(control_interval, int)
            or control_interval < 1
        ):
            raise ControlMDError(
                f"control_interval must be a positive integer, got {control_interval!r}"
            )
        if task.n_steps % control_interval:
            raise ControlMDError(
                f"control_interval = {control_interval} must divide the task's n_steps = {task.n_steps} "
                f"(an episode is n_steps / control_interval agent steps)"
            )
        for name, value, allow_zero in (
            ("shaping", shaping, True),
            ("reward_scale", reward_scale, False),
        ):
            if not _finite_number(value) or value < 0 or (value == 0 and not allow_zero):
                raise ControlMDError(
                    f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}"
                )
        if not _finite_number(shaping_gamma) or not 0.0 < shaping_gamma <= 1.0:
            raise ControlMDError(f"shaping_gamma must be in (0, 1], got {shaping_gamma!r}")
        self.task = task
        self.start_key = start_key
        self.control_interval = control_interval
        self.n_intervals = task.n_steps // control_interval
        self.observation = observation
        self.shaping = float(shaping)
        self.shaping_gamma = float(shaping_gamma)
        self.reward_scale = float(reward_scale)
        self.sign = 1.0 if task.higher_is_better else -1.0
        self.action_dim = task.controls.dim
        self.low = task.controls.low_tensor()
        self.high = task.controls.high_tensor()
        if not _finite_number(release_fraction):
            raise ControlMDError(
                f"release_fraction must be a number in [0, 0.5), got {release_fraction!r}"
            )
        release_value = task.default_control() if release_fraction else None
        if release_fraction and release_value is None:
            raise ControlMDError(
                f"release_fraction = {release_fraction!r}: task {task.name!r} has no "
                "no-control value (default_control() is None) to release to"
            )
        self.control = EpisodeControl(
            dim=self.action_dim,
            t_final=task.horizon,
            n_pieces=self.n_intervals,
            release_fraction=float(release_fraction),
            release_value=release_value,
        )
        self.n_features = 0 if observation == "time" else self._probe_features()
        self.feature_scale = self._feature_scales(feature_scale)
        self.obs_dim = 1 + self.n_features
        self.state: State | None = None
        self.interval = 0
        self.md_steps = 0
        self._phi = np.zeros(0)

    @property
    def done(self) -> bool:
        return self.interval >= self.n_intervals

    def observation_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)`` of the observation vector: ``[0, 1]`` for time, ``[-1, 1]`` else."""
        low = np.full(self.obs_dim, -1.0, dtype=np.float32)
        high = np.ones(self.obs_dim, dtype=np.float32)
        low[0] = 0.0
        return low, high

    def to_physical(self, actions: np.ndarray) -> Tensor:
        """Map normalized actions ``[B, k]`` in [-1, 1] to physical controls ``[B, k]``."""
        a = torch.as_tensor(np.asarray(actions, dtype=np.float64))
        return self.low + (self.high - self.low) * 0.5 * (a + 1.0)

    def reset(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> np.ndarray:
        """Fresh replicas ``first_replica .. first_replica + B - 1`` of the batch seeded
        ``seed``; returns observations ``[B, n_obs]``."""
        with torch.no_grad():
            self.state = self.task.initial_state(n_replicas, int(seed), first_replica=first_replica)
        self.control.start(n_replicas)
        self.interval = 0
        self._phi = self._potential() if self.shaping else np.zeros(n_replicas)
        return self.observe()

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, bool, dict[str, np.ndarray]]:
        """Hold ``actions`` ``[B, k]`` for one control interval.

        :return: ``(obs [B, n_obs], reward [B], terminated, terms)``; ``terms`` holds
            ``reward_metric``, ``reward_shaping``, ``u`` (physical controls ``[B, k]``) and,
            at the end, ``metric`` (the task's exact metric ``[B]``) and, where the task
            has one, ``exact_metric`` (noise-free, :meth:`exact_metric`).
        """
        assert self.state is not None and not self.done
        u = self.to_physical(actions)
        self.control.set(self.interval, u)
        with torch.no_grad():
            self.state = self.task.advance(
                self.state, self.control, self.control_interval, gradient="none"
            )
        self.interval += 1
        self.md_steps += self.state.n_replicas * self.control_interval
        terminated = self.done
        B = self.state.n_replicas
        terms: dict[str, np.ndarray] = {"u": u.numpy().copy()}
        r_metric = np.zeros(B)
        if terminated:
            metric = self.metric()
            terms["metric"] = metric
            r_metric = self.sign * metric
            exact = self.exact_metric()
            if exact is not None:
                terms["exact_metric"] = exact
        r_shaping = np.zeros(B)
        if self.shaping:
            phi_next = np.zeros(B) if terminated else self._potential()
            r_shaping = self.shaping * (self.shaping_gamma * phi_next - self._phi)
            self._phi = phi_next
        terms["reward_metric"] = self.reward_scale * r_metric
        terms["reward_shaping"] = self.reward_scale * r_shaping
        reward = terms["reward_metric"] + terms["reward_shaping"]
        return self.observe(), reward, terminated, terms

    def metric(self) -> np.ndarray:
        """The task's exact metric of the current states ``[B]`` (float64)."""
        assert self.state is not None
        with torch.no_grad():
            values = (
                self.task.metric(self.state).detach().to(torch.float64).cpu().numpy().reshape(-1)
            )
        if not np.all(np.isfinite(values)):
            raise ControlMDError(
                f"task {self.task.name!r}: the metric is not finite for some replicas: {values}"
            )
        return values

    def start_value(self) -> StartValue:
        """The task's start value: the metric of the initial protocol (zero actions) on
        fixed replicas, computed once per process (:mod:`controlmd_envs.start_value`)."""
        return start_value(self.task, key=self.start_key)

    def exact_metric(self) -> np.ndarray | None:
        """The task's noise-free metric ``[B]`` of each replica's episode as an open-loop
        protocol (``task.exact_metric``), or ``None`` where the task has none."""
        B = self.control.values.shape[0]
        values = [self.task.exact_metric(self.control.replica(i)) for i in range(B)]
        if any(v is None for v in values):
            return None
        return np.asarray(values, dtype=np.float64)

    def observe(self) -> np.ndarray:
        """Observations ``[B, n_obs]`` (float32, within :meth:`observation_bounds`)."""
        assert self.state is not None
        B = self.state.n_replicas
        t = np.full((B, 1), self.interval / self.n_intervals)
        if self.observation == "time":
            return t.astype(np.float32)
        x = self._raw_features(self.state)
        return np.concatenate([t, np.tanh(x / self.feature_scale)], axis=1).astype(np.float32)

    def _potential(self) -> np.ndarray:
        """Shaping potential ``Phi(s) = sign * metric(s)`` of non-terminal states ``[B]``."""
        return self.sign * self.metric()

    def _raw_features(self, state: State) -> np.ndarray:
        with torch.no_grad():
            if self.observation == "features":
                f = self.task.observe(state)
            else:
                parts = [state.R.reshape(state.n_replicas, -1)]
                if state.P is not None:
                    parts.append(state.P.reshape(state.n_replicas, -1))
                f = torch.cat(parts, dim=1)
        return f.detach().to(torch.float64).cpu().numpy()

    def _probe_features(self) -> int:
        with torch.no_grad():
            probe = self.task.initial_state(1, 0)
        if self.observation == "state" and not isinstance(getattr(probe, "R", None), Tensor):
            raise ControlMDError(
                f"observation = 'state' needs particle positions, but task {self.task.name!r} has a "
                f"{type(probe).__name__} state without them; use 'features' or 'time'"
            )
        n = self._raw_features(probe).shape[1]
        if n == 0:
            raise ControlMDError(
                f"observation = {self.observation!r}: task {self.task.name!r} observes no features; use 'time'"
            )
        return n

    def _feature_scales(self, scale: float | Sequence[float]) -> np.ndarray:
        s = np.asarray(scale, dtype=np.float64).reshape(-1)
        if (
            s.size not in (1, max(self.n_features, 1))
            or not np.all(np.isfinite(s))
            or np.any(s <= 0)
        ):
            raise ControlMDError(
                f"feature_scale must be > 0, one value or one per observed quantity "
                f"({self.n_features}), got {scale!r}"
            )
        return s if s.size > 1 else np.full(max(self.n_features, 1), float(s[0]))


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def check_actions(actions: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Validate actions at an env's boundary: shape, finiteness, range [-1, 1] (values
    outside by at most :data:`ACTION_ROUNDING` are clipped).

    :return: the actions as float64, within [-1, 1].
    :raises gymnasium.error.InvalidAction: with the received value and what is allowed.
    """
    try:
        a = np.asarray(actions, dtype=np.float64)
    except (TypeError, ValueError):
        raise gym.error.InvalidAction(
            f"action must be an array of shape {shape} in [-1, 1], got {actions!r}"
        ) from None
    if a.shape != shape:
        raise gym.error.InvalidAction(
            f"action must have shape {shape}, got shape {a.shape}: {actions!r}"
        )
    if not np.all(np.isfinite(a)):
        raise gym.error.InvalidAction(f"action must be finite, got {actions!r}")
    if np.any(a < -1.0 - ACTION_ROUNDING) or np.any(a > 1.0 + ACTION_ROUNDING):
        raise gym.error.InvalidAction(
            f"action {np.array2string(a, precision=6)} is outside the action space [-1, 1]; actions are "
            "normalized and mapped to the task's physical bounds by the env"
        )
    return np.clip(a, -1.0, 1.0)


class BatchCounters:
    """``md_steps``, ``n_intervals`` and ``control_interval`` of an env that steps a
    :class:`ReplicaBatch` (``self.batch``); shared by the single, vector and SB3 envs."""

    batch: ReplicaBatch

    @property
    def md_steps(self) -> int:
        """MD replica-steps simulated by this env since it was made."""
        return self.batch.md_steps

    @property
    def n_intervals(self) -> int:
        """Steps per episode ``K``."""
        return self.batch.n_intervals

    @property
    def control_interval(self) -> int:
        """MD steps per env step."""
        return self.batch.control_interval


class ControlEnv(BatchCounters, gym.Env[np.ndarray, np.ndarray], EzPickle):
    """Control a controlmd task, one control interval per step.

    ## Description
    A generic wrapper of any registered controlmd task (reduced LJ units for the
    classical tasks, eV and hbar/eV for the quantum one; see the task's module
    docstring). Each step holds the control ``u`` for ``control_interval`` MD steps of
    one replica; the episode is the task's horizon ``T = n_steps * dt``, i.e.
    ``K = n_steps / control_interval`` steps, and a ``K``-piece piecewise-constant
    protocol controls exactly the same thing.

    ## Action Space
    ``Box(-1, 1, (k,), float32)``, one entry per control channel. Action ``a_j`` maps to
    the physical value ``u_j = low_j + (high_j - low_j) (a_j + 1) / 2`` with the channel's
    bounds ``task.controls.low`` / ``high`` (units ``task.controls.units``). Float64
    actions are used at full precision. Actions of another shape, non-finite or outside
    [-1, 1] raise ``gymnasium.error.InvalidAction``.

    ## Observation Space
    ``Box(float32)`` with finite bounds:

    =========  ==========================================  =======  =====  ==========
    index      observation                                 min      max    unit
    =========  ==========================================  =======  =====  ==========
    0          time fraction ``t / T``                     0        1      1
    1 .. n     ``tanh(f / feature_scale)`` (``features``:  -1       1      1
               ``f = task.observe(state)``; ``state``:
               flattened positions, then momenta)
    =========  ==========================================  =======  =====  ==========

    ``observation="time"`` (only index 0) gives the agent what an open-loop protocol
    has; comparisons with gradient-designed protocols use it. ``"features"`` and
    ``"state"`` give feedback control.

    ## Rewards
    Sparse: at the last step, ``r_metric = sign * metric``, with ``metric`` the task's
    exact metric of the final state and ``sign = +1`` if higher is better, else ``-1``.
    Optional potential-based shaping (Ng, Harada & Russell, ICML 1999), weight
    ``w = shaping``: ``r_shaping = w (gamma Phi(s') - Phi(s))`` with
    ``Phi(s) = sign * task.metric(s)`` on non-terminal states and ``Phi = 0`` at the
    end. For ``gamma = 1`` the shaping terms of an episode sum to ``-w Phi(s_0)``, which
    no action changes, so the optimal policy is unchanged; for a task whose metric
    accumulates (the work of ``trap_drag``) it makes the reward dense. Every reward is
    multiplied by ``reward_scale``. ``info`` holds ``reward_metric``, ``reward_shaping``
    (their sum is the reward), ``u`` (the physical control held), ``md_steps`` (MD steps
    of this episode so far), ``time`` (``t / T``) and, at the end, ``metric`` and
    ``start_value`` (the task's documented start value, the metric of zero actions on fixed
    replicas: :mod:`controlmd_envs.start_value`; computed at the end of the first episode;
    ``report_start_value=False`` leaves it out and saves that evaluation).

    ## Starting State
    ``task.initial_state(1, 0, first_replica=s)``: ``reset(seed=s)`` gives replica ``s``
    of the task's batch seeded 0, so envs seeded ``s + i`` are the replicas of the batched
    vector env seeded ``s`` (``info["task_seed"]`` is ``s``).

    ## Episode End
    Termination after ``K`` steps (the horizon is part of the problem, and the time
    fraction is observed); the env never truncates. Stepping after the end without
    ``reset`` raises ``gymnasium.error.ResetNeeded``.

    ## Arguments
    =================  ==================  ===========  ======================================
    name               type                default      effect
    =================  ==================  ===========  ======================================
    task               Task or str         (required)   the task, or a registered task name
    task_kwargs        dict or None        None         arguments of the named task
    control_interval   int or None         None         MD steps per action; must divide
                                                        ``n_steps`` (None: smallest divisor
                                                        giving <= 20 steps)
    observation        str                 "time"       ``time``, ``features`` or ``state``
    shaping            float               0.0          shaping weight ``w`` (>= 0)
    shaping_gamma      float               1.0          ``gamma`` of the shaping term
    reward_scale       float               1.0          factor on every reward (> 0)
    feature_scale      float or [float]    1.0          scale of observed quantities
    report_start_value bool                True         ``info["start_value"]`` at the end
    release_fraction   float               0.0          last fraction of the horizon at
                                                        the no-control value (actions
                                                        there are ignored)
    render_mode        str or None         None         ``"rgb_array"``
    =================  ==================  ===========  ======================================

    ## Example
    >>> import controlmd_envs, gymnasium as gym
    >>> env = gym.make("controlmd/TrapDrag-v0", control_interval=10)
    >>> obs, info = env.reset(seed=0)
    >>> obs, env.action_space.shape
    (array([0.], dtype=float32), (1,))

    ## Version History
    * v0: initial version.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}  # noqa: RUF012 (gymnasium's convention)

    def __init__(
        self,
        task: Task | str,
        *,
        task_kwargs: dict[str, Any] | None = None,
        control_interval: int | None = None,
        observation: str = "time",
        shaping: float = 0.0,
        shaping_gamma: float = 1.0,
        reward_scale: float = 1.0,
        feature_scale: float | Sequence[float] = 1.0,
        report_start_value: bool = True,
        release_fraction: float = 0.0,
        render_mode: str | None = None,
    ) -> None:
        EzPickle.__init__(
            self,
            task,
            task_kwargs=task_kwargs,
            control_interval=control_interval,
            observation=observation,
            shaping=shaping,
            shaping_gamma=shaping_gamma,
            reward_scale=reward_scale,
            feature_scale=feature_scale,
            report_start_value=report_start_value,
            release_fraction=release_fraction,
            render_mode=render_mode,
        )
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ControlMDError(
                f"unknown render_mode {render_mode!r}; expected None or one of: rgb_array"
            )
        self.task = make_task(task, task_kwargs)
        self.batch = ReplicaBatch(
            self.task,
            control_interval=control_interval,
            observation=observation,
            shaping=shaping,
            shaping_gamma=shaping_gamma,
            reward_scale=reward_scale,
            feature_scale=feature_scale,
            start_key=task_key(task, task_kwargs),
            release_fraction=release_fraction,
        )
        self.report_start_value = bool(report_start_value)
        self.render_mode = render_mode
        self.action_space = spaces.Box(-1.0, 1.0, (self.batch.action_dim,), dtype=np.float32)
        low, high = self.batch.observation_bounds()
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self._needs_reset = True
        self._history: list[tuple[float, np.ndarray]] = []

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        task_seed = seed if seed is not None else int(self.np_random.integers(0, SEED_BOUND))
        obs = self.batch.reset(1, 0, first_replica=int(task_seed))
        self._needs_reset = False
        self._history = []
        return obs[0], {"md_steps": 0, "time": 0.0, "task_seed": int(task_seed)}

    def step(
        self, action: np.ndarray
    ) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            raise gym.error.ResetNeeded(
                "cannot call step() before reset() or after the episode ended (terminated = True); call reset()"
            )
        a = check_actions(action, (self.batch.action_dim,))  # = action_space.shape
        obs, reward, terminated, terms = self.batch.step(a[None, :])
        self._needs_reset = terminated
        info: dict[str, Any] = {
            "reward_metric": float(terms["reward_metric"][0]),
            "reward_shaping": float(terms["reward_shaping"][0]),
            "u": terms["u"][0].copy(),
            "md_steps": self.batch.interval * self.batch.control_interval,
            "time": self.batch.interval / self.batch.n_intervals,
        }
        if terminated:
            info["metric"] = float(terms["metric"][0])
            if self.report_start_value:
                info["start_value"] = self.batch.start_value().mean
            if "exact_metric" in terms:
                info["exact_metric"] = float(terms["exact_metric"][0])
        self._history.append((info["time"], info["u"]))
        return obs[0], float(reward[0]), terminated, False, info

    def render(self) -> np.ndarray | None:
        """``rgb_array``: ``[H, W, 3]`` uint8 picture of the particles (or the observed
        features) and the control held so far."""
        if self.render_mode is None:
            gym.logger.warn(
                "render() called without a render_mode; make the env with render_mode='rgb_array'"
            )
            return None
        if self.batch.state is None:
            raise gym.error.ResetNeeded("call reset() before render()")
        return _render_frame(self.batch, self._history)

    def close(self) -> None:
        self.batch.state = None


def _render_frame(batch: ReplicaBatch, history: list[tuple[float, np.ndarray]]) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    task, state = batch.task, batch.state
    fig = Figure(figsize=(6.4, 3.2), dpi=80)
    canvas = FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    R = getattr(state, "R", None)
    if isinstance(R, Tensor) and R.ndim == 3:
        x = R[0].detach().to(torch.float64).cpu().numpy()
        y = x[:, 1] if x.shape[1] > 1 else np.zeros(x.shape[0])
        left.scatter(x[:, 0], y, s=12)
        left.set_title("replica 0: positions")
    else:
        with torch.no_grad():
            f = task.observe(state)[0].detach().to(torch.float64).cpu().numpy()
        left.bar(np.arange(f.size), f)
        left.set_title("observed features")
    times = [0.0] + [t for t, _ in history]
    for j, name in enumerate(task.controls.names):
        values = [u[j] for _, u in history]
        if values:
            right.step(times, [values[0], *values], where="post", label=name)
    right.set_xlim(0.0, 1.0)
    right.set_ylim(min(task.controls.low), max(task.controls.high))
    right.set_xlabel("t / T")
    right.set_title(f"control ({', '.join(task.controls.units)})")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
