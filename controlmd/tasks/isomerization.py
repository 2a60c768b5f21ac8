"""Optical control of retinal photo-isomerization (two-state, two-mode model).

The model of retinal in rhodopsin of Hahn & Stock (J. Phys. Chem. B 104, 1146 (2000)),
driven by a laser field whose shape is optimized for the trans (product) yield, as in
Wang, Axelrod & Gómez-Bombarelli, arXiv:2003.00868.

System
    Torsion ``phi`` and a coupling mode ``x`` (dimensionless) on a ground (0) and an
    excited (1) diabatic state::

        H0 = T + sum_n |n> V_n <n| + lam x (|0><1| + |1><0|)
        T  = -(inv_mass / 2) d^2/dphi^2 - (omega / 2) d^2/dx^2
        V0 = W0/2 (1 - cos phi) + omega/2 x^2
        V1 = E1 - W1/2 (1 - cos phi) + omega/2 x^2 + kappa x

    E1 = 2.48, W0 = 3.6, W1 = 1.09, omega = 0.19, kappa = 0.1, lam = 0.19 eV and
    inv_mass = 4.84e-4 eV. Basis: ``cos(k phi)``, k = 0 .. n_cos - 1 (the states even
    under phi -> -phi, the only ones coupled to the ground state) times ``n_osc``
    harmonic-oscillator functions of x, for both diabats; H0 is diagonalized densely and
    the eigenstates below ``e_cut`` (eV above the bottom of the ground well, V0 = 0) are
    kept: 716 states for the paper's model (n_cos = 121, n_osc = 24 .. 30, e_cut = 2.9).
    The model (parameters, Hamiltonian, diagonalization, on-disk cache) lives in
    :mod:`controlmd.models.retinal`; its names are re-exported here.

    Dynamics: ``i dpsi/dt = (H0 - mu E(t)) psi`` with the unit-strength Condon dipole
    ``mu = |0><1| + |1><0|`` projected on the kept states. Default propagator: the split
    operator of :class:`~controlmd.dynamics.schrodinger.SplitOperator`, ``n_steps`` steps
    of ``dt = t_pulse / n_steps`` (default 750 fs / 6095 = 0.12305 fs, the paper's field
    resolution), field at each step's midpoint. Alternative: torchdiffeq
    (``advance(..., propagator="ode", method="dopri5")``). After the pulse the field is
    zero and the evolution is applied exactly as phases.

Control channels
    ``field_mode = "direct"`` (default): the field itself.

    =====  ======================  =======  ======  ====
    index  coupling                min      max     unit
    =====  ======================  =======  ======  ====
    0      field E(t), H -= mu E   -e_max   e_max   eV
    =====  ======================  =======  ======  ====

    ``field_mode = "envelope"``: slowly varying quadratures on carriers ``w_j``
    (``carrier_ev``, one or several, eV), ``E(t) = sum_j u_2j(t) cos(w_j t) +
    u_2j+1(t) sin(w_j t)``; channels ``2j`` (``E_cos``) and ``2j+1`` (``E_sin``), each in
    ``[-e_max, e_max]`` eV. Smooth protocols with a few hundred parameters then describe
    fields with carriers in the visible (and, for an RL agent, actions need not follow an
    optical cycle).

    ``e_max`` = 1 eV by default: wide enough that the starting pulse (peak 0.117 eV) is
    undistorted by tanh squashing, and near E = 0 one unit of the squashed protocol's
    parameter is one eV, so an Adam learning rate means what it meant in the paper.

Observation (feedback protocols, gymnasium env)
    =====  ===========================================  ======  ====
    index  quantity                                     range   unit
    =====  ===========================================  ======  ====
    0      ground-state population ``|<0|psi>|^2``      [0, 1]  --
    1      excited-diabat population ``<P_1>``          [0, 1]  --
    2      ``<P_trans>``                                [0, 1]  --
    3      ``<P_cis>``                                  [0, 1]  --
    =====  ===========================================  ======  ====

Outcome
    ``Y(t) = <P_trans> / (<P_trans> + <P_cis> - |<0|psi>|^2)`` with ``P_cis`` = (|phi| <
    pi/2 on the ground diabat) and ``P_trans`` = (|phi| > pi/2 on the excited diabat),
    both projected on the kept states. Exact metric: ``Y(t)`` averaged over the paper's
    window, the last ``n_window`` = 20,000 of ``n_grid`` = 30,479 equally spaced times on
    [0, t_end = 1500 fs], i.e. 515.7 .. 1500 fs. Window times after the pulse are taken
    exactly on that grid (free evolution, batched matrix products); window times during
    the pulse are the propagation steps, each weighted by its length, so the average is
    the same time integral. The surrogate loss is ``-mean(Y)`` (the metric itself,
    differentiable), plus ``fluence_penalty * relu(F / fluence_max - 1)^2`` when a
    fluence bound is set, with ``F = integral E(t)^2 dt`` over the pulse. Higher is
    better. For a state before the end of the pulse the metric is the yield the molecule
    would reach if the field were switched off from then on.

Starting state
    The ground eigenstate for every replica (the task is deterministic; the seed is not
    used). The paper's starting field is
    ``E0 cos(w0 (t - tp)) exp(-(t - tp)^2 / tau^2)``, tau = 10 fs, w0 = 2.4 eV,
    tp = 30 fs, E0 = sqrt(pi) / tau (tau in hbar/eV: a pi pulse for the unit dipole), see
    :meth:`Isomerization.starting_field`.

Episode end
    Truncation at ``t_pulse`` after ``n_steps`` steps; no termination. The yield window
    continues field-free to ``t_end``.

Units
    Energy and field (unit dipole) in eV, time in hbar/eV, 1 fs = 1.519267 hbar/eV
    (hbar = 0.6582119569 eV fs; the paper's code used 41.341/27.2 = 1.5199). Arguments
    ending in ``_fs`` are in fs. Fluence in eV^2 fs.

Arguments
    ===============  =====  =========  ==================================================
    name             type   default    effect
    ===============  =====  =========  ==================================================
    n_cos            int    121        cos(k phi) functions, k = 0 .. n_cos - 1
    n_osc            int    30         oscillator functions in x
    e_cut            float  2.9        keep eigenstates below this energy (eV)
    e1 .. inv_mass   float  see above  model parameters (eV)
    t_pulse_fs       float  750.0      duration of the controlled field (fs)
    n_steps          int    6095       propagation steps over the pulse
    t_end_fs         float  1500.0     end of the yield window (fs)
    n_grid           int    30479      points of the yield time grid on [0, t_end]
    n_window         int    20000      last grid points averaged
    e_max            float  1.0        field bound (eV)
    pulse_e0         float  0.0        starting-pulse amplitude (eV; 0: sqrt(pi)/tau)
    pulse_omega      float  2.4        starting-pulse carrier (eV)
    pulse_tau_fs     float  10.0       starting-pulse duration (fs)
    pulse_tp_fs      float  30.0       starting-pulse centre (fs)
    fluence_max      float  0.0        fluence bound of the loss (eV^2 fs; 0: none)
    fluence_penalty  float  10.0       weight of the fluence-bound penalty
    min_excitation   float  0.0        excitation floor of the loss (pumped population)
    excitation_pen.  float  10.0       weight of the excitation-floor penalty
                                       (argument ``excitation_penalty``)
    field_mode       str    "direct"   "direct" (E) or "envelope" (quadratures)
    carrier_ev       float  2.4        envelope carrier(s), eV; a list for several
                     /list
    yield_method     str    "nufft"    free-evolution yields: "nufft" (fast) or "matmul"
                                       (batched products; equal to ~1e-11)
    yield_chunk      int    1024       times per batched product ("matmul")
    step_precision   str    "double"   split-operator step loop: "double" (complex128)
                                       or "single" (complex64 matrix, kicks and states
                                       between steps; ~2x faster on CPU, yields of the
                                       paper run within 1e-4; see SplitOperator)
    cache_dir        str    ""         model cache ("" : $CONTROLMD_CACHE or
                                       ~/.cache/controlmd)
    device           str    "cpu"      where the wave functions are propagated ("cuda"
                                       for a GPU); protocols, losses and metrics stay on
                                       the CPU, the fields are copied over each call
    ===============  =====  =========  ==================================================

Version history
    v0: initial version.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from controlmd._validation import check_choice, check_int, check_positive
from controlmd.dynamics.base import Integrator
from controlmd.dynamics.schrodinger import (
    PRECISIONS,
    SchrodingerEquation,
    SplitOperator,
    free_evolution_yield,
    solve_schrodinger,
    yield_of_states,
)
from controlmd.errors import ControlMDError
from controlmd.models.retinal import (
    RetinalModel,
    RetinalParameters,
    build_retinal_model,
    cached_retinal_model,
    default_cache_dir,
)
from controlmd.protocols import PiecewiseConstant, Protocol
from controlmd.tasks.base import ControlChannels, Task, TaskCapabilities
from controlmd.tasks.registry import register_task

Tensor = torch.Tensor

__all__ = [
    "FS",
    "PAPER_YIELDS",
    "Isomerization",
    "QuantumState",
    "RetinalModel",
    "RetinalParameters",
    "build_retinal_model",
    "default_cache_dir",
    "field_spectrum",
]

FS = 1.0 / 0.6582119569
"""One femtosecond in hbar/eV."""

PAPER_YIELDS = {10: 0.683, 26: 0.749, 50: 0.790}
"""Time-averaged yields logged by the paper's optimization (Adam, lr 1e-2) after n steps."""


