"""Time-dependent control fields u(t) in R^k (and feedback fields u(t, obs)).

A :class:`Protocol` maps time ``t`` (0-d tensor, or ``[T]``) to control values ``[k]``
(or ``[T, k]``), squashed smoothly into physical bounds ``[low, high]``. Time is in the
task's time unit; u in the control channel's unit (the task states both).

Kinds (names of the registry used by ``[protocol] kind = ...`` in experiment files):

==================== ===================================================================
``mlp``              MLP of Fourier time features ``[s, cos(pi j s), sin(pi j s)]``, s = t/T
``fourier``          ``a + b s + sum_j (c_j cos(2 pi j s) + d_j sin(2 pi j s))``
``chebyshev``        ``sum_j c_j T_j(2 s - 1)``
``spline``           natural cubic spline through ``K`` equally spaced knots
``piecewise_constant`` ``K`` equal pieces (the gymnasium env's K-step episode)
``table``            replay of a sampled table (linear interpolation or hold)
``feedback_mlp``     u(t, obs): MLP of time features and task observations
``none``             no channels (tasks without control that learn their Hamiltonian)
==================== ===================================================================

Every kind takes ``low``/``high`` (tanh squashing into the bounds), optional fixed
endpoints ``start``/``end`` (exact, by a linear correction in unsquashed space) and a
``fluence_weight`` for the penalty ``w * integral_0^T |u(t)|^2 dt``. Protocols save to a
file (:meth:`Protocol.save`, :func:`load_protocol`) and sample to a table
(:meth:`Protocol.sample`, :meth:`Protocol.write_table`).
"""

from __future__ import annotations

import functools
import inspect
import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from controlmd._validation import check_choice, check_int, check_positive
from controlmd.errors import ControlMDError

Tensor = torch.Tensor
InitSpec = float | Sequence[float] | Sequence[Sequence[float]] | Tensor | Callable[[Tensor], Tensor]
"""How to initialize a protocol: a constant, values at equally spaced knots on ``[0, T]``
(linearly interpolated; ``[K]`` for one channel or ``[K, k]``), or a function ``t [T] -> [T, k]``."""

PROTOCOL_FILE_FORMAT = "controlmd.protocol/1"

__all__ = [
    "ChebyshevSeries",
    "CubicSpline",
    "FeedbackMLP",
    "FourierSeries",
    "HeldControl",
    "MLPProtocol",
    "NoControl",
    "PiecewiseConstant",
    "Protocol",
    "Tabulated",
    "load_protocol",
    "make_protocol",
    "protocol_names",
    "register_protocol",
]


def _as_bounds(name: str, value: float | list[float] | Tensor | None, dim: int) -> Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.repeat(dim)
    if t.numel() != dim:
        raise ControlMDError(f"{name} has {t.numel()} entries, expected 1 or dim = {dim}")
    if not bool(torch.isfinite(t).all()):
        raise ControlMDError(f"{name} must be finite, got {t.tolist()}")
    return t


