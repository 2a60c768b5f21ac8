"""Fused analytic Lennard-Jones energy and forces: one pass over the pair list.

Units: reduced Lennard-Jones units (lengths in sigma, energies in epsilon).

:func:`lj_energy_and_forces` computes ``E [B]`` and ``F = -dE/dR [B, N, d]`` of a
:class:`~controlmd.potentials.pair.LennardJones` (or :class:`~controlmd.potentials.pair.WCA`)
term from closed forms (``LennardJones.energy_and_forces`` calls it), sharing the pair geometry between energy and force, instead of
building an autograd graph of the energy and differentiating it.

Layout: the pair list (a neighbor list's flat half list, or all pairs ``i < j``) is held
as flat indices into the *component-major* positions ``R^T [d, B N]``, so every per-pair
quantity is a contiguous ``[M]`` or ``[d, M]`` array: two gathers (``take``), about fifteen
elementwise operations and two ``index_add`` scatters per call, with no reduction or
broadcast over a trailing dimension of size ``d`` (which is slow on CPU).

Gradients through a trajectory (``create_graph``) go through :class:`LJEnergyForces`, a
``torch.autograd.Function`` whose backward is analytic as well: given cotangents ``gE
[B]`` and ``gF [B, N, d]`` it returns the Hessian-vector product for ``R`` and the
derivatives for ``sigma`` and ``epsilon`` in one more pass over the pairs. It is
differentiable once (enough for ``d loss / d theta`` through any number of steps); a
second derivative (e.g. a Hessian of the loss) raises: use the autograd path of the base
class (``Potential.energy_and_forces``) for that.

Per pair (``dR = R_i - R_j`` under the minimum image, ``r2 = |dR|^2``, ``x = sigma^2/r2``,
``s6 = x^3``)::

    u  = 4 eps (s6^2 - s6) - u_c [- (r - r_c) u'(r_c)  for shift="force"]
    g  = -u'(r)/r = 24 eps (2 s6^2 - s6)/r2 [+ u'(r_c)/r]      F_i += g dR,  F_j -= g dR
    g' = dg/dr2   = -24 eps (14 s6^2 - 4 s6)/r2^2 [- u'(r_c)/(2 r^3)]

and with ``w = gF_i - gF_j`` the backward is ``dL/d dR = g w + (2 g' (w . dR) - gE g) dR``.
``u``, ``g`` and ``g'`` are linear in epsilon; ``sigma d/dsigma`` multiplies the ``s6^2``
terms by 12 and the ``s6`` terms by 6 (r_c fixed; for WCA, where r_c = 2^(1/6) sigma,
u'(r_c) = 0, so the motion of the cutoff contributes nothing).

Not covered (``LennardJones.energy_and_forces`` then uses autograd): per-pair parameters (fixed
``pairs`` with ``[P]`` sigma/epsilon/r_cut) and subclasses that change ``pair_energy``
or ``cutoff``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from controlmd.errors import ControlMDError
from controlmd.potentials.pair import WCA, LennardJones

Tensor = torch.Tensor
DisplacementFn = Callable[[Tensor, Tensor], Tensor]
Scalar = Tensor | float

__all__ = [
    "LJEnergyForces",
    "PairIndex",
    "fused_supported",
    "lj_energy_and_forces",
    "lj_force_vjp",
    "lj_kernel",
]

_INF = float("inf")


@dataclass(frozen=True)
class PairIndex:
    """A pair list laid out for gathers and segment sums over component-major positions.

    Pairs are sorted by ``i`` (flat particle index into ``R.reshape(B * N, d)``).

    Attributes:
        i3, j3: ``[d M]``: entry ``c M + p`` is ``c B N + i_p`` (resp. ``j_p``), the
            component ``c`` of the two particles of pair ``p`` in ``R^T [d, B N]``.
        len_i: ``[d, B N]`` number of pairs whose ``i`` is each particle (segment lengths).
        perm_j: ``[M]`` order of the pairs by ``j``; ``len_j`` ``[d, B N]`` its lengths.
        replica: per-replica segment lengths ``[B]`` (``None`` when ``B == 1``).
        n_replicas: ``B``.
    """

    i3: Tensor
    j3: Tensor
    len_i: Tensor
    perm_j: Tensor
    len_j: Tensor
    replica: Tensor | None
    n_replicas: int

    @staticmethod
    def from_flat(i: Tensor, j: Tensor, B: int, N: int, d: int) -> PairIndex:
        """From flat pair indices ``i, j [M]`` into ``R.reshape(B * N, d)`` (same replica)."""
        BN = B * N
        if i.numel() > 1 and not bool((i[1:] >= i[:-1]).all()):
            order = torch.argsort(i, stable=True)
            i, j = i[order], j[order]
        offsets = torch.arange(d, device=i.device).unsqueeze(1) * BN
        i3 = (i.unsqueeze(0) + offsets).reshape(-1)
        j3 = (j.unsqueeze(0) + offsets).reshape(-1)
        len_i = torch.bincount(i, minlength=BN).unsqueeze(0).expand(d, BN).contiguous()
        perm_j = torch.argsort(j, stable=True)
        len_j = torch.bincount(j, minlength=BN).unsqueeze(0).expand(d, BN).contiguous()
        replica = None if B == 1 else torch.bincount(i // N, minlength=B)
        return PairIndex(i3, j3, len_i, perm_j, len_j, replica, B)


# --------------------------------------------------------------------------- pair scalars


def _cutoff_constants(sigma: Scalar, eps: Scalar, rc: float, shift: str) -> tuple[Scalar, ...]:
    """``u(r_c)``, ``u'(r_c)`` and their ``sigma d/dsigma`` (zero when unused)."""
    if rc == _INF or shift == "none":
        return 0.0, 0.0, 0.0, 0.0
    s6c = (sigma * sigma / (rc * rc)) ** 3
    u_c = 4.0 * eps * (s6c * s6c - s6c)
    su_c = 4.0 * eps * (12.0 * s6c * s6c - 6.0 * s6c)
    if shift == "energy":
        return u_c, 0.0, su_c, 0.0
    du_c = -24.0 * eps * (2.0 * s6c * s6c - s6c) / rc
    sdu_c = -24.0 * eps * (24.0 * s6c * s6c - 6.0 * s6c) / rc
    return u_c, du_c, su_c, sdu_c


