"""experiments/cmaes_search.py: the search writes a run folder that rebuilds its incumbent."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from command_scripts import ROOT, load_script

from controlmd.config import build_protocol, build_task, read_run_config
from controlmd.protocols import load_protocol


def test_search_writes_a_run_folder_that_rebuilds_its_incumbent(tmp_path: Path) -> None:
    script = load_script("experiments/cmaes_search.py")
    out = tmp_path / "search"
    script.main(
        [
            str(ROOT / "experiments/polymer_handmade_hairpin.toml"),
            "--generations", "2", "--popsize", "3", "--replicas", "2", "--n-pieces", "2",
            "--set", "task.n_steps=20", "--out", str(out),
        ]
    )  # fmt: skip
    record = json.loads((out / "search.json").read_text())
    assert [row["generation"] for row in record["history"]] == [1, 2]
    assert record["history"][-1]["md_steps"] == 2 * 3 * 2 * 20
    incumbent = torch.tensor(record["history"][-1]["incumbent"], dtype=torch.float64)
    assert incumbent.shape == (2, 19) and 0 < incumbent.min() and incumbent.max() < 20

    cfg = read_run_config(out)
    assert cfg["train"]["iterations"] == 0 and cfg["protocol"]["release_fraction"] == 0.1
    rebuilt = build_protocol(cfg, build_task(cfg))
    saved = load_protocol(out)
    T = rebuilt.t_final
    t = torch.tensor([0.1 * T, 0.6 * T, 0.95 * T], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(t), saved(t), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(saved(t)[:2], incumbent, rtol=1e-9, atol=1e-9)
        assert saved(t)[2].abs().max() == 0  # released: the torsion bias is off
