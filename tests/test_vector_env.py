"""The gymnasium vector env (one batched simulation): make_vec, gymnasium's seed rule in
every vectorization mode, autoreset modes, infos, pickling, the SB3 adapter."""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector import AutoresetMode

import controlmd_envs
from controlmd.errors import ControlMDError
from controlmd.evaluation import evaluate
from controlmd.rng import EVAL_SEED_OFFSET
from controlmd.search import actions_to_protocol
from controlmd.tasks import get_task
from controlmd_envs.control_env import ControlEnv
from controlmd_envs.start_value import START_REPLICAS, START_SEED, start_value
from controlmd_envs.vec_env import BatchedControlVecEnv, ControlVectorEnv

# Short episodes (4 steps) keep the tests fast; the stepping is the same.
_SMALL = {
    "controlmd/TrapDrag-v0": {},
    "controlmd/PolymerFold-v0": {"task_kwargs": {"n_steps": 40}, "control_interval": 10},
    "controlmd/Assembly-v0": {"task_kwargs": {"n_steps": 80}, "control_interval": 20},
    "controlmd/Isomerization-v0": {"task_kwargs": {"n_steps": 40}, "control_interval": 10},
}


def _rollout(envs: gym.vector.VectorEnv, seed: int, steps: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out: list[tuple] = [envs.reset(seed=seed)[0]]
    for _ in range(steps):
        obs, reward, terminated, truncated, info = envs.step(
            rng.uniform(-1, 1, envs.action_space.shape).astype(np.float32)
        )
        out.append((obs, reward, terminated, truncated, info.get("metric")))
    return out


@pytest.mark.parametrize(
    "env_id",
    [
        pytest.param(e, marks=pytest.mark.slow) if "Isomerization" in e else e
        for e in sorted(controlmd_envs.ENV_IDS)
    ],  # isomerization: building the 4 tasks' grids takes ~10 s
)
def test_make_vec_is_one_batched_simulation_with_the_sync_envs_replicas(env_id: str) -> None:
    """make_vec(..., "vector_entry_point") is the batched env; with the same seed it steps
    exactly the replicas SyncVectorEnv steps (env i = ControlEnv seeded s + i), through the
    end of an episode and the NEXT_STEP autoreset step."""
    kwargs = _SMALL[env_id]
    batched = gym.make_vec(env_id, num_envs=3, vectorization_mode="vector_entry_point", **kwargs)
    sync = gym.make_vec(env_id, num_envs=3, vectorization_mode="sync", **kwargs)
    assert isinstance(batched, ControlVectorEnv) and isinstance(batched, gym.vector.VectorEnv)
    assert batched.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    assert batched.observation_space == sync.observation_space
    assert batched.action_space == sync.action_space
    assert batched.single_action_space == sync.single_action_space
    steps = batched.n_intervals + 1
    a, b = _rollout(batched, 11, steps), _rollout(sync, 11, steps)
    for x, y in zip(a, b):
        assert data_equivalence(x, y), (x, y)
    assert a[-2][2].all() and a[-2][4] is not None  # the last step: terminated, metric
    assert not a[-1][2].any() and np.all(a[-1][1] == 0)  # the autoreset step
    for obs in (a[0], a[1][0]):
        assert batched.observation_space.contains(obs)


def test_same_step_autoreset_and_exact_metric_in_the_final_info() -> None:
    task = get_task("trap_drag")
    envs = ControlVectorEnv(task, 2, autoreset_mode=AutoresetMode.SAME_STEP)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    obs, info = envs.reset(seed=4)
    assert list(info["task_seed"]) == [4, 5]
    actions = np.random.default_rng(0).uniform(-0.9, 0.9, (20, 2, 1))
    for j in range(20):
        obs, reward, terminated, truncated, info = envs.step(actions[j])
    assert terminated.all() and not truncated.any()
    np.testing.assert_array_equal(obs, np.zeros((2, 1)))  # already the next episode
    assert info["_final_obs"].all() and info["final_obs"][0][0] == 1.0
    final = info["final_info"]
    for i in range(2):  # noise-free: the task's exact mean work of replica i's pieces
        exact = task.exact_metric(actions_to_protocol(actions[:, i], task))
        assert final["exact_metric"][i] == pytest.approx(exact, rel=1e-12)
        assert final["_metric"][i] and np.isfinite(final["metric"][i])
    assert reward == pytest.approx(-final["metric"])


def test_gymnasium_vector_wrappers_accept_the_env() -> None:
    envs = gym.make_vec("controlmd/TrapDrag-v0", num_envs=4, control_interval=25)
    envs = gym.wrappers.vector.RecordEpisodeStatistics(
        gym.wrappers.vector.NormalizeObservation(envs)
    )
    envs.reset(seed=0)
    for _ in range(4):
        *_, info = envs.step(envs.action_space.sample())
    assert info["_episode"].all() and np.all(info["episode"]["l"] == 4)


def test_envs_pickle_and_async_vector_env_gives_the_same_replicas() -> None:
    env = gym.make("controlmd/TrapDrag-v0", observation="features")
    copy = pickle.loads(pickle.dumps(env.unwrapped))
    assert data_equivalence(copy.reset(seed=3), env.unwrapped.reset(seed=3), exact=True)
    vec = pickle.loads(pickle.dumps(ControlVectorEnv("trap_drag", 2, control_interval=25)))
    assert vec.num_envs == 2 and vec.n_intervals == 4
    # spawned workers: a forked child of a process whose OpenMP pool is running (torch with
    # more than one thread) can hang in its first parallel region (docs/rl.md)
    async_envs = gym.make_vec(
        "controlmd/TrapDrag-v0",
        num_envs=2,
        vectorization_mode="async",
        vector_kwargs={"context": "spawn"},
        control_interval=25,
        observation="features",
    )
    batched = gym.make_vec(
        "controlmd/TrapDrag-v0", num_envs=2, control_interval=25, observation="features"
    )
    try:
        for x, y in zip(_rollout(async_envs, 7, 4), _rollout(batched, 7, 4)):
            assert data_equivalence(x, y), (x, y)
    finally:
        async_envs.close()


def test_sb3_adapter_follows_sb3_seeding() -> None:
    """BatchedControlVecEnv seeded s: env i is the ControlEnv seeded s + i (DummyVecEnv's rule)."""
    venv = BatchedControlVecEnv("trap_drag", 3, control_interval=25, observation="features")
    assert venv.seed(8) == [8, 9, 10]
    obs = venv.reset()
    for i in range(3):
        single, _ = ControlEnv("trap_drag", control_interval=25, observation="features").reset(
            seed=8 + i
        )
        np.testing.assert_array_equal(obs[i], single)


def test_bad_vector_env_input_is_named() -> None:
    with pytest.raises(ControlMDError, match="a list of seeds must be consecutive"):
        ControlVectorEnv("trap_drag", 2).reset(seed=[1, 5])
    with pytest.raises(ControlMDError, match="autoreset_mode must be"):
        ControlVectorEnv("trap_drag", 2, autoreset_mode="disabled")
    with pytest.raises(ControlMDError, match="call reset"):
        ControlVectorEnv("trap_drag", 2).step(np.zeros((2, 1)))
    with pytest.raises(gym.error.InvalidAction, match="outside the action space"):
        envs = ControlVectorEnv("trap_drag", 2)
        envs.reset(seed=0)
        envs.step(np.full((2, 1), 1.01))
    with pytest.raises(
        ControlMDError, match=r"task 'rdf_inverse' has no env: it has no time-dependent control"
    ):
        ControlEnv("rdf_inverse")


def test_actions_past_the_bounds_by_rounding_are_clipped() -> None:
    env = ControlEnv("trap_drag", control_interval=50)
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([1.0 + 1e-7]))
    assert info["u"][0] == env.task.controls.high[0]
    with pytest.raises(gym.error.InvalidAction):
        env.step(np.array([1.0 + 1e-3]))


