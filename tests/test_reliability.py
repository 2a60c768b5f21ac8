"""Runs at the edges: bad files and flags, locks, signals, kills at any moment, corrupted
checkpoints (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from controlmd.checkpoint import backup_path, load_checkpoint, save_checkpoint
from controlmd.cli import main
from controlmd.errors import ControlMDError
from controlmd.runfolder import LOCK_FILE, RunFolder

TINY = """
[experiment]
name = "{name}"
seed = 3

[task]
name = "trap_drag"
n_steps = 10

[protocol]
kind = "chebyshev"
degree = 2
init = [0.0, 5.0]

[train]
lr = 0.05
iterations = {iterations}
replicas = 16
variance_every = 0

[eval]
replicas = 20
every = 0
final_replicas = {final}

[logging]
checkpoint_every = 1
histogram_every = 0
tensorboard = false
plots = false
progress = false
"""

TIMING_KEYS = {"wall_s", "cpu_s"}


def _experiment(tmp_path: Path, name: str = "tiny", iterations: int = 6, final: int = 100) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(name=name, iterations=iterations, final=final))
    return path


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlmd", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


# ---------------------------------------------------------------------- bad input, CLI


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    good = _experiment(tmp_path)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(TINY.format(name="caf\xe9", iterations=1, final=10).encode("latin-1"))
    broken = tmp_path / "broken.toml"
    broken.write_text("[experiment\nname = 1\n")
    clutter = tmp_path / "clutter"
    clutter.mkdir()
    (clutter / "notes.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    return [
        (["run", str(tmp_path / "missing.toml")], "missing.toml' does not exist"),
        (["run", str(folder)], "is a folder, not a file"),
        (["run", str(latin1)], "is not UTF-8 text"),
        (["run", str(broken)], "invalid TOML"),
        (["run", str(good), "--set", "experiment.name=../x"], "[experiment] name must be a plain"),
        (["run", str(good), "--set", "experiment.name=/abs"], "[experiment] name must be a plain"),
        (["run", str(good), "--set", 'experiment.name=""'], "[experiment] name must be a plain"),
        (["run", str(good), "--set", "experiment.name=a/b"], "[experiment] name must be a plain"),
        (["run", str(good), "--out", str(clutter)], "is not empty and is not a controlmd run"),
        (["run", str(good), "--out", str(a_file)], "is a file, not a folder"),
        (["run", str(good), "--seed", "-1"], "[experiment] seed must be >= 0"),
        (["run", str(good), "--set", "train.lr=-1"], "[train] lr must be > 0"),
        (["run", str(good), "--set", "train.nope=1"], "unknown key 'nope' in [train]"),
        (["run", "--resume", str(tmp_path / "nowhere")], "no such run folder"),
        (["run", "--resume", str(not_a_run)], "is not a run folder: it has no config.toml"),
        (["eval", str(not_a_run)], "has no config.toml"),
        (["run", str(good), "--set", "train.lr"], "--set expects section.key=value"),
        (["run", str(good), "--set", "nope.x=1"], "unknown section [nope]"),
        (
            ["run", str(good), "--set", "train.replicas=0"],
            "tiny.toml: [train] replicas must be >= 1",
        ),
        (["run", str(good), "--set", "task.n_steps=-3"], "n_steps must be >= 1, got -3"),
        (["run", str(good), "--set", "task.name=nope"], "[task] name: unknown value 'nope'"),
        (["run", str(good), "--set", "task.name=nomod:Cls"], "cannot import module 'nomod'"),
        (
            ["run", str(good), "--set", "protocol.kind=nope"],
            "[protocol] kind: unknown value 'nope'",
        ),
        (["run", str(good), "--set", "protocol.t_final=2.0"], "[protocol] t_final = 2.0 differs"),
        (["run", str(good), "--seeds", "0"], "seeds must be >= 1"),
        (["sweep", str(tmp_path / "missing.toml")], "missing.toml' does not exist"),
        (["compare", str(tmp_path / "missing.toml")], "missing.toml' does not exist"),
        (["ibi", str(tmp_path / "missing.toml")], "missing.toml' does not exist"),
        (["report", str(not_a_run)], "has no config.toml"),
    ]


def test_bad_input_gets_one_line_and_exit_status_2(tmp_path: Path, capsys) -> None:
    for argv, message in _bad_inputs(tmp_path):
        status = main(argv)
        err = capsys.readouterr().err
        assert status == 2, (argv, err)
        assert message in err, (argv, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (Path("runs") / "x").exists()


def test_a_finished_run_refuses_bad_files_and_changed_keys(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "run",
                str(_experiment(tmp_path, iterations=1, final=10)),
                "--out",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    (run / "protocol_initial.pt").write_bytes(b"not a torch file")
    cases = [
        (["run", "--resume", str(run), "--set", "train.lr=0.5"], "train.lr"),
        (["eval", str(run), "--protocol", "missing.pt"], "missing.pt"),
        (["eval", str(run), "--protocol", "protocol_initial.pt"], "protocol_initial.pt"),
        (["eval", str(run), "--replicas", "0"], "replicas"),
    ]
    for argv, name in cases:
        status = main(argv)
        err = capsys.readouterr().err
        assert status == 2, (argv, err)
        assert name in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)


def test_an_invalid_config_leaves_no_run_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", str(_experiment(tmp_path)), "--out", str(out), "--set", "train.lr=0"]) == 2
    assert not out.exists()


def test_the_run_folder_exists_before_torch_loads(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = (
        "import sys\n"
        "from controlmd.commands import run as command\n"
        "def probe(folder, args):\n"
        "    print(sorted(p.name for p in folder.path.iterdir()), 'torch' in sys.modules)\n"
        "    return 0\n"
        "command._run_in = probe\n"
        "from controlmd.cli import main\n"
        f"sys.exit(main(['run', {str(_experiment(tmp_path))!r}, '--out', {str(out)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("] ")[-1].strip() == "False"  # torch not loaded yet
    assert "'config.toml'" in proc.stdout and f"'{LOCK_FILE}'" in proc.stdout
    assert not (out / LOCK_FILE).exists()  # released at exit


# ---------------------------------------------------------------------- checkpoints


def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"trainer": {"iteration": 1}})
    save_checkpoint(path, {"trainer": {"iteration": 2}})
    assert load_checkpoint(path)["trainer"]["iteration"] == 2
    assert torch.load(backup_path(path), weights_only=False)["trainer"]["iteration"] == 1
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.warns(RuntimeWarning, match="resuming from the previous checkpoint"):
        assert load_checkpoint(path)["trainer"]["iteration"] == 1
    with pytest.raises(ControlMDError, match="unreadable"):
        load_checkpoint(path, fallback=False)
    path.unlink()
    backup_path(path).write_bytes(b"")
    with pytest.raises(ControlMDError, match=r"checkpoint\.prev\.pt' is unreadable"):
        load_checkpoint(path)


def test_an_unknown_checkpoint_version_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "controlmd.checkpoint/99"}, path)
    with pytest.raises(ControlMDError, match=r"format 'controlmd\.checkpoint/99', which this"):
        load_checkpoint(path, fallback=False)


def test_a_read_only_folder_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    path = tmp_path / "ro" / "checkpoint.pt"
    save_checkpoint(path, {"trainer": {"iteration": 1}})
    path.parent.chmod(0o500)
    try:
        with pytest.raises(ControlMDError, match="cannot write"):
            save_checkpoint(path, {"trainer": {"iteration": 2}})
    finally:
        path.parent.chmod(0o700)
    assert load_checkpoint(path)["trainer"]["iteration"] == 1


# ---------------------------------------------------------------------- locks and signals


def test_a_second_process_on_a_run_folder_is_refused(tmp_path: Path) -> None:
    first = RunFolder.new(tmp_path / "run")
    try:
        (tmp_path / "run" / "config.toml").write_text("")
        with pytest.raises(ControlMDError, match=f"is in use by process {os.getpid()}"):
            RunFolder.existing(tmp_path / "run")
    finally:
        first.release()


def test_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    import socket

    (run / LOCK_FILE).write_text(
        json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "then"})
    )
    with pytest.warns(RuntimeWarning, match="left by a process that is gone"):
        folder = RunFolder.existing(run)
    folder.release()
    assert not (run / LOCK_FILE).exists()


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlmd",
            "run",
            str(_experiment(tmp_path, iterations=100000)),
            "--out",
            str(out),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not (out / "checkpoint.prev.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after iteration" in err and "--resume" in err
    assert "Traceback" not in err
    assert not (out / LOCK_FILE).exists() and not (out / "metrics.json").exists()
    it = load_checkpoint(out / "checkpoint.pt")["trainer"]["iteration"]
    assert it >= 1


def test_a_run_killed_before_its_first_checkpoint_restarts_in_place(tmp_path: Path) -> None:
    out = tmp_path / "run"
    reference = tmp_path / "reference"
    experiment = _experiment(tmp_path)
    assert _cli("run", str(experiment), "--out", str(reference), "--quiet").returncode == 0
    out.mkdir()
    (out / "config.toml").write_text(experiment.read_text())  # a kill right after start
    (out / "progress.jsonl").write_text('{"step": 0}\n')  # and some debris
    assert _cli("run", "--resume", str(out), "--quiet").returncode == 0
    a = json.loads((reference / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == {
        k: v for k, v in b.items() if k not in TIMING_KEYS
    }


# ---------------------------------------------------------------------- kill at any moment


def _logged_steps(run: Path) -> list[int]:
    lines = (run / "progress.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.mark.slow
def test_kill_at_any_moment_resumes_to_the_same_bits(tmp_path: Path) -> None:
    """SIGKILL at >= 10 moments spread over a run (start, first iteration, training, the
    final evaluation), resume each, and require the uninterrupted run's metrics.json (all
    but the timings) and protocol.pt bit for bit, with no duplicated or missing steps."""
    experiment = _experiment(tmp_path, iterations=8, final=20000)
    reference = tmp_path / "reference"
    t0 = time.perf_counter()
    assert _cli("run", str(experiment), "--out", str(reference), "--quiet").returncode == 0
    duration = time.perf_counter() - t0
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    ref_protocol = (reference / "protocol.pt").read_bytes()
    rng = random.Random(0)
    moments = sorted([0.05, 0.3] + [rng.uniform(0.3, 1.0) * duration for _ in range(10)])
    for k, delay in enumerate(moments):
        out = tmp_path / f"killed{k}"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controlmd",
                "run",
                str(experiment),
                "--out",
                str(out),
                "--quiet",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if not out.exists():
            continue  # killed before the folder was made: nothing to resume
        resumed = _cli("run", "--resume", str(out), "--quiet")
        assert resumed.returncode == 0, (delay, resumed.stderr)
        metrics = json.loads((out / "metrics.json").read_text())
        assert {k2: v for k2, v in metrics.items() if k2 not in TIMING_KEYS} == {
            k2: v for k2, v in ref_metrics.items() if k2 not in TIMING_KEYS
        }, delay
        assert (out / "protocol.pt").read_bytes() == ref_protocol, delay
        assert _logged_steps(out) == _logged_steps(reference), delay


CROSS_PROCESS = """
[experiment]
name = "xproc"
seed = 5

