"""LJ fluid throughput: forward and forward+gradient MD steps per second, and peak memory.

System (reduced LJ units): N particles at density 0.8, kT = 1, dt = 0.005, LJ cut at 2.5
and energy-shifted, Verlet neighbor list with skin 0.5 (rebuilt once a particle moved
more than skin/2), velocity Verlet (NVE). The fcc start is melted and equilibrated at
kT = 1 (velocity rescaling, float64) before anything is timed; both engines then start
from the same positions and momenta.

* ``forward_steps_per_s``: ``simulate(..., gradient="none")``.
* ``forward_grad_steps_per_s``: the same run with ``epsilon`` learnable, then the
  gradient of the final potential energy per particle with respect to epsilon through the
  whole run (``gradient="direct"``: autograd over the fused analytic LJ kernel). With
  ``--reversible`` also the reversible path (:mod:`controlmd.dynamics.reversible`).
* ``*_per_cpu_s``: the same rates per second of process CPU time (both engines run one
  thread with ``--threads 1``): on a shared, overloaded machine wall time mostly measures
  how often the process was descheduled, CPU time much less so.
* peak memory: resident set size (CPU, ``VmHWM`` reset before each phase) or
  ``torch.cuda.max_memory_allocated`` (CUDA), in MiB.

``--jax-md`` runs the identical system in JAX MD (same initial state, same shifted LJ,
same list radius and rebuild rule, ``simulate.nve``, jit over a ``fori_loop``, float32
unless ``--dtype float64``) in a subprocess and adds its numbers and the ratios
controlmd / JAX MD. Timings are the best of ``--repeats`` runs (the machine is shared).

Usage::

    python benchmarks/lj_throughput.py --n 1000 --steps 200 --json --jax-md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from controlmd.dynamics.nve import NVE
from controlmd.lattice import lattice
from controlmd.neighbors import NeighborList
from controlmd.potentials.pair import LennardJones
from controlmd.rng import ReplicaRNG
from controlmd.simulate import simulate
from controlmd.space import Space, periodic

DENSITY = 0.8
KT = 1.0
DT = 0.005
R_CUT = 2.5


# --------------------------------------------------------------------------- system


def lj_fluid(
    n: int, *, equilibrate: int = 300, skin: float = 0.5, seed: int = 0, n_replicas: int = 1
) -> tuple[Space, torch.Tensor, torch.Tensor]:
    """An equilibrated LJ fluid: ``(space, R [B, n, 3], P [B, n, 3])`` in float64 on CPU.

    fcc start at density 0.8, momenta at kT = 1, ``equilibrate`` NVE steps with the
    momenta rescaled to kT = 1 every 10 steps.
    """
    R0, box = lattice("fcc", n, density=DENSITY)
    space = periodic(box)
    nve = _nve(space, skin, learnable=False)
    R = R0.unsqueeze(0).expand(n_replicas, n, 3).contiguous()
    state = nve.init(R, kT=KT, rng=ReplicaRNG(seed, n_replicas))
    with torch.no_grad():
        for k in range(0, equilibrate, 10):
            state = simulate(nve, state, min(10, equilibrate - k), gradient="none").final
            T = nve.temperature(state)
            state = state.replace(P=state.P * torch.sqrt(KT / T).view(-1, 1, 1))
    return space, state.R, state.P


def _nve(space: Space, skin: float, *, learnable: bool) -> NVE:
    nl = NeighborList(space, R_CUT, skin=skin)
    lj = LennardJones(
        space,
        r_cut=R_CUT,
        shift="energy",
        neighbor_list=nl,
        learnable=("epsilon",) if learnable else False,
    )
    return NVE(lj, dt=DT, space=space)


# --------------------------------------------------------------------------- memory


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        except OSError:
            pass


def _peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- controlmd


def run_controlmd(args: argparse.Namespace, space: Space, R: torch.Tensor, P: torch.Tensor) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    R, P = R.to(device, dtype), P.to(device, dtype)
    out: dict = {}

    nve = _nve(space, args.skin, learnable=False).to(device)
    state = nve.init(R, P=P)
    with torch.no_grad():
        simulate(nve, state, 20, gradient="none")  # warm-up (allocator, first list)
        best = math.inf
        nl = nve.potential.selection.neighbor_list
        _reset_peak(device)
        best_cpu = math.inf
        for _ in range(args.repeats):
            builds = nl.n_builds
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            final = simulate(nve, state, args.steps, gradient="none").final
            _sync(device)
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        out["forward_steps_per_s"] = args.steps / best
        out["forward_steps_per_cpu_s"] = args.steps / best_cpu
        out["peak_memory_forward_mib"] = _peak_mib(device)
        out["neighbor_rebuilds"] = nl.n_builds - builds
        out["pairs"] = len(nl.pairs)
        n = R.shape[1]
        out["total_energy_per_particle_start_end"] = [
            float(nve.energy(nve.prepare(state))) / n,
            float(nve.energy(final)) / n,
        ]

    # reversible first: freed heap stays resident, so the later (larger) direct phase's
    # peak is still its own (gradient_memory.py isolates paths in subprocesses)
    paths = (["reversible"] if args.reversible else []) + ["direct"]
    for path in paths:
        nve = _nve(space, args.skin, learnable=True).to(device)
        best, best_cpu, grad = math.inf, math.inf, None
        _reset_peak(device)
        for _ in range(args.repeats):
            nve.zero_grad()
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            state = nve.init(R, P=P)
            if path == "direct":
                final = simulate(nve, state, args.steps, gradient="direct").final
            else:
                from controlmd.dynamics.reversible import simulate_reversible

                final = simulate_reversible(nve, state, args.steps, window=args.window)
            loss = nve.potential.energy(final.R).sum() / R.shape[1]
            loss.backward()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
            grad = float(nve.potential.epsilon.grad)
        key = (
            "forward_grad_steps_per_s"
            if path == "direct"
            else "forward_grad_reversible_steps_per_s"
        )
        out[key] = args.steps / best
        out[key.replace("_per_s", "_per_cpu_s")] = args.steps / best_cpu
        out[f"peak_memory_grad_{path}_mib"] = _peak_mib(device)
        out[f"grad_epsilon_{path}"] = grad
    return out


# --------------------------------------------------------------------------- JAX MD


def run_jax_md(args: argparse.Namespace, space: Space, R: torch.Tensor, P: torch.Tensor) -> dict:
    """Run the identical system in JAX MD in a subprocess (separate memory and threads)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.pt"
        torch.save({"R": R[0].numpy(), "P": P[0].numpy(), "box": float(space.box[0])}, path)
        cmd = [
            sys.executable,
            __file__,
            "--jax-md-worker",
            str(path),
            "--steps",
            str(args.steps),
            "--dtype",
            args.dtype,
            "--skin",
            str(args.skin),
            "--repeats",
            str(args.repeats),
            "--jax-md-format",
            args.jax_md_format,
            "--n",
            str(args.n),
        ]
        if args.jax_md_grad_steps is not None:
            cmd += ["--jax-md-grad-steps", str(args.jax_md_grad_steps)]
        env = dict(os.environ)
        if args.threads == 1:
            env["XLA_FLAGS"] = (
                env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                " intra_op_parallelism_threads=1"
            ).strip()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.jax_md_timeout, env=env
        )
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _jax_md_worker(args: argparse.Namespace) -> None:
    import dataclasses

    import jax
    import jax.numpy as jnp

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from jax_md import energy, partition, smap
    from jax_md import simulate as jsim
    from jax_md import space as jspace

    data = torch.load(args.jax_md_worker, weights_only=False)
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    R0 = jnp.asarray(data["R"], dtype=dtype)
    P0 = jnp.asarray(data["P"], dtype=dtype)
    L = data["box"]
    N = R0.shape[0]
    disp, shift = jspace.periodic(L)

    def lj_shifted(dr, sigma=1.0, epsilon=1.0, **unused):
        # padded list entries have dr = 0: evaluate them (and r >= r_c) at r_c, where the
        # shifted energy is exactly 0, so no inf/NaN enters the gradient
        rc = jnp.asarray(R_CUT, dr.dtype)
        r = jnp.where((dr > 0) & (dr < rc), dr, rc)
        return energy.lennard_jones(r, sigma, epsilon) - energy.lennard_jones(rc, sigma, epsilon)

    fmt = getattr(partition.NeighborListFormat, args.jax_md_format)
    neighbor_fn = partition.neighbor_list(disp, L, R_CUT, dr_threshold=args.skin, format=fmt)
    energy_fn = smap.pair_neighbor_list(
        lj_shifted, jspace.canonicalize_displacement_or_metric(disp), sigma=1.0, epsilon=1.0
    )
    init_fn, apply_fn = jsim.nve(energy_fn, shift, DT)
    nbrs0 = neighbor_fn.allocate(R0)
    key = jax.random.PRNGKey(0)

    def start(eps, nbrs):
        state = init_fn(key, R0, kT=KT, neighbor=nbrs, epsilon=eps)
        return dataclasses.replace(state, momentum=P0)

    def run(eps, nbrs, n_steps):
        def body(_, carry):
            state, nb = carry
            state = apply_fn(state, neighbor=nb, epsilon=eps)
            return state, nb.update(state.position)

        return jax.lax.fori_loop(0, n_steps, body, (start(eps, nbrs), nbrs))

    eps0 = jnp.asarray(1.0, dtype)
    out: dict = {"jax": jax.__version__}

    forward = jax.jit(lambda nb: run(eps0, nb, args.steps))
    t0 = time.perf_counter()
    state, nb = forward(nbrs0)
    state.position.block_until_ready()
    out["forward_compile_and_run_s"] = time.perf_counter() - t0
    if bool(nb.did_buffer_overflow):
        nbrs0 = neighbor_fn.allocate(R0, extra_capacity=int(0.5 * nbrs0.idx.shape[-1]))
        forward = jax.jit(lambda nb: run(eps0, nb, args.steps))
        state, nb = forward(nbrs0)
        state.position.block_until_ready()
    best, best_cpu = math.inf, math.inf
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        state, nb = forward(nbrs0)
        state.position.block_until_ready()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    out["forward_steps_per_s"] = args.steps / best
    out["forward_steps_per_cpu_s"] = args.steps / best_cpu
    out["neighbor_overflow"] = bool(nb.did_buffer_overflow)

    g_steps = args.jax_md_grad_steps or args.steps

    def loss(eps):
        state, nb = run(eps, nbrs0, g_steps)
        return energy_fn(state.position, neighbor=nb, epsilon=eps) / N

    grad_fn = jax.jit(jax.grad(loss))
    t0 = time.perf_counter()
    g = grad_fn(eps0)
    g.block_until_ready()
    out["forward_grad_compile_and_run_s"] = time.perf_counter() - t0
    best, best_cpu = math.inf, math.inf
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        g = grad_fn(eps0)
        g.block_until_ready()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    out["forward_grad_steps"] = g_steps
    out["forward_grad_steps_per_s"] = g_steps / best
    out["forward_grad_steps_per_cpu_s"] = g_steps / best_cpu
    out["grad_epsilon"] = float(g)
    out["peak_rss_mib"] = _peak_mib(torch.device("cpu"))
    print(json.dumps(out))


