"""Reversible backpropagation (controlmd.dynamics.reversible) against direct backprop.

Float64, small LJ systems: the gradients of a loss of the final state with respect to the
potential's parameters, a protocol, a temperature schedule and the initial state must
equal those of plain autograd through ``simulate(..., gradient="direct")``.
"""

from __future__ import annotations

import pytest
import torch

from controlmd.dynamics import NVE, ControlSchedule, Langevin, NoseHooverChain, reversible
from controlmd.dynamics.reversible import simulate_reversible
from controlmd.errors import ControlMDError
from controlmd.lattice import lattice
from controlmd.neighbors import NeighborList
from controlmd.potentials import ConstantForce, HarmonicTrap, LennardJones, ScaledPotential
from controlmd.protocols import FourierSeries, MLPProtocol, PiecewiseConstant, Tabulated
from controlmd.rng import ReplicaRNG
from controlmd.simulate import simulate
from controlmd.space import periodic

F64 = torch.float64
N = 32
R_CUT = 1.5


def _fluid(B: int = 2, seed: int = 0):
    """An LJ liquid (density 0.8, kT = 1) of N = 32 after 100 steps of melting."""
    R0, box = lattice("fcc", N, density=0.8)
    space = periodic(box)
    nve = NVE(LennardJones(space, r_cut=R_CUT), dt=0.005, space=space)
    s = nve.init(R0.expand(B, N, 3).contiguous(), kT=1.0, rng=ReplicaRNG(seed, B))
    with torch.no_grad():
        s = simulate(nve, s, 100, gradient="none").final
    return space, s.R, s.P


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _run_both(make, R, P, n_steps: int, window: int, loss_fn):
    """Gradients of ``loss_fn(integrator, final)`` w.r.t. (parameters..., R0, P0) by direct
    backprop and by the reversible path, each with a fresh integrator."""
    out = {}
    for mode in ("direct", "reversible"):
        integ = make()
        R0 = R.clone().requires_grad_(True)
        P0 = P.clone().requires_grad_(True)
        state = integ.init(R0, P=P0)
        if mode == "direct":
            final = simulate(integ, state, n_steps, gradient="direct").final
        else:
            final = simulate_reversible(integ, state, n_steps, window=window)
        params = [p for p in integ.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss_fn(integ, final), [*params, R0, P0])
        out[mode] = (final, grads)
    return out


def _final_state_loss(integ, final) -> torch.Tensor:
    """Potential energy per particle plus terms in q and p (all of the final state)."""
    return (
        integ.potential.energy(final.R, final.t).sum() / N
        + 0.01 * (final.P**2).sum()
        + torch.sin(0.3 * final.R).sum()
    )


def _piecewise_trap(space, *, t_final: float, stiffness: float) -> NVE:
    """LJ plus a trap on three particles whose centre is a 4-piece protocol on [0, t_final]."""
    centre = PiecewiseConstant(
        dim=3,
        t_final=t_final,
        n_pieces=4,
        init=[[1.0, 1.0, 1.0], [1.5, 1.0, 1.2], [2.0, 1.5, 1.0], [1.0, 2.0, 2.0]],
    )
    trap = HarmonicTrap(stiffness, centre, particles=[0, 1, 2], space=space)
    return NVE(LennardJones(space, r_cut=R_CUT) + trap, dt=0.005, space=space)


def test_nve_lj_1000_steps_matches_direct_backprop() -> None:
    space, R, P = _fluid()

    def make() -> NVE:
        nl = NeighborList(space, R_CUT, skin=0.2)
        return NVE(
            LennardJones(space, r_cut=R_CUT, neighbor_list=nl, learnable=True),
            dt=0.005,
            space=space,
        )

    res = _run_both(make, R, P, 1000, 200, _final_state_loss)
    (f_d, g_d), (f_r, g_r) = res["direct"], res["reversible"]
    torch.testing.assert_close(f_r.R, f_d.R, rtol=0, atol=0)  # the same forward run
    torch.testing.assert_close(f_r.P, f_d.P, rtol=0, atol=0)
    for name, a, b in zip(("sigma", "epsilon", "R0", "P0"), g_r, g_d):
        assert float(b.abs().max()) > 0
        assert _rel(a, b) <= 1e-8, name


