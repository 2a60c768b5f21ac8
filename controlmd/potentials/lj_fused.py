"""Fused analytic Lennard-Jones energy and forces: one pass over the pair list.

Units: reduced Lennard-Jones units (lengths in sigma, energies in epsilon).

:func:`lj_energy_and_forces` computes ``E [B]`` and ``F = -dE/dR [B, N, d]`` of a
:class:`~controlmd.potentials.pair.LennardJones` (or :class:`~controlmd.potentials.pair.WCA`)
term from closed forms (``LennardJones.energy_and_forces`` calls it), sharing the pair geometry between energy and force, instead of
building an autograd graph of the energy and differentiating it.

Layout: the pair list (a neighbor list's flat half list, or all pairs ``i < j``) is held
as flat indices into ``R.reshape(-1)``, so the pair displacements are gathered into a
contiguous *pair-major* ``[M, d]`` array (two ``index_select``), and the forces are
scattered back by one sparse-dense product with the ``[B N, M]`` CSR incidence matrix
(+1 at ``(i_p, p)``, -1 at ``(j_p, p)``), built once per neighbor-list rebuild: on CPU
this is about 4x faster than segment sums or ``index_add`` over the pairs. In between,
about fifteen elementwise operations, with the cutoff applied as one in-place
``threshold_`` on ``1/r2``, sums over the ``d`` components as matrix-vector products,
and numeric constants as cached 0-d tensors (a Python float in a float32 operation is
converted at every call, ~1 us each on CPU). The periodic minimum image is computed with
``1/L`` precomputed and in-place operations (:func:`_min_image`); nothing in the kernel
is differentiated by autograd.

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

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from controlmd.errors import ControlMDError

if TYPE_CHECKING:
    from controlmd.potentials.pair import LennardJones

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
    """A pair list laid out for pair-major gathers and a sparse-matrix force scatter.

    Attributes:
        ip, jp: ``[M d]``: entry ``p d + c`` is ``i_p d + c`` (resp. ``j_p``), the
            component ``c`` of the two particles of pair ``p`` in ``R.reshape(-1)``
            (``i_p, j_p`` flat indices into ``R.reshape(B * N, d)``), so a gather gives
            contiguous pair-major ``[M, d]`` displacements.
        incidence: ``[B N, M]`` sparse CSR matrix with ``+1`` at ``(i_p, p)`` and ``-1``
            at ``(j_p, p)``: ``incidence @ f`` is ``F_i = sum_p f_p [i_p = i] - f_p
            [j_p = i]`` for per-pair vectors ``f [M, d]`` (one sparse-dense product,
            several times faster on CPU than scatter-adds or segment sums).
        replica: per-replica segment lengths ``[B]`` of the ``i``-sorted pairs (``None``
            when ``B == 1``).
        n_replicas: ``B``.
    """

    ip: Tensor
    jp: Tensor
    incidence: Tensor
    replica: Tensor | None
    n_replicas: int

    @staticmethod
    def from_flat(
        i: Tensor, j: Tensor, B: int, N: int, d: int, dtype: torch.dtype = torch.float64
    ) -> PairIndex:
        """From flat pair indices ``i, j [M]`` into ``R.reshape(B * N, d)`` (same replica);
        ``dtype`` is that of the positions the list will be used with."""
        BN = B * N
        M = i.numel()
        dev = i.device
        # F_i = g dR and F_j = -g dR: swapping i and j changes nothing, so order each pair
        i, j = torch.minimum(i, j), torch.maximum(i, j)
        if M > 1 and not bool((i[1:] >= i[:-1]).all()):
            order = torch.argsort(i, stable=True)
            i, j = i[order], j[order]
        offsets = torch.arange(d, device=dev)
        ip = (i.unsqueeze(1) * d + offsets).reshape(-1)
        jp = (j.unsqueeze(1) * d + offsets).reshape(-1)
        # CSR rows with sorted columns without sorting 2M entries: a pair with j_p = r has
        # i_p < r, so it comes before every pair with i = r; row r is the pairs with j = r
        # (in pair order: a stable sort by j) followed by those with i = r (contiguous).
        len_i = torch.bincount(i, minlength=BN)
        len_j = torch.bincount(j, minlength=BN)
        cum_i, cum_j = torch.cumsum(len_i, 0), torch.cumsum(len_j, 0)
        crow = torch.zeros(BN + 1, dtype=torch.long, device=dev)
        torch.add(cum_i, cum_j, out=crow[1:])
        pair = torch.arange(M, device=dev)
        perm_j = _stable_argsort(j, BN)
        # row r starts at crow[r] = (pairs with i < r) + (pairs with j < r): the entry of
        # pair p (p-th by i) lands at p + (pairs with j <= i_p), the q-th pair by j at
        # q + (pairs with i < j_q) (index_select: several times faster than t[index] on CPU)
        pos_i = cum_j.index_select(0, i).add_(pair)
        pos_j = (cum_i - len_i).index_select(0, j.index_select(0, perm_j)).add_(pair)
        pos = torch.cat([pos_i, pos_j])
        cols = torch.empty(2 * M, dtype=torch.long, device=dev).scatter_(
            0, pos, torch.cat([pair, perm_j])
        )
        sign = torch.ones(2 * M, dtype=dtype, device=dev)
        sign[M:] = -1.0
        values = torch.empty(2 * M, dtype=dtype, device=dev).scatter_(0, pos, sign)
        with warnings.catch_warnings():  # "sparse CSR support is in beta" (stable since 1.13)
            warnings.simplefilter("ignore", UserWarning)
            incidence = torch.sparse_csr_tensor(crow, cols, values, (BN, M))
        replica = None if B == 1 else torch.bincount(i // N, minlength=B)
        return PairIndex(ip, jp, incidence, replica, B)


def _stable_argsort(x: Tensor, bound: int) -> Tensor:
    """``torch.argsort(x, stable=True)`` of integers in ``[0, bound)``; on CPU with
    ``bound <= 2**16`` by NumPy's radix sort of ``uint16`` keys (about 20x faster for the
    ~1e4-1e5 keys of a pair list; same permutation)."""
    if x.device.type == "cpu" and bound <= 1 << 16:
        keys = x.numpy().astype(np.uint16)
        return torch.from_numpy(np.argsort(keys, kind="stable").astype(np.int64))
    return torch.argsort(x, stable=True)


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


@functools.lru_cache(maxsize=256)
def _cpu_scalar(value: float, dtype: torch.dtype) -> Tensor:
    return torch.tensor(value, dtype=dtype)


def _k(x: Scalar, like: Tensor) -> Tensor:
    """A Python number as a cached 0-d tensor of ``like``'s dtype (a CPU scalar, usable
    with tensors on any device): ``float32_tensor * 0.5`` converts the wrapped double
    ``0.5`` to float32 at every call (~1 us on CPU), a ready 0-d tensor does not.
    Tensors are returned as they are."""
    return _cpu_scalar(float(x), like.dtype) if isinstance(x, (float, int)) else x


def _row_sum(X: Tensor) -> Tensor:
    """``X.sum(-1)`` of a contiguous ``[M, d]`` array as a matrix-vector product (a
    reduction over a trailing axis of size 3 is several times slower on CPU)."""
    return torch.mv(X, X.new_ones(X.shape[1]))


def _pair_terms(
    dR: Tensor, sigma: Scalar, eps: Scalar, rc: float, shift: str, want_energy: bool
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Per-pair ``g`` (``F_i = g dR``), ``u`` (if wanted), ``inv = 1/r2`` (0 outside the
    cutoff) and ``s6 = (sigma^2/r2)^3`` (0 outside), from pair-major displacements
    ``[M, d]``."""
    r2 = _row_sum(dR * dR)
    inv = torch.reciprocal(r2)
    mask = None
    if rc != _INF:
        # 1/r2 > 1/rc^2, i.e. inside the cutoff, or 0 (one in-place op; bool masks and
        # where take slow paths on CPU); the mask of inside pairs is then sign(inv)
        torch.threshold_(inv, 1.0 / (rc * rc), 0.0)
        if want_energy and shift != "none":
            mask = torch.sign(inv)
    if isinstance(sigma, float) and sigma == 1.0:
        x = inv
    else:
        x = inv * _k(sigma * sigma, dR)
    s6 = torch.pow(x, 3)
    # 24 eps (2 s6 - 1) s6 / r2 in four operations
    g = s6 * _k(48.0 * eps, dR)
    g.sub_(_k(24.0 * eps, dR)).mul_(s6).mul_(inv)
    u_c, du_c, _, _ = _cutoff_constants(sigma, eps, rc, shift)
    if shift == "force":
        g = g + _k(du_c, dR) * torch.sqrt(inv)
    u = None
    if want_energy:
        u = (s6 - _k(1.0, dR)).mul_(s6).mul_(_k(4.0 * eps, dR))
        if mask is not None:
            u = torch.addcmul(u, mask, _k(-u_c, dR))
            if shift == "force":
                u = u - ((r2.sqrt() - rc) * du_c) * mask
    return g, u, inv, s6


