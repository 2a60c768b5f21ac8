"""Protocols: shapes, bounds, fitting, fixed ends, breakpoints, fluence, save/load, registry."""

from __future__ import annotations

import math

import pytest
import torch

from controlmd.errors import ControlMDError
from controlmd.protocols import (
    CubicSpline,
    FeedbackMLP,
    HeldControl,
    PiecewiseConstant,
    Tabulated,
    load_protocol,
    make_protocol,
    protocol_names,
)

T_FINAL = 2.0
KINDS = {
    "mlp": {"hidden": [8, 8], "n_frequencies": 3},
    "fourier": {"n_terms": 3},
    "chebyshev": {"degree": 4},
    "spline": {"n_knots": 6},
    "piecewise_constant": {"n_pieces": 5},
    "feedback_mlp": {"obs_dim": 2, "hidden": [8]},
}


def _build(kind: str, **extra: object):
    torch.manual_seed(0)
    return make_protocol(
        kind, dim=2, t_final=T_FINAL, low=[-1.0, 0.0], high=[3.0, 2.0], **KINDS[kind], **extra
    )


def test_registry_lists_every_kind_and_rejects_unknown_names() -> None:
    assert set(KINDS) | {"table"} <= set(protocol_names())
    with pytest.raises(
        ControlMDError, match=r"unknown protocol kind 'splien'; expected one of: .*spline"
    ):
        make_protocol("splien", dim=1, t_final=1.0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_shapes_and_bounds(kind: str) -> None:
    p = _build(kind)
    for param in p.parameters():  # push far outside: squashing must still respect the bounds
        param.data.normal_(0.0, 20.0)
    assert p(torch.tensor(0.3)).shape == (2,)
    t = torch.linspace(0.0, T_FINAL, 57, dtype=torch.float64)
    u = p(t)
    assert u.shape == (57, 2)
    assert bool((u >= p.low).all() and (u <= p.high).all())
    t_table, u_table = p.sample(11)
    assert t_table.shape == (11,) and u_table.shape == (11, 2)


@pytest.mark.parametrize("kind", ["fourier", "chebyshev", "spline"])
def test_linear_bases_fit_exactly(kind: str) -> None:
    p = make_protocol(
        kind, dim=1, t_final=T_FINAL, init=[1.0, 3.0], **KINDS[kind]
    )  # unbounded: linear target
    t = torch.linspace(0.0, T_FINAL, 33, dtype=torch.float64)
    torch.testing.assert_close(p(t)[:, 0], 1.0 + t, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", ["fourier", "chebyshev"])
def test_least_squares_fits_repeat_bit_for_bit(kind: str) -> None:
    """The same fit, 300 times in one process, gives the same coefficients: LAPACK's gelsy
    (torch's default lstsq driver) did not, 1-ulp apart in ~1 % of calls on this MKL, and
    every seeded training that starts from a fitted protocol inherited it."""
    fits = [
        make_protocol(kind, dim=1, t_final=T_FINAL, low=-10.0, high=15.0, init=[0.0, 5.0])
        .coef.detach()
        .clone()
        for _ in range(300)
    ]
    assert all(torch.equal(f, fits[0]) for f in fits)


def test_mlp_fit_reaches_linear_protocol_inside_bounds() -> None:
    torch.manual_seed(0)
    p = make_protocol(
        "mlp", dim=1, t_final=1.0, low=-10.0, high=15.0, hidden=[16, 16], init=[0.0, 5.0]
    )
    t = torch.linspace(0.0, 1.0, 41, dtype=torch.float64)
    assert float((p(t)[:, 0] - 5.0 * t).abs().max().detach()) < 1e-3


def test_natural_spline_interpolates_knots_with_zero_end_curvature() -> None:
    p = CubicSpline(dim=1, t_final=1.0, n_knots=5)
    with torch.no_grad():
        p.coef.copy_(torch.tensor([[0.0], [1.0], [-1.0], [2.0], [0.5]], dtype=torch.float64))
    knots = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    torch.testing.assert_close(p(knots)[:, 0], p.coef[:, 0].detach())
    for end in (0.0, 1.0):  # natural spline: u'' = 0 at both ends
        t = torch.tensor(end, dtype=torch.float64, requires_grad=True)
        (du,) = torch.autograd.grad(p(t)[0], t, create_graph=True)
        (d2u,) = torch.autograd.grad(du, t)
        assert abs(float(d2u)) < 1e-9
    mid = torch.tensor(0.375, dtype=torch.float64, requires_grad=True)
    (du,) = torch.autograd.grad(p(mid)[0], mid, create_graph=True)
    assert abs(float(torch.autograd.grad(du, mid)[0])) > 1.0  # curved inside


@pytest.mark.parametrize("kind", ["mlp", "fourier", "chebyshev", "spline"])
def test_fixed_endpoints_are_exact(kind: str) -> None:
    p = _build(kind, start=[0.5, 1.0], end=[2.0, 0.25])
    for param in p.parameters():
        param.data.normal_(0.0, 1.0)
    ends = p(torch.tensor([0.0, T_FINAL], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([[0.5, 1.0], [2.0, 0.25]], dtype=torch.float64))


def test_bad_bounds_and_endpoints_are_rejected() -> None:
    with pytest.raises(ControlMDError, match="low < high"):
        make_protocol("chebyshev", dim=1, t_final=1.0, low=2.0, high=1.0)
    with pytest.raises(ControlMDError, match="strictly inside the bounds"):
        make_protocol("chebyshev", dim=1, t_final=1.0, low=0.0, high=1.0, start=1.0)
    with pytest.raises(ControlMDError, match="t_final must be > 0"):
        make_protocol("mlp", dim=1, t_final=0.0)
    with pytest.raises(ControlMDError, match="outside the bounds"):
        make_protocol("spline", dim=1, t_final=1.0, low=0.0, high=1.0, init=[0.5, 2.0])


def test_piecewise_constant_breakpoints_and_values() -> None:
    p = PiecewiseConstant(
        dim=1, t_final=1.0, n_pieces=4, low=0.0, high=10.0, init=[1.0, 2.0, 3.0, 4.0]
    )
    assert p.breakpoints() == pytest.approx([0.25, 0.5, 0.75])
    t = torch.tensor([0.0, 0.2499, 0.25, 0.6, 0.99, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        p(t)[:, 0], torch.tensor([1.0, 1.0, 2.0, 3.0, 4.0, 4.0], dtype=torch.float64)
    )
    held = Tabulated(times=[0.0, 0.4, 1.0], values=[1.0, 2.0, 3.0], interpolation="hold")
    assert held.breakpoints() == pytest.approx([0.4, 1.0])
    assert Tabulated(times=[0.0, 1.0], values=[1.0, 2.0]).breakpoints() == []


def test_piecewise_constant_keeps_its_original_api() -> None:
    p = PiecewiseConstant(dim=2, t_final=3.0, n_pieces=3, init=[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert p.piece_index(torch.tensor([0.5, 1.5, 3.0])).tolist() == [0, 1, 2]
    torch.testing.assert_close(p(torch.tensor(2.5)), torch.tensor([5.0, 6.0], dtype=torch.float64))
    mid = PiecewiseConstant(dim=1, t_final=1.0, n_pieces=2, low=0.0, high=4.0)
    torch.testing.assert_close(mid(torch.tensor(0.1)), torch.tensor([2.0], dtype=torch.float64))
    hold = HeldControl(dim=1, t_final=1.0)
    hold.set(torch.tensor([[1.0], [2.0]]))
    assert hold(torch.tensor(0.5)).shape == (2, 1)


def test_fluence_penalty_of_a_constant_field() -> None:
    p = PiecewiseConstant(dim=2, t_final=2.0, n_pieces=1, init=[3.0, 4.0], fluence_weight=0.5)
    assert float(p.fluence().detach()) == pytest.approx(25.0 * 2.0)
    assert float(p.penalty().detach()) == pytest.approx(0.5 * 50.0)
    assert float(make_protocol("chebyshev", dim=1, t_final=1.0).penalty()) == 0.0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_save_load_round_trip(kind: str, tmp_path) -> None:
    p = _build(
        kind, **({} if kind in ("piecewise_constant", "feedback_mlp") else {"start": [0.0, 1.0]})
    )
    for param in p.parameters():
        param.data.normal_(0.0, 0.7)
    p.save(tmp_path / "p.pt")
    q = load_protocol(tmp_path / "p.pt")
    assert type(q) is type(p) and q.kind == kind
    p.save(tmp_path / "protocol.pt")  # a run folder names its protocol.pt
    torch.testing.assert_close(load_protocol(tmp_path).state_dict(), q.state_dict(), rtol=0, atol=0)
    t = torch.linspace(0.0, T_FINAL, 23, dtype=torch.float64)
    torch.testing.assert_close(q(t), p(t), rtol=0, atol=0)
    if kind == "feedback_mlp":
        obs = torch.randn(4, 2, dtype=torch.float64)
        torch.testing.assert_close(
            q(torch.tensor(0.7), obs), p(torch.tensor(0.7), obs), rtol=0, atol=0
        )


def test_table_round_trip_replays_a_protocol(tmp_path) -> None:
    p = make_protocol("chebyshev", dim=2, t_final=1.0, low=-2.0, high=2.0, degree=3)
    with torch.no_grad():
        p.coef.copy_(
            torch.tensor([[0.1, -0.3], [0.5, 0.2], [0.0, 0.4], [-0.2, 0.1]], dtype=torch.float64)
        )
    p.write_table(tmp_path / "u.csv", n=401)
    replay = Tabulated.from_csv(tmp_path / "u.csv", low=-2.0, high=2.0)
    t = torch.linspace(0.0, 1.0, 97, dtype=torch.float64)
    assert (
        float((replay(t) - p(t)).detach().abs().max()) < 1e-4
    )  # linear interpolation error on a fine table
    assert replay.t_final == pytest.approx(1.0)


def test_table_value_outside_its_bounds_is_refused_by_name() -> None:
    kw = {"times": [0.0, 1.0], "interpolation": "hold", "low": [0.25, 0.0], "high": [2.0, 10.0]}
    with pytest.raises(ControlMDError, match=r"values\[0\]\[0\] = 0.0 .* \[0.25, 2.0\]"):
        Tabulated(values=[[0.0, 5.0], [1.0, 5.0]], **kw)
    with pytest.raises(ControlMDError, match=r"values\[1\]\[1\] = 12.0"):
        Tabulated(values=[[1.0, 5.0], [1.0, 12.0]], **kw)
    at_bounds = Tabulated(values=[[0.25, 0.0], [2.0, 10.0]], **kw)  # a bound itself is kept
    u = at_bounds(torch.tensor([0.5, 1.0], dtype=torch.float64)).detach()
    torch.testing.assert_close(u, torch.tensor([[0.25, 0.0], [2.0, 10.0]], dtype=torch.float64))


def test_feedback_protocol_depends_on_observations() -> None:
    torch.manual_seed(1)
    p = FeedbackMLP(dim=1, t_final=1.0, obs_dim=1, hidden=[8], low=-1.0, high=1.0)
    for param in p.parameters():
        param.data.normal_(0.0, 0.5)
    obs = torch.tensor([[-1.0], [0.0], [2.0]], dtype=torch.float64)
    u = p(torch.tensor(0.5), obs)
    assert u.shape == (3, 1) and p.feedback
    assert float(u.detach().std()) > 0.0
    torch.testing.assert_close(u[1], p(torch.tensor(0.5)))  # no obs = zero obs
    with pytest.raises(ControlMDError, match="obs"):
        p(torch.tensor(0.5), torch.zeros(3, 2, dtype=torch.float64))


def test_fit_from_a_function_of_time() -> None:
    p = make_protocol(
        "spline", dim=1, t_final=math.pi, n_knots=24, init=lambda t: torch.sin(t)[:, None]
    )
    t = torch.linspace(0.0, math.pi, 50, dtype=torch.float64)
    assert float((p(t)[:, 0] - torch.sin(t)).detach().abs().max()) < 1e-3


def test_tabulated_scalar_read_without_graph_is_bit_identical() -> None:
    """Tabulated's Python-float interpolation at one time (no graph, float64, CPU) gives
    the bits of the tensor interpolation, inside, on and outside the knots."""
    from controlmd.protocols.base import _interp

    g = torch.Generator().manual_seed(0)
    times = torch.cat(
        [torch.zeros(1), torch.rand(6, generator=g, dtype=torch.float64).sort().values + 0.01]
    )
    values = torch.randn(7, 3, generator=g, dtype=torch.float64) * 5
    table = Tabulated(times=times, values=values)
    probes = torch.cat(
        [times, torch.rand(200, generator=g, dtype=torch.float64) * 1.4 - 0.2, torch.tensor([-0.0])]
    )
    for t in probes:
        with torch.no_grad():
            fast = table.raw(t.reshape(1))
            slow = _interp(t.reshape(1), table.times, table.values)
        assert fast.dtype == slow.dtype and fast.shape == slow.shape
        assert torch.equal(fast.view(torch.int64), slow.view(torch.int64)), float(t)
    with torch.no_grad():  # an in-place change of the table is seen
        table.values.add_(1.0)
        assert torch.equal(table.raw(probes[3:4]), _interp(probes[3:4], table.times, table.values))