def test_nose_hoover_chain_with_temperature_protocol() -> None:
    """NHC: the chain is reversed by its half step with -dt; gradients reach a learnable
    kT(t) schedule, LJ parameters and the initial state."""
    space, R, P = _fluid(seed=1)

    def make() -> NoseHooverChain:
        protocol = PiecewiseConstant(
            t_final=1.5, n_pieces=3, low=0.5, high=2.0, init=[1.0, 1.4, 0.8]
        )
        lj = LennardJones(space, r_cut=R_CUT, learnable=("epsilon",))
        return NoseHooverChain(lj, dt=0.005, kT=ControlSchedule(protocol), tau=0.1, space=space)

    def loss(integ, final) -> torch.Tensor:
        return _final_state_loss(integ, final) + final.aux["p_xi"].sum() + final.aux["xi"].sum()

    res = _run_both(make, R, P, 150, 50, loss)
    (_, g_d), (_, g_r) = res["direct"], res["reversible"]
    assert len(g_d) == 4  # protocol values, epsilon, R0, P0
    for a, b in zip(g_r, g_d):
        assert float(b.abs().max()) > 0
        assert _rel(a, b) <= 1e-8


@pytest.mark.parametrize("chain_length,chain_steps,sy_steps", [(1, 1, 1), (4, 2, 5)])
def test_nose_hoover_chain_variants(chain_length: int, chain_steps: int, sy_steps: int) -> None:
    """The analytic chain adjoint for other chain lengths and Suzuki-Yoshida splittings,
    per-replica kT: the same gradients (parameters, R0, P0, chain masses Q) as direct
    backprop."""
    space, R, P = _fluid(seed=5)

    def make() -> NoseHooverChain:
        lj = LennardJones(space, r_cut=R_CUT, learnable=("epsilon",))
        return NoseHooverChain(
            lj,
            dt=0.005,
            kT=1.2,
            tau=0.1,
            space=space,
            chain_length=chain_length,
            chain_steps=chain_steps,
            sy_steps=sy_steps,
        )

    out = []
    for mode in ("direct", "reversible"):
        integ = make()
        R0, P0 = R.clone().requires_grad_(True), P.clone().requires_grad_(True)
        state = integ.init(R0, P=P0)
        Q = state.aux["Q"].clone().requires_grad_(True)
        state = state.replace(aux={**state.aux, "Q": Q})
        if mode == "direct":
            final = simulate(integ, state, 100, gradient="direct").final
        else:
            final = simulate_reversible(integ, state, 100, window=40)
        loss = (
            _final_state_loss(integ, final) + (final.aux["p_xi"] ** 2).sum() + final.aux["xi"].sum()
        )
        out.append(torch.autograd.grad(loss, [integ.potential.epsilon, R0, P0, Q]))
    for a, b in zip(*reversed(out)):
        assert float(b.abs().max()) > 0
        assert _rel(a, b) <= 1e-8


def test_time_dependent_control_crossing_breakpoints() -> None:
    """A piecewise-constant trap centre (jumps inside the run): forces are evaluated at
    the same one-sided times as the forward steps, so the gradient is exact."""
    space, R, P = _fluid(B=1, seed=2)

    def make() -> NVE:
        return _piecewise_trap(space, t_final=1.0, stiffness=0.5)

    res = _run_both(make, R, P, 250, 60, _final_state_loss)
    for a, b in zip(res["reversible"][1], res["direct"][1]):
        assert float(b.abs().max()) > 0
        assert _rel(a, b) <= 1e-8


