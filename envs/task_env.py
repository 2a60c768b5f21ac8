"""Base of the envs bound to one task: a ControlEnv with that task and its default control interval."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gymnasium.utils import EzPickle

from controlmd_envs.control_env import ControlEnv

__all__ = ["TaskEnv"]


class TaskEnv(ControlEnv):
    """A :class:`ControlEnv` bound to one registered task with its own default control interval.

    Subclasses set ``task_name`` and ``default_control_interval`` (``None``: the smallest
    divisor of ``n_steps`` giving at most 20 steps); the arguments are those of
    :class:`ControlEnv` without ``task``.
    """

    task_name: str = ""
    default_control_interval: int | None = None

    def __init__(
        self,
        *,
        task_kwargs: dict[str, Any] | None = None,
        control_interval: int | None = None,
        observation: str = "time",
        shaping: float = 0.0,
        shaping_gamma: float = 1.0,
        reward_scale: float = 1.0,
        feature_scale: float | Sequence[float] = 1.0,
        render_mode: str | None = None,
    ) -> None:
        super().__init__(
            self.task_name,
            task_kwargs=task_kwargs,
            control_interval=self.default_control_interval
            if control_interval is None
            else control_interval,
            observation=observation,
            shaping=shaping,
            shaping_gamma=shaping_gamma,
            reward_scale=reward_scale,
            feature_scale=feature_scale,
            render_mode=render_mode,
        )
        EzPickle.__init__(  # unpickled through this class's own constructor
            self,
            task_kwargs=task_kwargs,
            control_interval=control_interval,
            observation=observation,
            shaping=shaping,
            shaping_gamma=shaping_gamma,
            reward_scale=reward_scale,
            feature_scale=feature_scale,
            render_mode=render_mode,
        )