def test_make_vector_env_rejects_an_entry_point_that_is_not_a_task_env() -> None:
    # ControlEnv takes the task as an argument, so it has no task_name to vectorize
    with pytest.raises(ControlMDError, match="must name a TaskEnv subclass"):
        controlmd_envs.make_vector_env("controlmd_envs.control_env:ControlEnv", num_envs=2)


def test_start_value_is_one_number_in_every_env_and_a_seed_0_comparison_start() -> None:
    """The documented start value (zero actions: the middle of the bounds) is what the single
    env, the vector env and the SB3 adapter report at the end of an episode, and the ``m0`` of
    a comparison with experiment seed 0 and 128 evaluation replicas."""
    kwargs = {"n_steps": 20, "low": -2.5, "high": 12.5}
    single = ControlEnv("trap_drag", task_kwargs=kwargs, control_interval=5)
    vector = ControlVectorEnv("trap_drag", 3, task_kwargs=kwargs, control_interval=5)
    sb3 = BatchedControlVecEnv("trap_drag", 2, task_kwargs=kwargs, control_interval=5, seed=1)
    single.reset(seed=7)
    vector.reset(seed=7)
    sb3.reset()
    for _ in range(4):
        *_, info_single = single.step(single.action_space.sample())
        *_, info_vector = vector.step(vector.action_space.sample())
        sb3.step_async(np.zeros((2, 1)))
        *_, infos_sb3 = sb3.step_wait()
    task = get_task("trap_drag", **kwargs)
    zero = actions_to_protocol(np.zeros((1, 1)), task)
    m0 = evaluate(task, zero, START_REPLICAS, START_SEED).mean  # compare: seed 0 + offset
    assert START_SEED == 0 + EVAL_SEED_OFFSET
    assert info_single["start_value"] == m0
    assert info_vector["_start_value"].all() and np.all(info_vector["start_value"] == m0)
    assert [i["start_value"] for i in infos_sb3] == [m0, m0]
    # the trap at the middle (5) from 0 to 5 in one jump at the end: k 5^2 / 2 on average
    assert start_value(task).exact == pytest.approx(12.5, rel=1e-12)
    assert m0 == pytest.approx(12.5, abs=5 * start_value(task).se)
    quiet = ControlVectorEnv(
        "trap_drag", 2, task_kwargs=kwargs, control_interval=5, report_start_value=False
    )
    quiet.reset(seed=0)
    for _ in range(4):
        *_, info = quiet.step(quiet.action_space.sample())
    assert "metric" in info and "start_value" not in info
