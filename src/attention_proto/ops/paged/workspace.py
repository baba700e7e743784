"""Zeroed int32 counters for the fused split-KV merge (one per sequence x KV head x row block).

The fused kernel needs its counters at zero when it starts and leaves them at zero
when it ends (the merging program resets its counter). Where they come from:

- **eager calls**: a fresh ``torch.zeros`` per call (one small memset on the
  call's stream). Nothing is shared between calls, so calls on different
  streams or threads never race on a counter.
- **CUDA-graph capture**: a memset captured into the graph would run at every
  replay, costing about what the fused merge saves. A capture instead takes a
  slice of a per-device slab that was zeroed eagerly (on the first eager fused
  call on that device); every slice belongs to one captured call for good, and
  the kernel leaves it at zero after each replay. Replaying one graph on two
  streams at once is already unsafe (a graph's buffers are fixed); two
  different graphs never share counters. When no slab exists yet (a capture
  before any eager call) or it is used up, the capture falls back to
  ``torch.zeros`` (a memset node: correct, slightly slower).
"""
from __future__ import annotations

import threading
from typing import Dict

import torch

#: counters per device slab for captured calls (4 MB): 16k captured calls at B8 x Hkv 8, 1k at B128
SLAB_COUNTERS = 1 << 20


class _Slab:
    def __init__(self, device: torch.device) -> None:
        self.buf = torch.zeros(SLAB_COUNTERS, dtype=torch.int32, device=device)
        # the zeros must have landed before any graph that uses them can replay, on any stream
        torch.cuda.synchronize(device)
        self.used = 0


_LOCK = threading.Lock()
_SLABS: Dict[int, _Slab] = {}


def _capturing() -> bool:
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:  # noqa: BLE001 - no CUDA: never capturing
        return False


def merge_counters(n: int, device: torch.device) -> torch.Tensor:
    """``n`` int32 counters, zero at launch time (see the module docstring for their origin)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.zeros(n, dtype=torch.int32, device=device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if not _capturing():
        with _LOCK:
            if idx not in _SLABS:
                try:
                    _SLABS[idx] = _Slab(torch.device("cuda", idx))
                except RuntimeError:  # e.g. another thread is capturing (no sync allowed): try next time
                    pass
        return torch.zeros(n, dtype=torch.int32, device=device)
    with _LOCK:
        slab = _SLABS.get(idx)
        if slab is not None and slab.used + n <= SLAB_COUNTERS:
            view = slab.buf[slab.used:slab.used + n]
            slab.used += n
            return view
    return torch.zeros(n, dtype=torch.int32, device=device)


def slab_usage(device: torch.device | int = 0) -> int:
    """Counters handed to captured calls so far on ``device`` (0 without a slab)."""
    idx = device if isinstance(device, int) else (torch.device(device).index or 0)
    slab = _SLABS.get(idx)
    return 0 if slab is None else slab.used
