"""experiments/polymer_torsion_quick.toml: the helix steered by a 10-piece torsion bias, released
on the last 10 % of the run, trained by the score-function estimator."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


@pytest.mark.slow
def test_the_quick_torsion_experiment_runs_and_trains_every_piece_before_the_release(
    tmp_path: Path,
) -> None:
    """One score-function iteration (about 1-2 min): finite folded fractions in [0, 1]; every
    piece before the release window moves off its start value (the score gradient reaches
    the early pieces, which the last-window pathwise gradient cannot), the released last
    piece keeps it, and the schedule is exactly 0 (no bias) in the window."""
    from controlmd.config import build_protocol, build_task, load_config
    from controlmd.experiment import run_experiment
    from controlmd.protocols import load_protocol

    cfg = load_config(EXPERIMENTS / "polymer_torsion_quick.toml", ["logging.progress=false"])
    result = run_experiment(cfg, out=tmp_path / "run", progress=False)
    for key in ("metric_initial", "metric_final"):
        value = result.metrics[key]
        assert math.isfinite(value) and 0.0 <= value <= 1.0, (key, value)
    assert result.metrics["estimator"] == "score"
    trained = load_protocol(tmp_path / "run" / "protocol.pt")
    T = trained.t_final
    pieces = (torch.arange(10, dtype=torch.float64) + 0.5) * T / 10
    with torch.no_grad():
        a = torch.stack([trained(t)[0] for t in pieces])
        released = torch.stack([trained(torch.tensor(f * T))[0] for f in (0.9, 0.95, 1.0)])
    assert bool(((a[:9] - 5.0).abs() > 1e-3).all()), a  # piece centres before the window
    start = build_protocol(cfg, build_task(cfg))
    assert torch.equal(trained.values[9], start.values[9])  # inside the window: no gradient
    assert bool(((a >= 0.0) & (a <= 10.0)).all()), a
    assert bool((released == 0.0).all()), released
