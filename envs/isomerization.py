"""``controlmd/Isomerization-v0``: shape a laser field for the retinal isomerization yield."""

from __future__ import annotations

from controlmd_envs.task_env import TaskEnv

__all__ = ["IsomerizationEnv"]


class IsomerizationEnv(TaskEnv):
    """Shape the electric field driving retinal's two-state, two-mode model.

    ## Description
    The ``isomerization`` task (:mod:`controlmd.tasks.isomerization`; energies and field
    in eV, time in hbar/eV): a wave packet on the ground and excited diabats of the Hahn
    & Stock retinal model, split-operator propagation over the 750 fs pulse in 6095 steps.
    The agent sets the field ``E`` for each control interval. The default interval of 5
    steps (0.62 fs) resolves the 1.7 fs period of a resonant carrier, so an episode is
    1219 steps; a coarser interval cannot excite the molecule.

    ## Action Space
    ``Box(-1, 1, (1,), float32)``: ``E = e_max a`` (``e_max = 1`` eV), ``H -= mu E``.

    ## Observation Space
    ``"time"`` (default): ``[t / T]`` in [0, 1]. ``"features"``: adds
    ``tanh(f / feature_scale)`` of the task's features (ground-state population,
    excited-diabat population, trans and cis populations; all in [0, 1]).

    ## Rewards
    The exact yield at the last step: ``Y(t)`` averaged over the window 516 .. 1500 fs
    (field-free after the pulse), in [0, 1]. With ``shaping = w`` the potential is the
    yield the molecule would reach if the field stopped now (costly: one yield
    evaluation per step).

    ## Starting State
    The ground eigenstate (the task is deterministic; the seed does not matter).

    ## Episode End
    Terminated at the end of the pulse, ``n_steps / control_interval`` steps; never
    truncated.

    ## Arguments
    ``task_kwargs`` takes the task's arguments (basis size, ``n_steps``, ``e_max``, ...);
    the others are those of :class:`~controlmd_envs.control_env.ControlEnv`, with
    ``control_interval = 5`` by default.

    >>> import controlmd_envs, gymnasium as gym
    >>> env = gym.make("controlmd/Isomerization-v0", task_kwargs={"n_steps": 100}, control_interval=10)
    >>> env.unwrapped.n_intervals
    10

    ## Version History
    * v0: initial version.
    """

    task_name = "isomerization"
    default_control_interval = 5
