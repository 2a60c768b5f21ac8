"""Static weak fields on ``assembly`` (issue 15, weak regime: max |V| <= 3 kT), each held at
eps = 6 until 0.9 T (release window: the last 10 %) and paired with the constant eps = 6 on
the same fresh replicas (common random numbers). Reduced LJ units, kT = 1.

* ``--wells W1,W2,...``: one Gaussian well at the box centre (``basis_kind = "gaussian"``,
  ``basis_grid = 1``) of width ``W`` and depth ``--depth`` (the coefficient scaled so that
  ``max |V| = depth``, the nearest images included);
* ``--bowls C1,C2,...``: the lowest Fourier bowl ``c [cos(2 pi x / L) + cos(2 pi y / L)]``
  (``basis_kind = "fourier"``, ``basis_modes = 1``; minimum ``-2c`` at the centre, maximum
  ``+2c`` at the corners, so ``max |V| = 2c``): a box-wide funnel.
* ``--waves V:LAMBDA:R_IN,...``: the radial wave (``controls = ["wave"]``,
  :class:`~controlmd.potentials.RadialWave`) of amplitude ``--depth`` and wavelength
  ``LAMBDA`` whose troughs travel inward at ``V`` sigma/tau (phase ``s = V t``), fading out
  inside ``R_IN`` of the box centre; time-dependent, unlike the two static fields above.

Prints one JSON line per field (yield, SE, paired difference and its SE, field cost, the
largest |V| over 2,000 random points)::

    python experiments/assembly_weak_probe.py --replicas 256 --seed 4242 --wells 2,1.5,1 --bowls 1.5,1
    python experiments/assembly_weak_probe.py --replicas 256 --seed 4242 --waves 2:0.8:1.2,5:0.8:1.2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from controlmd.evaluation import mean_se
from controlmd.potentials.fields import BasisField
from controlmd.protocols import Tabulated
from controlmd.tasks.assembly import Assembly


def held(task: Assembly, coefficients: list[float], end: list[float] | None = None) -> Tabulated:
    """``coefficients`` until 0.9 T (linearly to ``end`` when given), then the release
    window (0 from 0.9 T)."""
    T = task.horizon
    return Tabulated(
        times=[0.0, 0.9 * T],
        values=[coefficients, coefficients if end is None else end],
        interpolation="hold" if end is None else "linear",
        t_final=T,
        low=list(task.controls.low),
        high=list(task.controls.high),
        release_fraction=0.1,
        release_value=task.default_control(),
    )


def per_replica(
    task: Assembly, protocol: Tabulated, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Yield and field cost of each replica ``[n]``, ``[n]``."""
    with torch.no_grad():
        state = task.rollout(protocol, n, seed, gradient="none")
    cost = state.aux.get("field_cost", torch.zeros(n, dtype=torch.float64))
    return task.metric(state).to(torch.float64), cost.to(torch.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=256)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--wells", default="", help="widths of centred Gaussian wells (sigma)")
    ap.add_argument("--depth", type=float, default=3.0, help="max |V| of the wells (kT)")
    ap.add_argument("--bowls", default="", help="coefficients c of the Fourier bowl")
    ap.add_argument(
        "--waves", default="", help="radial waves V:LAMBDA:R_IN (sigma/tau, sigma, sigma)"
    )
    args = ap.parse_args()
    n = args.replicas
    base = Assembly()
    y0, _ = per_replica(
        base, Tabulated(times=[0.0, base.horizon], values=[[6.0], [6.0]]), n, args.seed
    )
    print(json.dumps({"field": "none (constant eps = 6)", "yield": float(y0.mean())}), flush=True)
    points = torch.rand(2000, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def report(
        label: str,
        task: Assembly,
        field: BasisField | None,
        coefficients: list[float],
        end: list[float] | None = None,
    ) -> None:
        t0 = time.perf_counter()
        protocol = held(task, coefficients, end)
        y, cost = per_replica(task, protocol, n, args.seed)
        if field is None:  # the wave: the largest |V| over the same points at 20 times
            wave = task.field_potential(protocol)
            assert wave is not None
            with torch.no_grad():
                v_max = max(
                    float(wave.energy(points * task.box, t).abs().max())
                    for t in torch.linspace(0.0, task.horizon, 20).tolist()
                )
        else:
            c = torch.tensor(coefficients, dtype=torch.float64)
            v_max = float((field.basis_values(points * task.box) * c).sum(-1).abs().max())
        mean, se = mean_se(y)
        paired, paired_se = mean_se(y - y0)
        row = {
            "field": label,
            "max_abs_V": v_max,
            "yield": mean,
            "se": se,
            "paired": paired,
            "paired_se": paired_se,
            "field_cost": float(cost.mean()),
            "wall_s": time.perf_counter() - t0,
        }
        print(json.dumps(row), flush=True)

    def unit(t: torch.Tensor) -> torch.Tensor:
        return torch.ones(1, dtype=torch.float64)

    for width in [float(w) for w in args.wells.split(",") if w]:
        task = Assembly(controls=["basis"], basis_grid=1, basis_width=width, field_cost_every=20)
        field = BasisField(task.space, unit, basis="gaussian", n_grid=1, width=width)
        centre = torch.full((1, 1, 2), task.box / 2, dtype=torch.float64)
        b0 = float(field.basis_values(centre).max())
        report(f"gaussian well width {width}, depth {args.depth}", task, field, [-args.depth / b0])
    for c in [float(v) for v in args.bowls.split(",") if v]:
        task = Assembly(
            controls=["basis"], basis_kind="fourier", basis_modes=1, field_cost_every=20
        )
        field = BasisField(task.space, unit, basis="fourier", n_modes=1)
        axes = [sorted(abs(int(a)) for a in m) == [0, 1] for m in field.wave_vectors.tolist()]
        coefficients = [c if is_axis else 0.0 for is_axis in axes]  # the cosines of (1,0), (0,1)
        coefficients += [0.0] * (task.controls.dim - len(coefficients))  # the sines
        report(f"fourier bowl c = {c}", task, field, coefficients)
    for spec in [w for w in args.waves.split(",") if w]:
        speed, wavelength, inner = (float(x) for x in spec.split(":"))
        task = Assembly(
            controls=["wave"],
            wave_max=args.depth,
            wave_wavelength=wavelength,
            wave_inner=inner,
            field_cost_every=20,
        )
        report(
            f"radial wave v = {speed}, lambda = {wavelength}, r_in = {inner}, A = {args.depth}",
            task,
            None,
            [args.depth, 0.0],
            [args.depth, speed * 0.9 * task.horizon],
        )


if __name__ == "__main__":
    main()
