"""Per-replica random streams.

Replica ``i`` of a batch seeded ``s`` draws from its own stream, determined by
``replica_seed(s, i) = s + i * SEED_STRIDE`` alone. Because ``replica_seed(s, 0) == s``,
replica ``i`` of a batch seeded ``s`` is bit-identical to a one-replica run seeded
``replica_seed(s, i)``, whatever the batch size or the other replicas in it (the gymnasium
envs and the distributed trainer rely on this).

Two kinds of stream (``kind``, or the default set by :func:`use_rng` /
``[experiment] rng``):

* ``"mt19937"`` (the default): one ``torch.Generator`` per replica, seeded
  ``replica_seed(s, i)``; a draw loops over the generators in Python, so its cost grows
  with ``B`` at a few microseconds per replica. torch's CPU generator keeps only the low
  32 bits of a seed, so seeds that agree modulo 2**32 give the same stream: keep
  ``seed + B * SEED_STRIDE`` below 2**32 (B < 4294 replicas for seed 0) when every
  replica's stream must be distinct.
* ``"philox"``: counter-based. Philox4x32-10 (Salmon et al., SC'11) with the fixed key
  :data:`PHILOX_KEY` maps the 128-bit counter ``(block, replica_seed(s, i))`` (the 64-bit
  block index in the low words, the 64-bit replica seed in the high words) to four
  32-bit words; each block gives two 53-bit uniforms ``U(2b), U(2b+1)`` (slots) and, by the
  Box–Muller transform, the two standard normals of slots ``2b`` and ``2b + 1``. A
  replica's stream is the slot sequence, so a draw of ``[B, *shape]`` for every replica is
  a handful of batched integer tensor operations (no Python loop over replicas), distinct
  for all replica seeds below 2**64. Normals are computed in float64 and rounded to the
  requested dtype, so float32 and float64 runs see the same noise.

Both kinds give the initial configurations of tasks that sample them replica by replica
(:attr:`ReplicaRNG.generators`) from the same mt19937 generators, so switching the kind
changes only the noise of the dynamics.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from controlmd._validation import check_choice, check_int
from controlmd.errors import ControlMDError

Tensor = torch.Tensor

SEED_STRIDE = 1_000_003
"""Distance between the seeds of consecutive replicas (a prime, so streams rarely collide)."""

# torch's CPU generators keep only the low 32 bits of a seed, and replica i of a batch
# seeded s draws from s + i * SEED_STRIDE (mod 2**32). These offsets were searched so that,
# for base seeds < 2000 and < 10_000 training iterations, no training stream of a batch of
# up to 200_000 replicas coincides with an evaluation stream, nor two evaluation batches.
EVAL_SEED_OFFSET = 828_979_348
"""Held-out evaluations during training use batch seed ``seed + EVAL_SEED_OFFSET``."""
FINAL_SEED_OFFSET = 1_877_134_342
"""The before/after scoring of a run uses batch seed ``seed + FINAL_SEED_OFFSET``."""
RESCORE_SEED_OFFSET = 573_356_475
"""Re-scoring a finished protocol on fresh replicas (compare, sweeps) uses this offset."""

RNG_KINDS = ("mt19937", "philox")
"""The stream kinds (``[experiment] rng``); ``"mt19937"`` is the default."""

PHILOX_KEY = (0xA4093822, 0x299F31D0)
"""The fixed 64-bit Philox key (two 32-bit words, digits of pi); the seed is in the counter."""

__all__ = [
    "EVAL_SEED_OFFSET",
    "FINAL_SEED_OFFSET",
    "PHILOX_KEY",
    "RESCORE_SEED_OFFSET",
    "RNG_KINDS",
    "SEED_STRIDE",
    "ReplicaRNG",
    "compile_philox",
    "default_rng_kind",
    "philox4x32",
    "replica_seed",
    "use_rng",
]

_DEFAULT_KIND: contextvars.ContextVar[str] = contextvars.ContextVar(
    "controlmd_rng_kind", default="mt19937"
)

_M32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10
# Round keys of the fixed key: Python ints, folded into the rounds' xors.
_ROUND_KEYS = tuple(
    ((PHILOX_KEY[0] + r * _PHILOX_W[0]) & _M32, (PHILOX_KEY[1] + r * _PHILOX_W[1]) & _M32)
    for r in range(_PHILOX_ROUNDS)
)
_TWO_POW_M53 = 2.0**-53


def replica_seed(seed: int, index: int) -> int:
    """Seed of replica ``index`` in a batch seeded ``seed``: ``seed + index * SEED_STRIDE``."""
    return int(seed) + int(index) * SEED_STRIDE


def default_rng_kind() -> str:
    """The kind a :class:`ReplicaRNG` built without ``kind`` gets (see :func:`use_rng`)."""
    return _DEFAULT_KIND.get()


@contextlib.contextmanager
def use_rng(kind: str) -> Iterator[None]:
    """Within the block, :class:`ReplicaRNG` built without ``kind`` are of ``kind``
    (``"mt19937"`` or ``"philox"``); this is how ``[experiment] rng`` reaches the tasks.

    Example::

        >>> with use_rng("philox"):
        ...     ReplicaRNG(0, 3).kind
        'philox'
    """
    check_choice("rng", kind, RNG_KINDS)
    token = _DEFAULT_KIND.set(kind)
    try:
        yield
    finally:
        _DEFAULT_KIND.reset(token)


def philox4x32(
    c0: Tensor, c1: Tensor | int, c2: Tensor, c3: Tensor | int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 with key :data:`PHILOX_KEY`, in int64 tensor operations.

    Each argument holds one 32-bit word of the counter (values in ``[0, 2**32)``, int64,
    mutually broadcastable; ``c0`` the lowest word). Returns the four output words, int64
    tensors of the broadcast shape with values in ``[0, 2**32)``. The 32 x 32 -> 64-bit
    products are exact: int64 multiplication wraps modulo 2**64, and the high word is read
    with a masked shift.
    """
    device = next(c.device for c in (c0, c1, c2, c3) if isinstance(c, Tensor))
    w0, w1, w2, w3 = torch.broadcast_tensors(
        *(torch.as_tensor(c, dtype=torch.int64, device=device) for c in (c0, c1, c2, c3))
    )
    x, y = torch.stack((w0, w2)), torch.stack((w3, w1))
    t, y = _philox_stacked(x, y)
    return t[1], y[1], t[0], y[0]


