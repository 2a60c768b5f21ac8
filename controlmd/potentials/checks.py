"""Checked entry points to the energy: finite inputs in, finite energies and forces out.

The methods ``Potential.energy`` / ``Potential.energy_and_forces`` are the unchecked hot
path that integrators call every step (a simulation checks its state every
``check_every`` steps instead, see :func:`~controlmd.simulate.simulate`). The functions
here check their input and their result and raise
:class:`~controlmd.errors.ControlMDError` naming the argument, the replica and, for
overlapping particles, the closest pair -- never a silent NaN.
"""

from __future__ import annotations

import torch

from controlmd._validation import check_positions
from controlmd.errors import ControlMDError
from controlmd.potentials.base import Potential, SumPotential
from controlmd.space import Space, free

Tensor = torch.Tensor

__all__ = ["energy_and_forces", "validate_configuration"]


def energy_and_forces(
    potential: Potential,
    R: Tensor,
    t: Tensor | float | None = None,
    *,
    create_graph: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Energies ``[B]`` and forces ``F = -dE/dR`` ``[B, N, d]``, checked.

    Args:
        potential: the energy.
        R: positions ``[B, N, d]`` (finite, float32/float64; ``d`` the box's dimension).
        t: time passed to time-dependent terms.
        create_graph: keep the graph of the force computation so that losses downstream
            of the forces (i.e. of the trajectory) can be differentiated with respect to
            potential/field parameters and earlier states. ``None`` means
            ``torch.is_grad_enabled()``.

    :raises ControlMDError: for positions of the wrong shape or dtype, NaN/inf positions
        (naming the replica), or a non-finite energy or force (naming the replica and the
        closest pair).
    """
    box = _find_space(potential).box
    check_positions("R", R, dim=None if box is None else int(box.shape[0]))
    if t is not None and not bool(torch.isfinite(torch.as_tensor(t)).all()):
        raise ControlMDError(f"t must be finite, got {t!r}")
    E, F = potential.energy_and_forces(R, t, create_graph=create_graph)
    _check_result(potential, R, E, F, space=None, name="R")
    return E, F


def validate_configuration(
    potential: Potential,
    R: Tensor,
    t: Tensor | float | None = None,
    *,
    space: Space | None = None,
    name: str = "R",
) -> None:
    """Check positions once, at a boundary (initial state, before a run).

    Raises :class:`~controlmd.errors.ControlMDError` for a wrong shape, NaN/inf positions,
    or a configuration whose energy or forces are not finite (overlapping particles whose
    forces overflow); the message names the replica, the closest pair and its distance.

    Args:
        potential: the energy.
        R: positions ``[B, N, d]``.
        t: time for time-dependent terms.
        space: box used to find the closest pair (default: the potential's ``space``).
        name: the argument name used in messages.
    """
    check_positions(name, R)
    with torch.no_grad():
        E, F = potential.energy_and_forces(R.detach(), t, create_graph=False)
    _check_result(potential, R, E, F, space=space, name=name)


def _check_result(
    potential: Potential, R: Tensor, E: Tensor, F: Tensor, *, space: Space | None, name: str
) -> None:
    """Raise, naming the first replica and the likely cause, unless ``E`` and ``F`` are finite."""
    with torch.no_grad():
        bad = ~(torch.isfinite(E) & torch.isfinite(F).flatten(1).all(dim=1))
    if not bool(bad.any()):
        return
    b = int(bad.nonzero()[0])
    msg = f"{name}: energy or forces of replica {b} are not finite (E = {float(E[b]):.6g})"
    hints = [h for term in _leaf_terms(potential) if (h := _diagnose(term, R)) is not None]
    if hints:
        raise ControlMDError(msg + "; " + "; ".join(hints))
    space = space if space is not None else _find_space(potential)
    N = R.shape[1]
    if N > 1:
        i, j = torch.triu_indices(N, N, offset=1)
        dR = space.displacement(R[b, i], R[b, j]).detach()
        r = torch.linalg.vector_norm(dR, dim=-1)
        k = int(torch.argmin(r))
        msg += (
            f"; closest pair: particles {int(i[k])} and {int(j[k])} at distance {float(r[k]):.6g}, "
            "so repulsive forces overflow. Start from non-overlapping positions (a lattice, or "
            "push overlapping particles apart first)"
        )
    raise ControlMDError(msg)


def _leaf_terms(potential: Potential) -> list[Potential]:
    """The terms of a sum, looking through wrappers that hold a ``base`` term."""
    if isinstance(potential, SumPotential):
        return [leaf for term in potential.terms for leaf in _leaf_terms(term)]  # type: ignore[arg-type]
    base = getattr(potential, "base", None)
    return _leaf_terms(base) if isinstance(base, Potential) else [potential]


def _diagnose(term: Potential, R: Tensor) -> str | None:
    diagnose = getattr(term, "diagnose", None)
    return diagnose(R) if callable(diagnose) else None


def _find_space(potential: Potential) -> Space:
    for term in _leaf_terms(potential):
        s = getattr(term, "space", None)
        if isinstance(s, Space) and s.periodic:
            return s
    return free()
