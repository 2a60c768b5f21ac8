"""Peak memory and time of an exact float64 gradient through T MD steps, per gradient path.

System: the LJ fluid of ``lj_throughput.py`` (density 0.8, kT = 1, dt = 0.005, r_c = 2.5,
energy shift, neighbor list with skin 0.5, NVE), float64. Loss: final potential energy per
particle; gradient with respect to epsilon through the whole run.

``--control trap`` drives the fluid with a time-dependent Hamiltonian instead: ``H = H_LJ +
k/2 sum_i |r_i - c(t)|^2`` over the first ``--trap-particles`` particles (k = 2), the
centre ``c(t)`` a piecewise-constant protocol with one piece per ``--piece-steps`` steps
(its jumps fall on steps inside the run, so the jump handling is exercised), starting at
the box centre and moved by +-0.5 sigma per piece (seeded); the loss is the final
potential energy per particle (LJ + trap) and the gradient is taken with respect to every
protocol value (``grad_norm``, ``grad_first``). The number of protocol values grows with
T; everything else stays the same size.

Paths:

* ``direct``: ``simulate(..., gradient="direct")`` (autograd keeps every step).
* ``checkpoint``: ``simulate(..., gradient="checkpoint", window=W)`` (window-start states
  kept, each window recomputed in backward; same gradient).
* ``adjoint``: ``simulate_ode(..., method="rk4", adjoint=True)`` with step dt (torchdiffeq's
  continuous adjoint: O(1) memory, 4 force evaluations per step, and the gradient of the
  ODE solution rather than of the Verlet trajectory; it integrates the state backwards
  without checkpoints, so in this chaotic system it drifts over long runs).
* ``reversible``: :func:`controlmd.dynamics.reversible.simulate_reversible` (states
  recomputed backwards, exact checkpoints every W steps).

Each (path, T) runs in its own subprocess, so the peak resident set size (``VmHWM``) is its
own; the subprocess's address space is capped at ``--max-memory-gib`` so that a path that
does not fit fails with an out-of-memory error instead of taking the machine down. The
gradient is compared with the reversible one for the same T when both ran.

Usage::

    python benchmarks/gradient_memory.py --n 4000 --steps 1000 10000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from controlmd.dynamics.nve import NVE
from controlmd.potentials import HarmonicTrap
from controlmd.protocols import PiecewiseConstant
from controlmd.space import Space, periodic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lj_throughput import _nve, _peak_mib, lj_fluid

PATHS = ("reversible", "checkpoint", "direct", "adjoint")
CONTROLS = ("none", "trap")
TRAP_STIFFNESS = 2.0


def _driven_nve(args: argparse.Namespace, space: Space, T: int) -> tuple[NVE, PiecewiseConstant]:
    """LJ fluid plus a harmonic trap on the first particles whose centre follows a
    piecewise-constant protocol (one piece per ``args.piece_steps`` steps)."""
    nve = _nve(space, args.skin, learnable=False)
    n_pieces = max(1, T // args.piece_steps)
    g = torch.Generator().manual_seed(0)
    moves = 0.5 * (2 * torch.rand(n_pieces, 3, generator=g, dtype=torch.float64) - 1)
    centre = space.box.to(torch.float64) / 2 + moves
    protocol = PiecewiseConstant(dim=3, t_final=T * nve.dt, n_pieces=n_pieces, init=centre)
    trap = HarmonicTrap(
        TRAP_STIFFNESS, protocol, particles=list(range(args.trap_particles)), space=space
    )
    return NVE(nve.potential + trap, dt=nve.dt, space=space), protocol


def _worker(args: argparse.Namespace) -> None:
    limit = int(args.max_memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(args.threads)
    from controlmd.dynamics.reversible import simulate_reversible
    from controlmd.simulate import simulate, simulate_ode

    data = torch.load(args.worker, weights_only=False)
    space, R, P = periodic(data["box"]), data["R"], data["P"]
    path, T = args.path, args.T
    if args.control == "trap":
        nve, protocol = _driven_nve(args, space, T)
        wrt = protocol.values
    else:
        nve = _nve(space, args.skin, learnable=True)
        wrt = nve.potential.epsilon
    n = R.shape[1]
    baseline = _peak_mib(torch.device("cpu"))
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    state = nve.init(R, P=P)
    if path == "direct":
        final = simulate(nve, state, T, gradient="direct").final
    elif path == "checkpoint":
        final = simulate(nve, state, T, gradient="checkpoint", window=args.window).final
    elif path == "reversible":
        final = simulate_reversible(nve, state, T, window=args.window)
    else:
        final = simulate_ode(
            nve, state, T * nve.dt, method="rk4", adjoint=True, options={"step_size": nve.dt}
        ).final
    t1 = time.perf_counter()
    loss = nve.potential.energy(final.R, final.t).sum() / n
    loss.backward()
    t2 = time.perf_counter()
    grad = wrt.grad.detach().flatten()
    print(
        json.dumps(
            {
                "path": path,
                "T": T,
                "n": n,
                "control": args.control,
                "protocol_values": wrt.numel() if args.control != "none" else 0,
                "forward_s": t1 - t0,
                "backward_s": t2 - t1,
                "total_s": t2 - t0,
                "backward_over_forward": (t2 - t1) / (t1 - t0),
                "peak_rss_mib": _peak_mib(torch.device("cpu")),
                "baseline_rss_mib": baseline,
                **({"grad_epsilon": float(grad[0])} if args.control == "none" else {}),
                "grad": grad.tolist(),
                "grad_norm": float(grad.norm()),
                "loss": float(loss),
            }
        )
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument(
        "--window", type=int, default=200, help="W of the checkpoint and reversible paths"
    )
    p.add_argument("--skin", type=float, default=0.5)
    p.add_argument(
        "--control", default="none", choices=CONTROLS, help="none: d/d epsilon; trap: driven H"
    )
    p.add_argument("--trap-particles", type=int, default=10)
    p.add_argument("--piece-steps", type=int, default=100, help="steps per protocol piece")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--equilibrate", type=int, default=300)
    p.add_argument("--max-memory-gib", type=float, default=20.0, help="address-space cap per run")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per run")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="run the workers with MALLOC_MMAP_THRESHOLD_=BYTES (glibc: a fixed mmap "
        "threshold, so freed large arrays go back to the system; e.g. 131072)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return []
    torch.set_num_threads(args.threads)
    space, R, P = lj_fluid(args.n, equilibrate=args.equilibrate, skin=args.skin)
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        state_file = Path(tmp) / "state.pt"
        torch.save({"box": space.box, "R": R, "P": P}, state_file)
        for T in args.steps:
            for path in args.paths:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    str(state_file),
                    "--path",
                    path,
                    "--T",
                    str(T),
                    "--window",
                    str(args.window),
                    "--skin",
                    str(args.skin),
                    "--control",
                    args.control,
                    "--trap-particles",
                    str(args.trap_particles),
                    "--piece-steps",
                    str(args.piece_steps),
                    "--threads",
                    str(args.threads),
                    "--max-memory-gib",
                    str(args.max_memory_gib),
                ]
                load = os.getloadavg()
                env = dict(os.environ)
                if args.malloc_mmap_threshold is not None:
                    env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
                try:
                    proc = subprocess.run(
                        cmd, capture_output=True, text=True, timeout=args.timeout, env=env
                    )
                    if proc.returncode == 0:
                        row = json.loads(proc.stdout.strip().splitlines()[-1])
                    else:
                        err = proc.stderr.strip().splitlines()
                        oom = any("memory" in line.lower() for line in err[-5:])
                        row = {
                            "path": path,
                            "T": T,
                            "n": args.n,
                            "error": (
                                f"out of memory (cap {args.max_memory_gib:g} GiB)"
                                if oom
                                else f"exit {proc.returncode}"
                            ),
                            "detail": err[-1] if err else "",
                        }
                except subprocess.TimeoutExpired:
                    row = {
                        "path": path,
                        "T": T,
                        "n": args.n,
                        "error": f"timeout after {args.timeout:g} s",
                    }
                row["load_average_before"] = load
                row["malloc_mmap_threshold"] = env.get("MALLOC_MMAP_THRESHOLD_")
                results.append(row)
                print(json.dumps(row) if args.json else row, flush=True)
    ref = {r["T"]: r["grad"] for r in results if r.get("path") == "reversible" and "grad" in r}
    for r in results:
        if "grad" in r and r["T"] in ref and r["path"] != "reversible":
            a = torch.tensor(r["grad"], dtype=torch.float64)
            b = torch.tensor(ref[r["T"]], dtype=torch.float64)
            r["rel_diff_vs_reversible"] = float((a - b).norm() / b.norm())
    if args.json:
        print(json.dumps({"summary": results}))
    return results


if __name__ == "__main__":
    main()
