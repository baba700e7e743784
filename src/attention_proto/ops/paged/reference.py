"""Plain-PyTorch paged decode attention: the ground truth for the paged kernels.

The paged KV cache (see :mod:`attention_proto.ops.paged.cache`):

- ``k_cache``/``v_cache``: a pool of pages ``[num_pages, page_size, Hkv, D]``
  (token-major inside a page, "NHD"; the head-major layout
  ``[num_pages, Hkv, page_size, D]`` is accepted as its ``.transpose(1, 2)``
  view, since everything reads through strides);
- ``block_table`` ``[B, max_pages]`` (int32/int64): page ``p`` of sequence ``b``
  holds its tokens ``p * page_size ... p * page_size + page_size - 1``;
- ``seq_lens`` ``[B]``: tokens of sequence ``b``, the queries included.

Queries ``q [B, Hq, Nq, D]`` are the last ``Nq`` tokens of their sequence:
query ``i`` of sequence ``b`` sits at position ``seq_lens[b] - Nq + i`` and
sees keys up to and including that position (causal, bottom-right aligned
within the sequence). Every other modifier is that of the dense reference
(:func:`attention_proto.ops.dense.reference.attention_reference`), which this
module calls once per sequence on the gathered, contiguous K/V.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..dense.reference import attention_reference


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor) -> List[torch.Tensor]:
    """Each sequence's tokens from the pool, contiguous: a list of ``[Hkv, seq_len, D]`` tensors."""
    page_size = cache.shape[1]
    lens = [int(x) for x in seq_lens.tolist()]
    bt = block_table.to("cpu", torch.long)
    out = []
    for b, n in enumerate(lens):
        npages = -(-n // page_size)
        pages = bt[b, :npages].to(cache.device)
        toks = cache.index_select(0, pages).reshape(npages * page_size, cache.shape[2], cache.shape[3])[:n]
        out.append(toks.transpose(0, 1))
    return out


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    window: Optional[Sequence[Optional[int]] | int] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paged decode attention, one sequence at a time, on the CPU.

    Args:
        q: ``[B, Hq, Nq, D]``, the last Nq tokens of each sequence.
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` (any strides).
        block_table: ``[B, max_pages]`` page ids.
        seq_lens: ``[B]`` sequence lengths (queries included).
        scale, softcap, alibi_slopes, window: as in the dense reference.
        compute_dtype: float64 for the ground truth; the low dtype for "PyTorch's own error".

    Returns:
        ``(out [B, Hq, Nq, D], lse [B, Hq, Nq])`` in ``compute_dtype`` (CPU); rows that see no
        key (a sequence shorter than Nq) give out 0 and lse -inf.
    """
    ks = gather_kv(k_cache, block_table, seq_lens)
    vs = gather_kv(v_cache, block_table, seq_lens)
    B, Hq, Nq, D = q.shape
    outs, lses = [], []
    for b in range(B):
        o, lse = attention_reference(
            q[b : b + 1], ks[b][None], vs[b][None], causal=True, scale=scale, window=window,
            softcap=softcap, alibi_slopes=alibi_slopes, compute_dtype=compute_dtype,
        )
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 0)
