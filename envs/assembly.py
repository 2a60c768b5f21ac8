"""``controlmd/Assembly-v0``: self-assemble sticky disks into the compact heptamer."""

from __future__ import annotations

from controlmd_envs.task_env import TaskEnv

__all__ = ["AssemblyEnv"]


class AssemblyEnv(TaskEnv):
    """Drive 7 sticky disks to the compact hexagonal heptamer by a time-dependent attraction.

    ## Description
    The ``assembly`` task (:mod:`controlmd.tasks.assembly`, reduced units: sigma, epsilon,
    tau): 7 Morse disks per replica in a periodic box (area fraction 0.15), overdamped
    Brownian dynamics (``dt = 3e-4`` tau, 6000 steps = 1.8 tau by default). Strong
    attraction locks open clusters, weak attraction lets them evaporate; the agent sets
    the well depth (and/or the temperature, per the task's ``controls``) for each
    control interval.

    ## Action Space
    ``Box(-1, 1, (k,), float32)``, mapped to ``low + (high - low) (a + 1) / 2``:

    ===========  ==================  ================  ================  =======
    channel      coupling            a = -1            a = 1             unit
    ===========  ==================  ================  ================  =======
    epsilon      Morse well depth    ``eps_min`` 2     ``eps_max`` 10    epsilon
    temperature  bath kT(t)          ``kT_min`` 0.5    ``kT_max`` 2      epsilon
    ===========  ==================  ================  ================  =======

    ## Observation Space
    ``"time"`` (default): ``[t / T]`` in [0, 1]. ``"features"``: adds
    ``tanh(f / feature_scale)`` of (bonds / 12, largest cluster / 7, largest
    coordination / 6); ``"state"``: of the 14 disk coordinates.

    ## Rewards
    The yield at the last step: 1 if the 7 disks form the compact heptamer (12 bonds, one
    disk of coordination 6), else 0. With ``shaping = w`` the potential
    ``Phi = yield(s)`` pays ``w`` each time the heptamer forms or breaks.

    ## Starting State
    Disks uniform in the box, no two closer than 1.05 sigma, from the replica's seed.

    ## Episode End
    Terminated after ``n_steps / control_interval`` steps (default 6000 / 300 = 20);
    never truncated.

    ## Arguments
    ``task_kwargs`` takes the task's arguments (``controls``, bounds, ``n_steps``, ...);
    the others are those of :class:`~controlmd_envs.control_env.ControlEnv`,
    ``control_interval`` defaulting to the smallest divisor of ``n_steps`` giving at
    most 20 steps.

    >>> import controlmd_envs, gymnasium as gym
    >>> env = gym.make("controlmd/Assembly-v0", task_kwargs={"n_steps": 400})
    >>> env.action_space.shape, env.unwrapped.n_intervals
    ((1,), 20)

    ## Version History
    * v0: initial version.
    """

    task_name = "assembly"
