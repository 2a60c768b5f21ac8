"""polymer_fold: exact metric on hand-built chains, H0 physics, control channels, the
surrogate against the metric, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from controlmd.dynamics.base import State
from controlmd.errors import ControlMDError
from controlmd.protocols import PiecewiseConstant, Tabulated
from controlmd.rng import replica_seed
from controlmd.tasks import get_task
from controlmd.tasks.polymer_fold import PairBias, PolymerFold


def _state(R: torch.Tensor) -> State:
    return State(R=R)


def _constant(task: PolymerFold, values: list[float]) -> Tabulated:
    v = torch.tensor([values, values], dtype=torch.float64)
    return Tabulated(times=[0.0, task.horizon], values=v)


@pytest.mark.parametrize("target, n_contacts", [("helix", 42), ("hairpin", 30)])
def test_native_structure_is_folded(target: str, n_contacts: int) -> None:
    task = PolymerFold(target=target, n_steps=10)
    assert task.n_contacts == n_contacts
    R = task.target[None]
    torch.testing.assert_close(task.contact_fraction(R), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(task.metric(_state(R)), torch.ones(1, dtype=torch.float64))


def test_mirror_helix_has_every_contact_but_is_not_folded() -> None:
    task = PolymerFold(n_steps=10)
    R = task.target[None].repeat(2, 1, 1)
    mirror = task.target * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    R[1] = mirror
    q = task.contact_fraction(R)
    torch.testing.assert_close(q, torch.ones(2, dtype=torch.float64))  # mirror keeps every distance
    torch.testing.assert_close(
        task.metric(_state(R)), torch.tensor([1.0, 0.0], dtype=torch.float64)
    )
    obs = task.observe(_state(R))
    assert obs.shape == (2, 3) and float(obs[0, 1]) < 1e-10 and float(obs[1, 1]) > 1.0


def test_unfolded_coils_are_not_folded_and_contact_rule_is_relative() -> None:
    task = PolymerFold(n_steps=10)
    coils = task.initial_state(16, seed=3).R
    assert float(task.metric(_state(coils)).sum()) == 0.0
    assert float(task.contact_fraction(coils).max()) < 0.5
    # Stretching one native pair by 19% keeps it formed, by 21% breaks it (|r - d| < 0.2 d).
    i, j = task.contacts[0].tolist()
    d = float(task.d_native[0])
    R = task.target[None].repeat(2, 1, 1)
    axis = (R[0, j] - R[0, i]) / d
    R[0, j] = R[0, i] + 1.19 * d * axis
    R[1, j] = R[1, i] + 1.21 * d * axis
    c, dn = task.contacts, task.d_native
    r = (R[:, c[:, 0]] - R[:, c[:, 1]]).norm(dim=-1)
    by_hand = ((r - dn).abs() < 0.2 * dn).to(torch.float64)
    assert float(by_hand[0, 0]) == 1.0 and float(by_hand[1, 0]) == 0.0
    torch.testing.assert_close(task.contact_fraction(R), by_hand.mean(-1))


def test_native_structure_is_a_stationary_point_of_h0() -> None:
    for target in ("helix", "hairpin"):
        task = PolymerFold(target=target, n_steps=10)
        H0 = task.potential(_constant(task, [task.kT]))
        _, F = H0.energy_and_forces(task.target[None], torch.zeros((), dtype=torch.float64))
        assert float(F.detach().abs().max()) < 1e-8


def test_initial_states_are_replica_seeded_and_valid() -> None:
    task = PolymerFold(n_steps=10)
    batch = task.initial_state(4, seed=11)
    single = task.initial_state(1, seed=replica_seed(11, 2))
    torch.testing.assert_close(batch.R[2], single.R[0])
    torch.testing.assert_close(batch.P[2], single.P[0])
    bonds = (batch.R[:, 1:] - batch.R[:, :-1]).norm(dim=-1)
    torch.testing.assert_close(bonds, task._b0.expand_as(bonds))
    n = task.n_beads
    i, j = torch.triu_indices(n, n, offset=2)
    assert float((batch.R[:, i] - batch.R[:, j]).norm(dim=-1).min()) > 1.0


def test_coils_keep_native_pairs_out_of_their_morse_walls() -> None:
    """A native pair started well inside its native distance sits on a wall of ~1e3
    epsilon/sigma and blows the chain apart; coils keep those pairs >= 0.85 d*."""
    task = PolymerFold(n_steps=100)
    start = task.initial_state(64, seed=12_345)
    c, d = task.contacts, task.d_native
    r = (start.R[:, c[:, 0]] - start.R[:, c[:, 1]]).norm(dim=-1)
    assert float((r / d).min()) >= 0.85
    final = task.advance(start, _constant(task, [1.2]), task.n_steps, gradient="none")
    extent = (final.R - final.R.mean(1, keepdim=True)).norm(dim=-1).amax(-1)
    bonds = (final.R[:, 1:] - final.R[:, :-1]).norm(dim=-1)
    assert float(extent.max()) < 15.0 and float(bonds.max()) < 1.3


def test_channels_enter_the_hamiltonian() -> None:
    task = PolymerFold(
        controls=["temperature", "epsilon", "tweezers", "bias"], n_bias=3, n_steps=10
    )
    assert task.controls.names == ("kT", "eps_scale", "force_0_21", "bias_0", "bias_1", "bias_2")
    torch.testing.assert_close(
        task.default_control(), torch.tensor([0.5, 1.0, 0, 0, 0, 0], dtype=torch.float64)
    )
    R = task.initial_state(3, seed=0).R
    t = torch.zeros((), dtype=torch.float64)
    base = task.potential(_constant(task, [0.5, 1.0, 0.0, 0.0, 0.0, 0.0])).energy(R, t)
    # epsilon: E(eps=2) - E(eps=1) = attraction energy
    E2 = task.potential(_constant(task, [0.5, 2.0, 0.0, 0.0, 0.0, 0.0])).energy(R, t)
    torch.testing.assert_close(E2 - base, task._h0_attraction.energy(R, t))
    # tweezers: -f (x_21 - x_0)
    Ef = task.potential(_constant(task, [0.5, 1.0, 1.5, 0.0, 0.0, 0.0])).energy(R, t)
    torch.testing.assert_close(Ef - base, -1.5 * (R[:, 21, 0] - R[:, 0, 0]))
    # bias: sum_m u_m sum_{|i-j|>=3} exp(-(r - c_m)^2 / 2 w^2)
    Eb = task.potential(_constant(task, [0.5, 1.0, 0.0, 0.2, 0.0, -0.1])).energy(R, t)
    n = task.n_beads
    i, j = torch.triu_indices(n, n, offset=3)
    r = (R[:, i] - R[:, j]).norm(dim=-1)
    c = task.bias_centers
    g = torch.exp(-0.5 * ((r[..., None] - c) / task.bias_width) ** 2).sum(1)
    torch.testing.assert_close(Eb - base, 0.2 * g[:, 0] - 0.1 * g[:, 2])
    # temperature: the Langevin bath reads the channel
    integ = task.integrator(_constant(task, [0.9, 1.0, 0.0, 0.0, 0.0, 0.0]))
    assert float(integ.kT(t).detach()) == pytest.approx(0.9)


@pytest.mark.parametrize("per_torsion", [False, True])
def test_torsion_channel_biases_toward_the_native_torsions(per_torsion: bool) -> None:
    task = PolymerFold(
        controls=["torsion"], torsion_channels="each" if per_torsion else "one", n_steps=10
    )
    K = task.n_beads - 3
    assert task.controls.dim == (K if per_torsion else 1)
    torch.testing.assert_close(task.default_control(), torch.zeros(task.controls.dim).double())
    R = task.initial_state(3, seed=1).R
    t = torch.zeros((), dtype=torch.float64)
    a = torch.linspace(0.5, 3.0, task.controls.dim, dtype=torch.float64)
    base = task.potential(_constant(task, [0.0] * task.controls.dim)).energy(R, t)
    E = task.potential(_constant(task, a.tolist())).energy(R, t)
    # sum_k a_k [1 - cos(phi_k - phi*_k)], phi from the bead positions
    phi = task.torsion_angles(R)
    expected = ((1.0 - torch.cos(phi - task._phi0)) * a).sum(-1)
    torch.testing.assert_close(E - base, expected)
    # zero at the native structure; the mirror image (phi -> -phi) pays 1 - cos(2 phi*)
    native = task.target[None]
    mirror = native * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    bias = task.potential(_constant(task, a.tolist())).terms[-1]
    torch.testing.assert_close(bias.energy(native, t), torch.zeros(1, dtype=torch.float64))
    flipped = ((1.0 - torch.cos(2 * task._phi0)) * a).sum()
    torch.testing.assert_close(bias.energy(mirror, t)[0], flipped)
    assert float(flipped) > 0


def test_torsion_bias_gradient_matches_finite_differences() -> None:
    task = PolymerFold(controls=["torsion"], n_steps=15, kT=0.5)
    u = PiecewiseConstant(dim=1, t_final=task.horizon, n_pieces=3, low=0.0, high=5.0, init=[2.0])
    final = task.rollout(u, 8, seed=4, gradient="direct")
    task.loss(final).backward()
    grad = u.values.grad.detach().clone()
    h = 1e-5
    for k in range(3):
        losses = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                u.values[k, 0] += sign * h
            losses.append(float(task.loss(task.rollout(u, 8, seed=4, gradient="none"))))
            with torch.no_grad():
                u.values[k, 0] -= sign * h
        fd = (losses[0] - losses[1]) / (2 * h)
        assert grad[k, 0].item() == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_pair_bias_accepts_per_replica_controls() -> None:
    pairs = torch.tensor([[0, 3], [1, 4]])
    bias = PairBias(pairs, torch.tensor([1.0, 2.0], dtype=torch.float64), 0.3)
    R = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = torch.tensor([[0.1, 0.2], [0.3, -0.4]], dtype=torch.float64)
    torch.testing.assert_close(
        bias(R, u), torch.stack([bias(R[:1], u[0])[0], bias(R[1:], u[1])[0]])
    )


def test_loss_gradient_reaches_the_protocol() -> None:
    task = PolymerFold(controls=["temperature", "epsilon"], n_steps=20)
    u = PiecewiseConstant(
        dim=2,
        t_final=task.horizon,
        n_pieces=2,
        low=list(task.controls.low),
        high=list(task.controls.high),
        init=[0.5, 1.0],
    )
    final = task.rollout(u, 4, seed=0, gradient="direct")
    task.loss(final).backward()
    assert u.values.grad is not None and bool(torch.isfinite(u.values.grad).all())
    assert float(u.values.grad.abs().sum()) > 0


def test_surrogate_and_metric_move_together() -> None:
    """Native-like states (relaxed at low T from the native structure), mirror images and
    random coils: the folded fraction falls and the surrogate loss rises in that order."""
    task = PolymerFold(n_steps=150)
    cold = _constant(task, [0.2])
    start = task.initial_state(16, seed=0)
    native = start.replace(R=task.target.expand(16, -1, -1).clone(), aux={})
    mirror = start.replace(
        R=(task.target * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
        .expand(16, -1, -1)
        .clone(),
        aux={},
    )
    groups = {
        name: task.advance(s, cold, task.n_steps, gradient="none")
        for name, s in (("native", native), ("mirror", mirror), ("coil", start))
    }
    metric = {k: float(task.metric(s).mean()) for k, s in groups.items()}
    loss = {k: float(task.loss(s)) for k, s in groups.items()}
    assert metric["native"] > 0.9 and metric["mirror"] < 0.1 and metric["coil"] < 0.1
    assert loss["native"] < loss["mirror"] and loss["native"] < loss["coil"]
    # per replica: every folded replica has a lower loss than every unfolded one
    per = {
        k: torch.stack([task.loss(s.replace(R=s.R[b : b + 1])) for b in range(16)])
        for k, s in groups.items()
    }
    folded_losses = torch.cat([per[k][task.metric(s) > 0] for k, s in groups.items()])
    unfolded_losses = torch.cat([per[k][task.metric(s) == 0] for k, s in groups.items()])
    assert float(folded_losses.max()) < float(unfolded_losses.min())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_beads": 20}, "n_beads"),
        ({"target": "sheet"}, "target"),
        ({"eps_contact": -1.0}, "eps_contact"),
        ({"eps_nonnative": -0.1}, "eps_nonnative"),
        ({"kT_min": 1.0, "kT_max": 0.5}, "kT_min < kT_max"),
        ({"eps_min": 2.0, "eps_max": 2.0}, "eps_min < eps_max"),
        ({"controls": ["pressure"]}, "controls entry"),
        ({"controls": []}, "controls"),
        ({"tweezer_pairs": [[0, 40]], "controls": ["tweezers"]}, "tweezer_pairs"),
        ({"n_bias": 3, "bias_centers": [1.0, 2.0]}, "bias_centers"),
        ({"q_folded": 1.5}, "q_folded"),
        ({"torsion_max": -1.0}, "torsion_max"),
        ({"torsion_channels": "some"}, "torsion_channels"),
    ],
)
def test_bad_input_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ControlMDError, match=field):
        PolymerFold(**kwargs)


def test_protocol_init_that_the_bounds_cannot_meet_is_rejected() -> None:
    """kT bounds [0.1, 1.2]: a piecewise init above kT_max is a config error naming init."""
    from controlmd.config import resolve_config
    from controlmd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"init values span \[0\.5, 1\.5\], outside the bounds"):
        resolve_config(
            {
                "experiment": {"name": "x", "seed": 0},
                "task": {"name": "polymer_fold", "n_steps": 10},
                "protocol": {
                    "kind": "piecewise_constant",
                    "n_pieces": 4,
                    "init": [0.5, 0.5, 0.5, 1.5],
                },
                "train": {"optimizer": "adam", "lr": 0.1, "iterations": 1, "replicas": 2},
            }
        )


def test_registered_and_documented_units() -> None:
    task = get_task("polymer_fold", n_steps=5)
    assert isinstance(task, PolymerFold)
    assert "sigma" in task.units and task.higher_is_better
    assert math.isclose(task.horizon, 0.1)


def test_finish_run_writes_xyz_and_snapshots(tmp_path) -> None:
    task = PolymerFold(n_steps=10)
    u = _constant(task, [0.5])
    task.integrator(u)  # the trainer hands the trained protocol to integrator()
    summary = task.finish_run(tmp_path)
    assert sorted(summary["artifacts"]) == ["final_replicas.xyz", "final_snapshots.png"]
    lines = (tmp_path / "final_replicas.xyz").read_text().splitlines()
    assert len(lines) == 16 * (22 + 2)
    assert lines[0].strip() == "22" and "folded=" in lines[1] and "Q=" in lines[1]
    assert (tmp_path / "final_snapshots.png").stat().st_size > 1000
