"""``controlmd/TrapDrag-v0``: drag a Brownian particle with a harmonic trap at minimal work."""

from __future__ import annotations

from controlmd_envs.task_env import TaskEnv

__all__ = ["TrapDragEnv"]


class TrapDragEnv(TaskEnv):
    """Move a harmonic trap from 0 to ``lambda_f`` in time ``t_f`` spending minimal work.

    ## Description
    The ``trap_drag`` task (:mod:`controlmd.tasks.trap_drag`): one overdamped Brownian
    particle in 1-D in the trap ``V(x; lambda) = k/2 (x - lambda)^2``, exact
    Ornstein–Uhlenbeck steps of ``dt = t_f / n_steps``. The agent sets the trap centre
    for each control interval; the work includes the jumps from ``lambda = 0`` at the
    start and to ``lambda_f`` at the end. The open-loop optimum is known (Schmiedl &
    Seifert, PRL 98, 108301 (2007)): ``W* = k lambda_f^2 / (2 + mu k t_f)``, 25/3 = 8.333
    for the defaults; the linear ramp costs 25/e = 9.197.

    ## Action Space
    ``Box(-1, 1, (1,), float32)``:

    =====  ===========  ======  ======  =============================  =====
    index  action       min     max     physical value (defaults)      unit
    =====  ===========  ======  ======  =============================  =====
    0      trap centre  -1      1       ``lambda = -10 + 12.5 (a+1)``  sigma
                                        i.e. [-10, 15]
    =====  ===========  ======  ======  =============================  =====

    (bounds ``min(0, lambda_f) - 2 s`` .. ``max(0, lambda_f) + 2 s``,
    ``s = max(|lambda_f|, sqrt(kT/k))``, or the task's ``low`` / ``high``).

    ## Observation Space
    ``observation="time"`` (default): ``Box(0, 1, (1,))``, the time fraction ``t / T``.
    ``"features"``: adds ``tanh(x / feature_scale)`` (index 1), ``x`` the particle
    position in sigma; ``"state"`` is the same for this one-particle task.

    ## Rewards
    ``-W`` at the last step, ``W`` the exact work of the episode (epsilon). With
    ``shaping = w`` the potential ``Phi = -W_j`` (work done up to step ``j``) makes the
    reward dense: step ``j < K`` pays ``-w (W_j - W_{j-1})`` and the last step
    ``-W_K + w W_{K-1}``, so the rewards of an episode still sum to ``-W_K`` and the
    optimum is unchanged. Attainable mean return: about -8.4 (the 20-piece optimum);
    -9.2 for the linear ramp.

    ## Starting State
    ``x_0 ~ N(0, kT / k)``, the equilibrium in the trap at 0, from the replica's seed.

    ## Episode End
    Terminated after ``K = n_steps / control_interval`` steps (default 100 / 5 = 20);
    never truncated.

    ## Arguments
    ``task_kwargs`` takes the task's arguments (``lambda_f = 5``, ``t_f = 1``, ``mu = 1``,
    ``k = 1``, ``kT = 1``, ``n_steps = 100``, ``method = "exact_ou"``, ``low``, ``high``);
    the other arguments are those of :class:`~controlmd_envs.control_env.ControlEnv`,
    with ``control_interval = 5`` by default.

    >>> import controlmd_envs, gymnasium as gym
    >>> env = gym.make("controlmd/TrapDrag-v0", task_kwargs={"lambda_f": 3.0})
    >>> obs, info = env.reset(seed=0)
    >>> for _ in range(20):
    ...     obs, reward, terminated, truncated, info = env.step(env.action_space.sample() * 0)
    >>> terminated, truncated, info["md_steps"]
    (True, False, 100)

    ## Version History
    * v0: initial version.
    """

    task_name = "trap_drag"
    default_control_interval = 5
