"""Work and heat of time-dependent Hamiltonians in every integrator (issue 21, items 2, 3, 6).

Analytic references: a particle dragged by a harmonic trap ``k/2 (x - lambda(t))^2`` has
linear dynamics, and every work increment ``E(x, lambda') - E(x, lambda)`` is linear in
``x``; so the mean work is a function of the mean trajectory alone (the first Gaussian
moment), computed here from the mean recursions of the discrete schemes written out by
hand, and from the continuous-time mean equations solved with a matrix exponential.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from controlmd.dynamics import CONTROL_TIME_OFFSET, NVE, Brownian, Langevin, NoseHooverChain, State
from controlmd.potentials import HarmonicTrap
from controlmd.protocols import Endpoints, make_protocol
from controlmd.rng import ReplicaRNG
from controlmd.simulate import simulate

F64 = torch.float64
K, M, GAMMA, T_F = 2.0, 1.0, 1.5, 1.0
LAM_I, LAM_A, LAM_B, LAM_F = 0.0, 1.0, 3.0, 4.0  # jumps 0 -> 1 at t = 0 and 3 -> 4 at t_f


def _trap() -> HarmonicTrap:
    """The dragged trap: linear from LAM_A to LAM_B on (0, T_F), fixed ends with jumps."""
    free = make_protocol("chebyshev", dim=1, t_final=T_F, degree=1, init=[LAM_A, LAM_B])
    return HarmonicTrap(K, Endpoints(free, initial=LAM_I, final=LAM_F))


def _equilibrium(B: int, seed: int, *, momenta: bool, kT: float = 1.0) -> tuple[Tensor, ...]:
    rng = ReplicaRNG(seed, B)
    x0 = LAM_I + math.sqrt(kT / K) * rng.randn(1, 1)
    p0 = math.sqrt(M * kT) * rng.randn(1, 1) if momenta else None
    return x0, p0, rng


Tensor = torch.Tensor


def _lam(t: float) -> float:
    if t < 0:
        return LAM_I
    if t > T_F:
        return LAM_F
    return LAM_A + (LAM_B - LAM_A) * t / T_F


def _dW(x: float, lam_from: float, lam_to: float) -> float:
    """Mean of ``k/2 [(x - to)^2 - (x - from)^2]`` given the mean ``x`` (linear in x)."""
    return -K * (lam_to - lam_from) * (x - 0.5 * (lam_from + lam_to))


def _baoab_mean_work(dt: float, offset: float = CONTROL_TIME_OFFSET) -> float:
    """Exact mean work of BAOAB (any kT): the mean recursion, noise averaged out. The
    control is read at the one-sided limits ``t -+ offset dt``, as the integrators do."""
    n, eps = round(T_F / dt), offset * dt
    c = math.exp(-GAMMA * dt)
    q, p, W = LAM_I, 0.0, 0.0
    F = -K * (q - _lam(eps))
    for i in range(n):
        lam0, lam1 = _lam(i * dt + eps), _lam((i + 1) * dt - eps)
        before = LAM_I if i == 0 else _lam(i * dt - eps)
        W += _dW(q, before, lam0)  # a jump at t_n (the opening one at t = 0)
        p += 0.5 * dt * F
        q += 0.5 * dt * p / M
        W += _dW(q, lam0, lam1)  # the control update, at the midpoint of the drift
        p *= c
        q += 0.5 * dt * p / M
        F = -K * (q - lam1)
        p += 0.5 * dt * F
    return W + _dW(q, _lam(T_F - eps), LAM_F)  # closing jump, at q_N


def _underdamped_mean_work_continuous() -> float:
    """Exact mean work in continuous time: with ``y = <x> - lambda`` and ``v = lambda'``,
    ``y'' + gamma y' + (k/m) y = -gamma v``; the work is the two jumps plus
    ``-k v int_0^T y dt``. Solved exactly by the matrix exponential of the linear system
    ``z = (y, y', 1, int y)``."""
    v = (LAM_B - LAM_A) / T_F
    A = torch.tensor(
        [[0, 1, 0, 0], [-K / M, -GAMMA, -GAMMA * v, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=F64
    )
    z0 = torch.tensor([LAM_I - LAM_A, -v, 1.0, 0.0], dtype=F64)
    y_T, _, _, integral = (torch.linalg.matrix_exp(A * T_F) @ z0).tolist()
    x_T = y_T + LAM_B
    return _dW(LAM_I, LAM_I, LAM_A) - K * v * integral + _dW(x_T, LAM_B, LAM_F)


def _em_mean_work(dt: float, mu: float) -> float:
    """Exact mean work of Euler–Maruyama Brownian dynamics (mean recursion)."""
    n = round(T_F / dt)
    x, W = LAM_I, 0.0
    for i in range(n):
        lam_before = _lam(i * dt - 1e-9)
        lam = _lam((i + 1) * dt - 1e-9)
        W += _dW(x, lam_before, lam)  # control first, at x_n
        x += mu * K * (lam - x) * dt
    return W + _dW(x, LAM_B, LAM_F)


# ------------------------------------------------------------------ analytic mean work


def test_underdamped_dragged_trap_mean_work_is_exact() -> None:
    """Langevin BAOAB with work: the Monte Carlo mean equals the exact mean of the discrete
    dynamics (within 4 SE), which converges at second order in dt to the exact
    continuous-time mean work."""
    dt, B = 0.01, 2000
    lg = Langevin(_trap(), dt=dt, kT=1.0, gamma=GAMMA, mass=M, track_work=True)
    x0, p0, rng = _equilibrium(B, 3, momenta=True)
    final = simulate(lg, lg.init(x0, P=p0, rng=rng), round(T_F / dt), gradient="none").final
    W = final.aux["work"]
    se = float(W.std()) / math.sqrt(B)
    exact = _baoab_mean_work(dt)
    assert abs(float(W.mean()) - exact) < 4 * se, (float(W.mean()), exact, se)
    continuous = _underdamped_mean_work_continuous()
    # the scheme itself (one-sided offsets -> 0)
    errors = [abs(_baoab_mean_work(h, 0.0) - continuous) for h in (0.01, 0.005, 0.0025)]
    assert errors[0] < 1e-4 * abs(continuous)
    for coarse, fine in itertools.pairwise(errors):
        assert 3.5 < coarse / fine < 4.5, errors


def test_noise_free_langevin_gives_the_mean_work() -> None:
    """kT = 0 (item 6): one deterministic trajectory from the mean initial state carries
    exactly the mean work of the noisy dynamics (linear dynamics, linear work)."""
    dt = 0.01
    lg = Langevin(_trap(), dt=dt, kT=0.0, gamma=GAMMA, mass=M, track_work=True)
    zero = torch.full((1, 1, 1), LAM_I, dtype=F64)
    s = lg.init(zero, P=torch.zeros_like(zero), rng=ReplicaRNG(0, 1))
    final = simulate(lg, s, round(T_F / dt), gradient="none").final
    assert float(final.aux["work"][0]) == pytest.approx(_baoab_mean_work(dt), rel=1e-12)
    assert float(final.aux["heat"][0]) > 0  # friction still dissipates


@pytest.mark.parametrize("method", ["euler_maruyama", "exact_ou"])
def test_overdamped_dragged_trap_mean_work_is_exact(method: str) -> None:
    dt, B, mu = 0.01, 2000, 1.0
    bd = Brownian(_trap(), dt=dt, kT=1.0, gamma=1.0 / mu, method=method, track_work=True)
    x0, _, rng = _equilibrium(B, 5, momenta=False)
    W = simulate(bd, bd.init(x0, rng=rng), round(T_F / dt), gradient="none").final.aux["work"]
    if method == "euler_maruyama":
        exact = _em_mean_work(dt, mu)
    else:  # the exact OU mean recursion: x -> lam + (x - lam) exp(-mu k dt)
        n, a = round(T_F / dt), math.exp(-mu * K * dt)
        x, exact = LAM_I, 0.0
        for i in range(n):
            lam_before, lam = _lam(i * dt - 1e-9), _lam((i + 1) * dt - 1e-9)
            exact += _dW(x, lam_before, lam)
            x = lam + (x - lam) * a
        exact += _dW(x, LAM_B, LAM_F)
    se = float(W.std()) / math.sqrt(B)
    assert abs(float(W.mean()) - exact) < 4 * se, (float(W.mean()), exact, se)


# ------------------------------------------------------------------ first law per trajectory


def test_brownian_first_law_is_exact_per_trajectory() -> None:
    """Overdamped: W = E_final - E_initial + Q for every trajectory (energy changes only by
    control updates, counted as work, and moves, counted as heat)."""
    bd = Brownian(_trap(), dt=0.01, kT=0.7, track_work=True)
    x0, _, rng = _equilibrium(64, 9, momenta=False)
    s0 = bd.init(x0, rng=rng)
    final = simulate(bd, s0, 100, gradient="none").final
    pot = bd.potential
    E0 = pot.energy(s0.R, torch.tensor(-1e-9, dtype=F64))  # before the opening jump
    E1 = pot.energy(final.R, torch.tensor(T_F + 1e-9, dtype=F64))  # after the closing one
    torch.testing.assert_close(final.aux["work"], E1 - E0 + final.aux["heat"], rtol=0, atol=1e-11)


def _shadow(make, dt: float, B: int = 64) -> float:
    """RMS over replicas of ``W - Delta(K + E) - Q`` (the shadow work)."""
    integ = make(dt)
    x0, p0, rng = _equilibrium(B, 11, momenta=True)
    s0 = integ.init(x0, P=p0, rng=rng)
    final = simulate(integ, s0, round(T_F / dt), gradient="none").final
    pot = integ.potential
    E0 = integ.kinetic_energy(s0) + pot.energy(s0.R, torch.tensor(-1e-9, dtype=F64))
    E1 = integ.kinetic_energy(final) + pot.energy(final.R, torch.tensor(T_F + 1e-9, dtype=F64))
    residual = final.aux["work"] - (E1 - E0) - final.aux["heat"]
    return float(residual.pow(2).mean().sqrt())


@pytest.mark.parametrize(
    "make",
    [
        lambda dt: NVE(_trap(), dt=dt, track_work=True),
        lambda dt: Langevin(_trap(), dt=dt, kT=1.0, gamma=GAMMA, track_work=True),
        lambda dt: NoseHooverChain(_trap(), dt=dt, kT=1.0, tau=0.2, track_work=True),
    ],
    ids=["nve", "langevin", "nhc"],
)
def test_inertial_first_law_up_to_second_order_shadow_work(make) -> None:
    """Inertial: W = Delta(K + E) + Q per trajectory, up to the shadow work (the energy
    error of the deterministic substeps), which vanishes as dt^2."""
    coarse, fine = _shadow(make, 0.02), _shadow(make, 0.01)
    assert coarse < 2e-3  # |W| is ~13 here
    assert 3.5 < coarse / fine < 4.5, (coarse, fine)


# ------------------------------------------------------------------ states and jumps


@pytest.mark.parametrize("inertial", [False, True])
def test_a_bare_state_gets_work_accumulators(inertial: bool) -> None:
    """``State(R=x0, rng=rng)`` (no accumulators) with ``track_work=True``: no KeyError."""
    x0, p0, rng = _equilibrium(4, 1, momenta=inertial)
    if inertial:
        integ = Langevin(_trap(), dt=0.01, kT=1.0, track_work=True)
        state = State(R=x0, P=p0, rng=rng)
    else:
        integ = Brownian(_trap(), dt=0.01, kT=1.0, track_work=True)
        state = State(R=x0, rng=rng)
    stepped = integ.step(state)  # by hand
    assert stepped.aux["work"].shape == (4,)
    final = simulate(integ, State(R=x0, P=p0, rng=ReplicaRNG(1, 4)), 10).final
    assert final.aux["work"].shape == final.aux["heat"].shape == (4,)


def test_closing_jump_is_counted_once_across_continued_runs() -> None:
    """A run continued past t_f counts the closing jump once: 100 + 20 steps equal one run
    of 120 steps (the steps after t_f do no work: the control is fixed)."""
    make = lambda: Brownian(_trap(), dt=0.01, kT=1.0, track_work=True)  # noqa: E731
    x0, _, _ = _equilibrium(8, 2, momenta=False)
    a_int, b_int = make(), make()
    a = simulate(a_int, a_int.init(x0, rng=ReplicaRNG(2, 8)), 120, gradient="none").final
    s = b_int.init(x0, rng=ReplicaRNG(2, 8))
    s = simulate(b_int, s, 100, gradient="none").final
    W_tf = s.aux["work"].clone()
    s = simulate(b_int, s, 20, gradient="none").final
    torch.testing.assert_close(s.aux["work"], a.aux["work"], rtol=0, atol=1e-12)
    torch.testing.assert_close(s.aux["work"], W_tf, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ kT = 0 and Endpoints


def test_kT_zero_is_the_noise_free_limit() -> None:
    """Item 6: kT = 0 integrates the noise-free equations. Fixed trap at c, x0 = 1:
    exact OU is the exact solution of dx/dt = -mu k (x - c); Euler–Maruyama converges to
    it at first order; BAOAB to the damped oscillator at second order."""
    c, x0, T = 0.5, 1.0, 1.0
    trap = HarmonicTrap(K, c)
    R0 = torch.full((1, 1, 1), x0, dtype=F64)
    exact_od = c + (x0 - c) * math.exp(-K * T)  # mu = 1

    def run(integ, n: int, P=None) -> State:
        s = integ.init(R0, P=P, rng=ReplicaRNG(0, 1))
        return simulate(integ, s, n, gradient="none").final

    ou = run(Brownian(trap, dt=0.1, kT=0.0, method="exact_ou"), 10)
    assert float(ou.R) == pytest.approx(exact_od, abs=1e-14)
    em = [abs(float(run(Brownian(trap, dt=T / n, kT=0.0), n).R) - exact_od) for n in (50, 100)]
    assert 1.9 < em[0] / em[1] < 2.1
    # underdamped: x'' + gamma x' + (k/m) x = (k/m) c, from rest
    w = math.sqrt(K / M - GAMMA**2 / 4)
    y0, v0 = x0 - c, 0.0
    y = math.exp(-GAMMA * T / 2) * (
        y0 * math.cos(w * T) + (v0 + GAMMA * y0 / 2) / w * math.sin(w * T)
    )
    err = []
    for n in (50, 100):
        lg = Langevin(trap, dt=T / n, kT=0.0, gamma=GAMMA, mass=M)
        err.append(abs(float(run(lg, n, P=torch.zeros_like(R0)).R) - (c + y)))
    assert err[1] < 1e-4 and 3.5 < err[0] / err[1] < 4.5, err


def test_kT_zero_is_refused_where_undefined() -> None:
    from controlmd.errors import ControlMDError

    with pytest.raises(ControlMDError, match=r"kT must be > 0, got 0"):
        NoseHooverChain(HarmonicTrap(1.0), dt=0.01, kT=0.0)  # thermostat masses ~ kT
    with pytest.raises(ControlMDError, match=r"kT must be >= 0, got -0.5"):
        Langevin(HarmonicTrap(1.0), dt=0.01, kT=-0.5)


def test_endpoints_from_a_config_spec_saves_and_loads(tmp_path) -> None:
    from controlmd.protocols import load_protocol

    u = make_protocol(
        "endpoints",
        inner={"kind": "chebyshev", "degree": 1},
        initial=0.0,
        final=5.0,
        dim=1,
        t_final=2.0,
        init=[1.0, 4.0],
    )
    t = torch.tensor([-0.1, 0.0, 1.0, 2.0, 2.1], dtype=F64)
    expected = torch.tensor([0.0, 1.0, 2.5, 4.0, 5.0], dtype=F64)
    torch.testing.assert_close(u(t)[:, 0].detach(), expected, rtol=0, atol=1e-9)
    assert u.breakpoints() == [0.0, 2.0] and u.closing_jumps() == [2.0]
    u.save(tmp_path / "u.pt")
    torch.testing.assert_close(load_protocol(tmp_path / "u.pt")(t).detach(), u(t).detach())


def _mean_work_of(coeffs: Tensor | None = None, *, gradient: str = "direct", window=None):
    """Mean work and its gradient in the protocol's Chebyshev coefficients (fixed noise)."""
    free = make_protocol("chebyshev", dim=1, t_final=T_F, degree=1, init=[LAM_A, LAM_B])
    (param,) = [p for p in free.parameters() if p.requires_grad]
    if coeffs is not None:
        with torch.no_grad():
            param.copy_(coeffs.reshape(param.shape))
    lg = Langevin(
        HarmonicTrap(K, Endpoints(free, initial=LAM_I, final=LAM_F)),
        dt=0.05,
        kT=1.0,
        gamma=GAMMA,
        track_work=True,
    )
    x0, p0, _ = _equilibrium(4, 7, momenta=True)
    state = State(R=x0, P=p0, rng=ReplicaRNG(8, 4))  # bare: accumulators added by simulate
    W = simulate(lg, state, 20, gradient=gradient, window=window).final.aux["work"].mean()
    (grad,) = torch.autograd.grad(W, [param])
    return float(W.detach()), grad.reshape(-1), param.detach().reshape(-1).clone()


def test_work_gradient_matches_finite_differences() -> None:
    """The work is differentiable in the protocol (the trainer's pathwise loss), through
    the midpoint updates and both jumps; checkpointed windows give the same gradient."""
    _, direct, coeffs = _mean_work_of()
    _, checkpointed, _ = _mean_work_of(gradient="checkpoint", window=6)
    torch.testing.assert_close(checkpointed, direct, rtol=1e-10, atol=1e-12)
    h = 1e-6
    for j in range(coeffs.numel()):
        step = torch.zeros_like(coeffs)
        step[j] = h
        fd = (_mean_work_of(coeffs + step)[0] - _mean_work_of(coeffs - step)[0]) / (2 * h)
        assert float(direct[j]) == pytest.approx(fd, rel=1e-6, abs=1e-8)


def test_reversible_gradients_refuse_work_tracking() -> None:
    from controlmd.errors import ControlMDError

    free = make_protocol("chebyshev", dim=1, t_final=T_F, degree=1, init=[LAM_A, LAM_B])
    nve = NVE(
        HarmonicTrap(K, Endpoints(free, initial=LAM_I, final=LAM_F)), dt=0.05, track_work=True
    )
    x0, p0, _ = _equilibrium(2, 1, momenta=True)
    with pytest.raises(ControlMDError, match=r"reversible.*use gradient='checkpoint'"):
        simulate(nve, nve.init(x0, P=p0), 5, gradient="reversible")


def test_kT_zero_gradient_in_a_learnable_stiffness_is_finite() -> None:
    """Exact OU at kT = 0 (zero variance) still differentiates in the stiffness: the
    pathwise gradient of the deterministic work equals central differences."""
    free = make_protocol("chebyshev", dim=1, t_final=1.0, degree=1, init=[1.0, 4.0])
    (param,) = [p for p in free.parameters() if p.requires_grad]

    def work() -> Tensor:
        trap = HarmonicTrap(Endpoints(free, initial=1.0, final=4.0))
        bd = Brownian(trap, dt=0.05, kT=0.0, method="exact_ou", track_work=True)
        s = bd.init(torch.ones(1, 1, 1, dtype=F64), rng=ReplicaRNG(0, 1))
        return simulate(bd, s, 20).final.aux["work"][0]

    (grad,) = torch.autograd.grad(work(), [param])
    assert bool(torch.isfinite(grad).all())
    h = 1e-6
    for j in range(param.numel()):
        with torch.no_grad():
            param.view(-1)[j] += h
            up = float(work())
            param.view(-1)[j] -= 2 * h
            down = float(work())
            param.view(-1)[j] += h
        assert float(grad.view(-1)[j]) == pytest.approx((up - down) / (2 * h), rel=1e-6)