class Protocol(nn.Module):
    """Base class of control protocols.

    Subclasses implement :meth:`raw` (unbounded values); the base class squashes them into
    ``[low, high]`` with ``low + (high - low) * (1 + tanh(raw)) / 2`` when bounds are given.

    Args:
        dim: number of control channels ``k``.
        t_final: horizon ``T`` (> 0); protocols are defined on ``[0, T]``.
        low, high: physical bounds, scalars or ``[k]``; both or neither.
        start, end: fixed values ``u(0)``, ``u(T)`` (scalars or ``[k]``, strictly inside the
            bounds), enforced exactly; ``None`` leaves that end free.
        fluence_weight: weight ``w >= 0`` of :meth:`penalty` ``= w * integral |u|^2 dt``.
    """

    feedback: bool = False
    kind: str = ""
    min_dim: int = 1
    """Fewest channels a kind accepts (0 only for :class:`NoControl`)."""
    _spec: dict[str, Any]

    def __init__(
        self,
        *,
        dim: int,
        t_final: float,
        low: float | list[float] | Tensor | None = None,
        high: float | list[float] | Tensor | None = None,
        start: float | list[float] | Tensor | None = None,
        end: float | list[float] | Tensor | None = None,
        fluence_weight: float = 0.0,
    ) -> None:
        super().__init__()
        check_int("dim", dim, minimum=self.min_dim)
        check_positive("t_final", t_final)
        check_positive("fluence_weight", fluence_weight, allow_zero=True)
        self.dim = dim
        self.t_final = float(t_final)
        self.fluence_weight = float(fluence_weight)
        lo, hi = _as_bounds("low", low, dim), _as_bounds("high", high, dim)
        if (lo is None) != (hi is None):
            raise ControlMDError("give both low and high bounds, or neither")
        if lo is not None and hi is not None and bool((lo >= hi).any()):
            raise ControlMDError(
                f"bounds need low < high, got low = {lo.tolist()}, high = {hi.tolist()}"
            )
        self.register_buffer("low", lo)
        self.register_buffer("high", hi)
        u0, uT = _as_bounds("start", start, dim), _as_bounds("end", end, dim)
        for name, u in (("start", u0), ("end", uT)):
            if (
                u is not None
                and lo is not None
                and hi is not None
                and bool(((u <= lo) | (u >= hi)).any())
            ):
                raise ControlMDError(
                    f"{name} = {u.tolist()} must lie strictly inside the bounds "
                    f"[{lo.tolist()}, {hi.tolist()}] (tanh squashing never reaches them)"
                )
        self.register_buffer("start_value", u0)
        self.register_buffer("end_value", uT)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Record the outermost constructor's arguments so `save` can rebuild the protocol.
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        original = cls.__dict__["__init__"]
        signature = inspect.signature(original)

        @functools.wraps(original)
        def recording_init(self: Protocol, *args: Any, **kw: Any) -> None:
            original(self, *args, **kw)
            if type(self).__init__ is recording_init:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                spec: dict[str, Any] = {}
                for name, value in bound.arguments.items():
                    kind = signature.parameters[name].kind
                    if kind is inspect.Parameter.VAR_KEYWORD:
                        spec.update(value)
                    elif name != "self":
                        spec[name] = value
                self._spec = spec

        cls.__init__ = recording_init  # type: ignore[method-assign]

    @property
    def bounded(self) -> bool:
        return self.low is not None

    @abstractmethod
    def raw(self, t: Tensor) -> Tensor:
        """Unsquashed values: ``t`` ``[T]`` -> ``[T, k]``."""

    def squash(self, raw: Tensor) -> Tensor:
        if self.low is None:
            return raw
        lo, hi = self.low.to(raw), self.high.to(raw)
        return lo + (hi - lo) * 0.5 * (1.0 + torch.tanh(raw))

    def unsquash(self, u: Tensor) -> Tensor:
        """Inverse of :meth:`squash` (values strictly inside the bounds)."""
        if self.low is None:
            return u
        lo, hi = self.low.to(u), self.high.to(u)
        y = (2.0 * (u - lo) / (hi - lo) - 1.0).clamp(-1 + 1e-12, 1 - 1e-12)
        return torch.atanh(y)

    def _raw_with_ends(self, t: Tensor) -> Tensor:
        if self.start_value is None and self.end_value is None:
            return self.raw(t)
        ends = torch.tensor([0.0, self.t_final], dtype=t.dtype, device=t.device)
        r = self.raw(torch.cat([t, ends]))
        r, r0, rT = r[:-2], r[-2], r[-1]
        s = (t / self.t_final).unsqueeze(-1)
        if self.start_value is not None:
            r = r - (1.0 - s) * (r0 - self.unsquash(self.start_value.to(r)))
        if self.end_value is not None:
            r = r - s * (rT - self.unsquash(self.end_value.to(r)))
        return r

    def forward(self, t: Tensor | float, obs: Tensor | None = None) -> Tensor:
        """u(t): ``t`` 0-d -> ``[k]``; ``t`` ``[T]`` -> ``[T, k]``."""
        t = torch.as_tensor(t, dtype=self._dtype())
        scalar = t.ndim == 0
        u = self.squash(self._raw_with_ends(t.reshape(-1)))
        return u[0] if scalar else u

    def breakpoints(self) -> list[float]:
        """Times at which u(t) jumps (handed to adaptive solvers as ``jump_t``)."""
        return []

    def sample(self, n: int = 200) -> tuple[Tensor, Tensor]:
        """Table ``(t [n], u [n, k])`` on a uniform grid of ``[0, T]``, for plots and replay."""
        t = torch.linspace(0.0, self.t_final, n, dtype=self._dtype())
        with torch.no_grad():
            return t, self(t)

    def write_table(self, path: str | Path, n: int = 200) -> None:
        """Write :meth:`sample` as CSV with header ``t,u0,...,u{k-1}`` (atomically)."""
        from controlmd.checkpoint import atomic_write_text

        t, u = self.sample(n)
        rows = [",".join(["t"] + [f"u{j}" for j in range(self.dim)])]
        rows += [",".join(f"{x:.10g}" for x in [ti, *ui]) for ti, ui in zip(t.tolist(), u.tolist())]
        atomic_write_text(path, "\n".join(rows) + "\n")

    def fluence(self, n: int = 257) -> Tensor:
        """``integral_0^T |u(t)|^2 dt`` by the trapezoidal rule on ``n`` points (0-d)."""
        t = torch.linspace(0.0, self.t_final, n, dtype=self._dtype())
        return torch.trapezoid((self(t) ** 2).sum(-1), t)

    def penalty(self) -> Tensor:
        """``fluence_weight * fluence()`` (0-d; zero when the weight is 0)."""
        if self.fluence_weight == 0.0:
            return torch.zeros((), dtype=self._dtype())
        return self.fluence_weight * self.fluence()

    def fit_(self, init: InitSpec, *, n: int = 256) -> Protocol:
        """Set the parameters so that u(t) approximates ``init`` on ``[0, T]`` (in place).

        Linear-basis kinds solve a least-squares problem in unsquashed space exactly; the
        MLP kinds run a short deterministic optimization. Returns ``self``.
        """
        t = torch.linspace(0.0, self.t_final, n, dtype=self._dtype())
        target = self._target_values(init, t)
        self._check_inside_bounds(target)
        with torch.no_grad():
            self._fit_raw(t, self.unsquash(target))
        return self

    def _fit_raw(self, t: Tensor, raw_target: Tensor) -> None:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ControlMDError(
                f"protocol kind {self.kind or type(self).__name__!r} has no parameters to fit"
            )
        with torch.enable_grad():
            lbfgs = torch.optim.LBFGS(
                params,
                max_iter=500,
                tolerance_grad=1e-12,
                tolerance_change=1e-14,
                line_search_fn="strong_wolfe",
            )

            def closure() -> Tensor:
                lbfgs.zero_grad()
                loss = ((self.raw(t) - raw_target) ** 2).mean()
                loss.backward()
                return loss

            lbfgs.step(closure)

    def _check_inside_bounds(self, target: Tensor) -> None:
        """Raise unless the init values ``target`` ``[n, k]`` lie strictly inside the bounds
        (tanh squashing never reaches a bound, and a value at one would have no gradient)."""
        if self.low is None:
            return
        margin = 1e-6 * (self.high - self.low).to(target)
        inside = (target > self.low.to(target) + margin) & (target < self.high.to(target) - margin)
        if not bool(inside.all()):
            raise ControlMDError(
                f"init values span [{target.min().item():.6g}, {target.max().item():.6g}], "
                f"outside the bounds [{self.low.tolist()}, {self.high.tolist()}]"
            )

    def _target_values(self, init: InitSpec, t: Tensor) -> Tensor:
        if callable(init):
            u = torch.as_tensor(init(t), dtype=t.dtype)
            return u.reshape(t.shape[0], self.dim)
        v = torch.as_tensor(init, dtype=t.dtype)
        if v.ndim == 0:
            return v.expand(t.shape[0], self.dim).clone()
        if v.ndim == 1:
            v = v.unsqueeze(-1) if self.dim == 1 else v.unsqueeze(0)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ControlMDError(
                f"init must be a number, [K] values (one channel) or [K, {self.dim}], got shape {tuple(v.shape)}"
            )
        if v.shape[0] == 1:
            return v.expand(t.shape[0], self.dim).clone()
        knots = torch.linspace(0.0, self.t_final, v.shape[0], dtype=t.dtype)
        return _interp(t, knots, v)

    def save(self, path: str | Path) -> None:
        """Write kind, constructor arguments and parameters to ``path`` (atomic ``torch.save``)."""
        from controlmd.checkpoint import atomic_torch_save

        if not self.kind:
            raise ControlMDError(
                f"{type(self).__name__} is not a registered protocol kind and cannot be saved"
            )
        atomic_torch_save(
            {
                "format": PROTOCOL_FILE_FORMAT,
                "kind": self.kind,
                "params": dict(self._spec),
                "state_dict": self.state_dict(),
            },
            path,
        )

    def _dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        for b in self.buffers():
            return b.dtype
        return torch.float64


