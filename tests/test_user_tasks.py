"""Tasks written from their equations alone (docs/extending.md; issues 13 and 21).

The walk-through's breathing trap (tests/plugin_tasks/breathing.py, shown verbatim in the
docs) runs with ``controlmd run`` as ``module:Class``; the three driven systems of issue
21 (overdamped and underdamped dragged traps, bit erasure in an underdamped double well)
are checked against exact values: the exact discrete mean work and the closed-form
optimum, the Gaussian moments in continuous time, and the Jarzynski equality.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plugin_tasks.breathing import BreathingTrap
from plugin_tasks.drag import OverdampedDrag, UnderdampedDrag
from plugin_tasks.erasure import BitErasure

from controlmd import make_protocol

F64 = torch.float64
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std()) / math.sqrt(values.numel())


def test_the_walkthrough_shows_the_plugin_file_verbatim() -> None:
    """docs/extending.md's task is the file this test runs (no drift between the two)."""
    doc = (ROOT / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n# tests/plugin_tasks/breathing.py\n(.*?)```", doc, re.S)
    assert blocks, "docs/extending.md lost the breathing-trap listing"
    assert blocks[0] == (TESTS / "plugin_tasks" / "breathing.py").read_text()


EXPERIMENT = """
[experiment]
name = "breathing"
seed = 1

[task]
name = "plugin_tasks.breathing:BreathingTrap"
k_i = 1.0
k_f = 4.0
n_steps = 20

[protocol]
kind = "chebyshev"
degree = 2
init = [1.0, 4.0]

[train]
lr = 0.05
iterations = 4
replicas = 32

[eval]
replicas = 64
every = 4
final_replicas = 2000

[logging]
checkpoint_every = 4
progress = false
"""


def test_breathing_trap_runs_with_controlmd_run(tmp_path: Path) -> None:
    """``[task] name = "module:Class"`` with ``controlmd run`` in a fresh process; the final
    score on fresh replicas agrees with the task's exact metric."""
    config = tmp_path / "breathing.toml"
    config.write_text(EXPERIMENT)
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "controlmd.cli", "run", str(config), "--out", str(out), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "breathing_trap" and metrics["metric_name"] == "mean_work"
    # the spread of W for a protocol like the trained one sets the tolerance
    from controlmd.protocols import load_protocol

    task = BreathingTrap(k_i=1.0, k_f=4.0, n_steps=20)
    protocol = load_protocol(out / "protocol.pt")
    _, se = _mean_and_se(task.rollout(protocol, 2000, 99, gradient="none").aux["work"])
    assert metrics["metric_exact_final"] == pytest.approx(task.exact_metric(protocol), rel=1e-9)
    assert abs(metrics["metric_final"] - metrics["metric_exact_final"]) < 4 * se


def test_breathing_trap_mean_work_is_exact() -> None:
    """The walk-through's exact metric (the variance recursion) against the simulation,
    and the quasi-static limit: a slow protocol costs Delta F = kT/2 ln(k_f/k_i)."""
    task = BreathingTrap()
    linear = make_protocol("chebyshev", dim=1, t_final=task.t_f, degree=1, init=[1.0, 4.0])
    mean, se = _mean_and_se(task.rollout(linear, 2000, 3, gradient="none").aux["work"])
    assert abs(mean - task.exact_metric(linear)) < 4 * se
    dF = 0.5 * math.log(4.0)
    excess = []
    for t_f in (50.0, 200.0):
        slow = BreathingTrap(t_f=t_f, n_steps=round(10 * t_f))
        linear = make_protocol("chebyshev", dim=1, t_final=t_f, degree=1, init=[1.0, 4.0])
        excess.append(slow.exact_metric(linear) - dF)
    assert 0.0 < excess[1] < 0.01 * dF  # second law; dissipation ~ 1/t_f
    assert 3.8 < excess[0] / excess[1] < 4.2


def test_overdamped_drag_reaches_the_schmiedl_seifert_optimum() -> None:
    task = OverdampedDrag(n_steps=100)
    optimal = make_protocol("chebyshev", dim=1, t_final=1.0, degree=1, init=task.optimal_protocol)
    linear = make_protocol("chebyshev", dim=1, t_final=1.0, degree=1, init=[0.0, 5.0])
    exact = task.exact_metric(optimal)
    # discretization: O(dt^2) from W* = k lambda_f^2 / (2 + mu k t_f) = 25/3
    assert exact == pytest.approx(task.optimal_work(), rel=2e-5)
    assert task.exact_metric(linear) == pytest.approx(25.0 / math.e, rel=1e-3)  # linear
    assert task.exact_metric(linear) > exact
    mean, se = _mean_and_se(task.rollout(optimal, 2000, 1, gradient="none").aux["work"])
    assert abs(mean - exact) < 4 * se


def _underdamped_mean_work(task: UnderdampedDrag, a: float, b: float) -> float:
    """Exact continuous-time mean work of lambda = a + (b - a) t / t_f on (0, t_f), from the
    first Gaussian moment: with y = <x> - lambda, y'' + gamma y' + (k/m) y = -gamma v,
    W = k/2 a^2 (jump at 0) - k v int y dt + (jump at t_f at <x(t_f)>)."""
    k, m, g, T = task.k, task.m, task.gamma, task.t_f
    v = (b - a) / T
    A = torch.tensor([[0, 1, 0, 0], [-k / m, -g, -g * v, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=F64)
    y_T, _, _, integral = (
        torch.linalg.matrix_exp(A * T) @ torch.tensor([-a, -v, 1.0, 0.0], dtype=F64)
    ).tolist()
    x_T, lam_f = y_T + b, task.lambda_f
    closing = 0.5 * k * ((x_T - lam_f) ** 2 - (x_T - b) ** 2)
    return 0.5 * k * a * a - k * v * integral + closing


def test_underdamped_drag_mean_work_from_the_gaussian_moments() -> None:
    task = UnderdampedDrag(n_steps=100)
    a, b = 1.0, 4.0  # jumps 0 -> 1 at t = 0 and 4 -> 5 at t_f
    protocol = make_protocol("chebyshev", dim=1, t_final=1.0, degree=1, init=[a, b])
    exact = _underdamped_mean_work(task, a, b)
    assert task.exact_metric(protocol) == pytest.approx(exact, rel=2e-5)  # O(dt^2)
    mean, se = _mean_and_se(task.rollout(protocol, 2000, 2, gradient="none").aux["work"])
    assert abs(mean - exact) < 4 * se


def test_bit_erasure_obeys_the_jarzynski_equality() -> None:
    """A cycle of barrier and tilt (Delta F = 0): <exp(-W/kT)> = 1, while <W> > 0 and the
    tilt sends most particles into the right well."""
    task = BitErasure(b0=2.0, t_f=4.0, n_steps=200)

    def shape(t: torch.Tensor) -> torch.Tensor:
        s = torch.sin(math.pi * t / task.t_f)
        return torch.stack([task.b0 * (1.0 - 0.8 * s), 1.5 * s * s], dim=-1)

    protocol = make_protocol("chebyshev", dim=2, t_final=task.t_f, degree=10, init=shape)
    final = task.rollout(protocol, 500, 0, gradient="none")
    W = final.aux["work"]
    mean, se = _mean_and_se(torch.exp(-W / task.kT))
    assert abs(mean - 1.0) < 4 * se, (mean, se)
    assert float(W.mean()) > 0.0
    assert float(task.erased(final).double().mean()) > 0.6
