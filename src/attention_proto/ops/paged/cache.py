"""The paged KV cache: a pool of pages, a block table, lengths, and a Triton append kernel.

Pool layout: ``[num_pages, page_size, Hkv, D]`` per K and V ("NHD" pages, the
layout :func:`paged_attention` documents). ``layout="hnd"`` stores
``[num_pages, Hkv, page_size, D]`` instead and exposes it through the same
``[num_pages, page_size, Hkv, D]`` view (``.transpose(1, 2)``), so callers and
kernels never see the difference except in the strides.

:class:`PagedKVCache` is a small manager for a decode loop: sequence slots,
a free list of pages, ``append`` (allocates pages on the host, then one
launch of the write kernel for the whole batch) and ``attend``. The host keeps
the lengths and page lists, so neither needs a device -> host sync; the
device block table and lengths are refreshed from them after each change.
"""
from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Optional, Sequence, Union

import torch
import triton
import triton.language as tl

import attention_proto  # noqa: F401  (sets TRITON_INTERPRET before kernels are defined)
from attention_proto.runtime.cache import KERNEL_CACHE
from attention_proto.runtime.device import interpreter_mode, kernel_device
from attention_proto.runtime.validation import (
    describe,
    require_dtype,
    require_rank,
    require_same_device,
    require_tensor,
)

from .interface import SUPPORTED_DTYPES, paged_attention

LAYOUTS = ("nhd", "hnd")


class CacheFullError(RuntimeError):
    """No free page (or no free sequence slot) is left in the pool."""


