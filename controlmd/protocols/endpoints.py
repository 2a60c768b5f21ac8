"""Fixed boundary values with jumps: ``u = u_i`` before ``t = 0``, ``u_f`` after ``t_final``.

Optimal finite-time protocols jump at both ends (Schmiedl & Seifert, PRL 98, 108301
(2007)): the control is fixed to ``initial`` before the run and to ``final`` after it,
and free in between. :class:`Endpoints` wraps any protocol (or any module ``t -> [k]``)
that way. The integrators count both jumps as work (``track_work=True``):

* the opening jump ``u_i -> u(0^+)`` by the first step, like any jump at a step's start;
* the closing jump ``u(t_final^-) -> u_f`` by the step that *ends* at ``t_final``, at the
  final configuration: :meth:`Endpoints.closing_jumps` declares it (see
  :func:`~controlmd.dynamics.base.closing_jumps`), so a run of exactly ``t_final`` counts
  it and a run that goes on past ``t_final`` does not count it twice.

Units: those of the wrapped protocol (time in the task's unit, values in the channel's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from controlmd.errors import ControlMDError
from controlmd.protocols.base import (
    Protocol,
    Tensor,
    _as_bounds,
    _as_dtype,
    make_protocol,
    register_protocol,
)

__all__ = ["Endpoints"]


@register_protocol("endpoints")
class Endpoints(Protocol):
    """``u(t) = initial`` for ``t < 0``, ``inner(t)`` on ``[0, t_final]``, ``final`` for
    ``t > t_final``.

    Args:
        inner: the free part: a :class:`Protocol`, any module mapping ``t`` (0-d or ``[T]``)
            to ``[k]`` / ``[T, k]``, or a dict ``{"kind": ..., **params}`` built with
            :func:`~controlmd.protocols.make_protocol` (how an experiment file gives it:
            ``[protocol] kind = "endpoints"``, ``inner = {kind = "chebyshev", degree = 3}``;
            ``dim``, ``t_final``, ``low``, ``high`` given here are passed on to it).
        initial: value before ``t = 0``, scalar or ``[k]``.
        final: value after ``t_final``, scalar or ``[k]``.
        dim: channels ``k`` (default: the inner protocol's).
        t_final: horizon (default: the inner protocol's).
        low, high: bounds handed to a dict ``inner`` (default: none).

    Example:
        >>> from controlmd.protocols import make_protocol
        >>> free = make_protocol("chebyshev", dim=1, t_final=1.0, degree=1, init=[1.0, 4.0])
        >>> u = Endpoints(free, initial=0.0, final=5.0)
        >>> t = torch.tensor([-1e-9, 0.0, 1.0, 1.0 + 1e-9], dtype=torch.float64)
        >>> [round(v, 6) for v in u(t)[:, 0].tolist()]
        [0.0, 1.0, 4.0, 5.0]
        >>> u.breakpoints(), u.closing_jumps()
        ([0.0, 1.0], [1.0])
    """

    pure_in_time = True  # memoized only where the inner module is too
    inner: nn.Module
    initial_value: Tensor
    final_value: Tensor

    def __init__(
        self,
        inner: Protocol | nn.Module | dict[str, Any],
        *,
        initial: float | list[float] | Tensor,
        final: float | list[float] | Tensor,
        dim: int | None = None,
        t_final: float | None = None,
        low: float | list[float] | Tensor | None = None,
        high: float | list[float] | Tensor | None = None,
    ) -> None:
        if isinstance(inner, dict):
            spec = dict(inner)
            if "kind" not in spec:
                raise ControlMDError(f"endpoints: inner needs a 'kind', got keys {sorted(spec)}")
            for key, value in (("dim", dim), ("t_final", t_final), ("low", low), ("high", high)):
                if value is not None:
                    spec.setdefault(key, value)
            inner = make_protocol(spec.pop("kind"), **spec)
        if not isinstance(inner, nn.Module):
            raise ControlMDError(
                f"endpoints: inner must be a Protocol, a module t -> u or a dict with 'kind', "
                f"got {type(inner).__name__}"
            )
        dim = int(getattr(inner, "dim", 0) or 0) if dim is None else dim
        t_final = getattr(inner, "t_final", None) if t_final is None else t_final
        if not dim or t_final is None:
            raise ControlMDError(
                "endpoints: give dim and t_final (the inner module has no dim / t_final)"
            )
        inner_low, inner_high = getattr(inner, "low", None), getattr(inner, "high", None)
        super().__init__(
            dim=dim,
            t_final=float(t_final),
            low=inner_low if low is None else low,
            high=inner_high if high is None else high,
        )
        self.inner = inner
        self.feedback = bool(getattr(inner, "feedback", False))
        u_i, u_f = _as_bounds("initial", initial, dim), _as_bounds("final", final, dim)
        assert u_i is not None and u_f is not None
        self.register_buffer("initial_value", u_i)
        self.register_buffer("final_value", u_f)

    def raw(self, t: Tensor) -> Tensor:
        raise NotImplementedError  # forward is overridden: the inner protocol squashes

    def forward(self, t: Tensor | float, obs: Tensor | None = None) -> Tensor:
        """u(t): ``t`` 0-d -> ``[k]`` (``[B, k]`` with ``obs``); ``t`` ``[T]`` -> ``[T, k]``."""
        t = _as_dtype(t, torch.float64)
        if t.ndim == 0:
            tv = float(t)
            if tv < 0.0 or tv > self.t_final:
                value = self.initial_value if tv < 0.0 else self.final_value
                return value if obs is None else value.expand(obs.shape[0], self.dim)
            return self.inner(t) if obs is None else self.inner(t, obs=obs)
        u = self.inner(t) if obs is None else self.inner(t, obs=obs)
        u = torch.where((t < 0.0).unsqueeze(-1), self.initial_value.to(u), u)
        return torch.where((t > self.t_final).unsqueeze(-1), self.final_value.to(u), u)

    def breakpoints(self) -> list[float]:
        """The inner protocol's jumps and the two boundary jumps, ``0`` and ``t_final``."""
        inner_bp = getattr(self.inner, "breakpoints", None)
        inner = [float(x) for x in inner_bp()] if callable(inner_bp) else []
        return sorted({0.0, self.t_final, *inner})

    def closing_jumps(self) -> list[float]:
        """``[t_final]``: the jump to ``final`` belongs to the step that ends there."""
        return [self.t_final]

    def fit_(self, init: Any, *, n: int = 256) -> Protocol:
        """Fit the inner protocol to ``init`` on ``[0, t_final]`` (in place); returns ``self``."""
        fit = getattr(self.inner, "fit_", None)
        if not callable(fit):
            raise ControlMDError(
                f"endpoints: the inner {type(self.inner).__name__} cannot be fitted"
            )
        fit(init, n=n)
        return self

    def penalty(self) -> Tensor:
        """The inner protocol's penalty (the boundary values are fixed, not penalized)."""
        inner_penalty = getattr(self.inner, "penalty", None)
        return inner_penalty() if callable(inner_penalty) else super().penalty()

    def save(self, path: Any) -> None:
        """As :meth:`Protocol.save`, with a registered inner protocol stored as its spec."""
        inner = self.inner
        if isinstance(inner, Protocol) and inner.kind:
            self._spec = {**self._spec, "inner": {"kind": inner.kind, **inner._spec}}
        super().save(path)