def _check_device(device: str) -> torch.device:
    """``device`` as a torch device that can hold a tensor here, else a clear error."""
    try:
        dev = torch.device(device)
        torch.zeros(1, device=dev)
    except (RuntimeError, TypeError, AssertionError) as exc:
        raise ControlMDError(
            f"device = {device!r} cannot be used here ({type(exc).__name__}: {exc}); "
            "use 'cpu', or 'cuda' on a machine with a GPU and a CUDA build of torch"
        ) from exc
    return dev


# ---------------------------------------------------------------------------- the state


@dataclass
class QuantumState:
    """Wave functions of ``B`` replicas during the pulse.

    Attributes:
        psi: ``[B, n]`` complex128, amplitudes on the kept H0 eigenstates.
        t: time, 0-d tensor, hbar/eV.
        step: propagation steps taken.
        aux: ``yield_sum`` ``[B]`` (sum of Y over the window steps passed so far),
            ``fluence`` ``[B]`` (``sum E^2 dt`` so far, eV^2 hbar/eV).
    """

    psi: Tensor
    t: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    step: int = 0
    aux: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n_replicas(self) -> int:
        return self.psi.shape[0]

    def replace(self, **changes: Any) -> QuantumState:
        return dataclasses.replace(self, **changes)

    def detach(self) -> QuantumState:
        return self.replace(
            psi=self.psi.detach(),
            t=self.t.detach(),
            aux={k: v.detach() for k, v in self.aux.items()},
        )


