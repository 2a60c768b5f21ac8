"""Sweeps and the job runner: Ray and in-process placement give the same results, a killed
sweep resumes without redoing finished jobs, bad grids and Ray addresses fail before anything
is written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from controlmd.errors import ConfigError, ControlMDError
from controlmd.sweep import Job, parse_grid, ray_available, run_jobs, run_sweep, run_sweep_job

needs_ray = pytest.mark.skipif(
    not ray_available(),
    reason="ray is not installed (pip install 'controlmd[dist]'); CI installs it",
)

# Trap dragging with a 3-coefficient protocol: each job trains in well under a second.
TINY = """
[experiment]
name = "tiny_sweep"
seed = 3

[task]
name = "trap_drag"
n_steps = 10

[protocol]
kind = "chebyshev"
degree = 2
init = [0.0, 5.0]

[train]
optimizer = "adam"
lr = 0.05
iterations = 3
replicas = 8
variance_every = 0

[eval]
replicas = 16
final_replicas = 64

[logging]
tensorboard = false
plots = false
checkpoint_every = 1
histogram_every = 0
progress = false
"""


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def _metrics(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


def test_parse_grid_values() -> None:
    grid = parse_grid(
        [
            "train.lr=0.01, 0.1",
            "train.optimizer=adam,sgd",
            "protocol.hidden=[8, 8],[16]",
            "logging.plots=true,false",
        ]
    )
    assert grid == {
        "train.lr": [0.01, 0.1],
        "train.optimizer": ["adam", "sgd"],
        "protocol.hidden": [[8, 8], [16]],
        "logging.plots": [True, False],
    }
    for bad, match in [
        ("train.lr", "section.key=v1"),
        ("lr=0.1", "section.key=v1"),
        ("experiment.seed=1,2", "--seeds"),
        ("train.lr=0.1,0.1", "repeats"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_grid([bad])


def test_run_jobs_local_reports_failures_and_goes_on() -> None:
    results = run_jobs(
        [Job("ok", math.sqrt, (4.0,)), Job("bad", math.sqrt, (-1.0,)), Job("ok2", abs, (-2,))],
        backend="local",
    )
    assert [(r.name, r.ok, r.value) for r in results] == [
        ("ok", True, 2.0),
        ("bad", False, None),
        ("ok2", True, 2),
    ]
    assert "math domain error" in results[1].error
    with pytest.raises(ControlMDError, match="unique"):
        run_jobs([Job("a", abs, (1,)), Job("a", abs, (2,))], backend="local")


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        ("train.lrr=0.01,0.1", r"--grid train\.lrr: unknown key 'lrr' in \[train\]"),
        (
            "task.lambda_final=1,2",
            r"--grid task\.lambda_final: unknown key 'lambda_final' in \[task\]",
        ),
        ("trian.lr=0.1", r"--grid trian\.lr: unknown section \[trian\]"),
        ("train.lr=0.1,-1", r"--grid setting train\.lr=-1 .*must be > 0"),
    ],
)
def test_bad_grid_is_named_and_nothing_is_written(
    experiment: Path, tmp_path: Path, grid: str, match: str
) -> None:
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match=match):
        run_sweep(experiment, [grid], out=out, backend="local", echo=None)
    assert not out.exists()


def test_killed_sweep_resumes_only_the_unfinished_job(experiment: Path, tmp_path: Path) -> None:
    # Bit-exact resume needs the same intra-op thread count in the killed subprocess and here
    # (reductions are summed in a thread-count-dependent order).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _killed_sweep_resumes(experiment, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _killed_sweep_resumes(experiment: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    # Job 000 trains 2 iterations and finishes; job 001 (4 iterations) is hard-killed after its
    # 3rd iteration, leaving a checkpoint but no metrics.json (and no summary: the process died).
    env = {**os.environ, "CONTROLMD_ABORT_AFTER": "3", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "controlmd",
        "sweep",
        str(experiment),
        "--grid",
        "train.iterations=2,4",
        "--out",
        str(out),
        "--local",
    ]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 75, killed.stderr
    first, second = (
        out / "jobs" / "000_train.iterations=2_seed3",
        out / "jobs" / "001_train.iterations=4_seed3",
    )
    assert (first / "metrics.json").is_file()
    assert (second / "checkpoint.pt").is_file() and not (second / "metrics.json").exists()
    assert not (out / "summary.json").exists()
    before = (first / "metrics.json").stat().st_mtime_ns, (first / "metrics.json").read_bytes()

    lines: list[str] = []
    result = run_sweep(resume=out, backend="local", echo=lines.append)
    assert "2 jobs, 1 done, 1 to run" in lines[0]
    assert (
        (first / "metrics.json").stat().st_mtime_ns,
        (first / "metrics.json").read_bytes(),
    ) == before
    assert result.failed == []
    assert result.summary["jobs_done"] == 2
    assert json.loads((out / "summary.json").read_text()) == result.summary
    resumed = _metrics(second)
    assert resumed["iterations"] == 4

    # The resumed job ends exactly where an uninterrupted run of its config ends.
    from controlmd.config import read_run_config

    clean = run_sweep_job(read_run_config(second), str(tmp_path / "clean"))
    # floats to 1e-12 relative: two processes occasionally differ in the last 1-2 bits (see
    # tests/test_cli.py::test_resume_after_a_kill_reaches_the_same_final_numbers)
    for key in ("md_steps", "grad_steps"):
        assert resumed[key] == clean[key], key
    for key in ("metric_final", "metric_initial"):
        assert resumed[key] == pytest.approx(clean[key], rel=1e-12, abs=0.0), key
    with pytest.raises(ConfigError, match="differ from the sweep's plan"):
        run_sweep(experiment, ["train.iterations=2,5"], resume=out, backend="local", echo=None)


@needs_ray
def test_unreachable_ray_address_writes_nothing(experiment: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    with pytest.raises(ControlMDError, match=r"cannot reach the Ray cluster at '127\.0\.0\.1:1'"):
        run_sweep(experiment, ["train.lr=0.01"], out=out, address="127.0.0.1:1", echo=None)
    assert not out.exists()


@needs_ray
def test_two_jobs_on_local_ray_match_in_process_runs(experiment: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = run_sweep(
        experiment, ["train.lr=0.01,0.05"], out=out, num_cpus=2, cpus_per_job=1, echo=None
    )
    assert result.failed == [] and result.summary["jobs_done"] == 2
    assert [s["setting"] for s in result.summary["settings"]] == [
        {"train.lr": 0.01},
        {"train.lr": 0.05},
    ]
    from controlmd.config import read_run_config

    for job in result.summary["jobs"]:
        job_dir = out / job["run_dir"]
        cfg = read_run_config(job_dir)
        assert cfg["train"]["lr"] == job["setting"]["train.lr"] and cfg["experiment"]["seed"] == 3
        here = run_sweep_job(cfg, str(tmp_path / f"here_{job['name']}"))
        assert _metrics(job_dir)["metric_final"] == here["metric_final"] == job["metric_final"]
