"""Spatiotemporal control fields (controlmd/potentials/fields.py), the release window of
protocols, the field cost and the spatial channels of ``assembly``."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import assert_close, fd_tol

from controlmd.dynamics import NVE, Brownian, Langevin, NoseHooverChain
from controlmd.errors import ConfigError, ControlMDError
from controlmd.potentials import (
    BasisField,
    Confinement,
    FieldNetwork,
    NeuralField,
    Potential,
    RadialWave,
    mean_square_force,
)
from controlmd.protocols import MLPProtocol, NeuralFieldProtocol, Tabulated
from controlmd.rng import ReplicaRNG
from controlmd.space import free, periodic
from controlmd.tasks.assembly import Assembly

L = 5.0
T = 2.0


def _randomize(module: torch.nn.Module, seed: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _constant(values: list[float]) -> Tabulated:
    return Tabulated(times=[0.0, T], values=torch.tensor([values, values], dtype=torch.float64))


def _neural(kind: str) -> tuple[Potential, torch.Tensor]:
    """A random field of each flavour and matching positions ``[3, 4, d]``."""
    g = torch.Generator().manual_seed(1)
    if kind == "fourier":
        net = FieldNetwork(dim=2, t_final=T, v_max=3.0, n_modes=2, hidden=[8])
        field = NeuralField(net, periodic(L, dim=2))
        R = torch.rand(3, 4, 2, generator=g, dtype=torch.float64) * L
    elif kind == "cartesian_com":
        net = FieldNetwork(
            dim=3, t_final=T, v_max=2.0, features="cartesian", com_relative=True, hidden=[8]
        )
        field = NeuralField(net, free())
        R = torch.randn(3, 4, 3, generator=g, dtype=torch.float64)
    else:  # species
        net = FieldNetwork(dim=2, t_final=T, v_max=3.0, n_species=2, hidden=[8])
        field = NeuralField(net, periodic(L, dim=2), species=[0, 1, 1, 0])
        R = torch.rand(3, 4, 2, generator=g, dtype=torch.float64) * L
    _randomize(net, 2)
    return field, R


def _basis(kind: str) -> tuple[Potential, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    space = periodic(L, dim=2)
    if kind == "gaussian":
        n = 4
        field: Potential = BasisField(
            space, _constant([0.0] * n), basis="gaussian", n_grid=2, width=1.2
        )
    else:
        n = 8
        field = BasisField(space, _constant([0.0] * n), basis="fourier", n_modes=1)
    coeffs = torch.randn(n, generator=g, dtype=torch.float64).tolist()
    field.protocol = _constant(coeffs)  # type: ignore[assignment]
    R = torch.rand(3, 4, 2, generator=g, dtype=torch.float64) * L
    return field, R


def _field(kind: str) -> tuple[Potential, torch.Tensor]:
    if kind in ("gaussian", "fourier_basis"):
        return _basis("gaussian" if kind == "gaussian" else "fourier")
    if kind == "confinement":
        g = torch.Generator().manual_seed(4)
        R = torch.rand(3, 4, 2, generator=g, dtype=torch.float64) * L
        return Confinement(periodic(L, dim=2), _constant([7.0])), R
    if kind == "wave":
        g = torch.Generator().manual_seed(7)
        R = torch.rand(3, 4, 2, generator=g, dtype=torch.float64) * L
        return _wave(_constant([2.5, 1.3])), R
    return _neural(kind)


def _wave(protocol: Tabulated) -> RadialWave:
    return RadialWave(periodic(L, dim=2), protocol, wavelength=0.8, inner_radius=0.9)


FIELDS = [
    "fourier",
    "cartesian_com",
    "species",
    "gaussian",
    "fourier_basis",
    "confinement",
    "wave",
]


@pytest.mark.parametrize("kind", FIELDS)
def test_forces_are_minus_the_gradient_by_finite_differences(kind: str) -> None:
    field, R = _field(kind)
    t = 0.37 * T
    _, F = field.energy_and_forces(R, t)
    h = 1e-6
    fd = torch.zeros_like(R)
    for idx in [
        (b, i, a) for b in range(R.shape[0]) for i in range(R.shape[1]) for a in range(R.shape[2])
    ]:
        Rp, Rm = R.clone(), R.clone()
        Rp[idx] += h
        Rm[idx] -= h
        fd[idx] = -(field.energy(Rp, t)[idx[0]] - field.energy(Rm, t)[idx[0]]) / (2 * h)
    torch.testing.assert_close(F, fd, **fd_tol().kwargs())


@pytest.mark.parametrize("kind", ["fourier", "species", "gaussian", "fourier_basis", "wave"])
def test_fields_are_periodic_in_the_box(kind: str) -> None:
    field, R = _field(kind)
    shift = torch.tensor([L, -2 * L], dtype=torch.float64)
    assert_close(field.energy(R + shift, 0.5), field.energy(R, 0.5), scale=100)


def test_neural_field_amplitude_never_exceeds_v_max() -> None:
    net = FieldNetwork(dim=2, t_final=T, v_max=3.0, hidden=[16, 16])
    _randomize(net, 5, scale=30.0)  # saturates the tanh
    field = NeuralField(net, periodic(L, dim=2))
    R = torch.rand(8, 64, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * L
    with torch.no_grad():
        V = torch.stack([field.value(R, t) for t in torch.linspace(0, T, 9)])
    assert float(V.abs().max()) <= 3.0
    assert float(V.abs().max()) > 2.9  # the bound is reached, so the check is not vacuous


def test_radial_wave_is_bounded_flat_in_its_core_and_travels_inward() -> None:
    amplitude, wavelength, inner = 2.5, 0.8, 0.9
    d = torch.linspace(0.0, L / 2, 2001, dtype=torch.float64)
    R = (L / 2 + torch.stack([d, torch.zeros_like(d)], dim=-1)).unsqueeze(0)  # [1, 2001, 2]

    def profile(s: float) -> torch.Tensor:
        with torch.no_grad():
            return _wave(_constant([amplitude, s])).value(R, 0.0)[0]

    V = profile(0.0)
    assert float(V.min()) >= 0.0 and float(V.max()) <= amplitude
    assert float(V.max()) > 0.99 * amplitude  # the bound is reached
    assert float(V[d < inner - 1e-9].abs().max()) == 0.0  # the gathered core is left alone
    # Raising the phase by ds moves every trough inward by ds (outside the fade-in zone).
    ds = 0.2
    outer = d > inner + wavelength / 2 + ds
    troughs = outer & (V < 1e-3 * amplitude)
    shifted = profile(ds)
    moved = torch.searchsorted(d, d[troughs] - ds)
    assert float(shifted[moved].max()) < 2e-3 * amplitude


@pytest.mark.parametrize("speed", [2.0, 12.0])
def test_a_cold_disk_rides_a_trough_or_slips_at_the_adler_rate(speed: float) -> None:
    """Overdamped disk at kT ~ 0 starting in a trough of a wave travelling inward at ``v``. In
    the wave's frame its offset obeys Adler's equation ``dy/dt = v - v_m sin(2 pi y /
    lambda)``, ``v_m = pi A / (gamma lambda)``. Below ``v_m`` it locks, trailing the trough by
    ``lambda asin(v / v_m) / (2 pi)``; above, it slips one wavelength every ``lambda /
    sqrt(v^2 - v_m^2)``, so after 3 slips it has moved inward by exactly ``v t - 3 lambda``."""
    amplitude, wavelength, gamma, box, dt = 3.0, 1.0, 1.0, 20.0, 2e-4
    v_m = math.pi * amplitude / (gamma * wavelength)
    if speed < v_m:
        t_end = 0.5
        expected = speed * t_end - wavelength * math.asin(speed / v_m) / (2 * math.pi)
    else:
        t_end = 3 * wavelength / math.sqrt(speed**2 - v_m**2)
        expected = speed * t_end - 3 * wavelength
    space = periodic(box, dim=2)
    protocol = Tabulated(times=[0.0, t_end], values=[[amplitude, 0.0], [amplitude, speed * t_end]])
    wave = RadialWave(space, protocol, wavelength=wavelength, inner_radius=0.5)
    R0 = torch.tensor([[[box / 2 + 6.0, box / 2]]], dtype=torch.float64)  # a trough at d = 6
    bd = Brownian(wave, dt=dt, kT=1e-8, gamma=gamma, space=space)
    state = bd.init(R0, rng=ReplicaRNG(0, 1))
    with torch.no_grad():
        for _ in range(round(t_end / dt)):
            state = bd.step(state)
    inward = 6.0 - float((state.R[0, 0] - box / 2).norm())
    assert abs(inward - expected) < 2e-3  # Euler-Maruyama: O(dt), 4e-4 here


def test_assembly_wave_channel_and_its_bound() -> None:
    task = Assembly(controls=["epsilon", "wave"], wave_max=3.0, wave_wavelength=0.8)
    assert task.controls.names == ("eps", "A", "s")
    assert task.default_control().tolist() == [6.0, 0.0, 0.0]
    assert task.max_field(_constant([6.0, 3.0, 0.0])) == 3.0
    field = task.field_potential(_constant([6.0, 3.0, 1.0]))
    assert isinstance(field, RadialWave) and field.wavelength == 0.8


def test_a_fresh_network_is_no_field() -> None:
    field = NeuralField(FieldNetwork(dim=2, t_final=T, v_max=3.0), periodic(L, dim=2))
    R = torch.rand(2, 5, 2, dtype=torch.float64) * L
    E, F = field.energy_and_forces(R.requires_grad_(False), 0.3, create_graph=False)
    assert float(E.abs().max()) == 0.0 and float(F.abs().max()) == 0.0


def test_basis_bound_is_attained_by_the_wells() -> None:
    field, _ = _basis("gaussian")
    bound = field.max_abs_sum()  # type: ignore[attr-defined]
    # 2 x 2 wells of width 1.2 in a box of 5: a well's own peak plus its neighbours' tails
    assert 1.0 < bound < 4.0


# ------------------------------------------------------------------ release window


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_release_window_is_exactly_the_no_control_value(fraction: float) -> None:
    p = MLPProtocol(
        dim=2,
        t_final=T,
        low=[0.0, -1.0],
        high=[10.0, 1.0],
        hidden=[8],
        release_fraction=fraction,
        release_value=[6.0, 0.0],
    )
    _randomize(p, 7)
    end = T * (1 - fraction)
    t_after = torch.linspace(end, T, 50, dtype=torch.float64)
    u = p(t_after)
    assert bool((u == torch.tensor([6.0, 0.0], dtype=torch.float64)).all())
    assert bool((p.release_envelope(t_after) == 0.0).all())
    t_before = torch.linspace(0, end - 0.02 * T, 50, dtype=torch.float64)
    free_p = MLPProtocol(dim=2, t_final=T, low=[0.0, -1.0], high=[10.0, 1.0], hidden=[8])
    free_p.load_state_dict(p.state_dict(), strict=False)
    torch.testing.assert_close(p(t_before), free_p(t_before), rtol=0, atol=0)
    # the switch is continuous: no jump larger than the protocol's own variation
    ts = torch.linspace(end - 0.03 * T, end + 0.01 * T, 2001, dtype=torch.float64)
    assert float(p(ts).detach().diff(dim=0).abs().max()) < 0.05


def test_release_without_a_value_is_refused() -> None:
    with pytest.raises(ControlMDError, match="release_value"):
        MLPProtocol(dim=1, t_final=T, release_fraction=0.1)
    with pytest.raises(ControlMDError, match=r"release_fraction must be in \[0, 0.5\), got 0.5"):
        MLPProtocol(dim=1, t_final=T, release_fraction=0.5, release_value=1.0)


# ------------------------------------------------------------------ field cost


def test_field_cost_of_a_frozen_confinement_matches_the_integral() -> None:
    """Disks frozen by a huge friction feel F = -k(t) d: the cost is
    mean_i k^2 |d_i|^2 * (T (1 - f) - 0.02 T + 0.02 T * 3/8), the release switch
    contributing the mean of ((1 + cos pi x) / 2)^2 = 3/8 of its width."""
    f, k = 0.25, 20.0
    task = Assembly(n_steps=400, dt=1e-3, controls=["confinement"], gamma=1e12, field_cost_every=1)
    p = Tabulated(
        times=[0.0, task.horizon],
        values=[[k], [k]],
        low=0.0,
        high=100.0,
        release_fraction=f,
        release_value=[0.0],
    )
    state = task.rollout(p, 3, seed=0, gradient="none")
    d = task.space.displacement(state.R, task.space.box / 2)
    rate = k**2 * (d * d).sum(-1).mean(-1)
    Th = task.horizon
    expected = rate * (Th * (1 - f) - 0.02 * Th + 0.02 * Th * 3 / 8)
    torch.testing.assert_close(state.aux["field_cost"], expected, rtol=2e-3, atol=0)


def test_field_cost_weight_adds_the_penalty_to_the_loss() -> None:
    task = Assembly(n_steps=40, controls=["epsilon", "confinement"])
    kw = dict(dim=2, t_final=task.horizon, low=[2.0, 0.0], high=[10.0, 100.0], hidden=[4])
    plain, weighted = MLPProtocol(**kw), MLPProtocol(**kw, field_cost_weight=0.01)
    s0 = task.rollout(plain, 2, seed=1, gradient="none")
    loss0 = task.loss(s0)
    s1 = task.rollout(weighted, 2, seed=1, gradient="none")
    assert_close(task.loss(s1), loss0 + 0.01 * s1.aux["field_cost"].mean())
    assert float(s1.aux["field_cost"].min()) > 0


# ------------------------------------------------------------------ assembly channels


def test_assembly_spatial_channels_and_their_no_control_value() -> None:
    task = Assembly(controls=["epsilon", "basis", "confinement", "field"], basis_grid=2)
    assert task.controls.names == ("eps", "c0", "c1", "c2", "c3", "k")
    assert task.default_control().tolist() == [6.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    p = NeuralFieldProtocol(
        dim=6, t_final=task.horizon, low=list(task.controls.low), high=list(task.controls.high)
    )
    task.check_protocol(p)
    bound = task.max_field(p)
    assert bound is not None and bound > 3.0 + 100.0 * task.box**2 / 4


def _neural_task_and_protocol(n_steps: int) -> tuple[Assembly, NeuralFieldProtocol]:
    task = Assembly(n_steps=n_steps, controls=["epsilon", "field"], field_cost_every=5)
    p = NeuralFieldProtocol(
        dim=1,
        t_final=task.horizon,
        low=2.0,
        high=10.0,
        hidden=[4],
        field_hidden=[8],
        field_max=3.0,
        release_fraction=0.2,
        release_value=[6.0],
    )
    _randomize(p, 11, scale=0.5)
    return task, p


def test_outcome_gradient_matches_central_differences_on_common_random_numbers() -> None:
    task, p = _neural_task_and_protocol(30)
    params = [q for q in p.parameters() if q.requires_grad]
    g = torch.Generator().manual_seed(12)
    v = [torch.randn(q.shape, generator=g, dtype=q.dtype) for q in params]

    def objective() -> torch.Tensor:
        state = task.rollout(p, 4, seed=3)
        return task.loss(state) + 0.01 * state.aux["field_cost"].mean()

    grads = torch.autograd.grad(objective(), params)
    directional = sum(float((gi * vi).sum()) for gi, vi in zip(grads, v))
    h = 1e-5
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for q, vi in zip(params, v):
                q.add_(sign * h * vi)
        with torch.no_grad():
            values.append(float(objective()))
        with torch.no_grad():
            for q, vi in zip(params, v):
                q.sub_(sign * h * vi)
    fd = (values[0] - values[1]) / (2 * h)
    assert abs(directional) > 1e-4
    assert math.isclose(directional, fd, rel_tol=1e-5)


INTEGRATORS = {
    "brownian": lambda pot, space: Brownian(pot, dt=1e-3, kT=1.0, space=space),
    "langevin": lambda pot, space: Langevin(pot, dt=1e-3, kT=1.0, gamma=1.0, space=space),
    "nve": lambda pot, space: NVE(pot, dt=1e-3, space=space),
    "nhc": lambda pot, space: NoseHooverChain(pot, dt=1e-3, kT=1.0, space=space),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(INTEGRATORS))
def test_neural_field_drives_every_integrator(name: str, dtype: torch.dtype) -> None:
    """Batched replicas in float32 and float64: the field moves the disks (a run with the
    field differs from one without, on the same noise) and the gradient reaches it."""
    from controlmd.simulate import simulate

    space = periodic(L, dim=2)
    net = FieldNetwork(dim=2, t_final=T, v_max=3.0, hidden=[8])
    _randomize(net, 13)
    R0 = torch.rand(3, 5, 2, generator=torch.Generator().manual_seed(14), dtype=torch.float64) * L

    def run(potential: Potential) -> torch.Tensor:
        integ = INTEGRATORS[name](potential, space)
        state = integ.init(R0.to(dtype), kT=1.0, rng=ReplicaRNG(0, 3))
        return simulate(integ, state, 20).final.R

    R = run(NeuralField(net, space))
    R_free = run(Confinement(space, _constant([0.0])))
    assert R.dtype == dtype and bool(torch.isfinite(R).all())
    assert float((R - R_free).abs().max()) > 1e-6
    grads = torch.autograd.grad(R.square().sum(), list(net.parameters()), allow_unused=True)
    assert any(gr is not None and float(gr.abs().sum()) > 0 for gr in grads)


def test_nve_conserves_energy_in_a_static_basis_field() -> None:
    from controlmd.simulate import simulate

    field, R = _basis("fourier")
    integ = NVE(field, dt=1e-3, space=periodic(L, dim=2))
    state = integ.init(R, kT=1.0, rng=ReplicaRNG(0, 3))
    final = simulate(integ, state, 500, gradient="none").final
    e0 = integ.potential_energy(state) + 0.5 * (state.P**2).sum((-1, -2))
    e1 = integ.potential_energy(final) + 0.5 * (final.P**2).sum((-1, -2))
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)


def test_mean_square_force_of_a_confinement() -> None:
    space = periodic(L, dim=2)
    R = torch.tensor([[[L / 2 + 1.0, L / 2], [L / 2, L / 2 - 2.0]]], dtype=torch.float64)
    rate = mean_square_force(Confinement(space, _constant([3.0])), R, 0.1)
    assert_close(rate, [9.0 * (1.0 + 4.0) / 2])


# ------------------------------------------------------------------ bad input


def test_a_field_on_a_system_of_the_wrong_dimension_is_refused() -> None:
    net = FieldNetwork(dim=2, t_final=T, v_max=1.0)
    field = NeuralField(net, periodic(L, dim=3))
    with pytest.raises(ControlMDError, match=r"dim = 2 .*\(3, 4, 3\)"):
        field.energy(torch.zeros(3, 4, 3, dtype=torch.float64), 0.0)
    task = Assembly(controls=["field"])
    with pytest.raises(ControlMDError, match="field_dim = 3"):
        task.check_protocol(NeuralFieldProtocol(t_final=task.horizon, field_dim=3))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: FieldNetwork(dim=2, t_final=T, v_max=-3.0), "V_max must be > 0, got -3"),
        (lambda: NeuralFieldProtocol(t_final=T, field_max=0.0), "V_max must be > 0, got 0"),
        (
            lambda: BasisField(periodic(L, dim=2), _constant([0.0]), width=2.0),
            r"basis width = 2 does not fit the box",
        ),
        (lambda: BasisField(free(), _constant([0.0])), "needs a periodic box"),
        (lambda: Assembly(controls=["basis"], basis_width=5.0), "basis width = 5"),
        (lambda: Assembly(controls=["fields"]), "fields"),
        (lambda: Assembly(controls=["wave"], wave_max=-3.0), "wave_max must be > 0, got -3"),
        (lambda: Assembly(controls=["wave"], wave_inner=2.9), "wave_inner = 2.9 does not fit"),
        (
            lambda: _wave(_constant([1.0])).energy(torch.zeros(1, 2, 2), 0.0),
            r"protocol channels 0 \(amplitude\) and 1",
        ),
        (
            lambda: RadialWave(
                periodic(L, dim=2), _constant([1.0, 0.0]), wavelength=0.0, inner_radius=1.0
            ),
            "wave wavelength must be > 0, got 0",
        ),
        (lambda: MLPProtocol(t_final=T, field_cost_weight=-1.0), "field_cost_weight must be >= 0"),
    ],
)
def test_bad_field_input_names_the_key_and_value(build, match: str) -> None:
    with pytest.raises(ControlMDError, match=match):
        build()


def _config(**protocol: object) -> dict:
    return {
        "experiment": {"name": "fields_test"},
        "task": {"name": "assembly", "controls": ["epsilon", "confinement"], "n_steps": 20},
        "protocol": {"kind": "mlp", **protocol},
        "train": {"iterations": 0},
    }


@pytest.mark.parametrize(
    ("protocol", "match"),
    [
        (
            {"release_fraction": 0.5},
            r"\[protocol\] release_fraction must be in \[0, 0.5\).*got 0.5",
        ),
        ({"release_fraction": -0.1}, r"\[protocol\] release_fraction .* got -0.1"),
        ({"release_fraction": "a"}, r"\[protocol\] release_fraction must be a number, got 'a'"),
        ({"field_cost_weight": -2.0}, r"\[protocol\] field_cost_weight must be >= 0, got -2.0"),
        ({"kind": "neural_field", "field_max": -3.0}, "V_max must be > 0, got -3"),
    ],
)
def test_bad_protocol_keys_raise_config_errors(protocol: dict, match: str) -> None:
    from controlmd.config import resolve_config

    with pytest.raises(ConfigError, match=match):
        resolve_config(_config(**protocol))


def test_config_fills_the_release_value_from_the_task() -> None:
    from controlmd.config import build_protocol, resolve_config

    cfg = resolve_config(_config(release_fraction=0.1))
    assert cfg["protocol"]["release_value"] == [6.0, 0.0]
    p = build_protocol(cfg)
    assert p(torch.tensor(0.95 * p.t_final)).tolist() == [6.0, 0.0]


def test_a_field_control_needs_a_field_protocol() -> None:
    from controlmd.config import resolve_config

    raw = _config()
    raw["task"]["controls"] = ["epsilon", "field"]
    with pytest.raises(ConfigError, match="kind = 'neural_field'"):
        resolve_config(raw)
    raw["protocol"] = {"kind": "neural_field", "release_fraction": 0.1}
    cfg = resolve_config(raw)
    assert cfg["protocol"]["dim"] == 1 and cfg["protocol"]["release_value"] == [6.0]


@pytest.mark.slow
def test_the_quick_field_experiment_improves_the_yield(tmp_path) -> None:
    """experiments/assembly_field_quick.toml (about 1.5 min): the trained neural field beats
    no field by more than 3 paired SE on 512 fresh replicas of a seed never used in training."""
    from pathlib import Path

    from controlmd.config import build_task, load_config
    from controlmd.evaluation import constant_protocol, evaluate_paired
    from controlmd.experiment import run_experiment
    from controlmd.protocols import load_protocol

    path = Path(__file__).parents[1] / "experiments" / "assembly_field_quick.toml"
    cfg = load_config(path, ["logging.progress=false"])
    result = run_experiment(cfg, out=tmp_path / "run", progress=False)
    assert result.metrics["field_cost_final"] > 0
    task = build_task(cfg)
    trained = load_protocol(tmp_path / "run" / "protocol.pt")
    r = evaluate_paired(task, trained, constant_protocol(task), 512, seed=424_242)
    assert r.paired_difference > 3 * r.paired_se


def test_field_maps_show_the_field_and_vanish_in_the_release_window(tmp_path) -> None:
    task = Assembly(n_steps=20, controls=["field"])
    p = NeuralFieldProtocol(t_final=task.horizon, field_max=3.0, release_fraction=0.1)
    _randomize(p.field, 21)
    times = torch.tensor([0.0, 0.5, 0.95]) * task.horizon
    maps = task.field_map(p, times, n_grid=16)
    assert maps is not None and maps.shape == (3, 16, 16)
    assert 0.0 < float(maps[:2].abs().max()) <= 3.0 and float(maps[2].abs().max()) == 0.0
    X = torch.tensor([[[0.5, 1.5]]], dtype=torch.float64) * task.box / 16  # a grid point
    with torch.no_grad():
        V = NeuralField(p.field, task.space, envelope=p.release_envelope).value(X, times[1])
    assert_close(maps[1, 0, 1], V[0, 0])
    assert task.save_field_maps(p, tmp_path / "maps.png", n_times=3, n_grid=8) is not None
    assert (tmp_path / "maps.png").stat().st_size > 0
    assert Assembly(n_steps=20).field_map(p, times) is None


def test_field_section_follows_the_wave_through_the_box_centre(tmp_path) -> None:
    task = Assembly(n_steps=20, controls=["wave"], wave_wavelength=0.8, wave_inner=1.2)
    T = task.horizon
    p = Tabulated(
        times=[0.0, T],
        values=[[3.0, 0.0], [3.0, 2.0]],
        release_fraction=0.1,
        release_value=[0.0, 0.0],
    )
    times = torch.tensor([0.0, 0.5, 0.95]) * T
    section = task.field_section(p, times, n_points=33)
    assert section is not None and section.shape == (3, 33)
    x = torch.linspace(0.0, task.box, 33, dtype=torch.float64)
    X = torch.stack([x, torch.full_like(x, task.box / 2)], dim=-1).unsqueeze(0)
    field = task.field_potential(p)
    assert field is not None
    with torch.no_grad():
        assert_close(section[1], field.value(X, times[1])[0])  # type: ignore[operator]
    assert float(section[2].abs().max()) == 0.0  # released
    assert task.save_field_kymograph(p, tmp_path / "k.png", n_times=5, n_points=9) is not None
    assert Assembly(n_steps=20).field_section(p, times) is None
