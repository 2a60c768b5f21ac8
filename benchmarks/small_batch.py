"""Small batched systems: replica-steps per second of the control workloads.

Workloads (built from the shipped tasks; reduced units of each task):

* ``assembly``: 7 Morse disks in a 2-D periodic box, overdamped Brownian
  (``Assembly(n_steps=S)``, its integrator under a 4-piece constant epsilon protocol at
  eps = 6); fwd+grad differentiates the task loss (smooth bond count) with respect to the
  protocol's pieces through the whole run.
* ``polymer``: the 22-bead Go helix, Langevin BAOAB (``PolymerFold(n_steps=S)``, its
  temperature channel held by a 4-piece protocol at kT = 0.5); fwd+grad differentiates the
  task loss (smooth native-contact fraction + torsion misfit) with respect to the pieces.
* ``trap_od`` / ``trap_ud`` (issue 21, item 7): one particle in 1-D in a harmonic trap
  (k = 1, kT = 1) dragged linearly from 0 to 5 over t_f = 1: overdamped (the
  ``TrapDrag`` task's integrator: exact OU step, work tracked) and underdamped (Langevin
  BAOAB, m = 1, gamma = 1, on a ``HarmonicTrap`` with a protocol centre), forward only,
  against a plain vectorized torch loop of the same update (``torch.randn`` from one
  global generator, work accumulated in the overdamped case).

``--rng philox-compiled`` times philox streams drawn by the ``torch.compile``-d block
kernel (:func:`controlmd.rng.compile_philox`; bit-identical streams), ``philox-fused``
with the Box–Muller transform compiled into it too (``compile_philox(box_muller=True)``:
normals within ~2 ulp of the eager ones), compile time excluded (one untimed run first).

Rates are replica-steps per second, B * steps / wall, the median of ``--repeats`` runs
interleaved across engines and RNG kinds (controlmd with ``rng = "mt19937"`` and
``"philox"``, the plain loop or JAX MD), torch on ``--threads`` threads. Initial states are
built before timing. ``mt19937`` is skipped above 20,000 replicas on the CPU and 1,024 on
a GPU (one ``torch.Generator`` per replica, and its per-replica draw loop, would dominate).

JAX MD peer (``assembly``, ``polymer``; absent ``jax_md``, or ``--no-jax``: skipped): the
same system written with ``jax_md.space`` and ``jax_md.simulate.brownian`` /
``nvt_langevin`` (energies written out term by term as the tasks define them, ``jit`` +
``vmap`` over replicas + ``lax.scan`` over steps, compile time excluded, one XLA thread
with ``--threads 1``); the energies of both engines on the same configurations are
compared (``max_energy_diff``).

Usage::

    python benchmarks/small_batch.py --workloads assembly polymer --replicas 64 512 2048 \\
        --dtypes float32 float64 --json small_batch.json
    python benchmarks/small_batch.py --workloads trap_od trap_ud --replicas 10000 1000000
    python benchmarks/small_batch.py --workloads assembly --rng philox --forces analytic \\
        --fused 20   # also FusedSteps, 20 steps per compiled call
    python benchmarks/small_batch.py --profile   # where a step's time goes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from controlmd.dynamics.brownian import Brownian  # noqa: E402
from controlmd.dynamics.fused import FusedSteps  # noqa: E402
from controlmd.dynamics.langevin import Langevin  # noqa: E402
from controlmd.potentials.analytic import DenseMorse, ScaledDense  # noqa: E402
from controlmd.potentials.external import HarmonicTrap  # noqa: E402
from controlmd.protocols import PiecewiseConstant, Tabulated  # noqa: E402
from controlmd.rng import ReplicaRNG, compile_philox, use_rng  # noqa: E402
from controlmd.simulate import simulate  # noqa: E402
from controlmd.tasks.assembly import Assembly  # noqa: E402
from controlmd.tasks.polymer_fold import PolymerFold  # noqa: E402
from controlmd.tasks.trap_drag import TrapDrag  # noqa: E402

WORKLOADS = ("assembly", "polymer", "trap_od", "trap_ud")
# forward steps, forward+gradient steps (issue 20's table)
DEFAULT_STEPS = {
    "assembly": (1000, 1000),
    "polymer": (500, 200),
    "trap_od": (200, 0),
    "trap_ud": (200, 0),
}
# mt19937 draws loop over one generator per replica: skipped above these B (per device type)
MT19937_MAX_REPLICAS = {"cpu": 20_000, "cuda": 1_024}
TRAP = {"k": 1.0, "kT": 1.0, "lambda_f": 5.0, "t_f": 1.0, "gamma": 1.0, "mass": 1.0}
SEED = 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["assembly", "polymer"], choices=WORKLOADS)
    p.add_argument("--replicas", nargs="+", type=int, default=[64, 512, 2048])
    p.add_argument(
        "--dtypes", nargs="+", default=["float32", "float64"], choices=("float32", "float64")
    )
    p.add_argument("--modes", nargs="+", default=["forward", "grad"], choices=("forward", "grad"))
    p.add_argument(
        "--rng",
        nargs="+",
        default=["mt19937", "philox"],
        choices=("mt19937", "philox", "philox-compiled", "philox-fused"),
        help="noise streams; philox-compiled: philox with controlmd.rng.compile_philox(); "
        "philox-fused: compile_philox(box_muller=True)",
    )
    p.add_argument(
        "--forces",
        nargs="+",
        default=["autograd", "analytic"],
        choices=("autograd", "analytic"),
        help="assembly forces: the task's Morse (autograd) and/or DenseMorse (analytic)",
    )
    p.add_argument(
        "--fused",
        type=int,
        default=0,
        metavar="K",
        help="also time controlmd.dynamics.FusedSteps with K steps per compiled call "
        "(assembly with analytic forces; philox noise and Box-Muller by the compiled "
        "kernel, compile_philox(box_muller=True)); 0: off",
    )
    p.add_argument("--steps", type=int, default=None, help="forward steps (default per workload)")
    p.add_argument("--grad-steps", type=int, default=None, help="forward+gradient steps")
    p.add_argument(
        "--repeats", type=int, default=3, help="interleaved runs; the median is reported"
    )
    p.add_argument("--threads", type=int, default=1, help="torch (and XLA) CPU threads")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--no-jax", action="store_true", help="skip the JAX MD peer")
    p.add_argument("--json", default=None, help="write all rows to this JSON file")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the rates: aten operations and ms per call of the parts of a step",
    )
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- controlmd side


def _task_setup(name: str, steps: int) -> tuple[Any, Any]:
    """``(task, protocol)`` of a workload for a run of ``steps`` steps."""
    if name == "assembly":
        task = Assembly(n_steps=steps)
        proto = PiecewiseConstant(t_final=task.horizon, n_pieces=4, low=2.0, high=10.0, init=6.0)
    elif name == "polymer":
        task = PolymerFold(n_steps=steps)
        proto = PiecewiseConstant(t_final=task.horizon, n_pieces=4, low=0.1, high=1.2, init=0.5)
    else:
        task = TrapDrag(
            n_steps=steps, lambda_f=TRAP["lambda_f"], t_f=TRAP["t_f"], k=TRAP["k"], kT=TRAP["kT"]
        )
        proto = Tabulated(times=[0.0, TRAP["t_f"]], values=[0.0, TRAP["lambda_f"]])
    return task, proto


def controlmd_case(
    name: str,
    B: int,
    dtype: torch.dtype,
    device: torch.device,
    mode: str,
    steps: int,
    rng: str,
    forces: str = "autograd",
    fused: int = 0,
) -> Callable[[], dict[str, Any]]:
    """A closure running one timed controlmd run (initial state built here, not timed).
    ``forces="analytic"`` (assembly, philox streams only) swaps the task's ``eps(t) * Morse`` for the same
    energy as :class:`~controlmd.potentials.analytic.ScaledDense` over ``DenseMorse``.
    ``fused=K`` (philox streams) runs the steps with
    :class:`~controlmd.dynamics.fused.FusedSteps` (``K`` steps per compiled call; compile
    time excluded: one untimed run first)."""
    task, proto = _task_setup(name, steps)
    proto = proto.to(device=device, dtype=dtype)
    if forces == "analytic":
        pot = ScaledDense(DenseMorse(task.space, alpha=task.alpha, r_cut=task.r_cut), proto)
        integ: Any = Brownian(pot, dt=task.dt, kT=task.kT, gamma=task.gamma, space=task.space)
    elif name == "trap_ud":
        integ = Langevin(
            HarmonicTrap(TRAP["k"], proto),
            dt=TRAP["t_f"] / steps,
            kT=TRAP["kT"],
            gamma=TRAP["gamma"],
            mass=TRAP["mass"],
        )
    else:
        integ = task.integrator(proto)
    integ = integ.to(device=device, dtype=dtype)

    kind = "philox" if rng.startswith("philox") else rng
    compiled = rng in ("philox-compiled", "philox-fused")
    runner = FusedSteps(integ, chunk=fused) if fused else None

    def fresh_state() -> Any:
        with use_rng(kind):
            if name == "trap_ud":
                r = ReplicaRNG(SEED, B, device=device)
                x0 = math.sqrt(TRAP["kT"] / TRAP["k"]) * r.randn(1, 1, dtype=dtype)
                return integ.init(x0, rng=r)
            s = task.initial_state(B, SEED)
        s = s.replace(
            R=s.R.to(device=device, dtype=dtype),
            P=None if s.P is None else s.P.to(device=device, dtype=dtype),
        )
        s = s.replace(
            aux={
                k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v
                for k, v in s.aux.items()
            }
        )
        if s.rng is not None and s.rng.device != device:  # tasks build CPU streams
            r = ReplicaRNG(SEED, B, device=device, kind=kind)
            if kind == "philox":
                r.position = s.rng.position  # the same streams, continued on the device
            s = s.replace(rng=r)
        return s

    def run() -> dict[str, Any]:
        compile_philox(compiled, box_muller=rng == "philox-fused")
        try:
            return timed()
        finally:
            compile_philox(False)

    def timed() -> dict[str, Any]:
        s0 = fresh_state()
        _sync(device)
        t0 = time.perf_counter()
        if mode == "forward":
            with torch.no_grad():
                if runner is not None:
                    final = runner.run(s0, steps)
                else:
                    final = simulate(integ, s0, steps, gradient="none").final
            out = {"final_dtype": str(final.R.dtype)}
        else:
            proto.zero_grad(set_to_none=True)
            if runner is not None:
                final = runner.run(s0, steps)
            else:
                final = simulate(integ, s0, steps, gradient="direct").final
            loss = task.loss(final)
            loss.backward()
            grad = [p.grad for p in proto.parameters() if p.grad is not None]
            out = {
                "loss": loss.item(),
                "grad_norm": float(torch.cat([g.flatten() for g in grad]).norm()),
            }
        _sync(device)
        out["wall_s"] = time.perf_counter() - t0
        return out

    if compiled or runner is not None:
        run()  # compiles the kernels for this run's shapes (excluded, like JAX's compile)
    return run


def plain_torch_case(
    name: str, B: int, dtype: torch.dtype, device: torch.device, steps: int
) -> Callable[[], dict[str, Any]]:
    """The same trap update as a plain vectorized torch loop (one global generator)."""
    k, kT, dt = TRAP["k"], TRAP["kT"], TRAP["t_f"] / steps
    centers = [TRAP["lambda_f"] * min(1.0, (n + 1) * dt / TRAP["t_f"]) for n in range(steps)]

    def run() -> dict[str, Any]:
        g = torch.Generator(device=device).manual_seed(SEED)
        x = math.sqrt(kT / k) * torch.randn(B, generator=g, dtype=dtype, device=device)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if name == "trap_od":
                a = math.exp(-k * dt)  # mobility 1
                s = math.sqrt(kT / k * (1.0 - a * a))
                work = torch.zeros_like(x)
                c0 = 0.0
                for c in centers:
                    work += 0.5 * k * ((x - c) ** 2 - (x - c0) ** 2)
                    x = (
                        c
                        + (x - c) * a
                        + s * torch.randn(B, generator=g, dtype=dtype, device=device)
                    )
                    c0 = c
            else:
                m, gamma = TRAP["mass"], TRAP["gamma"]
                cO = math.exp(-gamma * dt)
                sO = math.sqrt((1 - cO * cO) * m * kT)
                p = math.sqrt(m * kT) * torch.randn(B, generator=g, dtype=dtype, device=device)
                f = -k * x
                h = 0.5 * dt
                for c in centers:
                    p += h * f
                    x += h / m * p
                    p = cO * p + sO * torch.randn(B, generator=g, dtype=dtype, device=device)
                    x += h / m * p
                    f = -k * (x - c)
                    p += h * f
        _sync(device)
        return {"wall_s": time.perf_counter() - t0}

    return run


# --------------------------------------------------------------------------- JAX MD side


def jax_available() -> bool:
    try:
        import jax  # noqa: F401
        import jax_md  # noqa: F401
    except Exception:
        return False
    return True


def jax_assembly_case(
    B: int, dtype: torch.dtype, mode: str, steps: int, R0: torch.Tensor
) -> tuple[Callable[[], dict[str, Any]], Callable[[torch.Tensor], Any]]:
    """JAX MD: the assembly workload (same box, Morse truncation, dt, kT, gamma), starting
    from ``R0`` ``[B, 7, 2]``. Returns the timed closure and the energy function ``[B]``."""
    import jax
    import jax.numpy as jnp
    from jax_md import simulate as jsim
    from jax_md import space as jspace

    jax.config.update("jax_enable_x64", dtype == torch.float64)
    jdt = jnp.float64 if dtype == torch.float64 else jnp.float32
    task = Assembly(n_steps=steps)
    box, alpha, rc, dt, kT, gamma = task.box, task.alpha, task.r_cut, task.dt, task.kT, task.gamma
    n = task.n_particles
    disp, shift = jspace.periodic(box)
    iu = jnp.triu_indices(n, 1)

    def pair_r(R: Any) -> Any:
        dR = jspace.map_product(disp)(R, R)[iu]
        return jnp.sqrt(jnp.sum(dR * dR, axis=-1))

    def energy(R: Any, eps: Any = 6.0, **_: Any) -> Any:
        r = pair_r(R)
        u = (1.0 - jnp.exp(-alpha * (r - 1.0))) ** 2 - 1.0
        return eps * jnp.sum(jnp.where(r < rc, u, 0.0))

    def bonds(R: Any) -> Any:
        return jnp.sum(jax.nn.sigmoid((task.bond_cutoff - pair_r(R)) / task.bond_width))

    init_fn, apply_fn = jsim.brownian(energy, shift, dt, kT, gamma=gamma)
    keys = jax.random.split(jax.random.PRNGKey(SEED), B)
    R = jnp.asarray(R0.detach().cpu().numpy(), dtype=jdt)
    state0 = jax.vmap(init_fn)(keys, R)
    n_max = task.target_bonds * n / task.cluster_size

    def trajectory(state: Any, eps: Any) -> Any:
        def body(s: Any, _: Any) -> Any:
            return jax.vmap(lambda x: apply_fn(x, eps=eps))(s), None

        return jax.lax.scan(body, state, None, length=steps)[0]

    def loss(eps: Any) -> Any:
        final = trajectory(state0, eps)
        return jnp.mean(1.0 - jax.vmap(bonds)(final.position) / n_max)

    eps0 = jnp.asarray(6.0, dtype=jdt)
    if mode == "forward":
        fn = jax.jit(lambda e: trajectory(state0, e).position)
    else:
        fn = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(fn(eps0))  # compile (excluded)

    def run() -> dict[str, Any]:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(eps0))
        row: dict[str, Any] = {"wall_s": time.perf_counter() - t0}
        if mode == "grad":
            row["loss"] = float(out[0])
        return row

    def energies(R_t: torch.Tensor) -> Any:
        x = jnp.asarray(R_t.detach().cpu().numpy(), dtype=jdt)
        return jax.vmap(lambda r: energy(r, 6.0))(x)

    return run, energies


def jax_polymer_case(
    B: int, dtype: torch.dtype, mode: str, steps: int, R0: torch.Tensor, P0: torch.Tensor
) -> tuple[Callable[[], dict[str, Any]], Callable[[torch.Tensor], Any]]:
    """JAX MD: the polymer workload (the task's H0 term by term: harmonic bonds and
    angles, the two cosine dihedral series, WCA on pairs |i - j| >= 2, native Morse
    contacts; ``simulate.nvt_langevin`` at the task's dt, kT and gamma), from ``R0`` and
    momenta ``P0``. fwd+grad: d(1 - smooth Q)/d(kT) (the task loss without its torsion
    term). Returns the timed closure and the
    energy function ``[B]``."""
    import jax
    import jax.numpy as jnp
    from jax_md import simulate as jsim
    from jax_md import space as jspace

    jax.config.update("jax_enable_x64", dtype == torch.float64)
    jdt = jnp.float64 if dtype == torch.float64 else jnp.float32
    task = PolymerFold(n_steps=steps)
    n = task.n_beads

    def arr(x: Any, kind: Any = None) -> Any:
        return jnp.asarray(torch.as_tensor(x).detach().cpu().numpy(), dtype=kind or jdt)

    bonds, b0 = arr(task._bonds, jnp.int32), arr(task._b0)
    angles, th0 = arr(task._angles, jnp.int32), arr(task._theta0)
    quads, phi0 = arr(task._dihedrals, jnp.int32), arr(task._phi0)
    contacts, d_nat = arr(task.contacts, jnp.int32), arr(task.d_native)
    iu, ju = (jnp.asarray(a) for a in torch.triu_indices(n, n, offset=2).numpy())
    sig, rc = task.sigma_repulsive, 2.0 ** (1.0 / 6.0) * task.sigma_repulsive
    _, shift = jspace.free()

    def norm(x: Any) -> Any:
        return jnp.sqrt(jnp.sum(x * x, axis=-1))

    def energy(R: Any, **_: Any) -> Any:
        r = norm(R[bonds[:, 1]] - R[bonds[:, 0]])
        e = jnp.sum(0.5 * task.k_bond * (r - b0) ** 2)
        a = R[angles[:, 0]] - R[angles[:, 1]]
        b = R[angles[:, 2]] - R[angles[:, 1]]
        th = jnp.arctan2(norm(jnp.cross(a, b)), jnp.sum(a * b, axis=-1))
        e += jnp.sum(0.5 * task.k_angle * (th - th0) ** 2)
        b1, b2, b3 = (R[quads[:, k + 1]] - R[quads[:, k]] for k in range(3))
        n1, n2 = jnp.cross(b1, b2), jnp.cross(b2, b3)
        phi = jnp.arctan2(norm(b2) * jnp.sum(b1 * n2, axis=-1), jnp.sum(n1 * n2, axis=-1))
        e += jnp.sum(task.k_dihedral * (1.0 + jnp.cos(phi - (phi0 + jnp.pi))))
        e += jnp.sum(task.k_dihedral3 * (1.0 + jnp.cos(3.0 * phi - (3.0 * phi0 + jnp.pi))))
        rp = norm(R[iu] - R[ju])
        inside = rp < rc
        x6 = (sig / jnp.where(inside, rp, rc)) ** 6
        e += jnp.sum(jnp.where(inside, 4.0 * (x6 * x6 - x6) + 1.0, 0.0))
        ex = jnp.exp(-task.contact_alpha * (norm(R[contacts[:, 0]] - R[contacts[:, 1]]) - d_nat))
        return e + task.eps_contact * jnp.sum(ex * ex - 2.0 * ex)

    def q_smooth(R: Any) -> Any:
        x = (norm(R[contacts[:, 0]] - R[contacts[:, 1]]) - d_nat) / (task.contact_tolerance * d_nat)
        beta = task.q_sharpness
        return jnp.mean(jax.nn.sigmoid(beta * (1.0 - x * x)) / jax.nn.sigmoid(beta))

    init_fn, apply_fn = jsim.nvt_langevin(energy, shift, task.dt, task.kT, gamma=task.gamma)
    keys = jax.random.split(jax.random.PRNGKey(SEED), B)
    R = arr(R0)
    state0 = jax.vmap(lambda k, r: init_fn(k, r, mass=1.0))(keys, R)
    state0 = state0.set(momentum=arr(P0))

    def trajectory(kT: Any) -> Any:
        def body(s: Any, _: Any) -> Any:
            return jax.vmap(lambda x: apply_fn(x, kT=kT))(s), None

        return jax.lax.scan(body, state0, None, length=steps)[0]

    def loss(kT: Any) -> Any:
        return jnp.mean(1.0 - jax.vmap(q_smooth)(trajectory(kT).position))

    kT0 = jnp.asarray(task.kT, dtype=jdt)
    fn = (
        jax.jit(lambda k: trajectory(k).position)
        if mode == "forward"
        else jax.jit(jax.value_and_grad(loss))
    )
    jax.block_until_ready(fn(kT0))  # compile (excluded)

    def run() -> dict[str, Any]:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(kT0))
        row: dict[str, Any] = {"wall_s": time.perf_counter() - t0}
        if mode == "grad":
            row["loss"] = float(out[0])
        return row

    def energies(R_t: torch.Tensor) -> Any:
        return jax.vmap(energy)(arr(R_t))

    return run, energies


# --------------------------------------------------------------------------- profile


def _top_level_ops(fn: Callable[[], Any]) -> int:
    """ATen operations dispatched from Python by one call of ``fn`` (nested ones excluded)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def _ms_per_call(fns: dict[str, Callable[[], Any]], n: int, repeats: int = 5) -> dict[str, float]:
    """Median over ``repeats`` interleaved blocks of the mean time of ``n`` calls, in ms."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[key].append((time.perf_counter() - t0) / n * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def profile_parts() -> dict[str, Any]:
    """Operation counts and per-step times of the parts of a step (``--profile``): the
    assembly at B = 512 (float64), the polymer at B = 256, the overdamped trap at B = 10^4
    against the plain loop's update; all under ``torch.no_grad``."""
    out: dict[str, Any] = {"load_average_start": os.getloadavg()}
    t = torch.tensor(0.01, dtype=torch.float64)
    task, proto = _task_setup("assembly", 100)
    R = task.initial_state(512, SEED).R
    integ = task.integrator(proto)
    fast = ScaledDense(DenseMorse(task.space, alpha=task.alpha, r_cut=task.r_cut), proto)
    s_mt = integ.init(R, rng=ReplicaRNG(SEED, 512, kind="mt19937"))
    s_ph = integ.init(R, rng=ReplicaRNG(SEED, 512, kind="philox"))
    pt, pp = _task_setup("polymer", 100)
    p0 = pt.initial_state(256, SEED)
    pint = pt.integrator(pp)
    p_ph = pint.init(p0.R, kT=pt.kT, rng=ReplicaRNG(SEED, 256, kind="philox"))
    tt, tp = _task_setup("trap_od", 100)
    tint = tt.integrator(tp)
    t_ph = tt.initial_state(10_000, SEED).replace(rng=ReplicaRNG(SEED, 10_000, kind="philox"))
    x = [torch.zeros(10_000, dtype=torch.float64)]

    def plain() -> None:
        x[0] = 5.0 + (x[0] - 5.0) * 0.99 + 0.1 * torch.randn(10_000, dtype=torch.float64)

    parts = {
        "assembly noise mt19937": lambda: s_mt.rng.randn(7, 2),  # type: ignore[union-attr]
        "assembly noise philox": lambda: s_ph.rng.randn(7, 2),  # type: ignore[union-attr]
        "assembly forces autograd": lambda: integ.potential.energy_and_forces(R, t),
        "assembly forces analytic": lambda: fast.energy_and_forces(R, t),
        "assembly step mt19937": lambda: integ.step(s_mt),
        "assembly step philox": lambda: integ.step(s_ph),
        "polymer forces autograd": lambda: pint.potential.energy_and_forces(p_ph.R, t),
        "polymer step philox": lambda: pint.step(p_ph),
        "trap_od noise philox (one block)": lambda: ReplicaRNG(SEED, 10_000, kind="philox").randn(
            1, 1
        ),
        "trap_od torch.randn": lambda: torch.randn(10_000, dtype=torch.float64),
        "trap_od step philox": lambda: tint.step(t_ph),
        "trap_od plain loop step": plain,
    }
    with torch.no_grad():
        out["aten_ops_per_call"] = {k: _top_level_ops(f) for k, f in parts.items()}
        out["ms_per_call"] = _ms_per_call(parts, 50)
    out["load_average_end"] = os.getloadavg()
    for key in parts:
        print(
            f"{key:34s} {out['aten_ops_per_call'][key]:5d} ops  {out['ms_per_call'][key]:9.3f} ms"
        )
    return out


# --------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.threads == 1:
        os.environ.setdefault(
            "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    torch.set_num_threads(args.threads)
    if args.profile:
        result = profile_parts()
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return result
    device = torch.device(args.device)
    use_jax = not args.no_jax and jax_available()
    rows: list[dict[str, Any]] = []
    meta = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "device": str(device),
        "load_average_start": os.getloadavg(),
        "jax_md": use_jax,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    for name in args.workloads:
        fwd_steps, grad_steps = DEFAULT_STEPS[name]
        for mode in args.modes:
            if name.startswith("trap") and mode == "grad":
                continue
            steps = (
                (args.steps or fwd_steps) if mode == "forward" else (args.grad_steps or grad_steps)
            )
            for dname in args.dtypes:
                dtype = getattr(torch, dname)
                for B in args.replicas:
                    try:
                        rows.extend(_measure(name, mode, dtype, B, steps, device, args, use_jax))
                    except (RuntimeError, MemoryError) as exc:  # e.g. out of device memory
                        rows.append(
                            {
                                "workload": name,
                                "mode": mode,
                                "dtype": dname,
                                "replicas": B,
                                "steps": steps,
                                "error": f"{type(exc).__name__}: {exc}"[:500],
                            }
                        )
                        print(f"{name} {mode} {dname} B={B}: {rows[-1]['error']}", flush=True)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    if args.json:  # rewritten after every cell: a run cut short keeps its rows
                        Path(args.json).write_text(
                            json.dumps({"meta": meta, "rows": rows}, indent=1)
                        )
    meta["load_average_end"] = os.getloadavg()
    result = {"meta": meta, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({"meta": meta, "n_rows": len(rows)}))
    return result


def _measure(
    name: str,
    mode: str,
    dtype: torch.dtype,
    B: int,
    steps: int,
    device: torch.device,
    args: argparse.Namespace,
    use_jax: bool,
) -> list[dict[str, Any]]:
    """Every engine of one (workload, mode, dtype, B) cell, runs interleaved."""
    cases: dict[str, Callable[[], dict[str, Any]]] = {}
    notes: dict[str, str] = {}
    for rng in args.rng:
        cap = MT19937_MAX_REPLICAS.get(device.type, 1_024)
        if rng == "mt19937" and B > cap:
            notes[f"controlmd/{rng}"] = f"skipped: B > {cap} on {device.type}"
            continue
        for forces in args.forces if name == "assembly" and rng != "mt19937" else ["autograd"]:
            key = f"controlmd/{rng}" + ("/analytic" if forces == "analytic" else "")
            cases[key] = controlmd_case(name, B, dtype, device, mode, steps, rng, forces)
    if args.fused and not name.startswith("trap"):
        forces = "analytic" if name == "assembly" else "autograd"
        cases[f"controlmd/fused{args.fused}"] = controlmd_case(
            name, B, dtype, device, mode, steps, "philox-fused", forces, fused=args.fused
        )
    energy_diff = None
    if name.startswith("trap"):
        cases["plain_torch"] = plain_torch_case(name, B, dtype, device, steps)
    elif use_jax and name == "assembly" and device.type == "cpu":
        task, _ = _task_setup(name, steps)
        s0 = task.initial_state(B, SEED)
        jrun, jenergy = jax_assembly_case(B, dtype, mode, steps, s0.R)
        cases["jax_md"] = jrun
        with torch.no_grad():
            e_t = task.potential(None).energy(s0.R.to(dtype), torch.tensor(0.0, dtype=dtype))
        e_j = torch.as_tensor(jenergy(s0.R).__array__().copy()).to(e_t)
        energy_diff = float((e_t - e_j).abs().max())
    elif use_jax and name == "polymer" and device.type == "cpu":
        task, _ = _task_setup(name, steps)
        s0 = task.initial_state(B, SEED)
        jrun, jenergy = jax_polymer_case(B, dtype, mode, steps, s0.R, s0.P)
        cases["jax_md"] = jrun
        with torch.no_grad():
            h0 = task._h0_fixed + task._h0_attraction
            e_t = h0.energy(s0.R.to(dtype), torch.tensor(0.0, dtype=dtype))
        e_j = torch.as_tensor(jenergy(s0.R).__array__().copy()).to(e_t)
        energy_diff = float((e_t - e_j).abs().max())
    elif not use_jax:
        notes["jax_md"] = "skipped: jax_md not importable or --no-jax"
    times: dict[str, list[float]] = {key: [] for key in cases}
    extra: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeats):
        for key, run in cases.items():
            out = run()
            times[key].append(out.pop("wall_s"))
            extra[key] = out
    rows = []
    for key in cases:
        wall = statistics.median(times[key])
        row = {
            "workload": name,
            "mode": mode,
            "dtype": str(dtype).replace("torch.", ""),
            "replicas": B,
            "steps": steps,
            "engine": key,
            "replica_steps_per_s": B * steps / wall,
            "wall_s": times[key],
            **extra[key],
            "load_average": os.getloadavg(),
        }
        if energy_diff is not None:
            row["max_energy_diff"] = energy_diff
        rows.append(row)
        print(
            f"{name:9s} {mode:7s} {row['dtype']:7s} B={B:<8d} {key:18s} "
            f"{row['replica_steps_per_s']:12.0f} replica-steps/s  (median of {len(times[key])})",
            flush=True,
        )
    if args.fused:  # each FusedSteps compiles anew (dynamo guards on the instance): a
        # run of many cells would otherwise pile up to dynamo's recompile limit
        torch._dynamo.reset()
    for key, why in notes.items():
        rows.append(
            {
                "workload": name,
                "mode": mode,
                "dtype": str(dtype),
                "replicas": B,
                "engine": key,
                "note": why,
            }
        )
    return rows


if __name__ == "__main__":
    main()
