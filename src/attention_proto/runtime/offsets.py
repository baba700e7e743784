"""Host copies of packed-sequence offsets (``cu_seqlens``), kept per tensor.

Validating offsets and planning chunks need their values on the host: one device -> host sync.
A model's layers pass the same ``cu_seqlens`` tensor to every attention call of a step, so the
copy is kept while that tensor lives and is unchanged (same object, same version counter, same
storage): one sync per step instead of one per layer, as fla-core's ``tensor_cache`` does for its
chunk indices. A tensor whose version is not tracked (made under ``torch.inference_mode``) is read
every time, since an in-place change could not be seen.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

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


def clear() -> None:
    with _LOCK:
        _MEMO.clear()
