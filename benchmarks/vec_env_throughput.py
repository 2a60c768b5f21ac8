"""Env steps per second: the batched vector env vs gymnasium's Sync/Async vector envs.

For each task, steps ``n_envs`` environments with random actions (no learning) through
``gymnasium.make_vec(id, num_envs=n, vectorization_mode=mode)``:

* ``batched``: ``vector_entry_point``, the :class:`~controlmd_envs.vec_env.ControlVectorEnv`
  (all replicas as one batched simulation, one call per control interval);
* ``sync``: ``SyncVectorEnv``, ``n`` ``ControlEnv`` one after another in this process;
* ``async``: ``AsyncVectorEnv``, one ``ControlEnv`` per worker process (1 torch thread each);
* ``sb3``: :class:`~controlmd_envs.vec_env.BatchedControlVecEnv`, the stable-baselines3
  adapter of ``batched`` (its overhead).

Both modes step the same replicas for the same seed (tested in tests/test_vector_env.py).
Prints one JSON line per (task, n_envs, mode) as it is measured: env steps per second
(vector steps x ``n_envs`` / s) and MD replica-steps per second, after ``--warmup`` untimed vector steps (which include the worker start-up of
``async``), with the 1-minute load average before each timing (the machine may be shared).

Usage::

    python benchmarks/vec_env_throughput.py --tasks trap_drag polymer_fold --n-envs 64 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

ENV_IDS = {
    "trap_drag": "controlmd/TrapDrag-v0",
    "polymer_fold": "controlmd/PolymerFold-v0",
    "assembly": "controlmd/Assembly-v0",
    "isomerization": "controlmd/Isomerization-v0",
}


def _make(env_id: str, mode: str, n_envs: int, kwargs: dict) -> object:
    import gymnasium as gym

    import controlmd_envs  # registers the ids
    from controlmd_envs.vec_env import BatchedControlVecEnv

    if mode == "sb3":
        return BatchedControlVecEnv(controlmd_envs.ENV_IDS[env_id], n_envs, seed=0, **kwargs)
    vectorization = {"batched": "vector_entry_point", "sync": "sync", "async": "async"}[mode]
    return gym.make_vec(env_id, num_envs=n_envs, vectorization_mode=vectorization, **kwargs)


def _time(task: str, mode: str, n_envs: int, steps: int, warmup: int, kwargs: dict) -> dict:
    envs = _make(ENV_IDS[task], mode, n_envs, kwargs)
    rng = np.random.default_rng(0)
    if mode == "sb3":
        envs.reset()
        interval = envs.venv.control_interval
        dim = envs.action_space.shape[0]
    else:
        envs.reset(seed=0)
        probe = _make(ENV_IDS[task], "batched", 1, kwargs)
        interval = probe.control_interval
        dim = envs.single_action_space.shape[0]
    try:
        for _ in range(warmup):
            envs.step(rng.uniform(-1, 1, (n_envs, dim)).astype(np.float32))
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        for _ in range(steps):
            envs.step(rng.uniform(-1, 1, (n_envs, dim)).astype(np.float32))
        wall = time.perf_counter() - t0
    finally:
        envs.close()
    return {
        "task": task,
        "mode": mode,
        "n_envs": n_envs,
        "control_interval": interval,
        "env_steps_per_s": steps * n_envs / wall,
        "md_replica_steps_per_s": steps * n_envs * interval / wall,
        "load_average_1min_before": load,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(ENV_IDS), choices=list(ENV_IDS))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task argument (TOML value), for every task",
    )
    p.add_argument("--n-envs", type=int, nargs="+", default=[8, 64], help="environment counts")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["batched", "sync"],
        choices=["batched", "sync", "async", "sb3"],
        help="vectorization modes",
    )
    p.add_argument("--steps", type=int, default=40, help="timed vector steps")
    p.add_argument("--warmup", type=int, default=4, help="untimed vector steps first")
    args = p.parse_args()
    import tomllib

    import torch

    torch.set_num_threads(1)
    task_kwargs = {
        k: tomllib.loads(f"v = {v}")["v"] for k, v in (item.split("=", 1) for item in args.set)
    }
    kwargs = {"task_kwargs": task_kwargs} if task_kwargs else {}
    for task in args.tasks:
        for n in args.n_envs:
            for mode in args.modes:
                row = _time(task, mode, n, args.steps, args.warmup, kwargs)
                print(json.dumps({"cpus": os.cpu_count(), **row}), flush=True)


if __name__ == "__main__":
    main()
