"""Space: minimum image, wrapping, and periodic-image invariance of energies."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

from controlmd import ControlMDError, free, periodic
from controlmd.lattice import lattice
from controlmd.neighbors import NeighborList
from controlmd.potentials import WCA, LennardJones, Morse, SoftSphere
from controlmd.potentials.base import Potential
from controlmd.space import Space

F64 = torch.float64


def _liquid(
    B: int, d: int, sides: list[float], n_per_axis: int, dtype: torch.dtype, seed: int
) -> torch.Tensor:
    """Jittered lattice filling an orthorhombic box (no overlaps)."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.arange(n_per_axis, dtype=F64) * (s / n_per_axis) for s in sides]
    sites = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, d)
    return (sites + 0.25 * (torch.rand(B, *sites.shape, generator=g, dtype=F64) - 0.5)).to(dtype)


def _terms(space: Space) -> list[Potential]:
    return [
        LennardJones(space, r_cut=2.5, shift="force"),
        LennardJones(space, r_cut=2.5, neighbor_list=NeighborList(space, 2.5, skin=0.3)),
        WCA(space, sigma=0.9),
        SoftSphere(space, sigma=1.3),
        Morse(space, alpha=3.0, r_cut=2.4),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("d,sides", [(2, [9.0, 11.0]), (3, [6.0, 7.0, 8.0])])
def test_energy_invariant_under_translation_and_wrapping(
    d: int, sides: list[float], dtype: torch.dtype
) -> None:
    space = periodic(sides)
    R = _liquid(2, d, sides, 6 if d == 3 else 8, dtype, seed=d)
    g = torch.Generator().manual_seed(11)
    box = torch.tensor(sides, dtype=dtype)
    shift = (torch.rand(d, generator=g, dtype=F64) * 30 - 15).to(dtype)  # several box lengths
    images = torch.randint(-3, 4, R.shape, generator=g).to(dtype) * box  # per-particle image jumps
    for pot in _terms(space):
        E, F = pot.energy_and_forces(R)
        assert bool((E != 0).all())
        # translate every particle (not wrapped), wrap back, and add integer box vectors
        for R2 in (R + shift, space.wrap(R + shift), R + images):
            E2, F2 = pot.energy_and_forces(R2)
            # float32 positions of size ~15-30 carry ~2e-6 absolute rounding; LJ forces amplify it
            assert_close(E2, E, scale=1 if dtype == F64 else 50)
            assert_close(F2, F, scale=100 if dtype == F64 else 2000)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_minimum_image_and_wrap(dtype: torch.dtype) -> None:
    space = periodic([4.0, 6.0])
    disp, shift = space
    a = torch.tensor([0.5, 5.5], dtype=dtype)
    b = torch.tensor([3.5, 0.5], dtype=dtype)
    assert_close(disp(a, b), [1.0, -1.0])
    assert_close(disp(b, a), [-1.0, 1.0])
    assert_close(shift(a, torch.tensor([-1.0, 1.0], dtype=dtype)), [3.5, 0.5])
    assert_close(space.wrap(torch.tensor([[-0.5, 12.5]], dtype=dtype)), [[3.5, 0.5]])
    # every minimum-image component lies in [-L/2, L/2]
    x = torch.rand(1000, 2, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 50 - 25
    dR = disp(x, torch.zeros(2, dtype=dtype))
    assert bool((dR.abs() <= torch.tensor([2.0, 3.0], dtype=dtype) + 1e-6).all())
    # free space: plain differences, no wrapping
    fd, fs = free()
    assert_close(fs(a, torch.tensor([10.0, -10.0], dtype=dtype)), [10.5, -4.5])
    assert_close(fd(a, b), [-3.0, 5.0])
    assert_close(free().wrap(x), x)
    assert space.volume() == 24.0 and periodic(2.0, dim=3).volume() == 8.0


def test_bad_box_and_cutoff() -> None:
    with pytest.raises(ControlMDError, match="box must be > 0, got"):
        periodic([3.0, -1.0])
    with pytest.raises(ControlMDError, match="box must be finite"):
        periodic(float("inf"))
    with pytest.raises(ControlMDError, match="box has 2 side lengths but dim = 3"):
        periodic([3.0, 3.0], dim=3)
    with pytest.raises(ControlMDError, match="general \\(triclinic\\) boxes are not supported"):
        periodic(torch.eye(3))
    with pytest.raises(ControlMDError, match="exceeds half the shortest box side"):
        periodic([10.0, 4.0]).check_cutoff("r_cut", 2.5)
    with pytest.raises(ControlMDError, match="a free space has no volume"):
        free().volume()


# --------------------------------------------------------------------------- lattices


@pytest.mark.parametrize(
    "kind,n,coordination",
    [
        ("fcc", 108, 12),
        ("sc", 64, 6),
        ("bcc", 54, 8),
        ("square", 64, 4),
        ("hexagonal", 64, 6),
        ("fcc", 100, None),
        ("hexagonal", 50, None),
    ],
)
def test_lattice_density_and_neighbours(kind: str, n: int, coordination: int | None) -> None:
    R, box = lattice(kind, n, density=0.8)
    d = R.shape[1]
    assert R.shape == (n, 3 if kind in ("fcc", "sc", "bcc") else 2)
    assert_close(torch.prod(box), n / 0.8)  # exact density, vacancies or not
    assert bool((R >= 0).all()) and bool((R < box).all())
    space = periodic(box)
    dR = space.displacement(R.unsqueeze(1), R.unsqueeze(0))
    r = torch.linalg.vector_norm(dR, dim=-1) + torch.eye(n, dtype=F64) * 1e9
    r_nn = float(r.min())
    # nearest-neighbour distance of each lattice is >= rho^(-1/d) (sc/square: equal)
    assert r_nn >= (1 - 1e-9) * 0.8 ** (-1 / d)
    if coordination is not None:
        # a complete lattice: every site has the same number of nearest neighbours
        counts = (r < r_nn * 1.001).sum(1)
        assert bool((counts == coordination).all()), counts


def test_lattice_bad_input() -> None:
    with pytest.raises(ControlMDError, match="unknown kind 'diamond'"):
        lattice("diamond", 8, density=1.0)
    with pytest.raises(ControlMDError, match="density must be > 0, got -1"):
        lattice("fcc", 32, density=-1.0)
    with pytest.raises(ControlMDError, match="n must be >= 1, got 0"):
        lattice("sc", 0, density=1.0)