@triton.jit(do_not_specialize=["T", "max_pages", "num_pages"])
def _paged_append_kernel(
    KN, VN, KC, VC, BT, Start, Count,
    T, max_pages, num_pages,
    s_knb, s_knh, s_knt, s_vnb, s_vnh, s_vnt,
    s_kp, s_kt, s_kh, s_vp, s_vt, s_vh,
    s_btb,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (sequence, KV head, block of new tokens): new token t goes to position
    # Start[b] + t, i.e. page BT[b, pos // PAGE_SIZE], slot pos % PAGE_SIZE
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    count = tl.load(Count + b).to(tl.int32)
    pos = tl.load(Start + b).to(tl.int32) + t
    ok = (t < count) & (t < T) & (pos // PAGE_SIZE < max_pages)
    page = tl.load(BT + b * s_btb + pos // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
    ok = ok & (page >= 0) & (page < num_pages)  # a bad page id drops the token: never a write outside the pool
    slot = pos % PAGE_SIZE
    d = tl.arange(0, BLOCK_D)
    m = ok[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(KN + b * s_knb + h * s_knh + t[:, None] * s_knt + d[None, :], mask=m)
    v = tl.load(VN + b * s_vnb + h * s_vnh + t[:, None] * s_vnt + d[None, :], mask=m)
    tl.store(KC + page[:, None] * s_kp + slot[:, None] * s_kt + h * s_kh + d[None, :], k, mask=m)
    tl.store(VC + page[:, None] * s_vp + slot[:, None] * s_vt + h * s_vh + d[None, :], v, mask=m)


def paged_kv_append(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    start: torch.Tensor,
    counts: Optional[torch.Tensor] = None,
) -> None:
    """Write new tokens into the pool, in place (one kernel launch for the batch).

    Args:
        k_new, v_new: ``[B, Hkv, T, D]`` (BHSD, any strides), the cache's dtype.
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` pools (any strides, unit in D).
        block_table: ``[B, max_pages]``; the pages covering the new positions must be there.
        start: ``[B]`` position of the first new token of each sequence (its old length).
        counts: ``[B]`` new tokens per sequence (<= T; the rest of row b is ignored);
            default T for every sequence.

    The block table is not validated here (the manager fills it); tokens whose position
    lies past its ``max_pages`` columns or whose page id lies outside the pool are dropped
    rather than written (never a write outside the pool).
    """
    B, Hkv, T, D = k_new.shape
    page_size = k_cache.shape[1]
    if k_new.stride(3) != 1:
        k_new = k_new.contiguous()
    if v_new.stride(3) != 1:
        v_new = v_new.contiguous()
    if counts is None:
        counts = torch.full((B,), T, dtype=torch.int32, device=k_new.device)
    bd = max(16, 1 << (D - 1).bit_length())
    bt_ = 16 if interpreter_mode() else max(1, min(64, 8192 // bd))
    grid = (B, Hkv, triton.cdiv(T, bt_))
    KERNEL_CACHE.launch(
        _paged_append_kernel, grid,
        k_new, v_new, k_cache, v_cache, block_table, start, counts,
        T, block_table.shape[1], k_cache.shape[0],
        k_new.stride(0), k_new.stride(1), k_new.stride(2), v_new.stride(0), v_new.stride(1), v_new.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        PAGE_SIZE=page_size, HEAD_DIM=D, BLOCK_T=bt_, BLOCK_D=bd, num_warps=4,
    )


class PagedKVCache:
    """A pool of KV pages with sequence slots, for decode loops.

    Args:
        num_pages: pages in the pool.
        page_size: tokens per page (a power of two; 8 to 256 studied).
        num_kv_heads, head_dim: Hkv and D.
        max_seqs: sequence slots (rows of the block table).
        max_pages_per_seq: columns of the block table (default: the whole pool).
        dtype, device: of the pools (default fp16 / the kernel device).
        layout: "nhd" (pages ``[page_size, Hkv, D]``, default) or "hnd" (``[Hkv, page_size, D]``).
        seed: if given, the free list starts in a random order (pages of a sequence are then
            scattered over the pool, as after fragmentation); default: in order.

    Attributes:
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` views of the pools.
        block_table: ``[max_seqs, max_pages_per_seq]`` int32 (unused entries 0).
        seq_lens: ``[max_seqs]`` int32 (0 for free slots).

    Typical loop::

        cache = PagedKVCache(1024, 16, 8, 128, max_seqs=4, dtype=torch.bfloat16)
        ids = [cache.add_sequence() for _ in range(4)]
        cache.append(ids, k_prompt, v_prompt, counts=prompt_lens)   # [4, 8, T, 128]
        for step in range(n):
            cache.append(ids, k_step, v_step)                        # [4, 8, 1, 128]
            out = cache.attend(ids, q_step)                          # [4, 32, 1, 128]
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *, max_seqs: int,
                 max_pages_per_seq: Optional[int] = None, dtype: torch.dtype = torch.float16,
                 device: Optional[Union[str, torch.device]] = None, layout: str = "nhd",
                 seed: Optional[int] = None) -> None:
        for name, val in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim), ("max_seqs", max_seqs)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int; got {val!r}")
        if page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two (8 to 256 studied); got {page_size}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}; got {dtype}")
        device = torch.device(device or kernel_device())
        mp = num_pages if max_pages_per_seq is None else int(max_pages_per_seq)
        if mp < 1:
            raise ValueError(f"max_pages_per_seq must be positive; got {max_pages_per_seq!r}")
        self.num_pages, self.page_size, self.num_kv_heads, self.head_dim = num_pages, page_size, num_kv_heads, head_dim
        self.max_seqs, self.max_pages_per_seq, self.dtype, self.device, self.layout = max_seqs, mp, dtype, device, layout
        if layout == "nhd":
            shape = (num_pages, page_size, num_kv_heads, head_dim)
            self._k = torch.zeros(shape, dtype=dtype, device=device)
            self._v = torch.zeros(shape, dtype=dtype, device=device)
            self.k_cache, self.v_cache = self._k, self._v
        else:
            shape = (num_pages, num_kv_heads, page_size, head_dim)
            self._k = torch.zeros(shape, dtype=dtype, device=device)
            self._v = torch.zeros(shape, dtype=dtype, device=device)
            self.k_cache, self.v_cache = self._k.transpose(1, 2), self._v.transpose(1, 2)
        order = list(range(num_pages))
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(num_pages, generator=g).tolist()
        self._free: Deque[int] = deque(order)
        self._pages: Dict[int, List[int]] = {}
        self._lens: List[int] = [0] * max_seqs
        self._bt_host = torch.zeros(max_seqs, mp, dtype=torch.int32)
        self.block_table = torch.zeros(max_seqs, mp, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)

    # ---- bookkeeping (host) -------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return len(self._free)

    def seq_len(self, seq_id: int) -> int:
        self._require_live(seq_id)
        return self._lens[seq_id]

    def pages(self, seq_id: int) -> List[int]:
        self._require_live(seq_id)
        return list(self._pages[seq_id])

    def add_sequence(self) -> int:
        """Take a free sequence slot (length 0, no pages); returns its id."""
        for s in range(self.max_seqs):
            if s not in self._pages:
                self._pages[s] = []
                self._lens[s] = 0
                return s
        raise CacheFullError(f"all {self.max_seqs} sequence slots are in use; free one first")

    def free(self, seq_id: int) -> None:
        """Release a sequence: its pages go back to the free list, its slot becomes free."""
        self._require_live(seq_id)
        self._free.extend(self._pages.pop(seq_id))
        self._lens[seq_id] = 0
        self._bt_host[seq_id].zero_()
        self._sync_rows([seq_id])

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Make sure the pages for ``num_tokens`` more tokens of ``seq_id`` are allocated."""
        self._require_live(seq_id)
        need = -(-(self._lens[seq_id] + num_tokens) // self.page_size)
        have = self._pages[seq_id]
        if need > self.max_pages_per_seq:
            raise CacheFullError(f"sequence {seq_id} would need {need} pages; the block table holds "
                                 f"{self.max_pages_per_seq} per sequence")
        if need - len(have) > len(self._free):
            raise CacheFullError(f"sequence {seq_id} needs {need - len(have)} more pages; "
                                 f"{len(self._free)} of {self.num_pages} are free")
        while len(have) < need:
            p = self._free.popleft()
            self._bt_host[seq_id, len(have)] = p
            have.append(p)

    def _require_live(self, seq_id: int) -> None:
        if not isinstance(seq_id, int) or seq_id not in self._pages:
            raise ValueError(f"seq_id {seq_id!r} is not a live sequence (live: {sorted(self._pages)})")

    def _sync_rows(self, rows: Sequence[int]) -> None:
        idx = list(rows)
        self.block_table[idx] = self._bt_host[idx].to(self.device)
        self.seq_lens[idx] = torch.tensor([self._lens[i] for i in idx], dtype=torch.int32).to(self.device)

    def batch(self, seq_ids: Sequence[int]):
        """``(block_table [B, max_pages], seq_lens [B])`` rows of ``seq_ids``, on the device."""
        for s in seq_ids:
            self._require_live(s)
        if list(seq_ids) == list(range(len(seq_ids))):
            n = len(seq_ids)
            return self.block_table[:n], self.seq_lens[:n]
        idx = torch.tensor(list(seq_ids), dtype=torch.long, device=self.device)
        return self.block_table.index_select(0, idx), self.seq_lens.index_select(0, idx)

    # ---- device work --------------------------------------------------------------------
    def append(self, seq_ids: Sequence[int], k_new: torch.Tensor, v_new: torch.Tensor,
               counts: Optional[Sequence[int]] = None) -> None:
        """Append new tokens to each sequence of ``seq_ids`` (pages are allocated as needed).

        Args:
            seq_ids: live sequence ids, one per row of ``k_new``.
            k_new, v_new: ``[B, Hkv, T, D]`` in the cache's dtype and device.
            counts: new tokens per sequence (each <= T); default T for all (mixed prompt
                lengths: pad to T and pass the lengths).
        """
        seq_ids = list(seq_ids)
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            require_tensor(name, t)
            require_rank(name, t, 4, "[B, Hkv, T, D]")
            require_dtype(name, t, (self.dtype,))
            require_same_device((name, "cache"), (t, self.k_cache))
        B, Hkv, T, D = k_new.shape
        if tuple(v_new.shape) != tuple(k_new.shape):
            raise ValueError(f"v_new must have k_new's shape {tuple(k_new.shape)}; got {describe(v_new)}")
        if B != len(seq_ids) or Hkv != self.num_kv_heads or D != self.head_dim:
            raise ValueError(f"k_new must be [B={len(seq_ids)}, Hkv={self.num_kv_heads}, T, D={self.head_dim}]; "
                             f"got {describe(k_new)}")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids must be distinct; got {seq_ids}")
        counts = [T] * B if counts is None else [int(c) for c in counts]
        if len(counts) != B or any(c < 0 or c > T for c in counts):
            raise ValueError(f"counts must hold {B} values in [0, T={T}]; got {counts}")
        for s, c in zip(seq_ids, counts):
            self.reserve(s, c)
        starts = [self._lens[s] for s in seq_ids]
        for s, c in zip(seq_ids, counts):
            self._lens[s] += c
        self._sync_rows(seq_ids)
        bt, _ = self.batch(seq_ids)
        paged_kv_append(
            k_new, v_new, self.k_cache, self.v_cache, bt,
            torch.tensor(starts, dtype=torch.int32).to(self.device),
            torch.tensor(counts, dtype=torch.int32).to(self.device),
        )

    def attend(self, seq_ids: Sequence[int], q: torch.Tensor, **kwargs):
        """:func:`paged_attention` of ``q [B, Hq, Nq, D]`` over the sequences ``seq_ids``.

        ``max_seq_len`` and ``total_tokens`` come from the host's lengths (no sync needed to plan);
        other keyword arguments pass through.
        """
        seq_ids = list(seq_ids)
        bt, lens = self.batch(seq_ids)
        kwargs.setdefault("max_seq_len", max(1, max(self._lens[s] for s in seq_ids)))
        kwargs.setdefault("total_tokens", sum(self._lens[s] for s in seq_ids))
        return paged_attention(q, self.k_cache, self.v_cache, bt, lens, **kwargs)