def _gather_pairs(X: Tensor, pairs: PairIndex) -> Tensor:
    """``X_i - X_j`` for every pair from ``X [B, N, d]`` -> pair-major ``[M, d]``."""
    flat = X.reshape(-1)
    return (flat.index_select(0, pairs.ip) - flat.index_select(0, pairs.jp)).view(-1, X.shape[-1])


def _scatter_pairs(f: Tensor, pairs: PairIndex, shape: torch.Size) -> Tensor:
    """``out[i] += f``, ``out[j] -= f`` for per-pair vectors ``f [M, d]`` -> ``[B, N, d]``:
    one sparse (incidence) times dense product."""
    return (pairs.incidence @ f).view(shape)


def _per_replica(u: Tensor, pairs: PairIndex) -> Tensor:
    if pairs.replica is None:
        return u.sum().reshape(1)
    return torch.segment_reduce(u, "sum", lengths=pairs.replica)


def _displacements(R: Tensor, pairs: PairIndex, displacement: DisplacementFn) -> Tensor:
    """Minimum-image pair displacements ``displacement(R_i, R_j)``, pair-major ``[M, d]``."""
    d = R.shape[-1]
    flat = R.reshape(-1)
    Ri = flat.index_select(0, pairs.ip).view(-1, d)
    Rj = flat.index_select(0, pairs.jp).view(-1, d)
    return displacement(Ri, Rj).contiguous()


