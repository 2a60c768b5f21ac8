"""FusedSteps: K Brownian / Langevin steps as one function equal the engine's steps.

Same noise (philox slots), same control times: positions, momenta, cached forces and
protocol gradients equal ``simulate`` to round-off in float64, for the eager fused
function here and the compiled one in the slow test.
"""

from __future__ import annotations

import pytest
import torch

from controlmd.config import resolve_config
from controlmd.dynamics import Brownian, FusedSteps, Langevin, fused, use_fused_steps
from controlmd.errors import ConfigError, ControlMDError, SimulationDivergedError
from controlmd.potentials.analytic import DenseMorse, ScaledDense
from controlmd.potentials.base import Potential
from controlmd.protocols import PiecewiseConstant
from controlmd.rng import ReplicaRNG, use_rng
from controlmd.simulate import simulate
from controlmd.tasks import get_task
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


@pytest.mark.parametrize("noise_block_steps", [None, 14])
def test_fused_brownian_equals_the_engine_with_the_same_noise(
    noise_block_steps: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if noise_block_steps:  # noise drawn in blocks of two chunks: 14 + 14 + 12 steps
        monkeypatch.setattr(fused, "_NOISE_BLOCK", noise_block_steps * 6 * 7 * 2)
    bd, _, s0 = _assembly(40)
    ref = simulate(bd, s0, 40, gradient="none").final
    _, _, s1 = _assembly(40)
    out = FusedSteps(bd, chunk=7, compile=False).run(s1, 40)  # 5 chunks of 7 and one of 5
    assert out.step == ref.step == 40
    assert float(out.t) == float(ref.t)
    assert out.rng.position == ref.rng.position
    assert (out.R - ref.R).abs().max() < 1e-12
    assert (out.R - s0.R).abs().max() > 0.05  # the disks moved


@pytest.mark.parametrize("noise_block_steps", [None, 16])
def test_fused_langevin_equals_the_engine_with_scaled_forces_and_a_kT_schedule(
    noise_block_steps: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if noise_block_steps:  # noise drawn in blocks of two chunks: 16 + 14 steps
        monkeypatch.setattr(fused, "_NOISE_BLOCK", noise_block_steps * 4 * 22 * 3)
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


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("assembly", {}),
        ("assembly", {"pair_forces": "analytic"}),
        ("polymer_fold", {"controls": ["temperature"]}),
    ],
)
def test_tasks_advance_by_fused_steps_within_use_fused_steps(
    name: str, kwargs: dict[str, object]
) -> None:
    """A task's own rollout (assembly: eps(t) Morse pairs, autograd or closed-form forces;
    the chain: OneGraph Go model under kT(t)) through ``use_fused_steps`` equals its
    ``simulate`` rollout, forward and in the protocol gradient of the task loss."""
    task = get_task(name, n_steps=18, **kwargs)
    proto = PiecewiseConstant(
        dim=task.controls.dim,
        t_final=task.horizon,
        n_pieces=3,
        low=task.controls.low_tensor(),
        high=task.controls.high_tensor(),
        init=task.default_control().expand(3, -1) * torch.tensor([[0.9], [1.1], [1.0]]),
    ).double()

    def rollout() -> tuple[torch.Tensor, torch.Tensor]:
        with use_rng("philox"):
            final = task.rollout(proto, 3, seed=11, gradient="direct")
        (g,) = torch.autograd.grad(task.loss(final), list(proto.parameters()))
        return final.R, g

    R_ref, g_ref = rollout()
    with use_fused_steps(5, compile=False):
        R, g = rollout()
    assert (R - R_ref).abs().max() < 1e-10
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-12)


def test_fused_steps_refuse_what_they_cannot_honour() -> None:
    task = get_task("assembly", n_steps=6)
    with use_rng("philox"), use_fused_steps(3, compile=False):
        with pytest.raises(ControlMDError, match=r"fused_steps = 3 .*'checkpoint'"):
            task.rollout(None, 2, seed=0, gradient="checkpoint", window=2)
    with use_rng("mt19937"), use_fused_steps(3, compile=False):
        with pytest.raises(ControlMDError, match="philox"):
            task.rollout(None, 2, seed=0, gradient="none")
    field_task = get_task("assembly", n_steps=6, controls=["epsilon", "confinement"])
    proto = PiecewiseConstant(
        dim=2, t_final=field_task.horizon, n_pieces=2, low=[2.0, 0.0], high=[10.0, 100.0]
    )
    with use_rng("philox"), use_fused_steps(3, compile=False):
        with pytest.raises(ControlMDError, match="spatial control field"):
            field_task.rollout(proto, 2, seed=0, gradient="none")
    with pytest.raises(ControlMDError, match="fused_steps must be >= 0, got -1"):
        with use_fused_steps(-1):
            pass
    raw = {
        "experiment": {"name": "x", "fused_steps": 10},
        "task": {"name": "assembly", "n_steps": 6},
        "protocol": {"kind": "piecewise_constant", "n_pieces": 2},
        "train": {},
    }
    with pytest.raises(ConfigError, match=r"fused_steps = 10 .*rng = 'philox'.*'mt19937'"):
        resolve_config(raw)
    raw["experiment"]["rng"] = "philox"
    assert resolve_config(raw)["experiment"]["fused_steps"] == 10


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


@pytest.mark.slow
def test_compiled_fused_steps_in_an_assembly_evaluation() -> None:
    """``[experiment] fused_steps`` as an evaluation uses it: the assembly task with
    closed-form pair forces, rolled out by compiled chunks, equals its engine rollout
    (positions to round-off, the same yields), and a second rollout (new integrator,
    protocol and runner) reuses the compiled chunk."""
    task = get_task("assembly", n_steps=60, pair_forces="analytic")
    u = PiecewiseConstant(t_final=task.horizon, n_pieces=3, low=2.0, high=10.0, init=6.0)

    def rollout(seed: int) -> torch.Tensor:
        with use_rng("philox"), torch.no_grad():
            return task.rollout(u.double(), 8, seed=seed, gradient="none").R

    refs = [rollout(seed) for seed in (1, 2)]
    graphs = torch._dynamo.utils.counters["stats"]
    with use_fused_steps(20):
        outs = [rollout(1)]
        compiled = graphs["unique_graphs"]
        outs.append(rollout(2))
    assert compiled >= 1 and graphs["unique_graphs"] == compiled  # no recompilation
    for R, R_ref in zip(outs, refs, strict=True):
        assert (R - R_ref).abs().max() < 1e-10
        assert torch.equal(task.yield_(R), task.yield_(R_ref))
