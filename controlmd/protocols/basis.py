"""Linear-basis protocols: Chebyshev and Fourier series, natural cubic splines."""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from controlmd._validation import check_int
from controlmd.protocols.base import Protocol, Tensor, register_protocol


class _LinearBasisProtocol(Protocol):
    """``raw(t) = basis(t / T) @ coef`` with ``coef`` ``[n_basis, k]``; fitting is exact."""

    pure_in_time = True

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
        # gelsd: the default gelsy of this MKL gave 1-ulp different solutions for the same
        # input in ~1 % of in-process calls, at any thread count and MKL_CBWR mode.
        self.coef.copy_(torch.linalg.lstsq(A, raw_target, driver="gelsd").solution)


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

    _moments: Tensor  # buffer [K, K]: knot values -> spline second derivatives

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
