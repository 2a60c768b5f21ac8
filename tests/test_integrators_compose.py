"""Composing integrators safely, and the one convention for when a step reads the control.

A wrapper built on ``IntegratorWrapper`` must reproduce the integrator it wraps exactly,
also across protocol jumps (where ``simulate`` refreshes the cached force); a wrapper that
does not forward ``prepare`` must be refused at the first jump rather than apply the old
control for half a step (issue 21, item 1). Every integrator reads the control only
inside the interval of the step it takes (item 4).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from controlmd.dynamics import (
    NVE,
    Brownian,
    Integrator,
    IntegratorWrapper,
    Langevin,
    NoseHooverChain,
    State,
)
from controlmd.errors import ControlMDError
from controlmd.potentials import HarmonicTrap
from controlmd.protocols import PiecewiseConstant
from controlmd.rng import ReplicaRNG
from controlmd.simulate import simulate

F64 = torch.float64
DT = 0.01
PER_PIECE = 5
Make = Callable[[HarmonicTrap], Integrator]

INTEGRATORS: dict[str, Make] = {
    "nve": lambda pot: NVE(pot, dt=DT),
    "nhc": lambda pot: NoseHooverChain(pot, dt=DT, kT=0.5, tau=0.1),
    "langevin": lambda pot: Langevin(pot, dt=DT, kT=0.5, gamma=1.0),
    "brownian_em": lambda pot: Brownian(pot, dt=DT, kT=0.5),
    "brownian_ou": lambda pot: Brownian(pot, dt=DT, kT=0.5, method="exact_ou"),
}


def _protocol() -> PiecewiseConstant:
    """A trap centre ``[2]`` with two jumps, on step boundaries."""
    values = [[0.5, 0.0], [-0.3, 0.4], [0.2, -0.6]]
    return PiecewiseConstant(dim=2, t_final=3 * PER_PIECE * DT, n_pieces=3, init=values)


def _start(integ: Integrator, seed: int = 4) -> State:
    R0 = torch.linspace(-1.0, 1.0, 2 * 3 * 2, dtype=F64).reshape(2, 3, 2)
    inner = getattr(integ, "inner", integ)
    momenta = not isinstance(inner, Brownian)
    return integ.init(R0, P=torch.zeros_like(R0) if momenta else None, rng=ReplicaRNG(seed, 2))


class StepCounter(IntegratorWrapper):
    """What a user adds to an integrator: here a per-replica step counter in ``aux``."""

    def step(self, state: State) -> State:
        new = self.inner.step(state)
        new.aux["n_steps"] = state.aux.get("n_steps", state.R.new_zeros(state.n_replicas)) + 1
        return new


class NaiveCounter(Integrator):
    """The trap of issue 21: a wrapper that forwards ``step`` but not ``prepare``."""

    def __init__(self, inner: Integrator) -> None:
        super().__init__(inner.potential, dt=inner.dt, space=inner.space)
        self.inner = inner
        self.stochastic = inner.stochastic  # type: ignore[misc]

    def init(self, R, *, kT=None, rng=None, P=None):  # type: ignore[no-untyped-def]
        return self.inner.init(R, kT=kT, rng=rng, P=P)

    def step(self, state: State) -> State:
        return self.inner.step(state)


@pytest.mark.parametrize("name", list(INTEGRATORS))
def test_a_wrapper_reproduces_the_integrator_across_control_jumps(name: str) -> None:
    make = INTEGRATORS[name]
    plain = make(HarmonicTrap(2.0, _protocol()))
    wrapped = StepCounter(make(HarmonicTrap(2.0, _protocol())))
    n = 3 * PER_PIECE
    a = simulate(plain, _start(plain), n, gradient="none").final
    b = simulate(wrapped, _start(wrapped), n, gradient="none").final
    torch.testing.assert_close(b.R, a.R, rtol=0, atol=0)
    if a.P is not None:
        torch.testing.assert_close(b.P, a.P, rtol=0, atol=0)
    assert b.aux["n_steps"].tolist() == [n, n]
    # the wrapper forwards what the inner integrator offers
    assert wrapped.stochastic == plain.stochastic and wrapped.cached_aux == plain.cached_aux
    if hasattr(plain, "kinetic_energy"):
        torch.testing.assert_close(wrapped.energy(b), plain.energy(a), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["nve", "nhc", "langevin"])
def test_a_wrapper_that_skips_the_refresh_is_caught(name: str) -> None:
    naive = NaiveCounter(INTEGRATORS[name](HarmonicTrap(2.0, _protocol())))
    state = _start(naive)
    # without a jump there is nothing to refresh but the start: that is caught too,
    # since the state may come from a run under another control
    with pytest.raises(ControlMDError, match=r"returned the cached \['force'\] unchanged"):
        simulate(naive, state, 3 * PER_PIECE, gradient="none")


def test_the_skipped_refresh_would_have_changed_the_trajectory() -> None:
    """What the check prevents: stepping the naive wrapper by hand across the jumps (no
    refresh) differs from the correct run, by the old control applied for half a step."""
    make = INTEGRATORS["nve"]
    plain = make(HarmonicTrap(2.0, _protocol()))
    correct = simulate(plain, _start(plain), 3 * PER_PIECE, gradient="none").final
    naive = NaiveCounter(make(HarmonicTrap(2.0, _protocol())))
    s = _start(naive)
    with torch.no_grad():
        for _ in range(3 * PER_PIECE):
            s = naive.step(s)
    assert float((s.R - correct.R).abs().max()) > 1e-4


class _Recorder(nn.Module):
    """A constant trap centre that records the times it is read at."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self.times.append(float(t))
        return torch.zeros(2, dtype=F64)


@pytest.mark.parametrize("track_work", [False, True])
@pytest.mark.parametrize("name", list(INTEGRATORS))
def test_every_step_reads_the_control_inside_its_own_interval(name: str, track_work: bool) -> None:
    """Item 4: step n reads u only at one-sided limits inside (t_n, t_{n+1}) for the
    dynamics; work accounting also reads u(t_n^-) (the jump at the step's start)."""
    recorder = _Recorder()
    integ = INTEGRATORS[name](HarmonicTrap(2.0, recorder))
    if track_work:
        integ.track_work = True
    state = simulate(integ, _start(integ), 3, gradient="none").final
    eps = integ.t_eps
    for n in range(3, 6):
        recorder.times.clear()
        state = integ.step(state)
        t_n, t_n1 = n * DT, (n + 1) * DT
        lo = t_n - 1.5 * eps if track_work else t_n
        assert recorder.times, name
        assert all(lo < t < t_n1 for t in recorder.times), (name, n, recorder.times)
        if not track_work:  # the dynamics read the end of the step, as a left limit
            assert max(recorder.times) == pytest.approx(t_n1 - eps, abs=1e-15)


def test_wrapper_refuses_a_non_integrator() -> None:
    with pytest.raises(ControlMDError, match=r"wraps a controlmd Integrator, got int"):
        StepCounter(3)  # type: ignore[arg-type]