def _inside(r2: Tensor, rc: float) -> Tensor | None:
    """1.0 for pairs inside the cutoff, 0.0 outside (``None`` without cutoff).

    ``sign(clamp(rc^2 - r2, min=0))``: two fast elementwise ops (bool masks and
    ``where`` take slow paths on CPU)."""
    if rc == _INF:
        return None
    return torch.clamp(rc * rc - r2, min=0.0).sign_()


def _pair_terms(dR: Tensor, sigma: Scalar, eps: Scalar, rc: float, shift: str, want_energy: bool):
    """Per-pair ``g`` (``F_i = g dR``), ``u`` (if wanted), ``inv = 1/r2`` (0 outside) and
    the inside mask, from displacements ``[d, M]``."""
    r2 = (dR * dR).sum(0)
    mask = _inside(r2, rc)
    inv = torch.reciprocal(r2)
    if mask is not None:
        inv = inv * mask
    if isinstance(sigma, float) and sigma == 1.0:
        x = inv
    else:
        x = (sigma * sigma) * inv
    s6 = x * x * x
    # 24 eps (2 s6 - 1) s6 / r2 in four operations
    g = (s6 * (48.0 * eps) - 24.0 * eps) * s6 * inv
    u_c, du_c, _, _ = _cutoff_constants(sigma, eps, rc, shift)
    if shift == "force":
        g = g + du_c * torch.sqrt(inv)
    u = None
    if want_energy:
        u = (s6 - 1.0) * s6 * (4.0 * eps)
        if mask is not None and shift != "none":
            u = u - u_c * mask
            if shift == "force":
                u = u - ((r2.sqrt() - rc) * du_c) * mask
    return g, u, inv, mask, s6


def _gather_pairs(Xt: Tensor, pairs: PairIndex) -> Tensor:
    """``X_i - X_j`` for every pair from component-major ``Xt [d, B N]`` -> ``[d, M]``."""
    flat = Xt.reshape(-1)
    return (flat.index_select(0, pairs.i3) - flat.index_select(0, pairs.j3)).view(Xt.shape[0], -1)