def _philox_constants(device: torch.device, ndim: int) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The multipliers ``[M0, M1]`` and the flipped round keys ``[k1_r, k0_r]`` of
    :func:`_philox_stacked` as int64 ``[2, 1, ...]`` tensors of ``ndim`` dimensions on
    ``device`` (built once per device and ``ndim``)."""
    hit = _CONSTANTS.get((device, ndim))
    if hit is None:
        shape = (2,) + (1,) * (ndim - 1)
        m = torch.tensor(_PHILOX_M, dtype=torch.int64, device=device).view(shape)
        keys = tuple(
            torch.tensor((k1, k0), dtype=torch.int64, device=device).view(shape)
            for k0, k1 in _ROUND_KEYS
        )
        hit = _CONSTANTS[(device, ndim)] = (m, keys)
    return hit


_CONSTANTS: dict[tuple[torch.device, int], tuple[Tensor, tuple[Tensor, ...]]] = {}


def _philox_stacked(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The ten Philox rounds on the counter words held two by two, for eager dispatch:
    ``x = [c0, c2]`` (the multiplied words) and ``y = [c3, c1]`` (int64 ``[2, ...]``,
    broadcastable, values in ``[0, 2**32)``). Returns ``(t, y)`` with ``t = [w2, w0]``
    and ``y = [w3, w1]``, the output words, int64 ``[2, ...]``.

    One round is ``(c0, c1, c2, c3) -> (hi(c2 M1) ^ c1 ^ k0, lo(c2 M1), hi(c0 M0) ^ c3 ^ k1,
    lo(c0 M0))``: with ``P = [c0 M0, c2 M1]``, the new ``[c3, c1]`` is ``lo(P)`` and the
    new ``[c2, c0]`` is ``hi(P) ^ y ^ [k1, k0]``, flipped to ``[c0, c2]`` for the next
    multiplication: 7 tensor operations per round instead of 12 for the four words apart.
    """
    m, keys = _philox_constants(x.device, max(x.ndim, y.ndim))
    t = x
    for r, k in enumerate(keys):
        p = (t if r == 0 else t.flip(0)) * m
        t = (p >> 32).bitwise_and_(_M32).bitwise_xor_(y).bitwise_xor_(k)
        y = p.bitwise_and_(_M32)
    return t, y


