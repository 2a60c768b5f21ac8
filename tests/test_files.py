"""The torch-free file helpers: JSON-safe values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from controlmd.files import json_safe


def test_json_safe_converts_arrays_and_non_finite_numbers() -> None:
    value = {
        1: torch.tensor([1.0, math.nan]),
        "a": (np.float64(2.5), np.int64(3)),
        "b": [math.inf, True, None, "x"],
    }
    assert json_safe(value) == {"1": [1.0, None], "a": [2.5, 3], "b": [None, True, None, "x"]}


def test_json_safe_fallback_turns_other_objects_into_json() -> None:
    value = {"path": Path("runs/x"), "n": 1, "flag": False}
    assert json_safe(value)["path"] == Path("runs/x")  # left as it is without a fallback
    safe = json_safe(value, fallback=str)
    assert safe == {"path": "runs/x", "n": 1, "flag": False}
    assert json.loads(json.dumps(safe)) == safe
