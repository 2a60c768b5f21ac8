"""Small test systems shared by several test modules (one definition each)."""

from __future__ import annotations

from typing import Any

#: ``[task]`` keys of the assembly task reduced to dimers: 2 Morse disks (reduced LJ units),
#: target one bond (the cheapest assembly task to score many times); add ``n_steps`` and the
#: controls per test.
TWO_DISKS: dict[str, Any] = {
    "name": "assembly",
    "n_particles": 2,
    "cluster_size": 2,
    "target_bonds": 1,
    "r_cut": 1.6,
    "alpha": 4.0,
    "dt": 1e-3,
}