def _philox_words(
    c0: Tensor, c1: Tensor | int, c2: Tensor, c3: Tensor | int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`philox4x32` written word by word with Python-int constants (same words, bit
    for bit): the form ``torch.compile`` fuses into one elementwise loop, and the faster
    eager form for large draws (:data:`_STACKED_MAX_BLOCKS`)."""
    for k0, k1 in _ROUND_KEYS:
        p0 = c0 * _PHILOX_M[0]
        p1 = c2 * _PHILOX_M[1]
        n0 = ((p1 >> 32).bitwise_and_(_M32) ^ c1).bitwise_xor_(k0)
        n2 = ((p0 >> 32).bitwise_and_(_M32) ^ c3).bitwise_xor_(k1)
        c0, c1, c2, c3 = n0, p1.bitwise_and_(_M32), n2, p0.bitwise_and_(_M32)
    return c0, c1, c2, c3  # type: ignore[return-value]


_STACKED_MAX_BLOCKS = 1 << 17
"""Eager draws of fewer blocks (replicas x blocks per replica) use the stacked rounds of
:func:`_philox_stacked` (fewer, dispatch-bound operations: 0.70 against 0.81 ms for 512 x 7
blocks), larger ones the word-by-word form (the stacked form's flips and doubled tensors
cost more than the dispatch they save: 283 against 257 ms for 10^6 blocks)."""


def _uniform_pairs(
    block_low: Tensor, block_high: Tensor | int, seed_low: Tensor, seed_high: Tensor
) -> tuple[Tensor, Tensor]:
    """Philox blocks -> their two 53-bit uniforms ``U(2b), U(2b+1)`` (float64 ``[B, count]``
    each, exact), in the stacked form of :func:`_philox_stacked` (eager draws).

    ``block_low`` ``[count]`` and ``block_high`` (an int, or ``[count]``) are the block
    index's 32-bit halves, ``seed_low`` and ``seed_high`` ``[B, 1]`` the replica seed's."""
    x = torch.stack(torch.broadcast_tensors(block_low.view(1, -1), seed_low))
    high = torch.as_tensor(block_high, device=seed_high.device)
    y = torch.stack(torch.broadcast_tensors(seed_high, high.view(1, -1) if high.ndim else high))
    t, y = _philox_stacked(x, y)
    u = ((t << 21) | (y >> 11)).to(torch.float64).mul_(_TWO_POW_M53)  # [U(2b+1), U(2b)]
    return u[1], u[0]


def _uniform_pairs_words(
    block_low: Tensor, block_high: Tensor | int, seed_low: Tensor, seed_high: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`_uniform_pairs` word by word (:func:`_philox_words`): what ``torch.compile``
    fuses, and the eager form for large draws (same bits)."""
    w0, w1, w2, w3 = _philox_words(block_low.view(1, -1), block_high, seed_low, seed_high)
    u0 = ((w0 << 21) | (w1 >> 11)).to(torch.float64).mul_(_TWO_POW_M53)
    u1 = ((w2 << 21) | (w3 >> 11)).to(torch.float64).mul_(_TWO_POW_M53)
    return u0, u1


def _box_muller(u0: Tensor, u1: Tensor) -> Tensor:
    """Uniforms ``U(2b), U(2b+1)`` ``[B, count]`` (float64, overwritten) -> the block's two
    standard normals ``sqrt(-2 log(1 - U(2b))) (cos, sin)(2 pi U(2b+1))``, interleaved as
    slots: float64 ``[B, 2 count]``. Eager draws: the products are written into the
    interleaved result (``torch.stack`` along a new last dimension is a slow strided copy,
    23 ms for 10^6 blocks)."""
    radius = u0.neg_().add_(1.0).log_().mul_(-2.0).sqrt_()  # u0 in [0, 1) -> 1 - u0 > 0
    angle = u1.mul_(2.0 * math.pi)
    z = radius.new_empty(*radius.shape, 2)
    torch.mul(radius, torch.cos(angle), out=z[..., 0])
    torch.mul(radius, torch.sin(angle), out=z[..., 1])
    return z.view(z.shape[0], -1)


def _box_muller_fused(u0: Tensor, u1: Tensor) -> Tensor:
    """:func:`_box_muller`'s arithmetic in the form ``torch.compile`` fuses (``stack``)."""
    radius = (1.0 - u0).log() * -2.0
    radius = radius.sqrt()
    angle = u1 * (2.0 * math.pi)
    z = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)
    return z.view(z.shape[0], -1)


