"""Property-based checks of the public API at its edges (hypothesis).

The property everywhere: a call either raises a controlmd error (``ControlMDError``,
``ConfigError``) whose message names the offending argument or key, or returns a finite,
correct result. Examples are derandomized (the same inputs every run, no example
database), ``CI_EXAMPLES`` per property in ``make test`` and ``LARGE_EXAMPLES`` in
``make test-slow``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlmd import (
    Brownian,
    ControlMDError,
    Langevin,
    LennardJones,
    Morse,
    Trainer,
    make_protocol,
    periodic,
    simulate,
)
from controlmd.config import resolve_config
from controlmd.errors import ConfigError
from controlmd.potentials import energy_and_forces
from controlmd.rng import ReplicaRNG
from controlmd.tasks import get_task

CI_EXAMPLES, LARGE_EXAMPLES = 25, 300
PROFILES = [
    pytest.param(CI_EXAMPLES, id="ci"),
    pytest.param(LARGE_EXAMPLES, id="large", marks=pytest.mark.slow),
]
BAD_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e-300, 1e300]


def _check(examples: int) -> Any:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def _names(err: BaseException, *names: str) -> None:
    """The error is one of controlmd's and its message names one of ``names``."""
    assert isinstance(err, ControlMDError), f"{type(err).__name__}: {err}"
    assert any(n in str(err) for n in names), f"{names} not named in: {err}"


scalars = st.one_of(
    st.floats(0.05, 20.0), st.sampled_from(BAD_FLOATS), st.integers(-3, 3).map(float)
)


@pytest.mark.parametrize("examples", PROFILES)
def test_a_periodic_space_is_built_or_refused_by_name(examples: int) -> None:
    @_check(examples)
    @given(box=scalars, dim=st.integers(-1, 4), seed=st.integers(0, 2**16))
    def check(box: float, dim: int, seed: int) -> None:
        try:
            space = periodic(box, dim=dim)
        except ControlMDError as err:
            _names(err, "box", "dim")
            assert not (math.isfinite(box) and box > 0 and dim >= 1)
            return
        assert math.isfinite(box) and box > 0
        g = torch.Generator().manual_seed(seed)
        a, b = (torch.rand(5, dim, generator=g, dtype=torch.float64) * 3 * box for _ in range(2))
        d = space.displacement(a, b)
        # minimum image: every component within half a box, and the image of the raw difference
        assert bool((d.abs() <= box / 2 + 1e-9 * box).all())
        k = (a - b - d) / box
        torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-9)

    check()


positions = st.builds(
    dict,
    B=st.integers(0, 3),
    N=st.integers(0, 6),
    d=st.integers(1, 4),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.int64]),
    poison=st.sampled_from([None, math.nan, math.inf, -math.inf]),
    seed=st.integers(0, 2**16),
)


