"""Gradients through trajectories (float64).

System: a free LJ cluster (learnable epsilon) in a harmonic trap whose centre is a
3-piece :class:`PiecewiseConstant` protocol (the external-field parameters), two
replicas. The loss is a smooth function of the final positions and momenta.

* native integrators, direct and checkpointed backprop vs central finite differences
  (relative error < 1e-6); truncated backprop with W >= n_steps equals direct backprop;
* stochastic integrators (Langevin, Brownian) with a fixed seed: direct backprop vs
  finite differences with common random numbers (every evaluation restarts the same
  per-replica streams);
* torchdiffeq: ``odeint_adjoint`` vs ``odeint`` with dopri5 at rtol = atol = 1e-12 agree
  to 1e-8; with rk4 they agree to 1e-5 and the gap shrinks like dt^4 (~16x per halving;
  checked on the Nosé–Hoover system, where the dt^4 terms do not cancel).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from controlmd.dynamics import NVE, Brownian, Integrator, Langevin, NoseHooverChain, State
from controlmd.potentials import HarmonicTrap, LennardJones
from controlmd.protocols import PiecewiseConstant
from controlmd.rng import ReplicaRNG
from controlmd.simulate import simulate, simulate_ode

F64 = torch.float64
B, N, D = 2, 5, 3
DT = 0.005
N_STEPS = 60
T_FINAL = DT * N_STEPS


def _cluster() -> tuple[torch.Tensor, torch.Tensor]:
    """Initial positions (a slightly perturbed 5-particle cluster) and momenta ``[B, N, 3]``."""
    g = torch.Generator().manual_seed(0)
    base = torch.tensor(
        [[0, 0, 0], [1.12, 0, 0], [0, 1.12, 0], [0, 0, 1.12], [1.12, 1.12, 0]], dtype=F64
    )
    R = base + 0.05 * torch.randn(B, N, D, generator=g, dtype=F64)
    P = 0.4 * torch.randn(B, N, D, generator=g, dtype=F64)
    return R, P


def _potential() -> tuple[nn.Module, list[nn.Parameter]]:
    lj = LennardJones(r_cut=None, shift="none", epsilon=1.0, learnable=("epsilon",))
    centre = PiecewiseConstant(
        dim=D,
        t_final=T_FINAL,
        n_pieces=3,
        init=[[0.2, 0.0, -0.1], [0.5, 0.3, 0.0], [0.1, 0.6, 0.2]],
    )
    return lj + HarmonicTrap(1.5, centre), [lj.epsilon, centre.values]


_W = torch.linspace(-1.0, 1.0, B * N * D, dtype=F64).reshape(B, N, D)


def _loss(state: State) -> torch.Tensor:
    loss = (state.R * _W).sum()
    if state.P is not None:
        loss = loss + 0.5 * (state.P**2).sum()
    return loss


Builder = Callable[[nn.Module], tuple[Integrator, State]]


def _nve(pot: nn.Module) -> tuple[Integrator, State]:
    R, P = _cluster()
    nve = NVE(pot, dt=DT)
    return nve, nve.init(R, P=P)


def _nhc(pot: nn.Module) -> tuple[Integrator, State]:
    R, P = _cluster()
    nhc = NoseHooverChain(pot, dt=DT, kT=0.5, tau=0.1)
    return nhc, nhc.init(R, P=P)


def _langevin(pot: nn.Module) -> tuple[Integrator, State]:
    R, P = _cluster()
    lg = Langevin(pot, dt=DT, kT=0.5, gamma=2.0)
    return lg, lg.init(R, P=P, rng=ReplicaRNG(31, B))


def _brownian(pot: nn.Module) -> tuple[Integrator, State]:
    R, _ = _cluster()
    bd = Brownian(pot, dt=DT, kT=0.3, gamma=2.0)
    return bd, bd.init(R, rng=ReplicaRNG(37, B))


def _brownian_ou(pot: nn.Module) -> tuple[Integrator, State]:
    R, _ = _cluster()
    trap = pot.terms[1]  # the harmonic trap alone (exact OU needs a lone trap)
    bd = Brownian(trap, dt=4 * DT, kT=0.3, gamma=2.0, method="exact_ou")
    return bd, bd.init(R, rng=ReplicaRNG(41, B))


def _gradient(build: Builder, **simulate_options: object) -> torch.Tensor:
    pot, params = _potential()
    integrator, state = build(pot)
    final = simulate(integrator, state, N_STEPS, **simulate_options).final  # type: ignore[arg-type]
    return _grad(_loss(final), params)


def _grad(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """Gradient of ``loss`` in every parameter, flattened (zeros for unused ones)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)]
    )


# Flat indices checked against finite differences: LJ epsilon, then one component of each
# of the three protocol pieces (the gradient vector is [epsilon, values[0, :], values[1, :], ...]).
FD_INDICES = (0, 1, 5, 9)


def _finite_differences(build: Builder, h: float = 1e-5) -> torch.Tensor:
    """Central differences of the loss in the parameters at :data:`FD_INDICES`; each
    evaluation rebuilds the integrator and state, so stochastic integrators reuse the same
    random numbers."""
    grads = []
    for flat in FD_INDICES:
        values = []
        for sign in (1.0, -1.0):
            pot, params = _potential()
            with torch.no_grad():
                k, i = (0, 0) if flat == 0 else (1, flat - 1)
                params[k].view(-1)[i] += sign * h
            integrator, state = build(pot)
            final = simulate(integrator, state, N_STEPS, gradient="none").final
            values.append(float(_loss(final)))
        grads.append((values[0] - values[1]) / (2 * h))
    return torch.tensor(grads, dtype=F64)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("build", [_nve, _nhc], ids=["nve", "nose_hoover_chain"])
