"""Gymnasium environments of the controlmd tasks (import name ``controlmd_envs``).

``import controlmd_envs`` registers every environment below with gymnasium; the entry
points are strings, so no task module is imported until an env is made (a task that is
missing or broken fails at ``gym.make``, not at import)::

    import gymnasium as gym
    import controlmd_envs

    env = gym.make("controlmd/TrapDrag-v0", control_interval=5, observation="time")
    envs = gym.make_vec("controlmd/TrapDrag-v0", num_envs=64)  # one batched simulation

=============================  ==================  ==========================================
id                             task                what is controlled
=============================  ==================  ==========================================
``controlmd/TrapDrag-v0``      ``trap_drag``       trap centre dragging a Brownian particle
``controlmd/PolymerFold-v0``   ``polymer_fold``    temperature (or attraction, tweezers,
                                                   pair bias) folding a Go-model chain
``controlmd/Assembly-v0``      ``assembly``        attraction (and/or temperature) of
                                                   sticky disks forming a heptamer
``controlmd/Isomerization-v0`` ``isomerization``   laser field driving retinal's
                                                   photo-isomerization (quantum)
=============================  ==================  ==========================================

Each env is a :class:`~controlmd_envs.control_env.ControlEnv` (its docstring gives the
spaces, rewards and arguments; the env classes' docstrings the task-specific tables).
Each id also has a ``vector_entry_point``: ``gym.make_vec(id, num_envs=B)`` (or
``vectorization_mode="vector_entry_point"``) is a
:class:`~controlmd_envs.vec_env.ControlVectorEnv` stepping the ``B`` replicas as one
batched simulation; ``"sync"`` / ``"async"`` give the same replicas for the same seed.
:class:`~controlmd_envs.vec_env.BatchedControlVecEnv` adapts it to stable-baselines3.
``rdf_inverse`` has no env: it has no time-dependent control (its potential parameters
are fitted once; ``ControlEnv("rdf_inverse")`` says so). The core package ``controlmd``
never imports this package.

Version history: ``v0`` ids are the initial versions.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from gymnasium.envs.registration import register, registry

__all__ = ["ENV_IDS", "BatchedControlVecEnv", "ControlEnv", "ControlVectorEnv", "ReplicaBatch"]

_ENVS: dict[str, tuple[str, str]] = {
    "controlmd/TrapDrag-v0": ("trap_drag", "controlmd_envs.trap_drag:TrapDragEnv"),
    "controlmd/PolymerFold-v0": ("polymer_fold", "controlmd_envs.polymer_fold:PolymerFoldEnv"),
    "controlmd/Assembly-v0": ("assembly", "controlmd_envs.assembly:AssemblyEnv"),
    "controlmd/Isomerization-v0": (
        "isomerization",
        "controlmd_envs.isomerization:IsomerizationEnv",
    ),
}
ENV_IDS: dict[str, str] = {env_id: task for env_id, (task, _) in _ENVS.items()}
"""Registered env id -> controlmd task name."""


def make_vector_env(entry_point: str, num_envs: int = 1, **kwargs: Any) -> Any:
    """The ``vector_entry_point`` of the ids: a :class:`~controlmd_envs.vec_env.ControlVectorEnv`
    of the env class at ``entry_point`` (its task and default control interval)."""
    from gymnasium.envs.registration import load_env_creator

    from controlmd.errors import ControlMDError
    from controlmd_envs.task_env import TaskEnv
    from controlmd_envs.vec_env import ControlVectorEnv

    creator: object = load_env_creator(entry_point)  # an env class or a factory function
    if not (isinstance(creator, type) and issubclass(creator, TaskEnv)):
        raise ControlMDError(
            f"vector entry point {entry_point!r} must name a TaskEnv subclass, got {creator!r}"
        )
    cls: type[TaskEnv] = creator
    if kwargs.get("control_interval") is None:
        kwargs["control_interval"] = cls.default_control_interval
    return ControlVectorEnv(cls.task_name, num_envs, **kwargs)


for _env_id, (_task, _entry_point) in _ENVS.items():
    if _env_id not in registry:
        register(
            id=_env_id,
            entry_point=_entry_point,
            vector_entry_point=partial(make_vector_env, _entry_point),
        )

_LAZY = {
    "ControlEnv": "controlmd_envs.control_env",
    "ReplicaBatch": "controlmd_envs.control_env",
    "BatchedControlVecEnv": "controlmd_envs.vec_env",
    "ControlVectorEnv": "controlmd_envs.vec_env",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'controlmd_envs' has no attribute {name!r}")