# ---------------------------------------------------------------------------- the task

_GRADIENTS = ("direct", "checkpoint", "adjoint", "none")
_FIELD_MODES = ("direct", "envelope")
_PROPAGATORS = ("split", "ode")


@register_task
class Isomerization(Task[QuantumState]):
    """Shape a laser pulse that maximizes the trans yield of retinal's photo-isomerization.

    See the module docstring for the system, channels, outcome and arguments.

    Example:
        >>> task = Isomerization(n_cos=21, n_osc=6, e_cut=3.5, n_steps=200, t_pulse_fs=100.0,
        ...                      t_end_fs=200.0, n_grid=401, n_window=200, cache_dir="")
        >>> state = task.rollout(task.starting_protocol(), 1, seed=0, gradient="none")
        >>> 0.0 < float(task.metric(state)[0]) < 1.0
        True
    """

    name = "isomerization"
    metric_name = "quantum_yield"
    higher_is_better = True
    units = "energy and field eV (unit dipole), time hbar/eV (1 fs = 1.519267 hbar/eV)"
    capabilities = TaskCapabilities(
        estimators=("pathwise", "forward"), adjoint=True, deterministic=True
    )

    def __init__(
        self,
        *,
        n_cos: int = 121,
        n_osc: int = 30,
        e_cut: float = 2.9,
        e1: float = 2.48,
        w0: float = 3.6,
        w1: float = 1.09,
        omega: float = 0.19,
        kappa: float = 0.1,
        lam: float = 0.19,
        inv_mass: float = 4.84e-4,
        t_pulse_fs: float = 750.0,
        n_steps: int = 6095,
        t_end_fs: float = 1500.0,
        n_grid: int = 30479,
        n_window: int = 20000,
        e_max: float = 1.0,
        pulse_e0: float = 0.0,
        pulse_omega: float = 2.4,
        pulse_tau_fs: float = 10.0,
        pulse_tp_fs: float = 30.0,
        fluence_max: float = 0.0,
        fluence_penalty: float = 10.0,
        min_excitation: float = 0.0,
        excitation_penalty: float = 10.0,
        field_mode: str = "direct",
        carrier_ev: float | list[float] = 2.4,
        yield_method: str = "nufft",
        yield_chunk: int = 1024,
        step_precision: str = "double",
        cache_dir: str = "",
        device: str = "cpu",
    ) -> None:
        check_positive("t_pulse_fs", t_pulse_fs)
        check_int("n_steps", n_steps)
        check_positive("t_end_fs", t_end_fs)
        check_int("n_grid", n_grid, minimum=2)
        check_int("n_window", n_window)
        check_positive("e_max", e_max)
        check_positive("pulse_e0", pulse_e0, allow_zero=True)
        check_positive("pulse_tau_fs", pulse_tau_fs)
        check_positive("fluence_max", fluence_max, allow_zero=True)
        check_positive("fluence_penalty", fluence_penalty, allow_zero=True)
        check_positive("excitation_penalty", excitation_penalty, allow_zero=True)
        check_choice("field_mode", field_mode, _FIELD_MODES)
        carriers = [carrier_ev] if isinstance(carrier_ev, int | float) else list(carrier_ev)
        if not carriers:
            raise ControlMDError("carrier_ev needs at least one carrier frequency")
        check_positive("carrier_ev", torch.tensor(carriers, dtype=torch.float64), allow_zero=True)
        if not 0.0 <= min_excitation < 1.0:
            raise ControlMDError(f"min_excitation must be in [0, 1), got {min_excitation}")
        check_int("yield_chunk", yield_chunk)
        check_choice("yield_method", yield_method, ("nufft", "matmul"))
        check_choice("step_precision", step_precision, PRECISIONS)
        for name, value in (("pulse_omega", pulse_omega), ("pulse_tp_fs", pulse_tp_fs)):
            if not math.isfinite(value):
                raise ControlMDError(f"{name} must be finite, got {value}")
        if t_end_fs < t_pulse_fs:
            raise ControlMDError(f"t_end_fs = {t_end_fs} must be >= t_pulse_fs = {t_pulse_fs}")
        if n_window > n_grid:
            raise ControlMDError(f"n_window = {n_window} must be <= n_grid = {n_grid}")
        params = RetinalParameters(
            e1=e1,
            w0=w0,
            w1=w1,
            omega=omega,
            kappa=kappa,
            lam=lam,
            inv_mass=inv_mass,
            n_cos=n_cos,
            n_osc=n_osc,
            e_cut=e_cut,
        )
        self.device = _check_device(device)
        self.model = cached_retinal_model(params, cache_dir).to(self.device)
        self.field_mode = field_mode
        self.carriers = torch.tensor(carriers, dtype=torch.float64)
        if field_mode == "direct":
            self.controls = ControlChannels(
                names=("E",), low=(-e_max,), high=(e_max,), units=("eV",)
            )
        else:
            tags = [""] if len(carriers) == 1 else [f"_{w:g}eV" for w in carriers]
            names = tuple(f"E_{q}{tag}" for tag in tags for q in ("cos", "sin"))
            k = len(names)
            self.controls = ControlChannels(
                names=names, low=(-e_max,) * k, high=(e_max,) * k, units=("eV",) * k
            )
        self.n_steps = n_steps
        self.t_pulse = t_pulse_fs * FS
        self.dt = self.t_pulse / n_steps
        self.t_end = t_end_fs * FS
        self.pulse = {
            "e0": pulse_e0 if pulse_e0 > 0 else math.sqrt(math.pi) / (pulse_tau_fs * FS),
            "omega": pulse_omega,
            "tau": pulse_tau_fs * FS,
            "tp": pulse_tp_fs * FS,
        }
        self.fluence_max = fluence_max * FS  # eV^2 hbar/eV
        self.fluence_penalty = fluence_penalty
        self.min_excitation = min_excitation
        self.excitation_penalty = excitation_penalty
        self.yield_chunk = yield_chunk
        self.propagator = SplitOperator(
            self.model.energies, self.model.dipole, h=self.dt, precision=step_precision
        )
        # The yield window: grid times t_j = j t_end / (n_grid - 1), j >= n_grid - n_window.
        spacing = self.t_end / (n_grid - 1)
        grid = torch.arange(n_grid - n_window, n_grid, dtype=torch.float64) * spacing
        self._window_times = grid
        self.window_start = float(grid[0])
        self.grid_spacing = spacing
        # Grid times at or after the pulse's end (t = t_pulse itself counts here).
        post = grid[grid >= self.t_pulse * (1 - 1e-12)]
        self._post_start, self._n_post = float(post[0]), post.numel()
        first = math.ceil(self.window_start / self.dt - 1e-9)
        self._first_window_step = min(first, n_steps)
        n_in = n_steps - self._first_window_step
        self._weight_total = self.dt * n_in + spacing * self._n_post
        self.yield_method = yield_method
        self._extras: dict[str, Any] | None = None
        self._last: dict[str, float] = {}

    # ------------------------------------------------------------------ fields

    def starting_field(self, t: Tensor) -> Tensor:
        """The paper's starting pulse ``E0 cos(w0 (t - tp)) exp(-(t - tp)^2 / tau^2)``.

        :param t: times ``[T]``, hbar/eV.
        :return: ``[T]``, eV.
        """
        p = self.pulse
        s = t - p["tp"]
        return p["e0"] * torch.cos(p["omega"] * s) * torch.exp(-(s**2) / p["tau"] ** 2)

    def starting_controls(self, t: Tensor) -> Tensor:
        """The starting pulse in the task's control space ``[T, k]``: ``E(t)`` in ``direct``
        mode; in ``envelope`` mode ``(Re, Im)`` of ``eps(t) = E0 exp(-(t - tp)^2 / tau^2)
        exp(-i (w0 - w_c) t + i w0 tp)`` on the first carrier ``w_c`` (so that
        ``E = Re(eps exp(-i w_c t))``) and zeros on the others."""
        if self.field_mode == "direct":
            return self.starting_field(t).unsqueeze(-1)
        p = self.pulse
        s = t - p["tp"]
        phase = -(p["omega"] - float(self.carriers[0])) * t + p["omega"] * p["tp"]
        amplitude = p["e0"] * torch.exp(-(s**2) / p["tau"] ** 2)
        u = torch.zeros(*t.shape, self.controls.dim, dtype=torch.float64)
        u[..., 0] = amplitude * torch.cos(phase)
        u[..., 1] = amplitude * torch.sin(phase)
        return u

    def starting_protocol(self, n_pieces: int | None = None) -> PiecewiseConstant:
        """A piecewise-constant protocol holding the starting pulse (see
        :meth:`starting_controls`) at each piece's midpoint, bounded by ``+-e_max``
        (default: one piece per propagation step)."""
        k = self.n_steps if n_pieces is None else n_pieces
        check_int("n_pieces", k)
        mid = (torch.arange(k, dtype=torch.float64) + 0.5) * (self.t_pulse / k)
        return PiecewiseConstant(
            dim=self.controls.dim,
            t_final=self.t_pulse,
            n_pieces=k,
            low=list(self.controls.low),
            high=list(self.controls.high),
            init=self.starting_controls(mid),
        )

    def reference_protocol(self) -> tuple[Tensor, Tensor]:
        """The starting pulse as a table ``(t [n], u [n, k])`` (drawn beside trained protocols)."""
        t = torch.linspace(0.0, self.t_pulse, 4001, dtype=torch.float64)
        return t, self.starting_controls(t)

    def step_fields(self, protocol: Protocol, first_step: int, n_steps: int) -> Tensor:
        """Field of steps ``first_step .. first_step + n_steps - 1``, read at their midpoints.

        In ``envelope`` mode ``E = sum_j u_{2j} cos(w_j t) + u_{2j+1} sin(w_j t)`` over the
        carriers ``w_j``.

        :return: ``[n_steps]`` (one field for all replicas) or ``[n_steps, B]`` (per-replica
            protocols such as the env's), eV.
        """
        if protocol.dim != self.controls.dim:
            raise ControlMDError(
                f"field_mode = {self.field_mode!r} has {self.controls.dim} control channel(s); "
                f"protocol has dim = {protocol.dim}"
            )
        if isinstance(protocol, PiecewiseConstant) and self.n_steps % protocol.n_pieces:
            raise ControlMDError(
                f"protocol n_pieces = {protocol.n_pieces} must divide the task's n_steps = {self.n_steps} "
                "so that no step straddles two pieces"
            )
        t_mid = (
            torch.arange(first_step, first_step + n_steps, dtype=torch.float64) + 0.5
        ) * self.dt
        u: Tensor = protocol(t_mid)  # [K, k] or [K, B, k]
        per_replica = u.ndim == 3
        if self.field_mode == "direct":
            field = u[..., 0]
        else:
            u = u.reshape(*u.shape[:-1], -1, 2)  # [..., carriers, (cos, sin)]
            wt = t_mid.reshape(-1, *([1] * (u.ndim - 3)), 1) * self.carriers
            field = (u[..., 0] * torch.cos(wt) + u[..., 1] * torch.sin(wt)).sum(-1)
        return field.reshape(n_steps, -1) if per_replica else field.reshape(n_steps)

    def field_protocol(self, values: Tensor) -> PiecewiseConstant:
        """A protocol holding a table of one field value per propagation step.

        :param values: ``[n_steps]``, eV, inside ``+-e_max``.
        """
        if self.field_mode != "direct":
            raise ControlMDError(
                f"field_protocol needs field_mode = 'direct', got {self.field_mode!r}"
            )
        v = torch.as_tensor(values, dtype=torch.float64).detach()
        if v.ndim != 1 or v.numel() != self.n_steps:
            raise ControlMDError(
                f"field table has shape {tuple(v.shape)}; expected [{self.n_steps}] (one value per step, n_steps)"
            )
        if not bool(torch.isfinite(v).all()) or float(v.abs().max()) >= self.controls.high[0]:
            raise ControlMDError(
                f"field table values must be finite and inside +-e_max = {self.controls.high[0]} eV"
            )
        return PiecewiseConstant(
            dim=1,
            t_final=self.t_pulse,
            n_pieces=self.n_steps,
            low=self.controls.low[0],
            high=self.controls.high[0],
            init=v.unsqueeze(-1),
        )

    # ------------------------------------------------------------------ dynamics

    def initial_state(self, n_replicas: int, seed: int, *, first_replica: int = 0) -> QuantumState:
        """The ground eigenstate for each replica (``seed`` is not used: deterministic task)."""
        check_int("n_replicas", n_replicas)
        psi = torch.zeros(
            n_replicas, self.model.n_states, dtype=torch.complex128, device=self.device
        )
        psi[:, 0] = 1.0
        zeros = torch.zeros(n_replicas, dtype=torch.float64, device=self.device)
        return QuantumState(psi=psi, aux={"yield_sum": zeros, "fluence": zeros.clone()})

    def integrator(self, protocol: Protocol) -> Integrator:
        raise ControlMDError(
            "the isomerization task propagates a wave function, not particles: it has no particle "
            "integrator (estimator = 'score' does not apply); use advance/rollout, or "
            "schrodinger_equation(protocol) for the torchdiffeq vector field"
        )

    def schrodinger_equation(self, protocol: Protocol) -> SchrodingerEquation:
        """The torchdiffeq vector field ``i dpsi/dt = (H0 - mu E(t)) psi`` of this model."""
        return SchrodingerEquation(self.model.energies, self.model.dipole, protocol)

    def advance(
        self,
        state: QuantumState,
        protocol: Protocol,
        n_steps: int,
        *,
        gradient: str = "direct",
        window: int | None = None,
        propagator: str = "split",
        method: str = "dopri5",
        rtol: float = 1e-9,
        atol: float = 1e-11,
        **unknown: Any,
    ) -> QuantumState:
        """Propagate ``n_steps`` steps of ``dt`` under ``protocol``.

        :param gradient: ``direct``, ``checkpoint`` or ``adjoint``: differentiable (the
            split operator always uses its exact O(1)-memory backward pass; the ODE path
            uses torchdiffeq's adjoint for ``adjoint`` and backpropagation otherwise);
            ``none``: no graph.
        :param window: accepted for the trainer's ``checkpoint`` option; not needed.
        :param propagator: ``split`` (default) or ``ode`` (torchdiffeq, solver ``method``).
        :param rtol, atol: tolerances of adaptive ODE solvers.
        :param unknown: other simulate options (of particle tasks) are refused.
        """
        if unknown:
            raise TypeError(
                f"Isomerization.advance() got unexpected keyword arguments {sorted(unknown)}"
            )
        check_int("n_steps", n_steps)
        check_choice("gradient", gradient, _GRADIENTS)
        check_choice("propagator", propagator, _PROPAGATORS)
        if state.step + n_steps > self.n_steps:
            raise ControlMDError(
                f"cannot advance {n_steps} steps from step {state.step}: the pulse ends at n_steps = {self.n_steps}"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and gradient != "none"):
            k0 = state.step
            fields = self.step_fields(protocol, k0, n_steps).to(self.device)
            first = max(self._first_window_step, k0)
            local = list(range(first - k0, n_steps)) if first < k0 + n_steps else []
            if propagator == "split":
                psi, samples = self.propagator.propagate(state.psi, fields, sample_steps=local)
            else:
                psi, samples = self._propagate_ode(
                    state,
                    protocol,
                    n_steps,
                    local,
                    method,
                    adjoint=gradient == "adjoint",
                    rtol=rtol,
                    atol=atol,
                )
            fluence = (fields**2).sum(0) * self.dt
            aux = {k: v for k, v in state.aux.items() if not k.startswith("_")}
            if samples.shape[0]:
                ys = yield_of_states(samples, self.model.p_trans, self.model.p_cis)
                aux["yield_sum"] = aux["yield_sum"] + ys.sum(0)
            aux["fluence"] = aux["fluence"] + fluence
        return QuantumState(
            psi=psi,
            t=torch.tensor((k0 + n_steps) * self.dt, dtype=torch.float64),
            step=k0 + n_steps,
            aux=aux,
        )

    def _propagate_ode(
        self,
        state: QuantumState,
        protocol: Protocol,
        n_steps: int,
        local: list[int],
        method: str,
        *,
        adjoint: bool,
        rtol: float,
        atol: float,
    ) -> tuple[Tensor, Tensor]:
        if self.device.type != "cpu":
            raise ControlMDError(
                f"propagator = 'ode' runs on the CPU only (the protocol is evaluated inside "
                f"the solver); this task has device = {str(self.device)!r}"
            )
        t0 = state.step * self.dt
        marks = sorted(set([0, *local, n_steps]))
        times = torch.tensor([t0 + s * self.dt for s in marks], dtype=torch.float64)
        options = (
            {}
            if method in ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
            else {"step_size": self.dt}
        )
        states = solve_schrodinger(
            self.schrodinger_equation(protocol),
            state.psi,
            times,
            method=method,
            adjoint=adjoint,
            rtol=rtol,
            atol=atol,
            options=options,
        )
        index = [marks.index(s) for s in local]
        return states[-1], states[index] if index else states[:0]

    def rollout(
        self,
        protocol: Protocol,
        n_replicas: int,
        seed: int,
        *,
        first_replica: int = 0,
        **options: Any,
    ) -> QuantumState:
        """The whole pulse from the ground state; options as in :meth:`advance`."""
        state = self.initial_state(n_replicas, seed, first_replica=first_replica)
        return self.advance(state, protocol, self.n_steps, **options)

    # ------------------------------------------------------------------ outcome

    def window_yield(self, state: QuantumState) -> Tensor:
        """Time-averaged yield over the window ``[B]`` (differentiable).

        Window steps already passed contribute ``aux["yield_sum"]``; the rest of the window
        (remaining steps of the pulse, if any, then the grid after the pulse) follows the
        field-free evolution of ``state.psi``.
        """
        cached = state.aux.get("_window_yield")
        if cached is not None and (cached.requires_grad or not state.psi.requires_grad):
            return cached
        s = state.step
        first = max(self._first_window_step, s)
        y_in = self._free_yield(state.psi, (first - s) * self.dt, self.dt, self.n_steps - first)
        y_post = self._free_yield(
            state.psi, self._post_start - s * self.dt, self.grid_spacing, self._n_post
        )
        total = self.dt * (state.aux["yield_sum"] + y_in.sum(1)) + self.grid_spacing * y_post.sum(1)
        value = total / self._weight_total
        state.aux["_window_yield"] = value
        return value

    def _free_yield(self, psi: Tensor, start: float, spacing: float, count: int) -> Tensor:
        m = self.model
        return free_evolution_yield(
            psi,
            m.energies,
            m.p_trans,
            m.p_cis,
            start=start,
            spacing=spacing,
            count=count,
            method=self.yield_method,
            chunk=self.yield_chunk,
        )

    def loss(self, state: QuantumState) -> Tensor:
        """``-mean(Y_window)``, plus ``fluence_penalty * relu(F / fluence_max - 1)^2`` when
        ``fluence_max > 0`` and ``excitation_penalty * relu(1 - P / min_excitation)^2`` when
        ``min_excitation > 0``, with ``F`` the fluence and ``P = 1 - |<0|psi(T)>|^2`` the
        population pumped out of the ground state. A CPU scalar whatever the device."""
        loss = -self.window_yield(state).mean()
        if self.fluence_max > 0 and self.fluence_penalty > 0:
            excess = torch.relu(state.aux["fluence"] / self.fluence_max - 1.0)
            loss = loss + self.fluence_penalty * (excess**2).mean()
        if self.min_excitation > 0 and self.excitation_penalty > 0:
            pumped = 1.0 - state.psi[:, 0].abs().square()
            shortfall = torch.relu(1.0 - pumped / self.min_excitation)
            loss = loss + self.excitation_penalty * (shortfall**2).mean()
        return loss.cpu()

    def metric(self, state: QuantumState) -> Tensor:
        """Exact time-averaged yield of each replica ``[B]`` (CPU)."""
        with torch.no_grad():
            value = self.window_yield(state).detach().cpu()
            pumped = 1.0 - state.psi[:, 0].abs().square()
            self._last = {
                "yield": float(value.mean()),
                "pumped_population": float(pumped.mean()),
                "fluence_eV2_fs": float(state.aux["fluence"].mean()) / FS,
                "step": state.step,
            }
        return value

    def observe(self, state: QuantumState) -> Tensor:
        """Features ``[B, 4]`` (CPU): see the observation table of the module docstring."""
        m = self.model
        psi = state.psi
        n = psi.shape[-1]
        flat = torch.stack((psi.real, psi.imag)).reshape(-1, n)
        q = flat @ torch.cat((m.p_excited, m.p_trans, m.p_cis), dim=1)
        expect = [
            (flat * q[:, j * n : (j + 1) * n]).reshape(2, -1, n).sum((0, 2)) for j in range(3)
        ]
        return torch.stack([psi[:, 0].abs().square().to(torch.float64), *expect], dim=1).cpu()

    # ------------------------------------------------------------------ reports

    def yield_curve(self, protocol: Protocol, *, every: int = 5) -> tuple[Tensor, Tensor]:
        """``Y(t)`` on [0, t_end]: every ``every``-th step during the pulse, then the grid.

        :return: ``(t [T] in fs, Y [T])`` for one replica.
        """
        check_int("every", every)
        with torch.no_grad():
            steps = list(range(0, self.n_steps, every))
            psi0 = self.initial_state(1, 0).psi
            fields = self.step_fields(protocol, 0, self.n_steps).to(self.device)
            psi, samples = self.propagator.propagate(psi0, fields, sample_steps=steps)
            y_in = yield_of_states(samples, self.model.p_trans, self.model.p_cis)[:, 0].cpu()
            n_post = math.floor((self.t_end - self.t_pulse) / self.grid_spacing + 1e-9) + 1
            y_post = self._free_yield(psi, 0.0, self.grid_spacing, n_post)[0].cpu()
            post = torch.arange(n_post, dtype=torch.float64) * self.grid_spacing
            t = torch.cat((torch.tensor(steps, dtype=torch.float64) * self.dt, self.t_pulse + post))
            return t / FS, torch.cat((y_in, y_post))

    def vertical_yield(self) -> float:
        """Window-averaged yield after sudden (Condon) excitation ``mu|0>`` without a field."""
        m = self.model
        with torch.no_grad():
            psi = m.dipole[:, 0].to(torch.complex128)
            psi = (psi / torch.linalg.vector_norm(psi)).unsqueeze(0)
            ys = self._free_yield(
                psi, self.window_start, self.grid_spacing, self._window_times.numel()
            )
        return float(ys.mean())

    def extras(self) -> dict[str, Any]:
        """Model size, unit, window, the field-free vertical-excitation yield, the paper's
        logged yields and a summary of the most recent :meth:`metric` call."""
        if self._extras is None:
            m = self.model
            self._extras = {
                "n_states": m.n_states,
                "basis_size": m.basis_size,
                "ground_energy_eV": float(m.energies[0]),
                "hbar_per_eV_per_fs": FS,
                "dt_fs": self.dt / FS,
                "window_fs": [self.window_start / FS, self.t_end / FS],
                "vertical_excitation_yield": self.vertical_yield(),
                "paper_yields": {str(k): v for k, v in PAPER_YIELDS.items()},
            }
        return {**self._extras, "last_metric": dict(self._last)}


# ---------------------------------------------------------------------------- run report


def field_spectrum(times: Tensor, field: Tensor) -> tuple[Tensor, Tensor]:
    """Power spectrum ``|FT E|^2`` of a field sampled on a uniform grid.

    :param times: ``[T]`` uniform, hbar/eV.
    :param field: ``[T]``, eV.
    :return: ``(photon energies [F] in eV (>= 0), power [F] normalized to max 1)``.
    """
    n = field.numel()
    pad = 1 << (4 * n - 1).bit_length()  # zero padding for a smooth curve
    power = torch.fft.rfft(field, n=pad).abs().square()
    energies = (
        2 * math.pi * torch.fft.rfftfreq(pad, d=float(times[1] - times[0]), dtype=torch.float64)
    )
    return energies, power / power.max().clamp_min(1e-300)
