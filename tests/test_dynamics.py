"""Physics of the integrators: Brownian analytic limits, NVE energy conservation, seeding.

NVE system: LJ fluid, N = 108 (fcc 3x3x3), rho = 0.8, float64, force-shifted LJ with
r_c = 2.5, equilibrated at kT = 1 by Langevin dynamics before every NVE run.

Statistical checks compare with the analytic value within 4 standard errors; the SE is
computed from independent units (replicas, or particles that do not interact), so
autocorrelation in time never shrinks it artificially.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from controlmd.dynamics import NVE, Brownian, Langevin, State
from controlmd.errors import ControlMDError, SimulationDivergedError
from controlmd.potentials import HarmonicTrap, LennardJones, Potential
from controlmd.reporters import MemoryReporter
from controlmd.rng import ReplicaRNG, replica_seed
from controlmd.simulate import simulate
from controlmd.space import Space, periodic

F64 = torch.float64


class _Free(Potential):
    """Zero energy (free diffusion)."""

    def energy(self, R: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        return 0.0 * R.sum(dim=(-2, -1))


class _Quartic(Potential):
    """``E = sum x^4 / 4``: Euler–Maruyama with a large dt diverges within a few steps."""

    def energy(self, R: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        return 0.25 * (R**4).sum(dim=(-2, -1))


class _Ramp(nn.Module):
    """Trap centre moving at constant speed along x: ``c(t) = (v t, 0, ...)``."""

    def __init__(self, v: float, d: int) -> None:
        super().__init__()
        self.v, self.d = v, d

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        c = torch.zeros(self.d, dtype=F64)
        c[0] = self.v * t
        return c


def _within(value: float, target: float, se: float, n_se: float = 4.0) -> None:
    assert abs(value - target) <= n_se * se, f"{value:.6g} vs {target:.6g} (SE {se:.3g})"


# ---------------------------------------------------------------- Brownian dynamics


def test_brownian_free_diffusion_msd() -> None:
    """MSD = 2 d kT t / gamma; particles are independent, so SE = std / sqrt(B N)."""
    B, N, d, kT, gamma, dt, n = 8, 128, 3, 1.5, 2.0, 0.01, 100
    bd = Brownian(_Free(), dt=dt, kT=kT, gamma=gamma)
    s0 = bd.init(torch.zeros(B, N, d, dtype=F64), rng=ReplicaRNG(11, B))
    traj = simulate(bd, s0, n, gradient="none", record_every=25)
    for t, R in zip(traj.times, traj.records["R"]):
        if t == 0:
            continue
        sq = (R**2).sum(-1).flatten()
        _within(
            float(sq.mean()), 2 * d * kT * float(t) / gamma, float(sq.std()) / math.sqrt(sq.numel())
        )


@pytest.mark.parametrize("method", ["euler_maruyama", "exact_ou"])
def test_brownian_harmonic_variance(method: str) -> None:
    """Stationary variance kT / k per axis (Euler–Maruyama: bias mu k dt / 2 = 0.5 %, far
    below the SE of 2-3 %)."""
    B, N, d, k, kT, dt = 16, 32, 3, 4.0, 1.2, 0.0025
    bd = Brownian(HarmonicTrap(k), dt=dt, kT=kT, gamma=1.0, method=method)
    s0 = bd.init(torch.zeros(B, N, d, dtype=F64), rng=ReplicaRNG(5, B))
    # relaxation time 1/(mu k) = 0.25 = 100 steps: equilibrate 5 of them, then take frames
    # 2 relaxation times apart (correlation of x^2 between frames e^-4 < 2 %).
    s = simulate(bd, s0, 500, gradient="none").final
    traj = simulate(bd, s, 1000, gradient="none", record_every=200)
    x2 = (traj.records["R"][1:] ** 2).mean(dim=(0, 2, 3))  # per replica, [B]
    _within(float(x2.mean()), kT / k, float(x2.std()) / math.sqrt(B))


def test_exact_ou_one_step_mean_and_variance() -> None:
    """One exact-OU step from x0 with a large dt: mean c + (x0-c) e^{-mu k dt}, variance
    kT/k (1 - e^{-2 mu k dt}); samples are the B N d independent coordinates."""
    B, N, d, k, kT, gamma, dt = 4, 512, 2, 3.0, 0.7, 1.5, 0.4
    c = torch.tensor([0.5, -1.0], dtype=F64)
    bd = Brownian(HarmonicTrap(k, c), dt=dt, kT=kT, gamma=gamma, method="exact_ou")
    x0 = torch.tensor([2.0, 1.0], dtype=F64)
    s = bd.step(bd.init(x0.expand(B, N, d).clone(), rng=ReplicaRNG(3, B)))
    a = math.exp(-k * dt / gamma)
    var = kT / k * (1 - a * a)
    dev = s.R - (c + (x0 - c) * a)
    n = dev.numel()
    _within(float(dev.mean()), 0.0, math.sqrt(var / n))
    v = (dev**2).mean()
    _within(float(v), var, var * math.sqrt(2.0 / n))


def test_exact_ou_partial_trap_leaves_others_free() -> None:
    """With ``particles``, untrapped particles diffuse freely: variance 2 kT dt / gamma."""
    B, N, dt, kT = 4, 400, 0.5, 1.0
    trap = HarmonicTrap(2.0, 0.0, particles=torch.arange(0, N, 2))
    bd = Brownian(trap, dt=dt, kT=kT, gamma=1.0, method="exact_ou")
    s = bd.step(bd.init(torch.ones(B, N, 1, dtype=F64), rng=ReplicaRNG(9, B)))
    free = s.R[:, 1::2] - 1.0
    trapped = s.R[:, 0::2]
    n = free.numel()
    _within(float((free**2).mean()), 2 * kT * dt, 2 * kT * dt * math.sqrt(2.0 / n))
    a = math.exp(-2.0 * dt)
    _within(float(trapped.mean()), a, math.sqrt(kT / 2.0 * (1 - a * a) / n))


def test_trap_dragging_work_obeys_jarzynski() -> None:
    """Dragging a trap (no free-energy change): <exp(-W/kT)> = 1 exactly for the exact OU
    step with the convention W += E(x_n, t_{n+1}) - E(x_n, t_n); and <W> > 0."""
    B, k, kT, dt, n = 2048, 4.0, 1.0, 0.01, 50
    trap = HarmonicTrap(k, _Ramp(v=1.0, d=1))
    bd = Brownian(trap, dt=dt, kT=kT, gamma=1.0, method="exact_ou", track_work=True)
    rng = ReplicaRNG(21, B)
    x0 = rng.randn(1, 1) * math.sqrt(kT / k)  # equilibrium in the trap at c(0) = 0
    s = simulate(bd, bd.init(x0, rng=rng), n, gradient="none").final
    W = s.aux["work"]
    e = torch.exp(-W / kT)
    _within(float(e.mean()), 1.0, float(e.std()) / math.sqrt(B))
    # Gaussian work (linear system): <W> = var(W) / (2 kT) when dF = 0
    assert float(W.mean()) > 0
    _within(float(W.mean()), float(W.var()) / (2 * kT), float(W.std()) / math.sqrt(B))


def test_brownian_work_euler_maruyama_matches_energy_differences() -> None:
    """With Euler–Maruyama, the recorded work equals the sum of E(x_n, t_{n+1}) - E(x_n, t_n)
    recomputed from the stored trajectory."""
    trap = HarmonicTrap(3.0, _Ramp(v=0.7, d=2))
    bd = Brownian(trap, dt=0.02, kT=0.5, track_work=True)
    s = bd.init(torch.zeros(3, 2, 2, dtype=F64), rng=ReplicaRNG(4, 3))
    W = torch.zeros(3, dtype=F64)
    eps = bd.t_eps  # controls are read as left limits u(t - eps)
    for _ in range(20):
        W = W + trap.energy(s.R, s.t + 0.02 - eps) - trap.energy(s.R, s.t - eps)
        s = bd.step(s)
    torch.testing.assert_close(s.aux["work"], W, rtol=1e-12, atol=1e-12)


def test_brownian_time_dependent_kT() -> None:
    """kT is a schedule evaluated at t_{n+1}: free diffusion with kT(t) = 1 + t gives
    MSD = 2 d dt sum_n kT(t_{n+1}) / gamma."""
    B, N, d, dt, n = 4, 256, 2, 0.01, 50
    bd = Brownian(_Free(), dt=dt, kT=lambda t: 1.0 + t, gamma=1.0)
    s = simulate(
        bd, bd.init(torch.zeros(B, N, d, dtype=F64), rng=ReplicaRNG(2, B)), n, gradient="none"
    ).final
    target = 2 * d * dt * sum(1.0 + (i + 1) * dt for i in range(n))
    sq = (s.R**2).sum(-1).flatten()
    _within(float(sq.mean()), target, float(sq.std()) / math.sqrt(sq.numel()))


@pytest.mark.parametrize("method", ["euler_maruyama", "exact_ou"])
def test_brownian_replica_equals_single_run(method: str) -> None:
    """Replica i of a batch seeded s equals a one-replica run seeded replica_seed(s, i)."""
    B, N, d, seed = 5, 6, 3, 1234
    bd = Brownian(HarmonicTrap(2.0), dt=0.01, kT=1.0, gamma=0.5, method=method)
    R0 = torch.linspace(-1, 1, B * N * d, dtype=F64).reshape(B, N, d)
    batch = simulate(bd, bd.init(R0, rng=ReplicaRNG(seed, B)), 30, gradient="none").final
    for i in (0, 3):
        single = bd.init(R0[i : i + 1], rng=ReplicaRNG(replica_seed(seed, i), 1))
        one = simulate(bd, single, 30, gradient="none").final
        torch.testing.assert_close(one.R[0], batch.R[i], rtol=0, atol=1e-14)


def test_brownian_bad_input() -> None:
    trap = HarmonicTrap(1.0)
    with pytest.raises(ControlMDError, match=r"dt must be > 0, got -0.001"):
        Brownian(trap, dt=-0.001, kT=1.0)
    with pytest.raises(ControlMDError, match=r"kT must be >= 0, got -1"):
        Brownian(trap, dt=0.01, kT=-1.0)
    with pytest.raises(ControlMDError, match=r"kT\(t=0\) must be >= 0"):
        Brownian(trap, dt=0.01, kT=lambda t: t - 1.0)
    with pytest.raises(ControlMDError, match=r"gamma must be > 0"):
        Brownian(trap, dt=0.01, kT=1.0, gamma=-2.0)
    with pytest.raises(ControlMDError, match=r"unknown method 'exact'"):
        Brownian(trap, dt=0.01, kT=1.0, method="exact")
    with pytest.raises(ControlMDError, match=r"exact_ou.*_Free"):
        Brownian(_Free(), dt=0.01, kT=1.0, method="exact_ou")
    bd = Brownian(trap, dt=0.01, kT=1.0)
    with pytest.raises(ControlMDError, match=r"R must have shape \[B, N, d\]"):
        bd.init(torch.zeros(4, 3, dtype=F64), rng=ReplicaRNG(0, 4))
    R = torch.zeros(2, 3, 3, dtype=F64)
    R[1, 2, 0] = float("nan")
    with pytest.raises(ControlMDError, match=r"R must be finite.*\(1, 2, 0\)"):
        bd.init(R, rng=ReplicaRNG(0, 2))
    with pytest.raises(ControlMDError, match=r"pass rng=ReplicaRNG"):
        bd.init(torch.zeros(2, 3, 3, dtype=F64))
    with pytest.raises(ControlMDError, match=r"rng has 3 replicas but R has B = 2"):
        bd.init(torch.zeros(2, 3, 3, dtype=F64), rng=ReplicaRNG(0, 3))


def test_brownian_divergence_names_first_bad_step() -> None:
    """A quartic well with a huge dt blows up; the error names the first non-finite step
    even though checks run only every 100 steps."""
    bd = Brownian(_Quartic(), dt=0.5, kT=0.1)
    s0 = bd.init(torch.full((2, 1, 1), 3.0, dtype=F64), rng=ReplicaRNG(0, 2))
    # locate the first non-finite step by hand, on a copy of the same streams
    s = bd.init(s0.R.clone(), rng=ReplicaRNG(0, 2))
    with torch.no_grad():
        while bool(torch.isfinite(s.R).all()):
            s = bd.step(s)
    assert 1 < s.step < 100
    with pytest.raises(SimulationDivergedError, match=rf"step {s.step} \(t = ") as info:
        simulate(bd, s0, 1000, gradient="none", check_every=100)
    assert info.value.step == s.step
    assert info.value.time == pytest.approx(s.step * 0.5)


# ---------------------------------------------------------------- NVE (velocity Verlet)


def _fcc(n: int, L: float) -> torch.Tensor:
    """``4 n^3`` fcc sites in a cubic box of side L, ``[N, 3]``."""
    basis = torch.tensor([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=F64)
    cells = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=F64)] * 3, indexing="ij"), -1)
    return ((cells.reshape(-1, 1, 3) + basis + 0.25) * (L / n)).reshape(-1, 3)


@functools.lru_cache(maxsize=2)
def _equilibrated_lj(n_eq: int) -> tuple[LennardJones, Space, State]:
    """LJ fluid (N = 108, rho = 0.8, force-shifted, r_c = 2.5) after ``n_eq`` Langevin steps
    (dt = 0.005, gamma = 2, kT = 1) from an fcc lattice: the crystal melts at this state
    point and the kinetic temperature settles at 1."""
    N, rho = 108, 0.8
    L = (N / rho) ** (1.0 / 3.0)
    space = periodic(L)
    lj = LennardJones(space, r_cut=2.5, shift="force")
    lg = Langevin(lj, dt=0.005, kT=1.0, gamma=2.0, space=space)
    s = lg.init(_fcc(3, L).unsqueeze(0), rng=ReplicaRNG(2024, 1))
    return lj, space, simulate(lg, s, n_eq, gradient="none").final


def _nve_energies(
    lj: LennardJones, space: Space, s: State, dt: float, n: int, every: int
) -> torch.Tensor:
    """Total energy every ``every`` steps of an NVE run of ``n`` steps from ``s``, ``[n/every + 1]``."""
    nve = NVE(lj, dt=dt, space=space)
    s0 = nve.init(s.R, P=s.P)
    mem = MemoryReporter(every, ("total_energy",))
    simulate(nve, s0, n, gradient="none", reporters=[mem])
    with torch.no_grad():
        return torch.cat([nve.energy(s0), mem.stacked("total_energy")[:, 0]])


def _drift_and_spread(E: torch.Tensor) -> tuple[float, float]:
    """(|linear-fit slope| * duration / |E0|, std(E) / |E0|)."""
    t = torch.arange(E.shape[0], dtype=F64)
    tc = t - t.mean()
    slope = float((tc * (E - E.mean())).sum() / (tc * tc).sum())
    E0 = abs(float(E[0]))
    return abs(slope) * float(t[-1]) / E0, float(E.std()) / E0


def _check_nve(n_eq: int, n: int, max_drift: float) -> None:
    lj, space, s = _equilibrated_lj(n_eq)
    E1 = _nve_energies(lj, space, s, 0.005, n, 10)
    E2 = _nve_energies(lj, space, s, 0.0025, 2 * n, 20)
    drift, spread = _drift_and_spread(E1)
    assert drift < max_drift, drift
    assert spread < 3e-4, spread
    ratio = float(E1.std() / E2.std())
    assert 3.0 < ratio < 5.0, ratio  # velocity Verlet: energy error ~ dt^2


def test_nve_lj_energy_conservation_short() -> None:
    """The long test's bounds over 1000 steps at dt = 0.005 (and 2000 at dt/2), from a
    shorter equilibration."""
    _check_nve(n_eq=1000, n=1000, max_drift=1e-4)


@pytest.mark.slow
def test_nve_lj_energy_conservation_long() -> None:
    """10,000 steps at dt = 0.005: relative linear-fit drift < 1e-4, std(E)/|E0| < 3e-4,
    fluctuation ratio dt : dt/2 (20,000 steps) in (3, 5)."""
    _check_nve(n_eq=4000, n=10_000, max_drift=1e-4)


def test_nve_per_particle_mass_and_harmonic_period() -> None:
    """Per-particle masses: independent oscillators in a trap of stiffness k return to their
    start after one period 2 pi sqrt(m/k) (velocity Verlet phase error O(dt^2))."""
    k = 2.0
    m = torch.tensor([1.0, 4.0], dtype=F64)
    dt = 0.001
    nve = NVE(HarmonicTrap(k), dt=dt, mass=m)
    R0 = torch.tensor([[[1.0, 0.0], [0.5, -0.5]]], dtype=F64)
    s = nve.init(R0, P=torch.zeros_like(R0))
    T_heavy = 2 * math.pi * math.sqrt(4.0 / k)
    n = round(T_heavy / dt)
    s = simulate(nve, s, n, gradient="none").final
    torch.testing.assert_close(s.R[0, 1], R0[0, 1], rtol=0, atol=1e-5)
    # the light particle has twice the frequency: also back after two of its periods
    torch.testing.assert_close(s.R[0, 0], R0[0, 0], rtol=0, atol=1e-5)


def test_nve_blow_up_names_step() -> None:
    """A huge time step on the LJ fluid overlaps particles; the error names the first
    non-finite step."""
    lj, space, s = _equilibrated_lj(1000)
    nve = NVE(lj, dt=0.2, space=space)
    s0 = nve.init(s.R, P=s.P)
    with pytest.raises(
        SimulationDivergedError, match=r"simulation diverged at step \d+ \(t = "
    ) as info:
        simulate(nve, s0, 500, gradient="none", check_every=50)
    first = info.value.step
    probe = s0
    with torch.no_grad():
        for _ in range(first - 1):
            probe = nve.step(probe)
        assert bool(torch.isfinite(probe.R).all() and torch.isfinite(probe.P).all())
        probe = nve.step(probe)
    assert not bool(torch.isfinite(probe.R).all() and torch.isfinite(probe.P).all())


def test_nve_bad_input() -> None:
    trap = HarmonicTrap(1.0)
    with pytest.raises(ControlMDError, match=r"mass must be > 0, got -1"):
        NVE(trap, dt=0.01, mass=-1.0)
    nve = NVE(trap, dt=0.01)
    R = torch.zeros(2, 3, 3, dtype=F64)
    with pytest.raises(ControlMDError, match=r"needs momenta: pass P=\.\.\., or kT"):
        nve.init(R)
    with pytest.raises(ControlMDError, match=r"P must be finite"):
        nve.init(R, P=torch.full_like(R, float("inf")))
    with pytest.raises(ControlMDError, match=r"kT must be >= 0, got -1"):
        nve.init(R, kT=-1.0, rng=ReplicaRNG(0, 2))


@pytest.mark.parametrize("cls", [Langevin, Brownian])
def test_a_bath_schedule_leaving_its_range_is_named_with_its_time(cls: type) -> None:
    """kT(t) = 1 - 2 t turns negative after t = 0.5: the noise amplitude sqrt(kT) is NaN
    there, and the error names the channel and the time, not only the step."""
    trap = HarmonicTrap(1.0)
    integ = cls(trap, dt=0.01, kT=lambda t: 1.0 - 2.0 * t)
    s0 = integ.init(torch.zeros(2, 1, 1, dtype=F64), kT=1.0, rng=ReplicaRNG(0, 2))
    with pytest.raises(SimulationDivergedError, match=r"step 51 \(t = 0\.51\)") as info:
        simulate(integ, s0, 100, gradient="none", check_every=10)
    assert "the control kT(t = 0.50" in str(info.value) and "must be >= 0" in str(info.value)


@pytest.mark.parametrize("integrator", ["brownian_exact_ou", "langevin"])
def test_a_learnable_friction_can_be_differentiated_run_after_run(integrator: str) -> None:
    """Cached step factors (1/gamma, exp(-gamma dt), the noise amplitude) are not reused
    across runs when gamma requires grad: the second run's gradient is its own (a cached
    factor holding the first run's graph failed with 'backward through the graph a second
    time'), and equals a fresh integrator's."""
    gamma = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)

    def build() -> Brownian | Langevin:
        if integrator == "langevin":
            return Langevin(HarmonicTrap(1.0, 0.0), dt=0.01, kT=1.0, gamma=gamma)
        return Brownian(HarmonicTrap(1.0, 0.0), dt=0.01, kT=1.0, gamma=gamma, method="exact_ou")

    def grad(integ: Brownian | Langevin, seed: int) -> float:
        R = torch.full((4, 1, 1), 0.3, dtype=torch.float64, requires_grad=True)
        P = torch.zeros_like(R) if integrator == "langevin" else None
        state = integ.init(R, P=P, rng=ReplicaRNG(seed, 4))
        final = simulate(integ, state, 5, gradient="direct").final
        loss = final.R.pow(2).sum() + (final.P.pow(2).sum() if final.P is not None else 0.0)
        (g,) = torch.autograd.grad(loss, gamma)
        return float(g)

    shared = build()
    first, second = grad(shared, 0), grad(shared, 1)
    assert first != 0.0 and second != 0.0
    assert second == grad(build(), 1)
