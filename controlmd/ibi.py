"""Iterative Boltzmann inversion (IBI): the standard baseline for fitting a pair potential to
a target RDF (Reith, Pütz & Müller-Plathe, J. Comput. Chem. 24, 1624 (2003)).

Units: reduced LJ units (distances in sigma, energies in epsilon, kT an energy).

Update rule (on the knots ``r_j`` of a tabulated pair potential, the last knot being the
cutoff):

    u_0(r)     = -kT ln g*(r)                                   (potential of mean force)
    u_{n+1}(r) = u_n(r) + alpha kT ln( g_n(r) / g*(r) )

``g*`` is the target, ``g_n`` the histogram RDF sampled with ``u_n``; ``alpha`` in (0, 1]
damps the update. Three details make it work on short, noisy runs:

- *Core.* Where either RDF is below ``g_floor`` the logarithm is undefined; the update is
  applied only on knots where both exceed it. Inside the core (left of the first such knot)
  the potential is continued linearly with the slope of its first two valid knots, made at
  least ``min_core_force`` steep, so particles never tunnel into an unsampled region.
- *Noise.* The update ``alpha kT ln(g_n/g*)`` is smoothed with a (1, 2, 1)/4 kernel
  (``smooth`` passes) before it is added.
- *Cutoff.* The potential is shifted after each update so that ``u(r_c) = 0``.
"""

from __future__ import annotations

import torch

from controlmd._validation import check_int, check_positive
from controlmd.errors import ControlMDError

Tensor = torch.Tensor

__all__ = ["ibi_initial_potential", "ibi_update"]


def ibi_initial_potential(
    r: Tensor, g_target: Tensor, *, kT: float, g_floor: float = 1e-3, min_core_force: float = 20.0
) -> Tensor:
    """Potential of mean force ``-kT ln g*(r)`` on the knots, core-extrapolated and shifted.

    :param r: knots ``[M]`` (sigma), uniform and increasing; ``r[-1]`` is the cutoff.
    :param g_target: target RDF on the knots ``[M]``.
    :param kT: temperature (energy).
    :param g_floor: below this g the logarithm is not taken (core region).
    :param min_core_force: smallest repulsive slope -du/dr (epsilon/sigma) of the core
        continuation.
    :return: ``u_0`` on the knots ``[M]`` (epsilon), ``u_0(r[-1]) = 0``.
    """
    _check_grid(r, g_target, "g_target")
    check_positive("kT", kT)
    valid = g_target > g_floor
    u = torch.zeros_like(r)
    u[valid] = -kT * torch.log(g_target[valid])
    return _finish(r, u, valid, min_core_force)


def ibi_update(
    r: Tensor,
    u: Tensor,
    g_sim: Tensor,
    g_target: Tensor,
    *,
    kT: float,
    alpha: float = 1.0,
    g_floor: float = 1e-3,
    smooth: int = 1,
    min_core_force: float = 20.0,
) -> Tensor:
    """One IBI step ``u + alpha kT ln(g_sim / g_target)`` (see the module docstring).

    :param r: knots ``[M]`` (sigma), uniform and increasing; ``r[-1]`` is the cutoff.
    :param u: current potential on the knots ``[M]`` (epsilon).
    :param g_sim: RDF sampled with ``u`` on the knots ``[M]``.
    :param g_target: target RDF on the knots ``[M]``.
    :param kT: temperature (energy).
    :param alpha: damping in (0, 1].
    :param g_floor: knots where either RDF is <= this are not updated (core).
    :param smooth: number of (1, 2, 1)/4 smoothing passes over the update.
    :param min_core_force: smallest repulsive slope of the core continuation.
    :return: the updated potential ``[M]``, shifted to 0 at the cutoff.
    """
    _check_grid(r, u, "u")
    _check_grid(r, g_sim, "g_sim")
    _check_grid(r, g_target, "g_target")
    check_positive("kT", kT)
    if not 0.0 < alpha <= 1.0:
        raise ControlMDError(f"alpha must be in (0, 1], got {alpha}")
    check_int("smooth", smooth, minimum=0)
    valid = (g_sim > g_floor) & (g_target > g_floor)
    du = torch.zeros_like(u)
    du[valid] = alpha * kT * torch.log(g_sim[valid] / g_target[valid])
    for _ in range(smooth):
        du = _smooth_masked(du, valid)
    return _finish(r, u + du, valid, min_core_force)


def _smooth_masked(x: Tensor, mask: Tensor) -> Tensor:
    """(1, 2, 1)/4 running mean over the masked entries (neighbours outside the mask ignored)."""
    w = mask.to(x.dtype)
    xm = x * w
    num = 2 * xm
    den = 2 * w
    num[1:] += xm[:-1]
    den[1:] += w[:-1]
    num[:-1] += xm[1:]
    den[:-1] += w[1:]
    return torch.where(mask, num / den.clamp_min(1e-300), x)


def _finish(r: Tensor, u: Tensor, valid: Tensor, min_core_force: float) -> Tensor:
    """Linear repulsive continuation left of the first valid knot, then ``u(r_c) = 0``."""
    idx = valid.nonzero().flatten()
    if idx.numel() < 2:
        raise ControlMDError(
            "IBI needs g(r) above g_floor on at least two knots; the target (or the sampled "
            "RDF) is zero almost everywhere: check the RDF range and the sampling"
        )
    i0 = int(idx[0])
    slope = (u[i0 + 1] - u[i0]) / (r[i0 + 1] - r[i0]) if bool(valid[i0 + 1]) else u.new_tensor(0.0)
    slope = torch.clamp(slope, max=-min_core_force)
    u = u.clone()
    u[:i0] = u[i0] + slope * (r[:i0] - r[i0])
    gap = ~valid
    gap[:i0] = False
    if bool(gap.any()):  # unsampled knots beyond the core: interpolate between neighbours
        ok = ~gap
        u[gap] = _interp(r[gap], r[ok], u[ok])
    return u - u[-1]


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation (constant extrapolation), like ``numpy.interp``."""
    i = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    w = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return f0 + w * (f1 - f0)


def _check_grid(r: Tensor, values: Tensor, name: str) -> None:
    if r.ndim != 1 or r.numel() < 3:
        raise ControlMDError(f"r must be a 1-D grid of >= 3 knots, got shape {tuple(r.shape)}")
    if values.shape != r.shape:
        raise ControlMDError(f"{name} must have the grid's shape {tuple(r.shape)}, got {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise ControlMDError(f"{name} must be finite")