def _scatter_pairs(f: Tensor, pairs: PairIndex, shape: torch.Size) -> Tensor:
    """``out[i] += f``, ``out[j] -= f`` for per-pair vectors ``f [d, M]`` -> ``[B, N, d]``.

    Segment sums over the ``i``-sorted pairs and over the pairs permuted into ``j``
    order (``index_add`` is several times slower on CPU)."""
    B, N, d = shape
    out = torch.segment_reduce(f, "sum", lengths=pairs.len_i, axis=1)
    fj = f.index_select(1, pairs.perm_j)
    out = out - torch.segment_reduce(fj, "sum", lengths=pairs.len_j, axis=1)
    return out.t().contiguous().view(B, N, d)


def _per_replica(u: Tensor, pairs: PairIndex) -> Tensor:
    if pairs.replica is None:
        return u.sum().reshape(1)
    return torch.segment_reduce(u, "sum", lengths=pairs.replica)


def _displacements(R: Tensor, pairs: PairIndex, displacement: DisplacementFn) -> Tensor:
    """Minimum-image pair displacements ``displacement(R_i, R_j)`` ``[d, M]``.

    ``space.displacement`` sees ``[M, d]`` views of component-major ``[d, M]`` storage, so
    its elementwise operations stay contiguous."""
    B, N, d = R.shape
    flat = R.reshape(B * N, d).t().contiguous().view(-1)
    Ri = flat.index_select(0, pairs.i3).view(d, -1)
    Rj = flat.index_select(0, pairs.j3).view(d, -1)
    dR = displacement(Ri.t(), Rj.t()).t()
    if dR.stride() != (dR.shape[1], 1):
        # canonical strides even for M = 1 (segment_reduce misreads a [d, 1] view with
        # strides (1, d), which is_contiguous() accepts)
        dR = dR.clone(memory_format=torch.contiguous_format)
    return dR


