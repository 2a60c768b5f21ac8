"""Does a matrix-vector product depend on where its operands sit in memory?

For each MKL reproducibility setting, a fresh process computes ``A @ x`` (float64,
n = 10, 37, 200) with the operands copied to 64 different offsets in memory and counts the
distinct results (1 = alignment-independent). Settings: MKL's default (``MKL_CBWR`` unset),
``AUTO`` (the ``controlmd`` command's default), ``AVX2`` and ``COMPATIBLE``::

    python benchmarks/mkl_alignment.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SETTINGS = [None, "AUTO", "AVX2", "COMPATIBLE"]

PROBE = """
import hashlib, json, torch
torch.manual_seed(0)
counts = {}
for n in (10, 37, 200):
    a0, x0 = torch.randn(n, n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    seen = set()
    for offset in range(64):
        a = torch.empty(n * n + offset, dtype=torch.float64)[offset:].view(n, n)
        x = torch.empty(n + offset, dtype=torch.float64)[offset:]
        a.copy_(a0)
        x.copy_(x0)
        seen.add(hashlib.sha256((a @ x).numpy().tobytes()).hexdigest())
    counts[n] = len(seen)
print(json.dumps(counts))
"""


def main() -> int:
    for setting in SETTINGS:
        env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
        env["OMP_NUM_THREADS"] = "1"
        if setting is not None:
            env["MKL_CBWR"] = setting
        out = subprocess.run(
            [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
        )
        counts = json.loads(out.stdout)
        print(f"MKL_CBWR={setting or '(unset)':11s} distinct results over 64 alignments: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
