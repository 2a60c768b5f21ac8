"""Per-replica failure look: final bond count, largest cluster, max coordination and yield
for the trained protocol and the hand-made one on the same fresh replicas.

Usage: python per_replica.py RUN_DIR BASELINE_RUN_DIR N_REPLICAS SEED OUT.json
"""

import json
import sys
import tomllib
from collections import Counter

import torch

from controlmd.config import build_task
from controlmd.protocols import load_protocol

run, base, n, seed, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), 256
with open(f"{run}/config.toml", "rb") as f:
    cfg = tomllib.load(f)
task = build_task(cfg)
out = {}
for name, path in (("trained", f"{run}/protocol.pt"), ("handmade", f"{base}/protocol.pt")):
    p = load_protocol(path)
    obs, ys = [], []
    done = 0
    while done < n:
        b = min(chunk, n - done)
        with torch.no_grad():
            s = task.rollout(p, b, seed, first_replica=done, gradient="none")
        obs.append(task.observe(s))
        ys.append(task.metric(s))
        done += b
    o = torch.cat(obs)
    y = torch.cat(ys).to(torch.float64)
    bonds = (o[:, 0] * task.target_bonds).round().long()
    largest = (o[:, 1] * task.n_particles).round().long()
    deg = (o[:, 2] * 6).round().long()
    fail = y < 0.5
    out[name] = {
        "yield": float(y.mean()),
        "n": n,
        "largest_cluster_of_failures": dict(sorted(Counter(largest[fail].tolist()).items())),
        "bonds_of_failures": dict(sorted(Counter(bonds[fail].tolist()).items())),
        "failures_7cluster_11bonds_or_less": int((fail & (largest == 7)).sum()),
        "failures_fragmented": int((fail & (largest < 7)).sum()),
        "y": y.tolist(),
    }
ta, hb = torch.tensor(out["trained"]["y"]), torch.tensor(out["handmade"]["y"])
summary = {k: {kk: vv for kk, vv in v.items() if kk != "y"} for k, v in out.items()}
summary["both_ok"] = int(((ta > 0.5) & (hb > 0.5)).sum())
summary["trained_only"] = int(((ta > 0.5) & (hb < 0.5)).sum())
summary["handmade_only"] = int(((ta < 0.5) & (hb > 0.5)).sum())
summary["neither"] = int(((ta < 0.5) & (hb < 0.5)).sum())
summary["seed"] = seed
print(json.dumps(summary, indent=1))
json.dump(summary, open(sys.argv[5], "w"), indent=1)
