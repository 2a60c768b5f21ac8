"""Per-dtype tolerances shared by the test suite (one helper; ../shared/STYLE.md, "Tests":
keep tolerances per dtype in one helper).


``tol(dtype)`` gives the tolerances for comparing two computations of the same quantity
that differ only by rounding (summation order, minimum-image shifts, ...); ``fd_tol``
gives those for autograd vs central finite differences (float64 only: float32 central
differences are dominated by rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float

    def kwargs(self, scale: float = 1.0) -> dict[str, float]:
        """For ``torch.testing.assert_close``; ``scale`` multiplies both tolerances."""
        return {"rtol": self.rtol * scale, "atol": self.atol * scale}


_TOL = {
    torch.float32: Tol(rtol=2e-5, atol=2e-5),
    torch.float64: Tol(rtol=1e-11, atol=1e-11),
}


def tol(dtype: torch.dtype) -> Tol:
    """Rounding-level tolerances for ``dtype``."""
    return _TOL[dtype]


def fd_tol() -> Tol:
    """Autograd vs central finite differences with step ~1e-6 in float64."""
    return Tol(rtol=1e-6, atol=1e-7)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor | float | list, *, scale: float = 1.0
) -> None:
    """``torch.testing.assert_close`` with the tolerances of ``actual``'s dtype.

    Give ``expected`` as Python numbers or a tensor of at least ``actual``'s precision
    (a float32 tensor compared with a float64 result would be rejected as imprecise).
    """
    if isinstance(expected, torch.Tensor):
        if torch.finfo(expected.dtype).eps > torch.finfo(actual.dtype).eps:
            raise TypeError(
                f"expected has dtype {expected.dtype}, less precise than {actual.dtype}"
            )
        expected = expected.to(actual)
    else:
        expected = torch.as_tensor(expected, dtype=actual.dtype).expand_as(actual)
    torch.testing.assert_close(actual, expected, **tol(actual.dtype).kwargs(scale))
