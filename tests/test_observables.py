"""Observables: thermodynamic estimators, RDF normalization, polymer metrics, native contacts."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import assert_close, fd_tol

from controlmd import ControlMDError, free, periodic
from controlmd.observables import (
    degrees_of_freedom,
    end_to_end_distance,
    kinetic_energy,
    native_contact_fraction,
    native_contacts,
    pressure,
    radius_of_gyration,
    rdf,
    rdf_histogram,
    temperature,
    virial,
)
from controlmd.potentials import WCA, FENEBond, HarmonicBond, HarmonicTrap, LennardJones, Potential
from controlmd.space import Space

F64 = torch.float64


def test_kinetic_energy_temperature_and_dof() -> None:
    P = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]], dtype=F64)
    assert_close(kinetic_energy(P, 2.0), [1.25, 1.0])
    assert_close(kinetic_energy(P, torch.tensor([1.0, 4.0])), [0.5 + 0.5, 1.0 + 0.25])
    assert degrees_of_freedom(64, 3) == 189
    assert degrees_of_freedom(64, 3, momentum_conserved=False) == 192
    assert degrees_of_freedom(10, 2, n_constraints=9) == 9
    assert_close(temperature(P, 2.0, n_dof=4), [1.25 / 2, 0.5])
    # Maxwell-Boltzmann momenta at kT = 1.7 give kT back (4 standard errors)
    g = torch.Generator().manual_seed(0)
    m, kT, n = 1.5, 1.7, 20000
    Pmb = torch.randn(1, n, 3, generator=g, dtype=F64) * math.sqrt(m * kT)
    T = float(temperature(Pmb, m, degrees_of_freedom(n, 3, momentum_conserved=False)))
    assert abs(T - kT) < 4 * kT * math.sqrt(2 / (3 * n))
    with pytest.raises(ControlMDError, match="no degrees of freedom left"):
        degrees_of_freedom(1, 3)
    with pytest.raises(ControlMDError, match=r"mass must be a scalar or \[N\] = \[2\]"):
        kinetic_energy(P, torch.ones(3))


def _jittered_lattice(
    B: int, d: int, n: int, L: float, seed: int, jitter: float = 0.3
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    axes = [torch.arange(n, dtype=F64) * (L / n)] * d
    R = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(1, -1, d)
    return R + jitter * (torch.rand(B, *R.shape[1:], generator=g, dtype=F64) - 0.5)


@pytest.mark.parametrize("d", [2, 3])
def test_virial_equals_volume_derivative_of_energy(d: int) -> None:
    """W = -dU/d lambda under uniform scaling of positions and box (central difference)."""
    L = 7.0
    R = _jittered_lattice(2, d, 5 if d == 3 else 7, L, seed=d)

    def make(space: Space) -> Potential:
        return (
            LennardJones(space, r_cut=2.5, shift="force")
            + WCA(space, sigma=0.8)
            + HarmonicBond([[0, 1], [2, 3]], k=20.0, r0=1.0, space=space)
        )

    def scaled_energy(lam: float) -> torch.Tensor:
        return make(periodic(L * lam, dim=d)).energy(R * lam)

    h = 1e-6
    dU = (scaled_energy(1 + h) - scaled_energy(1 - h)) / (2 * h)
    W = virial(make(periodic(L, dim=d)), R)
    assert float(W.detach().abs().min()) > 1.0
    torch.testing.assert_close(W, -dU, **fd_tol().kwargs())
    # pressure = (2K + W) / (d V), with the ideal-gas kinetic part from kT
    p = pressure(make(periodic(L, dim=d)), R, space=periodic(L, dim=d), kT=1.3)
    assert_close(p, (R.shape[1] * d * 1.3 + W) / (d * L**d))
    with pytest.raises(ControlMDError, match="HarmonicTrap has no virial"):
        virial(make(periodic(L, dim=d)) + HarmonicTrap(1.0), R)


def test_pressure_is_differentiable_in_epsilon() -> None:
    space = periodic(6.0)
    R = _jittered_lattice(1, 3, 4, 6.0, seed=1)
    lj = LennardJones(space, learnable=["epsilon"], r_cut=2.5)
    p = pressure(lj, R, space=space, kT=1.0)
    (g,) = torch.autograd.grad(p.sum(), lj.epsilon)
    # the configurational part is linear in epsilon (= 1 here)
    assert_close(g, (p.detach() - 64 / 6.0**3).sum())


def _uniform(B: int, N: int, d: int, L: float, seed: int) -> torch.Tensor:
    return torch.rand(B, N, d, generator=torch.Generator().manual_seed(seed), dtype=F64) * L


@pytest.mark.parametrize("d,L", [(2, 20.0), (3, 10.0)])
def test_rdf_of_ideal_gas_is_one(d: int, L: float) -> None:
    space = periodic(L, dim=d)
    B, N = 8, 400
    R = _uniform(B, N, d, L, seed=d)
    r, g = rdf(R, space, r_max=4.0, n_bins=40, sigma=0.15)
    r_h, g_h = rdf_histogram(R, space, r_max=4.0, n_bins=20)
    assert r.shape == (40,) and g.shape == (B, 40) and g_h.shape == (B, 20)
    # pooled over replicas, each bin within 4 Poisson standard errors of 1 (smearing only
    # averages over neighbouring bins, which lowers the error)
    for rr, gg, width in ((r, g.mean(0), 0.1), (r_h, g_h.mean(0), 0.2)):
        shell = {2: 2 * math.pi * rr, 3: 4 * math.pi * rr**2}[d] * width
        expected_pairs = B * N * (N - 1) / 2 / L**d * shell
        se = 1 / torch.sqrt(expected_pairs)
        assert bool(((gg - 1).abs() < 4 * se).all()), ((gg - 1).abs() / se).max()


def test_rdf_counts_coordination_of_a_lattice() -> None:
    """Integral of (N-1)/V g(r) S(r) over the first shell = number of nearest neighbours."""
    n, a = 6, 1.0
    axes = [torch.arange(n, dtype=F64) * a] * 3
    R = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(1, -1, 3)
    space = periodic(n * a)
    N, V = R.shape[1], (n * a) ** 3
    for smeared in (True, False):
        if smeared:
            r, g = rdf(R, space, r_max=1.3, n_bins=130, sigma=0.03)
        else:
            r, g = rdf_histogram(R, space, r_max=1.3, n_bins=130)
        dr = 1.3 / 130
        coordination = float(((N - 1) / V * g[0] * 4 * math.pi * r**2 * dr).sum())
        # the histogram is exact up to the midpoint shell volume; smearing adds O(sigma^2/a^2)
        assert math.isclose(coordination, 6.0, rel_tol=2e-3), (smeared, coordination)
        assert abs(float(r[g[0].argmax()]) - a) < 0.011  # first peak at the lattice spacing


def test_rdf_gradient_matches_finite_differences() -> None:
    space = periodic(6.0, dim=2)
    R = _uniform(1, 14, 2, 6.0, seed=4)
    target = torch.linspace(0.5, 1.5, 20, dtype=F64)

    def loss(X: torch.Tensor) -> torch.Tensor:
        return ((rdf(X, space, r_max=2.0, n_bins=20, sigma=0.2)[1][0] - target) ** 2).sum()

    X = R.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(X), X)
    fd = torch.zeros(R.numel(), dtype=F64)
    h = 1e-6
    for k in range(fd.numel()):
        e = torch.zeros_like(fd)
        e[k] = h
        fd[k] = (loss(R + e.view_as(R)) - loss(R - e.view_as(R))) / (2 * h)
    assert float(grad.abs().max()) > 1e-3
    torch.testing.assert_close(grad, fd.view_as(R), **fd_tol().kwargs())


def test_rdf_bad_input() -> None:
    space = periodic(6.0)
    R = _uniform(1, 10, 3, 6.0, seed=0)
    with pytest.raises(
        ControlMDError, match=r"r_max \+ 4 sigma = 3\.4 exceeds half the shortest box side"
    ):
        rdf(R, space, r_max=3.0, n_bins=30, sigma=0.1)
    with pytest.raises(ControlMDError, match="needs the reference volume"):
        rdf(R, free(), r_max=2.0)
    with pytest.raises(ControlMDError, match="n_bins must be >= 1, got 0"):
        rdf_histogram(R, space, r_max=2.0, n_bins=0)
    bad = R.clone()
    bad[0, 1, 1] = float("nan")
    with pytest.raises(ControlMDError, match="R must be finite"):
        rdf(bad, space, r_max=2.0)


# --------------------------------------------------------------------------- polymers


def _helix(n: int = 22) -> torch.Tensor:
    k = torch.arange(n, dtype=F64)
    t = k * (5 * math.pi / (n - 1))
    return torch.stack([0.97 * torch.cos(t), 0.97 * torch.sin(t), 0.3 * k], -1)


def test_radius_of_gyration_and_end_to_end() -> None:
    R = torch.tensor([[[0.0, 0.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 4.0]]], dtype=F64)
    assert_close(radius_of_gyration(R), [1.0, 2.0])
    # masses 1 and 3: Rg^2 = m1 m2 / (m1 + m2)^2 r^2
    assert_close(
        radius_of_gyration(R, torch.tensor([1.0, 3.0])),
        [math.sqrt(3 / 16 * 4), math.sqrt(3 / 16 * 16)],
    )
    assert_close(end_to_end_distance(R), [2.0, 4.0])
    assert_close(end_to_end_distance(R, space=periodic(5.0, dim=2)), [2.0, 1.0])
    # straight chain of n beads at unit spacing: Rg^2 = (n^2 - 1) / 12
    n = 11
    line = torch.zeros(1, n, 3, dtype=F64)
    line[0, :, 0] = torch.arange(n, dtype=F64)
    assert_close(radius_of_gyration(line), [math.sqrt((n * n - 1) / 12)])


def test_native_contact_fraction() -> None:
    X = _helix()
    contacts, d_nat = native_contacts(X, cutoff=2.2, min_separation=3)
    assert contacts.shape[0] > 10 and bool(((contacts[:, 1] - contacts[:, 0]) >= 3).all())
    R = X.unsqueeze(0).repeat(3, 1, 1)
    R[1] = R[1] * 1.1  # every distance 10% longer: within tol = 0.2
    R[2] = R[2] * 1.5  # 50% longer: no contact formed
    assert_close(native_contact_fraction(R, contacts, d_nat, smooth=False), [1.0, 1.0, 0.0])
    q = native_contact_fraction(R, contacts, d_nat)
    assert_close(q[0], 1.0)  # Q = 1 on the native structure
    assert 0.5 < float(q[1]) < 1.0 and float(q[2]) < 1e-3
    # pull the second half of the chain far away: only contacts within one half survive
    R2 = X.unsqueeze(0).clone()
    R2[0, 11:] += torch.tensor([50.0, 0.0, 0.0], dtype=F64)
    exact = float(native_contact_fraction(R2, contacts, d_nat, smooth=False))
    same_half = ((contacts[:, 1] < 11) | (contacts[:, 0] >= 11)).double().mean()
    assert math.isclose(exact, float(same_half)) and 0 < exact < 1
    # the smooth Q is differentiable; its gradient pulls stretched contacts back in
    Rg = R[1:2].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(native_contact_fraction(Rg, contacts, d_nat).sum(), Rg)
    assert float((grad * (Rg.detach() - Rg.detach().mean(1, keepdim=True))).sum()) < 0
    with pytest.raises(ControlMDError, match=rf"d_native must have shape \[{contacts.shape[0]}\]"):
        native_contact_fraction(R, contacts, d_nat[:-1])
    with pytest.raises(ControlMDError, match="tol must be > 0"):
        native_contact_fraction(R, contacts, d_nat, tol=0.0)


def test_fene_virial() -> None:
    fene = FENEBond([[0, 1]], k=30.0, R0=1.5, space=periodic(10.0))
    R = torch.tensor([[[1.0, 1.0, 1.0], [2.0, 1.0, 1.0]]], dtype=F64)
    # one bond: W = r . F = -r dU/dr = -k r^2 / (1 - r^2 / R0^2)
    assert_close(virial(fene, R).detach(), [-(30.0 * 1.0 / (1 - 1.0 / 2.25))])