def _interp(t: Tensor, knots: Tensor, values: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``values [K, k]`` at ``knots [K]`` to ``t [T]``."""
    idx = torch.searchsorted(knots.contiguous(), t.contiguous(), right=True).clamp(
        1, knots.shape[0] - 1
    )
    t0, t1 = knots[idx - 1], knots[idx]
    w = ((t - t0) / (t1 - t0)).clamp(0.0, 1.0).unsqueeze(-1)
    return values[idx - 1] * (1.0 - w) + values[idx] * w


_PROTOCOLS: dict[str, type[Protocol]] = {}


def register_protocol(name: str) -> Callable[[type[Protocol]], type[Protocol]]:
    """Class decorator: make a protocol constructible by ``kind`` name from configs."""

    def decorate(cls: type[Protocol]) -> type[Protocol]:
        cls.kind = name
        _PROTOCOLS[name] = cls
        return cls

    return decorate


def protocol_names() -> list[str]:
    return sorted(_PROTOCOLS)


def protocol_class(kind: str) -> type[Protocol]:
    """The class registered as ``kind``; an unknown name lists the valid ones."""
    check_choice("protocol kind", kind, list(_PROTOCOLS))
    return _PROTOCOLS[kind]


def make_protocol(kind: str, *, init: InitSpec | None = None, **params: Any) -> Protocol:
    """Build a registered protocol and (optionally) fit it to ``init``.

    Args:
        kind: registry name, e.g. ``"mlp"``; see :func:`protocol_names`.
        init: initial u(t), see :data:`InitSpec` (``piecewise_constant`` also takes it as
            its own ``init`` argument).
        params: constructor arguments of that kind (``dim``, ``t_final``, ``low``, ...).

    Example:
        >>> p = make_protocol("chebyshev", dim=1, t_final=1.0, degree=3, init=[0.0, 5.0])
        >>> round(float(p(torch.tensor(0.5))[0]), 6)
        2.5
    """
    cls = protocol_class(kind)
    if init is not None and cls is PiecewiseConstant:
        params["init"] = init
        init = None
    protocol = cls(**params)
    if init is not None:
        protocol.fit_(init)
    return protocol


def load_protocol(path: str | Path) -> Protocol:
    """Rebuild a protocol written by :meth:`Protocol.save`."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != PROTOCOL_FILE_FORMAT:
        raise ControlMDError(
            f"{path} is not a controlmd protocol file (format {PROTOCOL_FILE_FORMAT})"
        )
    protocol = protocol_class(blob["kind"])(**blob["params"])
    protocol.load_state_dict(blob["state_dict"])
    return protocol


class _LinearBasisProtocol(Protocol):
    """``raw(t) = basis(t / T) @ coef`` with ``coef`` ``[n_basis, k]``; fitting is exact."""

    def __init__(self, *, n_basis: int, **base: Any) -> None:
        super().__init__(**base)
        self.coef = nn.Parameter(torch.zeros(n_basis, self.dim, dtype=torch.float64))

    @abstractmethod
    def basis(self, s: Tensor) -> Tensor:
        """Basis functions at reduced times ``s = t / T`` ``[T]`` -> ``[T, n_basis]``."""

    def raw(self, t: Tensor) -> Tensor:
        return self.basis(t / self.t_final).to(self.coef) @ self.coef

    def _fit_raw(self, t: Tensor, raw_target: Tensor) -> None:
        A = self.basis(t / self.t_final).to(raw_target)
        self.coef.copy_(torch.linalg.lstsq(A, raw_target).solution)


@register_protocol("chebyshev")
class ChebyshevSeries(_LinearBasisProtocol):
    """``raw(t) = sum_{j=0}^{degree} c_j T_j(2 t / T - 1)`` (Chebyshev polynomials).

    Args:
        degree: highest polynomial degree (>= 0).
        dim, t_final, low, high, start, end, fluence_weight: see :class:`Protocol`.
    """

    def __init__(self, *, dim: int = 1, t_final: float, degree: int = 6, **base: Any) -> None:
        check_int("degree", degree, minimum=0)
        self.degree = degree
        super().__init__(n_basis=degree + 1, dim=dim, t_final=t_final, **base)

    def basis(self, s: Tensor) -> Tensor:
        x = 2.0 * s - 1.0
        terms = [torch.ones_like(x), x]
        for _ in range(2, self.degree + 1):
            terms.append(2.0 * x * terms[-1] - terms[-2])
        return torch.stack(terms[: self.degree + 1], dim=-1)


@register_protocol("fourier")
class FourierSeries(_LinearBasisProtocol):
    """``raw(t) = a + b s + sum_{j=1}^{n} (c_j cos(2 pi j s) + d_j sin(2 pi j s))``, s = t/T.

    The linear term lets ``u(0)`` and ``u(T)`` differ (a pure Fourier series is periodic).

    Args:
        n_terms: number of harmonics ``n`` (>= 0).
        dim, t_final, low, high, start, end, fluence_weight: see :class:`Protocol`.
    """

    def __init__(self, *, dim: int = 1, t_final: float, n_terms: int = 6, **base: Any) -> None:
        check_int("n_terms", n_terms, minimum=0)
        self.n_terms = n_terms
        super().__init__(n_basis=2 + 2 * n_terms, dim=dim, t_final=t_final, **base)

    def basis(self, s: Tensor) -> Tensor:
        j = torch.arange(1, self.n_terms + 1, dtype=s.dtype, device=s.device)
        phase = 2.0 * math.pi * s.unsqueeze(-1) * j
        return torch.cat(
            [torch.ones_like(s)[:, None], s[:, None], torch.cos(phase), torch.sin(phase)], -1
        )


@register_protocol("spline")
class CubicSpline(_LinearBasisProtocol):
    """Natural cubic spline through ``n_knots`` equally spaced knots on ``[0, T]``.

    The knot values (in unsquashed space) are the parameters ``coef`` ``[K, k]``.

    Args:
        n_knots: ``K`` (>= 2; 2 knots give a straight line).
        dim, t_final, low, high, start, end, fluence_weight: see :class:`Protocol`.
    """

    def __init__(self, *, dim: int = 1, t_final: float, n_knots: int = 8, **base: Any) -> None:
        check_int("n_knots", n_knots, minimum=2)
        self.n_knots = n_knots
        super().__init__(n_basis=n_knots, dim=dim, t_final=t_final, **base)
        self.register_buffer("_moments", _natural_spline_moments(n_knots), persistent=False)

    def basis(self, s: Tensor) -> Tensor:
        K = self.n_knots
        h = 1.0 / (K - 1)
        j = torch.floor(s / h).long().clamp(0, K - 2)
        a = (j + 1).to(s) * h - s  # distance to the right knot
        b = s - j.to(s) * h  # distance to the left knot
        eye = torch.eye(K, dtype=s.dtype, device=s.device)
        M = self._moments.to(s)
        return (
            eye[j] * (a / h)[:, None]
            + eye[j + 1] * (b / h)[:, None]
            + M[j] * (a**3 / (6 * h) - h * a / 6)[:, None]
            + M[j + 1] * (b**3 / (6 * h) - h * b / 6)[:, None]
        )


def _natural_spline_moments(K: int) -> Tensor:
    """``[K, K]`` map from knot values to second derivatives of the natural cubic spline."""
    M = torch.zeros(K, K, dtype=torch.float64)
    if K <= 2:
        return M
    h = 1.0 / (K - 1)
    n = K - 2
    tri = 4.0 * torch.eye(n, dtype=torch.float64)
    tri += torch.diag(torch.ones(n - 1, dtype=torch.float64), 1) + torch.diag(
        torch.ones(n - 1, dtype=torch.float64), -1
    )
    second_diff = torch.zeros(n, K, dtype=torch.float64)
    for i in range(n):
        second_diff[i, i : i + 3] = torch.tensor([1.0, -2.0, 1.0], dtype=torch.float64)
    M[1:-1] = torch.linalg.solve(tri, second_diff) * 6.0 / h**2
    return M


def _time_features(s: Tensor, n_frequencies: int) -> Tensor:
    """``[s, cos(pi j s), sin(pi j s)]`` for ``j = 1..F``: ``[T]`` -> ``[T, 1 + 2F]``.

    Half-period frequencies (pi, not 2 pi) keep the features non-periodic on ``[0, 1]``.
    """
    j = torch.arange(1, n_frequencies + 1, dtype=s.dtype, device=s.device)
    phase = math.pi * s.unsqueeze(-1) * j
    return torch.cat([s.unsqueeze(-1), torch.cos(phase), torch.sin(phase)], dim=-1)


class _MLPWithSkip(nn.Module):
    """``net(x) + skip(x)``: an MLP plus a linear readout of its inputs (both start at zero).

    The linear path makes protocols that are linear in the features (e.g. a straight line
    in time) exactly representable, and fits to them exact.
    """

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int, activation: str) -> None:
        super().__init__()
        self.net = _mlp(n_in, hidden, n_out, activation)
        self.skip = nn.Linear(n_in, n_out, bias=False, dtype=torch.float64)
        nn.init.zeros_(self.skip.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + self.skip(x)

    def fit_readout(self, x: Tensor, target: Tensor) -> None:
        """Least-squares output and skip layers on the hidden features (start of an MLP fit)."""
        head = self.net[-1]
        x = x.to(head.weight)
        H = self.net[:-1](x)
        A = torch.cat([H, x, torch.ones_like(H[:, :1])], dim=1)
        solution = torch.linalg.lstsq(A, target.to(A), driver="gelsd").solution
        width = H.shape[1]
        head.weight.copy_(solution[:width].T)
        self.skip.weight.copy_(solution[width:-1].T)
        head.bias.copy_(solution[-1])


def _mlp(n_in: int, hidden: Sequence[int], n_out: int, activation: str) -> nn.Sequential:
    acts: dict[str, Callable[[], nn.Module]] = {
        "tanh": nn.Tanh,
        "silu": nn.SiLU,
        "relu": nn.ReLU,
        "gelu": nn.GELU,
    }
    check_choice("activation", activation, list(acts))
    layers: list[nn.Module] = []
    for width in hidden:
        check_int("hidden width", width)
        layers += [nn.Linear(n_in, width, dtype=torch.float64), acts[activation]()]
        n_in = width
    last = nn.Linear(n_in, n_out, dtype=torch.float64)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


@register_protocol("mlp")
class MLPProtocol(Protocol):
    """``raw(t) = MLP(f) + W f`` with time features ``f = [s, cos(pi j s), sin(pi j s)]_{j=1..F}``, s = t/T.

    The output layer and the linear readout ``W`` start at zero, i.e. u(t) at the middle
    of the bounds (use ``init`` in :func:`make_protocol` / the experiment file to start
    elsewhere; the fit solves the readouts by least squares, then refines all weights).

    Args:
        hidden: hidden layer widths.
        n_frequencies: number of Fourier time features ``F`` (>= 0).
        activation: ``tanh``, ``silu``, ``relu`` or ``gelu``.
        dim, t_final, low, high, start, end, fluence_weight: see :class:`Protocol`.
    """

    def __init__(
        self,
        *,
        dim: int = 1,
        t_final: float,
        hidden: Sequence[int] = (32, 32),
        n_frequencies: int = 4,
        activation: str = "tanh",
        **base: Any,
    ) -> None:
        super().__init__(dim=dim, t_final=t_final, **base)
        check_int("n_frequencies", n_frequencies, minimum=0)
        self.n_frequencies = n_frequencies
        self.net = _MLPWithSkip(1 + 2 * n_frequencies, list(hidden), dim, activation)

    def raw(self, t: Tensor) -> Tensor:
        return self.net(_time_features(t / self.t_final, self.n_frequencies))

    def _fit_raw(self, t: Tensor, raw_target: Tensor) -> None:
        self.net.fit_readout(_time_features(t / self.t_final, self.n_frequencies), raw_target)
        super()._fit_raw(t, raw_target)


@register_protocol("feedback_mlp")
class FeedbackMLP(Protocol):
    """Feedback control ``u(t, obs)``: an MLP (plus a linear readout) of time features and observations.

    ``forward(t, obs)`` with ``t`` 0-d and ``obs`` ``[B, obs_dim]`` returns ``[B, k]``;
    without ``obs`` (plots, tables) the observation is taken as zero.

    Args:
        obs_dim: number of observed features (``task.observe(state).shape[1]``).
        obs_scale: observations are divided by it before entering the network.
        hidden, n_frequencies, activation: as in :class:`MLPProtocol`.
        dim, t_final, low, high, fluence_weight: see :class:`Protocol`.
    """

    feedback = True

    def __init__(
        self,
        *,
        dim: int = 1,
        t_final: float,
        obs_dim: int,
        obs_scale: float = 1.0,
        hidden: Sequence[int] = (32, 32),
        n_frequencies: int = 4,
        activation: str = "tanh",
        **base: Any,
    ) -> None:
        if base.get("start") is not None or base.get("end") is not None:
            raise ControlMDError("feedback_mlp does not support fixed start/end values")
        super().__init__(dim=dim, t_final=t_final, **base)
        check_int("obs_dim", obs_dim)
        check_positive("obs_scale", obs_scale)
        check_int("n_frequencies", n_frequencies, minimum=0)
        self.obs_dim = obs_dim
        self.obs_scale = float(obs_scale)
        self.n_frequencies = n_frequencies
        self.net = _MLPWithSkip(1 + 2 * n_frequencies + obs_dim, list(hidden), dim, activation)

    def raw_feedback(self, t: Tensor, obs: Tensor) -> Tensor:
        """Unsquashed values for times ``t [T]`` and observations ``obs [T, obs_dim]``."""
        features = _time_features(t / self.t_final, self.n_frequencies)
        return self.net(torch.cat([features, obs.to(features) / self.obs_scale], dim=-1))

    def raw(self, t: Tensor) -> Tensor:
        return self.raw_feedback(
            t, torch.zeros(t.shape[0], self.obs_dim, dtype=t.dtype, device=t.device)
        )

    def forward(self, t: Tensor | float, obs: Tensor | None = None) -> Tensor:
        if obs is None:
            return super().forward(t)
        t = torch.as_tensor(t, dtype=self._dtype())
        if t.ndim != 0 or obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise ControlMDError(
                f"feedback protocol needs a scalar t and obs [B, {self.obs_dim}], got t {tuple(t.shape)}, "
                f"obs {tuple(obs.shape)}"
            )
        return self.squash(self.raw_feedback(t.expand(obs.shape[0]), obs))

    def _fit_raw(self, t: Tensor, raw_target: Tensor) -> None:
        # Fit the open-loop part (obs = 0); the weights on obs keep their random init.
        inputs = torch.cat(
            [
                _time_features(t / self.t_final, self.n_frequencies),
                torch.zeros(t.shape[0], self.obs_dim, dtype=t.dtype),
            ],
            dim=-1,
        )
        self.net.fit_readout(inputs, raw_target)
        super()._fit_raw(t, raw_target)


@register_protocol("piecewise_constant")
class PiecewiseConstant(Protocol):
    """u(t) constant on each of ``K`` equal pieces of ``[0, T]``.

    A ``K``-piece protocol controls exactly what a ``K``-step episode of the gymnasium env
    controls. Piece ``j`` covers ``[j T/K, (j+1) T/K)``; ``t = T`` belongs to the last piece.

    Args:
        n_pieces: ``K``.
        init: initial values, scalar, ``[k]`` or ``[K, k]`` (inside the bounds); also any
            :data:`InitSpec`, then each piece takes the value at its midpoint.
        dim, t_final, low, high, fluence_weight: see :class:`Protocol`.
    """

    def __init__(
        self,
        *,
        dim: int = 1,
        t_final: float,
        n_pieces: int,
        low: float | list[float] | Tensor | None = None,
        high: float | list[float] | Tensor | None = None,
        init: InitSpec | None = None,
        fluence_weight: float = 0.0,
    ) -> None:
        super().__init__(
            dim=dim, t_final=t_final, low=low, high=high, fluence_weight=fluence_weight
        )
        check_int("n_pieces", n_pieces)
        self.n_pieces = n_pieces
        values = torch.zeros(n_pieces, dim, dtype=torch.float64)
        if init is not None:
            target = self._piece_values(init)
            self._check_inside_bounds(target)
            values = self.unsquash(target)
        elif self.low is not None:
            values = self.unsquash(0.5 * (self.low + self.high).expand(n_pieces, dim))
        self.values = nn.Parameter(values)

    def _piece_values(self, init: InitSpec) -> Tensor:
        if not callable(init):
            v = torch.as_tensor(init, dtype=torch.float64)
            if v.numel() == self.n_pieces * self.dim:
                return v.reshape(self.n_pieces, self.dim).clone()
            if v.numel() in (1, self.dim):
                return v.reshape(1, -1).expand(self.n_pieces, self.dim).clone()
        mid = (
            (torch.arange(self.n_pieces, dtype=torch.float64) + 0.5) * self.t_final / self.n_pieces
        )
        return self._target_values(init, mid)

    def piece_index(self, t: Tensor) -> Tensor:
        idx = torch.floor(t / self.t_final * self.n_pieces).long()
        return idx.clamp(0, self.n_pieces - 1)

    def raw(self, t: Tensor) -> Tensor:
        return self.values[self.piece_index(t)]

    def breakpoints(self) -> list[float]:
        return [self.t_final * j / self.n_pieces for j in range(1, self.n_pieces)]

    def _fit_raw(self, t: Tensor, raw_target: Tensor) -> None:
        idx = self.piece_index(t)
        sums = torch.zeros_like(self.values).index_add_(0, idx, raw_target.to(self.values))
        counts = torch.bincount(idx, minlength=self.n_pieces).clamp(min=1).to(self.values)
        self.values.copy_(sums / counts[:, None])


@register_protocol("table")
class Tabulated(Protocol):
    """Replay of a sampled table ``(times [n], values [n, k])`` (e.g. :meth:`Protocol.sample`).

    Values between rows are interpolated linearly (``interpolation="linear"``) or held from
    the last row (``"hold"``, which reports the row times as breakpoints). The values are
    parameters, so a table can also be trained.

    Args:
        times: increasing times ``[n]`` covering ``[0, t_final]``.
        values: ``[n, k]`` (or ``[n]`` for one channel), inside the bounds if given.
        interpolation: ``linear`` or ``hold``.
        t_final: horizon (default: the last time).
        low, high, fluence_weight: see :class:`Protocol`.
    """

    def __init__(
        self,
        *,
        times: Sequence[float] | Tensor,
        values: Sequence[float] | Sequence[Sequence[float]] | Tensor,
        interpolation: str = "linear",
        t_final: float | None = None,
        low: float | list[float] | Tensor | None = None,
        high: float | list[float] | Tensor | None = None,
        fluence_weight: float = 0.0,
    ) -> None:
        check_choice("interpolation", interpolation, ["linear", "hold"])
        ts = torch.as_tensor(times, dtype=torch.float64).flatten()
        vs = torch.as_tensor(values, dtype=torch.float64)
        vs = vs.unsqueeze(-1) if vs.ndim == 1 else vs
        if ts.numel() < 1 or vs.ndim != 2 or vs.shape[0] != ts.numel():
            raise ControlMDError(
                f"table needs times [n] and values [n, k], got {tuple(ts.shape)} and {tuple(vs.shape)}"
            )
        if ts.numel() > 1 and not bool((ts[1:] > ts[:-1]).all()):
            raise ControlMDError("table times must be strictly increasing")
        super().__init__(
            dim=vs.shape[1],
            t_final=float(ts[-1]) if t_final is None else t_final,
            low=low,
            high=high,
            fluence_weight=fluence_weight,
        )
        self.interpolation = interpolation
        self.register_buffer("times", ts)
        self.values = nn.Parameter(self.unsquash(vs))

    def raw(self, t: Tensor) -> Tensor:
        if self.times.numel() == 1:
            return self.values.expand(t.shape[0], self.dim)
        if self.interpolation == "linear":
            return _interp(t, self.times.to(t), self.values)
        idx = (
            torch.searchsorted(self.times.to(t).contiguous(), t.contiguous(), right=True) - 1
        ).clamp(0, self.times.numel() - 1)
        return self.values[idx]

    def breakpoints(self) -> list[float]:
        return self.times[1:].tolist() if self.interpolation == "hold" else []

    def _fit_raw(self, t: Tensor, raw_target: Tensor) -> None:
        self.values.copy_(_interp(self.times.to(t), t, raw_target))

    @classmethod
    def from_csv(cls, path: str | Path, **kwargs: Any) -> Tabulated:
        """Read a table written by :meth:`Protocol.write_table`."""
        lines = Path(path).read_text().strip().splitlines()
        rows = torch.tensor(
            [[float(x) for x in line.split(",")] for line in lines[1:]], dtype=torch.float64
        )
        return cls(times=rows[:, 0], values=rows[:, 1:], **kwargs)


@register_protocol("none")
class NoControl(Protocol):
    """The empty protocol (``u(t)`` has no components, no parameters) of a task without
    control channels, such as a learning task whose trainable object is its own
    Hamiltonian (the optional ``Task.parameters()`` hook the trainer optimizes).

    Args:
        t_final: horizon.
        dim: number of channels; must be 0 (the config fills in the task's).
    """

    min_dim = 0

    def __init__(self, *, t_final: float, dim: int = 0) -> None:
        if dim != 0:
            raise ControlMDError(
                f"protocol kind 'none' has no control channels, but dim = {dim}; this task has "
                "control channels: choose another kind"
            )
        super().__init__(dim=0, t_final=t_final)

    def raw(self, t: Tensor) -> Tensor:
        return t.new_zeros(t.shape[0], 0)


class HeldControl(Protocol):
    """A control value set from outside and held until changed (the gymnasium env's action).

    ``set(u)`` with ``u`` of shape ``[k]`` (same for all replicas) or ``[B, k]`` (one value
    per replica); ``forward`` returns it whatever ``t`` is.
    """

    def __init__(self, *, dim: int, t_final: float, value: Tensor | None = None) -> None:
        super().__init__(dim=dim, t_final=t_final)
        self.register_buffer(
            "value", torch.zeros(dim, dtype=torch.float64) if value is None else value
        )

    def set(self, u: Tensor) -> None:
        if u.shape[-1] != self.dim:
            raise ControlMDError(
                f"control value has last dimension {u.shape[-1]}, expected {self.dim}"
            )
        self.value = u.detach().to(torch.float64)

    def raw(self, t: Tensor) -> Tensor:
        raise NotImplementedError  # forward is overridden

    def forward(self, t: Tensor | float, obs: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t)
        if t.ndim == 0:
            return self.value
        return self.value.expand(t.shape[0], *self.value.shape)
