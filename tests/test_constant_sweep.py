"""``benchmarks/constant_sweep.py``'s hand-made holds: one value per channel on a task with
several channels, and a clear error when a value names another number of channels."""

from __future__ import annotations

import pytest
import torch
from command_scripts import ROOT, load_script

from controlmd.config import build_task, load_config
from controlmd.errors import ControlMDError


def _two_channel_task():  # type: ignore[no-untyped-def]
    cfg = load_config(
        ROOT / "experiments" / "polymer_fold.toml",
        ['task.controls=["temperature","torsion"]', "task.n_steps=100"],
    )
    return build_task(cfg)


def test_a_two_channel_hold_holds_each_channel_from_its_time_fraction() -> None:
    task = _two_channel_task()
    label, protocol = load_script("benchmarks/constant_sweep.py").hold_protocol(
        task, "hot=0:0.7/5,0.3:0.5/5,0.9:0.5/0"
    )
    assert label == "hot"
    T = task.horizon
    for fraction, expected in ((0.1, [0.7, 5.0]), (0.5, [0.5, 5.0]), (0.95, [0.5, 0.0])):
        u = protocol(torch.tensor(fraction * T, dtype=torch.float64))
        assert u.tolist() == pytest.approx(expected, abs=0.0)


@pytest.mark.parametrize("spec", ["x=0:0.7,0.3:0.5/5", "x=0:0.5/5/1"])
def test_a_hold_naming_another_number_of_channels_is_refused(spec: str) -> None:
    with pytest.raises(
        ControlMDError, match=r"names \d channel\(s\) but the task has 2 \(kT/torsion\)"
    ):
        load_script("benchmarks/constant_sweep.py").hold_protocol(_two_channel_task(), spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("x=0:0.05/5", r"kT = 0.05 lies outside the channel's bounds \[0.1, 1.2\]"),
        ("x=0:0.5/5,0.5:0.5/6", r"torsion = 6.0 lies outside the channel's bounds \[0.0, 5.0\]"),
    ],
)
def test_a_hold_outside_a_channels_bounds_is_refused_by_name(spec: str, message: str) -> None:
    with pytest.raises(ControlMDError, match=message):
        load_script("benchmarks/constant_sweep.py").hold_protocol(_two_channel_task(), spec)
