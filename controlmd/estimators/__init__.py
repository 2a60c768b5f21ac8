"""Gradient estimators: d(expected loss)/d(theta) from simulated replicas.

An estimator turns one batch of rollouts into a gradient of the objective
``<loss> + protocol penalty`` with respect to the trainable parameters (the protocol's, then
the task's own). The trainer selects one by name (``[train] estimator``); a task declares
which it supports in ``capabilities.estimators``.

* ``"pathwise"`` (default): differentiate the surrogate loss through the simulation with
  the noise held fixed (reparameterization); the path through the steps is the simulate
  option ``gradient``: ``"direct"``, ``"checkpoint"`` (recompute windows of ``window``
  steps), ``"truncated"`` (detach every ``window`` steps) or ``"adjoint"``.
* ``"score"``: pathwise at fixed trajectory plus the score-function (REINFORCE) term
  (Engel, Smith & Brenner, PRX 13, 041032 (2023)):
  ``grad <L> = < dL/dtheta |_path > + < (L - b) dlog P[path | theta] / dtheta >``.
  The path is the sequence of positions, detached after every step; momenta and
  accumulators (the protocol work) keep their explicit dependence on theta. For overdamped
  dynamics ``log P`` is the sum of the Gaussian transition log-densities of the integrator
  (mean and width read off the integrator's own step at zero and unit noise, so
  Euler–Maruyama and the exact OU step are both handled); for Langevin BAOAB it is the
  Gaussian density of the O step's velocity noise, recovered from consecutive positions
  (:meth:`~controlmd.dynamics.langevin.Langevin.score_step`). NVE and Nosé–Hoover dynamics
  are deterministic: no score term, refused. ``b`` is the leave-one-out mean of the
  per-replica losses over the whole batch.
* ``"multiwindow"``: the horizon cut into ``windows`` equal windows; window ``k``'s surrogate
  (the task loss at its end, weighted by ``window_weights[k]``) is differentiated through
  window ``k`` only and the windows' gradients are summed. Biased (an early window is
  credited with the loss at its own end, not with the final outcome) but finite; with one
  window it is the pathwise estimator.
* ``"mixed"``: the score function for the steps before the last of ``windows`` equal
  windows, the pathwise derivative (of the task's loss) through the last window from the
  sampled state at its start: ``grad <L> = < (L - b) dlog P[x_1..x_s | theta]/dtheta > +
  < dL/dtheta |_{x_s} >``, unbiased; with one window it is ``pathwise`` on the loss.
* ``"forward"``: forward-mode AD, one dual-number rollout per protocol parameter (for
  protocols with few parameters; at most :data:`MAX_FORWARD_PARAMETERS`).

``chunk`` (``pathwise``, ``score``, ``multiwindow``, ``mixed``): replicas are simulated and
differentiated in blocks of at most ``chunk``, and the per-replica gradient contributions
summed, so peak memory does not grow with the replica count (the score function's
leave-one-out baseline is applied after the last block, from the sums of ``L_i dlog P_i``
and ``dlog P_i``).

Every estimator also returns, when asked, the spread of the gradient over replica groups
(``grad_var``, ``grad_rel_std``, and ``grad_snr/<j>`` = |mean| / SE of the first
:data:`MAX_SNR_LOGGED` gradient entries), and counts the replica-steps it simulated.
"""

from __future__ import annotations

from collections.abc import Sequence

from controlmd.errors import ControlMDError
from controlmd.estimators.base import (
    MAX_FORWARD_PARAMETERS,
    MAX_SNR_LOGGED,
    GradientEstimate,
    GradientEstimator,
    RolloutBatch,
    per_replica_losses,
    slice_state,
    total_norm,
)
from controlmd.estimators.forward import ForwardEstimator
from controlmd.estimators.mixed import MixedEstimator
from controlmd.estimators.pathwise import MultiWindowEstimator, PathwiseEstimator
from controlmd.estimators.score import ScoreEstimator, score_rollout, transition_log_prob

__all__ = [
    "ESTIMATORS",
    "MAX_FORWARD_PARAMETERS",
    "MAX_SNR_LOGGED",
    "ForwardEstimator",
    "GradientEstimate",
    "GradientEstimator",
    "MixedEstimator",
    "MultiWindowEstimator",
    "PathwiseEstimator",
    "RolloutBatch",
    "ScoreEstimator",
    "make_estimator",
    "per_replica_losses",
    "score_rollout",
    "slice_state",
    "total_norm",
    "transition_log_prob",
]


ESTIMATORS: dict[str, type[GradientEstimator]] = {
    cls.name: cls
    for cls in (
        PathwiseEstimator,
        ScoreEstimator,
        MultiWindowEstimator,
        MixedEstimator,
        ForwardEstimator,
    )
}
"""Estimator name -> class (``[train] estimator``)."""


def make_estimator(
    name: str, *, chunk: int = 0, windows: int = 1, window_weights: Sequence[float] | None = None
) -> GradientEstimator:
    """The estimator registered as ``name``; an unknown name lists the valid ones.

    :param chunk: replicas simulated at once (0: all); ``pathwise``, ``score``,
        ``multiwindow`` and ``mixed``.
    :param windows: number of windows (``multiwindow`` and ``mixed``).
    :param window_weights: one weight >= 0 per window (``multiwindow`` only; default all 1).
    """
    if name not in ESTIMATORS:
        raise ControlMDError(
            f"unknown estimator {name!r}; expected one of: {', '.join(ESTIMATORS)}"
        )
    if (name not in ("multiwindow", "mixed") and windows != 1) or (
        name != "multiwindow" and window_weights
    ):
        raise ControlMDError(
            f"windows apply to estimator = 'multiwindow' or 'mixed', window_weights to "
            f"'multiwindow' only; got estimator = {name!r} with windows = {windows}, "
            f"window_weights = {list(window_weights or [])}"
        )
    if name == "mixed":
        if windows < 2:
            raise ControlMDError(
                f"estimator = 'mixed' needs windows >= 2 (the last one pathwise, the steps "
                f"before it by the score function), got windows = {windows}; with one window it "
                "is estimator = 'pathwise'"
            )
        return MixedEstimator(chunk=chunk, windows=windows)
    if name == "multiwindow":
        return MultiWindowEstimator(
            chunk=chunk, windows=windows, window_weights=list(window_weights or []) or None
        )
    if name == "forward":
        if chunk:
            raise ControlMDError(
                f"chunk = {chunk} does not apply to estimator = 'forward' (one dual-number "
                "rollout per parameter); use chunk = 0"
            )
        return ForwardEstimator()
    return ESTIMATORS[name](chunk=chunk)  # type: ignore[call-arg]
