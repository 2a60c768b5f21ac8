"""The ``field`` channel of polymer_fold: a neural field relative to the chain's centre of
mass (forces, translation invariance, release window, amplitude bound, field cost, pathwise
gradient) and its bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tolerances import assert_close, fd_tol
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from controlmd.errors import ConfigError, ControlMDError
from controlmd.potentials import NeuralField
from controlmd.protocols import MLPProtocol, NeuralFieldProtocol
from controlmd.simulate import simulate
from controlmd.space import free
from controlmd.tasks.polymer_fold import OneGraph, PolymerFold

EXPERIMENTS = Path(__file__).parents[1] / "experiments"

CHAIN_FIELD = {"field_dim": 3, "field_features": "cartesian", "field_com_relative": True}


def _randomize(module: torch.nn.Module, seed: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _field_protocol(task: PolymerFold, seed: int = 1, **kw: object) -> NeuralFieldProtocol:
    """A random chain field (``V_max = 2`` unless given) for ``task``'s channels."""
    args: dict = dict(CHAIN_FIELD, field_hidden=[8], field_max=2.0, field_time_frequencies=2)
    args.update(kw)
    if task.controls.dim > 0:
        args.update(low=list(task.controls.low), high=list(task.controls.high))
    p = NeuralFieldProtocol(dim=task.controls.dim, t_final=task.horizon, hidden=[4], **args)
    _randomize(p.field, seed, scale=0.5)
    return p


def _coil(task: PolymerFold, n: int = 2, seed: int = 0) -> torch.Tensor:
    return task.initial_state(n, seed).R.clone()


def test_field_channel_adds_no_protocol_channel() -> None:
    task = PolymerFold(n_steps=10, controls=["temperature", "field"])
    assert task.controls.names == ("kT",) and task.default_control().tolist() == [0.5]
    alone = PolymerFold(n_steps=10, controls=["field"])
    assert alone.controls.dim == 0 and alone.spatial_dim == 3
    p = _field_protocol(alone)
    alone.check_protocol(p)
    assert alone.max_field(p) == 2.0
    assert PolymerFold(n_steps=10).max_field(p) is None


def test_total_force_is_minus_the_gradient_including_the_field() -> None:
    """Central differences of the whole chain energy (H0 + field) at a random coil."""
    task = PolymerFold(n_steps=10, controls=["field"])
    p = _field_protocol(task)
    potential = OneGraph(task.potential(p))
    R = _coil(task, 1)
    t = 0.3 * task.horizon
    F = potential.energy_and_forces(R, t)[1].detach()
    h = 1e-6
    fd = torch.zeros_like(R)
    with torch.no_grad():
        for idx in range(R.numel()):
            dR = torch.zeros(R.numel(), dtype=R.dtype)
            dR[idx] = h
            dR = dR.reshape(R.shape)
            fd.view(-1)[idx] = -(
                potential.energy(R + dR, t) - potential.energy(R - dR, t)
            ).sum() / (2 * h)
    torch.testing.assert_close(F, fd, **fd_tol().kwargs(10.0))
    # the field is really in there: the force differs from H0's
    F0 = OneGraph(task._h0_fixed + task._h0_attraction).energy_and_forces(R, t)[1].detach()
    assert float((F - F0).abs().max()) > 1e-3


def test_field_is_invariant_under_a_rigid_translation_and_cannot_push_the_chain() -> None:
    task = PolymerFold(n_steps=10, controls=["field"])
    p = _field_protocol(task, seed=3)
    field = task.field_potential(p)
    assert isinstance(field, NeuralField)
    R = _coil(task, 3)
    shift = torch.tensor([[[3.0, -7.5, 12.0]]], dtype=torch.float64)
    t = 0.4 * task.horizon
    V = field.value(R, t).detach()
    assert float(V.abs().max()) > 1e-3
    assert_close(field.value(R + shift, t), V)
    F = field.energy_and_forces(R, t)[1].detach()
    F_shifted = field.energy_and_forces(R + shift, t)[1].detach()
    assert_close(F_shifted, F)
    # V depends on r_i - r_com only: its forces sum to zero on every chain
    torch.testing.assert_close(F.sum(dim=1), torch.zeros_like(F[:, 0]), atol=1e-12, rtol=0)
    assert float(F.abs().max()) > 1e-3