def test_direct_and_checkpoint_match_finite_differences(build: Builder) -> None:
    fd = _finite_differences(build)
    direct = _gradient(build, gradient="direct")
    ckpt = _gradient(build, gradient="checkpoint", window=16)
    idx = list(FD_INDICES)
    assert _rel_err(direct[idx], fd) < 1e-6
    assert _rel_err(ckpt[idx], fd) < 1e-6
    torch.testing.assert_close(ckpt, direct, rtol=1e-12, atol=1e-12)


def test_truncated_full_window_equals_direct_and_short_window_differs() -> None:
    direct = _gradient(_nve, gradient="direct")
    torch.testing.assert_close(
        _gradient(_nve, gradient="truncated", window=N_STEPS), direct, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        _gradient(_nve, gradient="truncated", window=10 * N_STEPS), direct, rtol=1e-12, atol=1e-12
    )
    assert _rel_err(_gradient(_nve, gradient="truncated", window=N_STEPS // 4), direct) > 1e-3


@pytest.mark.parametrize(
    "build",
    [_langevin, _brownian, _brownian_ou],
    ids=["langevin", "brownian_euler_maruyama", "brownian_exact_ou"],
)
def test_stochastic_direct_backprop_matches_common_random_number_fd(build: Builder) -> None:
    fd = _finite_differences(build)
    direct = _gradient(build, gradient="direct")
    ckpt = _gradient(build, gradient="checkpoint", window=16)
    assert _rel_err(direct[list(FD_INDICES)], fd) < 1e-6
    torch.testing.assert_close(ckpt, direct, rtol=1e-12, atol=1e-12)


def _ode_gradient(build: Builder, t_final: float, **options: object) -> torch.Tensor:
    pot, params = _potential()
    integrator, state = build(pot)
    final = simulate_ode(integrator, state, t_final, **options).final  # type: ignore[arg-type]
    return _grad(_loss(final), params)


def test_ode_adjoint_matches_odeint_dopri5() -> None:
    """dopri5 at rtol = atol = 1e-12 over t = 0.15 (across the protocol's first jump, where
    the solve is split): adjoint and direct gradients agree to 1e-8."""
    kw = {"method": "dopri5", "rtol": 1e-12, "atol": 1e-12}
    t = 0.15
    adj = _ode_gradient(_nve, t, adjoint=True, **kw)
    direct = _ode_gradient(_nve, t, adjoint=False, **kw)
    assert _rel_err(adj, direct) < 1e-8


@pytest.mark.slow
def test_ode_adjoint_matches_odeint_dopri5_nose_hoover() -> None:
    kw = {"method": "dopri5", "rtol": 1e-12, "atol": 1e-12}
    adj = _ode_gradient(_nhc, T_FINAL, adjoint=True, **kw)
    direct = _ode_gradient(_nhc, T_FINAL, adjoint=False, **kw)
    assert _rel_err(adj, direct) < 1e-8


def _rk4_gaps(build: Builder, steps: tuple[float, ...]) -> list[float]:
    """Relative gap between adjoint and direct rk4 gradients over T = 0.3 for each step."""
    gaps = []
    for step in steps:
        kw = {"method": "rk4", "options": {"step_size": step}}
        adj = _ode_gradient(build, T_FINAL, adjoint=True, **kw)
        direct = _ode_gradient(build, T_FINAL, adjoint=False, **kw)
        gaps.append(_rel_err(adj, direct))
    return gaps


def test_ode_rk4_adjoint_gap_shrinks_like_dt4_nose_hoover() -> None:
    """NHC with rk4 over T = 0.3 in 60 and 120 steps: backprop through the solver and the
    adjoint both approximate the exact gradient to O(dt^4), so their gap is < 1e-5 and
    shrinks by ~2^4 = 16 per halving of dt (accepted: 8 to 32, observed order 3 to 5)."""
    gaps = _rk4_gaps(_nhc, (DT, DT / 2))
    assert gaps[0] < 1e-5, gaps
    assert 8.0 < gaps[0] / gaps[1] < 32.0, gaps


def test_ode_rk4_adjoint_gap_nve() -> None:
    """NVE with rk4 (60 and 120 steps): adjoint and direct agree to 1e-5 and closer at the
    smaller step. Here the O(dt^4) terms of the two nearly cancel (the gap is ~1e-8 and
    its ratio per halving is irregular), so only the bound and the decrease are checked;
    the dt^4 rate is checked on the NHC system above."""
    gaps = _rk4_gaps(_nve, (DT, DT / 2))
    assert gaps[0] < 1e-5 and gaps[1] < gaps[0], gaps


def test_native_verlet_converges_to_ode_solution() -> None:
    """Velocity Verlet's final state approaches the dopri5 solution as dt^2 (a check that
    the native and ODE paths integrate the same equations, protocol jumps included)."""
    pot, _ = _potential()
    R, P = _cluster()
    with torch.no_grad():
        ref = simulate_ode(
            NVE(pot, dt=DT),
            NVE(pot, dt=DT).init(R, P=P),
            T_FINAL,
            method="dopri5",
            rtol=1e-11,
            atol=1e-11,
            adjoint=False,
        ).final
        errs = []
        for dt in (DT, DT / 2):
            nve = NVE(pot, dt=dt)
            s = simulate(nve, nve.init(R, P=P), round(T_FINAL / dt), gradient="none").final
            errs.append(float((s.R - ref.R).abs().max()))
    assert 3.0 < errs[0] / errs[1] < 5.0, errs
