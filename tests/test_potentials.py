"""Potentials: analytic limits, cutoff continuity, autograd forces vs finite differences,
control terms, bad input."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from tolerances import assert_close, fd_tol

from controlmd import ControlMDError, PiecewiseConstant, free, periodic
from controlmd.potentials import (
    WCA,
    ConstantForce,
    CosineDihedral,
    ExternalField,
    FENEBond,
    HarmonicAngle,
    HarmonicBond,
    HarmonicTrap,
    LennardJones,
    Morse,
    NeuralPair,
    ScaledPotential,
    SoftSphere,
    TabulatedPair,
    lennard_jones,
    validate_configuration,
)
from controlmd.potentials.base import Potential
from controlmd.potentials.bonded import bond_angle, dihedral_angle
from controlmd.potentials.neural import smooth_switch
from controlmd.space import Space

F64 = torch.float64


def _dimer(r: float, d: int = 3, dtype: torch.dtype = F64) -> torch.Tensor:
    R = torch.zeros(1, 2, d, dtype=dtype)
    R[0, 1, 0] = r
    return R


def _fd_forces(
    potential: Potential, R: torch.Tensor, t: float | None = None, h: float = 1e-6
) -> torch.Tensor:
    """Central finite-difference forces ``-dE/dR`` (float64)."""
    F = torch.zeros_like(R)
    flat, Ff = R.reshape(-1), F.reshape(-1)
    with torch.no_grad():
        for k in range(flat.numel()):
            Rp, Rm = flat.clone(), flat.clone()
            Rp[k] += h
            Rm[k] -= h
            Ep = potential.energy(Rp.view_as(R), t).sum()
            Em = potential.energy(Rm.view_as(R), t).sum()
            Ff[k] = -(Ep - Em) / (2 * h)
    return F


def _spread_config(B: int, N: int, d: int, L: float, seed: int, r_min: float = 0.8) -> torch.Tensor:
    """Random positions in [0, L)^d with no pair (minimum image) closer than ``r_min``."""
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


# --------------------------------------------------------------------------- analytic limits


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("sigma,epsilon", [(1.0, 1.0), (1.3, 0.7)])
def test_lj_minimum(dtype: torch.dtype, sigma: float, epsilon: float) -> None:
    lj = LennardJones(sigma=sigma, epsilon=epsilon, r_cut=None, shift="none")
    E, F = lj.energy_and_forces(_dimer(2 ** (1 / 6) * sigma, dtype=dtype))
    assert_close(E, [-epsilon], scale=10)
    assert_close(F, torch.zeros_like(F), scale=100)
    # and it is a minimum: moving either way raises the energy
    for r in (0.98, 1.02):
        assert float(lj.energy(_dimer(r * 2 ** (1 / 6) * sigma, dtype=dtype))) > -epsilon


def test_morse_minimum_and_wca_shape() -> None:
    m = Morse(sigma=1.4, epsilon=2.0, alpha=3.0, r_cut=None, shift="none")
    E, F = m.energy_and_forces(_dimer(1.4))
    assert_close(E, [-2.0])
    assert_close(F, torch.zeros_like(F))
    w = WCA(sigma=1.2, epsilon=1.5)
    assert float(w.energy(_dimer(2 ** (1 / 6) * 1.2 + 1e-9))) == 0.0
    # WCA = LJ + epsilon inside the cutoff
    r = 1.1
    assert_close(w.energy(_dimer(r)), [4 * 1.5 * ((1.2 / r) ** 12 - (1.2 / r) ** 6) + 1.5])
    s = SoftSphere(sigma=1.0, epsilon=3.0, alpha=2.0)
    assert_close(s.energy(_dimer(0.6)), [3.0 / 2 * 0.4**2])
    assert float(s.energy(_dimer(1.01))) == 0.0


@pytest.mark.parametrize("shift", ["energy", "force"])
@pytest.mark.parametrize("cls", [LennardJones, Morse])
def test_cutoff_continuity(shift: str, cls: type) -> None:
    rc = 2.5
    pot = cls(r_cut=rc, shift=shift, sigma=1.1)
    eps = 1e-7
    E_in, F_in = pot.energy_and_forces(_dimer(rc - eps))
    E_out, F_out = pot.energy_and_forces(_dimer(rc + eps))
    assert float(E_out.detach()) == 0.0 and float(F_out.detach().abs().max()) == 0.0
    assert abs(float(E_in.detach())) < 1e-6  # energy continuous at rc
    if shift == "force":
        assert float(F_in.detach().abs().max()) < 1e-6  # force continuous at rc too
    else:
        bare = cls(r_cut=None, shift="none", sigma=1.1)
        _, F_bare = bare.energy_and_forces(_dimer(rc - eps))
        assert_close(F_in, F_bare)  # energy shift leaves forces unchanged
        assert float(F_in.detach().abs().max()) > 1e-4  # ...so the force jumps at rc


def test_force_shift_formula() -> None:
    """Force-shifted LJ equals u(r) - u(rc) - (r - rc) u'(rc) computed by hand."""
    rc, r = 2.5, 1.7

    def u(x: float) -> float:
        return 4 * (x**-12 - x**-6)

    def du(x: float) -> float:
        return 4 * (-12 * x**-13 + 6 * x**-7)

    lj = LennardJones(r_cut=rc, shift="force")
    expected = u(r) - u(rc) - (r - rc) * du(rc)
    assert_close(lj.energy(_dimer(r)), [expected])


