"""Hopper path of the packed (varlen) dense forward: TMA loads of q/k/v, pointer stores of the output.

Packed q [Tq, H, D], k/v [Tk, Hkv, D] with ``cu_seqlens``: one program per (query block of a
sequence, batch * head), as in the portable kernel (:mod:`.forward`), but q, k and v tiles arrive
through 3-D tensor descriptors (block ``[BLOCK, 1, D]`` at token ``start + offset`` and head ``h``)
and the KV loop is software-pipelined like :mod:`.forward_tma`'s.

A tile that runs past its sequence's end reads the next sequence's tokens (or TMA's zero fill
past the tensor): the key bound of :func:`.common.apply_mask` removes those keys from the scores,
their V rows are zeroed in the masked tail blocks (so that a NaN or inf of another sequence never
meets a zero probability), and query rows past the end are never stored. The output goes out
through masked pointer stores -- a TMA store of a full tile would overwrite the next sequence's
rows.

Subset (:func:`supports`): what :func:`.forward_tma.supports` requires (Hopper, fp16/bf16, D a
power of two in [16, 256], last dim contiguous, 16-byte alignment), no RoPE (the portable kernel
rotates per sequence). Causal, window, softcap, ALiBi, GQA and the hooks are supported.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import WINDOW_UNBOUNDED, kv_block_range
from .configs import FwdConfig
from .forward import alibi_lse_shift, attn_step
from .forward_tma import device_and_tensor_reasons, tma_constexprs


@triton.jit
def _kv_tile(desc_k, desc_v, k0, start_n, hk, seqlen_k,
             BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TAIL: tl.constexpr):
    k = desc_k.load([k0 + start_n, hk, 0]).reshape([BLOCK_N, HEAD_DIM])
    v = desc_v.load([k0 + start_n, hk, 0]).reshape([BLOCK_N, HEAD_DIM])
    if TAIL:
        # rows past this sequence belong to the next one: their p is 0, but 0 * inf/NaN is NaN
        v = tl.where((start_n + tl.arange(0, BLOCK_N) < seqlen_k)[:, None], v, 0.0)
    return k, v


@triton.jit
def _fwd_tma_varlen_kernel(
    desc_q, desc_k, desc_v, O, LSE, ALIBI, CU_Q, CU_K,
    som, soh, sod, slh, slm, H, GROUP, num_m_blocks,
    sm_scale, qk_scale2, softcap, win_left, win_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, USE_NATURAL: tl.constexpr, HAS_HOOKS: tl.constexpr,
    REVERSE_M: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if REVERSE_M:
        pid_m = num_m_blocks - 1 - pid_m
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q0 = tl.load(CU_Q + b)
    seqlen_q = tl.load(CU_Q + b + 1) - q0
    k0 = tl.load(CU_K + b)
    seqlen_k = tl.load(CU_K + b + 1) - k0
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    off = seqlen_k - seqlen_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = desc_q.load([q0 + m0, h, 0]).reshape([BLOCK_M, HEAD_DIM])
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + h)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, full_lo, full_hi, hi = kv_block_range(m0, seqlen_q, seqlen_k, win_left, win_right,
                                              BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    if HAS_WINDOW:
        for start_n in tl.range(lo, full_lo, BLOCK_N, num_stages=NUM_STAGES):
            k, v = _kv_tile(desc_k, desc_v, k0, start_n, hk, seqlen_k, BLOCK_N, HEAD_DIM, True)
            acc, l_i, m_i = attn_step(
                acc, l_i, m_i, q, k, v, b, h, offs_m, start_n + tl.arange(0, BLOCK_N), seqlen_k, off,
                sm_scale, qk_scale2, softcap, slope, start_n - m0 - off, win_left, win_right, True, IS_CAUSAL, HAS_WINDOW,
                HAS_SOFTCAP, HAS_ALIBI, SCORE_MOD, MASK_MOD, USE_NATURAL, HAS_HOOKS, "tf32", None, None, False)
    for start_n in tl.range(full_lo, full_hi, BLOCK_N, num_stages=NUM_STAGES):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k, v = _kv_tile(desc_k, desc_v, k0, start_n, hk, seqlen_k, BLOCK_N, HEAD_DIM, False)
        acc, l_i, m_i = attn_step(
            acc, l_i, m_i, q, k, v, b, h, offs_m, start_n + tl.arange(0, BLOCK_N), seqlen_k, off,
            sm_scale, qk_scale2, softcap, slope, start_n - m0 - off, win_left, win_right, False, IS_CAUSAL, HAS_WINDOW,
            HAS_SOFTCAP, HAS_ALIBI, SCORE_MOD, MASK_MOD, USE_NATURAL, HAS_HOOKS, "tf32", None, None, False)
    for start_n in tl.range(full_hi, hi, BLOCK_N, num_stages=NUM_STAGES):
        k, v = _kv_tile(desc_k, desc_v, k0, start_n, hk, seqlen_k, BLOCK_N, HEAD_DIM, True)
        acc, l_i, m_i = attn_step(
            acc, l_i, m_i, q, k, v, b, h, offs_m, start_n + tl.arange(0, BLOCK_N), seqlen_k, off,
            sm_scale, qk_scale2, softcap, slope, start_n - m0 - off, win_left, win_right, True, IS_CAUSAL, HAS_WINDOW,
            HAS_SOFTCAP, HAS_ALIBI, SCORE_MOD, MASK_MOD, USE_NATURAL, HAS_HOOKS, "tf32", None, None, False)
    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    out = acc * (1.0 / l_safe)[:, None]
    rows_ok = offs_m < seqlen_q
    tok = (q0 + offs_m).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = O + tok[:, None] * som + h.to(tl.int64) * soh + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=rows_ok[:, None])
    if LSE is not None:  # None (a constexpr): the caller needs no LSE
        lse = tl.where(l_ok, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        lse = alibi_lse_shift(lse, offs_m, m0, slope, HAS_ALIBI, USE_NATURAL)
        tl.store(LSE + h.to(tl.int64) * slh + tok * slm, lse, mask=rows_ok)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rope: Any = None,
             out: Optional[torch.Tensor] = None, check_device: bool = True,
             config: Optional[FwdConfig] = None) -> List[str]:
    """Reasons the varlen TMA path does not apply (empty list: it applies). q [Tq, H, D], k/v [Tk, Hkv, D].

    ``check_device=False`` skips the GPU checks (the interpreter emulates descriptors).
    """
    reasons = device_and_tensor_reasons(q, k, v, out=out, check_device=check_device, config=config, rank=3,
                                        tokens_dim=0, empty="no tokens (Tq or Tk = 0)")
    if config is not None and config.path == "tma+ws":
        reasons.append("the varlen TMA kernel has no warp-specialized loop (path 'tma+ws')")
    if rope is not None:
        reasons.append("the varlen TMA kernel does not rotate by RoPE itself (positions restart per sequence): set "
                       "forward.PORTABLE_ROPE = 'rotate' (q and k rotated first, then this kernel) or pass a "
                       "portable config")
    return reasons


def varlen_launch_parts(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: Optional[torch.Tensor], *,
    batch: int, max_seqlen_q: int, causal: bool, window: Tuple[int, int], has_softcap: bool, has_alibi: bool,
    score_mod: Any, mask_mod: Any, config: FwdConfig, positive_scale: bool = True,
) -> Tuple[Tuple[int, int], tuple, tuple, tuple, dict]:
    """``(grid, desc_specs, ints_a, ints_b, constexprs)`` of a launch, like :func:`.forward_tma.tma_launch_parts`.

    The kernel's positional arguments: descriptors over q, k, v (``make_descriptor(t, *spec)``),
    out, lse, ALiBi slopes, cu_seqlens_q, cu_seqlens_k, ``ints_a``, the floats (sm_scale,
    sm_scale * log2(e), softcap or 0), ``ints_b``.
    """
    Tq, H, D = q.shape
    Hkv = k.shape[1]
    BM, BN = config.BLOCK_M, config.BLOCK_N
    specs = tuple((list(t.shape), list(t.stride()), [blk, 1, D]) for t, blk in ((q, BM), (k, BN), (v, BN)))
    left, right = window
    num_m = (max_seqlen_q + BM - 1) // BM
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    ints_a = (out.stride(0), out.stride(1), out.stride(2)) + lse_strides + (H, H // Hkv, num_m)
    ints_b = (left if left >= 0 else WINDOW_UNBOUNDED, right if right >= 0 else WINDOW_UNBOUNDED)
    consts = tma_constexprs(D, config, causal, window, has_softcap, has_alibi, score_mod, mask_mod, positive_scale)
    return (num_m, batch * H), specs, ints_a, ints_b, consts