def lj_kernel(
    R: Tensor,
    pairs: PairIndex,
    displacement: DisplacementFn,
    sigma: Scalar,
    epsilon: Scalar,
    r_cut: float,
    shift: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """LJ energies ``[B]``, forces ``[B, N, d]`` and pair displacements ``[d, M]``.

    Args:
        R: positions ``[B, N, d]``.
        pairs: the pair list (:class:`PairIndex`).
        displacement: ``space.displacement``.
        sigma, epsilon: scalars (0-d tensors or floats).
        r_cut: cutoff (``inf`` for none).
        shift: ``"energy"``, ``"force"`` or ``"none"``.
    """
    dR = _displacements(R, pairs, displacement)
    g, u, _, _, _ = _pair_terms(dR, sigma, epsilon, r_cut, shift, want_energy=True)
    F = _scatter_pairs(dR * g, pairs, R.shape)
    return _per_replica(u, pairs), F, dR  # type: ignore[arg-type]


class LJEnergyForces(torch.autograd.Function):
    """``(E [B], F [B, N, d])`` of a scalar-parameter LJ term, with an analytic backward.

    ``apply(R, sigma, epsilon, pairs, displacement, r_cut, shift)``; see :func:`lj_kernel`.
    Saves only its inputs (``R`` and the parameters; the pair list is shared with the
    neighbor list's cache) and recomputes the pair geometry in backward: a trajectory
    differentiated by direct backprop keeps ``O(N)`` per step instead of ``O(M)``, and
    under gradient checkpointing the recomputed saved tensors have the same shapes even
    when the neighbor list is rebuilt at other steps than in the first pass.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        R: Tensor,
        sigma: Tensor,
        epsilon: Tensor,
        pairs: PairIndex,
        displacement: DisplacementFn,
        r_cut: float,
        shift: str,
    ) -> tuple[Tensor, Tensor]:
        E, F, _ = lj_kernel(R, pairs, displacement, sigma, epsilon, r_cut, shift)
        ctx.save_for_backward(R, sigma, epsilon)
        ctx.meta = (R.shape, pairs, displacement, r_cut, shift)
        return E, F

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, gE: Tensor | None, gF: Tensor | None):  # type: ignore[override]
        R, sigma, eps = ctx.saved_tensors
        shape, pairs, displacement, rc, shift = ctx.meta
        dR = _displacements(R, pairs, displacement)
        need_R, need_sigma, need_eps = ctx.needs_input_grad[:3]
        want_u = need_eps and gE is not None
        g, u, inv, mask, s6 = _pair_terms(dR, sigma, eps, rc, shift, want_energy=want_u)
        gEp = None
        if gE is not None:
            gEp = gE.expand(1) if pairs.replica is None else gE.repeat_interleave(pairs.replica)
        w = wd = None
        if gF is not None:
            B, N, d = shape
            w = _gather_pairs(gF.reshape(B * N, d).t().contiguous(), pairs)
            wd = (w * dR).sum(0)
        grad_R = grad_sigma = grad_eps = None
        if need_R:
            coef = None
            if wd is not None:
                gp = (-24.0 * eps) * inv * inv * s6 * (14.0 * s6 - 4.0)
                if shift == "force":
                    _, du_c, _, _ = _cutoff_constants(sigma, eps, rc, shift)
                    gp = gp - (0.5 * du_c) * inv * torch.sqrt(inv)
                coef = 2.0 * gp * wd
            if gEp is not None:
                coef = -gEp * g if coef is None else coef - gEp * g
            grad = dR * coef if coef is not None else torch.zeros_like(dR)
            if w is not None:
                grad = grad + w * g
            grad_R = _scatter_pairs(grad, pairs, shape)
        if need_eps:
            acc = torch.zeros((), dtype=dR.dtype, device=dR.device)
            if gEp is not None:
                acc = acc + (gEp * u).sum()
            if wd is not None:
                acc = acc + (wd * g).sum()
            grad_eps = acc / eps
        if need_sigma:
            grad_sigma = _sigma_derivative(dR, inv, mask, s6, sigma, eps, rc, shift, gEp, wd) / sigma
        return grad_R, grad_sigma, grad_eps, None, None, None, None


def _sigma_derivative(dR, inv, mask, s6, sigma, eps, rc, shift, gEp, wd) -> Tensor:
    """``sum_pairs gE sigma du/dsigma + (w . dR) sigma dg/dsigma``."""
    _, _, su_c, sdu_c = _cutoff_constants(sigma, eps, rc, shift)
    acc = torch.zeros((), dtype=dR.dtype, device=dR.device)
    if gEp is not None:
        su = (4.0 * eps) * s6 * (12.0 * s6 - 6.0)
        if mask is not None and shift != "none":
            su = su - su_c * mask
            if shift == "force":
                r = torch.sqrt((dR * dR).sum(0))
                su = su - ((r - rc) * sdu_c) * mask
        acc = acc + (gEp * su).sum()
    if wd is not None:
        sg = (24.0 * eps) * inv * s6 * (24.0 * s6 - 6.0)
        if shift == "force":
            sg = sg + sdu_c * torch.sqrt(inv)
        acc = acc + (wd * sg).sum()
    return acc


# --------------------------------------------------------------------------- potential glue


def fused_supported(potential: LennardJones) -> bool:
    """Whether :func:`lj_energy_and_forces` applies: scalar sigma, epsilon and r_cut, and
    the stock LJ / WCA energy and cutoff."""
    cls = type(potential)
    if cls.pair_energy is not LennardJones.pair_energy:
        return False
    if cls.cutoff not in (LennardJones.cutoff, WCA.cutoff):
        return False
    if potential.sigma.ndim or potential.epsilon.ndim:
        return False
    return potential.r_cut is None or potential.r_cut.ndim == 0


def _pair_index(potential: LennardJones, R: Tensor) -> PairIndex:
    """The pair list of ``potential`` for ``R``, rebuilt only when the neighbor list was
    rebuilt (or the batch shape changed)."""
    sel = potential.selection
    B, N, d = R.shape
    cache = potential.__dict__.setdefault("_fused_pair_cache", {})
    if sel.neighbor_list is not None:
        nb = sel.neighbor_list.update(R)
        hit = cache.get("neighbor_list")
        if hit is None or hit[0] is not nb or hit[1] != d:
            hit = (nb, d, PairIndex.from_flat(nb.i, nb.j, B, N, d))
            cache["neighbor_list"] = hit
        return hit[2]
    key = (B, N, d, R.device)
    if key not in cache:
        if sel.pairs is not None:
            if sel._max_index >= N:
                raise ControlMDError(
                    f"pairs refers to particle {sel._max_index} but R has only N = {N} particles"
                )
            i, j = sel.pairs[:, 0].to(R.device), sel.pairs[:, 1].to(R.device)
        else:
            i, j = sel.dense_index(N, R.device)
        offset = (torch.arange(B, device=R.device) * N).unsqueeze(1)
        cache[key] = PairIndex.from_flat((offset + i).reshape(-1), (offset + j).reshape(-1), B, N, d)
    return cache[key]


def _scalars(potential: LennardJones) -> tuple[float, float, float]:
    """``(sigma, epsilon, r_cut)`` as Python numbers, cached until a parameter changes
    (so no device synchronisation per step)."""
    params = (potential.sigma, potential.epsilon, potential.r_cut)
    key = tuple((p.data_ptr(), p._version) if p is not None else None for p in params)
    cached = potential.__dict__.get("_fused_scalars")
    if cached is None or cached[0] != key:
        sigma, eps = potential.sigma.detach(), potential.epsilon.detach()
        rc_t = potential.cutoff({"sigma": sigma, "epsilon": eps}, sigma)
        rc = _INF if rc_t is None else float(rc_t)
        cached = (key, (float(sigma), float(eps), rc))
        potential.__dict__["_fused_scalars"] = cached
    return cached[1]


def lj_energy_and_forces(
    potential: LennardJones, R: Tensor, *, create_graph: bool | None = None
) -> tuple[Tensor, Tensor]:
    """``(E [B], F [B, N, d])`` of an LJ/WCA term from the fused analytic kernel.

    Args:
        potential: a term for which :func:`fused_supported` is true.
        R: positions ``[B, N, d]``.
        create_graph: record the computation (through :class:`LJEnergyForces`) so that
            losses downstream of E or F can be differentiated with respect to ``R``,
            sigma and epsilon; ``None`` means ``torch.is_grad_enabled()``.
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    sigma_f, eps_f, rc = _scalars(potential)
    pairs = _pair_index(potential, R)
    disp = potential.space.displacement
    if create_graph:
        sigma = potential.sigma.to(R.dtype)
        eps = potential.epsilon.to(R.dtype)
        if R.requires_grad or sigma.requires_grad or eps.requires_grad:
            return LJEnergyForces.apply(R, sigma, eps, pairs, disp, rc, potential.shift)
    with torch.no_grad():
        E, F, _ = lj_kernel(R.detach(), pairs, disp, sigma_f, eps_f, rc, potential.shift)
    return E, F


def lj_force_vjp(
    potential: LennardJones, R: Tensor, v: Tensor, *, need_sigma: bool, need_epsilon: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Forces at ``R`` and their vector-Jacobian product with ``v`` in one pass.

    Returns ``(F, J_R^T v, d(v . F)/dsigma, d(v . F)/depsilon)`` (the last two ``None``
    unless asked), without building a graph: the inner step of reversible
    backpropagation (:mod:`controlmd.dynamics.reversible`), where each recomputed state
    needs both its force and the adjoint's pull-back through that force.

    Args:
        potential: a term for which :func:`fused_supported` is true.
        R: positions ``[B, N, d]``.
        v: cotangent of the forces ``[B, N, d]``.
        need_sigma, need_epsilon: also return the parameter derivatives.
    """
    sigma, eps, rc = _scalars(potential)
    shift = potential.shift
    with torch.no_grad():
        R = R.detach()
        pairs = _pair_index(potential, R)
        dR = _displacements(R, pairs, potential.space.displacement)
        g, _, inv, mask, s6 = _pair_terms(dR, sigma, eps, rc, shift, want_energy=False)
        F = _scatter_pairs(dR * g, pairs, R.shape)
        B, N, d = R.shape
        w = _gather_pairs(v.reshape(B * N, d).t().contiguous(), pairs)
        wd = (w * dR).sum(0)
        gp = (-24.0 * eps) * inv * inv * s6 * (14.0 * s6 - 4.0)
        if shift == "force":
            _, du_c, _, _ = _cutoff_constants(sigma, eps, rc, shift)
            gp = gp - (0.5 * du_c) * inv * torch.sqrt(inv)
        grad_R = _scatter_pairs(dR * (2.0 * gp * wd) + w * g, pairs, R.shape)
        g_eps = (wd * g).sum() / eps if need_epsilon else None
        g_sigma = None
        if need_sigma:
            g_sigma = _sigma_derivative(dR, inv, mask, s6, sigma, eps, rc, shift, None, wd) / sigma
    return F, grad_R, g_sigma, g_eps