# --------------------------------------------------------------------------- forces vs FD


def _all_potentials(space: Space, d: int) -> dict[str, Potential]:
    u = PiecewiseConstant(dim=d, t_final=1.0, n_pieces=2, init=[[0.3] * d, [1.1] * d])
    u1 = PiecewiseConstant(dim=1, t_final=1.0, n_pieces=2, init=[0.7, 1.6])
    return {
        "lj_energy": LennardJones(space, sigma=1.0, epsilon=1.2, r_cut=2.0),
        "lj_force": LennardJones(space, r_cut=2.0, shift="force"),
        "wca": WCA(space, sigma=0.9),
        "soft": SoftSphere(space, sigma=1.2, alpha=2.5),
        "morse": Morse(space, sigma=1.1, alpha=4.0, r_cut=2.0, shift="force"),
        "lj_pairs": LennardJones(
            space,
            pairs=[[0, 1], [2, 4], [1, 3], [0, 5], [3, 4], [5, 2]],
            sigma=[1.0, 1.1, 0.9, 1.0, 0.8, 1.2],
            r_cut=2.25,
        ),
        "trap": HarmonicTrap(1.5, u, particles=[0, 2], space=space),
        "trap_k": HarmonicTrap(u1, [0.5] * d, space=space),
        "force": ConstantForce(u1, [0, 4], weights=[-1.0, 1.0], direction=[1.0] + [0.0] * (d - 1)),
        "scaled": ScaledPotential(LennardJones(space, r_cut=2.0), u1),
        "field": ExternalField(lambda R, v: (v * R.sum(1)).sum(-1) ** 2 / 10, u),
        "harmonic_bond": HarmonicBond(
            [[0, 1], [1, 2], [2, 3]], k=[50.0, 80.0, 20.0], r0=1.1, space=space
        ),
        "fene": FENEBond([[0, 1], [1, 2], [2, 3]], k=30.0, R0=10.0, space=space),
        "angle": HarmonicAngle(
            [[0, 1, 2], [1, 2, 3], [3, 4, 5]], k=5.0, theta0=[1.9, 2.5, 1.0], space=space
        ),
        "tabulated_cubic": TabulatedPair.from_function(
            lambda r: lennard_jones(r, 0.9, 1.0), torch.linspace(0.7, 2.2, 40), space
        ),
        "tabulated_linear": TabulatedPair.from_function(
            lambda r: lennard_jones(r, 0.9, 1.0),
            torch.linspace(0.7, 2.2, 40),
            space,
            interpolation="linear",
            shift="force",
        ),
        "neural": _trained_like_neural(space),
    }