# --------------------------------------------------------------------------- main


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="particles")
    p.add_argument("--steps", type=int, default=200, help="MD steps per timed run")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument(
        "--skin", type=float, default=0.5, help="neighbor-list skin (JAX MD dr_threshold)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    p.add_argument("--equilibrate", type=int, default=300, help="equilibration steps (float64)")
    p.add_argument("--reversible", action="store_true", help="also time the reversible gradient")
    p.add_argument("--window", type=int, default=200, help="reversible checkpoint interval W")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--jax-md", action="store_true", help="run the same system in JAX MD too")
    p.add_argument(
        "--jax-md-format", default="OrderedSparse", choices=("Dense", "Sparse", "OrderedSparse")
    )
    p.add_argument(
        "--jax-md-grad-steps",
        type=int,
        default=None,
        help="steps of the JAX MD gradient run (default --steps; lower it when it runs out of memory)",
    )
    p.add_argument("--jax-md-timeout", type=float, default=1800.0)
    p.add_argument("--jax-md-worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    if args.jax_md_worker:
        _jax_md_worker(args)
        return {}
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    space, R, P = lj_fluid(args.n, equilibrate=args.equilibrate, skin=args.skin)
    result = {
        "n": args.n,
        "steps": args.steps,
        "device": args.device,
        "dtype": args.dtype,
        "skin": args.skin,
        "threads": args.threads,
        "repeats": args.repeats,
        "jax_md_format": args.jax_md_format if args.jax_md else None,
        "equilibration_s": time.perf_counter() - t0,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_before": os.getloadavg(),
    }
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    result.update(run_controlmd(args, space, R, P))
    if args.jax_md:
        jm = run_jax_md(args, space, R, P)
        result["jax_md"] = jm
        if "forward_steps_per_s" in jm:
            for key in (
                "forward_steps_per_s",
                "forward_grad_steps_per_s",
                "forward_steps_per_cpu_s",
                "forward_grad_steps_per_cpu_s",
            ):
                result["ratio_" + key] = result[key] / jm[key]
    result["load_average_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return result


if __name__ == "__main__":
    main()
