"""Thermostats reach the canonical distribution: Nosé–Hoover chain and Langevin BAOAB.

Canonical values for ``n_dof`` momentum degrees of freedom at temperature kT:
``<K> = n_dof kT / 2`` and ``Var(K) = n_dof kT^2 / 2``, so the instantaneous temperature
``T = 2K / n_dof`` has ``<T> = kT`` and ``Var(K)`` is checked directly.

Degrees-of-freedom rule: in a periodic box the momenta start with zero total momentum.
The Nosé–Hoover chain conserves total momentum, so ``n_dof = 3N - 3``; Langevin friction
and noise do not, so ``n_dof = 3N``.

Standard errors: each replica's time average is one independent sample (replicas never
interact), so ``SE = std over replicas / sqrt(B)`` already includes every time
correlation within a replica (block averaging with one block per replica).
"""

from __future__ import annotations

import math

import pytest
import torch

from controlmd.dynamics import Langevin, NoseHooverChain
from controlmd.errors import ControlMDError
from controlmd.potentials import HarmonicTrap, LennardJones
from controlmd.reporters import MemoryReporter
from controlmd.rng import ReplicaRNG, replica_seed
from controlmd.simulate import simulate
from controlmd.space import periodic

F64 = torch.float64
KT = 1.0


def _lj_fluid(
    B: int, n_side: int = 4, rho: float = 0.8
) -> tuple[LennardJones, torch.Tensor, object]:
    """Force-shifted LJ (r_c = 2.0 <= L/2 for N = 64) on a simple cubic lattice at rho."""
    N = n_side**3
    L = (N / rho) ** (1.0 / 3.0)
    space = periodic(L)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n_side, dtype=F64)] * 3, indexing="ij"), -1)
    R = (grid.reshape(-1, 3) + 0.5) * (L / n_side)
    return LennardJones(space, r_cut=2.0, shift="force"), R.expand(B, N, 3).clone(), space


def _canonical_stats(K: torch.Tensor, n_dof: int) -> dict[str, float]:
    """Mean temperature and Var(K) with their SEs from ``K`` ``[n_frames, B]``.

    Var(K) is estimated about the canonical mean ``n_dof kT / 2``, which is unbiased under
    the canonical hypothesis however short and correlated the run (about the sample mean
    it would be biased by the time correlation of K); a wrong mean fails the T check."""
    B = K.shape[1]
    T = 2.0 * K / n_dof
    T_rep = T.mean(0)
    var_rep = ((K - n_dof * KT / 2.0) ** 2).mean(0)
    return {
        "T": float(T_rep.mean()),
        "T_se": float(T_rep.std()) / math.sqrt(B),
        "var": float(var_rep.mean()),
        "var_se": float(var_rep.std()) / math.sqrt(B),
    }


def _check_canonical(K: torch.Tensor, n_dof: int) -> dict[str, float]:
    s = _canonical_stats(K, n_dof)
    var_target = n_dof * KT**2 / 2.0
    assert abs(s["T"] - KT) <= max(0.01 * KT, 4 * s["T_se"]), s
    assert abs(s["var"] - var_target) <= max(0.10 * var_target, 4 * s["var_se"]), (s, var_target)
    return s