def _trained_like_neural(space: Space) -> NeuralPair:
    """A NeuralPair with a non-zero MLP output (its last layer is zero at init)."""
    pot = NeuralPair(space, r_cut=2.2, r_on=1.5, hidden=(16, 16), n_basis=12, seed=3)
    with torch.no_grad():
        pot.mlp[-1].weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return pot


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize(
    "name",
    [
        "lj_energy",
        "lj_force",
        "wca",
        "soft",
        "morse",
        "lj_pairs",
        "trap",
        "trap_k",
        "force",
        "scaled",
        "field",
        "harmonic_bond",
        "fene",
        "angle",
        "tabulated_cubic",
        "tabulated_linear",
        "neural",
        "dihedral",
    ],
)
def test_autograd_forces_match_finite_differences(name: str, d: int) -> None:
    L = 4.5
    space = periodic(L, dim=d) if name not in ("force", "field") else free()
    if name == "dihedral":
        if d == 2:
            pytest.skip("torsions are 3-D only")
        pot = CosineDihedral(
            [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]],
            k=[1.0, 2.0, 0.5],
            n=[1, 3, 2],
            phi0=[0.0, 0.4, -1.0],
            space=space,
        )
    else:
        pot = _all_potentials(space, d)[name]
    R = _spread_config(2, 6, d, L, seed=d, r_min=0.85)
    t = 0.6
    E, F = pot.energy_and_forces(R, t)
    assert E.shape == (2,) and F.shape == R.shape
    assert float(F.detach().abs().max()) > 1e-2  # the configuration exercises the term
    torch.testing.assert_close(F, _fd_forces(pot, R, t), **fd_tol().kwargs())


# --------------------------------------------------------------------------- control terms


def test_harmonic_trap_follows_protocol_and_per_replica_control() -> None:
    u = PiecewiseConstant(dim=2, t_final=2.0, n_pieces=2, init=[[0.0, 0.0], [1.0, -1.0]])
    trap = HarmonicTrap(3.0, u)
    R = torch.tensor([[[1.0, -1.0]], [[0.0, 0.0]]], dtype=F64)
    assert_close(trap.energy(R, 0.5), [3.0, 0.0])
    assert_close(trap.energy(R, 1.5), [0.0, 3.0])
    assert_close(trap.center_at(1.5, R), [[[1.0, -1.0]]])
    assert float(trap.stiffness_at(0.0, R)) == 3.0
    # gradient reaches the protocol
    trap.energy(R, 1.5).sum().backward()
    assert u.values.grad is not None and float(u.values.grad.abs().sum()) > 0
    # per-replica control [B, k] (the gymnasium env's HeldControl)
    from controlmd import HeldControl

    held = HeldControl(dim=1, t_final=1.0)
    held.set(torch.tensor([[2.0], [0.5]]))
    scaled = ScaledPotential(HarmonicTrap(1.0, 0.0), held)
    assert_close(scaled.energy(R, 0.1), [2.0 * 1.0, 0.0])


def test_scaled_potential_gradient_wrt_interaction_strength() -> None:
    u = PiecewiseConstant(dim=1, t_final=1.0, n_pieces=1, init=1.5)
    base = LennardJones(r_cut=None, shift="none")
    pot = ScaledPotential(base, u)
    R = _dimer(1.3)
    E = pot.energy(R, 0.3)
    assert_close(E, 1.5 * base.energy(R))
    (g,) = torch.autograd.grad(E.sum(), u.values)
    # dE/draw = E_base * d u/d raw with u = squash(raw) (unbounded here: identity)
    assert_close(g.reshape(1), base.energy(R))


