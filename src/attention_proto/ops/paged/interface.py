"""``paged_attention``: decode attention over a paged KV cache (the public entry point)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from ...runtime.validation import (
    describe,
    require_dtype,
    require_int_tensor,
    require_rank,
    require_same_device,
    require_same_dtype,
    require_tensor,
)
from ..dense.reference import normalize_window
from .decode import paged_decode
from .dispatch import MAX_PARTITIONS, REDUCES, PagedConfig, PagedPlan, plan

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_Q_LEN = 16
MAX_HEAD_DIM = 256


def _check_shapes(q, k_cache, v_cache, block_table, seq_lens, alibi_slopes, softcap, scale) -> None:
    """Host-side checks that need no device sync: ranks, shapes, dtypes, devices, strides."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        require_tensor(name, t)
    require_rank("q", q, 4, "[B, Hq, Nq, D]")
    require_rank("k_cache", k_cache, 4, "[num_pages, page_size, Hkv, D]")
    require_rank("v_cache", v_cache, 4, "[num_pages, page_size, Hkv, D]")
    require_dtype("q", q, SUPPORTED_DTYPES)
    require_same_dtype(("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
    block_table = require_int_tensor("block_table", block_table, rank=2)
    seq_lens = require_int_tensor("seq_lens", seq_lens, rank=1)
    require_same_device(("q", "k_cache", "v_cache", "block_table", "seq_lens"),
                        (q, k_cache, v_cache, block_table, seq_lens))
    B, Hq, Nq, D = q.shape
    num_pages, page_size, Hkv, Dk = k_cache.shape
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)} "
                         f"[num_pages, page_size, Hkv, D]; got {describe(v_cache)}")
    if Dk != D:
        raise ValueError(f"q's head dim ({D}) must equal the cache's ({Dk}); got q {describe(q)}, "
                         f"k_cache {describe(k_cache)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}]; got q {describe(q)}")
    if not 1 <= Nq <= MAX_Q_LEN:
        raise ValueError(f"q must hold 1 to {MAX_Q_LEN} query tokens per sequence (dim 2); got {describe(q)}")
    if B < 1 or Hq < 1 or Hkv < 1 or num_pages < 1:
        raise ValueError(f"empty input: q {describe(q)}, k_cache {describe(k_cache)}")
    if Hq % Hkv != 0:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of the cache's KV heads ({Hkv}) for GQA; "
                         f"got q {describe(q)}, k_cache {describe(k_cache)}")
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size (k_cache dim 1) must be a power of two (8 to 256 are the studied sizes); "
                         f"got {page_size} in {describe(k_cache)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dim, stride 1; got strides "
                             f"{t.stride()} for {describe(t)}")
    if block_table.shape[0] != B:
        raise ValueError(f"block_table must be [B={B}, max_pages]; got {describe(block_table)}")
    if block_table.shape[1] < 1:
        raise ValueError(f"block_table needs at least one page column; got {describe(block_table)}")
    if seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens must be [B={B}]; got {describe(seq_lens)}")
    if alibi_slopes is not None:
        require_tensor("alibi_slopes", alibi_slopes)
        if alibi_slopes.dim() != 1 or alibi_slopes.shape[0] != Hq:
            raise ValueError(f"alibi_slopes must be [Hq={Hq}]; got {describe(alibi_slopes)}")
        require_dtype("alibi_slopes", alibi_slopes, (torch.float32,))
        require_same_device(("q", "alibi_slopes"), (q, alibi_slopes))
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap >= 0):
        raise ValueError(f"softcap must be a non-negative number or None; got {softcap!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None; got {scale!r}")


