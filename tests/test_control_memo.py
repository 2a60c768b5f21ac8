"""The memo of control reads without a graph (controlmd/potentials/control_memo.py) and the
Brownian exact-OU shortcuts built on it: same bits as reading every time."""

from __future__ import annotations

import torch

from controlmd.potentials import HarmonicTrap
from controlmd.protocols import HeldControl, PiecewiseConstant, Protocol, Tabulated
from controlmd.rng import ReplicaRNG
from controlmd.simulate import simulate
from controlmd.tasks.trap_drag import TrapDrag


def _center(trap: HarmonicTrap, t: float) -> torch.Tensor:
    return trap.center_at(torch.tensor(t, dtype=torch.float64), torch.zeros(3, 1, 1))


def test_memo_returns_the_earlier_read_until_the_protocol_changes() -> None:
    table = Tabulated(times=[0.0, 1.0], values=[0.0, 5.0])
    trap = HarmonicTrap(1.0, table)
    with torch.no_grad():
        first = _center(trap, 0.25)
        assert _center(trap, 0.25)._base is first._base  # the memoized tensor, reshaped
        assert float(_center(trap, 0.25)) == 1.25
        table.values.add_(1.0)  # an in-place change (an optimizer step) is seen
        assert float(_center(trap, 0.25)) == 2.25
        table.t_final = 2.0  # so is a plain attribute
        assert _center(trap, 0.25)._base is not first._base
    with torch.enable_grad():  # with a graph every read is a new one
        a, b = _center(trap, 0.25), _center(trap, 0.25)
        assert a.grad_fn is not None and a.grad_fn is not b.grad_fn


def test_memo_skips_impure_modules_and_hooks() -> None:
    class Drifting(Protocol):  # keeps state outside its tensors: not pure_in_time
        def __init__(self) -> None:
            super().__init__(dim=1, t_final=1.0)
            self.calls = 0

        def raw(self, t: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return (t * self.calls).unsqueeze(-1)

    drifting = Drifting()
    trap = HarmonicTrap(1.0, drifting)
    with torch.no_grad():
        assert float(_center(trap, 0.5)) == 0.5
        assert float(_center(trap, 0.5)) == 1.0
    table = Tabulated(times=[0.0, 1.0], values=[0.0, 5.0])
    trap = HarmonicTrap(1.0, table)
    table.register_forward_hook(lambda module, args, out: out + 1.0)
    with torch.no_grad():
        assert float(_center(trap, 0.5)) == 3.5
        assert _center(trap, 0.5)._base is not _center(trap, 0.5)._base


def test_held_control_set_is_seen() -> None:
    held = HeldControl(dim=1, t_final=1.0)
    trap = HarmonicTrap(1.0, held)
    with torch.no_grad():
        assert float(_center(trap, 0.5)) == 0.0
        held.set(torch.tensor([2.0]))
        assert float(_center(trap, 0.5)) == 2.0


def test_trap_drag_without_graph_equals_the_graph_path_bit_for_bit() -> None:
    """The no-graph exact-OU step (controls read once, memoized reads, the previous step's
    end energy reused, Tabulated in Python floats) gives the graph path's bits."""
    for proto in (
        Tabulated(times=[0.0, 0.3, 1.0], values=[0.0, 2.0, 5.0]),
        PiecewiseConstant(t_final=1.0, n_pieces=4, low=-2.0, high=8.0, init=[1.0, 2.0, 3.0, 4.0]),
    ):
        task = TrapDrag(n_steps=30)
        integ = task.integrator(proto)
        runs = []
        for gradient in ("none", "direct"):
            s0 = task.initial_state(16, 1).replace(rng=ReplicaRNG(1, 16, kind="philox"))
            final = simulate(integ, s0, 30, gradient=gradient).final
            runs.append([final.R.detach(), final.aux["work"].detach(), final.aux["heat"].detach()])
        for a, b in zip(*runs):
            assert torch.equal(a.view(torch.int64), b.view(torch.int64))


def test_brownian_remembered_energy_follows_in_place_changes() -> None:
    """A state whose positions are edited in place between steps is not given the energy
    remembered for the old positions."""
    task = TrapDrag(n_steps=10)
    proto = Tabulated(times=[0.0, 1.0], values=[0.0, 5.0])
    integ, fresh = task.integrator(proto), task.integrator(proto)
    s = task.initial_state(4, 2).replace(rng=ReplicaRNG(2, 4, kind="philox"))
    r = task.initial_state(4, 2).replace(rng=ReplicaRNG(2, 4, kind="philox"))
    with torch.no_grad():
        s, r = integ.step(integ.step(s)), fresh.step(fresh.step(r))
        s.R.add_(0.5)
        r = r.replace(R=r.R + 0.5)
        fresh.__dict__.pop("_trap_energy_memo", None)
        s, r = integ.step(s), fresh.step(r)
    assert torch.equal(s.aux["work"], r.aux["work"])
