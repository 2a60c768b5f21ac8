"""Target geometries, Kabsch alignment and bond-graph cluster identification on hand-built
configurations with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from controlmd.errors import ControlMDError
from controlmd.observables import native_contacts
from controlmd.potentials.bonded import bond_angle
from controlmd.space import periodic
from controlmd.structures import (
    bond_graph,
    cluster_labels,
    hairpin,
    helix,
    hexagonal_cluster,
    kabsch_align,
    kabsch_rmsd,
    smooth_bond_count,
    target_cluster_fraction,
)


def _random_rotation(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    return q if torch.det(q) > 0 else -q


def _nonbonded_min(R: torch.Tensor) -> float:
    n = R.shape[0]
    i, j = torch.triu_indices(n, n, offset=2)
    return float((R[i] - R[j]).norm(dim=-1).min())


# ----------------------------------------------------------------------------- geometries


def test_helix_matches_the_paper_target() -> None:
    R = helix()
    assert R.shape == (22, 3)
    bonds = (R[1:] - R[:-1]).norm(dim=-1)
    torch.testing.assert_close(bonds, torch.full((21,), 0.97, dtype=torch.float64))
    contacts, _ = native_contacts(R, cutoff=2.2, min_separation=3)
    assert contacts.shape[0] == 42
    assert set((contacts[:, 1] - contacts[:, 0]).tolist()) == {7, 8, 9}
    # Scaled radius: 0.97 * 0.97 / (bond length before scaling).
    phi = math.pi * 5 / 21
    b_raw = math.sqrt((2 * 0.97 * math.sin(phi / 2)) ** 2 + 0.166**2)
    r_expected = 0.97 * 0.97 / b_raw
    # All beads lie on one cylinder: least-squares circle x^2 + y^2 + D x + E y + F = 0.
    x, y = R[:, 0], R[:, 1]
    M = torch.stack([x, y, torch.ones_like(x)], dim=-1)
    D, E, _ = torch.linalg.lstsq(M, -(x * x + y * y)[:, None]).solution[:, 0]
    r_xy = ((x + D / 2) ** 2 + (y + E / 2) ** 2).sqrt()
    torch.testing.assert_close(r_xy, torch.full((22,), r_expected, dtype=torch.float64))
    assert _nonbonded_min(R) > 1.5


def test_helix_is_right_handed() -> None:
    R = helix()
    b = R[1:] - R[:-1]
    triple = (torch.linalg.cross(b[:-2], b[1:-1], dim=-1) * b[2:]).sum(-1)
    assert bool((triple > 0).all())
    mirror = R * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    bm = mirror[1:] - mirror[:-1]
    assert bool(((torch.linalg.cross(bm[:-2], bm[1:-1], dim=-1) * bm[2:]).sum(-1) < 0).all())


def test_hairpin_geometry() -> None:
    R = hairpin()
    assert R.shape == (22, 3)
    torch.testing.assert_close(
        (R[1:] - R[:-1]).norm(dim=-1), torch.full((21,), 0.97, dtype=torch.float64)
    )
    theta = bond_angle(R[:-2] - R[1:-1], R[2:] - R[1:-1])
    # Strand beads (away from the turn) have the 120 degree zigzag angle.
    torch.testing.assert_close(
        theta[:8], torch.full((8,), math.radians(120.0), dtype=torch.float64)
    )
    assert _nonbonded_min(R) > 1.4
    contacts, d = native_contacts(R, cutoff=2.2, min_separation=3)
    assert contacts.shape[0] == 30
    assert float(d.min()) > 1.7
    # Every strand-A bead i < 10 is in contact with its partner 21 - i.
    pairs = set(map(tuple, contacts.tolist()))
    assert all((i, 21 - i) in pairs for i in range(10))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_beads": 1}, "n_beads"),
        ({"radius": -1.0}, "radius"),
        ({"bond_length": 0.0}, "bond_length"),
    ],
)
def test_helix_bad_input(kwargs: dict, field: str) -> None:
    with pytest.raises(ControlMDError, match=field):
        helix(**kwargs)


def test_hairpin_bad_angle() -> None:
    with pytest.raises(ControlMDError, match="bond_angle"):
        hairpin(bond_angle=200.0)


# ----------------------------------------------------------------------------- Kabsch


def test_kabsch_recovers_rigid_motions_and_rejects_mirror_images() -> None:
    T = helix()
    rot = torch.stack([_random_rotation(s) for s in range(3)])
    moved = T @ rot.transpose(1, 2) + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(
        kabsch_rmsd(moved, T), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0
    )
    torch.testing.assert_close(kabsch_align(moved, T), T.expand(3, -1, -1), atol=1e-10, rtol=0)
    mirror = (T * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))[None]
    assert float(kabsch_rmsd(mirror, T)[0]) > 1.0


def test_kabsch_is_optimal_among_rotations() -> None:
    g = torch.Generator().manual_seed(1)
    T = helix()
    X = (T + 0.3 * torch.randn(T.shape, generator=g, dtype=torch.float64))[None]
    best = float(kabsch_rmsd(X, T)[0])
    Xc, Tc = X[0] - X[0].mean(0), T - T.mean(0)
    for s in range(50):
        r = _random_rotation(100 + s)
        assert best <= float(((Xc @ r.T - Tc) ** 2).sum(-1).mean().sqrt()) + 1e-12


def test_kabsch_shape_mismatch_names_the_target() -> None:
    with pytest.raises(ControlMDError, match="target"):
        kabsch_rmsd(torch.zeros(2, 21, 3, dtype=torch.float64), helix())


# ----------------------------------------------------------------------------- clusters


def _seven_chain(spacing: float = 1.0) -> torch.Tensor:
    return torch.stack(
        [torch.arange(7, dtype=torch.float64) * spacing, torch.zeros(7, dtype=torch.float64)], -1
    )


def _eleven_bond_cluster() -> torch.Tensor:
    """A rigid 7-disk patch of the triangular lattice that is not the hexagon: two rows
    (4 + 3), 11 bonds."""
    h = math.sqrt(3) / 2
    row1 = [(float(i), 0.0) for i in range(4)]
    row2 = [(i + 0.5, h) for i in range(3)]
    return torch.tensor(row1 + row2, dtype=torch.float64)


def _heptamer_yield(
    R: torch.Tensor, cutoff: float = 1.25, box: float | None = None
) -> torch.Tensor:
    space = periodic(box, dim=2) if box is not None else None
    A = bond_graph(R, cutoff, space)
    return target_cluster_fraction(A, size=7, n_bonds=12, max_degree=6)


def test_perfect_heptamer_has_yield_one_and_open_shapes_zero() -> None:
    hexagon = hexagonal_cluster()
    R = torch.stack([hexagon, _seven_chain(), _eleven_bond_cluster()])
    A = bond_graph(R, 1.25)
    assert (A.sum(dim=(1, 2)) // 2).tolist() == [12, 6, 11]
    torch.testing.assert_close(
        _heptamer_yield(R), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    )


def test_heptamer_across_the_periodic_boundary_and_with_thermal_noise() -> None:
    box = 6.0
    g = torch.Generator().manual_seed(3)
    hexagon = hexagonal_cluster() + 0.03 * torch.randn(7, 2, generator=g, dtype=torch.float64)
    R = (hexagon + torch.tensor([0.2, 5.9], dtype=torch.float64)) % box  # straddles two edges
    assert float(_heptamer_yield(R[None], box=box)[0]) == 1.0
    assert float(_heptamer_yield(R[None])[0]) == 0.0  # without the box the cluster is cut


def test_yield_counts_particles_in_target_clusters() -> None:
    far = hexagonal_cluster() + 10.0
    split = torch.cat([hexagonal_cluster()[:3], hexagonal_cluster()[3:] + 10.0])
    R = torch.stack(
        [
            torch.cat([hexagonal_cluster(), far]),
            torch.cat([hexagonal_cluster(), _seven_chain() - 20.0]),
            torch.cat([split, _seven_chain() + 30.0]),
        ]
    )
    torch.testing.assert_close(
        _heptamer_yield(R), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    )


def test_cluster_labels_match_scipy() -> None:
    g = torch.Generator().manual_seed(5)
    A = torch.rand(20, 12, 12, generator=g) < 0.12
    A = A | A.transpose(1, 2)
    A &= ~torch.eye(12, dtype=torch.bool)
    labels = cluster_labels(A)
    for b in range(20):
        _, ref = connected_components(csr_matrix(A[b].numpy()), directed=False)
        ours = labels[b].tolist()
        # same partition: equal labels exactly where scipy's labels are equal
        for i in range(12):
            for j in range(12):
                assert (ours[i] == ours[j]) == (ref[i] == ref[j])
        assert all(ours[i] <= i for i in range(12))


def test_smooth_bond_count_approaches_the_exact_count() -> None:
    R = torch.stack(
        [hexagonal_cluster(), _seven_chain(), _eleven_bond_cluster(), _seven_chain(2.0)]
    )
    exact = (bond_graph(R, 1.25).sum(dim=(1, 2)) // 2).to(torch.float64)
    smooth = smooth_bond_count(R, 1.25, width=0.01)
    torch.testing.assert_close(smooth, exact, atol=1e-6, rtol=0)


def test_target_cluster_bad_input() -> None:
    A = bond_graph(hexagonal_cluster()[None], 1.25)
    with pytest.raises(ControlMDError, match="cluster size"):
        target_cluster_fraction(A, size=8, n_bonds=12)
    with pytest.raises(ControlMDError, match="cutoff"):
        bond_graph(hexagonal_cluster()[None], -1.0)