def lj_kernel(
    R: Tensor,
    pairs: PairIndex,
    displacement: DisplacementFn,
    sigma: Scalar,
    epsilon: Scalar,
    r_cut: float,
    shift: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """LJ energies ``[B]``, forces ``[B, N, d]`` and pair displacements ``[M, d]``.

    Args:
        R: positions ``[B, N, d]``.
        pairs: the pair list (:class:`PairIndex`).
        displacement: ``space.displacement`` (or an equivalent, e.g. :func:`_min_image`).
        sigma, epsilon: scalars (0-d tensors or floats).
        r_cut: cutoff (``inf`` for none).
        shift: ``"energy"``, ``"force"`` or ``"none"``.
    """
    dR = _displacements(R, pairs, displacement)
    g, u, _, _ = _pair_terms(dR, sigma, epsilon, r_cut, shift, want_energy=True)
    if u is None:
        raise RuntimeError("_pair_terms returned no pair energies with want_energy=True")
    F = _scatter_pairs(dR * g.unsqueeze(1), pairs, R.shape)
    return _per_replica(u, pairs), F, dR


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
    def forward(
        ctx: Any,
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
    def backward(ctx: Any, gE: Tensor | None, gF: Tensor | None) -> tuple[Tensor | None, ...]:
        R, sigma, eps = ctx.saved_tensors
        shape, pairs, displacement, rc, shift = ctx.meta
        dR = _displacements(R, pairs, displacement)
        need_R, need_sigma, need_eps = ctx.needs_input_grad[:3]
        want_u = need_eps and gE is not None
        g, u, inv, s6 = _pair_terms(dR, sigma, eps, rc, shift, want_energy=want_u)
        gEp = None
        if gE is not None:
            gEp = gE.expand(1) if pairs.replica is None else gE.repeat_interleave(pairs.replica)
        w = wd = None
        if gF is not None:
            w = _gather_pairs(gF, pairs)
            wd = _row_sum(w * dR)
        grad_R = grad_sigma = grad_eps = None
        if need_R:
            coef = None
            if wd is not None:
                coef = _hessian_coefficient(inv, s6, sigma, eps, rc, shift).mul_(wd)
            if gEp is not None:
                coef = -gEp * g if coef is None else coef - gEp * g
            grad = dR * coef.unsqueeze(1) if coef is not None else torch.zeros_like(dR)
            if w is not None:
                grad = grad + w * g.unsqueeze(1)
            grad_R = _scatter_pairs(grad, pairs, shape)
        if need_eps:
            acc = torch.zeros((), dtype=dR.dtype, device=dR.device)
            if gEp is not None:
                if u is None:  # want_u holds: need_eps and gE given
                    raise RuntimeError(
                        "LJ backward: pair energies missing for the epsilon gradient"
                    )
                acc = acc + (gEp * u).sum()
            if wd is not None:
                acc = acc + torch.dot(wd, g)
            grad_eps = acc / eps
        if need_sigma:
            grad_sigma = _sigma_derivative(dR, inv, s6, sigma, eps, rc, shift, gEp, wd) / sigma
        return grad_R, grad_sigma, grad_eps, None, None, None, None


def _hessian_coefficient(
    inv: Tensor, s6: Tensor, sigma: Scalar, eps: Scalar, rc: float, shift: str
) -> Tensor:
    """``2 dg/dr2`` per pair (a new tensor): the Hessian-vector product of the pair force
    ``g dR`` with a vector ``w`` is ``g w + 2 g' (w . dR) dR``."""
    gp = (s6 * 14.0).sub_(4.0).mul_(s6).mul_(inv).mul_(inv).mul_(-48.0 * eps)
    if shift == "force":
        _, du_c, _, _ = _cutoff_constants(sigma, eps, rc, shift)
        gp = gp - du_c * inv * torch.sqrt(inv)
    return gp


def _sigma_derivative(
    dR: Tensor,
    inv: Tensor,
    s6: Tensor,
    sigma: Scalar,
    eps: Scalar,
    rc: float,
    shift: str,
    gEp: Tensor | None,
    wd: Tensor | None,
) -> Tensor:
    """``sum_pairs gE sigma du/dsigma + (w . dR) sigma dg/dsigma``."""
    _, _, su_c, sdu_c = _cutoff_constants(sigma, eps, rc, shift)
    acc = torch.zeros((), dtype=dR.dtype, device=dR.device)
    if gEp is not None:
        su = (4.0 * eps) * s6 * (12.0 * s6 - 6.0)
        if rc != _INF and shift != "none":
            mask = torch.sign(inv)  # 1 inside the cutoff, 0 outside
            su = su - su_c * mask
            if shift == "force":
                r = torch.sqrt(_row_sum(dR * dR))
                su = su - ((r - rc) * sdu_c) * mask
        acc = acc + (gEp * su).sum()
    if wd is not None:
        sg = (24.0 * eps) * inv * s6 * (24.0 * s6 - 6.0)
        if shift == "force":
            sg = sg + sdu_c * torch.sqrt(inv)
        acc = acc + (wd * sg).sum()
    return acc


def _min_image(box: Tensor) -> DisplacementFn:
    """``space.displacement`` of a periodic orthorhombic box in three in-place operations
    after the difference (for the kernels, which never differentiate through it):
    ``dR - L round(dR / L)`` with ``1/L`` precomputed; a cubic box uses Python scalars."""
    sides = box.tolist()
    if all(s == sides[0] for s in sides):
        L, inv_L = float(sides[0]), 1.0 / float(sides[0])

        def cubic(Ra: Tensor, Rb: Tensor) -> Tensor:
            dR = Ra - Rb
            return dR.sub_(torch.round(dR * _k(inv_L, dR)).mul_(_k(L, dR)))

        return cubic

    def orthorhombic(Ra: Tensor, Rb: Tensor) -> Tensor:
        dR = Ra - Rb
        L = box.to(dR)
        return dR.sub_(torch.round(dR / L).mul_(L))

    return orthorhombic


# --------------------------------------------------------------------------- potential glue


def fused_supported(potential: LennardJones) -> bool:
    """Whether :func:`lj_energy_and_forces` applies (see
    :meth:`~controlmd.potentials.pair.LennardJones.fused_supported`)."""
    return potential.fused_supported()


def _pair_index(potential: LennardJones, R: Tensor) -> PairIndex:
    """The pair list of ``potential`` for ``R``, rebuilt only when the neighbor list was
    rebuilt (or the batch shape, dtype or device changed)."""
    sel = potential.selection
    B, N, d = R.shape
    cache = potential.__dict__.setdefault("_fused_pair_cache", {})
    if sel.neighbor_list is not None:
        nb = sel.neighbor_list.update(R)
        hit = cache.get("neighbor_list")
        if hit is None or hit[0] is not nb or hit[1] != d or hit[2] != R.dtype:
            hit = (nb, d, R.dtype, PairIndex.from_flat(nb.i, nb.j, B, N, d, R.dtype))
            cache["neighbor_list"] = hit
        nb_index: PairIndex = hit[3]
        return nb_index
    key = (B, N, d, R.dtype, R.device)
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
        cache[key] = PairIndex.from_flat(
            (offset + i).reshape(-1), (offset + j).reshape(-1), B, N, d, R.dtype
        )
    index: PairIndex = cache[key]
    return index


def _displacement(potential: LennardJones) -> DisplacementFn:
    """The kernels' pair displacement: :func:`_min_image` of the potential's periodic box
    (the minimum image that ``periodic(box).displacement`` computes, and that the
    neighbor-list builders assume too), or ``space.displacement`` in free space."""
    space = potential.space
    cached = potential.__dict__.get("_fused_displacement")
    if cached is None or cached[0] is not space:
        fn = space.displacement if space.box is None else _min_image(space.box)
        cached = (space, fn)
        potential.__dict__["_fused_displacement"] = cached
    return cached[1]


def _parameter_tensor(value: object, name: str) -> Tensor:
    """A LennardJones parameter (a buffer or ``nn.Parameter``), checked to be a tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(f"LennardJones.{name} must be a tensor, got {type(value).__name__}")
    return value


def _scalars(potential: LennardJones) -> tuple[float, float, float]:
    """``(sigma, epsilon, r_cut)`` as Python numbers, cached until a parameter changes
    (so no device synchronisation per step)."""
    sigma_p = _parameter_tensor(potential.sigma, "sigma")
    eps_p = _parameter_tensor(potential.epsilon, "epsilon")
    params = (sigma_p, eps_p, potential.r_cut)
    key = tuple((p.data_ptr(), p._version) if p is not None else None for p in params)
    cached = potential.__dict__.get("_fused_scalars")
    if cached is None or cached[0] != key:
        sigma, eps = sigma_p.detach(), eps_p.detach()
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
    disp = _displacement(potential)
    if create_graph:
        sigma = _parameter_tensor(potential.sigma, "sigma").to(R.dtype)
        eps = _parameter_tensor(potential.epsilon, "epsilon").to(R.dtype)
        if R.requires_grad or sigma.requires_grad or eps.requires_grad:
            EF: tuple[Tensor, Tensor] = LJEnergyForces.apply(
                R, sigma, eps, pairs, disp, rc, potential.shift
            )
            return EF
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
        dR = _displacements(R, pairs, _displacement(potential))
        g, _, inv, s6 = _pair_terms(dR, sigma, eps, rc, shift, want_energy=False)
        F = _scatter_pairs(dR * g.unsqueeze(1), pairs, R.shape)
        w = _gather_pairs(v, pairs)
        wd = _row_sum(w * dR)
        coef = _hessian_coefficient(inv, s6, sigma, eps, rc, shift).mul_(wd)
        grad_R = _scatter_pairs(
            torch.addcmul(w * g.unsqueeze(1), dR, coef.unsqueeze(1)), pairs, R.shape
        )
        g_eps = torch.dot(wd, g) / eps if need_epsilon else None
        g_sigma = None
        if need_sigma:
            g_sigma = _sigma_derivative(dR, inv, s6, sigma, eps, rc, shift, None, wd) / sigma
    return F, grad_R, g_sigma, g_eps
