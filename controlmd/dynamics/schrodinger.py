"""Time-dependent Schrödinger equation of a few-state quantum model driven by a field.

    i d psi / dt = H(t) psi,    H(t) = H0 - mu E(t),

written in the eigenbasis of ``H0`` (``H0 = diag(energies)``). Units: energies and the
field coupling ``mu E`` in eV, time in hbar/eV (1 fs = 1.519267 hbar/eV), so hbar = 1.

Two propagators share this model:

* :class:`SchrodingerEquation` is a torchdiffeq vector field on the real/imaginary split
  ``y = [Re psi, Im psi]``; :func:`solve_schrodinger` integrates it with any torchdiffeq
  solver, differentiated by the adjoint method or by direct backpropagation.
* :class:`SplitOperator` is the fast exact path: a symmetric (Strang) split step
  ``exp(-i H0 h/2) exp(i E mu h) exp(-i H0 h/2)`` with the field kick applied in the
  eigenbasis of ``mu`` (diagonalized once). Every factor is unitary, so the backward pass
  rebuilds the states by stepping backwards in time instead of storing them (O(1) memory
  in the number of steps) and the gradient with respect to every field value is exact for
  the discrete scheme.

:func:`free_evolution_yield` evaluates the product yield of a state evolving without field
(H0 diagonal: exact phases) at many times at once, with batched matrix products.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from controlmd._validation import check_choice, check_finite, check_int, check_positive
from controlmd.errors import ControlMDError, SimulationDivergedError

if TYPE_CHECKING:
    from controlmd.protocols import Protocol

Tensor = torch.Tensor

__all__ = [
    "SchrodingerEquation",
    "SplitOperator",
    "free_evolution_yield",
    "solve_schrodinger",
    "yield_of_states",
]

_ODE_METHODS = (
    "dopri5",
    "dopri8",
    "bosh3",
    "adaptive_heun",
    "fehlberg2",
    "euler",
    "midpoint",
    "rk4",
    "explicit_adams",
    "implicit_adams",
)
_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
_BACKENDS = ("auto", "numpy", "torch")  # arrays of the split-operator step loop
PRECISIONS = ("double", "single")  # arithmetic of the split-operator step loop


def _check_model(energies: Tensor, dipole: Tensor) -> None:
    if energies.ndim != 1:
        raise ControlMDError(f"energies must have shape [n], got {tuple(energies.shape)}")
    n = energies.shape[0]
    if dipole.shape != (n, n):
        raise ControlMDError(
            f"dipole must have shape [n, n] = [{n}, {n}], got {tuple(dipole.shape)}"
        )
    check_finite("energies", energies)
    check_finite("dipole", dipole)
    asym = float((dipole - dipole.T).abs().max())
    if asym > 1e-10 * max(1.0, float(dipole.abs().max())):
        raise ControlMDError(
            f"dipole must be real symmetric (Hermitian); max |mu - mu^T| = {asym:.3g}"
        )


class SchrodingerEquation(nn.Module):
    """Vector field of ``i dpsi/dt = (diag(energies) - E(t) mu) psi`` for torchdiffeq.

    The state is the real split ``y = [Re psi, Im psi]`` of shape ``[B, 2n]``:
    ``d Re psi/dt = H Im psi`` and ``d Im psi/dt = -H Re psi`` (H is real symmetric).

    :param energies: eigenvalues of H0 ``[n]``, eV.
    :param dipole: transition dipole ``mu`` in the H0 eigenbasis ``[n, n]``, real symmetric
        (unit strength: ``mu E`` is in eV when ``E`` is).
    :param protocol: the field ``E(t)`` (one channel, eV; ``t`` in hbar/eV), held as a
        submodule so ``odeint_adjoint`` finds its parameters.
    """

    energies: Tensor  # buffer [n]
    dipole: Tensor  # buffer [n, n]

    def __init__(self, energies: Tensor, dipole: Tensor, protocol: Protocol) -> None:
        super().__init__()
        _check_model(energies, dipole)
        if protocol.dim != 1:
            raise ControlMDError(f"the field protocol must have dim = 1, got {protocol.dim}")
        self.register_buffer("energies", energies)
        self.register_buffer("dipole", dipole)
        self.protocol = protocol
        self.n = energies.shape[0]

    def hamiltonian(self, t: Tensor) -> Tensor:
        """``H(t) = diag(energies) - E(t) mu`` ``[n, n]``, eV."""
        field: Tensor = self.protocol(t).reshape(()).to(self.dipole)
        return torch.diag(self.energies) - field * self.dipole

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        """``dy/dt`` for ``y = [Re psi, Im psi]`` ``[B, 2n]``."""
        field: Tensor = self.protocol(t).reshape(()).to(y)
        re, im = y[..., : self.n], y[..., self.n :]

        def h_times(v: Tensor) -> Tensor:
            return self.energies * v - field * (v @ self.dipole)

        return torch.cat((h_times(im), -h_times(re)), dim=-1)


def solve_schrodinger(
    equation: SchrodingerEquation,
    psi0: Tensor,
    times: Tensor,
    *,
    method: str = "dopri5",
    adjoint: bool = True,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    options: dict[str, Any] | None = None,
) -> Tensor:
    """Integrate the Schrödinger equation with torchdiffeq.

    The protocol's breakpoints inside ``(times[0], times[-1])`` are handed to adaptive
    solvers as ``jump_t``, so piecewise-constant fields are integrated piece by piece.

    :param equation: the vector field (holds the protocol).
    :param psi0: initial states ``[B, n]``, complex.
    :param times: increasing output times ``[T]`` (hbar/eV); ``times[0]`` is the start.
    :param method: a torchdiffeq solver name.
    :param adjoint: ``True``: gradients by the adjoint ODE (O(1) memory);
        ``False``: direct backpropagation through the solver steps.
    :param rtol, atol: tolerances of adaptive solvers.
    :param options: extra solver options (``step_size`` for fixed-grid solvers, ...).
    :return: states at ``times``, ``[T, B, n]`` complex.
    """
    from torchdiffeq import odeint, odeint_adjoint

    check_choice("method", method, _ODE_METHODS)
    if psi0.ndim != 2 or psi0.shape[1] != equation.n:
        raise ControlMDError(f"psi0 must have shape [B, {equation.n}], got {tuple(psi0.shape)}")
    if times.ndim != 1 or times.numel() < 2 or not bool((times[1:] > times[:-1]).all()):
        raise ControlMDError("times must be a 1-d increasing tensor with at least 2 entries")
    opts = dict(options or {})
    if method in _ADAPTIVE and "jump_t" not in opts:
        t0, t1 = float(times[0]), float(times[-1])
        jumps = [b for b in equation.protocol.breakpoints() if t0 < b < t1]
        if jumps:
            opts["jump_t"] = torch.tensor(jumps, dtype=times.dtype)
    y0 = torch.cat((psi0.real, psi0.imag), dim=-1)
    kwargs: dict[str, Any] = {"method": method, "rtol": rtol, "atol": atol, "options": opts}
    if adjoint:
        params = tuple(p for p in equation.parameters() if p.requires_grad)
        ys = odeint_adjoint(equation, y0, times, adjoint_params=params, **kwargs)
    else:
        ys = odeint(equation, y0, times, **kwargs)
    n = equation.n
    return torch.complex(ys[..., :n], ys[..., n:])


class SplitOperator(nn.Module):
    """Exact-for-its-scheme split-operator propagator, run in the eigenbasis of ``mu``.

    One step of length ``h`` under a field value ``E_k`` (constant over the step), the
    Strang splitting::

        psi_{k+1} = A V K_k V^T A psi_k,   A = diag(exp(-i energies h/2)),
                                            K_k = diag(exp(i E_k m h)),

    where ``mu = V diag(m) V^T`` is diagonalized once. The local error is O(h^3 [H0, mu]);
    with ``h`` = 0.123 fs the retinal model's starting-pulse yield moves by < 1e-4 when ``h``
    is halved (see docs/isomerization.md).

    The steps are taken in the eigenbasis of ``mu``: with ``y_k = K_k V^T A psi_k`` (the
    state right after the k-th kick)::

        y_{k+1} = K_{k+1} U y_k,   U = V^T A^2 V   (precomputed once: complex symmetric, unitary)
        psi_k   = A V y_{k-1}

    so a step is one complex ``[n, n]`` matrix-vector product and one diagonal product,
    and the basis changes back to the H0 eigenbasis are made once, for all sampled states
    together, as one large matrix product. It is the same map as the step written out
    (four real basis changes per step), equal to rounding (tested against that form).

    Backward pass (a custom autograd function, exact for the discrete scheme): the
    adjoint ``lambda_k`` of ``y_k`` obeys ``lambda_k = conj(U) conj(K_{k+1}) lambda_{k+1}``
    plus the sources of the sampled states, so ``mu_k = conj(lambda_k)`` obeys
    ``mu_{k-1} = U K_k mu_k`` plus conjugated sources (the forward's matrix and kicks), and
    ``dL/dE_k = -h sum_n m_n Im(y_kn mu_kn)``. The forward states ``y_k`` ``[K, B, n]`` and
    kicks ``[K, (B,) n]`` are kept when they fit in ``max_stored_bytes``: one
    matrix-vector product per backward step. Otherwise the states are rebuilt backwards
    (``conj(y_k)`` obeys the same recursion; memory O(1) in the number of steps, two
    products per backward step).

    On CPU the step loop runs on NumPy arrays sharing memory with the tensors (NumPy's
    complex matrix-vector product and per-call overhead were the fastest measured, see
    docs/performance.md); its BLAS threads follow ``OMP_NUM_THREADS`` (or
    ``OPENBLAS_NUM_THREADS``), not ``torch.set_num_threads``. On other devices the same
    loop runs on torch tensors (``backend = "torch"`` selects it on CPU too).

    :param energies: eigenvalues of H0 ``[n]``, eV.
    :param dipole: ``mu`` in the H0 eigenbasis ``[n, n]``, real symmetric.
    :param h: step length (> 0), hbar/eV.
    :param max_stored_bytes: memory the backward pass may keep from the forward pass
        (>= 0; default 1 GiB; 0 always rebuilds the states backwards).
    :param backend: arrays of the step loop: ``"auto"`` (NumPy on CPU, torch elsewhere),
        ``"numpy"`` (CPU only) or ``"torch"``.
    :param precision: arithmetic of the step loop: ``"double"`` (complex128) or
        ``"single"`` (the free-step matrix, kicks and the states between steps in
        complex64: half the bytes read per step, the step being bound by reading the
        matrix; the basis changes, sampled states, outputs and gradients stay float64 /
        complex128). Single precision moves the paper run's yields by < 1e-4
        (docs/performance.md); the default keeps the double-precision loop.
    """

    energies: Tensor  # buffer [n], eV
    mu_eigvals: Tensor  # buffer [n]: m, eigenvalues of mu
    V: Tensor  # buffer [n, n]: eigenvectors of mu
    half_phase: Tensor  # buffer [n] complex: A = exp(-i energies h / 2)
    U: Tensor  # buffer [n, n] complex: V^T A^2 V

    def __init__(
        self,
        energies: Tensor,
        dipole: Tensor,
        *,
        h: float,
        max_stored_bytes: int = 2**30,
        backend: str = "auto",
        precision: str = "double",
    ) -> None:
        super().__init__()
        _check_model(energies, dipole)
        check_positive("h", h)
        check_int("max_stored_bytes", max_stored_bytes, minimum=0)
        check_choice("backend", backend, _BACKENDS)
        check_choice("precision", precision, PRECISIONS)
        if backend == "numpy" and energies.device.type != "cpu":
            raise ControlMDError(
                f"backend = 'numpy' needs CPU tensors, got device {energies.device}; use 'auto' or 'torch'"
            )
        self.backend = backend
        self.precision = precision
        self.h = float(h)
        self.max_stored_bytes = int(max_stored_bytes)
        m, V = torch.linalg.eigh(dipole)
        half = torch.polar(torch.ones_like(energies), -energies * (self.h / 2))  # A
        Vc = V.to(half.dtype)
        U = (Vc.T * (half * half)) @ Vc
        self.register_buffer("energies", energies)
        self.register_buffer("mu_eigvals", m)
        self.register_buffer("V", V)
        self.register_buffer("half_phase", half)
        self.register_buffer("U", 0.5 * (U + U.T))  # exactly symmetric
        self.n = energies.shape[0]
        self._arrays: tuple[tuple[Any, ...], _Arrays] | None = None

    def propagate(
        self, psi0: Tensor, fields: Tensor, *, sample_steps: Sequence[int] = ()
    ) -> tuple[Tensor, Tensor]:
        """Take ``K = len(fields)`` steps from ``psi0``.

        Differentiable with respect to ``psi0`` and ``fields`` (custom backward pass, see
        the class docstring).

        :param psi0: ``[B, n]`` complex.
        :param fields: field value of each step, ``[K]`` (all replicas) or ``[K, B]`` (one
            field per replica), eV.
        :param sample_steps: step indices ``s`` in ``[0, K]`` at which the state ``psi_s``
            (time ``s h`` after the start) is also returned, increasing.
        :return: ``(psi_K [B, n], samples [S, B, n])``, complex.
        """
        if psi0.ndim != 2 or psi0.shape[1] != self.n:
            raise ControlMDError(f"psi0 must have shape [B, {self.n}], got {tuple(psi0.shape)}")
        if not (fields.ndim == 1 or (fields.ndim == 2 and fields.shape[1] == psi0.shape[0])):
            raise ControlMDError(
                f"fields must have shape [K] or [K, B] with B = {psi0.shape[0]}, got {tuple(fields.shape)}"
            )
        n_steps = fields.shape[0]
        steps = [int(s) for s in sample_steps]
        if steps and (
            min(steps) < 0
            or max(steps) > n_steps
            or any(b <= a for a, b in itertools.pairwise(steps))
        ):
            raise ControlMDError(
                f"sample_steps must increase within [0, {n_steps}], got {steps[:10]}"
            )
        psi0 = psi0.to(self.U.dtype)
        fields = fields.to(self.V.dtype)
        if torch.is_grad_enabled() and (psi0.requires_grad or fields.requires_grad):
            result: tuple[Tensor, Tensor] = _SplitOperatorFunction.apply(psi0, fields, self, steps)
            return result
        out, samples, _ = _sweep(self.arrays(), psi0, fields, steps, store=False)
        return out, samples

    def arrays(self) -> _Arrays:
        """The operators as arrays of the step loop (NumPy views on CPU), cached."""
        key = (
            self.U.device,
            self.U.data_ptr(),
            self.U._version,
            self.V.data_ptr(),
            self.precision,
        )
        if self._arrays is None or self._arrays[0] != key:
            self._arrays = (key, _Arrays(self))
        return self._arrays[1]


class _Arrays:
    """Backend arrays of a :class:`SplitOperator`: NumPy (sharing memory) on CPU, torch
    tensors on other devices; ``xp`` is the module that operates on them."""

    def __init__(self, prop: SplitOperator) -> None:
        cpu = prop.U.device.type == "cpu" and prop.backend != "torch"
        self.xp: Any = np if cpu else torch
        self.device = prop.U.device
        self.h = prop.h
        self.max_stored_bytes = prop.max_stored_bytes

        def arr(t: Tensor) -> Any:
            return t.detach().numpy() if cpu else t.detach()

        def conj(t: Tensor) -> Any:
            c = t.detach().conj().resolve_conj()
            return c.numpy() if cpu else c

        single = prop.precision == "single"
        self.U = arr(prop.U.to(torch.complex64) if single else prop.U)
        self.V, self.VT = arr(prop.V), arr(prop.V.T.contiguous())
        self.a, self.a_conj = arr(prop.half_phase), conj(prop.half_phase)
        self.m = arr(prop.mu_eigvals)
        self.m_h = arr(prop.mu_eigvals * prop.h)
        self.cdtype = torch.complex64 if single else prop.U.dtype
        self._spare: tuple[Any, Any] | None = None

    def tensor(self, x: Any) -> Tensor:
        return torch.from_numpy(x) if self.xp is np else x

    def array(self, t: Tensor) -> Any:
        return t.detach().resolve_conj().numpy() if self.xp is np else t.detach()

    def empty(self, shape: tuple[int, ...]) -> Any:
        if self.xp is np:
            return np.empty(shape, dtype=self.U.dtype)
        return torch.empty(shape, dtype=self.cdtype, device=self.device)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        if self.xp is np:
            return np.zeros(shape, dtype=self.U.dtype)
        return torch.zeros(shape, dtype=self.cdtype, device=self.device)

    def zeros_real(self, shape: tuple[int, ...]) -> Any:
        if self.xp is np:
            return np.zeros(shape, dtype=self.m.dtype)
        return torch.zeros(shape, dtype=self.m.dtype, device=self.device)

    def kicks(self, fields: Any, out: Any = None) -> Any:
        """``exp(i E_k m h)`` for steps ``[K]`` or ``[K, B]`` of fields: ``[K, (B,) n]``,
        written into ``out`` when given. Computed by torch also on CPU (its vectorized
        sin/cos were faster than NumPy's), ``_KICK_CHUNK`` steps at a time (small
        temporaries)."""
        f = torch.from_numpy(fields) if self.xp is np else fields
        m_h = torch.as_tensor(self.m_h)
        if out is None:
            out = self.empty((*f.shape, m_h.shape[0]))
        parts = torch.view_as_real(torch.from_numpy(out) if self.xp is np else out)
        for c0 in range(0, f.shape[0], _KICK_CHUNK):
            theta = f[c0 : c0 + _KICK_CHUNK].unsqueeze(-1) * m_h
            re, im = parts[c0 : c0 + _KICK_CHUNK, ..., 0], parts[c0 : c0 + _KICK_CHUNK, ..., 1]
            if re.dtype == theta.dtype:
                torch.cos(theta, out=re)
                torch.sin(theta, out=im)
            else:  # single precision: phases in float64, rounded once
                re.copy_(torch.cos(theta))
                im.copy_(torch.sin(theta))
        return out

    def loop(self, x: Any) -> Any:
        """``x`` in the step loop's complex dtype (itself when it already is)."""
        if self.xp is np:
            return x if x.dtype == self.U.dtype else x.astype(self.U.dtype)
        return x.to(self.cdtype)

    def take(self, shape: tuple[int, ...], kick_shape: tuple[int, ...]) -> tuple[Any, Any]:
        """Arrays for the kept states and kicks: the ones a finished backward pass gave
        back when their shapes match (no fresh pages for ~140 MiB per iteration), else new."""
        if self._spare is not None and (self._spare[0].shape, self._spare[1].shape) == (
            shape,
            kick_shape,
        ):
            spare, self._spare = self._spare, None
            return spare
        return self.empty(shape), self.empty(kick_shape)

    def give(self, Y: Any, kicks: Any) -> None:
        """Keep ``(Y, kicks)`` for the next :meth:`take` (their backward pass is done)."""
        self._spare = (Y, kicks)

    def real_matmul(self, z: Any, M: Any) -> Any:
        """``z @ M`` for complex ``z [..., n]`` and a real matrix ``M`` (one 2-D real product:
        NumPy's batched 3-D product was 2.5x slower)."""
        xp = self.xp
        parts = xp.stack((z.real, z.imag))
        if xp is torch and parts.dtype != M.dtype:  # single-precision states, float64 basis
            parts = parts.to(M.dtype)
        prod = (parts.reshape(-1, parts.shape[-1]) @ M).reshape(*parts.shape[:-1], M.shape[1])
        if xp is np:
            return prod[0] + 1j * prod[1]
        return torch.complex(prod[0], prod[1])

    def to_mu(self, psi: Any) -> Any:
        """``V^T A psi`` (rows)."""
        return self.real_matmul(psi * self.a, self.V)

    def from_mu(self, y: Any) -> Any:
        """``A V y`` (rows)."""
        return self.real_matmul(y, self.VT) * self.a

    def adjoint_to_mu(self, g: Any) -> Any:
        """``(A V)^H g``: an H0-basis gradient as a gradient of ``y``."""
        return self.real_matmul(g * self.a_conj, self.V)

    def adjoint_from_mu(self, lam: Any) -> Any:
        """``(V^T A)^H lam``: a gradient of ``V^T A psi`` as a gradient of ``psi``."""
        return self.real_matmul(lam, self.VT) * self.a_conj

    def field_gradient(self, y: Any, mu: Any) -> Any:
        """``dL/dE = -h sum_n m_n Im(y_n mu_n)`` over the last axis (``mu = conj(lambda)``),
        in float64."""
        im = (y * mu).imag
        if self.xp is torch and im.dtype != self.m_h.dtype:
            im = im.to(self.m_h.dtype)
        return -(im @ self.m_h)


_KICK_CHUNK = 256  # steps whose kicks are computed together (bounds the [C, (B,) n] buffer)


def _sweep(
    ar: _Arrays, psi0: Tensor, fields: Tensor, steps: list[int], *, store: bool
) -> tuple[Tensor, Tensor, tuple[Any, Any] | None]:
    """The forward steps. Returns ``(psi_K, samples, kept)``: ``kept`` is ``(Y, kicks)``,
    the states ``y_k`` ``[K, B, n]`` and kicks ``[K, (B,) n]`` when ``store``, else
    ``(y_{K-1}, None)``; ``None`` for ``K = 0``."""
    xp = ar.xp
    K = fields.shape[0]
    if K == 0:
        samples = psi0.unsqueeze(0).expand(len(steps), *psi0.shape).clone()
        return psi0.clone(), samples, None
    x, f = ar.array(psi0), ar.array(fields)
    B, n = x.shape
    Y: Any = None  # [K, B, n] states, with kicks [K, (B,) n], when store
    kicks: Any = None
    if store:
        Y, kicks = ar.take((K, B, n), (*f.shape, n))
        ar.kicks(f, out=kicks)
    y, tmp = ar.empty((B, n)), ar.empty((B, n))
    copies = {}  # sample step s >= 1 -> y_{s-1} (copied when not stored)
    wanted = set(steps)
    check_every = max(1, K // 8)
    for c0 in range(0, K, _KICK_CHUNK):
        kick = kicks[c0 : c0 + _KICK_CHUNK] if store else ar.kicks(f[c0 : c0 + _KICK_CHUNK])
        for j in range(kick.shape[0]):
            k = c0 + j
            cur = Y[k] if store else y
            if k == 0:
                xp.multiply(ar.loop(ar.to_mu(x)), kick[0], out=cur)
            else:
                xp.matmul(Y[k - 1] if store else y, ar.U, out=tmp)
                xp.multiply(tmp, kick[j], out=cur)
            if k + 1 in wanted and not store:
                copies[k + 1] = y.copy() if xp is np else y.clone()
            if (k + 1) % check_every == 0 and not bool(xp.isfinite(cur).all()):
                raise SimulationDivergedError(
                    "non-finite wave function", step=k + 1, time=(k + 1) * ar.h
                )
    last = Y[K - 1] if store else y
    out = ar.tensor(ar.from_mu(last))
    later = [s for s in steps if s >= 1]
    parts = []
    if 0 in wanted:
        parts.append(psi0.detach().clone().unsqueeze(0))
    if later:
        ys = Y[[s - 1 for s in later]] if store else xp.stack([copies[s] for s in later])
        parts.append(ar.tensor(ar.from_mu(ys)))
    samples = torch.cat(parts) if parts else out.new_zeros((0, *out.shape))
    return out, samples, (Y, kicks) if store else (last, None)


class _SplitOperatorFunction(torch.autograd.Function):
    """Forward: the split steps (:func:`_sweep`). Backward: the adjoint steps, with the
    forward states kept or rebuilt backwards (see :class:`SplitOperator`).

    The backward walk carries ``mu_k = conj(lambda_k)``, which obeys ``mu_{k-1} = U K_k mu_k
    + conj(source)``: the forward operator ``U`` and kicks ``K_k`` serve both sweeps (one
    matrix in cache, no conjugated kicks); rebuilt states are carried as ``conj(y_k)``,
    which obey the same recursion. ``dL/dE_k = -h sum_n m_n Im(y_kn mu_kn)``."""

    @staticmethod
    def forward(
        ctx: Any, psi0: Tensor, fields: Tensor, prop: SplitOperator, steps: list[int]
    ) -> tuple[Tensor, Tensor]:
        ar = prop.arrays()
        K, (B, n) = fields.shape[0], psi0.shape
        kick_rows = B if fields.ndim == 2 else 1
        store = K * (B + kick_rows) * n * ar.cdtype.itemsize <= ar.max_stored_bytes
        out, samples, kept = _sweep(ar, psi0, fields, steps, store=store)
        ctx.ar, ctx.kept, ctx.store, ctx.steps, ctx.shape = ar, kept, store, steps, (B, n)
        ctx.save_for_backward(fields)
        return out, samples

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor | None, grad_samples: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        # Conventions: for a real loss L, PyTorch's gradient of a complex tensor z is
        # G = dL/dRe z + i dL/dIm z; a linear map z' = M z sends it back as G = M^H G'.
        ar: _Arrays = ctx.ar
        xp = ar.xp
        (fields,) = ctx.saved_tensors
        K = fields.shape[0]
        kept, store, steps = ctx.kept, ctx.store, ctx.steps
        ctx.kept = None
        B, n = ctx.shape
        # gradients of the sampled states psi_s, and of psi_K (a sample too when s = K)
        g_samples = None if grad_samples is None or not steps else ar.array(grad_samples)
        g_final = None if grad_out is None else ar.array(grad_out)
        g0 = g_samples[0] if g_samples is not None and steps[0] == 0 else None
        if K == 0:  # psi_K and every sample are psi_0
            parts = [ar.tensor(g) for g in (g0, g_final) if g is not None]
            grad_psi0 = sum(parts[1:], parts[0]) if parts else None
            return grad_psi0, fields.new_zeros(fields.shape), None, None
        f = ar.array(fields)
        # psi_s = A V y_{s-1}: the sources of the adjoint of y_{s-1}, as conj (see the class)
        rows = [i for i, s in enumerate(steps) if s >= 1] if g_samples is not None else []
        src = {}  # k -> conj(gradient of y_k) from psi_{k+1}
        if g_samples is not None and rows:
            mapped = ar.loop(ar.adjoint_to_mu(g_samples[rows]).conj())
            src = {steps[i] - 1: mapped[j] for j, i in enumerate(rows)}
        if g_final is not None:
            last = ar.loop(ar.adjoint_to_mu(g_final).conj())
            src[K - 1] = src[K - 1] + last if K - 1 in src else last
        mu = src[K - 1] + 0 if K - 1 in src else ar.zeros((B, n))
        tmp = ar.empty((B, n))
        if store:
            Y, kicks = kept
            buf = ar.empty((min(K, _KICK_CHUNK), B, n))
        else:
            y_conj = kept[0].conj()
        grad = ar.zeros_real((K, B))
        for c1 in range(K, 0, -_KICK_CHUNK):
            c0 = max(0, c1 - _KICK_CHUNK)
            kick = kicks[c0:c1] if store else ar.kicks(f[c0:c1])
            for k in range(c1 - 1, c0 - 1, -1):
                if store:
                    buf[k - c0] = mu
                else:
                    grad[k] = ar.field_gradient(y_conj.conj(), mu)
                if k == 0:
                    break
                xp.multiply(mu, kick[k - c0], out=tmp)
                xp.matmul(tmp, ar.U, out=mu)
                if k - 1 in src:
                    mu += src[k - 1]
                if not store:
                    xp.multiply(y_conj, kick[k - c0], out=tmp)
                    xp.matmul(tmp, ar.U, out=y_conj)
            if store:
                grad[c0:c1] = ar.field_gradient(Y[c0:c1], buf[: c1 - c0])
        grad_psi0 = ar.adjoint_from_mu((mu * kick[0]).conj())
        if store:
            ar.give(Y, kicks)
        if g0 is not None:
            grad_psi0 = grad_psi0 + g0
        grad_fields = ar.tensor(grad)
        grad_fields = grad_fields.sum(-1) if fields.ndim == 1 else grad_fields
        return ar.tensor(grad_psi0), grad_fields.to(fields.dtype), None, None


def yield_of_states(psi: Tensor, p_trans: Tensor, p_cis: Tensor) -> Tensor:
    """Product yield ``Y = <P_trans> / (<P_trans> + <P_cis> - |<0|psi>|^2)`` of states.

    Differentiable; the backward pass is analytic (no second matrix product):
    ``2 dY/dpsi* = (2/d) [(1 - Y) P_trans psi - Y P_cis psi + Y psi_0 e_0]``,
    ``d = <P_trans> + <P_cis> - |psi_0|^2``.

    :param psi: states ``[..., n]`` complex in the H0 eigenbasis (index 0 = ground state).
    :param p_trans, p_cis: projectors in the same basis ``[n, n]``, real symmetric.
    :return: ``Y`` ``[...]``.
    """
    y: Tensor = _YieldOfStates.apply(psi, p_trans, p_cis)
    return y


class _YieldOfStates(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, psi: Tensor, p_trans: Tensor, p_cis: Tensor) -> Tensor:
        n = psi.shape[-1]
        flat = torch.stack((psi.real, psi.imag)).reshape(2, -1, n)  # [2, S, n]
        q = (flat.reshape(-1, n) @ torch.cat((p_trans, p_cis), dim=1)).reshape(2, -1, 2 * n)
        a = (flat * q[..., :n]).sum((0, 2))
        c = (flat * q[..., n:]).sum((0, 2))
        g = psi[..., 0].abs().square().reshape(-1)
        d = a + c - g
        y = a / d
        ctx.save_for_backward(q, y, d, psi)
        return y.reshape(psi.shape[:-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, y, d, psi = ctx.saved_tensors
        n = psi.shape[-1]
        w = grad.reshape(-1) * 2.0 / d  # [S]
        gq = (w * (1.0 - y)).unsqueeze(-1) * q[..., :n] - (w * y).unsqueeze(-1) * q[..., n:]
        g = torch.complex(gq[0], gq[1])  # [S, n]
        g[:, 0] += w * y * psi.reshape(-1, n)[:, 0]
        return g.reshape(psi.shape), None, None


_FREE_METHODS = ("nufft", "matmul")


def free_evolution_yield(
    psi: Tensor,
    energies: Tensor,
    p_trans: Tensor,
    p_cis: Tensor,
    *,
    start: float,
    spacing: float,
    count: int,
    method: str = "nufft",
    chunk: int = 1024,
) -> Tensor:
    """Yield of each state evolved without field, at the delays ``start + j spacing``.

    ``psi(tau) = exp(-i energies tau) psi`` exactly (H0 diagonal), so the expectation of a
    real symmetric operator ``O`` is ``sum_nm A_nm exp(i (E_n - E_m) tau)`` with
    ``A_nm = conj(psi_n) O_nm psi_m``. Two evaluations, equal to rounding:

    * ``matmul``: ``psi(tau_j)`` for ``chunk`` delays at a time, projected with batched
      matrix products (``O(count n^2)``); the backward pass recomputes each chunk.
    * ``nufft``: the sums over the ``n (n - 1) / 2`` pair frequencies at all delays at once
      by a type-1 non-uniform FFT (Gaussian gridding, Greengard & Lee, SIAM Rev. 46, 443
      (2004); relative error ~1e-13), ``O(n^2 + count log count)``; its backward pass is
      the adjoint NUFFT, written out.

    :param psi: ``[B, n]`` complex, H0 eigenbasis.
    :param energies: ``[n]``, eV.
    :param p_trans, p_cis: projectors ``[n, n]``.
    :param start: first delay (hbar/eV; may be negative: evolution backwards).
    :param spacing: delay between samples (> 0), hbar/eV.
    :param count: number of delays (>= 0).
    :param method: ``nufft`` or ``matmul``.
    :param chunk: delays per batched product (``matmul``).
    :return: yields ``[B, count]``.
    """
    check_choice("method", method, _FREE_METHODS)
    check_positive("spacing", spacing)
    check_int("count", count, minimum=0)
    check_int("chunk", chunk)
    if count == 0:
        return psi.real.new_zeros(psi.shape[0], 0)
    if method == "matmul":
        taus = start + spacing * torch.arange(count, dtype=energies.dtype, device=energies.device)
        y: Tensor = _FreeYieldFunction.apply(psi, energies, taus, p_trans, p_cis, chunk)
        return y
    expect = _free_expectations_nufft(
        psi, energies, torch.stack((p_trans, p_cis)), start, spacing, count
    )
    a, c = expect[0], expect[1]
    g = psi[:, 0].abs().square().unsqueeze(-1)
    return a / (a + c - g)


_NUFFT_SPREAD = 16  # Gaussian half-width in fine-grid points (M_sp; relative error ~1e-13)


class _NufftPlan:
    """Pair frequencies, fine-grid positions and Gaussian weights of a type-1 NUFFT from
    the ``P = n (n - 1) / 2`` pair frequencies ``E_n - E_m`` (n < m) to ``count`` equally
    spaced delays (oversampling 2, Greengard & Lee 2004). The weights of the ``2 M_sp + 1``
    grid points around each frequency are products ``e1 e2^o e3_o`` (fast Gaussian
    gridding): no exponential per point."""

    def __init__(self, energies: Tensor, start: float, spacing: float, count: int) -> None:
        n = energies.shape[0]
        self.iu = torch.triu_indices(n, n, offset=1, device=energies.device)
        omega = energies[self.iu[0]] - energies[self.iu[1]]  # pair frequencies, eV
        M = count + count % 2  # even number of modes k = -M/2 .. M/2 - 1, j = k + M/2
        theta = omega * spacing  # phase per sample, |theta| < pi needed
        if float(theta.abs().max()) >= math.pi:
            raise ControlMDError(
                f"spacing = {spacing:.4g} hbar/eV aliases frequencies up to {float(omega.abs().max()):.4g} eV; "
                f"use spacing < {math.pi / float(omega.abs().max()):.4g} or method = 'matmul'"
            )
        self.phase = torch.exp(1j * (omega * start + theta * (M // 2)))  # centred modes
        self.M, self.M_r, self.count = M, 2 * M, count
        h = 2 * math.pi / self.M_r
        tau = math.pi * _NUFFT_SPREAD / (3.0 * M * M)
        nearest = torch.round(theta / h)
        offset = (
            nearest * h - theta
        )  # |offset| <= h/2; float64 (an int tensor times a float is float32)
        # exp(-(offset + o h)^2 / 4 tau) = e1 * e2^o * e3_o
        self.e1 = torch.exp(-(offset**2) / (4.0 * tau))
        self.e2 = torch.exp(-offset * (h / (2.0 * tau)))
        o = torch.arange(-_NUFFT_SPREAD, _NUFFT_SPREAD + 1, dtype=energies.dtype)
        self.e3 = torch.exp(-((o * h) ** 2) / (4.0 * tau)).tolist()
        # index into a grid padded by M_sp on both sides: no wrap-around per point
        self.base = torch.remainder(nearest.long(), self.M_r)
        k = torch.arange(-(M // 2), M // 2, device=energies.device)
        self.select = torch.remainder(k, self.M_r)
        kk = k.to(energies.dtype)
        self.scale = (2 * math.pi / math.sqrt(4 * math.pi * tau)) * torch.exp(kk * kk * tau)

    def weights(self) -> Iterator[tuple[int, Tensor]]:
        """``(o, w_o [P])`` for the grid offsets ``o = -M_sp .. M_sp``."""
        S = _NUFFT_SPREAD
        up, down = self.e1, self.e1
        inv = 1.0 / self.e2
        yield 0, self.e1 * self.e3[S]
        for o in range(1, S + 1):
            up = up * self.e2
            down = down * inv
            yield o, up * self.e3[S + o]
            yield -o, down * self.e3[S - o]

    def spread(self, values: Tensor) -> Tensor:
        """Type-1 NUFFT: ``sum_p values_p exp(i omega_p (start + j spacing))`` up to the
        deconvolution, as the centred modes ``[..., M]`` (complex)."""
        S, M_r = _NUFFT_SPREAD, self.M_r
        padded = values.new_zeros(*values.shape[:-1], M_r + 2 * S)
        for o, w in self.weights():
            padded.index_add_(-1, self.base + (S + o), values * w)
        grid = padded[..., S : S + M_r].clone()
        grid[..., :S] += padded[..., S + M_r :]
        grid[..., M_r - S :] += padded[..., :S]
        modes: Tensor = torch.fft.ifft(grid, dim=-1)
        return modes[..., self.select] * self.scale

    def spread_adjoint(self, grad_modes: Tensor) -> Tensor:
        """Gradient of :meth:`spread`'s input from the gradient of its output ``[..., M]``."""
        S, M_r = _NUFFT_SPREAD, self.M_r
        full = grad_modes.new_zeros(*grad_modes.shape[:-1], M_r)
        full[..., self.select] = grad_modes * self.scale
        g = torch.fft.fft(full, dim=-1) / M_r
        padded = torch.cat((g[..., M_r - S :], g, g[..., :S]), dim=-1)
        out = None
        for o, w in self.weights():
            term = padded[..., self.base + (S + o)] * w  # (index_select is 10x slower here)
            out = term if out is None else out + term
        assert out is not None
        return out


class _NufftExpectations(torch.autograd.Function):
    """``<O_i>(start + j spacing)`` ``[n_ops, B, count]`` of freely evolving states, by a
    type-1 NUFFT over the pair frequencies; the backward pass is the adjoint NUFFT (an FFT
    and a gather), written out instead of taped by autograd."""

    @staticmethod
    def forward(ctx: Any, psi: Tensor, ops: Tensor, plan: _NufftPlan) -> Tensor:
        iu = plan.iu
        o_pairs = ops[:, iu[0], iu[1]]  # [n_ops, P]
        amp = psi.conj()[:, iu[0]] * psi[:, iu[1]] * plan.phase  # [B, P], n < m
        modes = plan.spread(o_pairs.unsqueeze(1) * amp.unsqueeze(0))  # [n_ops, B, M]
        o_diag = ops.diagonal(dim1=1, dim2=2)  # [n_ops, n]
        diag = psi.abs().square() @ o_diag.T  # [B, n_ops]: time-independent terms
        ctx.save_for_backward(psi, ops)
        ctx.plan = plan
        return diag.T.unsqueeze(-1) + 2.0 * modes.real[..., : plan.count]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # PyTorch's complex-gradient convention: G_z = dL/dRe z + i dL/dIm z.
        psi, ops = ctx.saved_tensors
        plan: _NufftPlan = ctx.plan
        iu = plan.iu
        grad_modes = grad.new_zeros(*grad.shape[:-1], plan.M).to(psi.dtype)
        grad_modes[..., : plan.count] = 2.0 * grad
        g_values = plan.spread_adjoint(grad_modes)  # [n_ops, B, P]
        g_amp = (ops[:, iu[0], iu[1]].unsqueeze(1) * g_values).sum(0) * plan.phase.conj()
        g_psi = torch.zeros_like(psi)
        g_psi.index_add_(-1, iu[1], psi[:, iu[0]] * g_amp)  # amp = conj(psi_n) psi_m
        g_psi.index_add_(-1, iu[0], psi[:, iu[1]] * g_amp.conj())
        g_diag = grad.sum(-1).T @ ops.diagonal(dim1=1, dim2=2)  # [B, n]
        g_psi = g_psi + 2.0 * psi * g_diag
        return g_psi, None, None


def _free_expectations_nufft(
    psi: Tensor, energies: Tensor, ops: Tensor, start: float, spacing: float, count: int
) -> Tensor:
    """``<O_i>(start + j spacing)`` ``[n_ops, B, count]`` by a type-1 NUFFT (oversampling 2)."""
    plan = _NufftPlan(energies, start, spacing, count)
    expectations: Tensor = _NufftExpectations.apply(psi, ops, plan)
    return expectations


class _FreeYieldFunction(torch.autograd.Function):
    @staticmethod
    def _chunk_terms(
        psi: Tensor, energies: Tensor, taus: Tensor, proj: Tensor
    ) -> tuple[Tensor, ...]:
        n = psi.shape[-1]
        phase = torch.exp(-1j * taus[:, None] * energies[None, :])  # [J, n]
        states = phase[None] * psi[:, None, :]  # [B, J, n]
        flat = torch.stack((states.real, states.imag))  # [2, B, J, n]
        q = (flat.reshape(-1, n) @ proj).reshape(*flat.shape[:-1], 2 * n)
        a = (flat * q[..., :n]).sum((0, -1))
        c = (flat * q[..., n:]).sum((0, -1))
        g = states[..., 0].abs().square()
        return phase, flat, q, a, c, g

    @staticmethod
    def forward(
        ctx: Any,
        psi: Tensor,
        energies: Tensor,
        taus: Tensor,
        p_trans: Tensor,
        p_cis: Tensor,
        chunk: int,
    ) -> Tensor:
        proj = torch.cat((p_trans, p_cis), dim=1)
        out = []
        for j in range(0, taus.numel(), chunk):
            *_, a, c, g = _FreeYieldFunction._chunk_terms(psi, energies, taus[j : j + chunk], proj)
            out.append(a / (a + c - g))
        ctx.save_for_backward(psi, energies, taus, proj)
        ctx.chunk = chunk
        return torch.cat(out, dim=1) if out else psi.real.new_zeros(psi.shape[0], 0)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        # 2 dY/dpsi* = (2/d) [(1 - Y) P_t psi - Y P_c psi + Y psi_0 e_0], d = a + c - g; the
        # delay phase is undone with conj(phase).
        psi, energies, taus, proj = ctx.saved_tensors
        n = psi.shape[-1]
        grad_psi = torch.zeros_like(psi)
        for j in range(0, taus.numel(), ctx.chunk):
            phase, flat, q, a, c, g = _FreeYieldFunction._chunk_terms(
                psi, energies, taus[j : j + ctx.chunk], proj
            )
            d = a + c - g
            y = a / d
            w = grad_y[:, j : j + ctx.chunk] * 2.0 / d  # [B, J]
            gt = (w * (1 - y))[None, ..., None] * q[..., :n] - (w * y)[None, ..., None] * q[..., n:]
            gc = torch.complex(gt[0], gt[1])  # [B, J, n]
            states0 = torch.complex(flat[0, ..., 0], flat[1, ..., 0])
            gc[..., 0] = gc[..., 0] + w * y * states0
            grad_psi = grad_psi + (phase.conj()[None] * gc).sum(1)
        return grad_psi, None, None, None, None, None