def _check_contents(q, k_cache, block_table, seq_lens, max_seq_len) -> Tuple[int, int]:
    """Checks of the block table and lengths (one device -> host sync). Returns (max, sum) of seq_lens."""
    B, _, Nq, _ = q.shape
    num_pages, page_size = k_cache.shape[:2]
    max_pages = block_table.shape[1]
    lens = seq_lens.to(torch.int64)
    need = (lens + page_size - 1) // page_size  # pages each sequence uses
    col = torch.arange(max_pages, device=block_table.device)[None, :]
    used = col < need[:, None]
    bt = block_table.to(torch.int64)
    bad = used & ((bt < 0) | (bt >= num_pages))
    stats = torch.stack([lens.max(), lens.min(), bad.any().to(torch.int64), lens.sum()]).tolist()
    lmax, lmin, any_bad, total = stats
    if lmin < Nq:
        b = int(torch.nonzero(lens < Nq)[0, 0])
        raise ValueError(f"seq_lens[{b}] = {int(lens[b])} is shorter than the {Nq} query tokens of q "
                         f"(queries are the last Nq tokens of their sequence)")
    if lmax > max_pages * page_size:
        b = int(torch.argmax(lens))
        raise ValueError(f"seq_lens[{b}] = {lmax} is longer than its pages: block_table has {max_pages} "
                         f"pages of {page_size} tokens ({max_pages * page_size} tokens) per sequence")
    if any_bad:
        b, p = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(f"block_table[{b}, {p}] = {int(bt[b, p])} points outside the pool of {num_pages} "
                         f"pages (k_cache {describe(k_cache)}); sequence {b} uses its first {int(need[b])} pages")
    if max_seq_len is not None and max_seq_len < lmax:
        raise ValueError(f"max_seq_len={max_seq_len} is below the longest sequence (seq_lens max {lmax})")
    return int(lmax), int(total)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    window: Optional[Union[int, Sequence[Optional[int]]]] = None,
    version: str = "auto",
    num_partitions: Optional[int] = None,
    max_seq_len: Optional[int] = None,
    total_tokens: Optional[int] = None,
    check_inputs: bool = True,
    return_lse: bool = False,
    config: Optional[PagedConfig] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Decode attention over a paged KV cache, 1 to 16 query tokens per sequence (forward only).

    Layout: the pool ``k_cache``/``v_cache`` is ``[num_pages, page_size, Hkv, D]`` ("NHD"
    pages: the tokens of a page, each with its KV heads); a head-major pool
    ``[num_pages, Hkv, page_size, D]`` is accepted as its view ``pool.transpose(1, 2)``
    (the kernels read through strides; D must have stride 1). ``page_size`` is a power of
    two (8 to 256 studied). Sequence ``b`` keeps token ``t`` in page
    ``block_table[b, t // page_size]``, slot ``t % page_size``.

    Args:
        q: ``[B, Hq, Nq, D]``, fp16/bf16/fp32, Nq <= 16: the last Nq tokens of each sequence
            (decode: Nq = 1; speculative decoding and chunked prefill: up to 16). Query ``i``
            sits at position ``seq_lens[b] - Nq + i`` and sees keys up to it (causal,
            bottom-right within the sequence).
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``, q's dtype; Hq % Hkv == 0 and
            query head h reads KV head ``h // (Hq // Hkv)`` (GQA/MQA).
        block_table: ``[B, max_pages]`` int32/int64 page ids.
        seq_lens: ``[B]`` int32/int64 tokens per sequence (queries included), mixed lengths ok.
        scale: softmax scale (default 1/sqrt(D)).
        softcap: ``s = c * tanh(s / c)`` after scaling (None or 0: off).
        alibi_slopes: ``[Hq]`` fp32; ``s -= slope_h * |pos_i - j|`` after the softcap.
        window: sliding window, an int ``left`` or ``(left, right)`` as the dense kernel
            (key j allowed iff ``pos_i - left <= j``; the right side is moot under causal).
        version: "auto" (see :func:`attention_proto.ops.paged.dispatch.plan`), "v1" or "v2".
        num_partitions: V2's partition count (default: chosen from the shape and SM count).
        max_seq_len: an upper bound of ``seq_lens`` known on the host (sizes V2's partitions
            without a sync); default: ``seq_lens.max()`` when ``check_inputs``, else the block
            table's capacity ``max_pages * page_size``. A value below the longest sequence
            silently drops keys when ``check_inputs=False``.
        total_tokens: the sum of ``seq_lens`` known on the host (mixed lengths: V2's partitions
            are sized by the batch's work, not by its longest sequence alone); default: from
            ``seq_lens`` when ``check_inputs`` (the same sync), else every sequence counts as
            ``max_seq_len`` long. Only the plan uses it: any value gives correct results.
        check_inputs: run the content checks (on by default): every page id that a sequence
            uses lies in ``[0, num_pages)``, ``Nq <= seq_lens[b] <= max_pages * page_size``,
            ``max_seq_len >= max(seq_lens)``. They read ``block_table`` and ``seq_lens`` back
            to the host (one device -> host sync): switch them off for speed (CUDA graphs,
            serving loops). Shape/dtype/device checks always run. With the checks off the
            kernel still never reads outside the pool or the block table: tokens past
            ``max_pages * page_size`` are masked and page ids are clamped into the pool (a bad
            id gives wrong values, not a fault).
        return_lse: also return the natural-log LSE ``[B, Hq, Nq]`` (fp32; -inf where a row
            sees no key).
        config: tile and merge override (:class:`PagedConfig`; ``reduce="kernel"`` gives V2's
            two-launch merge instead of the fused one), for tuning sweeps.

    Returns:
        ``out [B, Hq, Nq, D]`` in q's dtype, or ``(out, lse)`` with ``return_lse``.

    Raises:
        TypeError / ValueError naming the argument, what was received and what is supported.
    """
    _check_shapes(q, k_cache, v_cache, block_table, seq_lens, alibi_slopes, softcap, scale)
    # the kernels index these small side tensors as contiguous arrays: a strided view is copied
    block_table, seq_lens = block_table.contiguous(), seq_lens.contiguous()
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.contiguous()
    B, Hq, Nq, D = q.shape
    num_pages, page_size, Hkv, _ = k_cache.shape
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ValueError(f"max_seq_len must be a positive int or None; got {max_seq_len!r}")
    if num_partitions is not None and (not isinstance(num_partitions, int) or not 1 <= num_partitions <= MAX_PARTITIONS):
        raise ValueError(f"num_partitions must be an int in [1, {MAX_PARTITIONS}] or None; got {num_partitions!r}")
    try:
        left, _right = normalize_window(window)
    except (TypeError, ValueError) as e:
        raise ValueError(f"window must be None, an int or a (left, right) pair; got {window!r}") from e
    if total_tokens is not None and (not isinstance(total_tokens, int) or total_tokens < 0):
        raise ValueError(f"total_tokens must be a non-negative int or None; got {total_tokens!r}")
    if config is not None and not isinstance(config, PagedConfig):
        raise TypeError(f"config must be a PagedConfig or None; got {type(config).__name__}")
    if config is not None and config.reduce not in REDUCES:
        raise ValueError(f"config.reduce must be one of {', '.join(map(repr, REDUCES))}; got {config.reduce!r}")
    if check_inputs:
        longest, total = _check_contents(q, k_cache, block_table, seq_lens, max_seq_len)
        bound = max_seq_len if max_seq_len is not None else longest
        if total_tokens is None:
            total_tokens = total
    else:
        bound = max_seq_len if max_seq_len is not None else block_table.shape[1] * page_size
    p: PagedPlan = plan(
        batch=B, num_q_heads=Hq, num_kv_heads=Hkv, q_len=Nq, head_dim=D, max_seq_len=max(1, bound),
        total_tokens=total_tokens, window=window, version=version, num_partitions=num_partitions,
        elem_bytes=q.element_size(), config=config,
    )
    if q.stride(3) != 1:
        q = q.contiguous()
    out, lse = paged_decode(
        q, k_cache, v_cache, block_table, seq_lens, p,
        scale=(1.0 / math.sqrt(D)) if scale is None else float(scale),
        softcap=softcap if softcap else None, alibi_slopes=alibi_slopes, window_left=left,
    )
    return (out, lse) if return_lse else out


def explain(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, *, max_seq_len: int,
            total_tokens: Optional[int] = None, window=None, version: str = "auto",
            num_partitions: Optional[int] = None, config: Optional[PagedConfig] = None) -> PagedPlan:
    """The plan :func:`paged_attention` would use for these inputs (no launch, no sync).

    Pass ``total_tokens`` (the sum of ``seq_lens``) to see the plan of a checked call
    (``check_inputs=True`` computes it) or of a call given it."""
    B, Hq, Nq, D = q.shape
    return plan(batch=B, num_q_heads=Hq, num_kv_heads=k_cache.shape[2], q_len=Nq, head_dim=D,
                max_seq_len=max_seq_len, total_tokens=total_tokens, window=window, version=version,
                num_partitions=num_partitions, elem_bytes=q.element_size(), config=config)
