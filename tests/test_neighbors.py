"""Neighbor lists: equal to the brute-force pair set; rebuild rule; energies equal dense ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from controlmd import ControlMDError, periodic
from controlmd.neighbors import NeighborList, NeighborPairs, brute_force_pairs
from controlmd.potentials import WCA, LennardJones, Morse
from controlmd.space import Space

F64 = torch.float64


def _exact_pairs(space: Space, R: torch.Tensor, r: float) -> set[tuple[int, int, int]]:
    """Reference pair set (replica, i, j), i < j, |r_ij| < r, from the full distance matrix."""
    N = R.shape[1]
    dR = space.displacement(R.unsqueeze(2), R.unsqueeze(1))  # [B, N, N, d]
    close = ((dR * dR).sum(-1) < r * r) & torch.ones(N, N, dtype=torch.bool).triu(1)
    return set(map(tuple, close.nonzero().tolist()))


def _as_set(pairs: NeighborPairs) -> set[tuple[int, int, int]]:
    b, i, j = pairs.local()
    return set(zip(b.tolist(), i.tolist(), j.tolist()))


@settings(max_examples=60, deadline=None)
@given(
    d=st.sampled_from([2, 3]),
    B=st.integers(1, 3),
    N=st.integers(2, 40),
    sides=st.lists(st.floats(6.0, 11.0), min_size=3, max_size=3),
    r_cut=st.floats(0.5, 1.8),
    skin=st.floats(0.0, 0.6),
    seed=st.integers(0, 2**31 - 1),
    method=st.sampled_from(["brute", "cell", "auto"]),
)
def test_neighbor_pairs_equal_brute_force(
    d: int, B: int, N: int, sides: list[float], r_cut: float, skin: float, seed: int, method: str
) -> None:
    space = periodic(sides[:d])
    g = torch.Generator().manual_seed(seed)
    R = torch.rand(B, N, d, generator=g, dtype=F64) * space.box
    # some positions exactly on or outside the box faces (unwrapped), to exercise wrapping
    R[:, 0] = space.box
    R[:, -1] = R[:, -1] - space.box
    nl = NeighborList(space, r_cut, skin=skin, method=method)
    if method == "cell" and min(sides[:d]) < 3 * (r_cut + skin):
        with pytest.raises(ControlMDError, match="needs >= 3 cells"):
            nl.allocate(R)
        return
    assert _as_set(nl.allocate(R)) == _exact_pairs(space, R, r_cut + skin)


def test_cell_and_brute_agree_on_large_system() -> None:
    for d, L, N in ((3, 12.0, 800), (2, 30.0, 700)):
        space = periodic(L, dim=d)
        R = torch.rand(2, N, d, generator=torch.Generator().manual_seed(d), dtype=F64) * L
        cell = NeighborList(space, 2.5, skin=0.3, method="cell", chunk_elements=50_000).allocate(R)
        brute = brute_force_pairs(space, R, 2.8, chunk_elements=50_000)
        assert len(cell) > 1000
        assert _as_set(cell) == _as_set(brute)


def _lattice_liquid(
    d: int, n_side: int, spacing: float, jitter: float, B: int, seed: int
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    axes = [torch.arange(n_side, dtype=F64) * spacing] * d
    sites = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, d)
    return sites + jitter * (torch.rand(B, *sites.shape, generator=g, dtype=F64) - 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("d", [2, 3])
def test_neighbor_list_energy_equals_dense(d: int, dtype: torch.dtype) -> None:
    n_side, a = (8, 1.1) if d == 3 else (16, 1.05)
    L = n_side * a
    space = periodic(L, dim=d)
    R = _lattice_liquid(d, n_side, a, 0.3, B=2, seed=0).to(dtype)
    nl = NeighborList(space, 2.5, skin=0.4)
    for dense, sparse in (
        (LennardJones(space, shift="force"), LennardJones(space, shift="force", neighbor_list=nl)),
        (Morse(space, alpha=3.0), Morse(space, alpha=3.0, neighbor_list=nl)),
        (
            WCA(space, exclude=[[0, 1], [2, 3]]),
            WCA(space, neighbor_list=NeighborList(space, 2 ** (1 / 6), exclude=[[1, 0], [2, 3]])),
        ),
    ):
        E0, F0 = dense.energy_and_forces(R)
        E1, F1 = sparse.energy_and_forces(R)
        assert_close(E1, E0, scale=100)
        assert_close(F1, F0, scale=100)
        assert_close(sparse.virial(R), dense.virial(R), scale=100)


def test_rebuild_rule_and_validity_between_rebuilds() -> None:
    space = periodic(9.0)
    R = _lattice_liquid(3, 8, 9.0 / 8, 0.2, B=2, seed=1)
    nl = NeighborList(space, 2.0, skin=0.5)
    lj = LennardJones(space, r_cut=2.0, neighbor_list=nl)
    dense = LennardJones(space, r_cut=2.0)
    g = torch.Generator().manual_seed(5)
    lj.energy(R)
    assert nl.n_builds == 1
    # small moves (< skin/2): no rebuild, and the list still holds every pair within r_cut
    for _ in range(3):
        step = torch.randn(R.shape, generator=g, dtype=F64)
        step = 0.24 * step / torch.linalg.vector_norm(step, dim=-1, keepdim=True).max()
        R_moved = space.shift(R, step)
        assert_close(lj.energy(R_moved), dense.energy(R_moved))
        assert nl.n_builds == 1
    within = _exact_pairs(space, R_moved, 2.0)
    assert within <= _as_set(nl.pairs)
    # one particle moving more than skin/2 triggers a rebuild
    R_far = R.clone()
    R_far[1, 7, 2] += 0.26
    nl.update(R_far)
    assert nl.n_builds == 2
    # a change of batch size rebuilds too
    nl.update(R_far[:1])
    assert nl.n_builds == 3 and nl.pairs.n_replicas == 1


def test_neighbor_list_energy_is_differentiable_and_sums_per_replica() -> None:
    space = periodic(8.0)
    R = _lattice_liquid(3, 6, 8.0 / 6, 0.3, B=3, seed=2)
    nl = NeighborList(space, 2.5)
    lj = LennardJones(space, neighbor_list=nl, learnable=["epsilon"])
    E = lj.energy(R)
    singles = torch.cat([LennardJones(space).energy(R[b : b + 1]) for b in range(3)])
    assert_close(E, singles, scale=100)
    (g,) = torch.autograd.grad(E.sum(), lj.epsilon)
    assert_close(g, singles.sum().detach())


def test_bad_neighbor_list_input() -> None:
    space = periodic(6.0)
    with pytest.raises(
        ControlMDError, match=r"r_cut \+ skin = 3\.2 exceeds half the shortest box side"
    ):
        NeighborList(space, 2.5, skin=0.7)
    with pytest.raises(ControlMDError, match=r"skin must be >= 0, got -0\.1"):
        NeighborList(space, 2.0, skin=-0.1)
    with pytest.raises(ControlMDError, match="unknown method 'verlet'"):
        NeighborList(space, 2.0, method="verlet")
    with pytest.raises(
        ControlMDError, match=r"neighbor_list\.r_cut = 1 is shorter than this term's r_cut = 2\.5"
    ):
        LennardJones(space, neighbor_list=NeighborList(space, 1.0))
    with pytest.raises(ControlMDError, match="needs >= 3 cells"):
        NeighborList(space, 2.0, method="cell").allocate(torch.rand(1, 5, 3, dtype=F64))
    nl = NeighborList(space, 2.0)
    R = torch.rand(1, 5, 3, dtype=F64) * 6
    nl.allocate(R)
    R[0, 3, 1] = float("inf")
    with pytest.raises(
        ControlMDError,
        match=r"R must be finite; found 1 non-finite entries, first at index \(0, 3, 1\)",
    ):
        nl.update(R)
    with pytest.raises(ControlMDError, match=r"R must have shape \[B, N, d\]"):
        nl.allocate(R[0])
