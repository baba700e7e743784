"""Dense forward with run-time modifier flags: one compiled kernel for every modifier combination.

Variant (b) of study 2 (stitching) and the "run-time arguments instead of constexprs" half of
study 4 (constants). The math is :mod:`.forward`'s (same online softmax, same block ranges, same
``common.py`` helpers); what changes is *when* the modifiers are decided:

- causal, the sliding window (left, right), softcap and ALiBi are kernel arguments read at run
  time. Causal is folded into the window inside the kernel (a right bound of 0, bottom-right
  aligned), so one block-range computation (:func:`.common.kv_block_range` with a window) serves
  every mask combination; unbounded sides are :data:`.common.WINDOW_UNBOUNDED`. Softcap and ALiBi
  are one-sided ``if`` branches on run-time ints around the score tile (uniform per program); the
  scores stay in log2 units with pre-scaled constants, so the plain path does no extra work
  beyond the branch tests, and the compiler must keep registers for the modifier code it may run.
- optionally HEAD_DIM too (``runtime_head_dim=True``): the tile width BLOCK_D is then fixed at a
  maximum (128 or 256) and every K/V/Q/O column is masked against the run-time head dim.
- block sizes (BLOCK_M, BLOCK_N, BLOCK_D), num_warps and num_stages stay compile-time: ``tl.arange``,
  ``tl.zeros`` and ``tl.dot`` need shapes known when the kernel is compiled, so tiles cannot be
  run-time arguments in Triton (only a fixed maximum with masks, as for HEAD_DIM).

Triton specializes integer arguments equal to 1 (as constants) and divisible by 16 (alignment);
the flag and window arguments are listed in ``do_not_specialize`` so that ``is_causal=1`` or a
window of 1024 does not silently compile a separate variant. Not supported here: RoPE, varlen,
score_mod/mask_mod hooks (use :func:`.forward.flash_attention_forward`).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...runtime.cache import KERNEL_CACHE
from ...runtime.validation import (describe, require_dtype, require_rank, require_same_device, require_same_dtype,
                                   require_tensor)
from .common import WINDOW_UNBOUNDED, apply_mask, kv_block_range, load_tile, tanh_f32
from .configs import FwdConfig, block_d, pick_forward_config
from .forward import _next_pow2, normalize_window_arg, resolve_alibi

_LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: the widths a run-time head dim may be padded to (the kernel's fixed BLOCK_D)
MAX_BLOCK_DS = (64, 128, 256)


@triton.jit
def _load_rows(base, rows, n_rows, stride_row, stride_col, head_dim,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """``base[rows, :head_dim]`` as a [len(rows), BLOCK_D] tile; HEAD_DIM == 0 means run-time head_dim."""
    if HEAD_DIM == 0:
        cols = tl.arange(0, BLOCK_D)
        ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
        if CHECK_ROWS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < head_dim), other=0.0)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < head_dim, other=0.0)
    else:
        x = load_tile(base, rows, n_rows, stride_row, stride_col, HEAD_DIM, BLOCK_D, CHECK_ROWS)
    return x


@triton.jit
def _rt_step(acc, l_i, m_i, q, k, v, offs_m, offs_n, seqlen_k, off,
             qk_scale2, softcap2, slope2, win_left, win_right, has_softcap, has_alibi,
             MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax update; the score modifiers are run-time branches (see the module doc)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    # log2 units throughout: softcap2 = c * log2(e) and slope2 = slope * log2(e), so the plain path
    # keeps the single multiply of the constexpr kernel. (An if/else choosing between natural and
    # log2 scaling fails triton 3.6's Hopper pipeliner at num_stages > 1; one-sided ifs compile.)
    s = qk * qk_scale2
    if has_softcap != 0:
        s = softcap2 * tanh_f32(s / softcap2)
    if has_alibi != 0:
        dist = offs_m[:, None] + off - offs_n[None, :]
        dist = tl.where(dist < 0, -dist, dist)
        s = s - slope2 * dist.to(tl.float32)
    if MASKED:
        # causal is already folded into win_right: the window form covers every mask
        s = apply_mask(s, offs_m, offs_n, seqlen_k, off, win_left, win_right, False, True, True)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["is_causal", "win_left", "win_right", "has_softcap", "has_alibi", "head_dim"])
def _fwd_runtime_kernel(
    Q, K, V, O, LSE, ALIBI,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, slb, slh, slm,
    seqlen_q, seqlen_k, H, GROUP, num_m_blocks,
    qk_scale2, softcap2, is_causal, win_left, win_right, has_softcap, has_alibi, head_dim,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if is_causal != 0:
        # the last query blocks see the most keys; start them first
        pid_m = num_m_blocks - 1 - pid_m
        win_right = tl.minimum(win_right, 0)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    off = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q_base = Q + b64 * sqb + h64 * sqh
    k_base = K + b64 * skb + hk64 * skh
    v_base = V + b64 * svb + hk64 * svh
    offs_m = m0 + tl.arange(0, BLOCK_M)
    # the row bound is a shape property the constexpr kernel specializes on; here it is always checked
    q = _load_rows(q_base, offs_m, seqlen_q, sqm, sqd, head_dim, HEAD_DIM, BLOCK_D, True)
    slope2 = 0.0
    if has_alibi != 0:
        slope2 = tl.load(ALIBI + h) * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = kv_block_range(m0, seqlen_q, seqlen_k, win_left, win_right,
                                              BLOCK_M, BLOCK_N, False, True)
    for start_n in range(lo, full_lo, BLOCK_N):  # leading band of a left window: masked
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, seqlen_k, skn, skd, head_dim, HEAD_DIM, BLOCK_D, True)
        v = _load_rows(v_base, offs_n, seqlen_k, svn, svd, head_dim, HEAD_DIM, BLOCK_D, True)
        acc, l_i, m_i = _rt_step(acc, l_i, m_i, q, k, v, offs_m, offs_n, seqlen_k, off, qk_scale2,
                                 softcap2, slope2, win_left, win_right, has_softcap, has_alibi,
                                 True, DOT_PREC)
    for start_n in range(full_lo, full_hi, BLOCK_N):  # mask-free middle
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, seqlen_k, skn, skd, head_dim, HEAD_DIM, BLOCK_D, False)
        v = _load_rows(v_base, offs_n, seqlen_k, svn, svd, head_dim, HEAD_DIM, BLOCK_D, False)
        acc, l_i, m_i = _rt_step(acc, l_i, m_i, q, k, v, offs_m, offs_n, seqlen_k, off, qk_scale2,
                                 softcap2, slope2, win_left, win_right, has_softcap, has_alibi,
                                 False, DOT_PREC)
    for start_n in range(full_hi, hi, BLOCK_N):  # diagonal band / right window / ragged tail: masked
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, seqlen_k, skn, skd, head_dim, HEAD_DIM, BLOCK_D, True)
        v = _load_rows(v_base, offs_n, seqlen_k, svn, svd, head_dim, HEAD_DIM, BLOCK_D, True)
        acc, l_i, m_i = _rt_step(acc, l_i, m_i, q, k, v, offs_m, offs_n, seqlen_k, off, qk_scale2,
                                 softcap2, slope2, win_left, win_right, has_softcap, has_alibi,
                                 True, DOT_PREC)
    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_ok, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    offs_d = tl.arange(0, BLOCK_D)
    o_ptrs = O + b64 * sob + h64 * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    if HEAD_DIM == 0:
        d_ok = offs_d[None, :] < head_dim
    else:
        d_ok = offs_d[None, :] < HEAD_DIM
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & d_ok)
    tl.store(LSE + b64 * slb + h64 * slh + offs_m * slm, lse, mask=offs_m < seqlen_q)


def _check(q: Any, k: Any, v: Any) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_tensor(name, t)
        require_rank(name, t, 4, "[B, H, N, D]")
        require_dtype(name, t, SUPPORTED_DTYPES)
    require_same_dtype(("q", "k", "v"), (q, k, v))
    require_same_device(("q", "k", "v"), (q, k, v))
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k, v must share the batch size and k/v their heads and length; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}); got q "
                         f"{describe(q)}, k {describe(k)}")
    if k.shape[3] != q.shape[3] or v.shape[3] != q.shape[3]:
        raise ValueError(f"q, k, v must share the head dim (Dv != D is not supported); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")


def flash_attention_forward_runtime(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Any = (-1, -1),
    softcap: Optional[float] = None,
    alibi_slopes: Any = None,
    runtime_head_dim: bool = False,
    max_block_d: Optional[int] = None,
    config: Optional[FwdConfig] = None,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense attention forward through the run-time-flag kernel. Returns ``(out, lse)``.

    Shapes: q [B, H, Nq, D], k/v [B, Hkv, Nk, D] (any strides, H % Hkv == 0) -> out [B, H, Nq, D]
    (q's stride order), lse [B, H, Nq] fp32. Semantics are :mod:`.reference`'s: ``causal`` and
    ``window`` (an int = left, or (left, right), -1 unbounded) bottom-right aligned, ``softcap``
    c > 0, ``alibi_slopes`` True or a float tensor [H]; scale defaults to 1/sqrt(D).

    ``runtime_head_dim``: pass D as a run-time argument too; the kernel's tile width is then
    ``max_block_d`` (default 128 for D <= 128, else 256) whatever D is, so one binary serves every
    D up to it. ``config``: a portable :class:`.configs.FwdConfig` (default: the dense picker's
    portable choice for the tile width). fp32 inputs use ``input_precision="ieee"`` dots.
    """
    _check(q, k, v)
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if runtime_head_dim:
        bd = max_block_d if max_block_d is not None else (128 if D <= 128 else 256)
        if bd not in MAX_BLOCK_DS:
            raise ValueError(f"max_block_d must be one of {MAX_BLOCK_DS}; got {max_block_d!r}")
        if D > bd:
            raise ValueError(f"head dim D={D} exceeds max_block_d={bd}; got q {describe(q)}")
    else:
        if max_block_d is not None:
            raise ValueError("max_block_d applies only with runtime_head_dim=True; got "
                             f"max_block_d={max_block_d!r} with runtime_head_dim=False")
        bd = block_d(D)
    if config is None:
        config = pick_forward_config(bd, q.dtype, bool(causal), _next_pow2(max(Nq, Nk)), "portable")
    elif not isinstance(config, FwdConfig) or config.path != "portable":
        raise ValueError(f"config must be a portable FwdConfig (the run-time-flag kernel has no TMA path); "
                         f"got {config!r}")
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32) if lse is None else lse
    if B == 0 or H == 0 or Nq == 0:
        return out, lse
    sm_scale = (1.0 / math.sqrt(D)) if scale is None else float(scale)
    left, right = normalize_window_arg(window)
    has_softcap = softcap is not None and float(softcap) > 0.0
    slopes = resolve_alibi(alibi_slopes, H, q.device)
    BM, BN = config.BLOCK_M, config.BLOCK_N
    num_m = (Nq + BM - 1) // BM
    KERNEL_CACHE.launch(
        _fwd_runtime_kernel, (num_m, B * H),
        q, k, v, out, lse, slopes if slopes is not None else lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        Nq, Nk, H, H // Hkv, num_m,
        sm_scale * _LOG2E, float(softcap) * _LOG2E if has_softcap else 1.0,
        int(bool(causal)), left if left >= 0 else WINDOW_UNBOUNDED, right if right >= 0 else WINDOW_UNBOUNDED,
        int(has_softcap), int(slopes is not None), D,
        HEAD_DIM=0 if runtime_head_dim else D, BLOCK_D=bd, BLOCK_M=BM, BLOCK_N=BN,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse
