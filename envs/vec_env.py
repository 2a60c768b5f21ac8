"""Vector envs stepping many replicas of a task as one batched simulation.

:class:`ControlVectorEnv` is a ``gymnasium.vector.VectorEnv``: ``num_envs`` replicas of one
task in a single batched state (positions ``[num_envs, N, d]``), each with its own action
through a per-replica control (:class:`~controlmd_envs.control_env.EpisodeControl`, values
``[num_envs, k]`` per control interval), so an agent pays one simulation call per control
interval, not one per replica. It is what ``gymnasium.make_vec("controlmd/<Task>-v0",
num_envs=B, vectorization_mode="vector_entry_point")`` returns (and the default mode of
``make_vec`` for these ids). :class:`BatchedControlVecEnv` is a thin stable-baselines3
``VecEnv`` adapter on top of it (one implementation of the stepping).

Seeding (the same in every vectorization mode): env ``i`` of a vector env reset with
``seed=s`` is the :class:`~controlmd_envs.control_env.ControlEnv` reset with ``seed=s + i``
(gymnasium's ``SyncVectorEnv`` / ``AsyncVectorEnv`` convention, and stable-baselines3's),
i.e. replica ``s + i`` of the task's batch seeded 0. Later, unseeded episodes start at a
replica drawn from the env's ``np_random``.

Autoreset (``metadata["autoreset_mode"]``): all replicas start and end their episodes
together (an episode is always ``K`` steps, ``terminated`` for all at once). The default
``AutoresetMode.NEXT_STEP`` (gymnasium's default): the step after the last one resets every
replica, ignores its actions, returns the first observations with reward 0 and simulates
nothing. ``AutoresetMode.SAME_STEP``: the last step returns the next episode's first
observations, with ``info["final_obs"]`` / ``info["final_info"]`` (the last step's
observations and infos, masks ``_final_obs`` / ``_final_info``).

Infos are gymnasium's vector infos (an array per key, with a boolean mask ``_key``):
``reward_metric``, ``reward_shaping``, ``u`` ``[num_envs, k]``, ``md_steps``, ``time``; the
last step of an episode adds ``metric`` (the task's exact metric of each replica's final
state), ``start_value`` (the task's start value, :mod:`controlmd_envs.start_value`) and, where the task has one (``trap_drag``), ``exact_metric`` (the noise-free
metric of each replica's actions as an open-loop protocol: the mean work for those
pieces). ``reset`` gives ``task_seed`` (the ``ControlEnv`` seed of each env).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.utils import EzPickle, seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from controlmd.errors import ControlMDError
from controlmd.tasks.base import Task
from controlmd_envs.control_env import (
    SEED_BOUND,
    BatchCounters,
    ReplicaBatch,
    check_actions,
    make_task,
)
from controlmd_envs.start_value import task_key

__all__ = ["BatchedControlVecEnv", "ControlVectorEnv"]

_AUTORESET = (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP)


class ControlVectorEnv(BatchCounters, VectorEnv, EzPickle):
    """``num_envs`` replicas of a task as one gymnasium vector env (one batched simulation).

    Spaces, rewards and infos are those of :class:`~controlmd_envs.control_env.ControlEnv`
    with the same arguments, batched (see the module docstring for seeding, autoreset and
    infos). Picklable (by its constructor arguments) when the task is given by name.

    :param task: a Task, or a registered task name (with ``task_kwargs``).
    :param num_envs: number of replicas (sub-environments).
    :param task_kwargs: arguments of the named task.
    :param control_interval, observation, shaping, shaping_gamma, reward_scale,
        feature_scale, report_start_value, release_fraction: see
        :class:`~controlmd_envs.control_env.ControlEnv`.
    :param autoreset_mode: ``AutoresetMode.NEXT_STEP`` (default) or ``SAME_STEP``.
    :param render_mode: only ``None`` (no rendering of the batch).
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}  # noqa: RUF012

    def __init__(
        self,
        task: Task | str,
        num_envs: int = 1,
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
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        render_mode: str | None = None,
    ) -> None:
        EzPickle.__init__(
            self,
            task,
            num_envs,
            task_kwargs=task_kwargs,
            control_interval=control_interval,
            observation=observation,
            shaping=shaping,
            shaping_gamma=shaping_gamma,
            reward_scale=reward_scale,
            feature_scale=feature_scale,
            report_start_value=report_start_value,
            release_fraction=release_fraction,
            autoreset_mode=autoreset_mode,
            render_mode=render_mode,
        )
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ControlMDError(f"num_envs must be a positive integer, got {num_envs!r}")
        try:
            mode = AutoresetMode(autoreset_mode)
        except ValueError:
            mode = None
        if mode not in _AUTORESET:
            raise ControlMDError(
                f"autoreset_mode must be AutoresetMode.NEXT_STEP or SAME_STEP, got {autoreset_mode!r}"
            )
        if render_mode is not None:
            raise ControlMDError(
                f"render_mode {render_mode!r}: the batched vector env does not render; render a "
                "single ControlEnv (render_mode='rgb_array') instead"
            )
        self.metadata = {**type(self).metadata, "autoreset_mode": mode}
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
        self.num_envs = num_envs
        self.render_mode = None
        low, high = self.batch.observation_bounds()
        self.single_observation_space = spaces.Box(low, high, dtype=np.float32)
        self.single_action_space = spaces.Box(-1.0, 1.0, (self.batch.action_dim,), dtype=np.float32)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.first_replica: int | None = None
        self.episodes = 0
        self._autoreset = False

    def reset(
        self, *, seed: int | Sequence[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode of every replica: env ``i`` is the ``ControlEnv`` seeded
        ``seed + i`` (a list of seeds must be ``[s, s + 1, ...]``); ``None``: drawn."""
        if options:
            raise ControlMDError(f"reset takes no options, got {options!r}")
        if seed is not None and not isinstance(seed, int | np.integer):
            seeds = [int(s) for s in seed]
            if len(seeds) != self.num_envs or seeds != list(
                range(seeds[0], seeds[0] + self.num_envs)
            ):
                raise ControlMDError(
                    f"seed: a list of seeds must be consecutive, [s, s + 1, ..., s + {self.num_envs - 1}] "
                    f"(one batched simulation of replicas s ... s + {self.num_envs - 1}), got {seed!r}"
                )
            seed = seeds[0]
        if seed is not None:
            self._np_random, self._np_random_seed = seeding.np_random(int(seed))
            first = int(seed)
        else:
            first = int(self.np_random.integers(0, SEED_BOUND - self.num_envs))
        return self._start(first)

    def _start(self, first: int) -> tuple[np.ndarray, dict[str, Any]]:
        self.first_replica = first
        self._autoreset = False
        obs = self.batch.reset(self.num_envs, 0, first_replica=first)
        seeds = np.arange(first, first + self.num_envs, dtype=np.int64)
        return obs, {"task_seed": seeds, "_task_seed": np.ones(self.num_envs, dtype=bool)}

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Hold ``actions`` ``[num_envs, k]`` (normalized, in [-1, 1]) for one control interval."""
        B = self.num_envs
        if self._autoreset:  # NEXT_STEP: this step only starts the next episode
            obs, reset_info = self._start(int(self.np_random.integers(0, SEED_BOUND - B)))
            zeros = np.zeros(B, dtype=bool)
            return obs, np.zeros(B), zeros, zeros.copy(), reset_info
        if self.batch.state is None or self.batch.done:
            raise ControlMDError("ControlVectorEnv: call reset() before step()")
        a = check_actions(actions, (B, self.batch.action_dim))
        obs, reward, terminated, terms = self.batch.step(a)
        mask = np.ones(B, dtype=bool)
        info: dict[str, Any] = {
            "reward_metric": terms["reward_metric"],
            "reward_shaping": terms["reward_shaping"],
            "u": terms["u"],
            "md_steps": np.full(B, self.batch.interval * self.batch.control_interval),
            "time": np.full(B, self.batch.interval / self.batch.n_intervals),
        }
        if terminated:
            info["metric"] = terms["metric"]
            if self.report_start_value:
                info["start_value"] = np.full(B, self.batch.start_value().mean)
            if "exact_metric" in terms:
                info["exact_metric"] = terms["exact_metric"]
            self.episodes += 1
        info.update({f"_{key}": mask for key in list(info)})
        dones = np.full(B, terminated, dtype=bool)
        if terminated and self.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP:
            final_obs = np.empty(B, dtype=object)
            final_obs[:] = list(obs)
            obs, reset_info = self._start(int(self.np_random.integers(0, SEED_BOUND - B)))
            info = {
                **reset_info,
                "final_obs": final_obs,
                "_final_obs": mask,
                "final_info": info,
                "_final_info": mask,
            }
        elif terminated:
            self._autoreset = True
        return obs, reward.astype(np.float64), dones, np.zeros(B, dtype=bool), info

    def close_extras(self, **kwargs: Any) -> None:
        self.batch.state = None


class BatchedControlVecEnv(BatchCounters, VecEnv):
    """stable-baselines3 ``VecEnv`` adapter of :class:`ControlVectorEnv` (``SAME_STEP``
    autoreset, as stable-baselines3 expects).

    Infos are one dict per env with the keys of ``ControlEnv``'s infos; the last step of
    an episode adds ``metric``, ``terminal_observation`` and ``TimeLimit.truncated =
    False``. Seeding is stable-baselines3's: :meth:`seed` ``(s)`` makes the next
    :meth:`reset` start env ``i`` as the ``ControlEnv`` seeded ``s + i`` (what
    ``DummyVecEnv`` / ``SubprocVecEnv`` of ``ControlEnv`` give).

    :param task: a Task, or a registered task name (with ``task_kwargs``).
    :param n_envs: number of replicas (sub-environments).
    :param seed: seed of the first reset (``None``: drawn from the OS).
    :param kwargs: ``task_kwargs``, ``control_interval``, ``observation``, ``shaping``,
        ``shaping_gamma``, ``reward_scale``, ``feature_scale``, ``report_start_value``,
        ``release_fraction`` of :class:`ControlVectorEnv`.
    """

    def __init__(
        self, task: Task | str, n_envs: int, *, seed: int | None = None, **kwargs: Any
    ) -> None:
        if isinstance(n_envs, bool) or not isinstance(n_envs, int) or n_envs < 1:
            raise ControlMDError(f"n_envs must be a positive integer, got {n_envs!r}")
        self.venv = ControlVectorEnv(task, n_envs, autoreset_mode=AutoresetMode.SAME_STEP, **kwargs)
        self.task = self.venv.task
        self.render_mode = None
        super().__init__(n_envs, self.venv.single_observation_space, self.venv.single_action_space)
        self._next_seed: int | None = seed
        self._actions: np.ndarray | None = None

    @property
    def batch(self) -> ReplicaBatch:
        """The replicas' engine (shared with :class:`ControlVectorEnv`)."""
        return self.venv.batch

    @property
    def episodes(self) -> int:
        """Episodes completed (all replicas at once)."""
        return self.venv.episodes

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seed the next reset: env ``i`` gets ``seed + i`` (returned)."""
        if seed is None:
            return [None] * self.num_envs
        self._next_seed = int(seed)
        return [int(seed) + i for i in range(self.num_envs)]

    def reset(self) -> np.ndarray:
        obs, _ = self.venv.reset(seed=self._next_seed)
        self._next_seed = None
        self._actions = None
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        if self.batch.state is None or self.batch.done:
            raise ControlMDError("BatchedControlVecEnv: call reset() before step()")
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise ControlMDError("BatchedControlVecEnv: step_wait() without step_async()")
        obs, reward, terminated, _, info = self.venv.step(self._actions)
        self._actions = None
        done = bool(terminated[0])
        source = info["final_info"] if done else info
        keys = [k for k in source if not k.startswith("_")]
        infos: list[dict[str, Any]] = []
        for i in range(self.num_envs):
            item = {k: _item(source[k][i]) for k in keys}
            if done:
                item["terminal_observation"] = info["final_obs"][i]
                item["TimeLimit.truncated"] = False
            infos.append(item)
        return obs, reward.astype(np.float32), terminated, infos

    def close(self) -> None:
        self.venv.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """Attributes are shared by all replicas: ``getattr(self, attr_name)`` per index."""
        return [getattr(self, attr_name)] * len(list(self._get_indices(indices)))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        if indices is not None and len(list(self._get_indices(indices))) != self.num_envs:
            raise ControlMDError(
                "BatchedControlVecEnv: attributes are shared by all replicas; set them for all"
            )
        setattr(self, attr_name, value)

    def env_method(
        self,
        method_name: str,
        *method_args: Any,
        indices: VecEnvIndices = None,
        **method_kwargs: Any,
    ) -> list[Any]:
        result = getattr(self, method_name)(*method_args, **method_kwargs)
        return [result] * len(list(self._get_indices(indices)))

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False] * len(list(self._get_indices(indices)))


def _item(value: Any) -> Any:
    """A numpy scalar as a Python number; arrays (``u``) copied."""
    if isinstance(value, np.ndarray):
        return value.copy()
    return value.item() if isinstance(value, np.generic) else value
