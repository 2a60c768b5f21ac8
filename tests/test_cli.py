"""The `controlmd` command: run directories, TensorBoard events, metrics.json, eval,
bad input, and resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from controlmd.callbacks import ABORT_ENV, AbortAfter
from controlmd.cli import main

TINY = """
[experiment]
name = "{name}"
seed = 3

[task]
name = "trap_drag"
n_steps = 10

[protocol]
kind = "chebyshev"
degree = 2
init = [0.0, 5.0]

[train]
lr = 0.05
iterations = 6
replicas = 16
variance_every = 2
grad_groups = 4

[eval]
replicas = 20
every = 3
final_replicas = 100

[logging]
checkpoint_every = 2
histogram_every = 3
progress = false
"""

SCALARS = (
    "train/loss",
    "outcome/metric",
    "train/grad_norm",
    "train/lr",
    "budget/md_steps",
    "time/wall_s",
    "train/grad_var",
    "budget/grad_steps",
)
METRICS_SCHEMA = {
    "task": str,
    "method": str,
    "metric_name": str,
    "higher_is_better": bool,
    "metric_initial": float,
    "metric_final": float,
    "md_steps": int,
    "grad_steps": int,
    "wall_s": float,
    "seed": int,
    "optimum": float,
    "metric_exact_final": float,
}


def _experiment(tmp_path: Path, name: str = "tiny", extra: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(name=name) + extra)
    return path


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(run_dir / "tb"),
        size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0},
    )
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "run"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["run", str(_experiment(tmp)), "--out", str(out), "--quiet"]) == 0
    return out, buffer.getvalue()


def test_run_prints_before_after_folder_and_tensorboard_command(
    finished_run: tuple[Path, str],
) -> None:
    out, stdout = finished_run
    assert "before:" in stdout and "after:" in stdout
    assert f"run folder: {out}" in stdout
    assert f"tensorboard --logdir {out / 'tb'}" in stdout
    for name in (
        "config.toml",
        "metrics.json",
        "protocol.png",
        "protocol.pt",
        "protocol.csv",
        "protocol_initial.pt",
        "checkpoint.pt",
        "progress.jsonl",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp"))  # no temporary files left by the atomic writes


def test_metrics_json_schema(finished_run: tuple[Path, str]) -> None:
    metrics = json.loads((finished_run[0] / "metrics.json").read_text())
    for key, kind in METRICS_SCHEMA.items():
        assert isinstance(metrics[key], kind), (key, metrics.get(key))
    assert metrics["task"] == "trap_drag" and metrics["method"] == "gradient"
    assert metrics["metric_name"] == "mean_work" and metrics["higher_is_better"] is False
    assert metrics["seed"] == 3 and metrics["iterations"] == 6
    assert metrics["optimum"] == pytest.approx(25.0 / 3.0)
    train = 6 * 16 * 10
    assert metrics["grad_steps"] == train
    assert (
        metrics["md_steps"] == train + 3 * 20 * 10 + 2 * 100 * 10
    )  # + evaluations at 0, 3, 6 + before/after
    assert metrics["metric_exact_final"] < metrics["metric_exact_initial"]


def test_tensorboard_events_hold_the_documented_tags(finished_run: tuple[Path, str]) -> None:
    acc = _events(finished_run[0])
    tags = acc.Tags()
    for tag in SCALARS:
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("outcome/metric")] == [0, 3, 6, 6]
    assert {"params/coef", "grads/coef"} <= set(tags["histograms"])
    assert "protocol/u" in tags["images"]
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")


def test_eval_rescores_on_fresh_seeds(
    finished_run: tuple[Path, str], capsys: pytest.CaptureFixture
) -> None:
    out = finished_run[0]
    assert main(["eval", str(out), "--seeds", "2", "--replicas", "50"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert len(summary["seeds"]) == 2 and summary["seeds"][0]["replicas"] == 50
    assert summary["seeds"][0]["mean"] != summary["seeds"][1]["mean"]
    assert "all seeds: mean_work" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.lrr=1", "unknown key 'lrr' in [train]"),
        ("protocol.low=20.0", "bounds need low < high"),
        ("task.t_f=-1", "t_f must be > 0, got -1"),
        ("train.replicas=many", "[train] replicas must be an integer, got 'many'"),
    ],
)
def test_bad_config_is_reported_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, setting: str, message: str
) -> None:
    out = tmp_path / "run"
    assert main(["run", str(_experiment(tmp_path)), "--set", setting, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_resume_refuses_another_experiment_or_changed_settings(
    finished_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = finished_run[0]
    before = sorted(p.name for p in out.iterdir())
    assert main(["run", str(_experiment(tmp_path, name="other")), "--resume", str(out)]) == 2
    assert "belongs to experiment 'tiny', not 'other'" in capsys.readouterr().err
    assert (
        main(["run", str(_experiment(tmp_path)), "--set", "train.lr=0.1", "--resume", str(out)])
        == 2
    )
    assert "--resume accepts no --set except train.iterations" in capsys.readouterr().err
    assert main(["run", str(_experiment(tmp_path)), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_resume_after_a_kill_reaches_the_same_final_numbers(
    finished_run: tuple[Path, str], tmp_path: Path
) -> None:
    whole = finished_run[0]  # the same experiment, uninterrupted
    experiment = _experiment(tmp_path)
    killed = tmp_path / "killed"

    # Same thread count as the uninterrupted in-process run: reductions split differently
    # across threads and the comparison below is bitwise.
    env = {**os.environ, ABORT_ENV: "5", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "controlmd.cli",
            "run",
            str(experiment),
            "--out",
            str(killed),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == AbortAfter.EXIT_CODE, proc.stderr
    assert not (killed / "metrics.json").exists()
    checkpoint = torch.load(killed / "checkpoint.pt", weights_only=False)
    assert checkpoint["trainer"]["iteration"] == 4  # last checkpoint before the kill at 5

    assert main(["run", "--resume", str(killed), "--quiet"]) == 0
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    # Two processes evaluating the same thing occasionally differ in the last 1-2 bits (seen
    # about once in 20 runs, even for the initial protocol's exact metric; cause not found),
    # so floats are compared to 1e-12 relative: a wrong resume (other noise, optimizer
    # state or iteration count) differs by far more. Counts are compared exactly.
    for key in ("md_steps", "grad_steps", "iterations"):
        assert a[key] == b[key], key
    for key in ("metric_initial", "metric_final", "metric_exact_final"):
        assert b[key] == pytest.approx(a[key], rel=1e-12, abs=0.0), key
    p_a = torch.load(whole / "protocol.pt", weights_only=False)["state_dict"]
    p_b = torch.load(killed / "protocol.pt", weights_only=False)["state_dict"]
    for k in p_a:
        torch.testing.assert_close(p_b[k], p_a[k], rtol=1e-12, atol=1e-15)
    losses_a = [(e.step, e.value) for e in _events(whole).Scalars("train/loss")]
    losses_b = [(e.step, e.value) for e in _events(killed).Scalars("train/loss")]
    assert [s for s, _ in losses_b] == [
        s for s, _ in losses_a
    ]  # purged and re-logged, no duplicated steps
    assert [v for _, v in losses_b] == pytest.approx(
        [v for _, v in losses_a], rel=1e-6
    )  # float32 events


def test_resuming_a_finished_run_changes_nothing(
    finished_run: tuple[Path, str], capsys: pytest.CaptureFixture
) -> None:
    out = finished_run[0]
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert "is finished (6 iterations; metrics.json): nothing to do" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert main(["run", "--resume", str(out), "--set", "train.iterations=4"]) == 2
    assert "train.iterations = 4 is fewer than the 6 iterations already done" in (
        capsys.readouterr().err
    )
