"""Iterative Boltzmann inversion: the update rule against its dilute-gas limit."""

from __future__ import annotations

import pytest
import torch

from controlmd.errors import ControlMDError
from controlmd.ibi import ibi_initial_potential, ibi_update


def _lj(r: torch.Tensor, epsilon: float = 1.0, sigma: float = 1.0) -> torch.Tensor:
    s6 = (sigma / r) ** 6
    return 4 * epsilon * (s6 * s6 - s6)


def _grid() -> torch.Tensor:
    return torch.linspace(0.5, 2.5, 201, dtype=torch.float64)


def test_initial_potential_is_exact_in_the_dilute_limit() -> None:
    # At vanishing density g(r) = exp(-u(r)/kT): the potential of mean force is u itself.
    r, kT = _grid(), 1.5
    u_true = _lj(r) - _lj(r[-1:])
    g = torch.exp(-u_true / kT)
    u0 = ibi_initial_potential(r, g, kT=kT, g_floor=1e-3)
    sampled = g > 1e-3
    torch.testing.assert_close(u0[sampled], u_true[sampled], atol=1e-12, rtol=0)
    assert u0[-1] == 0
    # the core continuation is repulsive: u grows monotonically towards r -> 0
    core = ~sampled
    assert bool(core[:10].all())
    assert bool((u0[core].diff() < 0).all())


def test_one_full_step_reaches_the_dilute_solution() -> None:
    # With g_n = exp(-u_n/kT) (dilute gas), alpha = 1 and no smoothing, one step lands on
    # u = -kT ln g* wherever both RDFs are sampled.
    r, kT = _grid(), 1.0
    u_true = _lj(r, 1.0, 1.0) - _lj(r[-1:], 1.0, 1.0)
    g_target = torch.exp(-u_true / kT)
    u_n = _lj(r, 1.3, 0.9) - _lj(r[-1:], 1.3, 0.9)
    g_n = torch.exp(-u_n / kT)
    u_next = ibi_update(r, u_n, g_n, g_target, kT=kT, alpha=1.0, smooth=0)
    both = (g_n > 1e-3) & (g_target > 1e-3)
    torch.testing.assert_close(u_next[both], u_true[both], atol=1e-10, rtol=0)


def test_fixed_point_and_direction() -> None:
    r, kT = _grid(), 1.0
    g_target = 1 + 0.3 * torch.sin(4 * r) * (r > 0.9)
    g_target = torch.where(r < 0.9, torch.zeros_like(r), g_target)
    u = ibi_initial_potential(r, g_target, kT=kT)
    torch.testing.assert_close(ibi_update(r, u, g_target, g_target, kT=kT), u)
    # too much structure at r ~ 1.5 -> the potential rises there, relative to the cutoff
    bump = 0.2 * torch.exp(-(((r - 1.5) / 0.1) ** 2))
    u_next = ibi_update(r, u, g_target + bump, g_target, kT=kT, alpha=0.5)
    i = int(torch.argmin((r - 1.5).abs()))
    assert float(u_next[i] - u[i]) > 0.05
    assert u_next[-1] == 0


def test_bad_input() -> None:
    r = _grid()
    g = torch.ones_like(r)
    with pytest.raises(ControlMDError, match="alpha must be in"):
        ibi_update(r, torch.zeros_like(r), g, g, kT=1.0, alpha=1.5)
    with pytest.raises(ControlMDError, match="kT must be > 0"):
        ibi_initial_potential(r, g, kT=0.0)
    with pytest.raises(ControlMDError, match="grid's shape"):
        ibi_update(r, torch.zeros(3, dtype=r.dtype), g, g, kT=1.0)
    with pytest.raises(ControlMDError, match="at least two knots"):
        ibi_initial_potential(r, torch.zeros_like(r), kT=1.0)