def _normal_pairs_words(
    block_low: Tensor, block_high: Tensor | int, seed_low: Tensor, seed_high: Tensor
) -> Tensor:
    """The two normals of each Philox block (arguments as :func:`_uniform_pairs`),
    interleaved as slots, float64 ``[B, 2 count]``, in the word-by-word form: what
    ``compile_philox(box_muller=True)`` compiles (Philox rounds, uniforms and Box–Muller
    in one kernel)."""
    return _box_muller_fused(*_uniform_pairs_words(block_low, block_high, seed_low, seed_high))


_LOOKAHEAD_SLOTS = 1 << 17
"""Normals (per batch) a one-block draw may compute ahead (1 MiB of float64)."""
_LOOKAHEAD_MAX_BLOCKS = 8
"""Blocks per replica a one-block draw computes at most (16 normals: 16 one-normal steps)."""

_COMPILE: dict[str, bool] = {"enabled": False, "box_muller": False}
_COMPILED: dict[str, Callable[..., Any]] = {}  # function name -> its compiled form


def compile_philox(enabled: bool = True, *, box_muller: bool = False) -> None:
    """Draw philox blocks with ``torch.compile``-d kernels: the Philox rounds and the
    uniforms fused in one loop instead of ~75 tensor operations per draw. The integer
    arithmetic is exact, so the streams are bit-identical to the eager ones (slow test
    ``test_compiled_philox_is_bit_identical``). The first draw of each new shape class
    compiles (tens of seconds to minutes on a CPU, needs a C++ compiler there); off by
    default.

    ``box_muller=True`` also compiles the Box–Muller transform of normal draws into the
    kernel. The compiled ``log``/``cos``/``sin`` are not the eager ones: such normals
    differ from the eager (and default compiled) stream's by up to ~2 ulp (measured: 4 %
    of them differ, by at most 2.1 ulp; slow test ``test_fused_box_muller_normals``); they
    remain a per-replica stream, independent of the batch. Uniforms are unchanged.
    """
    _COMPILE["enabled"] = bool(enabled)
    _COMPILE["box_muller"] = bool(enabled and box_muller)


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The ``torch.compile``-d ``fn`` (compiled once per process, shapes dynamic)."""
    key = fn.__name__
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=True)
    return _COMPILED[key]


class ReplicaRNG:
    """``B`` independent random streams, one per replica.

    Each replica's stream depends only on its replica seed ``replica_seed(seed,
    first_replica + i)``, never on ``B`` or on the other replicas.

    Args:
        seed: batch seed ``s``.
        n_replicas: ``B``.
        first_replica: global index of the first replica held here (for sharding a batch
            across processes: rank r holds replicas ``first_replica ... first_replica+B-1``).
        device: where the generators live and draws are made.
        kind: ``"mt19937"`` (one ``torch.Generator`` per replica) or ``"philox"``
            (counter-based, batched); ``None`` takes :func:`default_rng_kind`.

    Attributes:
        kind: the stream kind.
        position: ``"philox"`` only: the next slot of every replica's stream (each
            uniform or normal drawn takes one slot).
    """

    kind = "mt19937"

    def __init__(
        self,
        seed: int,
        n_replicas: int,
        *,
        first_replica: int = 0,
        device: torch.device | str = "cpu",
        kind: str | None = None,
    ) -> None:
        check_int("n_replicas", n_replicas)
        check_int("first_replica", first_replica, minimum=0)
        kind = default_rng_kind() if kind is None else kind
        check_choice("kind", kind, RNG_KINDS)
        self.kind = kind
        self.seed = int(seed)
        self.first_replica = first_replica
        self.device = torch.device(device)
        self._n = n_replicas
        self._generators: list[torch.Generator] | None = None
        if kind == "philox":
            self.position = 0
            self._spare: tuple[int, Tensor] | None = None
            last = replica_seed(self.seed, first_replica + n_replicas - 1)
            if self.seed < 0 or last >= 2**64:
                raise ControlMDError(
                    f"philox streams need replica seeds in [0, 2**64): seed={self.seed} with "
                    f"replicas {first_replica}..{first_replica + n_replicas - 1} gives {last}"
                )
            base = replica_seed(self.seed, first_replica)
            index = torch.arange(n_replicas, dtype=torch.int64, device=self.device)
            # the replica seeds' 32-bit halves (counter words 2 and 3), [B, 1]
            low = (index * SEED_STRIDE + (base & _M32)).view(-1, 1)
            self._seed_words = (low & _M32, ((low >> 32) + (base >> 32)) & _M32)
        else:
            self._generators = self._make_generators()

    def _make_generators(self) -> list[torch.Generator]:
        out = []
        for i in range(self._n):
            g = torch.Generator(device=self.device)
            g.manual_seed(replica_seed(self.seed, self.first_replica + i) % (2**63))
            out.append(g)
        return out

    @property
    def generators(self) -> list[torch.Generator]:
        """One mt19937 ``torch.Generator`` per replica, seeded ``replica_seed(seed, i)``:
        the noise of ``kind="mt19937"`` streams, and, for both kinds, what tasks sample
        initial configurations from replica by replica (built on first use for
        ``"philox"``; they are not part of a philox stream's state)."""
        if self._generators is None:
            self._generators = self._make_generators()
        return self._generators

    @generators.setter
    def generators(self, value: list[torch.Generator]) -> None:
        self._generators = value

    @property
    def n_replicas(self) -> int:
        """``B``."""
        return self._n if self._generators is None else len(self._generators)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """Standard normal draws of shape ``[B, *shape]`` (on :attr:`device`)."""
        if self.kind == "philox":
            z = self._philox_normals(math.prod(shape)).reshape(self.n_replicas, *shape)
            return z if z.dtype == dtype else z.to(dtype)
        return torch.stack(
            [
                torch.randn(shape, generator=g, dtype=dtype, device=self.device)
                for g in self.generators
            ]
        )

    def rand(self, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """Uniform [0, 1) draws of shape ``[B, *shape]`` (on :attr:`device`)."""
        if self.kind == "philox":
            return (
                self._philox_uniforms(math.prod(shape)).reshape(self.n_replicas, *shape).to(dtype)
            )
        return torch.stack(
            [
                torch.rand(shape, generator=g, dtype=dtype, device=self.device)
                for g in self.generators
            ]
        )

    def _block_args(self, first: int, count: int) -> tuple[Tensor, Tensor | int, Tensor, Tensor]:
        """The counter words of blocks ``first ... first+count-1`` of every replica: the
        block index's low word ``[count]`` and high word (an int when all blocks share it,
        else ``[count]``), and the replica seeds' two words ``[B, 1]``."""
        block = torch.arange(first, first + count, dtype=torch.int64, device=self.device)
        high = first >> 32 if (first + count - 1) >> 32 == first >> 32 else block >> 32
        return (block & _M32, high, *self._seed_words)

    def _uniform_kernel(self, count: int) -> Callable[..., tuple[Tensor, Tensor]]:
        """What draws ``count`` blocks per replica as uniform pairs: the compiled kernel
        (:func:`compile_philox`), else the eager form that is faster at this size (both
        give the same bits)."""
        if _COMPILE["enabled"]:
            return _compiled(_uniform_pairs_words)
        return (
            _uniform_pairs
            if count * self.n_replicas < _STACKED_MAX_BLOCKS
            else _uniform_pairs_words
        )

    def _philox_uniforms(self, m: int) -> Tensor:
        """Slots ``position ... position+m-1`` as uniforms ``[B, m]``; advances the stream."""
        p = self.position
        first, last = p // 2, (p + m - 1) // 2
        u0, u1 = self._uniform_kernel(last - first + 1)(*self._block_args(first, last - first + 1))
        u = torch.stack((u0, u1), dim=-1).view(self.n_replicas, -1)[:, p % 2 : p % 2 + m]
        self.position, self._spare = p + m, None
        return u

    def _philox_normals(self, m: int) -> Tensor:
        """Slots ``position ... position+m-1`` as standard normals ``[B, m]`` float64;
        advances the stream. Box–Muller gives a block's two normals together; the normals
        of a draw's blocks that it does not use are kept for the next draws. A draw of one
        block (one or two normals, e.g. a 1-D one-particle step) computes
        :meth:`_lookahead_blocks` blocks at once, whose normals serve the next draws: the
        same slots, the same values (each normal is a function of its block and replica
        alone), for fewer kernel calls."""
        p, parts = self.position, []
        if m == 0:
            return torch.empty(self.n_replicas, 0, dtype=torch.float64, device=self.device)
        spare = self._spare
        self._spare = None
        if spare is not None and spare[0] == p:
            kept = spare[1]  # slots p ... p + kept.shape[1] - 1
            take = min(m, kept.shape[1])
            parts.append(kept[:, :take])
            if take < kept.shape[1]:
                self._spare = (p + take, kept[:, take:])
            p, m = p + take, m - take
        if m > 0:
            first, last = p // 2, (p + m - 1) // 2
            count = last - first + 1
            if count == 1 and not _COMPILE["box_muller"]:  # the fused kernel's normals are
                # not all computed alike at every shape (vector body, scalar tail): kept as is
                count = self._lookahead_blocks()
            args = self._block_args(first, count)
            if _COMPILE["box_muller"]:
                z = _compiled(_normal_pairs_words)(*args)
            else:
                z = _box_muller(*self._uniform_kernel(count)(*args))
            offset = p % 2
            end = offset + m
            if end < z.shape[1]:
                self._spare = (p + m, z[:, end:])
            parts.append(z[:, offset:end])
        self.position = p + m
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _lookahead_blocks(self) -> int:
        """Blocks a one-block normal draw computes: up to :data:`_LOOKAHEAD_MAX_BLOCKS`,
        while they hold at most :data:`_LOOKAHEAD_SLOTS` normals for the batch (so one
        block at 10^6 replicas, where a draw's dispatch costs nothing beside its work)."""
        return max(1, min(_LOOKAHEAD_MAX_BLOCKS, _LOOKAHEAD_SLOTS // (2 * self.n_replicas)))

    def get_state(self) -> list[Tensor]:
        """Per-replica stream states, for exact-resume checkpoints (mt19937: generator
        states; philox: the slot position, a one-element int64 tensor per replica)."""
        if self.kind == "philox":
            return [torch.tensor([self.position], dtype=torch.int64)] * self.n_replicas
        return [g.get_state() for g in self.generators]

    def set_state(self, states: list[Tensor]) -> None:
        """Restore states from :meth:`get_state`."""
        if len(states) != self.n_replicas:
            raise ValueError(
                f"RNG state holds {len(states)} replicas, this ReplicaRNG has {self.n_replicas}"
            )
        if self.kind == "philox":
            positions = {int(s.reshape(-1)[0]) for s in states}
            if len(positions) != 1 or any(s.numel() != 1 for s in states):
                raise ValueError("a philox RNG state holds one common position for all replicas")
            self.position, self._spare = positions.pop(), None
            return
        for g, s in zip(self.generators, states):
            g.set_state(s)

    def restored(self, states: list[Tensor]) -> ReplicaRNG:
        """A new RNG of the same kind and replicas holding ``states`` (``self`` untouched):
        replays a stretch of every stream, e.g. in a recomputed checkpoint window."""
        new = ReplicaRNG(
            self.seed,
            self.n_replicas,
            first_replica=self.first_replica,
            device=self.device,
            kind=self.kind,
        )
        new.set_state(states)
        return new

    def select(self, index: int) -> ReplicaRNG:
        """A one-replica RNG continuing replica ``index``'s stream. mt19937: it shares the
        replica's generator (their states advance together); philox: an independent copy at
        the current position (the batch's position is shared by all its replicas)."""
        if self.kind == "philox":
            new = ReplicaRNG(
                self.seed,
                1,
                first_replica=self.first_replica + index,
                device=self.device,
                kind="philox",
            )
            new.position = self.position
            return new
        new = ReplicaRNG.__new__(ReplicaRNG)
        new.seed = self.seed
        new.first_replica = self.first_replica + index
        new.device = self.device
        new._n = 1
        new._generators = [self.generators[index]]
        return new
