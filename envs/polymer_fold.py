"""``controlmd/PolymerFold-v0``: fold a Go-model bead chain into its target structure."""

from __future__ import annotations

from controlmd_envs.task_env import TaskEnv

__all__ = ["PolymerFoldEnv"]


class PolymerFoldEnv(TaskEnv):
    """Fold a 22-bead Go-like chain (helix or hairpin target) by a time-dependent control.

    ## Description
    The ``polymer_fold`` task (:mod:`controlmd.tasks.polymer_fold`, reduced LJ units): one
    chain per replica starting as a random coil, Langevin BAOAB dynamics (``dt = 0.02``
    tau, 2000 steps = 40 tau by default). The agent sets the control channels chosen by
    the task's ``controls`` (default: the bath temperature) for each control interval.

    ## Action Space
    ``Box(-1, 1, (k,), float32)``, one entry per channel, mapped to
    ``low + (high - low) (a + 1) / 2``:

    ===========  ======================  ===============  ============  =======
    channel      coupling                a = -1           a = 1         unit
    ===========  ======================  ===============  ============  =======
    temperature  bath kT(t)              ``kT_min`` 0.1   ``kT_max`` 1.2  epsilon
    epsilon      scale of attractions    ``eps_min`` 0.25 ``eps_max`` 2   1
    tweezers     pulling force per pair  ``-force_max``   ``force_max``  eps/sig
    bias         pair-bias amplitudes    ``-bias_max``    ``bias_max``   epsilon
    ===========  ======================  ===============  ============  =======

    ## Observation Space
    ``"time"`` (default): ``[t / T]`` in [0, 1]. ``"features"``: adds
    ``tanh(f / feature_scale)`` of the task's features ``f`` = (native-contact fraction
    Q in [0, 1], Kabsch RMSD to the target in sigma, radius of gyration in sigma);
    ``"state"``: of the positions and momenta (``6 N`` numbers).

    ## Rewards
    The folded fraction of the final state (1 if the replica ends with ``Q >= 0.8`` and
    RMSD < 1 sigma, else 0) at the last step; with ``shaping = w``, the potential
    ``Phi = folded(s)`` pays ``w`` for each fold / unfold along the way (the episode's
    shaping sums to ``-w folded(s_0) = 0`` for a coil start).

    ## Starting State
    Self-avoiding random coils with native bonds and angles, Maxwell–Boltzmann momenta,
    from the replica's seed.

    ## Episode End
    Terminated after ``n_steps / control_interval`` steps (default 2000 / 100 = 20);
    never truncated.

    ## Arguments
    ``task_kwargs`` takes the task's arguments (``target``, ``controls``, bounds,
    ``n_steps``, ...; see the task module); the others are those of
    :class:`~controlmd_envs.control_env.ControlEnv`, ``control_interval`` defaulting to
    the smallest divisor of ``n_steps`` giving at most 20 steps.

    >>> import controlmd_envs, gymnasium as gym
    >>> env = gym.make("controlmd/PolymerFold-v0", task_kwargs={"n_steps": 200}, observation="features")
    >>> env.observation_space.shape, env.unwrapped.n_intervals
    ((4,), 20)

    ## Version History
    * v0: initial version.
    """

    task_name = "polymer_fold"
