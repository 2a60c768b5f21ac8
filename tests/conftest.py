"""Shared pytest setup: small thread count (CI has 2 cores), deterministic defaults."""

from __future__ import annotations

import os

# The CLI's default (controlmd/cli.py), set before torch loads MKL: tests that compare an
# in-process run with a CLI subprocess then use the same reduction paths.
os.environ.setdefault("MKL_CBWR", "AUTO")

import torch

torch.set_num_threads(max(1, min(2, int(os.environ.get("OMP_NUM_THREADS", "2")))))
