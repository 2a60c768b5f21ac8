"""Environment steps per second of the three ``vec_env`` choices of the RL baselines.

Steps ``n_envs`` environments of a task with random actions (no learning) through
``make_vec_env`` (``batched``: one batched simulation; ``subproc``: stable-baselines3's
``SubprocVecEnv``, one ``ControlEnv`` per worker process with 1 torch thread; ``dummy``:
``DummyVecEnv``, the same envs one after another in this process) and reports vector
steps per second and MD replica-steps per second, after ``--warmup`` untimed vector
steps (which include the worker start-up of ``subproc``). The machine may be shared: the
script records the 1-minute load average before each timing.

Usage::

    python benchmarks/vec_env_throughput.py --task polymer_fold --n-envs 2 8 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _time(
    task_name: str,
    task_kwargs: dict,
    kind: str,
    n_envs: int,
    steps: int,
    warmup: int,
    interval: int,
) -> dict:
    from controlmd.tasks import get_task
    from controlmd_envs.baselines import make_vec_env

    task = get_task(task_name, **task_kwargs)
    env = {
        "n_envs": n_envs,
        "vec_env": kind,
        "observation": "time",
        "shaping": 0.0,
        "shaping_gamma": 1.0,
        "reward_scale": 1.0,
        "feature_scale": 1.0,
    }
    venv = make_vec_env(task, env, control_interval=interval, seed=0)
    venv.seed(0)
    venv.reset()
    rng = np.random.default_rng(0)
    dim = venv.action_space.shape[0]
    try:
        for _ in range(warmup):
            venv.step(rng.uniform(-1, 1, (n_envs, dim)).astype(np.float32))
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        for _ in range(steps):
            venv.step(rng.uniform(-1, 1, (n_envs, dim)).astype(np.float32))
        wall = time.perf_counter() - t0
    finally:
        venv.close()
    return {
        "vec_env": kind,
        "n_envs": n_envs,
        "vector_steps_per_s": steps / wall,
        "md_replica_steps_per_s": steps * n_envs * interval / wall,
        "load_average_1min_before": load,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--task", default="polymer_fold", help="registered task name (default polymer_fold)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="task argument (TOML value)"
    )
    p.add_argument("--n-envs", type=int, nargs="+", default=[2, 8], help="environment counts")
    p.add_argument(
        "--kinds", nargs="+", default=["batched", "subproc", "dummy"], help="vec_env values"
    )
    p.add_argument(
        "--interval", type=int, default=50, help="MD steps per env step (control_interval)"
    )
    p.add_argument("--steps", type=int, default=40, help="timed vector steps")
    p.add_argument("--warmup", type=int, default=4, help="untimed vector steps first")
    args = p.parse_args()
    import tomllib

    import torch

    torch.set_num_threads(1)
    kwargs = {
        k: tomllib.loads(f"v = {v}")["v"] for k, v in (item.split("=", 1) for item in args.set)
    }
    rows = [
        _time(args.task, kwargs, kind, n, args.steps, args.warmup, args.interval)
        for n in args.n_envs
        for kind in args.kinds
    ]
    print(
        json.dumps(
            {
                "task": args.task,
                "task_kwargs": kwargs,
                "interval": args.interval,
                "cpus": os.cpu_count(),
                "results": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
