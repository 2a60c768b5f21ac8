"""Contracts of the gymnasium environments (controlmd_envs): API checkers, seeding, replay
of trained protocols, batched vector env, shaping, bad input."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import controlmd_envs
from controlmd.errors import ControlMDError
from controlmd.protocols import PiecewiseConstant
from controlmd.tasks import get_task
from controlmd.train import Trainer, evaluate
from controlmd_envs.control_env import ControlEnv, actions_to_protocol, protocol_to_actions
from controlmd_envs.vec_env import BatchedControlVecEnv

ENV_IDS = sorted(controlmd_envs.ENV_IDS)
# Shorter episodes keep the checkers fast; the spaces and the contract do not change.
_SMALL = {
    "controlmd/PolymerFold-v0": {"task_kwargs": {"n_steps": 100}},
    "controlmd/Assembly-v0": {"task_kwargs": {"n_steps": 400}},
    "controlmd/Isomerization-v0": {"task_kwargs": {"n_steps": 100}, "control_interval": 10},
}


def _no_warnings(fn, *args, **kwargs) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    messages = [str(w.message) for w in caught]
    assert not messages, messages


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_registered_envs_pass_both_checkers(env_id: str) -> None:
    env = gym.make(env_id, **_SMALL.get(env_id, {}))
    _no_warnings(gym_check_env, env.unwrapped)
    _no_warnings(sb3_check_env, env.unwrapped)
    env.close()


@pytest.mark.parametrize("observation", ["features", "state"])
def test_feedback_observations_pass_both_checkers(observation: str) -> None:
    env = gym.make("controlmd/TrapDrag-v0", observation=observation, shaping=1.0, feature_scale=5.0)
    _no_warnings(gym_check_env, env.unwrapped)
    _no_warnings(sb3_check_env, env.unwrapped)


def test_import_registers_lazily_and_core_never_imports_gymnasium() -> None:
    code = (
        "import sys, controlmd_envs, gymnasium as gym\n"
        "assert 'controlmd.tasks' not in sys.modules, 'import controlmd_envs imported the tasks'\n"
        "assert 'controlmd/TrapDrag-v0' in gym.registry\n"
        "for m in [k for k in sys.modules if k.split('.')[0] in ('gymnasium', 'stable_baselines3', 'controlmd_envs')]:\n"
        "    del sys.modules[m]\n"
        "import controlmd, controlmd.train, controlmd.config, controlmd.cli\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('gymnasium', 'stable_baselines3', 'controlmd_envs')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _episode(env: gym.Env, seed: int, actions: np.ndarray) -> list[tuple]:
    obs, info = env.reset(seed=seed)
    out: list[tuple] = [(obs, info["task_seed"])]
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        out.append((obs, reward, terminated, truncated, {k: v for k, v in info.items()}))
    return out


def test_seeded_twin_rollouts_are_identical() -> None:
    actions = np.random.default_rng(0).uniform(-1, 1, (20, 1))
    a = _episode(
        ControlEnv("trap_drag", control_interval=5, observation="features", shaping=1.0), 7, actions
    )
    b = _episode(
        ControlEnv("trap_drag", control_interval=5, observation="features", shaping=1.0), 7, actions
    )
    for x, y in zip(a, b):
        assert gym.utils.env_checker.data_equivalence(x, y, exact=True)
    c = _episode(
        ControlEnv("trap_drag", control_interval=5, observation="features", shaping=1.0), 8, actions
    )
    assert a[-1][4]["metric"] != c[-1][4]["metric"]


def test_unseeded_resets_follow_the_env_generator() -> None:
    env = ControlEnv("trap_drag", control_interval=5)
    env.reset(seed=3)
    seeds_a = [env.reset()[1]["task_seed"] for _ in range(3)]
    env.reset(seed=3)
    seeds_b = [env.reset()[1]["task_seed"] for _ in range(3)]
    assert seeds_a == seeds_b and len(set(seeds_a)) == 3


def test_env_seed_i_is_replica_i_of_a_batch() -> None:
    """An env reset with seed s + i is replica s + i of the task's batch seeded 0, and env i
    of the vector env seeded s (gymnasium's and SB3's seed rule): in the task's own batch,
    in the vector env, step by step."""
    s, B = 5, 4
    task = get_task("trap_drag")
    R0 = task.initial_state(B, 0, first_replica=s).R
    venv = BatchedControlVecEnv(task, B, control_interval=10, observation="state", shaping=1.0)
    venv.seed(s)
    vobs = venv.reset()
    actions = np.random.default_rng(1).uniform(-1, 1, (venv.n_intervals, B, 1))
    vsteps = [venv.step(actions[j]) for j in range(venv.n_intervals)]
    for i in range(B):
        env = ControlEnv(task, control_interval=10, observation="state", shaping=1.0)
        obs, info = env.reset(seed=s + i)
        assert info["task_seed"] == s + i
        np.testing.assert_array_equal(obs, vobs[i])
        np.testing.assert_allclose(np.arctanh(obs[1]), float(R0[i, 0, 0]), rtol=1e-5)
        for j in range(env.n_intervals):
            obs, reward, terminated, _, info = env.step(actions[j, i])
            vo, vr, vd, vinfo = vsteps[j]
            assert vd[i] == terminated
            assert vinfo[i]["reward_metric"] == info["reward_metric"]
            assert vinfo[i]["reward_shaping"] == info["reward_shaping"]
            np.testing.assert_allclose(vr[i], reward, rtol=1e-6)
            if terminated:
                assert vinfo[i]["metric"] == info["metric"]
                np.testing.assert_array_equal(vinfo[i]["terminal_observation"], obs)
            else:
                np.testing.assert_array_equal(vo[i], obs)


def test_replayed_trained_protocol_gives_the_trainers_metric() -> None:
    """A trained K-piece protocol replayed as a K-step episode gives, seed by seed, the
    metric of the trainer's evaluation."""
    task = get_task("trap_drag")
    protocol = PiecewiseConstant(
        dim=1,
        t_final=task.horizon,
        n_pieces=20,
        low=task.controls.low,
        high=task.controls.high,
        init=2.5,
    )
    Trainer(task, protocol, lr=0.2, replicas=32, seed=3, variance_every=0).learn(8)
    n = 6
    reference = evaluate(task, protocol, n, 0)  # replicas 0 .. n-1 of the batch seeded 0
    actions = protocol_to_actions(protocol, task)
    assert actions.shape == (20, 1) and np.ptp(actions) > 1e-3  # training moved the pieces
    env = ControlEnv(task, control_interval=task.n_steps // 20)
    metrics = []
    for i in range(n):
        env.reset(seed=i)
        for a in actions:
            *_, terminated, _, info = env.step(a)
        assert terminated
        metrics.append(info["metric"])
    assert np.mean(metrics) == pytest.approx(reference.mean, rel=1e-12, abs=1e-12)
    # the same through the vector env, all replicas at once
    venv = BatchedControlVecEnv(task, n, control_interval=task.n_steps // 20)
    venv.seed(0)
    venv.reset()
    for a in actions:
        _, _, dones, infos = venv.step(np.repeat(a[None, :], n, axis=0))
    assert dones.all()
    np.testing.assert_allclose([info["metric"] for info in infos], metrics, rtol=0, atol=1e-12)
    # and back: actions -> protocol -> actions
    np.testing.assert_allclose(
        protocol_to_actions(actions_to_protocol(actions, task), task), actions, atol=1e-10
    )


def test_shaping_is_potential_based() -> None:
    """With gamma = 1 the shaped rewards of an episode sum to the sparse reward minus
    w Phi(s_0): the same for every action sequence, so the optimum does not move."""
    rng = np.random.default_rng(2)
    for _ in range(2):
        actions = rng.uniform(-1, 1, (20, 1))
        sparse = _episode(ControlEnv("trap_drag", control_interval=5), 4, actions)
        shaped = _episode(
            ControlEnv("trap_drag", control_interval=5, shaping=0.7, reward_scale=0.1), 4, actions
        )
        metric = sparse[-1][4]["metric"]
        assert shaped[-1][4]["metric"] == metric
        assert sum(step[1] for step in sparse[1:]) == pytest.approx(-metric, rel=1e-12)
        # Phi(s_0) = -W_0 = 0 for trap_drag: the shaped return is the sparse one, scaled
        assert sum(step[1] for step in shaped[1:]) == pytest.approx(-0.1 * metric, rel=1e-10)
        for step in shaped[1:]:
            assert step[1] == pytest.approx(
                step[4]["reward_metric"] + step[4]["reward_shaping"], abs=1e-12
            )
        # dense: every step before the last pays minus the work done in it
        assert any(step[1] != 0.0 for step in shaped[1:-1])


def test_vec_env_resets_itself_at_the_horizon() -> None:
    venv = BatchedControlVecEnv("trap_drag", 3, control_interval=25, seed=0)
    obs = venv.reset()
    assert obs.shape == (3, 1) and obs.dtype == np.float32
    for j in range(4):
        obs, _, dones, infos = venv.step(np.zeros((3, 1), dtype=np.float32))
        assert dones.all() == (j == 3)
    assert venv.episodes == 1 and venv.md_steps == 3 * 100
    np.testing.assert_array_equal(obs, np.zeros((3, 1)))  # the next episode's first observation
    assert all(
        info["terminal_observation"][0] == 1.0 and not info["TimeLimit.truncated"] for info in infos
    )
    assert (
        venv.get_attr("render_mode") == [None] * 3
        and venv.env_is_wrapped(gym.Wrapper) == [False] * 3
    )


def test_render_rgb_array() -> None:
    env = gym.make("controlmd/TrapDrag-v0", render_mode="rgb_array")
    env.reset(seed=0)
    env.step(np.array([0.5], dtype=np.float32))
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    assert frame.min() < frame.max()


def test_bad_input_raises_conventional_errors() -> None:
    env = ControlEnv("trap_drag", control_interval=50)
    with pytest.raises(gym.error.ResetNeeded, match="reset"):
        env.step(np.zeros(1))
    env.reset(seed=0)
    with pytest.raises(gym.error.InvalidAction, match="outside the action space"):
        env.step(np.array([1.5]))
    with pytest.raises(gym.error.InvalidAction, match="shape"):
        env.step(np.zeros((1, 1)))
    with pytest.raises(gym.error.InvalidAction, match="finite"):
        env.step(np.array([np.nan]))
    env.step(np.zeros(1))
    *_, terminated, _, _ = env.step(np.zeros(1))
    assert terminated
    with pytest.raises(gym.error.ResetNeeded, match="ended"):
        env.step(np.zeros(1))
    with pytest.raises(ControlMDError, match=r"unknown task 'nope'; expected one of: .*trap_drag"):
        ControlEnv("nope")
    with pytest.raises(gym.error.NameNotFound):
        gym.make("controlmd/Nope-v0")
    with pytest.raises(ControlMDError, match="control_interval = 7 must divide"):
        ControlEnv("trap_drag", control_interval=7)
    with pytest.raises(ControlMDError, match="unknown observation 'pixels'"):
        ControlEnv("trap_drag", observation="pixels")
    with pytest.raises(ControlMDError, match="shaping must be"):
        ControlEnv("trap_drag", shaping=-1.0)
    venv = BatchedControlVecEnv("trap_drag", 2, control_interval=50)
    with pytest.raises(ControlMDError, match="reset"):
        venv.step(np.zeros((2, 1)))
    venv.reset()
    with pytest.raises(gym.error.InvalidAction, match=r"shape \(2, 1\)"):
        venv.step(np.zeros((3, 1)))


def test_episode_control_matches_piecewise_constant_pieces() -> None:
    """The env's control locates pieces exactly as PiecewiseConstant does, also at breakpoints."""
    from controlmd_envs.control_env import EpisodeControl

    K, T = 8, 0.7
    values = torch.linspace(-1.0, 2.0, K).reshape(K, 1)
    reference = PiecewiseConstant(dim=1, t_final=T, n_pieces=K, low=-3.0, high=3.0, init=values)
    control = EpisodeControl(dim=1, t_final=T, n_pieces=K)
    control.start(2)
    t = torch.cat(
        [torch.linspace(0.0, T, 57, dtype=torch.float64), torch.tensor(reference.breakpoints())]
    )
    for j in range(K):
        control.set(j, reference(torch.tensor((j + 0.5) * T / K)).expand(2, 1))
    torch.testing.assert_close(control(t)[:, 1], reference(t), rtol=0, atol=0)
    assert control.breakpoints() == reference.breakpoints()


def test_release_window_makes_the_episode_the_released_protocol() -> None:
    """With ``release_fraction`` an episode is the K-piece protocol with the same release
    window (every channel smoothly to the task's no-control value, then held): the same
    final positions for the same replica; actions held wholly inside the window are ignored."""
    kwargs = {"n_steps": 40}
    task = get_task("polymer_fold", **kwargs)
    actions = np.array([[0.3], [-0.2], [0.6], [0.9]])

    def episode(acts: np.ndarray) -> torch.Tensor:
        env = ControlEnv(
            "polymer_fold", task_kwargs=kwargs, control_interval=10, release_fraction=0.25
        )
        env.reset(seed=3)
        for a in acts:
            env.step(a.astype(np.float64))
        return env.batch.state.R.clone()

    R = episode(actions)
    low, high = task.controls.low[0], task.controls.high[0]
    released = PiecewiseConstant(
        t_final=task.horizon,
        n_pieces=4,
        low=low,
        high=high,
        init=torch.tensor(low + (high - low) * 0.5 * (actions + 1.0)),
        release_fraction=0.25,
        release_value=task.default_control(),
    )
    with torch.no_grad():
        state = task.rollout(released, 1, 0, first_replica=3, gradient="none")
        plain = task.rollout(
            actions_to_protocol(actions, task), 1, 0, first_replica=3, gradient="none"
        )
    torch.testing.assert_close(R, state.R, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(R, plain.R)  # the window changed the dynamics
    # the last piece [0.75 T, T] is wholly inside the window (exact from 0.75 T on)
    torch.testing.assert_close(episode(np.vstack([actions[:3], [[-0.9]]])), R, rtol=0, atol=0)
    with pytest.raises(ControlMDError, match="release_fraction must be in"):
        ControlEnv("polymer_fold", task_kwargs=kwargs, control_interval=10, release_fraction=0.6)
    with pytest.raises(ControlMDError, match="has no no-control value"):
        ControlEnv("trap_drag", control_interval=5, release_fraction=0.1)
