"""The :class:`Protocol` base class, the kind registry, saving and loading."""

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
from controlmd.checkpoint import load_torch_file
from controlmd.errors import ControlMDError

Tensor = torch.Tensor
InitSpec = float | Sequence[float] | Sequence[Sequence[float]] | Tensor | Callable[[Tensor], Tensor]
"""How to initialize a protocol: a constant, values at equally spaced knots on ``[0, T]``
(linearly interpolated; ``[K]`` for one channel or ``[K, k]``), or a function ``t [T] -> [T, k]``."""

PROTOCOL_FILE_FORMAT = "controlmd.protocol/1"


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
        release_fraction: ``f`` in ``[0, 0.5)``: on the last fraction ``f`` of the horizon
            every channel equals ``release_value`` (see :meth:`release_weight`); 0 disables.
        release_value: the no-control value of each channel (scalar or ``[k]``; the config
            fills in the task's ``default_control()``); required when ``f > 0`` and ``k > 0``.
        field_cost_weight: weight ``>= 0`` of the task's field-cost penalty
            ``w * integral mean_i |F_i|^2 dt`` (tasks with spatial fields add it to their loss).
    """

    feedback: bool = False
    kind: str = ""
    min_dim: int = 1
    init_in_constructor: bool = False
    """Whether the kind's constructor takes ``init`` itself (:func:`make_protocol` passes it)."""
    """Fewest channels a kind accepts (0 only for :class:`NoControl`)."""
    pure_in_time: bool = False
    """Whether ``forward(t)`` is a deterministic function of ``t``, of the module's tensors and
    of its plain attributes only, so that a read without a graph may be memoized
    (:mod:`controlmd.potentials.control_memo`). The kinds shipped here say so; a subclass
    that keeps other state (or draws random numbers) must leave it ``False``."""
    _spec: dict[str, Any]
    # Buffers (registered in __init__; None when not given), annotated because
    # nn.Module.__getattr__ is typed ``Tensor | Module``.
    low: Tensor | None
    high: Tensor | None
    start_value: Tensor | None
    end_value: Tensor | None
    release_value: Tensor | None

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
        release_fraction: float = 0.0,
        release_value: float | list[float] | Tensor | None = None,
        field_cost_weight: float = 0.0,
    ) -> None:
        super().__init__()
        check_int("dim", dim, minimum=self.min_dim)
        check_positive("t_final", t_final)
        check_positive("fluence_weight", fluence_weight, allow_zero=True)
        check_positive("field_cost_weight", field_cost_weight, allow_zero=True)
        if not 0.0 <= release_fraction < 0.5:
            raise ControlMDError(f"release_fraction must be in [0, 0.5), got {release_fraction!r}")
        self.dim = dim
        self.t_final = float(t_final)
        self.fluence_weight = float(fluence_weight)
        self.field_cost_weight = float(field_cost_weight)
        self.release_fraction = float(release_fraction)
        released = _as_bounds("release_value", release_value, dim)
        if release_fraction > 0 and dim > 0 and released is None:
            raise ControlMDError(
                f"release_fraction = {release_fraction} needs release_value, the no-control "
                "value of each channel"
            )
        self.register_buffer("release_value", released)
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
        if self.low is None or self.high is None:
            return raw
        lo, hi = self.low.to(raw), self.high.to(raw)
        return lo + (hi - lo) * 0.5 * (1.0 + torch.tanh(raw))

    def unsquash(self, u: Tensor) -> Tensor:
        """Inverse of :meth:`squash` (values strictly inside the bounds)."""
        if self.low is None or self.high is None:
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
        """u(t): ``t`` 0-d -> ``[k]``; ``t`` ``[T]`` -> ``[T, k]``.

        A non-finite ``t`` is refused where checking costs no device synchronization (a
        Python number or a CPU tensor); on an accelerator the simulation's own finiteness
        check (every ``check_every`` steps) catches its consequences."""
        t = _as_dtype(t, self._dtype())
        scalar = t.ndim == 0
        if t.device.type == "cpu" and not (
            math.isfinite(t.item()) if scalar else bool(torch.isfinite(t).all())
        ):
            raise ControlMDError(f"protocol time t must be finite, got {t.tolist()!r}")
        u = self.squash(self._raw_with_ends(t.reshape(-1)))
        if self.release_fraction > 0 and self.release_value is not None:
            w = self.release_weight(t.reshape(-1)).unsqueeze(-1)
            u0 = self.release_value.to(u)
            u = torch.where(w >= 1.0, u0, (1.0 - w) * u + w * u0)
        return u[0] if scalar else u

    def release_weight(self, t: Tensor) -> Tensor:
        """Weight ``w(t)`` of the no-control value, same shape as ``t``: 0 before
        ``T (1 - f) - 0.02 T``, ``(1 - cos(pi x)) / 2`` across the 0.02 T switch, exactly 1
        from ``T (1 - f)`` on (all 0 when ``f = 0``)."""
        if self.release_fraction == 0.0:
            return torch.zeros_like(t)
        end = self.t_final * (1.0 - self.release_fraction)
        begin = end - 0.02 * self.t_final
        x = ((t - begin) / (end - begin)).clamp(0.0, 1.0)
        w = 0.5 * (1.0 - torch.cos(math.pi * x))
        return torch.where(t >= end, torch.ones_like(w), w)

    def release_envelope(self, t: Tensor) -> Tensor:
        """``1 - release_weight(t)``: multiplies fields whose no-control value is zero."""
        return 1.0 - self.release_weight(t)

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
        if self.low is None or self.high is None:
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
        for p in self._parameters.values():  # parameters()' first, without its generator
            if p is not None:
                return p.dtype
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
    below = idx - 1
    t0, t1 = knots[below], knots[idx]
    w = ((t - t0) / (t1 - t0)).clamp(0.0, 1.0).unsqueeze(-1)
    return values[below] * (1.0 - w) + values[idx] * w


def _as_dtype(t: Tensor | float, dtype: torch.dtype) -> Tensor:
    """``torch.as_tensor(t, dtype=dtype)``, without dispatching it for a tensor that is
    already of ``dtype`` (as_tensor returns that tensor itself)."""
    if isinstance(t, Tensor) and t.dtype == dtype:
        return t
    return torch.as_tensor(t, dtype=dtype)


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
        >>> round(float(p(torch.tensor(0.5))[0].detach()), 6)
        2.5
    """
    cls = protocol_class(kind)
    if init is not None and cls.init_in_constructor:
        params["init"] = init
        init = None
    protocol = cls(**params)
    if init is not None:
        protocol.fit_(init)
    return protocol


def load_protocol(path: str | Path) -> Protocol:
    """Rebuild a protocol written by :meth:`Protocol.save`; ``path`` is the file or a run
    folder (its ``protocol.pt``)."""
    if Path(path).is_dir():
        path = Path(path) / "protocol.pt"
    blob = load_torch_file(path, "protocol file")
    if not isinstance(blob, dict) or blob.get("format") != PROTOCOL_FILE_FORMAT:
        raise ControlMDError(
            f"{path} is not a controlmd protocol file (format {PROTOCOL_FILE_FORMAT})"
        )
    protocol = protocol_class(blob["kind"])(**blob["params"])
    protocol.load_state_dict(blob["state_dict"])
    return protocol
