"""The GPU benchmark suite behind ``benchmarks/gpu.sh``: every number in one JSON file.

Parts, each run as its own subprocess with a timeout (a part that fails, times out or
cannot run is recorded with the reason, and the suite goes on; the JSON is rewritten
after every part, so a suite cut short still leaves what it measured):

* ``lj``: ``benchmarks/lj_throughput.py --device D --n N --reversible --json`` for
  N = 1e3, 1e4, 1e5 (float32; forward, forward+gradient direct and reversible, peak
  memory), with ``--jax-md`` (the JAX MD peer, in the same invocation) where ``jax_md``
  imports.
* ``small_batch``: ``benchmarks/small_batch.py --device D --replicas 4096 16384 65536``
  (both control workloads, float32 and float64, forward and forward+gradient; its own
  JAX MD peer where available) when that script exists; otherwise recorded as skipped.
* ``isomerization``: the paper's 50 Adam steps, ``controlmd run
  experiments/isomerization.toml --set task.device=D``, in a temporary run folder: wall
  and CPU time, and the yields after 0 / 10 / 26 / 50 steps against the CPU values
  recorded in docs/isomerization.md.

``--dry-run`` shrinks every part (LJ N = 256 for 20 steps, B = 8 replicas for 5 steps,
the 360-state quick isomerization config for 2 steps) to check the plumbing on any
device, e.g. ``benchmarks/gpu.sh --device cpu --dry-run`` (a test runs it).

Units: reduced LJ units for the classical parts, eV and fs for the isomerization.

Usage::

    benchmarks/gpu.sh                          # on a GPU machine: cuda, full sizes
    benchmarks/gpu.sh --device cpu --dry-run --out /tmp/gpu_suite.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
PARTS = ("lj", "small_batch", "isomerization")

# The paper run on the CPU (docs/isomerization.md): time-averaged yield after n Adam steps.
ISOMERIZATION_CPU_YIELDS = {0: 0.59262, 10: 0.6831, 26: 0.7502, 50: 0.8060}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="torch device of every part (cuda, cpu)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes: checks the plumbing")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument(
        "--out",
        default=None,
        help="JSON file (default: $OUT/gpu_suite.json when OUT is set, else ./gpu_suite.json)",
    )
    p.add_argument("--lj-n", nargs="+", type=int, default=None, help="LJ sizes")
    p.add_argument("--replicas", nargs="+", type=int, default=None, help="small-batch B")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of each part")
    p.add_argument("--no-jax", action="store_true", help="skip the JAX MD peers")
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds per subprocess (default by part)"
    )
    return p.parse_args(argv)


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    """Interpreter, torch, device and optional packages, read in a subprocess so that a
    broken import is reported instead of ending the suite."""
    probe = (
        "import json, platform, torch\n"
        "out = {'python': platform.python_version(), 'torch': torch.__version__,\n"
        "       'cuda_available': torch.cuda.is_available()}\n"
        f"dev = torch.device({args.device!r})\n"
        "if dev.type == 'cuda' and torch.cuda.is_available():\n"
        "    out['gpu'] = torch.cuda.get_device_name(dev)\n"
        "    out['gpu_memory_gib'] = torch.cuda.get_device_properties(dev).total_memory / 2**30\n"
        "try:\n"
        "    import controlmd\n"
        "    out['controlmd_import'] = 'ok'\n"
        "except Exception as exc:\n"
        "    out['controlmd_import'] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(out))\n"
    )
    env: dict[str, Any] = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "executable": sys.executable,
        "git_commit": _git_commit(),
        "jax_md_available": _importable("jax_md"),
        "jax_available": _importable("jax"),
    }
    proc = _run([sys.executable, "-c", probe], 300.0)
    env.update(proc.get("json") or {"probe_error": proc.get("error")})
    return env


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def _run(cmd: list[str], timeout: float, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; return its wall time, exit status, the last JSON line it printed
    (``json``) and, when it failed, the end of its error output."""
    env = {**os.environ, **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"command": cmd, "error": f"timeout after {timeout:g} s"}
    row: dict[str, Any] = {
        "command": cmd,
        "wall_s": time.perf_counter() - t0,
        "returncode": proc.returncode,
    }
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                row["json"] = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
    return row


# --------------------------------------------------------------------------- parts


