"""simulate(): recording, reporters, budgets, gradient modes, continuation and bad input."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from controlmd.dynamics import NVE, Brownian
from controlmd.errors import ControlMDError
from controlmd.potentials import HarmonicTrap, Potential
from controlmd.reporters import CallbackReporter, MemoryReporter, StateDataReporter, XYZReporter
from controlmd.rng import ReplicaRNG
from controlmd.simulate import simulate

F64 = torch.float64


class _Well(Potential):
    """``E = k/2 sum |x - c|^2`` with learnable k and c (for gradient-mode checks)."""

    def __init__(self, k: float = 2.0, c: float = 0.3) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k, dtype=F64))
        self.c = nn.Parameter(torch.tensor(c, dtype=F64))

    def energy(self, R: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        return 0.5 * self.k * ((R - self.c) ** 2).sum(dim=(-2, -1))


def _brownian(B: int = 3, seed: int = 0) -> tuple[Brownian, object]:
    bd = Brownian(_Well(), dt=0.02, kT=0.8, gamma=1.3)
    R0 = torch.linspace(-1.0, 1.0, B * 4 * 2, dtype=F64).reshape(B, 4, 2)
    return bd, bd.init(R0, rng=ReplicaRNG(seed, B))


def _grads(bd: Brownian, state: object, **kw: object) -> torch.Tensor:
    traj = simulate(bd, state, 40, **kw)  # type: ignore[arg-type]
    loss = (
        (traj.final.R**2).sum() + traj.records["R"].sum()
        if "record_every" in kw
        else (traj.final.R**2).sum()
    )
    return torch.stack(torch.autograd.grad(loss, list(bd.parameters())))


def test_records_times_and_budget() -> None:
    bd, s0 = _brownian(B=3)
    traj = simulate(
        bd,
        s0,
        10,
        gradient="none",
        record_every=4,
        observables={"x2": lambda s: (s.R**2).sum(dim=(-2, -1))},
    )
    assert traj.records["x2"].shape == (3, 3)  # frames at steps 0, 4, 8
    torch.testing.assert_close(traj.times, torch.tensor([0.0, 0.08, 0.16], dtype=F64))
    assert traj.md_steps == 30 and traj.grad_steps == 0
    assert traj.final.step == 10
    assert float(traj.final.t) == pytest.approx(0.2)


def test_continuation_equals_one_run() -> None:
    """Two calls of 15 + 25 steps give the same trajectory as one call of 40 (the noise
    streams live in the state)."""
    bd, s0 = _brownian(seed=4)
    one = simulate(bd, s0, 40, gradient="none").final
    _, s1 = _brownian(seed=4)
    two = simulate(bd, simulate(bd, s1, 15, gradient="none").final, 25, gradient="none").final
    assert torch.equal(one.R, two.R)


def test_reporters_receive_states_at_their_steps() -> None:
    bd, s0 = _brownian()
    seen: list[int] = []
    mem = MemoryReporter(7, quantities=("potential_energy",))
    simulate(
        bd,
        s0,
        30,
        gradient="none",
        reporters=[CallbackReporter(10, lambda s, _: seen.append(s.step)), mem],
    )
    assert seen == [10, 20, 30]
    assert mem.steps == [7, 14, 21, 28]
    assert mem.stacked("potential_energy").shape == (4, 3)


def test_state_data_and_xyz_reporters(tmp_path: object) -> None:
    bd, s0 = _brownian()
    buf = io.StringIO()
    path = tmp_path / "traj.xyz"  # type: ignore[operator]
    xyz = XYZReporter(path, 5, replica=1, species="Ar")
    simulate(
        bd,
        s0,
        10,
        gradient="none",
        reporters=[StateDataReporter(buf, 5, ["potential_energy"]), xyz],
    )
    xyz.close()
    lines = buf.getvalue().splitlines()
    assert lines[0] == "step,time (tau),potential_energy (epsilon)"
    assert [line.split(",")[0] for line in lines[1:]] == ["5", "10"]
    frames = path.read_text().splitlines()
    assert len(frames) == 2 * (2 + 4)
    assert frames[0] == "4" and "Properties=species:S:1:pos:R:3" in frames[1]
    assert frames[2].split()[0] == "Ar" and float(frames[2].split()[3]) == 0.0  # 2-D: z = 0


def test_gradient_modes_agree() -> None:
    """Checkpointed backprop (also through a stochastic integrator, whose noise is replayed
    in the recomputation) and truncated backprop with W >= n_steps equal direct backprop."""
    g_direct = _grads(*_brownian(seed=8), gradient="direct", record_every=8)
    g_ckpt = _grads(*_brownian(seed=8), gradient="checkpoint", window=7, record_every=8)
    g_trunc = _grads(*_brownian(seed=8), gradient="truncated", window=40, record_every=8)
    torch.testing.assert_close(g_ckpt, g_direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_trunc, g_direct, rtol=1e-12, atol=1e-12)
    g_short = _grads(*_brownian(seed=8), gradient="truncated", window=5)
    assert not torch.allclose(g_short, _grads(*_brownian(seed=8), gradient="direct"))


def test_checkpoint_keeps_rng_streams() -> None:
    """After a checkpointed run the generators are where a plain run leaves them."""
    bd, s0 = _brownian(seed=2)
    a = simulate(bd, s0, 23, gradient="checkpoint", window=5).final
    bd2, s1 = _brownian(seed=2)
    b = simulate(bd2, s1, 23, gradient="direct").final
    torch.testing.assert_close(a.R, b.R, rtol=0, atol=0)
    for ga, gb in zip(a.rng.get_state(), b.rng.get_state()):  # type: ignore[union-attr]
        assert torch.equal(ga, gb)


def test_no_graph_when_nothing_requires_grad() -> None:
    bd = Brownian(HarmonicTrap(1.0), dt=0.01, kT=1.0)
    s0 = bd.init(torch.zeros(2, 3, 3, dtype=F64), rng=ReplicaRNG(0, 2))
    traj = simulate(bd, s0, 5)
    assert not traj.final.R.requires_grad and traj.grad_steps == 0
    bd2, s1 = _brownian()
    traj = simulate(bd2, s1, 5)
    assert traj.final.R.requires_grad and traj.grad_steps == 15
    assert not simulate(bd2, s1, 5, gradient="none").final.R.requires_grad
    # a force cached by init() under grad mode does not make simulate build a graph
    nve = NVE(HarmonicTrap(1.0), dt=0.01)
    s2 = nve.init(torch.ones(2, 3, 3, dtype=F64), kT=1.0, rng=ReplicaRNG(0, 2))
    assert not simulate(nve, s2, 5).final.R.requires_grad


def test_simulate_bad_input() -> None:
    bd, s0 = _brownian()
    with pytest.raises(
        ControlMDError, match=r"unknown gradient 'adjoint'; expected one of: checkpoint"
    ):
        simulate(bd, s0, 5, gradient="adjoint")
    with pytest.raises(ControlMDError, match=r"gradient='checkpoint' needs window=W"):
        simulate(bd, s0, 5, gradient="checkpoint")
    with pytest.raises(ControlMDError, match=r"n_steps must be >= 0, got -1"):
        simulate(bd, s0, -1)
    with pytest.raises(ControlMDError, match=r"window must be >= 1, got 0"):
        simulate(bd, s0, 5, gradient="truncated", window=0)
    with pytest.raises(ControlMDError, match=r"state.R must be finite"):
        simulate(bd, s0.replace(R=s0.R * float("nan")), 5)
    with pytest.raises(ControlMDError, match=r"stochastic and state.rng is None"):
        simulate(bd, s0.replace(rng=None), 5)
    with pytest.raises(ControlMDError, match=r"reporters must provide describe_next_report"):
        simulate(bd, s0, 5, reporters=[object()])  # type: ignore[list-item]


def test_protocol_jump_acts_on_its_own_steps() -> None:
    """A piecewise-constant control that jumps on a step boundary acts exactly on the steps
    of its interval: simulate with the K-piece protocol equals K runs with the control
    held fixed (what the gymnasium env does), for inertial and overdamped dynamics."""
    from controlmd.dynamics import Langevin
    from controlmd.protocols import PiecewiseConstant

    values = [[0.5, 0.0], [-0.3, 0.4], [0.2, -0.6]]
    dt, per_piece = 0.01, 7
    proto = PiecewiseConstant(dim=2, t_final=3 * per_piece * dt, n_pieces=3, init=values)
    R0 = torch.linspace(-1.0, 1.0, 2 * 3 * 2, dtype=F64).reshape(2, 3, 2)
    for make in (
        lambda pot: NVE(pot, dt=dt),
        lambda pot: Langevin(pot, dt=dt, kT=0.5, gamma=1.0),
        lambda pot: Brownian(pot, dt=dt, kT=0.5),
    ):
        integ = make(HarmonicTrap(2.0, proto))
        s = integ.init(
            R0,
            P=None if isinstance(integ, Brownian) else torch.zeros_like(R0),
            rng=ReplicaRNG(6, 2),
        )
        a = simulate(integ, s, 3 * per_piece, gradient="none").final
        s = integ.init(
            R0,
            P=None if isinstance(integ, Brownian) else torch.zeros_like(R0),
            rng=ReplicaRNG(6, 2),
        )
        for v in values:
            held = make(HarmonicTrap(2.0, torch.tensor(v, dtype=F64)))
            s = simulate(held, s, per_piece, gradient="none").final
        torch.testing.assert_close(a.R, s.R, rtol=1e-12, atol=1e-12)
        assert float(a.t) == pytest.approx(float(s.t)) == pytest.approx(3 * per_piece * dt)
