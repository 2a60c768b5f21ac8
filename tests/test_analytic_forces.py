"""Analytic-force fast paths (:mod:`controlmd.potentials.analytic`) against the generic
autograd terms in float64: energies, forces, finite differences, and pathwise gradients
through a trajectory."""

from __future__ import annotations

import torch

from controlmd.dynamics.brownian import Brownian
from controlmd.potentials.analytic import DenseMorse, ScaledDense
from controlmd.potentials.external import ScaledPotential
from controlmd.potentials.pair import Morse
from controlmd.protocols import PiecewiseConstant
from controlmd.rng import ReplicaRNG
from controlmd.simulate import simulate
from controlmd.space import free, periodic

F64 = torch.float64


def _gas(B: int, N: int, box: float, seed: int) -> torch.Tensor:
    """Random positions ``[B, N, 2]`` with some pairs near the well and beyond the cutoff."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, N, 2, generator=g, dtype=F64) * box


def test_dense_morse_matches_morse_and_autograd() -> None:
    space = periodic(6.05, dim=2)
    R = _gas(16, 7, 6.05, 0)
    ref = Morse(space, sigma=1.0, epsilon=1.7, alpha=6.0, r_cut=2.5, shift="none")
    fast = DenseMorse(space, sigma=1.0, epsilon=1.7, alpha=6.0, r_cut=2.5)
    E_ref, F_ref = ref.energy_and_forces(R, None)  # autograd
    E, F = fast.energy_and_forces(R, None)
    assert (E_ref != 0).all()
    torch.testing.assert_close(E, E_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(F, F_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.energy(R), E_ref, rtol=1e-13, atol=1e-13)


def test_dense_morse_forces_are_minus_the_energy_gradient() -> None:
    """Central finite differences of the energy (free space, no cutoff crossing)."""
    fast = DenseMorse(free(), sigma=1.0, epsilon=1.0, alpha=4.0, r_cut=50.0)
    R = _gas(2, 5, 3.0, 1)
    _, F = fast.energy_and_forces(R)
    h = 1e-6
    num = torch.zeros_like(R)
    for b in range(2):
        for i in range(5):
            for k in range(2):
                Rp, Rm = R.clone(), R.clone()
                Rp[b, i, k] += h
                Rm[b, i, k] -= h
                num[b, i, k] = -(fast.energy(Rp)[b] - fast.energy(Rm)[b]) / (2 * h)
    torch.testing.assert_close(F, num, rtol=1e-6, atol=1e-7)


def test_scaled_dense_pathwise_gradient_equals_autograd_path() -> None:
    """Same trajectory and the same protocol gradient through 30 Brownian steps as
    eps(t) * Morse with autograd forces."""
    space = periodic(6.05, dim=2)
    # a loose hexagon (neighbours 1.1 apart, inside the well's range) plus small offsets
    ang = torch.arange(6, dtype=F64) * (torch.pi / 3)
    hexagon = torch.cat(
        [torch.zeros(1, 2, dtype=F64), 1.1 * torch.stack([ang.cos(), ang.sin()], -1)]
    )
    R0 = 3.0 + hexagon + 0.05 * _gas(4, 7, 1.0, 2)

    def run(fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        proto = PiecewiseConstant(t_final=0.009, n_pieces=3, low=2.0, high=10.0, init=6.0)
        if fast:
            pot = ScaledDense(DenseMorse(space, alpha=6.0, r_cut=2.5), proto)
        else:
            pot = ScaledPotential(Morse(space, alpha=6.0, r_cut=2.5, shift="none"), proto)
        bd = Brownian(pot, dt=3e-4, kT=1.0, gamma=1.0, space=space)
        final = simulate(bd, bd.init(R0, rng=ReplicaRNG(3, 4)), 30).final
        loss = (final.R.sin() ** 2).sum()
        (g,) = torch.autograd.grad(loss, [next(proto.parameters())])
        return final.R.detach(), g

    R_fast, g_fast = run(True)
    R_ref, g_ref = run(False)
    torch.testing.assert_close(R_fast, R_ref, rtol=1e-11, atol=1e-11)
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-12)


def test_scaled_dense_no_graph_without_grad() -> None:
    space = periodic(6.05, dim=2)
    proto = PiecewiseConstant(t_final=1.0, n_pieces=2, low=2.0, high=10.0, init=6.0)
    pot = ScaledDense(DenseMorse(space, alpha=6.0, r_cut=2.5), proto)
    with torch.no_grad():
        E, F = pot.energy_and_forces(_gas(3, 7, 6.05, 4), torch.tensor(0.2, dtype=F64))
    assert not E.requires_grad and not F.requires_grad
    E2, F2 = ScaledPotential(
        Morse(space, alpha=6.0, r_cut=2.5, shift="none"), proto
    ).energy_and_forces(_gas(3, 7, 6.05, 4), torch.tensor(0.2, dtype=F64), create_graph=False)
    torch.testing.assert_close(E, E2, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(F, F2, rtol=1e-12, atol=1e-12)