def test_learnable_parameters_get_gradients() -> None:
    lj = LennardJones(periodic(5.0), learnable=True, r_cut=2.2, shift="force")
    names = {n for n, _ in lj.named_parameters()}
    assert names == {"sigma", "epsilon"}
    R = _spread_config(1, 8, 3, 5.0, seed=3)
    E = lj.energy(R).sum()
    gs, ge = torch.autograd.grad(E, [lj.sigma, lj.epsilon])
    # E is linear in epsilon: dE/deps = E / eps
    assert_close(ge, E.detach() / 1.0)
    # sigma gradient against a central difference
    h = 1e-6
    Ep = LennardJones(periodic(5.0), sigma=1 + h, r_cut=2.2, shift="force").energy(R)
    Em = LennardJones(periodic(5.0), sigma=1 - h, r_cut=2.2, shift="force").energy(R)
    torch.testing.assert_close(gs, ((Ep - Em) / (2 * h)).sum(), **fd_tol().kwargs())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: LennardJones(sigma=-1.0), "sigma must be > 0, got -1"),
        (lambda: LennardJones(epsilon=0.0), "epsilon must be > 0, got 0"),
        (lambda: Morse(alpha=float("nan")), "alpha must be finite"),
        (
            lambda: LennardJones(periodic(4.0), r_cut=2.5),
            "r_cut = 2.5 exceeds half the shortest box side",
        ),
        (lambda: WCA(periodic([10.0, 2.0]), sigma=1.0), "exceeds half the shortest box side"),
        (
            lambda: LennardJones(shift="cubic"),
            "unknown shift 'cubic'; expected one of: energy, force, none",
        ),
        (
            lambda: LennardJones(periodic(8.0), r_cut=None, shift="none"),
            "periodic box needs a finite r_cut",
        ),
        (lambda: LennardJones(pairs=[[0, 1, 2]]), r"pairs must have shape \[P, 2\]"),
        (lambda: LennardJones(pairs=[[0, 0]]), "pairs particle 0 with itself"),
        (
            lambda: LennardJones(pairs=[[0, 1]], sigma=torch.ones(3)),
            r"sigma must be a scalar or a tensor of shape \[1\]",
        ),
        (lambda: LennardJones(sigma=torch.ones(3)), "sigma must be a scalar, got shape"),
        (lambda: LennardJones(learnable=["sigmaa"]), "learnable names unknown parameter"),
        (lambda: HarmonicTrap(-2.0), "stiffness must be > 0, got -2"),
        (lambda: HarmonicTrap(1.0, [[0.0]]), "center must be a scalar or"),
        (
            lambda: ConstantForce([1.0, 0.0], [0, 1], weights=[1.0]),
            r"weights must have shape \[2\]",
        ),
        (lambda: ConstantForce(1.0, direction=[0.0, 0.0]), "direction must be a finite non-zero"),
    ],
)
def test_bad_construction(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ControlMDError, match=match):
        make()


def test_bad_positions_and_overlaps() -> None:
    lj = LennardJones(periodic(6.0))
    good = _spread_config(2, 5, 3, 6.0, seed=1)
    validate_configuration(lj, good)
    with pytest.raises(ControlMDError, match=r"R must have shape \[B, N, d\]"):
        validate_configuration(lj, good[0])
    bad = good.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(
        ControlMDError,
        match=r"R must be finite; found 1 non-finite entries, first at index \(1, 2, 0\)",
    ):
        validate_configuration(lj, bad)
    overlap = good.clone()
    overlap[1, 3] = overlap[1, 0]
    with pytest.raises(
        ControlMDError, match=r"replica 1 are not finite.*particles 0 and 3 at distance 0"
    ):
        validate_configuration(lj, overlap)
    # float32 overflows at a much larger distance than float64
    near = _dimer(1e-4, dtype=torch.float32)
    with pytest.raises(ControlMDError, match=r"particles 0 and 1 at distance 0\.0001"):
        validate_configuration(LennardJones(r_cut=2.5), near)
    with pytest.raises(ControlMDError, match="refers to particle 4 but R has only N = 3"):
        LennardJones(pairs=[[0, 4]]).energy(torch.rand(1, 3, 3, dtype=F64))


def test_time_dependent_term_needs_time() -> None:
    u = PiecewiseConstant(dim=3, t_final=1.0, n_pieces=1)
    with pytest.raises(ControlMDError, match="pass the time t"):
        HarmonicTrap(1.0, u).energy(torch.zeros(1, 2, 3, dtype=F64))
    with pytest.raises(ControlMDError, match="center protocol has 3 channels, expected d = 2"):
        HarmonicTrap(1.0, u).energy(torch.zeros(1, 2, 2, dtype=F64), 0.0)
    with pytest.raises(ControlMDError, match="channel = 3 but the protocol has 3"):
        ScaledPotential(LennardJones(), u, channel=3).energy(
            torch.rand(1, 2, 3, dtype=F64) * 3, 0.0
        )


def test_constant_force_energy_and_lj_value() -> None:
    cf = ConstantForce([0.5, -1.0], [1])
    R = torch.tensor([[[9.0, 9.0], [2.0, 3.0]]], dtype=F64)
    assert_close(cf.energy(R), [-(0.5 * 2.0 - 1.0 * 3.0)])
    _, F = cf.energy_and_forces(R)
    assert_close(F, [[[0.0, 0.0], [0.5, -1.0]]])
    assert math.isclose(
        float(LennardJones(r_cut=None, shift="none").energy(_dimer(1.0))), 0.0, abs_tol=1e-15
    )


