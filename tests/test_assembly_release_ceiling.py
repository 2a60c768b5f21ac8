"""experiments/assembly_release_ceiling.py: the perfect hexagon it starts from is the compact
heptamer at the Morse minimum, and the run writes the survival curve it reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from command_scripts import load_script

from controlmd.tasks.assembly import Assembly


def test_perfect_hexagon_is_a_compact_heptamer_at_the_morse_minimum() -> None:
    script = load_script("experiments/assembly_release_ceiling.py")
    task = Assembly()
    state = script.perfect_hexagon(task, task.initial_state(3, seed=0))
    assert task.metric(state).tolist() == [1.0, 1.0, 1.0]
    # 12 contacts at r = sigma (-eps each) plus the tail inside r_cut = 2.5: six ring pairs
    # at sqrt(3) and three across the ring at 2, Morse eps [(1 - exp(-alpha (r - 1)))^2 - 1].
    eps, alpha = task.epsilon, 6.0
    morse = lambda r: eps * ((1 - math.exp(-alpha * (r - 1.0))) ** 2 - 1)  # noqa: E731
    expected = 12 * morse(1.0) + 6 * morse(math.sqrt(3.0)) + 3 * morse(2.0)
    energy = task.potential(None).energy(state.R, 0.0)
    torch.testing.assert_close(energy, torch.full_like(energy, expected), rtol=1e-9, atol=1e-9)
    # The centre disk feels no net force, by symmetry.
    forces = -torch.func.grad(lambda R: task.potential(None).energy(R, 0.0).sum())(state.R)
    assert forces[:, 0].abs().max() < 1e-10


def test_run_writes_the_survival_curve_and_the_handmade_marks(tmp_path: Path) -> None:
    script = load_script("experiments/assembly_release_ceiling.py")
    out = tmp_path / "ceiling.json"
    script.main(
        ["--replicas", "4", "--seed", "1", "--n-steps", "200", "--every", "10",
         "--handmade", "30", "--json", str(out), "--png", str(tmp_path / "c.png")]
    )  # fmt: skip
    record = json.loads(out.read_text())
    assert record["window_steps"] == 20
    assert [r["steps"] for r in record["perfect_hexagon"]] == [0, 10, 20, 30, 40]
    assert record["perfect_hexagon"][0]["yield"] == 1.0
    assert record["ceiling"]["steps"] == 20
    (handmade,) = record["handmade"]
    assert handmade["k"] == 30.0 and 0.0 <= handmade["kept"] <= 1.0
    assert (tmp_path / "c.png").stat().st_size > 0
