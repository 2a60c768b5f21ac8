"""FusedSteps: K Brownian / Langevin steps as one function equal the engine's steps.

Same noise (philox slots), same control times: positions, momenta, cached forces and
protocol gradients equal ``simulate`` to round-off in float64, for the eager fused
function here and the compiled one in the slow test.
"""

from __future__ import annotations

import pytest
import torch

from controlmd.dynamics import Brownian, FusedSteps, Langevin
from controlmd.errors import ControlMDError, SimulationDivergedError
from controlmd.potentials.analytic import DenseMorse, ScaledDense
from controlmd.potentials.base import Potential
from controlmd.protocols import PiecewiseConstant
from controlmd.rng import ReplicaRNG, use_rng
from controlmd.simulate import simulate
from controlmd.tasks.assembly import Assembly
from controlmd.tasks.polymer_fold import PolymerFold


def _assembly(steps: int, B: int = 6) -> tuple[Brownian, PiecewiseConstant, object]:
    """The assembly task's Brownian disks under eps(t) (4 pieces, jumps inside the run),
    dense analytic Morse forces; philox initial state."""
    task = Assembly(n_steps=steps)
    proto = PiecewiseConstant(
        t_final=task.horizon, n_pieces=4, low=2.0, high=10.0, init=[5.0, 7.0, 4.0, 6.0]
    ).double()
    pot = ScaledDense(DenseMorse(task.space, alpha=task.alpha, r_cut=task.r_cut), proto)
    bd = Brownian(pot, dt=task.dt, kT=task.kT, gamma=task.gamma, space=task.space)
    with use_rng("philox"):
        state = task.initial_state(B, 3)
    return bd, proto, state


def _polymer(steps: int, B: int = 4) -> tuple[Langevin, PiecewiseConstant, object]:
    """The Go helix under Langevin BAOAB with a 4-piece kT(t) (the task's temperature
    channel) and the epsilon channel scaling the attraction."""
    task = PolymerFold(n_steps=steps, controls=["epsilon", "temperature"])
    proto = PiecewiseConstant(
        dim=2,
        t_final=task.horizon,
        n_pieces=4,
        low=[0.2, 0.1],
        high=[2.0, 1.2],
        init=[[1.0, 0.5], [1.4, 0.4], [0.8, 0.6], [1.1, 0.5]],
    ).double()
    with use_rng("philox"):
        state = task.initial_state(B, 5)
    return task.integrator(proto), proto, state  # type: ignore[return-value]


def test_fused_brownian_equals_the_engine_with_the_same_noise() -> None:
    bd, _, s0 = _assembly(40)
    ref = simulate(bd, s0, 40, gradient="none").final
    _, _, s1 = _assembly(40)
    out = FusedSteps(bd, chunk=7, compile=False).run(s1, 40)  # 5 chunks of 7 and one of 5
    assert out.step == ref.step == 40
    assert float(out.t) == float(ref.t)
    assert out.rng.position == ref.rng.position
    assert (out.R - ref.R).abs().max() < 1e-12
    assert (out.R - s0.R).abs().max() > 0.05  # the disks moved


def test_fused_langevin_equals_the_engine_with_scaled_forces_and_a_kT_schedule() -> None:
    lv, _, s0 = _polymer(30)
    ref = simulate(lv, s0, 30, gradient="none").final
    _, _, s1 = _polymer(30)
    out = FusedSteps(lv, chunk=8, compile=False).run(s1, 30)
    for name, a, b in (("R", out.R, ref.R), ("P", out.P, ref.P)):
        assert (a - b).abs().max() < 1e-10, name
    assert (out.aux["force"] - ref.aux["force"]).abs().max() < 1e-9
    assert out.rng.position == ref.rng.position


@pytest.mark.parametrize("system", ["assembly", "polymer"])
def test_fused_protocol_gradient_equals_the_engine(system: str) -> None:
    build = _assembly if system == "assembly" else _polymer
    steps = 24
    integ, proto, s0 = build(steps)
    loss = simulate(integ, s0, steps, gradient="direct").final.R.square().mean()
    (g_ref,) = torch.autograd.grad(loss, list(proto.parameters()))
    integ, proto, s1 = build(steps)
    out = FusedSteps(integ, chunk=5, compile=False).run(s1, steps)
    (g,) = torch.autograd.grad(out.R.square().mean(), list(proto.parameters()))
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)


def test_fused_refuses_what_it_cannot_run() -> None:
    bd, _, s0 = _assembly(10)
    with pytest.raises(ControlMDError, match="philox"):
        s_mt = bd.init(s0.R, rng=ReplicaRNG(0, s0.n_replicas, kind="mt19937"))
        FusedSteps(bd, compile=False).run(s_mt, 5)
    with pytest.raises(ControlMDError, match="track_work"):
        FusedSteps(Brownian(bd.potential, dt=0.01, kT=1.0, track_work=True), compile=False)
    with pytest.raises(ControlMDError, match="chunk"):
        FusedSteps(bd, chunk=0)

    per_replica = ScaledDense(bd.potential.base, lambda t: torch.full((6, 1), 6.0))
    with pytest.raises(ControlMDError, match="per replica"):
        FusedSteps(Brownian(per_replica, dt=0.01, kT=1.0), compile=False).run(s0, 5)

    class Ramp(Potential):  # a time-dependent term that is not s(t) E_0(R)
        def energy(self, R: torch.Tensor, t: object = None) -> torch.Tensor:
            return float(t) * R.square().sum(dim=(-2, -1))  # type: ignore[arg-type]

    ramp = Brownian(Ramp(), dt=0.01, kT=1.0)
    state = ramp.init(s0.R, rng=ReplicaRNG(0, s0.n_replicas, kind="philox"))
    with pytest.raises(ControlMDError, match="independent of time"):
        FusedSteps(ramp, compile=False).run(state, 10)


def test_a_diverging_fused_run_names_the_steps() -> None:
    class Blowup(Potential):  # F = +100 R: runaway
        def energy(self, R: torch.Tensor, t: object = None) -> torch.Tensor:
            return -50.0 * R.square().sum(dim=(-2, -1))

    bd = Brownian(Blowup(), dt=1.0, kT=0.0)
    state = bd.init(torch.ones(2, 1, 1, dtype=torch.float64), rng=ReplicaRNG(0, 2, kind="philox"))
    with pytest.raises(SimulationDivergedError, match=r"steps 81\.\.160") as info:
        FusedSteps(bd, chunk=80, compile=False).run(state, 400)
    assert info.value.step == 160


@pytest.mark.slow
def test_compiled_fused_steps_equal_the_engine() -> None:
    """The torch.compile-d chunk (analytic Morse forces; autograd forces by torch.func.grad
    for the chain): the engine's positions to round-off, forward and protocol gradient."""
    bd, proto, s0 = _assembly(20, B=4)
    ref = simulate(bd, s0, 20, gradient="direct").final
    (g_ref,) = torch.autograd.grad(ref.R.square().mean(), list(proto.parameters()))
    bd, proto, s1 = _assembly(20, B=4)
    out = FusedSteps(bd, chunk=10).run(s1, 20)
    (g,) = torch.autograd.grad(out.R.square().mean(), list(proto.parameters()))
    assert (out.R - ref.R).abs().max() < 1e-10
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-12)
    lv, _, s0 = _polymer(8, B=2)
    with torch.no_grad():
        ref = simulate(lv, s0, 8, gradient="none").final
        _, _, s1 = _polymer(8, B=2)
        out = FusedSteps(lv, chunk=4).run(s1, 8)
    assert (out.R - ref.R).abs().max() < 1e-10