# --------------------------------------------------------------------------- bonded


def test_bonded_values() -> None:
    R = torch.tensor(
        [[[0.0, 0.0, 0.0], [1.2, 0.0, 0.0], [1.2, 0.9, 0.0], [1.2, 0.9, 1.0]]], dtype=F64
    )
    hb = HarmonicBond([[0, 1], [1, 2]], k=10.0, r0=1.0)
    assert_close(hb.energy(R), [5 * 0.2**2 + 5 * 0.1**2])
    fene = FENEBond([[0, 1]], k=30.0, R0=1.5)
    assert_close(fene.energy(R), [-0.5 * 30 * 1.5**2 * math.log(1 - (1.2 / 1.5) ** 2)])
    ang = HarmonicAngle([[0, 1, 2]], k=4.0, theta0=math.pi)
    assert_close(ang.energy(R), [2.0 * (math.pi / 2 - math.pi) ** 2])
    # torsion convention: far bond rotated by +phi about j->k (IUPAC), cis = 0, trans = pi
    for phi in (0.0, 0.7, -2.0, math.pi):
        X = torch.tensor(
            [[1.0, 0, 0], [0, 0, 0], [0, 0, 1], [math.cos(phi), math.sin(phi), 1]], dtype=F64
        )
        got = float(dihedral_angle(X[1] - X[0], X[2] - X[1], X[3] - X[2]))
        assert math.isclose(math.remainder(got - phi, 2 * math.pi), 0.0, abs_tol=1e-12)
        dih = CosineDihedral([[0, 1, 2, 3]], k=2.0, n=3, phi0=0.5)
        assert_close(dih.energy(X.unsqueeze(0)), [2.0 * (1 + math.cos(3 * phi - 0.5))])
    assert_close(
        bond_angle(torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([-1.0, 1.0], dtype=F64)),
        3 * math.pi / 4,
    )


def test_bond_across_periodic_boundary_and_collinear_angle() -> None:
    space = periodic(10.0)
    R = torch.tensor([[[9.6, 5.0, 5.0], [0.4, 5.0, 5.0], [1.4, 5.0, 5.0]]], dtype=F64)
    assert_close(HarmonicBond([[0, 1]], k=2.0, r0=1.0, space=space).energy(R), [0.5 * 2 * 0.2**2])
    # a straight chain (theta = pi exactly) has finite forces for any rest angle
    _, F = HarmonicAngle([[0, 1, 2]], k=3.0, theta0=2.0, space=space).energy_and_forces(R)
    assert bool(torch.isfinite(F).all())


def test_fene_beyond_R0_is_non_finite_and_named() -> None:
    fene = FENEBond([[0, 1], [1, 2]], k=30.0, R0=1.5)
    R = torch.tensor(
        [[[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0]], [[0.0, 0, 0], [1.0, 0, 0], [2.7, 0, 0]]],
        dtype=F64,
    )
    E, F = fene.energy_and_forces(R)
    assert bool(torch.isfinite(E[0])) and bool(torch.isfinite(F[0]).all())
    assert not bool(torch.isfinite(E[1])) and not bool(torch.isfinite(F[1]).all())
    assert fene.stretched(R) == [(1, 1, pytest.approx(1.7))]
    with pytest.raises(
        ControlMDError,
        match=r"FENE bond 1 \(particles 1-2\) of replica 1 is stretched to r = 1\.7 >= R0 = 1\.5",
    ):
        validate_configuration(fene + HarmonicBond([[0, 1]]), R)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: HarmonicBond([[0, 1, 2]]), r"bonds must have shape \[M, 2\]"),
        (lambda: HarmonicBond([[0, 0]]), r"bonds row 0 = \[0, 0\] repeats a particle"),
        (lambda: HarmonicBond([[0.0, 1.0]]), "must hold integer particle indices"),
        (lambda: HarmonicBond([[0, 1]], k=-1.0), "k must be > 0, got -1"),
        (lambda: FENEBond([[0, 1], [1, 2]], R0=[1.5, 0.0]), r"R0 must be > 0, got \[1\.5, 0\.0\]"),
        (lambda: HarmonicAngle([[0, 1]]), r"angles must have shape \[M, 3\]"),
        (lambda: CosineDihedral([[0, 1, 2, 3]], n=0), r"n \(multiplicity\) must be >= 1, got 0"),
        (lambda: CosineDihedral([[0, 1, 2, 3]], n=1.5), "must be a positive integer"),
        (lambda: TabulatedPair(r=[1.0, 0.5, 2.0], u=[1.0, 0.0, 0.0]), "strictly increasing"),
        (lambda: TabulatedPair(r=[0.5, 1.0, 2.0], u=[1.0, 0.0]), "u must have the grid's shape"),
        (
            lambda: TabulatedPair(r=[0.5, 1.0, 2.0], u=[float("inf"), 0.0, 0.0]),
            "r and u must be finite",
        ),
        (lambda: NeuralPair(r_cut=2.0, r_on=2.5), "r_on must satisfy 0 < r_on < r_cut"),
    ],
)
def test_bad_bonded_and_table_construction(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ControlMDError, match=match):
        make()


