"""How the RL baselines step their environments: ``vec_env = "batched" | "subproc" | "dummy"``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from controlmd.errors import ConfigError
from controlmd.logger import Logger
from controlmd.tasks import get_task
from controlmd_envs.baselines import BudgetTracker, make_vec_env, run_sb3
from controlmd_envs.compare import load_compare_config

ENV = {
    "n_envs": 2,
    "observation": "time",
    "shaping": 1.0,
    "shaping_gamma": 1.0,
    "reward_scale": 0.1,
    "feature_scale": 1.0,
}
PPO = {"gamma": 1.0, "n_steps": 8, "batch_size": 16, "n_epochs": 1}


def _ppo(vec_env: str, run_dir: Path) -> tuple[BudgetTracker, object]:
    """PPO on 2 envs of a 20-step trap drag (4 actions of 5 MD steps) for 800 env steps."""
    task = get_task("trap_drag", n_steps=20, low=-2.5, high=12.5)
    tracker = BudgetTracker(
        task,
        budget_md_steps=4_000,
        eval_replicas=8,
        final_replicas=16,
        eval_seed=1,
        final_seed=2,
        wall_cap_s=120.0,
        logger=Logger(),
    )
    final = run_sb3(
        "ppo",
        task,
        tracker,
        env={**ENV, "vec_env": vec_env},
        params=PPO,
        control_interval=5,
        seed=0,
        run_dir=run_dir,
    )
    tracker.finish(final)
    return tracker, final


def test_batched_env_counts_one_interval_per_replica_and_step() -> None:
    task = get_task("trap_drag", n_steps=20)
    venv = make_vec_env(task, {**ENV, "n_envs": 3}, control_interval=5, seed=0)
    venv.reset()
    for _ in range(6):  # across an episode boundary (4 steps per episode)
        venv.step(np.zeros((3, 1), dtype=np.float32))
    # run_sb3 charges num_timesteps * control_interval: the batched env's own count
    assert venv.md_steps == 6 * 3 * 5


@pytest.mark.parametrize("vec_env", ["batched", "dummy"])
def test_ppo_runs_within_budget_on_in_process_envs(vec_env: str, tmp_path: Path) -> None:
    tracker, _ = _ppo(vec_env, tmp_path)
    # equal training budget (evaluations not charged): never above it, within one unit of
    # work (a vector step: 2 envs x 5 MD steps) below it
    assert tracker.stop_reason == "budget" and tracker.unit == 2 * 5
    assert tracker.budget - tracker.unit < tracker.md_steps <= tracker.budget
    assert tracker.train_md_steps % tracker.unit == 0
    assert np.isfinite(tracker.final.metric) and (tmp_path / "model.zip").is_file()


@pytest.mark.slow
def test_subproc_envs_give_the_dummy_envs_results(tmp_path: Path) -> None:
    """SubprocVecEnv (2 worker processes) steps the same seeded ControlEnvs as DummyVecEnv
    in this process: the same training and final protocol."""
    sub, sub_final = _ppo("subproc", tmp_path / "subproc")
    dummy, dummy_final = _ppo("dummy", tmp_path / "dummy")
    assert sub.summary()["curve"] and sub.train_md_steps == dummy.train_md_steps
    assert [p.metric for p in sub.points] == [p.metric for p in dummy.points]
    assert sub.final.metric == dummy.final.metric
    assert np.array_equal(sub_final.values.detach().numpy(), dummy_final.values.detach().numpy())


def test_vec_env_setting_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    text = '[experiment]\nname = "x"\n[task]\nname = "trap_drag"\n[compare]\nmethods = ["ppo"]\n[ppo]\n'
    path.write_text(text + 'vec_env = "threads"\n')
    with pytest.raises(
        ConfigError,
        match=r"\[ppo\] vec_env: unknown value 'threads'; expected one of: batched, "
        r"subproc, dummy",
    ):
        load_compare_config(path)
    path.write_text(text + 'vec_env = "subproc"\nn_envs = 4\n')
    env = load_compare_config(path)["methods"]["ppo"]["env"]
    assert env["vec_env"] == "subproc" and env["n_envs"] == 4
    assert json.dumps(env)  # part of the plan that --resume reads back