def _driven_scaled_lj_mid_step_jumps(space) -> NVE:
    """epsilon(t) E_LJ with jumps strictly inside steps (t_final = 0.6013 is not a multiple
    of dt): each step's half kicks see the control before and after the jump."""
    protocol = PiecewiseConstant(
        t_final=0.6013, n_pieces=5, low=0.5, high=2.0, init=[1.0, 1.3, 0.8, 1.5, 1.1]
    )
    return NVE(ScaledPotential(LennardJones(space, r_cut=R_CUT), protocol), dt=0.005, space=space)


def _driven_trap_mlp(space) -> NVE:
    """A trap centre given by an MLP of time (smooth, 4 parameter tensors)."""
    torch.manual_seed(3)
    centre = MLPProtocol(dim=3, t_final=0.75, hidden=(8,), low=0.5, high=2.5)
    with torch.no_grad():  # the output layer starts at zero: perturb every layer
        for p in centre.parameters():
            p.add_(0.3 * torch.randn_like(p))
    trap = HarmonicTrap(2.0, centre, particles=[0, 1, 2, 3], space=space)
    return NVE(LennardJones(space, r_cut=R_CUT) + trap, dt=0.005, space=space)


def _driven_trap_mid_step_jumps(space) -> NVE:
    """A piecewise-constant trap centre whose jumps fall inside steps (t_final = 0.6013)."""
    return _piecewise_trap(space, t_final=0.6013, stiffness=2.0)


def _driven_pulling_tabulated(space) -> NVE:
    """Tweezers: a force on two beads from a held (step) table, jumps on step times."""
    table = Tabulated(
        times=[0.0, 0.25, 0.5, 0.75],
        values=[[0.5, 0.0, 0.0], [1.0, -0.5, 0.2], [0.0, 0.8, -0.3], [-0.4, 0.1, 0.6]],
        interpolation="hold",
        t_final=0.75,
    )
    pull = ConstantForce(table, particles=[0, 5], weights=[1.0, -1.0])
    return NVE(LennardJones(space, r_cut=R_CUT) + pull, dt=0.005, space=space)


def _driven_nhc(space) -> NoseHooverChain:
    """NVT: epsilon(t) (jumps on steps), a Fourier-series trap centre and a kT(t) protocol."""
    eps = PiecewiseConstant(t_final=0.75, n_pieces=3, low=0.5, high=2.0, init=[1.0, 1.4, 0.9])
    centre = FourierSeries(dim=3, t_final=0.75, n_terms=2, low=0.5, high=2.5)
    kT = PiecewiseConstant(t_final=0.75, n_pieces=2, low=0.5, high=2.0, init=[1.0, 1.3])
    potential = ScaledPotential(LennardJones(space, r_cut=R_CUT), eps) + HarmonicTrap(
        1.0, centre, particles=[0, 1], space=space
    )
    return NoseHooverChain(potential, dt=0.005, kT=ControlSchedule(kT), tau=0.1, space=space)


@pytest.mark.parametrize(
    "make_driven",
    [
        _driven_scaled_lj_mid_step_jumps,
        _driven_trap_mid_step_jumps,
        _driven_trap_mlp,
        _driven_pulling_tabulated,
        _driven_nhc,
    ],
)
def test_protocol_driven_hamiltonian_matches_direct_backprop(make_driven) -> None:
    """H = H0 + H_ctrl(q, t; theta): the gradient with respect to every protocol parameter
    (and the initial state) through 150 steps equals direct backprop to 1e-8 relative in
    float64, with protocol jumps on step times, inside steps, or none (MLP, Fourier)."""
    space, R, P = _fluid(B=2, seed=6)

    def loss(integ, final) -> torch.Tensor:
        extra = final.aux["p_xi"].sum() if "p_xi" in final.aux else 0.0
        return _final_state_loss(integ, final) + extra

    res = _run_both(lambda: make_driven(space), R, P, 150, 40, loss)
    (_, g_d), (_, g_r) = res["direct"], res["reversible"]
    n_protocol = len(g_d) - 2  # every parameter tensor, then R0 and P0
    assert n_protocol >= 1
    for a, b in zip(g_r, g_d):
        assert float(b.abs().max()) > 0
        assert _rel(a, b) <= 1e-8


