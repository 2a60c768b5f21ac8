"""Shared pytest setup: small thread count (CI has 2 cores), deterministic defaults."""

from __future__ import annotations

import os

import torch

torch.set_num_threads(max(1, min(2, int(os.environ.get("OMP_NUM_THREADS", "2")))))