def part_lj(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    sizes = args.lj_n or ([256] if args.dry_run else [1000, 10_000, 100_000])
    jax_md = env["jax_md_available"] and not args.no_jax
    out: dict[str, Any] = {"jax_md_peer": jax_md or "skipped: jax_md does not import here"}
    runs = []
    for n in sizes:
        steps = 20 if args.dry_run else (200 if n <= 10_000 else 100)
        cmd = [
            sys.executable,
            str(BENCH / "lj_throughput.py"),
            "--device",
            args.device,
            "--n",
            str(n),
            "--steps",
            str(steps),
            "--repeats",
            "1" if args.dry_run else "3",
            "--equilibrate",
            "20" if args.dry_run else "200",
            "--threads",
            str(args.threads or (1 if args.dry_run else 8)),
            "--reversible",
            "--json",
        ]
        if jax_md:
            cmd.append("--jax-md")
        timeout = args.timeout or (300.0 if args.dry_run else 900.0)
        runs.append({"n": n, **_run(cmd, timeout)})
    out["runs"] = runs
    return out


def part_small_batch(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    script = BENCH / "small_batch.py"
    if not script.is_file():
        return {"skipped": f"{script.relative_to(ROOT)} not found (written on another branch)"}
    replicas = args.replicas or ([8] if args.dry_run else [4096, 16384, 65536])
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "small_batch.json"
        cmd = [
            sys.executable,
            str(script),
            "--device",
            args.device,
            "--replicas",
            *map(str, replicas),
            "--threads",
            str(args.threads or 1),
            "--json",
            str(result),
        ]
        if args.dry_run:
            cmd += ["--steps", "5", "--grad-steps", "5", "--repeats", "1"]
        if args.no_jax or not env["jax_md_available"]:
            cmd.append("--no-jax")
        row = _run(cmd, args.timeout or (600.0 if args.dry_run else 1800.0))
        if result.is_file():
            row["results"] = json.loads(result.read_text())
    if row.get("returncode") == 2 and "--device" in row.get("error", ""):
        row["hint"] = "small_batch.py does not accept --device yet"
    return row


def part_isomerization(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    config = "isomerization_quick.toml" if args.dry_run else "isomerization.toml"
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "controlmd.cli",
            "run",
            str(ROOT / "experiments" / config),
            "--out",
            str(run_dir),
            "--quiet",
            "--set",
            f"task.device={args.device}",
        ]
        if args.dry_run:  # no figures or event files: the plumbing only
            cmd += ["--set", "train.iterations=2", "--set", "logging.plots=false"]
            cmd += ["--set", "logging.tensorboard=false"]
        # one BLAS thread: the propagation loop is a chain of small products (docs/performance.md)
        threads = {"OMP_NUM_THREADS": str(args.threads or 1)}
        row = _run(cmd, args.timeout or (600.0 if args.dry_run else 1200.0), threads)
        metrics_file, progress_file = run_dir / "metrics.json", run_dir / "progress.jsonl"
        if metrics_file.is_file() and progress_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            # the loss logged at step i is -Y of the field after i - 1 Adam steps
            yields = {
                int(r["step"]) - 1: -float(r["train/loss"])
                for r in map(json.loads, progress_file.read_text().splitlines())
                if r.get("train/loss") is not None
            }
            yields[int(metrics["iterations"])] = float(metrics["metric_final"])
            row["config"] = config
            row["run_wall_s"] = metrics.get("wall_s")
            row["run_cpu_s"] = metrics.get("cpu_s")
            row["yields"] = {str(k): yields[k] for k in sorted(yields)}
            if not args.dry_run:
                row["yield_minus_cpu_reference"] = {
                    str(k): yields[k] - v
                    for k, v in ISOMERIZATION_CPU_YIELDS.items()
                    if k in yields
                }
    return row


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    default = Path(os.environ["OUT"]) / "gpu_suite.json" if os.environ.get("OUT") else None
    out = Path(args.out) if args.out else default or Path("gpu_suite.json")
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "device": args.device,
        "dry_run": args.dry_run,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": _environment(args),
        "parts": {},
    }
    _write(out, result)
    runners = {"lj": part_lj, "small_batch": part_small_batch, "isomerization": part_isomerization}
    imported = result["environment"].get("controlmd_import") == "ok"
    for name in args.parts:
        print(f"[gpu_suite] {name} ...", file=sys.stderr, flush=True)
        if not imported:
            result["parts"][name] = {
                "skipped": "controlmd does not import here: "
                f"{result['environment'].get('controlmd_import')} (carry the missing "
                "packages as wheels, see the device README)"
            }
        else:
            t = time.perf_counter()
            result["parts"][name] = runners[name](args, result["environment"])
            result["parts"][name]["part_wall_s"] = time.perf_counter() - t
        result["total_wall_s"] = time.perf_counter() - t0
        result["load_average_after"] = os.getloadavg()
        _write(out, result)
    print(f"[gpu_suite] wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