def _run_nhc(B: int, n_eq: int, n_prod: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lj, R, space = _lj_fluid(B)
    nhc = NoseHooverChain(lj, dt=0.005, kT=KT, space=space, chain_length=3, tau=0.5)
    s = simulate(nhc, nhc.init(R, rng=ReplicaRNG(17, B)), n_eq, gradient="none").final
    mem = MemoryReporter(10, ("kinetic_energy", "invariant", "total_energy"))
    simulate(nhc, s, n_prod, gradient="none", reporters=[mem])
    return mem.stacked("kinetic_energy"), mem.stacked("invariant"), mem.stacked("total_energy")


def _run_langevin(B: int, n_eq: int, n_prod: int, gamma: float = 1.0) -> torch.Tensor:
    lj, R, space = _lj_fluid(B)
    lg = Langevin(lj, dt=0.005, kT=KT, gamma=gamma, space=space)
    s = simulate(lg, lg.init(R, rng=ReplicaRNG(23, B)), n_eq, gradient="none").final
    mem = MemoryReporter(10, ("kinetic_energy",))
    simulate(lg, s, n_prod, gradient="none", reporters=[mem])
    return mem.stacked("kinetic_energy")


def _check_invariant(H: torch.Tensor, E: torch.Tensor, max_drift: float) -> None:
    """H_ext ``[n, B]`` is conserved while the physical energy E = K + U ``[n, B]`` exchanges
    heat with the chain: per replica, std(H_ext) and the linear-fit change of H_ext over
    the run are below 1 % of std(E); and the systematic drift (replica-mean fitted change,
    which averages out the fluctuations) relative to |H_ext(0)| is below ``max_drift``."""
    change = _fitted_change(H)
    assert bool((H.std(0) < 0.01 * E.std(0)).all()), (H.std(0), E.std(0))
    assert bool((change.abs() < 0.01 * E.std(0)).all()), (change, E.std(0))
    assert abs(float(change.mean())) / float(H[0].abs().mean()) < max_drift


def _fitted_change(H: torch.Tensor) -> torch.Tensor:
    """Slope of a linear fit of each column of ``H`` ``[n, B]`` times the duration, ``[B]``."""
    t = torch.arange(H.shape[0], dtype=F64)
    tc = t - t.mean()
    return (tc[:, None] * (H - H.mean(0))).sum(0) / (tc * tc).sum() * t[-1]


def test_nhc_canonical_short() -> None:
    """8 replicas x 800 steps (the 4-SE bounds widen accordingly)."""
    K, H, E = _run_nhc(B=8, n_eq=300, n_prod=800)
    _check_canonical(K, n_dof=3 * 64 - 3)
    _check_invariant(H, E, max_drift=1e-4)


@pytest.mark.slow
def test_nhc_canonical_long() -> None:
    """32 replicas of N = 64 for 5000 steps: mean T within max(1 %, 4 SE), Var(K) within
    max(10 %, 4 SE); the extended energy H_ext has relative linear drift < 1e-4."""
    K, H, E = _run_nhc(B=32, n_eq=1000, n_prod=5000)
    _check_canonical(K, n_dof=3 * 64 - 3)
    _check_invariant(H, E, max_drift=1e-4)


def test_langevin_canonical_short() -> None:
    """8 replicas x 800 steps with gamma = 4: the total energy, which only the friction
    relaxes, decorrelates ~4x faster than at gamma = 1, so the short run holds more
    independent samples."""
    K = _run_langevin(B=8, n_eq=300, n_prod=800, gamma=4.0)
    _check_canonical(K, n_dof=3 * 64)


@pytest.mark.slow
def test_langevin_canonical_long() -> None:
    K = _run_langevin(B=32, n_eq=1000, n_prod=5000)
    _check_canonical(K, n_dof=3 * 64)


def test_langevin_harmonic_oscillator() -> None:
    """BAOAB on a harmonic trap: <x^2> = kT/k (BAOAB's configurational sampling is exact
    for harmonic forces) and <p^2> = m kT (1 - (omega dt / 2)^2) (the known O(dt^2) bias
    of BAOAB's momenta, here 0.25 %); particles are independent."""
    B, N, k, m, kT, dt = 16, 64, 4.0, 2.0, 0.7, 0.1
    lg = Langevin(HarmonicTrap(k), dt=dt, kT=kT, gamma=2.0, mass=m)
    s = simulate(
        lg, lg.init(torch.zeros(B, N, 3, dtype=F64), rng=ReplicaRNG(1, B)), 200, gradient="none"
    ).final
    traj = simulate(
        lg,
        s,
        400,
        gradient="none",
        record_every=20,
        observables={
            "x2": lambda s: (s.R**2).mean(dim=(1, 2)),
            "p2": lambda s: (s.P**2).mean(dim=(1, 2)),
        },
    )  # type: ignore[operator]
    x2 = traj.records["x2"][1:].mean(0)
    p2 = traj.records["p2"][1:].mean(0)
    w2dt2 = k / m * dt * dt
    assert abs(float(x2.mean()) - kT / k) <= 4 * float(x2.std()) / math.sqrt(B)
    target_p2 = m * kT * (1 - w2dt2 / 4)
    assert abs(float(p2.mean()) - target_p2) <= 4 * float(p2.std()) / math.sqrt(B)


def test_nhc_time_dependent_kT_follows_schedule() -> None:
    """Temperature as a control channel: with kT(t) stepping from 1.0 to 2.0, the mean
    kinetic temperature follows the new kT."""
    B = 4
    lj, R, space = _lj_fluid(B)
    nhc = NoseHooverChain(
        lj, dt=0.005, kT=lambda t: 1.0 + (t >= 0.5).to(t.dtype), space=space, tau=0.25
    )
    s = simulate(nhc, nhc.init(R, rng=ReplicaRNG(3, B)), 300, gradient="none").final
    mem = MemoryReporter(5, ("temperature",))
    simulate(nhc, s, 300, gradient="none", reporters=[mem])  # t in [1.5, 3]
    T = mem.stacked("temperature").mean(0)
    assert abs(float(T.mean()) - 2.0) <= max(0.02, 4 * float(T.std()) / math.sqrt(B))


def test_langevin_replica_equals_single_run() -> None:
    """Replica i of a batch seeded s equals a one-replica run seeded replica_seed(s, i),
    momenta drawn at init included."""
    B, seed = 4, 99
    lj, R, space = _lj_fluid(B, n_side=3, rho=0.3)
    lg = Langevin(lj, dt=0.005, kT=KT, gamma=0.5, space=space)
    R = R + 0.05 * torch.arange(B, dtype=F64).view(B, 1, 1)
    batch = simulate(lg, lg.init(R, rng=ReplicaRNG(seed, B)), 50, gradient="none").final
    for i in (0, 2, 3):
        one = simulate(
            lg, lg.init(R[i : i + 1], rng=ReplicaRNG(replica_seed(seed, i), 1)), 50, gradient="none"
        ).final
        torch.testing.assert_close(one.R[0], batch.R[i], rtol=0, atol=1e-13)
        torch.testing.assert_close(one.P[0], batch.P[i], rtol=0, atol=1e-13)  # type: ignore[index]


def test_maxwell_boltzmann_init() -> None:
    """Momenta at init: zero total momentum in a periodic box; <p^2> = m kT per component."""
    lj, R, space = _lj_fluid(16)
    m = torch.linspace(1.0, 3.0, 64, dtype=F64)
    nhc = NoseHooverChain(lj, dt=0.005, kT=1.5, space=space, mass=m)
    s = nhc.init(R, rng=ReplicaRNG(0, 16))
    torch.testing.assert_close(s.P.sum(1), torch.zeros(16, 3, dtype=F64), rtol=0, atol=1e-12)  # type: ignore[union-attr]
    u = s.P**2 / m.view(1, -1, 1)  # type: ignore[operator]
    assert abs(float(u.mean()) - 1.5 * (1 - 1 / 64)) <= 4 * float(u.std()) / math.sqrt(u.numel())


def test_thermostat_bad_input() -> None:
    lj, R, space = _lj_fluid(2)
    with pytest.raises(ControlMDError, match=r"kT must be > 0, got -1"):
        NoseHooverChain(lj, dt=0.005, kT=-1.0, space=space)
    with pytest.raises(ControlMDError, match=r"chain_length must be >= 1, got 0"):
        NoseHooverChain(lj, dt=0.005, kT=1.0, space=space, chain_length=0)
    with pytest.raises(ControlMDError, match=r"tau must be > 0"):
        NoseHooverChain(lj, dt=0.005, kT=1.0, space=space, tau=0.0)
    with pytest.raises(ControlMDError, match=r"unknown sy_steps '4'"):
        NoseHooverChain(lj, dt=0.005, kT=1.0, space=space, sy_steps=4)
    with pytest.raises(ControlMDError, match=r"mass must be > 0"):
        NoseHooverChain(lj, dt=0.005, kT=1.0, space=space, mass=torch.zeros(64))
    with pytest.raises(ControlMDError, match=r"mass has 3 entries but R has N = 64"):
        NoseHooverChain(lj, dt=0.005, kT=1.0, space=space, mass=torch.ones(3)).init(
            R, rng=ReplicaRNG(0, 2)
        )
    with pytest.raises(ControlMDError, match=r"gamma must be > 0, got 0"):
        Langevin(lj, dt=0.005, kT=1.0, gamma=0.0, space=space)
    with pytest.raises(ControlMDError, match=r"dt must be > 0, got 0"):
        Langevin(lj, dt=0.0, kT=1.0, space=space)
    lg = Langevin(lj, dt=0.005, kT=1.0, space=space)
    with pytest.raises(ControlMDError, match=r"pass rng=ReplicaRNG"):
        lg.init(R)
    with pytest.raises(ControlMDError, match=r"P must have the shape of R \(2, 64, 3\)"):
        lg.init(R, rng=ReplicaRNG(0, 2), P=torch.zeros(2, 64, 2, dtype=F64))
