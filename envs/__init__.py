"""Gymnasium environments of the controlmd tasks (import name ``controlmd_envs``).

``import controlmd_envs`` registers every environment below with gymnasium; the entry
points are strings, so no task module is imported until an env is made (a task that is
missing or broken fails at ``gym.make``, not at import)::

    import gymnasium as gym
    import controlmd_envs

    env = gym.make("controlmd/TrapDrag-v0", control_interval=5, observation="time")

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
:class:`~controlmd_envs.vec_env.BatchedControlVecEnv` steps many replicas of a task as one
batched simulation for stable-baselines3. The core package ``controlmd`` never imports
this package.

Version history: ``v0`` ids are the initial versions.
"""

from __future__ import annotations

from typing import Any

from gymnasium.envs.registration import register, registry

__all__ = ["ENV_IDS", "BatchedControlVecEnv", "ControlEnv", "ReplicaBatch"]

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

for _env_id, (_task, _entry_point) in _ENVS.items():
    if _env_id not in registry:
        register(id=_env_id, entry_point=_entry_point)

_LAZY = {
    "ControlEnv": "controlmd_envs.control_env",
    "ReplicaBatch": "controlmd_envs.control_env",
    "BatchedControlVecEnv": "controlmd_envs.vec_env",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'controlmd_envs' has no attribute {name!r}")
