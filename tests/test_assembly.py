"""assembly: exact yield on hand-built configurations, channels, the surrogate against the
yield, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from systems import TWO_DISKS
from tolerances import assert_close

from controlmd.dynamics.base import State
from controlmd.errors import ControlMDError
from controlmd.protocols import PiecewiseConstant, Tabulated
from controlmd.rng import replica_seed
from controlmd.structures import hexagonal_cluster
from controlmd.tasks import get_task
from controlmd.tasks.assembly import Assembly


def _constant(task: Assembly, values: list[float]) -> Tabulated:
    return Tabulated(
        times=[0.0, task.horizon], values=torch.tensor([values, values], dtype=torch.float64)
    )


def _chain() -> torch.Tensor:
    """An open 7-chain along the box diagonal (so its ends stay apart across the boundary)."""
    k = torch.arange(7, dtype=torch.float64) / math.sqrt(2.0)
    return torch.stack([k, k], -1)


def _two_rows() -> torch.Tensor:
    h = math.sqrt(3) / 2
    return torch.tensor(
        [(0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (0.5, h), (1.5, h), (2.5, h)],
        dtype=torch.float64,
    )


def test_exact_yield_on_hand_built_clusters() -> None:
    task = Assembly(n_steps=10)
    centre = torch.tensor([3.0, 3.0], dtype=torch.float64)
    R = (
        torch.stack([hexagonal_cluster(), _chain(), _two_rows(), hexagonal_cluster() * 1.3])
        + centre
    )
    R = R % task.box
    torch.testing.assert_close(
        task.metric(State(R=R)), torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    )
    obs = task.observe(State(R=R))
    torch.testing.assert_close(
        obs[:, 0], torch.tensor([1.0, 0.5, 11 / 12, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(obs[:, 1], torch.tensor([1.0, 1.0, 1.0, 1 / 7], dtype=torch.float64))


def test_heptamer_split_by_the_box_edge_still_counts() -> None:
    task = Assembly(n_steps=10)
    R = (hexagonal_cluster() + torch.tensor([0.1, task.box - 0.1], dtype=torch.float64)) % task.box
    assert float(task.metric(State(R=R[None]))[0]) == 1.0


def test_initial_gas_is_dilute_valid_and_replica_seeded() -> None:
    task = Assembly(n_steps=10)
    assert task.box == pytest.approx(math.sqrt(7 * math.pi / 4 / 0.15))
    batch = task.initial_state(6, seed=4)
    single = task.initial_state(1, seed=replica_seed(4, 5))
    torch.testing.assert_close(batch.R[5], single.R[0])
    R = batch.R
    assert bool(((R >= 0) & (R < task.box)).all())
    i, j = torch.triu_indices(7, 7, offset=1)
    d = task.space.displacement(R[:, i], R[:, j]).norm(dim=-1)
    assert float(d.min()) >= 1.05


def test_channels_scale_the_attraction_and_the_bath() -> None:
    task = Assembly(controls=["epsilon", "temperature"], n_steps=10)
    assert task.controls.names == ("eps", "kT")
    torch.testing.assert_close(
        task.default_control(), torch.tensor([6.0, 1.0], dtype=torch.float64)
    )
    R = (hexagonal_cluster() + 3.0)[None]
    t = torch.zeros((), dtype=torch.float64)
    E4 = task.potential(_constant(task, [4.0, 1.0])).energy(R, t)
    E8 = task.potential(_constant(task, [8.0, 1.0])).energy(R, t)
    torch.testing.assert_close(E8, 2 * E4)
    i, j = torch.triu_indices(7, 7, offset=1)
    r = (R[0, i] - R[0, j]).norm(dim=-1)
    e = torch.exp(-6.0 * (r - 1.0))
    by_hand = 4.0 * torch.where(r < 2.5, e * e - 2 * e, torch.zeros_like(r)).sum()
    torch.testing.assert_close(E4[0], by_hand)
    assert float(E4[0].detach()) < -48.0  # 12 bonds of depth 4 plus the tail
    integ = task.integrator(_constant(task, [4.0, 1.7]))
    assert float(integ.kT(t).detach()) == pytest.approx(1.7)


def test_strong_attraction_keeps_a_heptamer_and_weak_attraction_dissolves_it() -> None:
    task = Assembly(n_steps=1500)
    hexagon = ((hexagonal_cluster() + 3.0) % task.box).expand(32, -1, -1).clone()
    start = task.initial_state(32, seed=1).replace(R=hexagon)
    strong = task.advance(start, _constant(task, [9.0]), task.n_steps, gradient="none")
    weak = task.advance(start, _constant(task, [1.0]), task.n_steps, gradient="none")
    assert float(task.metric(strong).mean()) > 0.9
    assert float(task.metric(weak).mean()) < 0.1


def test_surrogate_tracks_the_yield_on_sampled_states() -> None:
    task = Assembly(n_steps=1500)
    gas = task.initial_state(48, seed=2)
    hexagon = ((hexagonal_cluster() + 3.0) % task.box).expand(16, -1, -1).clone()
    states = [
        task.advance(gas, _constant(task, [7.0]), task.n_steps, gradient="none"),
        task.advance(
            task.initial_state(16, seed=9).replace(R=hexagon),
            _constant(task, [7.0]),
            task.n_steps,
            gradient="none",
        ),
    ]
    R = torch.cat([s.R for s in states])
    y = task.metric(State(R=R))
    per_replica = torch.stack([task.loss(State(R=R[b : b + 1])) for b in range(R.shape[0])])
    assert 0 < float(y.mean()) < 1
    # every heptamer has (almost) all 12 bonds; any other 7 disks have at most 11
    assert float(per_replica[y == 1].mean()) < float(per_replica[y == 0].mean())
    assert float(per_replica[y == 1].max()) < 1.5 / 12


def test_gather_surrogate_is_the_mean_square_pair_distance_in_units_of_a_gas() -> None:
    task = Assembly(surrogate="gather")
    L = task.box
    # 7 disks on a line 0.5 sigma apart across the periodic boundary: distances |i - j| / 2
    x = (torch.arange(7, dtype=torch.float64) * 0.5 - 1.0) % L
    R = torch.stack([x, torch.full_like(x, 2.0)], dim=-1).unsqueeze(0)
    r2 = [((j - i) * 0.5) ** 2 for i in range(7) for j in range(i + 1, 7)]
    expected = sum(r2) / len(r2) / (L**2 / 6)
    assert_close(task.loss(State(R=R)), torch.tensor(expected, dtype=torch.float64))
    # a dilute gas sits near 1 (uniform points: <r^2> = L^2 / 6, minimum image)
    gas = float(task.loss(task.initial_state(2000, seed=3)))
    hexagon = ((hexagonal_cluster() + 3.0) % L).unsqueeze(0)
    assert 0.95 < gas < 1.15
    # the hexagon's 21 pairs: 12 at 1, 6 at sqrt(3), 3 at 2 sigma: <r^2> = 42 / 21 = 2
    assert_close(task.loss(State(R=hexagon)), torch.tensor(2.0 / (L**2 / 6), dtype=torch.float64))


def test_loss_gradient_reaches_the_protocol() -> None:
    task = Assembly(controls=["epsilon", "temperature"], n_steps=40)
    u = PiecewiseConstant(
        dim=2,
        t_final=task.horizon,
        n_pieces=2,
        low=list(task.controls.low),
        high=list(task.controls.high),
        init=[6.0, 1.0],
    )
    final = task.rollout(u, 8, seed=0, gradient="direct")
    task.loss(final).backward()
    assert u.values.grad is not None and bool(torch.isfinite(u.values.grad).all())
    assert float(u.values.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"cluster_size": 8}, "cluster_size"),
        ({"target_bonds": 30}, "target_bonds"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"eps_min": 5.0, "eps_max": 4.0}, "eps_min < eps_max"),
        ({"kT_min": 0.0}, "kT_min"),
        ({"area_fraction": 0.6}, "area_fraction"),
        ({"r_cut": 3.5}, "r_cut"),
        ({"bond_cutoff": 2.0}, "bond_cutoff"),
        ({"controls": ["pressure"]}, "controls entry"),
        ({"surrogate": "energy"}, "surrogate"),
    ],
)
def test_bad_input_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ControlMDError, match=field):
        Assembly(**kwargs)


@pytest.mark.parametrize(
    "kind, init", [("piecewise_constant", 12.0), ("piecewise_constant", 2.0), ("mlp", 1.0)]
)
def test_protocol_init_that_the_bounds_cannot_meet_is_rejected(kind: str, init: float) -> None:
    """eps bounds [2, 10]: an init outside or on a bound (where tanh squashing would stick
    with zero gradient) is a config error naming init and the bounds."""
    from controlmd.config import resolve_config
    from controlmd.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"init values span .* outside the bounds \[\[2\.0\], \[10\.0\]\]"
    ):
        resolve_config(
            {
                "experiment": {"name": "x", "seed": 0},
                "task": {"name": "assembly", "n_steps": 10},
                "protocol": {
                    "kind": kind,
                    "init": init,
                    **({"n_pieces": 3} if kind != "mlp" else {}),
                },
                "train": {"optimizer": "adam", "lr": 0.1, "iterations": 1, "replicas": 2},
            }
        )


def test_registered() -> None:
    task = get_task("assembly", n_steps=5)
    assert isinstance(task, Assembly) and task.higher_is_better and "sigma" in task.units


def test_a_quick_training_run_improves_the_exact_metric(tmp_path) -> None:
    """Dimers (2 disks, target: 1 bond) from a too-weak attraction: a few gradient steps on
    the smooth bond count raise epsilon and the exact yield measured on fresh replicas."""
    from controlmd.config import resolve_config
    from controlmd.train import run_experiment

    raw = {
        "experiment": {"name": "assembly_dimer_test", "seed": 0},
        "task": {**TWO_DISKS, "n_steps": 300, "eps_min": 0.5},
        "protocol": {"kind": "piecewise_constant", "n_pieces": 2, "init": 1.0},
        "train": {
            "optimizer": "adam",
            "lr": 0.5,
            "iterations": 4,
            "replicas": 32,
            "gradient": "direct",
            "variance_every": 0,
        },
        "eval": {"replicas": 32, "every": 0, "final_replicas": 256, "chunk": 256},
        "logging": {
            "tensorboard": False,
            "plots": False,
            "checkpoint_every": 0,
            "histogram_every": 0,
            "progress": False,
        },
    }
    result = run_experiment(resolve_config(raw), out=tmp_path / "run", progress=False)
    m = result.metrics
    assert m["metric_final"] > m["metric_initial"] + 3 * math.hypot(
        m["metric_final_se"], m["metric_initial_se"]
    )


def test_finish_run_writes_xyz_with_the_box_and_snapshots(tmp_path) -> None:
    task = Assembly(n_steps=10)
    task.integrator(_constant(task, [6.0]))
    summary = task.finish_run(tmp_path)
    assert sorted(summary["artifacts"]) == ["final_replicas.xyz", "final_snapshots.png"]
    lines = (tmp_path / "final_replicas.xyz").read_text().splitlines()
    assert len(lines) == 16 * (7 + 2)
    assert "Lattice=" in lines[1] and 'pbc="T T' in lines[1] and "coordination" in lines[1]