def _positions(p: dict[str, Any], box: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(p["seed"])
    # a jittered lattice: no overlaps, so a finite input has a finite, smooth energy
    n_side = 2
    sites = torch.cartesian_prod(*[torch.arange(n_side, dtype=torch.float64)] * p["d"])
    sites = sites.reshape(-1, p["d"])[: p["N"]] * (box / n_side)
    R = sites + 0.05 * torch.rand(p["B"], sites.shape[0], p["d"], generator=g, dtype=torch.float64)
    if p["poison"] is not None and R.numel():
        R.view(-1)[p["seed"] % R.numel()] = p["poison"]
    return R.to(p["dtype"])


@pytest.mark.parametrize("examples", PROFILES)
@pytest.mark.parametrize("term", ["lj", "morse"])
def test_energy_and_forces_are_finite_and_consistent_or_refused(examples: int, term: str) -> None:
    @_check(examples)
    @given(p=positions)
    def check(p: dict[str, Any]) -> None:
        box = 5.0
        dim = p["d"] if p["d"] in (1, 2, 3) else 3
        space = periodic(box, dim=dim)
        pot = (
            LennardJones(space, r_cut=2.4)
            if term == "lj"
            else Morse(space, sigma=1.0, epsilon=1.0, alpha=2.0, r_cut=2.4)
        )
        R = _positions(p, box)
        try:
            E, F = energy_and_forces(pot, R)
        except ControlMDError as err:
            _names(err, "R")
            return
        assert p["poison"] is None or R.numel() == 0
        assert p["d"] == dim and R.is_floating_point()
        assert E.shape == (p["B"],) and F.shape == R.shape
        assert bool(torch.isfinite(E).all()) and bool(torch.isfinite(F).all())
        if p["B"] and p["N"] > 1 and R.dtype == torch.float64:
            # forces are -dE/dR (central differences on one coordinate)
            h = 1e-6
            i = p["seed"] % p["N"]
            Rp, Rm = R.clone(), R.clone()
            Rp[0, i, 0] += h
            Rm[0, i, 0] -= h
            fd = -(pot.energy(Rp)[0] - pot.energy(Rm)[0]) / (2 * h)
            torch.testing.assert_close(F[0, i, 0], fd, rtol=1e-5, atol=1e-6)

    check()


@pytest.mark.parametrize("examples", PROFILES)
def test_a_protocol_is_built_and_bounded_or_refused_by_name(examples: int) -> None:
    @_check(examples)
    @given(
        kind=st.sampled_from(["chebyshev", "fourier", "piecewise_constant", "mlp", "spline"]),
        t_final=scalars,
        low=st.sampled_from([-2.0, 0.0, 1.0, math.nan]),
        width=st.sampled_from([3.0, 0.0, -1.0, math.inf]),
        t=st.one_of(st.floats(-1.0, 30.0), st.sampled_from([math.nan, math.inf])),
    )
    def check(kind: str, t_final: float, low: float, width: float, t: float) -> None:
        high = low + width
        try:
            extra = {"n_pieces": 4} if kind == "piecewise_constant" else {}
            protocol = make_protocol(kind, dim=2, t_final=t_final, low=low, high=high, **extra)
        except ControlMDError as err:
            _names(err, "t_final", "low", "high")
            return
        assert math.isfinite(t_final) and t_final > 0 and math.isfinite(low) and high > low
        try:
            u = protocol(t)
        except ControlMDError as err:
            _names(err, "t")
            assert not math.isfinite(t)
            return
        assert u.shape == (2,) and bool(torch.isfinite(u).all())
        assert bool(((u >= low) & (u <= high)).all())

    check()


@pytest.mark.parametrize("examples", PROFILES)
@pytest.mark.parametrize("kind", ["brownian", "langevin"])
def test_an_integrator_is_built_and_steps_finitely_or_is_refused_by_name(
    examples: int, kind: str
) -> None:
    @_check(examples)
    @given(dt=scalars, kT=scalars, friction=scalars, seed=st.integers(0, 2**16))
    def check(dt: float, kT: float, friction: float, seed: int) -> None:
        space = periodic(6.0, dim=2)
        pot = LennardJones(space, r_cut=2.5)
        try:
            cls = Brownian if kind == "brownian" else Langevin
            integ = cls(pot, dt=dt * 1e-3, kT=kT, gamma=friction, space=space)
        except ControlMDError as err:
            _names(err, "dt", "kT", "gamma")
            return
        R = torch.tensor([[[1.0, 1.0], [2.2, 1.0], [1.0, 2.3], [3.5, 3.5]]], dtype=torch.float64)
        state = integ.init(R.repeat(2, 1, 1), rng=ReplicaRNG(seed, 2))
        try:
            final = simulate(integ, state, 20).final
        except ControlMDError as err:  # a diverging run names its step
            _names(err, "step")
            return
        assert bool(torch.isfinite(final.R).all())

    check()


TINY_RUN = {
    "experiment": {"name": "p", "seed": 0},
    "task": {"name": "trap_drag", "n_steps": 10},
    "protocol": {"kind": "chebyshev", "degree": 2, "low": -10.0, "high": 15.0},
    "train": {"iterations": 1, "replicas": 4, "lr": 0.01},
}


@pytest.mark.parametrize("examples", PROFILES)
def test_a_train_section_is_accepted_or_refused_naming_its_key(examples: int) -> None:
    values = st.one_of(
        st.sampled_from([math.nan, math.inf, -1, 0, 0.5, True, "x", None, [1]]),
        st.integers(-5, 50),
        st.floats(-1.0, 1.0),
    )

    @_check(examples)
    @given(key=st.sampled_from(["lr", "replicas", "iterations", "seed"]), value=values)
    def check(key: str, value: Any) -> None:
        cfg = {k: dict(v) for k, v in TINY_RUN.items()}
        section = "experiment" if key == "seed" else "train"
        if value is None:
            cfg[section].pop(key)
        else:
            cfg[section][key] = value
        try:
            resolved = resolve_config(cfg)
        except ConfigError as err:
            _names(err, f"{section}.{key}", key)
            return
        got = resolved[section][key]
        if key == "lr":
            assert isinstance(got, float) and math.isfinite(got) and got > 0
        elif key == "seed":
            assert isinstance(got, int) and not isinstance(got, bool) and got >= 0
        else:  # zero iterations is allowed: the run evaluates its initial protocol
            low = 0 if key == "iterations" else 1
            assert isinstance(got, int) and not isinstance(got, bool) and got >= low

    check()


@pytest.mark.parametrize("examples", PROFILES)
def test_the_trainer_takes_a_fitting_protocol_or_refuses_by_name(examples: int) -> None:
    task = get_task("trap_drag", n_steps=10)

    @_check(examples)
    @given(
        scale=st.sampled_from([1.0, 0.5, 2.0, 1.0 + 1e-6]),
        dim=st.integers(1, 3),
        lr=st.sampled_from([0.01, 0.0, -1.0, math.nan]),
        replicas=st.sampled_from([4, 1, 0, -2]),
    )
    def check(scale: float, dim: int, lr: float, replicas: int) -> None:
        protocol = make_protocol(
            "chebyshev", dim=dim, t_final=task.horizon * scale, degree=2, low=-10.0, high=15.0
        )
        try:
            trainer = Trainer(task, protocol, lr=lr, replicas=replicas)
        except ControlMDError as err:
            _names(err, "t_final", "dim", "lr", "replicas")
            return
        assert scale == 1.0 and dim == 1 and lr > 0 and replicas >= 1
        assert trainer.protocol is protocol

    check()