def test_field_is_exactly_zero_in_the_release_window() -> None:
    task = PolymerFold(n_steps=50, controls=["field"])
    p = _field_protocol(task, release_fraction=0.2)
    field = task.field_potential(p)
    assert field is not None
    R = _coil(task, 2)
    T = task.horizon
    for s in (0.8, 0.9, 1.0):
        E, F = (x.detach() for x in field.energy_and_forces(R, s * T))
        assert float(E.abs().max()) == 0.0 and float(F.abs().max()) == 0.0
    assert float(field.energy(R, 0.5 * T).detach().abs().max()) > 1e-3
    # the integrator's total force there is H0's alone, to the bit
    integ = task.integrator(p)
    h0 = task._dynamics(task._h0_fixed + task._h0_attraction, task.kT)
    torch.testing.assert_close(
        integ.potential.energy_and_forces(R, 0.9 * T)[1],
        h0.potential.energy_and_forces(R, 0.9 * T)[1],
        rtol=0,
        atol=0,
    )


def test_field_amplitude_never_exceeds_v_max() -> None:
    task = PolymerFold(n_steps=10, controls=["field"])
    p = _field_protocol(task, field_max=1.5)
    _randomize(p.field, 5, scale=4.0)  # saturate the tanh
    field = task.field_potential(p)
    assert field is not None and task.max_field(p) == 1.5
    R = 4.0 * torch.randn(8, 22, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        V = torch.stack([field.value(R, t) for t in torch.linspace(0.0, task.horizon, 5).tolist()])
    assert float(V.abs().max()) <= 1.5 and float(V.abs().max()) > 1.0


def test_field_cost_is_the_trapezoid_of_the_mean_square_field_force() -> None:
    """22 steps, frames every 5 and the last step: the cost equals a direct trapezoid of
    mean_i |F_i|^2 of the field at those frames; the trajectory is the one without cost."""
    task = PolymerFold(n_steps=22, controls=["temperature", "field"], field_cost_every=5)
    p = _field_protocol(task, seed=7)
    final = task.advance(task.initial_state(3, 4), p, 22, gradient="none")
    traj = simulate(
        task.integrator(p),
        task.initial_state(3, 4),
        22,
        gradient="none",
        record_every=1,
        observables={"R": lambda s: s.R},
    )
    # the same dynamics; not bit for bit: two runs in one process at OMP_NUM_THREADS=2 have
    # differed by 1 ulp (1.1e-16 here, on a CI run; docs/reliability.md)
    torch.testing.assert_close(final.R, traj.final.R, rtol=1e-13, atol=1e-15)
    field = NeuralField(p.field, free(), envelope=p.release_envelope)
    frames = [0, 5, 10, 15, 20, 22]
    rates = []
    for k in frames:
        R = traj.records["R"][k].detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(field.energy(R, float(traj.times[k])).sum(), R)
        rates.append((grad * grad).sum(-1).mean(-1))
    times = [k * task.dt for k in frames]
    expected = sum(
        0.5 * (times[i + 1] - times[i]) * (rates[i] + rates[i + 1]) for i in range(len(frames) - 1)
    )
    assert isinstance(expected, torch.Tensor) and float(expected.min()) > 0
    assert_close(final.aux["field_cost"], expected)


def test_field_cost_weight_adds_the_penalty_to_the_loss() -> None:
    task = PolymerFold(n_steps=12, controls=["field"], field_cost_every=4)
    plain, weighted = _field_protocol(task), _field_protocol(task, field_cost_weight=0.1)
    s0 = task.rollout(plain, 2, seed=1, gradient="none")
    loss0 = task.loss(s0)
    s1 = task.rollout(weighted, 2, seed=1, gradient="none")
    assert_close(task.loss(s1), loss0 + 0.1 * s1.aux["field_cost"].mean())
    with pytest.raises(ControlMDError, match="reversible"):
        task.rollout(plain, 2, seed=1, gradient="reversible")


def test_loss_gradient_matches_central_differences_on_common_random_numbers() -> None:
    """d(loss + field cost penalty)/d theta along a random direction of all protocol
    parameters (temperature MLP and field), 12 steps, 2 replicas, the same seed."""
    task = PolymerFold(n_steps=12, controls=["temperature", "field"], field_cost_every=4)
    p = _field_protocol(
        task, seed=9, field_cost_weight=0.05, release_fraction=0.2, release_value=[0.5]
    )
    _randomize(p, 10, scale=0.3)
    params = [q for q in p.parameters() if q.requires_grad]
    theta = parameters_to_vector(params).detach().clone()
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(12), dtype=theta.dtype)

    def loss_at(point: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            vector_to_parameters(point, params)
        return task.loss(task.rollout(p, 2, seed=3))

    grads = torch.autograd.grad(loss_at(theta), params)
    n_field = sum(q.numel() for q in p.field.parameters())
    assert float(parameters_to_vector(grads)[-n_field:].abs().max()) > 0  # reaches the field
    directional = float(parameters_to_vector(grads) @ v)
    h = 1e-5
    with torch.no_grad():
        fd = float(loss_at(theta + h * v) - loss_at(theta - h * v)) / (2 * h)
        vector_to_parameters(theta, params)
    assert abs(directional) > 1e-4
    assert math.isclose(directional, fd, rel_tol=1e-5)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("controls", "field", "match"),
    [
        (["field"], {"field_dim": 2}, r"field_dim = 2, but the polymer_fold beads move in d = 3"),
        (
            ["field"],
            {"field_features": "fourier"},
            r"field_features = 'fourier': the polymer_fold chain is in free space",
        ),
        (["field"], {"field_com_relative": False}, r"field_com_relative = false"),
        (["field"], {"field_species": 2}, r"field_species = 2, but the polymer_fold beads"),
        (["temperature"], {}, r"a neural_field protocol needs 'field' in the task's controls"),
    ],
)
def test_bad_field_protocols_are_refused_by_key(controls: list, field: dict, match: str) -> None:
    task = PolymerFold(n_steps=10, controls=controls)
    args = dict(CHAIN_FIELD, **field)
    p = NeuralFieldProtocol(dim=task.controls.dim, t_final=task.horizon, low=0.1, high=1.2, **args)
    with pytest.raises(ControlMDError, match=match):
        task.check_protocol(p)


