"""Memo of control reads made without a graph: ``protocol(t)`` read again at the same time.

An integrator step reads a protocol at a few times, and the next step reads one of them
again: Brownian dynamics reads ``u(t_{n+1}^-)`` for the move and, in the next step,
``u(t_{n+1}^-)`` once more for the work's ``E(x_{n+1}, t_{n+1}^-)``. Without a graph
(``torch.no_grad``) the second read may return the first one's tensor: the same values,
bit for bit, without evaluating the protocol (~30 tensor operations for a tabulated trap
centre behind :class:`~controlmd.protocols.Endpoints`) again.

A read is memoized only where that cannot change a result:

* no graph is being built (``torch.is_grad_enabled()`` false; with a graph, sharing one
  node between terms would change the order in which backward sums the gradients);
* the time is a Python number or a 0-d CPU tensor (reading it needs no device
  synchronization), and the memo's key is its exact value;
* every module of the protocol declares ``pure_in_time = True`` (a class attribute, or a
  property of the instance): its ``forward(t)`` is a deterministic function of ``t``, of
  its tensors (parameters, buffers, tensor attributes) and of its plain attributes
  (numbers, strings) only. The protocol kinds of :mod:`controlmd.protocols` declare it;
  any other module (a user's protocol, an MLP's layers, a bare function) is read every
  time, as before;
* nothing about those modules changed since: the key holds each tensor's identity and
  version counter (an optimizer step, an in-place edit or a new tensor assigned all
  change it) and every plain attribute's value; modules with forward hooks, or any global
  forward hook, are never memoized.

The memo keeps the last :data:`MEMO_SIZE` reads of each protocol (held weakly by the
protocol: it goes with the module). A memoized control is shared between the reads that
hit it: treat it as read-only, as every potential here does.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from controlmd.numerics import tensor_key

Tensor = torch.Tensor

__all__ = ["MEMO_SIZE", "memoized_control"]

MEMO_SIZE = 4
"""Reads kept per protocol (a Brownian step needs two: this step's and the previous one's)."""

_SCALARS = frozenset({bool, int, float, str, type(None)})
_SKIP = _SCALARS | {dict, OrderedDict, set}
_MEMO: weakref.WeakKeyDictionary[nn.Module, list[tuple[tuple[Any, ...], list[Any], Tensor]]]
_MEMO = weakref.WeakKeyDictionary()


def _is_pure(module: nn.Module) -> bool:
    flag = getattr(type(module), "pure_in_time", False)
    if isinstance(flag, property):
        return bool(flag.__get__(module))
    return flag is True


def _state_key(root: nn.Module, key: list[Any], refs: list[Any]) -> bool:
    """Append to ``key`` what identifies the state of ``root`` and its submodules: each
    module's class, its plain attributes ``(name, value)``, and the identity, version
    counter and data pointer of each of its tensors (parameters, buffers, tensor
    attributes; ``refs`` keeps them alive so that their identities stay theirs). False when
    a module is not ``pure_in_time`` or has forward hooks. (Types are compared with
    ``type(...)``: ``isinstance`` against ``torch.Tensor`` goes through its metaclass.)"""
    stack = [root]
    while stack:
        module = stack.pop()
        d = module.__dict__
        if not _is_pure(module) or d["_forward_hooks"] or d["_forward_pre_hooks"]:
            return False
        key.append(type(module))
        key.append(tuple([item for item in d.items() if type(item[1]) in _SCALARS]))
        tensors = [v for v in d.values() if type(v) not in _SKIP and issubclass(type(v), Tensor)]
        tensors += [v for v in d["_parameters"].values() if v is not None]
        tensors += [v for v in d["_buffers"].values() if v is not None]
        key.append(tuple([tensor_key(v) for v in tensors]))
        refs += tensors
        children = d["_modules"]
        key.append(len(children))
        stack += [m for m in children.values() if m is not None]
    return True


def _global_hooks() -> bool:
    hooks = nn.modules.module
    return bool(
        getattr(hooks, "_global_forward_hooks", None)
        or getattr(hooks, "_global_forward_pre_hooks", None)
    )


def memoized_control(
    protocol: nn.Module | Callable[[Tensor], Tensor],
    t: Tensor | float,
    like: Tensor,
    read: Callable[[], Tensor],
) -> Tensor:
    """``read()`` (the control ``protocol(t)`` as ``like``'s dtype and device), or the
    tensor an earlier identical read returned where that is safe (module docstring)."""
    if torch.is_grad_enabled() or not isinstance(protocol, nn.Module):
        return read()
    if isinstance(t, Tensor):
        if t.ndim != 0 or t.device.type != "cpu":
            return read()
        t_value = t.item()
    elif isinstance(t, int | float):
        t_value = float(t)
    else:
        return read()
    key: list[Any] = [t_value, like.dtype, like.device, torch.is_inference_mode_enabled()]
    refs: list[Any] = []
    try:
        pure = not _global_hooks() and _state_key(protocol, key, refs)
    except RuntimeError:  # an inference tensor has no version counter
        pure = False
    if not pure:
        return read()
    frozen = tuple(key)
    entries = _MEMO.get(protocol)
    if entries is None:
        entries = _MEMO[protocol] = []
    for entry in entries:
        if entry[0] == frozen:
            return entry[2]
    value = read()
    entries.append((frozen, refs, value))
    if len(entries) > MEMO_SIZE:
        del entries[0]
    return value
