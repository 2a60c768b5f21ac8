"""``experiments/polymer_failures.py``: the native helix is folded, its mirror image is a
mirror (all contacts, RMSD >= 1 sigma, mean torsion of the other sign, no torsion flipped by
more than 90 degrees), and a chain torn apart is misfolded."""

from __future__ import annotations

import pytest
import torch
from command_scripts import ROOT, load_script

from controlmd.config import build_task, load_config


def test_native_mirror_and_stretched_chains_are_told_apart() -> None:
    task = build_task(load_config(ROOT / "experiments" / "polymer_torsion.toml"))
    native = task.target.to(torch.float64)
    mirror = native * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    stretched = 3.0 * native
    failures = load_script("experiments/polymer_failures.py")
    rows = failures.classify(task, torch.stack((native, mirror, stretched)))
    assert [r["class"] for r in rows] == ["folded", "mirror", "misfolded"]
    assert rows[0]["q"] == 1.0 and rows[0]["rmsd"] < 1e-6 and rows[0]["flipped"] == 0
    assert rows[1]["q"] == 1.0 and rows[1]["rmsd"] >= task.rmsd_folded
    assert rows[1]["flipped"] == 0  # 2 x 10.2 degrees per torsion: below the threshold
    assert rows[0]["mean_torsion_deg"] == pytest.approx(-rows[1]["mean_torsion_deg"], abs=1e-9)
    assert rows[0]["mean_torsion_deg"] > 0
    summary = failures.summarize(rows)
    assert summary["n"] == 3 and summary["mirror"] == pytest.approx(1 / 3)
    assert summary["mirror_negative_mean_torsion"] == 1
