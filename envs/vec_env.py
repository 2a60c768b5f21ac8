"""A stable-baselines3 ``VecEnv`` stepping many replicas as one batched simulation.

:class:`BatchedControlVecEnv` holds ``n_envs`` replicas of one task in a single batched
state (positions ``[n_envs, N, d]``) and gives each its own action through a per-replica
control (:class:`~controlmd_envs.control_env.EpisodeControl`, values ``[n_envs, k]``
per control interval), so an RL algorithm pays one
simulation call per control interval, not one per replica. Sub-environment ``i`` is the
:class:`~controlmd_envs.control_env.ControlEnv` replica seeded ``replica_seed(s, i)`` of
the batch seed ``s`` (same observations, rewards and infos).

All replicas start and end their episodes together (an episode is always ``K`` steps);
at the end the batch resets itself with the next batch seed, and each ``info`` carries
the ``terminal_observation`` as stable-baselines3 expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

from controlmd.errors import ControlMDError
from controlmd.rng import replica_seed
from controlmd.tasks.base import Task
from controlmd_envs.control_env import ReplicaBatch, check_actions, make_task

__all__ = ["BatchedControlVecEnv"]

_SEED_BOUND = 2**62


class BatchedControlVecEnv(VecEnv):
    """``n_envs`` replicas of a task as one stable-baselines3 vector env.

    Spaces, rewards and infos are those of :class:`~controlmd_envs.control_env.ControlEnv`
    with the same arguments; infos also carry ``terminal_observation`` and
    ``TimeLimit.truncated = False`` at the end of each episode.

    Seeding: :meth:`seed` ``(s)`` makes the next :meth:`reset` start replica ``i`` from
    ``replica_seed(s, i) = s + i * 1_000_003`` (not stable-baselines3's ``s + i``), so
    env ``i`` equals a ``ControlEnv`` reset with that seed; later episodes use batch seeds
    drawn from a generator seeded ``s``.

    :param task: a Task, or a registered task name (with ``task_kwargs``).
    :param n_envs: number of replicas (sub-environments).
    :param task_kwargs: arguments of the named task.
    :param control_interval, observation, shaping, shaping_gamma, reward_scale,
        feature_scale: see :class:`~controlmd_envs.control_env.ControlEnv`.
    :param seed: seed of the first reset (``None``: drawn from the OS).
    """

    def __init__(
        self,
        task: Task | str,
        n_envs: int,
        *,
        task_kwargs: dict[str, Any] | None = None,
        control_interval: int | None = None,
        observation: str = "time",
        shaping: float = 0.0,
        shaping_gamma: float = 1.0,
        reward_scale: float = 1.0,
        feature_scale: float | Sequence[float] = 1.0,
        seed: int | None = None,
    ) -> None:
        if isinstance(n_envs, bool) or not isinstance(n_envs, int) or n_envs < 1:
            raise ControlMDError(f"n_envs must be a positive integer, got {n_envs!r}")
        self.task = make_task(task, task_kwargs)
        self.batch = ReplicaBatch(
            self.task,
            control_interval=control_interval,
            observation=observation,
            shaping=shaping,
            shaping_gamma=shaping_gamma,
            reward_scale=reward_scale,
            feature_scale=feature_scale,
        )
        self.render_mode = None
        low, high = self.batch.observation_bounds()
        super().__init__(
            n_envs,
            spaces.Box(low, high, dtype=np.float32),
            spaces.Box(-1.0, 1.0, (self.batch.action_dim,), dtype=np.float32),
        )
        self._rng = np.random.default_rng(seed)
        self._next_seed: int | None = seed
        self._actions: np.ndarray | None = None
        self.batch_seed: int | None = None
        self.episodes = 0

    @property
    def md_steps(self) -> int:
        """MD replica-steps simulated by this env since it was made."""
        return self.batch.md_steps

    @property
    def n_intervals(self) -> int:
        """Steps per episode ``K``."""
        return self.batch.n_intervals

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seed the next reset: replica ``i`` gets ``replica_seed(seed, i)`` (returned)."""
        if seed is None:
            return [None] * self.num_envs
        self._rng = np.random.default_rng(seed)
        self._next_seed = int(seed)
        return [replica_seed(seed, i) for i in range(self.num_envs)]

    def reset(self) -> np.ndarray:
        if self._next_seed is None:
            self._next_seed = int(self._rng.integers(0, _SEED_BOUND))
        self.batch_seed = self._next_seed
        self._next_seed = None
        self._actions = None
        self._reset_options()
        return self.batch.reset(self.num_envs, self.batch_seed)

    def step_async(self, actions: np.ndarray) -> None:
        if self.batch.state is None or self.batch.done:
            raise ControlMDError("BatchedControlVecEnv: call reset() before step()")
        self._actions = check_actions(actions, (self.num_envs, self.batch.action_dim))

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise ControlMDError("BatchedControlVecEnv: step_wait() without step_async()")
        obs, reward, terminated, terms = self.batch.step(self._actions)
        self._actions = None
        md = self.batch.interval * self.batch.control_interval
        time = self.batch.interval / self.batch.n_intervals
        infos: list[dict[str, Any]] = []
        for i in range(self.num_envs):
            info: dict[str, Any] = {
                "reward_metric": float(terms["reward_metric"][i]),
                "reward_shaping": float(terms["reward_shaping"][i]),
                "u": terms["u"][i].copy(),
                "md_steps": md,
                "time": time,
            }
            if terminated:
                info["metric"] = float(terms["metric"][i])
                info["terminal_observation"] = obs[i].copy()
                info["TimeLimit.truncated"] = False
            infos.append(info)
        if terminated:
            self.episodes += 1
            obs = self.reset()
        dones = np.full(self.num_envs, terminated, dtype=bool)
        return obs, reward.astype(np.float32), dones, infos

    def close(self) -> None:
        self.batch.state = None

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """Attributes are shared by all replicas: ``getattr(self, attr_name)`` per index."""
        return [getattr(self, attr_name)] * len(self._get_indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        if indices is not None and len(self._get_indices(indices)) != self.num_envs:
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
        return [result] * len(self._get_indices(indices))

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False] * len(self._get_indices(indices))
