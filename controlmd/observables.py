"""Observables of batched states, differentiable unless marked *exact*.

Units: reduced LJ units (lengths sigma, energies epsilon, mass m, kT in epsilon, pressure
epsilon / sigma^d). Positions ``R [B, N, d]``, momenta ``P [B, N, d]``; per-replica
outputs ``[B]``.

Degrees of freedom (the rule :func:`temperature` needs):
``n_dof = d N - d`` when the dynamics conserve total momentum (NVE, Nosé–Hoover applied
to all particles) and ``d N`` otherwise (Langevin, any external field or trap), minus the
number of holonomic constraints. :func:`degrees_of_freedom` computes it.

The differentiable RDF smears every pair distance with a Gaussian and divides by the same
smeared quantity for an ideal gas, so an ideal gas gives ``g = 1`` at every ``r``
(no ``sigma^2 / r^2`` bias near the origin). :func:`rdf_histogram` is the exact binned
estimator reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch

from controlmd._validation import check_int, check_positions, check_positive
from controlmd.errors import ControlMDError
from controlmd.neighbors import NeighborList, brute_force_pairs
from controlmd.potentials.base import Potential, SumPotential
from controlmd.space import Space, free

Tensor = torch.Tensor

__all__ = [
    "degrees_of_freedom",
    "end_to_end_distance",
    "kinetic_energy",
    "native_contact_fraction",
    "native_contacts",
    "pressure",
    "radius_of_gyration",
    "rdf",
    "rdf_histogram",
    "temperature",
    "virial",
]


# --------------------------------------------------------------------------- thermodynamics


def _mass_like(mass: float | Tensor, X: Tensor) -> Tensor:
    m = torch.as_tensor(mass, dtype=X.dtype, device=X.device)
    if m.ndim == 0:
        return m
    if m.ndim == 1 and m.shape[0] == X.shape[1]:
        return m.view(1, -1, 1)
    raise ControlMDError(
        f"mass must be a scalar or [N] = [{X.shape[1]}], got shape {tuple(m.shape)}"
    )


def kinetic_energy(P: Tensor, mass: float | Tensor = 1.0) -> Tensor:
    """``K = sum_i |p_i|^2 / (2 m_i)`` per replica ``[B]``.

    Args:
        P: momenta ``[B, N, d]``.
        mass: scalar or ``[N]``.
    """
    return (P * P / (2.0 * _mass_like(mass, P))).sum(dim=(-1, -2))


def degrees_of_freedom(
    n_particles: int, dim: int, *, momentum_conserved: bool = True, n_constraints: int = 0
) -> int:
    """``d N - d`` (momentum conserved) or ``d N`` (e.g. Langevin), minus constraints."""
    check_int("n_particles", n_particles)
    check_int("dim", dim)
    check_int("n_constraints", n_constraints, minimum=0)
    n = dim * n_particles - (dim if momentum_conserved else 0) - n_constraints
    if n < 1:
        raise ControlMDError(
            f"no degrees of freedom left: d N = {dim * n_particles}, "
            f"momentum_conserved = {momentum_conserved}, n_constraints = {n_constraints}"
        )
    return n


def temperature(P: Tensor, mass: float | Tensor, n_dof: int) -> Tensor:
    """Instantaneous kinetic temperature ``kT = 2 K / n_dof`` per replica ``[B]`` (energy units).

    Args:
        P: momenta ``[B, N, d]``.
        mass: scalar or ``[N]``.
        n_dof: degrees of freedom (see :func:`degrees_of_freedom` and the module docstring).
    """
    check_int("n_dof", n_dof)
    return 2.0 * kinetic_energy(P, mass) / n_dof


def virial(potential: Potential, R: Tensor, t: Tensor | float | None = None) -> Tensor:
    """``W = sum r_ij . F_ij`` per replica ``[B]`` (``-dU/d lambda`` under uniform scaling).

    Sums the ``virial`` of each term (pair and bonded terms provide one). Terms without a
    virial (traps, external fields: not translation invariant) raise.
    """
    if isinstance(potential, SumPotential):
        total = torch.zeros(R.shape[0], dtype=R.dtype, device=R.device)
        for term in potential.terms:
            total = total + virial(cast(Potential, term), R, t)
        return total
    fn = getattr(potential, "virial", None)
    if not callable(fn):
        raise ControlMDError(
            f"{type(potential).__name__} has no virial: pressure is defined for pair and bonded "
            "terms only (external fields and traps break translation invariance)"
        )
    W: Tensor = fn(R, t)
    return W


def pressure(
    potential: Potential,
    R: Tensor,
    *,
    space: Space,
    P: Tensor | None = None,
    mass: float | Tensor = 1.0,
    kT: float | None = None,
    t: Tensor | float | None = None,
) -> Tensor:
    """Virial pressure ``p = (2 K + W) / (d V)`` per replica ``[B]``.

    The kinetic part uses the momenta ``P`` (instantaneous pressure) or, if ``P`` is
    ``None``, the equipartition value ``2 K = d N kT``. ``W`` is :func:`virial`.

    Args:
        potential: the (translation-invariant) energy.
        R: positions ``[B, N, d]``.
        space: a periodic box (its volume is V).
        P: momenta ``[B, N, d]``, or ``None`` with ``kT``.
        mass: particle mass(es).
        kT: temperature for the kinetic part when ``P`` is ``None``.
        t: time for time-dependent terms.
    """
    if not space.periodic:
        raise ControlMDError("pressure needs a periodic box (a free space has no volume)")
    B, N, d = R.shape
    if P is not None:
        two_k = 2.0 * kinetic_energy(P, mass)
    elif kT is not None:
        check_positive("kT", kT)
        two_k = torch.full((B,), d * N * float(kT), dtype=R.dtype, device=R.device)
    else:
        raise ControlMDError("pressure needs momenta P or a temperature kT for its kinetic part")
    return (two_k + virial(potential, R, t)) / (d * space.volume())


# --------------------------------------------------------------------------- RDF


def _shell_measure(r: Tensor, d: int) -> Tensor:
    """Surface of the d-sphere of radius r: 2, 2 pi r, 4 pi r^2."""
    return {1: 2.0 * torch.ones_like(r), 2: 2.0 * math.pi * r, 3: 4.0 * math.pi * r * r}[d]


def _ball_volume(r: Tensor, d: int) -> Tensor:
    return {1: 2.0 * r, 2: math.pi * r * r, 3: 4.0 / 3.0 * math.pi * r**3}[d]


def _rdf_inputs(
    R: Tensor, space: Space, r_max: float, n_bins: int, volume: float | None
) -> tuple[float, float]:
    check_positions("R", R)
    check_positive("r_max", r_max)
    check_int("n_bins", n_bins)
    if R.shape[1] < 2:
        raise ControlMDError(f"an RDF needs at least 2 particles, got N = {R.shape[1]}")
    if R.shape[-1] not in (1, 2, 3):
        raise ControlMDError(f"RDF supports d = 1, 2, 3, got d = {R.shape[-1]}")
    if volume is None:
        if not space.periodic:
            raise ControlMDError("an RDF in free space needs the reference volume: pass volume=")
        volume = space.volume()
    check_positive("volume", volume)
    return float(volume), r_max / n_bins


def _pair_distances(
    R: Tensor, space: Space, r_list: float, neighbor_list: NeighborList | None
) -> tuple[Tensor, Tensor]:
    """Differentiable distances ``[M]`` of the pairs within ``r_list``, and their replicas."""
    if neighbor_list is not None:
        if neighbor_list.r_list < r_list:
            raise ControlMDError(
                f"neighbor_list radius r_cut + skin = {neighbor_list.r_list:g} is shorter than the "
                f"{r_list:g} this RDF needs"
            )
        nb = neighbor_list.update(R)
    else:
        with torch.no_grad():
            nb = brute_force_pairs(space, R, r_list)
    Rf = R.reshape(-1, R.shape[-1])
    dR = space.displacement(Rf[nb.i], Rf[nb.j])
    r2 = (dR * dR).sum(-1)
    r = torch.sqrt(torch.where(r2 > 0, r2, torch.ones_like(r2))) * (r2 > 0)
    return r, nb.replica


def rdf(
    R: Tensor,
    space: Space,
    *,
    r_max: float,
    n_bins: int = 100,
    sigma: float | None = None,
    volume: float | None = None,
    neighbor_list: NeighborList | None = None,
) -> tuple[Tensor, Tensor]:
    """Gaussian-smeared radial distribution function, differentiable in ``R``.

    ``g(r_k) = h(r_k) / h_ideal(r_k)`` with ``h(r) = sum_{i<j} G_sigma(r - r_ij)`` and
    ``h_ideal(r) = N (N - 1) / (2 V) int_0^inf S_d(s) G_sigma(r - s) ds`` (``S_d`` the
    sphere surface), ``G`` a normalized Gaussian truncated at 4 sigma. Only the
    ``~8 sigma / dr`` bins near each pair distance are touched.

    Args:
        R: positions ``[B, N, d]``.
        space: the box (periodic; in free space give ``volume``).
        r_max: largest distance (``r_max + 4 sigma`` <= half the box).
        n_bins: number of bins; centres ``r_k = (k + 1/2) r_max / n_bins``.
        sigma: smearing width (default: the bin width).
        volume: reference volume (default: the box volume).
        neighbor_list: reuse a list of radius >= ``r_max + 4 sigma`` instead of a
            brute-force pair search.

    Returns:
        ``(r [n_bins], g [B, n_bins])``.
    """
    V, dr = _rdf_inputs(R, space, r_max, n_bins, volume)
    sigma = dr if sigma is None else sigma
    check_positive("sigma", sigma)
    reach = 4.0 * sigma
    space.check_cutoff("r_max + 4 sigma", r_max + reach)
    B, N, d = R.shape
    centers = (torch.arange(n_bins, dtype=R.dtype, device=R.device) + 0.5) * dr
    r, replica = _pair_distances(R, space, r_max + reach, neighbor_list)

    K = math.ceil(2 * reach / dr) + 2
    k0 = torch.floor((r.detach() - reach) / dr - 0.5).long()
    k = k0.unsqueeze(-1) + torch.arange(K, device=R.device)  # [M, K]
    x = (k.to(R.dtype) + 0.5) * dr - r.unsqueeze(-1)
    ok = (k >= 0) & (k < n_bins) & (x.abs() <= reach)
    w = torch.exp(-0.5 * (x / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma) * ok
    flat = (replica.unsqueeze(-1) * n_bins + k.clamp(0, n_bins - 1)).reshape(-1)
    h = torch.zeros(B * n_bins, dtype=R.dtype, device=R.device).index_add(0, flat, w.reshape(-1))
    h = h.view(B, n_bins)

    # smeared ideal-gas reference: quadrature of S_d(s) G(r_k - s) over |s - r_k| <= 4 sigma, s >= 0
    n_q = 401
    u = torch.linspace(-reach, reach, n_q, dtype=torch.float64)
    s = centers.detach().to(torch.float64).unsqueeze(-1) + u
    kern = torch.exp(-0.5 * (u / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)
    integrand = _shell_measure(s.clamp(min=0.0), d) * kern * (s >= 0)
    ideal = torch.trapezoid(integrand, u, dim=-1) * N * (N - 1) / (2.0 * V)
    return centers, h / ideal.to(R.dtype)


@torch.no_grad()
def rdf_histogram(
    R: Tensor, space: Space, *, r_max: float, n_bins: int = 100, volume: float | None = None
) -> tuple[Tensor, Tensor]:
    """Exact (binned, non-differentiable) RDF: pair counts over ideal-gas counts per shell.

    ``g_k = n_k / (N (N - 1) / (2 V) * V_shell,k)`` with ``V_shell,k`` the exact volume between
    ``k dr`` and ``(k + 1) dr``; an ideal gas gives ``E[g_k] = 1``.

    Returns:
        ``(r [n_bins] bin centres, g [B, n_bins])``.
    """
    V, dr = _rdf_inputs(R, space, r_max, n_bins, volume)
    space.check_cutoff("r_max", r_max)
    B, N, d = R.shape
    r, replica = _pair_distances(R.detach(), space, r_max, None)
    k = torch.clamp(torch.floor(r / dr).long(), max=n_bins - 1)
    counts = torch.bincount(replica * n_bins + k, minlength=B * n_bins).view(B, n_bins).to(R.dtype)
    edges = torch.arange(n_bins + 1, dtype=torch.float64) * dr
    shell = (_ball_volume(edges[1:], d) - _ball_volume(edges[:-1], d)).to(R.dtype)
    centers = (torch.arange(n_bins, dtype=R.dtype) + 0.5) * dr
    return centers, counts / (shell * N * (N - 1) / (2.0 * V))


# --------------------------------------------------------------------------- polymers


def radius_of_gyration(R: Tensor, mass: float | Tensor | None = None) -> Tensor:
    """``Rg = sqrt(sum_i m_i |r_i - r_cm|^2 / sum_i m_i)`` per replica ``[B]``.

    Uses the positions as given: pass unwrapped coordinates for a chain in a periodic box.
    """
    if mass is None:
        c = R.mean(dim=1, keepdim=True)
        return torch.sqrt(((R - c) ** 2).sum(-1).mean(-1))
    m = _mass_like(mass, R)
    m = m.expand(R.shape[0], R.shape[1], 1) if m.ndim == 3 else m * torch.ones_like(R[..., :1])
    c = (m * R).sum(1, keepdim=True) / m.sum(1, keepdim=True)
    return torch.sqrt((m[..., 0] * ((R - c) ** 2).sum(-1)).sum(-1) / m[..., 0].sum(-1))


def end_to_end_distance(
    R: Tensor, first: int = 0, last: int = -1, *, space: Space | None = None
) -> Tensor:
    """``|r_last - r_first|`` per replica ``[B]`` (minimum image if a periodic ``space`` is given)."""
    space = space if space is not None else free()
    dR = space.displacement(R[:, last], R[:, first])
    r2 = (dR * dR).sum(-1)
    return torch.sqrt(torch.where(r2 > 0, r2, torch.ones_like(r2))) * (r2 > 0)


def native_contacts(
    R_native: Tensor, *, cutoff: float = 2.2, min_separation: int = 3, space: Space | None = None
) -> tuple[Tensor, Tensor]:
    """Native contacts of a chain: pairs with ``|i - j| >= min_separation`` closer than ``cutoff``.

    Args:
        R_native: native positions ``[N, d]``.

    Returns:
        ``(contacts [C, 2], d_native [C])`` (float64 distances).
    """
    if R_native.ndim != 2:
        raise ControlMDError(f"R_native must have shape [N, d], got {tuple(R_native.shape)}")
    space = space if space is not None else free()
    N = R_native.shape[0]
    i, j = torch.triu_indices(N, N, offset=min_separation)
    r = torch.linalg.vector_norm(space.displacement(R_native[i], R_native[j]), dim=-1).to(
        torch.float64
    )
    keep = r < cutoff
    return torch.stack([i[keep], j[keep]], dim=1), r[keep]


def native_contact_fraction(
    R: Tensor,
    contacts: Tensor | Sequence[Sequence[int]],
    d_native: Tensor | Sequence[float],
    *,
    tol: float = 0.2,
    smooth: bool = True,
    sharpness: float = 10.0,
    space: Space | None = None,
) -> Tensor:
    """Fraction ``Q`` of native contacts formed, per replica ``[B]``.

    A contact ``c`` is formed when ``|r_c - d_c| < tol d_c``. The exact count
    (``smooth=False``, no gradient) is the reported metric. The smooth surrogate replaces
    the indicator by ``sigmoid(beta (1 - x^2)) / sigmoid(beta)`` with
    ``x = (r_c - d_c) / (tol d_c)`` and ``beta = sharpness``: exactly 1 at the native
    distance, ``~1/2`` at the tolerance edge, ``-> 0`` far from it.

    Args:
        R: positions ``[B, N, d]``.
        contacts: pairs ``[C, 2]``.
        d_native: native distances ``[C]``.
        tol: relative tolerance (> 0).
        smooth: differentiable surrogate (True) or exact count (False).
        sharpness: ``beta`` (> 0) of the surrogate.
        space: the box (default free space).
    """
    c = torch.as_tensor(contacts).long()
    dn = torch.as_tensor(d_native, dtype=R.dtype, device=R.device)
    if c.ndim != 2 or c.shape[1] != 2 or c.shape[0] == 0:
        raise ControlMDError(f"contacts must have shape [C, 2] with C >= 1, got {tuple(c.shape)}")
    if dn.shape != (c.shape[0],):
        raise ControlMDError(f"d_native must have shape [{c.shape[0]}], got {tuple(dn.shape)}")
    check_positive("tol", tol)
    check_positive("sharpness", sharpness)
    space = space if space is not None else free()
    dR = space.displacement(R[:, c[:, 0]], R[:, c[:, 1]])
    r = torch.sqrt((dR * dR).sum(-1))
    x = (r - dn) / (tol * dn)
    if not smooth:
        with torch.no_grad():
            return (x.abs() < 1.0).to(R.dtype).mean(-1)
    return (
        torch.sigmoid(sharpness * (1.0 - x * x))
        / torch.sigmoid(torch.tensor(sharpness, dtype=R.dtype))
    ).mean(-1)