def test_lj_plus_control_terms_take_the_fused_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVE with a fused LJ term plus protocol-driven terms is walked back with the LJ force
    and VJP from one kernel call (the control terms alone by autograd), not by the generic
    autograd walk; ScaledPotential(LJ) (LJ inside another term) still takes the generic one."""
    space, R, P = _fluid(B=1, seed=7)

    def generic(*args, **kwargs):
        raise AssertionError("generic walk used")

    monkeypatch.setattr(reversible, "_walk_back", generic)
    for make in (_driven_trap_mid_step_jumps, _driven_pulling_tabulated):
        integ = make(space)
        final = simulate_reversible(integ, integ.init(R.clone(), P=P.clone()), 30, window=10)
        final.R.sum().backward()
    integ = _driven_scaled_lj_mid_step_jumps(space)
    final = simulate_reversible(integ, integ.init(R.clone(), P=P.clone()), 30, window=10)
    with pytest.raises(AssertionError, match="generic walk used"):
        final.R.sum().backward()


def test_checkpoints_bound_round_off() -> None:
    """Without intermediate checkpoints the backward reconstruction drifts (chaos
    amplifies round-off); with them the gradient stays at the direct-backprop value."""
    space, R, P = _fluid(B=1, seed=3)

    def make() -> NVE:
        return NVE(LennardJones(space, r_cut=R_CUT, learnable=("epsilon",)), dt=0.005, space=space)

    def loss(integ, final) -> torch.Tensor:
        return integ.potential.energy(final.R).sum()

    n = 1200
    res = _run_both(make, R, P, n, 100, loss)
    g_direct = res["direct"][1][0]
    err_short = _rel(res["reversible"][1][0], g_direct)
    integ = make()
    final = simulate_reversible(integ, integ.init(R, P=P), n, window=n)
    (g_long,) = torch.autograd.grad(loss(integ, final), integ.potential.epsilon)
    err_long = _rel(g_long, g_direct)
    assert err_short <= 1e-8
    assert err_long > 10 * err_short


def test_edge_cases_and_errors() -> None:
    space, R, P = _fluid(B=1)
    nve = NVE(LennardJones(space, r_cut=R_CUT, learnable=True), dt=0.005, space=space)
    s = nve.init(R, P=P)
    final = simulate_reversible(nve, s, 0)
    torch.testing.assert_close(final.R, s.R)
    final = simulate_reversible(nve, s, 7, window=100)  # window longer than the run
    assert final.step == 7
    with pytest.raises(ControlMDError, match="window"):
        simulate_reversible(nve, s, 10, window=0)
    lang = Langevin(LennardJones(space, r_cut=R_CUT), dt=0.005, kT=1.0, space=space)
    ls = lang.init(R, P=P, rng=ReplicaRNG(0, 1))
    with pytest.raises(ControlMDError, match="checkpoint"):
        simulate_reversible(lang, ls, 10)


def test_simulate_gradient_reversible() -> None:
    """``simulate(..., gradient="reversible")`` is the same path, with simulate's checks."""
    space, R, P = _fluid(B=1, seed=4)

    def make() -> NVE:
        return NVE(LennardJones(space, r_cut=R_CUT, learnable=("epsilon",)), dt=0.005, space=space)

    grads = []
    for gradient in ("reversible", "direct"):
        nve = make()
        traj = simulate(nve, nve.init(R, P=P), 200, gradient=gradient, window=50)
        assert traj.grad_steps == 200
        (g,) = torch.autograd.grad(nve.potential.energy(traj.final.R).sum(), nve.potential.epsilon)
        grads.append(g)
    assert _rel(grads[0], grads[1]) <= 1e-8
    nve = make()
    with pytest.raises(ControlMDError, match="record_every"):
        simulate(nve, nve.init(R, P=P), 10, gradient="reversible", record_every=5)