def test_a_field_control_needs_a_field_protocol() -> None:
    task = PolymerFold(n_steps=10, controls=["temperature", "field"])
    with pytest.raises(
        ControlMDError, match="controls include 'field' but the protocol kind is 'mlp'"
    ):
        task.check_protocol(MLPProtocol(dim=1, t_final=task.horizon, low=0.1, high=1.2))
    with pytest.raises(ControlMDError, match="field_cost_every"):
        PolymerFold(controls=["field"], field_cost_every=0)


def _config(**protocol: object) -> dict:
    return {
        "experiment": {"name": "polymer_field_test"},
        "task": {"name": "polymer_fold", "controls": ["field"], "n_steps": 10},
        "protocol": {"kind": "neural_field", **CHAIN_FIELD, **protocol},
        "train": {"iterations": 0},
    }


def test_config_builds_the_chain_field_and_names_bad_keys() -> None:
    from controlmd.config import build_protocol, resolve_config

    cfg = resolve_config(_config(release_fraction=0.1))
    assert cfg["protocol"]["dim"] == 0
    assert isinstance(build_protocol(cfg), NeuralFieldProtocol)
    with pytest.raises(ConfigError, match="field_features = 'fourier'"):
        resolve_config(_config(field_features="fourier"))
    with pytest.raises(ConfigError, match="field_dim = 2"):
        resolve_config(_config(field_dim=2))
    raw = _config()
    raw["task"]["controls"] = ["temperature", "field"]
    raw["protocol"] = {"kind": "mlp"}
    with pytest.raises(ConfigError, match="kind = 'neural_field'"):
        resolve_config(raw)


def test_the_quick_polymer_field_experiment_runs(tmp_path) -> None:
    """experiments/polymer_field_quick.toml (a few seconds): trains, reports the field cost."""
    from controlmd.config import load_config
    from controlmd.experiment import run_experiment

    cfg = load_config(EXPERIMENTS / "polymer_field_quick.toml", ["logging.progress=false"])
    result = run_experiment(cfg, out=tmp_path / "run", progress=False)
    assert result.metrics["field_cost_final"] > 0
    assert (tmp_path / "run" / "protocol.pt").exists()