def test_ibi_experiment_on_the_engine(tmp_path) -> None:
    # IBI rounds on the rdf_inverse engine: every MD step counted, one history entry per
    # round, a finite table that vanishes at the cutoff, the run folder written. (How well
    # IBI converges is measured by experiments/rdf_ibi.toml; this system is too small.)
    from controlmd.ibi import load_ibi_config, run_ibi_experiment
    from controlmd.space import periodic
    from controlmd.tasks.rdf_inverse import RDFInverse, load_pair_potential

    text = """
[experiment]
name = "ibi_test"
seed = 1
[task]
name = "rdf_inverse"
n_particles = 32
density = 0.83
r_cut = 1.6
r_max = 1.5
n_bins = 60
n_equilibrate = 200
n_burn = 20
n_sample = 60
record_every = 5
eval_steps = 40
target_replicas = 40
target_every = 2
final_replicas = 2
final_frames = 20
average_last = 2
[ibi]
iterations = 5
replicas = 4
alpha = 0.7
bin_width = 0.04
[eval]
final_replicas = 2
[logging]
tensorboard = false
"""
    path = tmp_path / "ibi.toml"
    path.write_text(text, encoding="utf-8")
    cfg = load_ibi_config(path)
    run_dir, m = run_ibi_experiment(cfg, out=tmp_path / "run")
    assert (
        m["method"] == "ibi" and m["iterations"] == 5 and m["learned"]["potential"] == "tabulated"
    )
    assert len(m["rdf_mse_last_iterations"]) == 2  # average_last
    assert m["md_steps"] == 4 * 200 + 5 * 4 * 80  # equilibration + 5 rounds of (burn + sample)
    assert m["metric_final"] >= 0 and m["final_evaluation"]["rdf_mse"] >= 0
    table = load_pair_potential(
        run_dir / "potential.pt", periodic(torch.full((3,), 4.0, dtype=torch.float64))
    )
    r = torch.linspace(0.5, 1.6, 50, dtype=torch.float64)
    u = RDFInverse.pair_energy(table, r)
    assert bool(torch.isfinite(u).all()) and abs(float(u[-1])) < 1e-12
    assert float(u[0]) > 5.0  # repulsive core
    for name in (
        "rdf.png",
        "u_r.png",
        "history.json",
        "potential.pt",
        "config.toml",
        "metrics.json",
    ):
        assert (run_dir / name).is_file()
    with pytest.raises(ControlMDError, match=r"unknown key 'alhpa' in \[ibi\]"):
        path.write_text(text.replace("alpha = 0.7", "alhpa = 0.7"), encoding="utf-8")
        load_ibi_config(path)


def test_compare_runs_reads_histories(tmp_path) -> None:
    import json

    from controlmd.ibi import compare_runs

    for name, errs in (("a", [1.0, 0.5, 0.1, 0.12, 0.1]), ("b", [1.0, 0.9, 0.8, 0.3, 0.2])):
        d = tmp_path / name
        d.mkdir()
        history = [{"md_steps": 100 * (i + 1), "rdf_mse": e} for i, e in enumerate(errs)]
        (d / "history.json").write_text(json.dumps(history))
        (d / "metrics.json").write_text(
            json.dumps(
                {
                    "method": name,
                    "experiment": name,
                    "wall_s": 1.0,
                    "final_evaluation": {"rdf_mse": 0.1},
                }
            )
        )
    rows = compare_runs(
        [tmp_path / "a", tmp_path / "b"], levels=(0.5, 0.15), window=1, png=tmp_path / "cmp.png"
    )
    assert rows[0]["md_steps_to_0.5"] == 200 and rows[0]["md_steps_to_0.15"] == 300
    assert rows[1]["md_steps_to_0.5"] == 400 and rows[1]["md_steps_to_0.15"] is None
    assert rows[1]["final_rdf_mse"] == 0.1 and rows[1]["smoothed_rdf_mse_end"] == 0.2
    smoothed = compare_runs([tmp_path / "a"], levels=(0.25,), window=3)[0]
    assert smoothed["md_steps_to_0.25"] == 400  # running mean of (0.5, 0.1, 0.12) is 0.24
    assert (tmp_path / "cmp.png").is_file()
