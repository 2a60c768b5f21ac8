"""experiments/polymer_torsion_pareto.py: the scan scores held torsion amplitudes with the
fluence controlmd eval reports, and the plot keeps each amplitude once and finds the front
(:func:`controlmd.evaluation.pareto_front`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from command_scripts import load_script

from controlmd.evaluation import pareto_front


def test_held_amplitude_fluence_is_a_squared_times_the_time_it_is_on() -> None:
    script = load_script("experiments/polymer_torsion_pareto.py")
    from controlmd.tasks.polymer_fold import PolymerFold

    task = PolymerFold(target="helix", controls=["torsion"], torsion_max=10.0, n_steps=2000)
    T = task.horizon
    # a^2 on [0, 0.88 T], a^2 (1 + cos(pi x))^2 / 4 across the 0.02 T blend (mean 3/8), then 0
    expected = 25.0 * (0.88 * T + 0.375 * 0.02 * T)
    assert float(script.held(task, 5.0).fluence(n=20001).detach()) == pytest.approx(
        expected, rel=1e-6
    )


def test_front_and_plot(tmp_path: Path) -> None:
    script = load_script("experiments/polymer_torsion_pareto.py")
    points = [
        {"a": 0.0, "mean": 0.5, "fluence": 0.0},
        {"a": 3.0, "mean": 0.8, "fluence": 300.0},
        {"a": 5.0, "mean": 0.87, "fluence": 900.0},
        {"a": 8.0, "mean": 0.8, "fluence": 2000.0},
    ]
    assert [p["a"] for p in pareto_front(points, cost="fluence")] == [0.0, 3.0, 5.0]
    scan_a, scan_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    row = {"n": 4, "se": 0.01}
    scan_a.write_text("\n".join(json.dumps({**row, **p}) for p in points[:3]) + "\n")
    scan_b.write_text(json.dumps({**row, **points[2], "mean": 0.1}) + "\n")  # a = 5 again
    trained = tmp_path / "trained_seed0.json"
    trained.write_text(json.dumps({"mean": 0.75, "se": 0.01, "n": 4, "fluence": 1200.0}))
    result = script.plot([scan_a, scan_b], [trained], tmp_path / "out" / "pareto")
    assert [r["a"] for r in result["handmade"]] == [0.0, 3.0, 5.0]
    assert result["handmade"][-1]["mean"] == 0.87  # the first file's a = 5 row is kept
    assert result["trained"][0]["label"] == "trained_seed0"
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0


def test_scan_pairs_every_amplitude_with_the_first(capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script("experiments/polymer_torsion_pareto.py")
    rows = script.scan([5.0, 5.0], n=2, seed=3, n_steps=20)
    assert rows[0]["mean"] == rows[1]["mean"] and rows[1]["paired_vs_first"] == 0.0
    assert rows[0]["fluence"] > 0 and len(capsys.readouterr().out.splitlines()) == 2
