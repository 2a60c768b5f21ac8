"""The equal-budget comparison harness and the derivative-free searches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from controlmd.cli import main
from controlmd.errors import ConfigError, ControlMDError
from controlmd.search import CMAES, RandomSearch, actions_to_protocol
from controlmd.sweep import ray_available
from controlmd.tasks import get_task
from controlmd_envs.compare import (
    first_reach,
    load_compare_config,
    main_compare,
    run_comparison,
    sample_efficiency,
    summarize_folder,
)
from controlmd_envs.control_env import ControlEnv
from controlmd_envs.start_value import START_REPLICAS, START_SEED

ROOT = Path(__file__).resolve().parents[1]
TINY = (ROOT / "experiments" / "trap_drag_compare_smoke.toml").read_text()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_comparison_end_to_end(tmp_path: Path) -> None:
    """The shipped smoke comparison (experiments/trap_drag_compare_smoke.toml)."""
    out = tmp_path / "out"
    smoke = ROOT / "experiments" / "trap_drag_compare_smoke.toml"
    assert main(["compare", str(smoke), "--out", str(out), "--quiet", "--local"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert (out / "comparison.png").stat().st_size > 0
    table = (out / "comparison.md").read_text()
    budget = 8_000
    assert result["n_pieces"] == 4 and result["seeds"] == [3, 4]
    methods = {"gradient", "ppo", "sac", "cma_es", "random_search", "ppo_feedback"}
    assert set(result["methods"]) == methods == set(result["curves"])
    assert result["metric_name"] == "mean_work" and result["higher_is_better"] is False
    # the common start (trap at the middle, 5 = lambda_f: one jump) costs k lambda_f^2 / 2
    assert result["m0_exact"] == pytest.approx(12.5, rel=1e-12) and "12.5 exact" in table
    # the task's documented start value: the number the envs put in their final info
    env = ControlEnv("trap_drag", task_kwargs={"n_steps": 20, "low": -2.5, "high": 12.5})
    env.reset(seed=0)
    info: dict = {}
    for _ in range(env.n_intervals):
        *_, info = env.step(np.zeros(1, dtype=np.float32))
    start = result["start_value"]
    assert start["mean"] == info["start_value"] and start["exact"] == result["m0_exact"]
    assert (start["replicas"], start["seed"]) == (START_REPLICAS, START_SEED)
    assert f"{start['mean']:.4g} ± " in table
    assert [(j["method"], j["seed"], j["status"]) for j in result["jobs"]] == [
        (m, s, "done") for m in result["methods"] for s in (3, 4)
    ]
    for method, data in result["methods"].items():
        assert f"| {method} |" in table
        assert len(data["runs"]) == 2
        for run in data["runs"]:
            curve = result["curves"][method][str(run["seed"])]
            md = curve["md_steps"]
            # the start, then evaluations at 2 thresholds per decade, then the end
            assert md[0] == 0 and md == sorted(md) and len(set(md)) == len(md) >= 3
            assert md[-1] == run["md_steps"] and curve["cpu_seconds"] == sorted(
                curve["cpu_seconds"]
            )
            assert len(md) <= 2 + 2 * np.log10(budget)
            # equal training budget: never above it, within one unit of work below it
            assert 0.5 * budget < run["md_steps"] <= budget
            assert run["stop_reason"] == "budget"
            # evaluations are counted apart: every curve point on 16 replicas, the final on 32
            assert run["eval_md_steps"] == len(md) * 16 * 20 + 32 * 20
            assert curve["metric"][0] == result["m0"]  # the common start
            assert run["final"]["replicas"] == 32 and np.isfinite(run["final"]["metric"])
            run_dir = out / method / f"seed{run['seed']}"
            assert any((run_dir / "tb").glob("events.out.tfevents.*"))
            assert json.loads((run_dir / "metrics.json").read_text())["method"] == method
            assert (run_dir / "protocol.pt").exists() == (method != "ppo_feedback")
        if data["algo"] == "gradient":
            assert data["summary"]["grad_steps_mean"] > 0
    efficiency = result["sample_efficiency"]
    assert set(efficiency) == methods - {"gradient"}
    for entry in efficiency.values():
        assert entry["status"] in ("ratio", "no learning")
        if entry["status"] == "ratio":
            assert entry["ci_low"] <= entry["ratio"] <= entry["ci_high"]
    assert efficiency["random_search"]["status"] == "no learning"  # its incumbent stays the start
    assert result["complete"]
    # the folder alone gives the same summary (what an interrupted comparison is rebuilt from)
    rebuilt = summarize_folder(out)
    assert rebuilt["complete"] and rebuilt["curves"] == result["curves"]
    assert rebuilt["methods"]["cma_es"]["summary"] == result["methods"]["cma_es"]["summary"]


def _curves(points: list[list[tuple[int, float]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.array([x for x, _ in p]), np.array([y for _, y in p])) for p in points]


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_sample_efficiency_on_synthetic_curves(higher_is_better: bool) -> None:
    """The ratio as defined: the baseline gains 10 and reaches 90% of it (m0 + 9) at 1000
    steps (interpolated); the gradient method reaches the same score at 250 steps."""
    sign = 1.0 if higher_is_better else -1.0
    m0 = 2.0
    base = _curves(
        [
            [
                (0, m0),
                (100, m0),
                (500, m0 + sign * 7.0),
                (1500, m0 + sign * 10.0),
                (3000, m0 + sign * 10.0),
            ],
            [
                (0, m0),
                (100, m0),
                (500, m0 + sign * 5.0),
                (1500, m0 + sign * 10.0),
                (3000, m0 + sign * 10.0),
            ],
        ]
    )  # mean: 0, 0, 6, 10, 10 -> 9 is reached 3/4 of the way from 500 to 1500 = 1250
    grad = _curves(
        [
            [(0, m0), (200, m0 + sign * 8.0), (600, m0 + sign * 12.0)],
            [(0, m0), (200, m0 + sign * 8.0), (600, m0 + sign * 12.0)],
        ]
    )  # 9 is reached a quarter of the way from 200 to 600 = 300
    e = sample_efficiency(grad, base, m0=m0, higher_is_better=higher_is_better)
    assert e["status"] == "ratio"
    assert e["score"] == pytest.approx(m0 + sign * 9.0)
    assert e["steps_baseline"] == pytest.approx(1250.0)
    assert e["steps_gradient"] == pytest.approx(300.0)
    assert e["ratio"] == pytest.approx(1250.0 / 300.0)
    # identical gradient seeds; resampled baseline seeds reach 9 at 3500/3 (first seed
    # twice), 1300 (second twice) or 1250: every resample's ratio is one of three values
    assert e["ci_low"] >= 3500 / 3 / 300 - 1e-9 and e["ci_high"] <= 1300 / 300 + 1e-9
    assert e["ci_low"] < e["ratio"] < e["ci_high"]


def test_sample_efficiency_gradient_never_reaches_is_ratio_zero() -> None:
    base = _curves([[(0, 5.0), (100, 3.0), (1000, 1.0)], [(0, 5.0), (100, 3.5), (1000, 1.1)]])
    grad = _curves([[(0, 5.0), (100, 4.0), (1000, 3.0)], [(0, 5.0), (100, 4.2), (1000, 2.9)]])
    e = sample_efficiency(grad, base, m0=5.0, higher_is_better=False)
    assert e["status"] == "ratio" and e["steps_gradient"] is None
    assert e["ratio"] == e["ci_low"] == e["ci_high"] == 0.0


def test_sample_efficiency_no_learning_gets_no_ratio() -> None:
    grad = _curves([[(0, 0.0), (10, 1.0)], [(0, 0.0), (10, 1.0)]])
    flat = _curves([[(0, 0.0), (10, 0.0), (100, 0.0)], [(0, 0.0), (10, 0.0), (100, 0.0)]])
    noisy = _curves([[(0, 0.0), (100, 0.5)], [(0, 0.0), (100, -0.3)]])  # gain 0.1 < 3 SE = 1.2
    worse = _curves([[(0, 0.0), (100, -1.0)], [(0, 0.0), (100, -1.2)]])
    for base in (flat, noisy, worse):
        e = sample_efficiency(grad, base, m0=0.0, higher_is_better=True)
        assert e["status"] == "no learning" and e["ratio"] is None
    # one seed: the evaluation's SE decides
    single = _curves([[(0, 0.0), (100, 0.5)]])
    assert (
        sample_efficiency(grad, single, m0=0.0, higher_is_better=True, eval_se=0.2)["status"]
        == "no learning"
    )
    assert (
        sample_efficiency(grad, single, m0=0.0, higher_is_better=True, eval_se=0.1)["status"]
        == "ratio"
    )


def test_first_reach_interpolates_and_eval_thresholds_are_log_spaced() -> None:
    x, y = np.array([0, 100, 300]), np.array([1.0, 2.0, 4.0])
    assert first_reach(x, y, 3.0, 1.0) == pytest.approx(200.0)
    assert first_reach(x, y, 5.0, 1.0) is None
    assert first_reach(x, -y, -1.5, -1.0) == pytest.approx(50.0)
    from controlmd_envs.baselines import eval_thresholds

    assert eval_thresholds(640, 200_000) == [640, 1000, 3162, 10000, 31622, 100000, 200000]
    assert eval_thresholds(5, 31) == [5, 10, 31]


def test_cma_es_improves_the_exact_work_and_counts_its_steps() -> None:
    task = get_task("trap_drag", n_steps=20, low=-2.5, high=12.5)
    search = CMAES(task, n_pieces=4, replicas=32, seed=0, sigma0=0.2, popsize=6)
    start = task.exact_metric(search.incumbent())
    search.learn(12)
    assert search.md_steps == 12 * 6 * 32 * 20
    assert (
        task.exact_metric(search.incumbent()) < start - 1.0
    )  # 12.5 -> about 8.6 at the 4-piece optimum


def test_random_search_keeps_its_best_candidate() -> None:
    task = get_task("trap_drag", n_steps=20, low=-2.5, high=12.5)
    search = RandomSearch(task, n_pieces=4, replicas=8, seed=1, batch=5)
    start_score = search.score(np.zeros(4), search.seed)
    search.md_steps = 0
    search.learn(2)
    assert search.candidates == 10 and search.md_steps == 10 * 8 * 20
    assert search.best_score <= start_score
    assert search.score(search.best_x, search.seed) == search.best_score
    np.testing.assert_allclose(
        search.incumbent().values.detach(),
        actions_to_protocol(search.best_x.reshape(4, 1), task).values.detach(),
    )


def test_search_candidates_release_and_may_sit_on_the_bounds() -> None:
    task = get_task("polymer_fold", n_steps=100, controls=["torsion"], torsion_max=20.0)
    search = CMAES(task, n_pieces=2, replicas=2, seed=0, release_fraction=0.1)
    protocol = search.protocol(np.array([0.5, -0.5]))  # a = 15 then 5
    T = task.horizon
    with torch.no_grad():
        u = protocol(torch.tensor([0.2 * T, 0.7 * T, 0.9 * T, T], dtype=torch.float64))
    np.testing.assert_allclose(u[:2, 0].numpy(), [15.0, 5.0], rtol=1e-9)
    np.testing.assert_allclose(u[2:, 0].numpy(), 0.0, atol=1e-12)  # task.default_control()
    on_bounds = search.protocol(np.array([1.0, -1.0]))  # CMA-ES samples the bounds themselves
    with torch.no_grad():
        u = on_bounds(torch.tensor([0.2 * T, 0.7 * T], dtype=torch.float64))[:, 0]
    np.testing.assert_allclose(u.numpy(), [20.0 - 1e-4, 1e-4], rtol=1e-6)  # margin 1e-5 * 20 / 2
    with pytest.raises(ControlMDError, match=r"release_fraction must be in \[0, 0.5\), got 0.5"):
        RandomSearch(task, n_pieces=1, replicas=2, release_fraction=0.5)
    trap = get_task("trap_drag", n_steps=20)  # no default_control: nothing to release to
    with pytest.raises(ControlMDError, match="'trap_drag' has no no-control value"):
        actions_to_protocol(np.zeros((1, 1)), trap, release_fraction=0.1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            '[task]\nname = "nope"\n',
            r"\[task\] name: unknown value 'nope'; expected one of: .*trap_drag",
        ),
        ("[bogus]\nx = 1\n", r"unknown section \[bogus\]"),
        ('[compare]\nmethods = ["gradient"]\nbudget = 3\n', r"unknown key 'budget' in \[compare\]"),
        (
            '[compare]\nmethods = ["tabu"]\n',
            r"\[tabu\] algo: unknown value 'tabu'; expected one of: gradient, ppo",
        ),
        (
            '[compare]\nmethods = ["ppo"]\n[ppo]\nlearnig_rate = 0.1\n',
            r"unknown key 'learnig_rate' in \[ppo\].*learning_rate",
        ),
        (
            '[compare]\nmethods = ["cma_es"]\n[cma_es]\nsigma0 = "big"\n',
            r"\[cma_es\] sigma0 must be a finite number",
        ),
        (
            '[compare]\nmethods = ["gradient"]\n[gradient]\noptimizer = "newton"\n',
            r"\[train\] optimizer: unknown value 'newton'",
        ),
        (
            '[compare]\nmethods = ["gradient"]\ncontrol_interval = 7\n',
            r"control_interval = 7 must divide the task's n_steps = 100",
        ),
        (
            '[compare]\nmethods = ["gradient"]\neval_points = 4\n',
            r"\[compare\] eval_points was removed: evaluations are at log-spaced thresholds",
        ),
        (  # refused by stable-baselines3 itself: caught when the file is read
            '[compare]\nmethods = ["ppo"]\n[ppo]\nbatch_size = 1\n',
            r"\[ppo\] \(algo = 'ppo'\): AssertionError: .*batch_size",
        ),
        (
            '[compare]\nmethods = ["sac"]\n[sac]\nbuffer_size = "big"\n',
            r"\[sac\] \(algo = 'sac'\)",
        ),
        (
            '[compare]\nmethods = ["ppo"]\n[ppo]\nobservation = "pixels"\n',
            r"observation: unknown value 'pixels'",
        ),
    ],
)
def test_bad_configs_name_the_problem(tmp_path: Path, change: str, message: str) -> None:
    base = '[experiment]\nname = "x"\n'
    text = base + (
        change if change.startswith("[task]") else '[task]\nname = "trap_drag"\n' + change
    )
    with pytest.raises(ConfigError, match=message):
        load_compare_config(_write(tmp_path, text))


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path, '[experiment]\nname = "x"\n[task]\nname = "trap_drag"\n[compare]\nseeds = 0\n'
    )
    assert main(["compare", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "[compare] seeds must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_overrides_apply(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[experiment]\nname = "x"\n[task]\nname = "trap_drag"\n[compare]\nmethods = ["gradient"]\n',
    )
    cfg = load_compare_config(path, ["compare.seeds=2", "gradient.lr=0.5", "task.lambda_f=3.0"])
    assert cfg["compare"]["seeds"] == 2 and cfg["methods"]["gradient"]["lr"] == 0.5
    assert cfg["task"]["lambda_f"] == 3.0 and cfg["compare"]["n_pieces"] == 20


def test_policy_evaluation_equals_protocol_evaluation_and_ignores_chunks() -> None:
    """A time-only policy evaluated by batched env rollouts scores exactly like the K-piece
    protocol of its actions (the trainer's evaluation), whatever the chunk size."""
    from controlmd.train import evaluate
    from controlmd_envs.baselines import PolicyEvaluable, evaluate_policy

    task = get_task("trap_drag", n_steps=20, low=-2.5, high=12.5)
    actions = np.array([[-0.4], [-0.3], [-0.2], [0.1]])

    def policy(obs: np.ndarray) -> np.ndarray:
        return actions[np.round(obs[:, 0] * 4).astype(int)]

    candidate = PolicyEvaluable(policy, control_interval=5, observation="time")
    a = evaluate_policy(task, candidate, 10, 7, chunk=3)
    b = evaluate_policy(task, candidate, 10, 7, chunk=100)
    reference = evaluate(task, actions_to_protocol(actions, task), 10, 7)
    assert a == b
    assert (
        a.mean == pytest.approx(reference.mean, rel=1e-12)
        and a.md_steps == reference.md_steps == 200
    )


@pytest.mark.slow
def test_ppo_learns_trap_drag_toward_the_optimum(tmp_path: Path) -> None:
    """PPO on the time-only env improves the exact mean work of its deterministic protocol
    from the start (12.5, an instantaneous jump) to near the 4-piece optimum (about 8.6)."""
    from controlmd.logger import Logger
    from controlmd_envs.baselines import BudgetTracker, run_sb3

    task = get_task("trap_drag", n_steps=20, low=-2.5, high=12.5)
    tracker = BudgetTracker(
        task,
        budget_md_steps=300_000,
        eval_replicas=64,
        final_replicas=64,
        eval_seed=1,
        final_seed=2,
        wall_cap_s=600.0,
        logger=Logger(),
    )
    env = {
        "n_envs": 32,
        "observation": "time",
        "shaping": 0.0,
        "shaping_gamma": 1.0,
        "reward_scale": 0.1,
        "feature_scale": 1.0,
    }
    protocol = run_sb3(
        "ppo",
        task,
        tracker,
        env=env,
        params={"gamma": 1.0, "n_steps": 8, "batch_size": 64, "learning_rate": 1e-3},
        control_interval=5,
        seed=0,
        run_dir=tmp_path,
    )
    assert tracker.md_steps <= 300_000
    assert task.exact_metric(protocol) < 9.5


# ---------------------------------------------------------------------- runs as jobs (Ray / resume)

# Two methods x 1 seed, each run a second or two: gradient (the trainer), PPO (stable-baselines3), CMA-ES.
JOBS = (
    TINY.split("[compare]")[0]
    + """[compare]
methods = {methods}
seeds = 1
budget_md_steps = 4_000
control_interval = 5
eval_replicas = 16
final_replicas = 32
wall_cap_s = 60.0
"""
)
METHOD_SECTIONS = {
    "gradient": "[gradient]\nlr = 0.2\nreplicas = 16\n",
    "ppo": "[ppo]\nn_envs = 8\nn_steps = 4\nbatch_size = 32\nn_epochs = 1\n",
    "cma_es": "[cma_es]\nreplicas = 8\npopsize = 4\n",
}

needs_ray = pytest.mark.skipif(
    not ray_available(),
    reason="ray is not installed (pip install 'controlmd[dist]'); CI installs it",
)


def _jobs_experiment(tmp_path: Path, methods: list[str]) -> Path:
    return _write(
        tmp_path,
        JOBS.format(methods=json.dumps(methods)) + "".join(METHOD_SECTIONS[m] for m in methods),
    )


def _without_wall_times(obj: object) -> object:
    """A comparison.json without its wall-clock and CPU-time fields (they differ between any
    two runs)."""
    if isinstance(obj, dict):
        return {
            k: _without_wall_times(v)
            for k, v in obj.items()
            if "wall_s" not in k and "cpu_s" not in k and k != "cpu_seconds"
        }
    if isinstance(obj, list):
        return [_without_wall_times(v) for v in obj]
    return obj


@pytest.fixture
def one_thread() -> object:
    # Ray tasks run with cpus_per_job = 1 torch thread (and the killed subprocess with
    # OMP_NUM_THREADS=1); bit-equal results need the same thread count here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@needs_ray
def test_runs_on_local_ray_match_in_process_runs(tmp_path: Path, one_thread: object) -> None:
    """The runs of a comparison as Ray tasks (a local instance) give the in-process results.

    Slow (about 20 s on 2 loaded cores) for Ray alone: starting the instance takes ~7 s and
    each fresh worker imports torch and stable-baselines3 (~8 s); the runs take 0.3 s. The
    default suite runs Ray through tests/test_sweep.py (the same run_jobs)."""
    path = _jobs_experiment(tmp_path, ["ppo", "gradient"])
    cfg = load_compare_config(path)
    on_ray = run_comparison(cfg, out=tmp_path / "ray", progress=False, num_cpus=2, cpus_per_job=1)
    here = run_comparison(cfg, out=tmp_path / "here", progress=False, backend="local")
    assert on_ray.failed == here.failed == []
    assert on_ray.result["complete"] and set(on_ray.result["methods"]) == {"ppo", "gradient"}
    assert _without_wall_times(on_ray.result) == _without_wall_times(here.result)
    for run in ("ppo/seed3", "gradient/seed3"):
        ray_metrics = json.loads((tmp_path / "ray" / run / "metrics.json").read_text())
        assert _without_wall_times(ray_metrics) == _without_wall_times(
            json.loads((tmp_path / "here" / run / "metrics.json").read_text())
        )


@needs_ray
def test_unreachable_ray_address_is_named_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _jobs_experiment(tmp_path, ["cma_es", "gradient"])
    out = tmp_path / "out"
    assert (
        main(["compare", str(path), "--out", str(out), "--address", "127.0.0.1:1", "--quiet"]) == 2
    )
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in capsys.readouterr().err
    assert not out.exists()


def test_killed_comparison_resumes_only_the_unfinished_run(
    tmp_path: Path, one_thread: object
) -> None:
    path = _jobs_experiment(tmp_path, ["cma_es", "gradient"])
    out = tmp_path / "out"
    # cma_es/seed3 finishes; gradient/seed3 is hard-killed after 2 trainer iterations (like
    # kill -9: no metrics.json, no comparison.json).
    env = {**os.environ, "CONTROLMD_ABORT_AFTER": "2", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "controlmd",
        "compare",
        str(path),
        "--out",
        str(out),
        "--local",
        "--quiet",
    ]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 75, killed.stderr
    done, cut = out / "cma_es" / "seed3" / "metrics.json", out / "gradient" / "seed3"
    assert (
        done.is_file()
        and (cut / "progress.jsonl").is_file()
        and not (cut / "metrics.json").exists()
    )
    assert not (out / "comparison.json").exists()
    before = done.stat().st_mtime_ns, done.read_bytes()

    assert main(["compare", "--resume", str(out), "--local", "--quiet"]) == 0
    assert (done.stat().st_mtime_ns, done.read_bytes()) == before  # not redone
    resumed = json.loads((out / "comparison.json").read_text())
    assert resumed["complete"] and (out / "comparison.png").stat().st_size > 0
    # the same as a comparison that was never interrupted
    clean = run_comparison(
        load_compare_config(path), out=tmp_path / "clean", progress=False, backend="local"
    )
    assert _without_wall_times(resumed) == _without_wall_times(clean.result)
    # a resumed folder keeps its plan
    with pytest.raises(ConfigError, match=r"differ from its compare_config\.json"):
        main_compare(
            path, resume=out, overrides=["compare.seeds=2"], progress=False, backend="local"
        )
    with pytest.raises(ConfigError, match="exists and is not empty; continue it with --resume"):
        run_comparison(load_compare_config(path), out=out, progress=False, backend="local")


def test_cli_needs_an_experiment_or_a_comparison_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", "--local"]) == 2
    assert "give a comparison experiment file, or --resume DIR" in capsys.readouterr().err
    assert main(["compare", "--resume", str(tmp_path), "--local"]) == 2
    assert (
        f"{tmp_path} is not a comparison folder: it has no compare_config.json"
        in capsys.readouterr().err
    )
    path = _jobs_experiment(tmp_path, ["cma_es"])
    assert (
        main(["compare", str(path), "--local", "--address", "auto", "--out", str(tmp_path / "o")])
        == 2
    )
    assert (
        "--local runs in this process; it cannot be combined with --address"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()


def test_a_failed_run_is_recorded_and_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that raises is recorded (jobs[], error.txt, the table says failed, the error
    is printed even with --quiet), the others go on, and --resume re-runs it."""
    import controlmd_envs.compare as compare

    path = _jobs_experiment(tmp_path, ["cma_es", "ppo"])
    out = tmp_path / "out"
    real = compare._run_method

    def broken(method: str, *args: object, **kwargs: object) -> object:
        if method == "ppo":
            raise RuntimeError("simulated crash in ppo")
        return real(method, *args, **kwargs)

    monkeypatch.setattr(compare, "_run_method", broken)
    assert main(["compare", str(path), "--out", str(out), "--local", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "ppo/seed3: FAILED: RuntimeError: simulated crash in ppo" in err
    assert f"re-run them with: controlmd compare --resume {out}" in err
    result = json.loads((out / "comparison.json").read_text())
    assert not result["complete"]
    assert result["jobs"] == [
        {"method": "cma_es", "seed": 3, "status": "done", "message": ""},
        {
            "method": "ppo",
            "seed": 3,
            "status": "failed",
            "message": "RuntimeError: simulated crash in ppo",
            "traceback": "ppo/seed3/error.txt",
        },
    ]
    assert "simulated crash" in (out / "ppo" / "seed3" / "error.txt").read_text()
    table = (out / "comparison.md").read_text()
    assert "| ppo | failed |" in table and "| cma_es | " in table and "INCOMPLETE" in table
    assert result["curves"]["ppo"] == {} and result["sample_efficiency"] == {}

    monkeypatch.setattr(compare, "_run_method", real)
    assert main(["compare", "--resume", str(out), "--local", "--quiet"]) == 0
    resumed = json.loads((out / "comparison.json").read_text())
    assert resumed["complete"] and [j["status"] for j in resumed["jobs"]] == ["done", "done"]
    assert not (out / "ppo" / "seed3" / "error.txt").exists()


def test_saturated_actions_are_clipped_and_nan_actions_named() -> None:
    """A deterministic policy at the bound (or 1e-7 past it, float rounding) gives a valid
    protocol; a NaN action is an error naming the method and the training MD step."""
    from controlmd.errors import ControlMDError
    from controlmd_envs.baselines import PROTOCOL_MARGIN, policy_protocol

    task = get_task("trap_drag", n_steps=20, low=-2.5, high=12.5)
    protocol = policy_protocol(
        np.array([[-1.0 - 1e-7], [1.0], [1.0 + 1e-7], [0.0]]), task, method="ppo", md_steps=10
    )
    T = task.horizon
    u = np.array([float(protocol(torch.tensor(T * (j + 0.5) / 4)).detach()) for j in range(4)])
    half_width = PROTOCOL_MARGIN * 15.0 / 2
    np.testing.assert_allclose(
        u, [-2.5 + half_width, 12.5 - half_width, 12.5 - half_width, 5.0], atol=1e-9
    )
    with pytest.raises(
        ControlMDError, match=r"ppo: the policy's action is NaN at training MD step 640"
    ):
        policy_protocol(np.array([[0.0], [np.nan], [0.0], [0.0]]), task, method="ppo", md_steps=640)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["trap_drag", "isomerization", "assembly", "polymer_fold"])
def test_quick_comparisons_finish_every_job(task: str, tmp_path: Path) -> None:
    """experiments/<task>_compare_quick.toml: every job done, curves and sample efficiency
    present for every method (a few minutes each on 2 cores)."""
    out = tmp_path / "out"
    path = ROOT / "experiments" / f"{task}_compare_quick.toml"
    assert main(["compare", str(path), "--out", str(out), "--quiet", "--local"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert result["complete"] and all(j["status"] == "done" for j in result["jobs"])
    cfg = load_compare_config(path)
    seeds = {str(cfg["experiment"]["seed"] + j) for j in range(cfg["compare"]["seeds"])}
    for method in cfg["methods"]:
        assert set(result["curves"][method]) == seeds
        for curve in result["curves"][method].values():
            assert curve["md_steps"][0] == 0 and len(curve["md_steps"]) >= 3
            assert curve["md_steps"][-1] <= cfg["compare"]["budget_md_steps"]
    assert set(result["sample_efficiency"]) == set(cfg["methods"]) - {"gradient"}
    assert (out / "comparison.png").stat().st_size > 0


@pytest.mark.parametrize(
    "path", sorted((ROOT / "experiments").glob("*_compare*.toml")), ids=lambda p: p.stem
)
def test_shipped_compare_files_are_valid(path: Path) -> None:
    """Every shipped comparison file reads, and every method in it builds (a value a
    library refuses would fail here, not in a job)."""
    cfg = load_compare_config(path)
    assert cfg["compare"]["n_pieces"] >= 2 and set(cfg["methods"]) == set(cfg["compare"]["methods"])
