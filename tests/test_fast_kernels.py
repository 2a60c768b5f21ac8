"""Fused analytic LJ kernel (controlmd.potentials.lj_fused) against the autograd path.

``LennardJones.energy_and_forces`` uses the fused kernel; ``Potential.energy_and_forces``
(the base-class implementation) differentiates ``LennardJones.energy`` with autograd and
is the reference here.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close, tol

from controlmd.neighbors import NeighborList
from controlmd.potentials import WCA, LennardJones
from controlmd.potentials.base import Potential
from controlmd.potentials.lj_fused import LJEnergyForces, fused_supported
from controlmd.space import free, periodic

F64 = torch.float64
L = 5.0


def _config(B: int, N: int, d: int, seed: int, r_min: float = 0.8) -> torch.Tensor:
    """Random positions in [0, L)^d, no pair (minimum image) closer than ``r_min``."""
    g = torch.Generator().manual_seed(seed)
    space = periodic(L, dim=d)
    out = []
    for _ in range(B):
        pts: list[torch.Tensor] = []
        while len(pts) < N:
            x = torch.rand(d, generator=g, dtype=F64) * L
            if all(float(torch.linalg.vector_norm(space.displacement(x, p))) > r_min for p in pts):
                pts.append(x)
        out.append(torch.stack(pts))
    return torch.stack(out)


def _make(kind: str, shift: str, d: int, selection: str, learnable: bool = False):
    space = periodic(L, dim=d)
    nl = NeighborList(space, 2.0, skin=0.3) if selection == "neighbor_list" else None
    if kind == "wca":
        return WCA(space, sigma=1.1, epsilon=0.7, neighbor_list=nl, learnable=learnable)
    return LennardJones(
        space,
        sigma=0.95,
        epsilon=1.3,
        r_cut=2.0,
        shift=shift,
        neighbor_list=nl,
        learnable=learnable,
    )


CASES = [("lj", "energy"), ("lj", "force"), ("lj", "none"), ("wca", "energy")]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("selection", ["dense", "neighbor_list"])
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("kind,shift", CASES)
def test_fused_energy_and_forces_match_autograd(
    kind: str, shift: str, d: int, selection: str, dtype: torch.dtype
) -> None:
    pot = _make(kind, shift, d, selection)
    assert fused_supported(pot)
    R = _config(2, 12, d, seed=d).to(dtype)
    E, F = pot.energy_and_forces(R)
    E_ref, F_ref = Potential.energy_and_forces(pot, R, create_graph=False)
    assert E.shape == (2,) and F.shape == R.shape and F.dtype == dtype
    assert float(F_ref.abs().max()) > 1e-2  # the configuration exercises the term
    assert_close(E, E_ref.to(F64) if dtype == F64 else E_ref, scale=10)
    torch.testing.assert_close(F, F_ref, **tol(dtype).kwargs(scale=100))


def test_fused_free_space_without_cutoff() -> None:
    pot = LennardJones(free(), sigma=1.0, epsilon=1.0, r_cut=None, shift="none")
    R = _config(1, 6, 3, seed=5)
    E, F = pot.energy_and_forces(R)
    E_ref, F_ref = Potential.energy_and_forces(pot, R)
    assert_close(E, E_ref)
    assert_close(F, F_ref, scale=10)
    # minimum of the pair at 2^(1/6) sigma: E = -epsilon, zero force
    dimer = torch.zeros(1, 2, 3, dtype=F64)
    dimer[0, 1, 0] = 2 ** (1 / 6)
    E, F = pot.energy_and_forces(dimer)
    assert_close(E, [-1.0])
    assert_close(F, torch.zeros_like(F), scale=100)


@pytest.mark.parametrize("selection", ["dense", "neighbor_list"])
@pytest.mark.parametrize("kind,shift", CASES)
def test_fused_backward_matches_autograd(kind: str, shift: str, selection: str) -> None:
    """The analytic backward (Hessian-vector product, d/dsigma, d/depsilon) equals autograd's
    double backward, for cotangents on both E and F."""
    R = _config(2, 12, 3, seed=11)
    g = torch.Generator().manual_seed(3)
    gE = torch.randn(2, generator=g, dtype=F64)
    gF = torch.randn(R.shape, generator=g, dtype=F64)
    grads = []
    for fused in (True, False):
        pot = _make(kind, shift, 3, selection, learnable=True)
        Rg = R.clone().requires_grad_(True)
        if fused:
            E, F = pot.energy_and_forces(Rg, create_graph=True)
        else:
            E, F = Potential.energy_and_forces(pot, Rg, create_graph=True)
        loss = (E * gE).sum() + (F * gF).sum()
        grads.append(torch.autograd.grad(loss, [Rg, pot.sigma, pot.epsilon]))
    for fused_g, ref_g in zip(*grads):
        assert float(ref_g.abs().max()) > 0
        assert_close(fused_g, ref_g, scale=100)


def test_fused_function_gradcheck() -> None:
    """``LJEnergyForces`` against central finite differences (torch.autograd.gradcheck)."""
    pot = _make("lj", "force", 3, "dense")
    from controlmd.potentials.lj_fused import _pair_index

    R = _config(1, 5, 3, seed=2).requires_grad_(True)
    pairs = _pair_index(pot, R)
    sigma = torch.tensor(0.95, dtype=F64, requires_grad=True)
    eps = torch.tensor(1.3, dtype=F64, requires_grad=True)

    def fn(
        R: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return LJEnergyForces.apply(R, sigma, eps, pairs, pot.space.displacement, 2.0, "force")

    assert torch.autograd.gradcheck(fn, (R, sigma, eps), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_fused_second_derivative_raises() -> None:
    pot = _make("lj", "energy", 3, "dense", learnable=True)
    R = _config(1, 6, 3, seed=4).requires_grad_(True)
    _, F = pot.energy_and_forces(R, create_graph=True)
    (g,) = torch.autograd.grad((F * F).sum(), pot.epsilon, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g, pot.epsilon)


def test_no_graph_unless_asked() -> None:
    pot = _make("lj", "energy", 3, "dense", learnable=True)
    R = _config(1, 6, 3, seed=6)
    with torch.no_grad():
        E, F = pot.energy_and_forces(R)
    assert not E.requires_grad and not F.requires_grad
    E, F = pot.energy_and_forces(R.requires_grad_(True), create_graph=False)
    assert not E.requires_grad and not F.requires_grad
    E, F = pot.energy_and_forces(R)  # grad enabled and epsilon learnable: graph kept
    assert F.requires_grad


def test_per_pair_parameters_fall_back_to_autograd() -> None:
    space = periodic(L)
    pairs = [[0, 1], [2, 3], [1, 4]]
    pot = LennardJones(space, pairs=pairs, sigma=[1.0, 0.9, 1.1], r_cut=2.0)
    assert not fused_supported(pot)
    R = _config(1, 5, 3, seed=7)
    E, F = pot.energy_and_forces(R)
    E_ref, F_ref = Potential.energy_and_forces(pot, R)
    assert_close(E, E_ref)
    assert_close(F, F_ref)
    # scalar parameters with fixed pairs use the fused kernel
    pot = LennardJones(space, pairs=pairs, r_cut=2.0)
    assert fused_supported(pot)
    E, F = pot.energy_and_forces(R)
    E_ref, F_ref = Potential.energy_and_forces(pot, R)
    assert_close(E, E_ref)
    assert_close(F, F_ref, scale=10)


def test_pair_layout_follows_neighbor_list_rebuilds() -> None:
    """After particles move past skin/2 the list is rebuilt and the fused kernel uses the
    new pairs: energies and forces still equal the dense (all-pairs) ones."""
    space = periodic(L)
    nl = NeighborList(space, 2.0, skin=0.2)
    pot_nl = LennardJones(space, r_cut=2.0, neighbor_list=nl)
    pot_dense = LennardJones(space, r_cut=2.0)
    R = _config(2, 14, 3, seed=8)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        E, F = pot_nl.energy_and_forces(R)
        E_ref, F_ref = pot_dense.energy_and_forces(R)
        assert_close(E, E_ref, scale=10)
        assert_close(F, F_ref, scale=100)
        R = space.wrap(R + 0.15 * torch.randn(R.shape, generator=g, dtype=F64))
    assert nl.n_builds >= 3


def test_parameter_update_is_seen() -> None:
    """In-place updates of epsilon (an optimizer step) change the no-grad fast path too."""
    pot = _make("lj", "energy", 3, "dense", learnable=True)
    R = _config(1, 6, 3, seed=9)
    with torch.no_grad():
        E1, _ = pot.energy_and_forces(R)
        pot.epsilon.mul_(2.0)
        E2, _ = pot.energy_and_forces(R)
    assert_close(E2, 2.0 * E1)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n_pairs", [0, 1])
def test_tiny_pair_lists(n_pairs: int, dtype: torch.dtype) -> None:
    """One pair (a [d, 1] layout) and no pair at all: exact zeros off the bond axis."""
    pot = LennardJones(periodic(L), r_cut=2.0)
    R = torch.zeros(1, 2, 3, dtype=dtype)
    R[0, 1, 0] = 1.2 if n_pairs else 2.4
    E, F = pot.energy_and_forces(R)
    assert torch.equal(F[..., 1:], torch.zeros_like(F[..., 1:]))
    E_ref, F_ref = Potential.energy_and_forces(pot, R, create_graph=False)
    torch.testing.assert_close(F, F_ref, **tol(dtype).kwargs(scale=100))
    torch.testing.assert_close(E, E_ref, **tol(dtype).kwargs(scale=100))
    assert (float(F.abs().max()) > 0) == bool(n_pairs)


def test_pair_index_incidence_matrix() -> None:
    """A pair list given in any order (and with ``i > j`` pairs): the CSR incidence matrix
    is valid (sorted columns per row) with one +1 and one -1 per pair, and gather +
    scatter of an odd pair function ``h(X_i - X_j)`` equals an explicit loop over pairs."""
    from controlmd.potentials.lj_fused import PairIndex, _gather_pairs, _scatter_pairs

    g = torch.Generator().manual_seed(3)
    B, N, d = 2, 7, 3
    pairs = [
        (b * N + i, b * N + j)
        for b in range(B)
        for i in range(N)
        for j in range(N)
        if i != j and float(torch.rand(1, generator=g)) < 0.4
    ]
    ij = torch.tensor(pairs)[torch.randperm(len(pairs), generator=g)]
    index = PairIndex.from_flat(ij[:, 0], ij[:, 1], B, N, d, F64)
    A = index.incidence
    with torch.sparse.check_sparse_tensor_invariants():
        dense = torch.sparse_csr_tensor(
            A.crow_indices(), A.col_indices(), A.values(), A.shape
        ).to_dense()
    assert dense.shape == (B * N, len(pairs))
    assert torch.equal(dense.sum(0), torch.zeros(len(pairs), dtype=F64))
    assert torch.equal(dense.abs().sum(0), torch.full((len(pairs),), 2.0, dtype=F64))
    X = torch.randn(B, N, d, generator=g, dtype=F64)
    dX = _gather_pairs(X, index)
    F = _scatter_pairs(dX * (dX * dX).sum(-1, keepdim=True), index, X.shape)
    ref = torch.zeros(B * N, d, dtype=F64)
    Xf = X.reshape(B * N, d)
    for i, j in pairs:
        h = (Xf[i] - Xf[j]) * float(((Xf[i] - Xf[j]) ** 2).sum())
        ref[i] += h
        ref[j] -= h
    torch.testing.assert_close(F.reshape(B * N, d), ref)