[task]
name = "trap_drag"
n_steps = 20

[protocol]
kind = "mlp"
hidden = [16, 16]
n_frequencies = 3
init = [0.0, 5.0]

[train]
lr = 0.01
iterations = 3
replicas = 64

[eval]
replicas = 100
every = 0
final_replicas = 200

[logging]
checkpoint_every = 0
histogram_every = 0
tensorboard = false
plots = false
progress = false
"""


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 50 processes: ~2 min on 2 idle cores, far longer on a loaded one
def test_fifty_processes_give_the_same_bits(tmp_path: Path) -> None:
    """The same MLP-protocol run (MKL matrix products) in 50 separate processes, two at a
    time: protocol.pt and metrics.json (all but the timings) identical bit for bit."""
    path = tmp_path / "xproc.toml"
    path.write_text(CROSS_PROCESS)
    outputs: set[tuple[bytes, str]] = set()
    for pair in range(25):
        outs = [tmp_path / f"run{pair}_{k}" for k in range(2)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "controlmd", "run", str(path), "--out", str(o), "--quiet"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            for o in outs
        ]
        for p in procs:
            assert p.wait(timeout=600) == 0, p.stderr.read() if p.stderr else ""
        for o in outs:
            metrics = json.loads((o / "metrics.json").read_text())
            kept = {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
            outputs.add(((o / "protocol.pt").read_bytes(), json.dumps(kept, sort_keys=True)))
    assert len(outputs) == 1
