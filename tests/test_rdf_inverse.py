"""rdf_inverse: target files, RDF normalization and smearing, and learning a pair potential
from an RDF by differentiating through Nosé–Hoover trajectories."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from controlmd.dynamics.nose_hoover import NoseHooverChain
from controlmd.errors import ControlMDError
from controlmd.lattice import lattice
from controlmd.observables import rdf, rdf_histogram
from controlmd.potentials.pair import LennardJones
from controlmd.rng import ReplicaRNG
from controlmd.simulate import simulate
from controlmd.space import periodic
from controlmd.tasks.rdf_inverse import (
    RDFInverse,
    load_pair_potential,
    load_rdf_csv,
    rdf_loss,
    save_rdf_csv,
    smear_rdf,
)

# A small LJ liquid (N = 32 at density 0.83 fits a 1.6 sigma cutoff) keeps the learning tests fast.
SMALL = {
    "n_particles": 32,
    "density": 0.83,
    "r_cut": 1.6,
    "r_max": 1.5,
    "n_bins": 60,
    "n_equilibrate": 200,
    "n_burn": 20,
    "n_sample": 40,
    "record_every": 5,
    "eval_steps": 40,
    "target_replicas": 40,
    "target_frames": 4000,
    "target_every": 2,
    "tau": 0.5,
    "final_replicas": 2,
    "final_frames": 20,
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "target.csv"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- CSV targets


def test_csv_round_trip_with_metadata(tmp_path: Path) -> None:
    r = torch.linspace(0.0, 2.0, 11, dtype=torch.float64)
    g = torch.linspace(0.0, 1.5, 11, dtype=torch.float64)
    path = tmp_path / "sub" / "g.csv"
    save_rdf_csv(path, r, g, meta={"density": 0.83, "kT": 1.0})
    target = load_rdf_csv(path)
    torch.testing.assert_close(target.r, r)
    torch.testing.assert_close(target.g, g)
    assert target.meta["density"] == "0.83"
    assert target.smearing_width == 0.0
    assert target.source == str(path)


def test_csv_without_header_and_with_blank_lines(tmp_path: Path) -> None:
    target = load_rdf_csv(_write(tmp_path, "# smearing_width = 0.05\n0.1, 0\n\n0.2,0.5\n0.3,1.0\n"))
    assert target.g.tolist() == [0.0, 0.5, 1.0]
    assert target.smearing_width == 0.05


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "r,g\n0.1,0.0\n0.2,0.5,7\n0.3,1.0\n",
            r"target.csv:3: expected 2 comma-separated columns \(r, g\), got 3",
        ),
        ("r\n0.1\n0.2\n0.3\n", "expected 2 comma-separated columns"),
        ("r,g\n0.1,0.0\n0.3,0.5\n0.2,1.0\n", "r must be strictly increasing, got 0.2 after 0.3"),
        ("r,g\n0.1,0.0\n0.1,0.5\n0.2,1.0\n", "strictly increasing"),
        ("r,g\n0.1,0.0\n0.2,-0.5\n0.3,1.0\n", r"g\(r\) must be >= 0 .*got -0.5"),
        ("r,g\n-0.1,0.0\n0.2,0.5\n0.3,1.0\n", "r must be >= 0"),
        ("r,g\n0.1,0.0\n0.2,nan\n0.3,1.0\n", "must be finite"),
        ("r,g\n0.1,0.0\n0.2,abc\n0.3,1.0\n", "non-numeric data line"),
        ("r,g\n0.1,0.0\n0.2,1.0\n", "at least 3 data rows, got 2"),
        ("# smearing_width = -1\n0.1,0.0\n0.2,1.0\n0.3,1.0\n", "smearing_width must be >= 0"),
    ],
)
def test_csv_loader_rejects_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ControlMDError, match=message):
        load_rdf_csv(_write(tmp_path, text))


def test_csv_loader_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ControlMDError, match="cannot read RDF target file"):
        load_rdf_csv(tmp_path / "nope.csv")


def test_file_targets_are_checked_against_the_task(tmp_path: Path) -> None:
    r = (torch.arange(150, dtype=torch.float64) + 0.5) * 0.01
    g = (r > 0.9).to(torch.float64)
    path = tmp_path / "g.csv"
    save_rdf_csv(path, r, g, meta={"density": 0.3, "kT": 1.0})
    with pytest.raises(
        ControlMDError, match=r"made at density = 0\.3, but the task simulates density = 0\.83"
    ):
        RDFInverse(**{**SMALL, "target": str(path)})
    save_rdf_csv(path, r, g, meta={"smearing_width": 0.02})
    with pytest.raises(ControlMDError, match="already smeared"):
        RDFInverse(**{**SMALL, "target": str(path)})
    save_rdf_csv(path, r[:100], g[:100])
    with pytest.raises(ControlMDError, match="needs g\\(r\\) up to"):
        RDFInverse(**{**SMALL, "target": str(path)})


# --------------------------------------------------------------------------- RDF normalization


def test_ideal_gas_rdf_is_one() -> None:
    # Uniform, independent positions: g = 1 at every r for the smeared and histogram RDFs;
    # the file-target smearing maps g = 1 to exactly 1 as well.
    _, box = lattice("fcc", 108, density=0.83)
    space = periodic(box)
    gen = torch.Generator().manual_seed(3)
    R = torch.rand(200, 108, 3, generator=gen, dtype=torch.float64) * box
    r, g = rdf(R, space, r_max=2.0, n_bins=20, sigma=0.1)
    _, h = rdf_histogram(R, space, r_max=2.0, n_bins=20)
    mean, se = g.mean(0), g.std(0) / math.sqrt(g.shape[0])
    far = r > 0.5  # few pairs at small r: noisy, but the mean is still 1
    assert bool(((mean - 1).abs() < 5 * se + 1e-3)[far].all())
    assert abs(float(h.mean(0)[far].mean()) - 1.0) < 0.01
    fine = torch.linspace(0.005, 2.6, 260, dtype=torch.float64)
    torch.testing.assert_close(
        smear_rdf(fine, torch.ones_like(fine), r, 0.1), torch.ones_like(r), atol=1e-9, rtol=0
    )


def test_rdf_normalization_counts_pairs_and_smearing_is_consistent() -> None:
    # An LJ liquid: (i) the histogram RDF times the ideal-gas pair count of each shell gives
    # back the number of pairs closer than r_max; (ii) smearing the histogram RDF with
    # smear_rdf gives the smeared RDF the engine measures on the same frames.
    R0, box = lattice("fcc", 108, density=0.83)
    space = periodic(box)
    nhc = NoseHooverChain(LennardJones(space, r_cut=2.5), dt=0.005, kT=1.0, space=space, tau=0.5)
    state = nhc.init(R0.expand(4, -1, -1).clone(), rng=ReplicaRNG(5, 4))
    state = simulate(nhc, state, 300, gradient="none").final
    frames = simulate(nhc, state, 200, gradient="none", record_every=20).records["R"][1:]
    R = frames.reshape(-1, 108, 3)
    N, V, r_max = 108, float(box.prod()), 2.4
    r_fine, h_fine = rdf_histogram(R, space, r_max=2.5, n_bins=250)
    edges = torch.arange(251, dtype=torch.float64) * 0.01
    shell = 4.0 / 3.0 * math.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    counted = (h_fine * shell * N * (N - 1) / (2 * V)).sum(-1)
    dR = space.displacement(R[:, :, None], R[:, None, :])
    pairs = ((dR.norm(dim=-1) < 2.5).sum((1, 2)) - N) / 2
    torch.testing.assert_close(counted, pairs.to(counted), atol=1e-9, rtol=0)

    centers, g_smeared = rdf(R, space, r_max=r_max, n_bins=120, sigma=0.02)
    expected = smear_rdf(r_fine, h_fine.mean(0), centers, 0.02)
    err = (expected - g_smeared.mean(0)).abs()
    assert float(err.max()) < 0.03, float(err.max())  # histogram bins 0.01 vs width 0.02
    assert float(g_smeared.mean(0).max()) > 2.5  # a liquid's first peak, so the check has teeth


def test_losses() -> None:
    r = torch.linspace(0.01, 2.4, 50, dtype=torch.float64)
    g = 1 + torch.sin(3 * r) * torch.exp(-r)
    assert float(rdf_loss(g, g)) == 0.0
    assert float(rdf_loss(g, g, kind="js", r=r)) == pytest.approx(0.0, abs=1e-15)
    shifted = 1 + torch.sin(3 * r + 0.3) * torch.exp(-r)
    assert float(rdf_loss(shifted, g)) == pytest.approx(float(((shifted - g) ** 2).mean()))
    js = float(rdf_loss(shifted, g, kind="js", r=r))
    assert 0 < js < math.log(2)
    with pytest.raises(ControlMDError, match="unknown loss 'l1'"):
        rdf_loss(g, g, kind="l1")


# --------------------------------------------------------------------------- the task


def test_task_bad_input() -> None:
    with pytest.raises(ControlMDError, match="unknown potential 'buckingham'"):
        RDFInverse(**SMALL, potential="buckingham")
    with pytest.raises(ControlMDError, match=r"r_cut = 2\.5 exceeds half the shortest box side"):
        RDFInverse(**{**SMALL, "r_cut": 2.5})
    with pytest.raises(ControlMDError, match="target_frames must be >= 4000"):
        RDFInverse(**{**SMALL, "target_frames": 1000})
    with pytest.raises(ControlMDError, match="unknown parameter"):
        RDFInverse(**SMALL, init={"epsilon": 1.0, "rho": 2.0})
    with pytest.raises(ControlMDError, match="learn names"):
        RDFInverse(**SMALL, learn=["delta"])


def test_recovering_sigma_moves_toward_the_truth(tmp_path: Path) -> None:
    # Start at sigma = 0.9 (epsilon fixed at the truth): the RDF gradient through truncated
    # NHC windows points to larger sigma, and a few Adam steps close most of the gap.
    task = RDFInverse(**SMALL, init={"epsilon": 1.0, "sigma": 0.9}, learn=["sigma"], average_last=2)
    assert [n for n, _ in task.named_parameters()] == ["sigma"]
    opt = torch.optim.Adam(task.parameters(), lr=0.02)
    losses = []
    for i in range(7):
        state = task.rollout(None, 4, seed=i, gradient="truncated", window=20)
        loss = task.loss(state)
        opt.zero_grad()
        loss.backward()
        if i == 0:
            assert float(task.pair.sigma.grad) < 0  # d loss / d sigma < 0 below the truth
        opt.step()
        losses.append(float(loss.detach()))
    sigma = float(task.pair.sigma.detach())
    assert abs(sigma - 1.0) < 0.4 * abs(0.9 - 1.0), sigma
    assert min(losses[-2:]) < 0.2 * losses[0], losses
    extras = task.extras()
    averaged = task.scalar_parameters(task.averaged_parameters())["sigma"]
    assert averaged == pytest.approx(sum(h["sigma"] for h in task.history[-2:]) / 2)
    assert extras["sigma"] == pytest.approx(averaged)
    assert extras["epsilon"] == 1.0 and extras["learned"]["iterates"] == 7
    assert [h["md_steps"] for h in task.history] == sorted(h["md_steps"] for h in task.history)
    metric = task.metric(state)
    assert metric.shape == (4,) and bool((metric >= 0).all())
    # the learned potential round-trips through its file, also into a box at another density
    task.finish_run(tmp_path, step=12)
    for name in ("rdf.png", "u_r.png", "loss.png", "rdf.csv", "u_r.csv", "history.json"):
        assert (tmp_path / name).is_file()
    other = periodic(torch.full((3,), 4.0, dtype=torch.float64))
    pair = load_pair_potential(tmp_path / "potential.pt", other)
    assert float(pair.sigma) == pytest.approx(averaged) and pair.space is other


def test_trainer_learns_the_task_potential_with_an_empty_protocol(tmp_path: Path) -> None:
    # The generic hooks: [protocol] kind = "none" for a task without control channels, the
    # trainer optimizes task.parameters(), checkpoints the task's state and calls finish_run.
    from controlmd.config import resolve_config
    from controlmd.protocols import NoControl, make_protocol
    from controlmd.train import run_experiment

    task_cfg = {
        "name": "rdf_inverse",
        **SMALL,
        "init": {"epsilon": 1.0, "sigma": 0.9},
        "learn": ["sigma"],
        "average_last": 2,
    }
    cfg = resolve_config(
        {
            "experiment": {"name": "rdf_hooks", "seed": 3},
            "task": task_cfg,
            "protocol": {"kind": "none"},
            "train": {
                "optimizer": "adam",
                "lr": 0.02,
                "iterations": 3,
                "replicas": 2,
                "gradient": "truncated",
                "window": 20,
                "variance_every": 0,
            },
            "eval": {"replicas": 2, "final_replicas": 2, "chunk": 2},
            "logging": {
                "tensorboard": False,
                "progress": False,
                "checkpoint_every": 0,
                "histogram_every": 0,
            },
        }
    )
    result = run_experiment(cfg, out=tmp_path / "run")
    m = result.metrics
    assert m["protocol_kind"] == "none" and m["protocol_parameters"] == 1
    assert m["learned"]["iterates"] == 3 and m["epsilon"] == 1.0
    assert m["sigma"] > 0.9  # three steps up from 0.9, toward the truth
    assert m["task_md_steps"]["train"] == 3 * 2 * (SMALL["n_burn"] + SMALL["n_sample"])
    for name in ("rdf.png", "u_r.png", "loss.png", "history.json", "potential.pt", "metrics.json"):
        assert (tmp_path / "run" / name).is_file()
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["trainer"]
    assert float(saved["task_parameters"][0]) == pytest.approx(m["learned"]["last"]["sigma"])
    assert len(saved["task_state"]["iterates"]) == 3

    none = make_protocol("none", t_final=1.0)
    assert isinstance(none, NoControl) and none(torch.tensor(0.5)).shape == (0,)
    assert not list(none.parameters())
    with pytest.raises(ControlMDError, match="kind 'none' has no control channels"):
        make_protocol("none", t_final=1.0, dim=2)