def test_bonded_index_out_of_range() -> None:
    with pytest.raises(ControlMDError, match="bonds refers to particle 5 but R has only N = 3"):
        HarmonicBond([[0, 5]]).energy(torch.zeros(1, 3, 3, dtype=F64))


# --------------------------------------------------------------------------- tabulated / neural


def test_tabulated_reproduces_function_and_nodes() -> None:
    grid = torch.linspace(0.8, 2.5, 171, dtype=F64)
    table = TabulatedPair.from_function(lambda r: lennard_jones(r), grid, shift="energy")
    lj = LennardJones(r_cut=2.5, shift="energy")
    r = torch.linspace(0.85, 2.45, 57, dtype=F64)
    R = torch.zeros(57, 2, 3, dtype=F64)
    R[:, 1, 0] = r
    E_t, F_t = table.energy_and_forces(R)
    E_l, F_l = lj.energy_and_forces(R)
    # natural cubic spline: error ~ h^4 max|u^(4)| with h = 0.01
    torch.testing.assert_close(E_t, E_l, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(F_t, F_l, rtol=1e-3, atol=1e-3)
    # linear interpolation is exact at the nodes; beyond the table the energy is zero
    lin = TabulatedPair(
        r=[0.5, 1.0, 1.5, 2.0], u=[3.0, -1.0, -0.5, 0.0], interpolation="linear", shift="none"
    )
    assert_close(lin.energy(_dimer(1.0)), [-1.0])
    assert_close(lin.energy(_dimer(1.25)), [-0.75])
    assert_close(lin.energy(_dimer(2.1)), [0.0])
    # below the grid: linear continuation with the first slope (-8 per unit length)
    assert_close(lin.energy(_dimer(0.4)), [3.8])


def test_tabulated_learnable_table_gradient() -> None:
    grid = torch.linspace(0.8, 2.0, 13, dtype=F64)
    table = TabulatedPair(
        r=grid, u=torch.zeros(13), interpolation="linear", shift="none", learnable=True
    )
    E = table.energy(_dimer(1.05))
    (g,) = torch.autograd.grad(E.sum(), table.values)
    expected = torch.zeros(13, dtype=F64)
    expected[2], expected[3] = 0.5, 0.5  # r = 1.05 sits midway between nodes 1.0 and 1.1
    assert_close(g, expected)
    table.set_table(torch.ones(13))
    assert_close(table.energy(_dimer(1.3)).detach(), [1.0])


def test_neural_pair_starts_at_prior_and_is_smooth_at_cutoff() -> None:
    pot = NeuralPair(r_cut=2.0, r_on=1.5, sigma_prior=0.9, epsilon_prior=1.0)
    for r in (0.8, 1.2, 1.7):
        expected = (0.9 / r) ** 12 * float(smooth_switch(torch.tensor(r, dtype=F64), 1.5, 2.0))
        assert_close(pot.energy(_dimer(r)).detach(), [expected])
    pot = _trained_like_neural(free())
    E_in, F_in = pot.energy_and_forces(_dimer(2.2 - 1e-6))
    assert abs(float(E_in.detach())) < 1e-12 and float(F_in.detach().abs().max()) < 1e-8
    assert sum(p.numel() for p in pot.parameters()) > 100
    E = pot.energy(_dimer(1.0)).sum()
    grads = torch.autograd.grad(E, list(pot.mlp.parameters()))
    assert all(bool(torch.isfinite(gr).all()) for gr in grads) and float(grads[-1].abs().sum()) > 0


def test_mismatched_box_dimension_and_neighbor_list_box() -> None:
    from controlmd.neighbors import NeighborList

    with pytest.raises(ControlMDError, match="R has spatial dimension 2 but the box has 3 sides"):
        LennardJones(periodic(6.0)).energy(torch.rand(1, 4, 2, dtype=F64))
    with pytest.raises(ControlMDError, match="neighbor list was built for a different box"):
        LennardJones(periodic(6.0), neighbor_list=NeighborList(periodic(7.0), 2.5))
    with pytest.raises(ControlMDError, match="particles selects particle 5 but R has only N = 3"):
        HarmonicTrap(1.0, 0.0, particles=[0, 5]).energy(torch.zeros(1, 3, 3, dtype=F64))


def test_neural_pair_grid_interpolation_converges_at_fourth_order_with_its_gradients() -> None:
    exact = _trained_like_neural(free())
    r = torch.linspace(0.75, 2.2, 2001, dtype=F64).requires_grad_(True)
    u = exact.pair_energy(r, **exact._params(r))
    errors = []
    for K in (64, 128):
        gridded = NeuralPair(
            r_cut=2.2, r_on=1.5, hidden=(16, 16), n_basis=12, seed=3, grid_points=K
        )
        gridded.load_state_dict(exact.state_dict())
        errors.append(
            float((gridded.pair_energy(r, **gridded._params(r)) - u).detach().abs().max())
        )
    assert errors[1] < errors[0] / 10.0  # Hermite: error ~ h^4, halving h divides it by ~16
    assert errors[1] < 1e-5
    E_exact, F_exact = exact.energy_and_forces(_dimer(1.13))
    E_grid, F_grid = gridded.energy_and_forces(_dimer(1.13))
    torch.testing.assert_close(E_grid.detach(), E_exact.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(F_grid.detach(), F_exact.detach(), atol=1e-4, rtol=0)
    g_exact = torch.autograd.grad(E_exact.sum(), list(exact.mlp.parameters()))
    g_grid = torch.autograd.grad(E_grid.sum(), list(gridded.mlp.parameters()))
    for a, b in zip(g_exact, g_grid):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_harmonic_trap_closed_form_forces_are_autograd_bits(dtype: torch.dtype) -> None:
    """Without a force graph, HarmonicTrap's closed-form forces (free space, all particles)
    are the bits autograd gives, for fixed, protocol and per-replica stiffness, down to
    subnormal displacements; with a graph (or selected particles) autograd is used."""
    from controlmd.potentials.base import _autograd_energy_and_forces
    from controlmd.protocols import HeldControl

    held = HeldControl(dim=1, t_final=1.0)
    held.set(torch.tensor([[0.7], [1.3], [2.0]], dtype=torch.float64))
    traps = [
        HarmonicTrap(1.7, [0.3, -0.2]),
        HarmonicTrap(0.37, PiecewiseConstant(dim=2, t_final=1.0, n_pieces=2, low=-1.0, high=1.0)),
        HarmonicTrap(held, [0.1, 0.2]),
    ]
    g = torch.Generator().manual_seed(1)
    t = torch.tensor(0.3, dtype=torch.float64)
    for trap in traps:
        trap = trap.to(dtype)
        for scale in (1.0, 1e3, 1e-160):
            R = (torch.randn(3, 4, 2, generator=g, dtype=torch.float64) * scale).to(dtype)
            E0, F0 = _autograd_energy_and_forces(trap, R, t, create_graph=False)
            with torch.no_grad():
                E1, F1 = trap.energy_and_forces(R, t)
            assert torch.equal(E0, E1) and torch.equal(F0, F1)
    R = torch.randn(3, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    _, F = HarmonicTrap(1.0, [0.0, 0.0]).energy_and_forces(R, t, create_graph=True)
    assert F.requires_grad
