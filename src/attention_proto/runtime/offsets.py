"""Host copies of packed-sequence offsets (``cu_seqlens``), and other values derived from a tensor, kept per tensor.

Validating offsets and planning chunks need their values on the host: one device -> host sync.
A model's layers pass the same ``cu_seqlens`` tensor to every attention call of a step, so the
copy is kept while that tensor lives and is unchanged (same object, same version counter, same
storage): one sync per step instead of one per layer, as fla-core's ``tensor_cache`` does for its
chunk indices. A tensor whose version is not tracked (made under ``torch.inference_mode``) is read
every time, since an in-place change could not be seen. :func:`derived` keeps any value computed
from a tensor the same way (the transformers integration's per-forward sequence starts of
position_ids, which every layer receives).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

#: how many offset tensors are remembered (the most recently used ones)
MEMO_SIZE = 16


@dataclass
class _Entry:
    ref: Any
    version: Tuple[int, int]
    values: List[int]
    extras: Dict[Any, Any] = field(default_factory=dict)


_MEMO: "OrderedDict[int, _Entry]" = OrderedDict()
_LOCK = threading.Lock()


def _version(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """(version counter, storage address), or None where either is unavailable: inference tensors
    do not track versions, fake and meta tensors have no storage."""
    try:
        return int(t._version), int(t.data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


def host_offsets(t: torch.Tensor) -> Tuple[List[int], Dict[Any, Any]]:
    """(the values of 1-D integer tensor ``t`` as Python ints, a dict kept with them for derived data
    such as chunk plans). Repeated calls with the same unchanged tensor return the same objects
    without a device sync; callers must not modify the list."""
    version = _version(t)
    if version is not None and not torch.compiler.is_compiling():
        with _LOCK:
            e = _MEMO.get(id(t))
            if e is not None and e.ref() is t and e.version == version:
                _MEMO.move_to_end(id(t))
                return e.values, e.extras
    values = [int(x) for x in t.tolist()]
    if version is None or torch.compiler.is_compiling():
        return values, {}
    e = _Entry(weakref.ref(t), version, values)
    with _LOCK:
        _MEMO[id(t)] = e
        _MEMO.move_to_end(id(t))
        while len(_MEMO) > MEMO_SIZE:
            _MEMO.popitem(last=False)
    return e.values, e.extras


_DERIVED: "OrderedDict[Tuple[int, str], Tuple[Any, Tuple[int, int], Any]]" = OrderedDict()


def derived(t: torch.Tensor, name: str, compute: Callable[[torch.Tensor], Any]) -> Any:
    """``compute(t)``, kept under ``name`` while ``t`` lives unchanged (same object, version, storage).

    Computed afresh where keeping it would be unsound or useless: under torch.compile (traced into the
    graph), for tensors without a version counter (inference mode), and while a CUDA graph is being
    captured (a kept result would be baked into every replay, whatever the tensor then holds).
    """
    if torch.compiler.is_compiling():  # first: a tensor's version or storage is not readable in a trace
        return compute(t)
    version = _version(t)
    if version is None or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        return compute(t)
    key = (id(t), name)
    with _LOCK:
        e = _DERIVED.get(key)
        if e is not None and e[0]() is t and e[1] == version:
            _DERIVED.move_to_end(key)
            return e[2]
    value = compute(t)
    with _LOCK:
        _DERIVED[key] = (weakref.ref(t), version, value)
        _DERIVED.move_to_end(key)
        while len(_DERIVED) > MEMO_SIZE:
            _DERIVED.popitem(last=False)
    return value


def clear() -> None:
    with _LOCK:
        _MEMO.clear()
        _DERIVED.clear()
