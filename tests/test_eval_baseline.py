"""``controlmd eval RUN_DIR --baseline SPEC``: paired scoring on common random numbers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from systems import TWO_DISKS

from controlmd.cli import main
from controlmd.config import build_protocol, build_task, resolve_config, write_config
from controlmd.evaluation import evaluate, evaluate_paired
from controlmd.protocols import Tabulated
from controlmd.tasks.base import Task

KEYS = {
    "metric_name",
    "mean",
    "se",
    "baseline_mean",
    "baseline_se",
    "paired_difference",
    "paired_se",
    "n",
    "fluence",
    "field_cost",
    "baseline_fluence",
    "baseline_field_cost",
    "release_fraction",
    "max_field",
}


def _run_folder(path: Path, k: float) -> Path:
    """A tiny finished run: 2 disks that bond, eps and a confinement k switched off by
    the release window (the protocol is written, not trained)."""
    raw = {
        "experiment": {"name": "eval_baseline_test", "seed": 0},
        "task": {**TWO_DISKS, "n_steps": 150, "controls": ["epsilon", "confinement"]},
        "protocol": {
            "kind": "table",
            "times": [0.0, 0.15],
            "values": [[4.0, k], [4.0, k]],
            "release_fraction": 0.2,
        },
        "train": {"iterations": 0},
        "eval": {"final_replicas": 64, "chunk": 64},
    }
    cfg = resolve_config(raw)
    path.mkdir(parents=True)
    write_config(cfg, path / "config.toml")
    build_protocol(cfg).save(path / "protocol.pt")
    return path


def test_paired_eval_writes_every_key_and_pairs_the_replicas(tmp_path: Path) -> None:
    run = _run_folder(tmp_path / "run", k=30.0)
    out = tmp_path / "paired.json"
    argv = ["eval", str(run), "--replicas", "64", "--seed", "7", "--baseline", "constant"]
    assert main([*argv, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert KEYS <= set(r)
    assert r["n"] == 64 and r["release_fraction"] == 0.2
    assert math.isclose(r["paired_difference"], r["mean"] - r["baseline_mean"], abs_tol=1e-12)
    assert r["field_cost"] > 0 and r["baseline_field_cost"] == 0.0
    box = build_task(resolve_config(_config_of(run))).box  # type: ignore[attr-defined]
    assert math.isclose(r["max_field"], 100.0 * box**2 / 4)
    # the same replicas as scoring each protocol alone with that seed
    task = build_task(resolve_config(_config_of(run)))
    from controlmd.protocols import load_protocol

    alone = evaluate(task, load_protocol(run / "protocol.pt"), 64, 7)
    assert alone.mean == r["mean"] and math.isclose(alone.field_cost, r["field_cost"])
    constant = Tabulated(times=[0.0], values=[[6.0, 0.0]], t_final=task.horizon)
    assert evaluate(task, constant, 64, 7).mean == r["baseline_mean"]


def test_a_protocol_against_itself_differs_by_exactly_zero(tmp_path: Path) -> None:
    run = _run_folder(tmp_path / "run", k=30.0)
    out = tmp_path / "self.json"
    assert (
        main(
            [
                "eval",
                str(run),
                "--replicas",
                "32",
                "--seed",
                "123456",
                "--baseline",
                str(run),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert r["paired_difference"] == 0.0 and r["paired_se"] == 0.0
    assert r["baseline_field_cost"] == r["field_cost"]


def _two_disks(n_steps: int) -> Task:
    """A two-disk assembly task (one bond to form), cheap to score many times."""
    cfg = resolve_config(
        {
            "experiment": {"name": "pair"},
            "task": {**TWO_DISKS, "n_steps": n_steps},
            "protocol": {"kind": "table", "times": [0.0], "values": [[3.0]]},
            "train": {"iterations": 0},
        }
    )
    return build_task(cfg)


def test_common_random_numbers_shrink_the_standard_error() -> None:
    """Two nearby protocols on the same replicas: the paired SE is below the unpaired one."""
    task = _two_disks(150)
    a = Tabulated(times=[0.0], values=[[3.0]], t_final=task.horizon)
    b = Tabulated(times=[0.0], values=[[3.3]], t_final=task.horizon)
    r = evaluate_paired(task, a, b, 256, 5)
    assert r.paired_se < 0.8 * math.hypot(r.se, r.baseline_se)
    assert r.field_cost is None and r.baseline_field_cost is None


def test_a_baseline_that_names_nothing_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = _run_folder(tmp_path / "run", k=30.0)
    other = tmp_path / "other.pt"
    Tabulated(times=[0.0], values=[[1.0]], t_final=0.15).save(other)
    cases = [
        (["--baseline", "nowhere.pt"], r"--baseline 'nowhere\.pt' names nothing"),
        (["--baseline", str(other)], r"its protocol has dim = 1"),
        (["--seed", "-1", "--baseline", "constant"], r"--seed must be >= 0, got -1"),
        (["--seeds", "2", "--baseline", "constant"], r"got --seeds 2"),
        (["--fused-steps", "-1"], r"--fused-steps must be >= 0, got -1"),
        (["--fused-steps", "3"], r"fused_steps = 3 runs .*spatial control field"),
    ]
    for extra, message in cases:
        assert main(["eval", str(run), "--replicas", "4", *extra]) != 0
        assert re.search(message, capsys.readouterr().err), message


def _config_of(run: Path) -> dict:
    import tomllib

    return tomllib.loads((run / "config.toml").read_text())


def test_paired_result_does_not_depend_on_the_chunk() -> None:
    task = _two_disks(60)
    a = Tabulated(times=[0.0], values=[[3.0]], t_final=task.horizon)
    b = Tabulated(times=[0.0], values=[[5.0]], t_final=task.horizon)
    whole, parts = evaluate_paired(task, a, b, 40, 9), evaluate_paired(task, a, b, 40, 9, chunk=7)
    assert whole.paired_difference == pytest.approx(parts.paired_difference, abs=1e-12)
    torch.testing.assert_close(torch.tensor(whole.mean), torch.tensor(parts.mean))
