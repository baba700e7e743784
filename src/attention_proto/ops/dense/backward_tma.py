"""Hopper fast path of the dense backward: TMA descriptors, pipelined loops, one launch.

What differs from the portable kernels of :mod:`.backward` (same math, same gradients):

- Q, dO, K, V tiles come through host ``TensorDescriptor``s over the 4-D ``[B, H, N, D]``
  tensors (block ``[1, 1, BLOCK, D]``, as :mod:`.forward_tma`): the TMA unit fetches them
  straight into shared memory, where the wgmma reads them, with no per-thread address math.
  Rows past N arrive as zeros. The loops over the streamed tiles are
  ``tl.range(..., num_stages=NUM_STAGES)``, so Triton keeps NUM_STAGES - 1 tiles in flight.
- Larger tiles by default (FlexAttention's on the H100): a dK/dV program owns 128 keys and steps
  over 64 queries (S^T tiles [128, 64]: wgmma 64x64 instead of 64x32, half the shared-memory
  traffic per FLOP when the K/V operand is re-read each step); a dQ program owns 128 queries and
  steps over 64 keys.
- exp2 domain: the preprocess writes ``lse2 = LSE * log2(e)`` (fully masked rows: +inf) next to
  ``delta = rowsum(dO * O)``, both padded to a whole number of blocks (padding rows: lse2 +inf,
  delta 0), so the kernels load them without masks and ``p = exp2(qk * scale * log2(e) - lse2)``
  is one FFMA and one ex2 per element.
- No bound masks: a query row past Nq has lse2 = +inf (p = 0, dS = 0) and zero q/dO, so it adds
  nothing to dK/dV; a key row past Nk has zero k/v, so it adds nothing to dQ (its p is still
  masked, in the one ragged key block, so that exp2 cannot overflow). Blocks that every
  (query, key) pair may see skip the causal/window mask arithmetic: the dQ branch runs masked
  loops over the diagonal/window bands and a mask-free loop over the rest; the dK/dV branch, one
  loop with a run-time branch around the mask (fewer registers, and see :func:`_dkdv_tile`).
- One launch (``fused``): the grid holds both the dK/dV programs and the dQ programs of every
  (batch, kv head); the two kinds alternate in program order, each longest-first under a causal
  mask (a dK/dV program of key block n sees Nq - n queries, a dQ program of query block m sees
  m keys), so the long programs start first and the tail is short. ``fused=False`` launches the
  same kernel twice (dK/dV programs, then dQ programs). Either way every output element is the
  sum of a fixed sequence of tiles computed by one program: bitwise reproducible, no atomics.

Subset (:func:`supports`): CUDA compute capability >= 9 (the interpreter emulates descriptors,
which is how the CPU tests check the indexing), fp16/bf16, D == Dv in (32, 64, 128), last dim
contiguous and 16-byte aligned strides (dO is copied when it is not), no varlen. Causal, window,
softcap, ALiBi, GQA/MQA are supported; RoPE through :func:`.backward.flash_attention_backward`'s
rotate-once passes (this kernel then sees rotated q/k and writes fp32 dq/dk).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

import attention_proto  # noqa: F401  (sets TRITON_INTERPRET before kernels are defined)
from attention_proto.runtime.cache import KERNEL_CACHE
from attention_proto.runtime.device import interpreter_mode

from .common import LOG2E as _LOG2E_F
from .common import WINDOW_UNBOUNDED, kv_block_range, q_block_range, tanh_for
from .forward_tma import _aligned, device_and_tensor_reasons

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - triton < 3.3
    TensorDescriptor = None

TMA_DTYPES = (torch.float16, torch.bfloat16)
TMA_HEAD_DIMS = (32, 64, 128)
LOG2E = tl.constexpr(_LOG2E_F)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _bwd_prep_tma(O, DO, LSE, DELTA, LSE2,
                  stride_ob, stride_oh, stride_om, stride_od, stride_dob, stride_doh, stride_dom, stride_dod,
                  stride_lb, stride_lh, stride_lm, H, nq, n_pad,
                  HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO * O) and lse2 = LSE * log2(e) into padded [B * H, n_pad] fp32 buffers."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_DV)
    ok = rows < nq
    m2 = ok[:, None] & (cols < HEAD_DV)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + cols[None, :] * stride_od,
                mask=m2, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + cols[None, :] * stride_dod,
                 mask=m2, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + rows * stride_lm, mask=ok, other=float("inf"))
    # fully masked rows (LSE -inf) and padding rows (+inf) both get p = exp2(s - inf) = 0
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    out = bh.to(tl.int64) * n_pad + rows
    tl.store(DELTA + out, delta)
    tl.store(LSE2 + out, lse2)


@triton.jit
def _scores2(qk, rel, qk_scale2, th_scale, softcap2, slope2, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
             DTYPE: tl.constexpr):
    """Scores in log2 units and tanh(s / c) (the softcap gradient's factor; ``qk`` when no softcap).

    qk_scale2 = scale * log2(e); th_scale = scale / c; softcap2 = c * log2(e); slope2 = slope * log2(e).
    ``rel`` = query position - key position in the tile's orientation (used by ALiBi only).
    """
    th = qk
    if SOFTCAP:
        th = tanh_for(qk * th_scale, DTYPE)  # the forward's tanh for this dtype
        s = softcap2 * th
    else:
        s = qk * qk_scale2
    if ALIBI:
        s = s - slope2 * tl.abs(rel).to(tl.float32)
    return s, th


@triton.jit
def _dkdv_tile(dk, dv, k, v, q, do, lse2, delta, offs_m, offs_n, off, qk_scale2, th_scale, softcap2, slope2,
               win_left, win_right, MASKED, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """One query tile against the program's keys, transposed (S^T = K Q^T, [BLOCK_N, BLOCK_M]) so that
    P^T and dS^T feed their MMAs straight from registers."""
    rel = offs_m[None, :] + off - offs_n[:, None]
    qkT = tl.dot(k, tl.trans(q))
    sT, thT = _scores2(qkT, rel, qk_scale2, th_scale, softcap2, slope2, SOFTCAP, ALIBI, q.dtype)
    # MASKED is a run-time scalar, and this branch is compiled even where it is never taken (no
    # causal/window: the window bounds are then unbounded): without a branch in the loop body,
    # ptxas for sm_90a (triton 3.6) serializes every wgmma of the kernel (C7515, a wait after
    # each instruction; the pipelined loop carries dK/dV through registers it then copies).
    if MASKED:
        if IS_CAUSAL:
            ok = rel >= 0
        else:
            ok = (rel >= -win_right) & (rel <= win_left)
        sT = tl.where(ok, sT, float("-inf"))
    pT = tl.math.exp2(sT - lse2[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv)
    dpT = tl.dot(v, tl.trans(do))
    dsT = pT * (dpT - delta[None, :])
    if SOFTCAP:
        dsT = dsT * (1.0 - thT * thT)
    dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dq_tile(dq, q, do, k, v, lse2, delta, offs_m, offs_n, nk, off, qk_scale2, th_scale, softcap2, slope2,
             win_left, win_right, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """One key tile against the program's queries ([BLOCK_M, BLOCK_N] orientation)."""
    rel = offs_m[:, None] + off - offs_n[None, :]
    qk = tl.dot(q, tl.trans(k))
    s, th = _scores2(qk, rel, qk_scale2, th_scale, softcap2, slope2, SOFTCAP, ALIBI, q.dtype)
    if MASKED:
        ok = offs_n[None, :] < nk
        if IS_CAUSAL:
            ok = ok & (rel >= 0)
        if HAS_WINDOW:
            ok = ok & (rel >= -win_right) & (rel <= win_left)
        s = tl.where(ok, s, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - th * th)
    dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _dkdv_program(desc_q, desc_k, desc_v, desc_do, desc_lse, desc_delta, DK, DV, SLOPES, b, hkv, pid_n,
                  stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                  stride_sb, nq, nk, H, GROUP, qk_scale2, th_scale, softcap2, scale, win_left, win_right,
                  IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    """dK, dV of keys [n0, n0 + BLOCK_N) of one kv head, summed over the query heads of its group."""
    n0 = pid_n * BLOCK_N
    off = nk - nq  # bottom-right alignment: query i sits at key position i + off
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = desc_k.load([b, hkv, n0, 0]).reshape([BLOCK_N, HEAD_DIM])
    v = desc_v.load([b, hkv, n0, 0]).reshape([BLOCK_N, HEAD_DIM])
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # query blocks [lo, hi); [full_lo, full_hi) see every key of the block: no mask there
    lo, hi = q_block_range(n0, nq, nk, win_left, win_right, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = lo
    full_hi = hi
    if IS_CAUSAL or HAS_WINDOW:
        # every row sees the block's last key: m0 + off + right >= n0 + BLOCK_N - 1 (right = 0 if causal)
        first = n0 + BLOCK_N - 1 - off
        if HAS_WINDOW:
            first = first - win_right
        first = tl.maximum(first, 0)
        full_lo = tl.minimum(tl.maximum(((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo), hi)
    if HAS_WINDOW:
        # every row sees the block's first key: m0 + BLOCK_M - 1 + off - left <= n0
        last = tl.maximum(n0 - off + win_left + 1, 0)
        full_hi = tl.maximum(tl.minimum((last // BLOCK_M) * BLOCK_M, hi), full_lo)

    for g in range(0, GROUP):
        h = hkv * GROUP + g
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(SLOPES + b.to(tl.int64) * stride_sb + h).to(tl.float32) * LOG2E
        bh = b * H + h
        for start_m in tl.range(lo, hi, BLOCK_M, num_stages=NUM_STAGES):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = desc_q.load([b, h, start_m, 0]).reshape([BLOCK_M, HEAD_DIM])
            do = desc_do.load([b, h, start_m, 0]).reshape([BLOCK_M, HEAD_DIM])
            lse2 = desc_lse.load([bh, start_m]).reshape([BLOCK_M])
            delta = desc_delta.load([bh, start_m]).reshape([BLOCK_M])
            dk, dv = _dkdv_tile(dk, dv, k, v, q, do, lse2, delta, offs_m, offs_n, off, qk_scale2, th_scale,
                                softcap2, slope2, win_left, win_right, (start_m < full_lo) | (start_m >= full_hi),
                                IS_CAUSAL, HAS_WINDOW, SOFTCAP, ALIBI)

    b64 = b.to(tl.int64)
    cols = tl.arange(0, HEAD_DIM)
    n_ok = (offs_n < nk)[:, None]
    tl.store(DK + b64 * stride_dkb + hkv * stride_dkh + offs_n[:, None] * stride_dkn + cols[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=n_ok)
    tl.store(DV + b64 * stride_dvb + hkv * stride_dvh + offs_n[:, None] * stride_dvn + cols[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=n_ok)


@triton.jit
def _dq_program(desc_q, desc_k, desc_v, desc_do, desc_lse, desc_delta, DQ, SLOPES, b, hkv, idx,
                stride_dqb, stride_dqh, stride_dqm, stride_dqd, stride_sb, nq, nk, H, GROUP, n_qblk,
                qk_scale2, th_scale, softcap2, scale, win_left, win_right,
                IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    """dQ of queries [m0, m0 + BLOCK_M) of query head hkv * GROUP + idx // n_qblk."""
    h = hkv * GROUP + idx // n_qblk
    pid_m = idx % n_qblk
    if IS_CAUSAL:
        pid_m = n_qblk - 1 - pid_m  # causal: the last query blocks see the most keys; start them first
    m0 = pid_m * BLOCK_M
    off = nk - nq
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = desc_q.load([b, h, m0, 0]).reshape([BLOCK_M, HEAD_DIM])
    do = desc_do.load([b, h, m0, 0]).reshape([BLOCK_M, HEAD_DIM])
    lse2 = desc_lse.load([b * H + h, m0]).reshape([BLOCK_M])
    delta = desc_delta.load([b * H + h, m0]).reshape([BLOCK_M])
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + b.to(tl.int64) * stride_sb + h).to(tl.float32) * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # key blocks [lo, full_lo) and [full_hi, hi) masked (window band, diagonal, ragged end), middle mask-free
    lo, full_lo, full_hi, hi = kv_block_range(m0, nq, nk, win_left, win_right, BLOCK_M, BLOCK_N,
                                              IS_CAUSAL, HAS_WINDOW)
    if HAS_WINDOW:
        for start_n in tl.range(lo, full_lo, BLOCK_N, num_stages=NUM_STAGES):
            k = desc_k.load([b, hkv, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
            v = desc_v.load([b, hkv, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
            dq = _dq_tile(dq, q, do, k, v, lse2, delta, offs_m, start_n + tl.arange(0, BLOCK_N), nk, off,
                          qk_scale2, th_scale, softcap2, slope2, win_left, win_right, True, IS_CAUSAL, HAS_WINDOW,
                          SOFTCAP, ALIBI)
    for start_n in tl.range(full_lo, full_hi, BLOCK_N, num_stages=NUM_STAGES):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([b, hkv, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
        v = desc_v.load([b, hkv, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
        dq = _dq_tile(dq, q, do, k, v, lse2, delta, offs_m, start_n + tl.arange(0, BLOCK_N), nk, off,
                      qk_scale2, th_scale, softcap2, slope2, win_left, win_right, False, IS_CAUSAL, HAS_WINDOW,
                      SOFTCAP, ALIBI)
    for start_n in tl.range(full_hi, hi, BLOCK_N, num_stages=NUM_STAGES):
        k = desc_k.load([b, hkv, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
        v = desc_v.load([b, hkv, start_n, 0]).reshape([BLOCK_N, HEAD_DIM])
        dq = _dq_tile(dq, q, do, k, v, lse2, delta, offs_m, start_n + tl.arange(0, BLOCK_N), nk, off,
                      qk_scale2, th_scale, softcap2, slope2, win_left, win_right, True, IS_CAUSAL, HAS_WINDOW,
                      SOFTCAP, ALIBI)
    cols = tl.arange(0, HEAD_DIM)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + cols[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=(offs_m < nq)[:, None])


@triton.jit
def _bwd_tma_kernel(
    desc_q1, desc_do1, desc_k1, desc_v1, desc_l1, desc_d1, desc_q2, desc_do2, desc_k2, desc_v2, desc_l2, desc_d2,
    DQ, DK, DV, SLOPES,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd, stride_sb,
    nq, nk, H, HKV, GROUP, n_kvblk, n_qblk,
    qk_scale2, th_scale, softcap2, scale, win_left, win_right,
    MODE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Grid (programs per (batch, kv head), B * HKV). MODE 0: dK/dV and dQ programs alternate
    (n_kvblk of the first kind, GROUP * n_qblk of the second); 1: dK/dV programs only; 2: dQ only."""
    pid = tl.program_id(0)
    b = tl.program_id(1) // HKV
    hkv = tl.program_id(1) % HKV
    if MODE == 1:
        _dkdv_program(desc_q1, desc_k1, desc_v1, desc_do1, desc_l1, desc_d1, DK, DV, SLOPES, b, hkv, pid,
                      stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                      stride_sb, nq, nk, H, GROUP, qk_scale2, th_scale, softcap2, scale, win_left, win_right,
                      IS_CAUSAL, HAS_WINDOW, SOFTCAP, ALIBI, HEAD_DIM, BLOCK_M1, BLOCK_N1, NUM_STAGES)
    elif MODE == 2:
        _dq_program(desc_q2, desc_k2, desc_v2, desc_do2, desc_l2, desc_d2, DQ, SLOPES, b, hkv, pid,
                    stride_dqb, stride_dqh, stride_dqm, stride_dqd, stride_sb, nq, nk, H, GROUP, n_qblk,
                    qk_scale2, th_scale, softcap2, scale, win_left, win_right,
                    IS_CAUSAL, HAS_WINDOW, SOFTCAP, ALIBI, HEAD_DIM, BLOCK_M2, BLOCK_N2, NUM_STAGES)
    else:
        # alternate the two kinds while both last, then the rest of the longer list
        n_dq = GROUP * n_qblk
        n_min = tl.minimum(n_kvblk, n_dq)
        is_kv = pid % 2 == 0
        idx = pid // 2
        if pid >= 2 * n_min:
            is_kv = n_kvblk > n_dq
            idx = pid - n_min
        if is_kv:
            _dkdv_program(desc_q1, desc_k1, desc_v1, desc_do1, desc_l1, desc_d1, DK, DV, SLOPES, b, hkv, idx,
                          stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn,
                          stride_dvd, stride_sb, nq, nk, H, GROUP, qk_scale2, th_scale, softcap2, scale,
                          win_left, win_right, IS_CAUSAL, HAS_WINDOW, SOFTCAP, ALIBI, HEAD_DIM, BLOCK_M1, BLOCK_N1,
                          NUM_STAGES)
        else:
            _dq_program(desc_q2, desc_k2, desc_v2, desc_do2, desc_l2, desc_d2, DQ, SLOPES, b, hkv, idx,
                        stride_dqb, stride_dqh, stride_dqm, stride_dqd, stride_sb, nq, nk, H, GROUP, n_qblk,
                        qk_scale2, th_scale, softcap2, scale, win_left, win_right,
                        IS_CAUSAL, HAS_WINDOW, SOFTCAP, ALIBI, HEAD_DIM, BLOCK_M2, BLOCK_N2, NUM_STAGES)


# --------------------------------------------------------------------------- host side


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, varlen: bool = False,
             check_device: bool = True) -> List[str]:
    """Reasons the TMA backward does not apply to q [B, H, Nq, D], k/v [B, Hkv, Nk, D] (empty: it applies).

    ``check_device=False`` skips the GPU checks (the interpreter emulates descriptors). dO and O
    need no check: dO is copied when its layout does not suit TMA, O is read by pointers.
    """
    reasons = device_and_tensor_reasons(q, k, v, out=None, check_device=check_device, config=None, rank=4,
                                        tokens_dim=2, empty=None, head_dims=TMA_HEAD_DIMS, what="the TMA backward")
    if varlen:
        reasons.append("varlen (cu_seqlens) is not supported by the TMA backward")
    return reasons


def _desc(t: torch.Tensor, block: int) -> "TensorDescriptor":
    """Rows [block] of one (batch, head): block [1, 1, block, D] over [B, H, N, D], [1, block] over [B * H, N].

    Built without the constructor's checks (a dozen per call): :func:`supports` checked q/k/v, dO
    is made contiguous when it fails them, lse2/delta are fresh padded buffers.
    """
    d = object.__new__(TensorDescriptor)
    blk = [1, block] if t.dim() == 2 else [1, 1, block, t.shape[-1]]
    d.__dict__.update(base=t, shape=list(t.shape), strides=list(t.stride()), block_shape=blk, padding="zero")
    return d


def run_tma_backward(do, q, k, v, o, lse, dq, dk, dv, *, sm_scale: float, causal: bool, left: int, right: int,
                     softcap: Optional[float], slopes: Optional[torch.Tensor], config, poison: bool = False) -> None:
    """Fill dq, dk, dv (preallocated, any strides and float dtype) with the TMA kernels.

    Shapes as :func:`.backward.flash_attention_backward` (BHSD, D == Dv); ``left``/``right`` the
    normalized window (-1 unbounded) with causal *not* folded in; ``slopes`` fp32 [H] or [B, H];
    ``config`` a :class:`.backward.BwdConfig` (BLOCK_M x BLOCK_N the dK/dV tile, dq_m x dq_n the dQ tile).
    The caller has checked :func:`supports`.
    """
    B, H, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    group = H // Hkv
    bm1, bn1, bm2, bn2 = config.BLOCK_M, config.BLOCK_N, config.dq_m, config.dq_n
    if do.stride(-1) != 1 or not _aligned(do):
        do = do.clone(memory_format=torch.contiguous_format)  # not .contiguous(): a misaligned view stays
    small = interpreter_mode()
    prep_m = 16 if small else 64
    pad = max(bm1, bm2, prep_m)
    n_pad = (nq + pad - 1) // pad * pad
    dev = q.device
    delta = torch.empty(B * H, n_pad, dtype=torch.float32, device=dev)
    lse2 = torch.empty(B * H, n_pad, dtype=torch.float32, device=dev)
    if poison:  # tests: every entry must be written by the preprocess
        delta.fill_(float("nan"))
        lse2.fill_(float("nan"))
    KERNEL_CACHE.launch(
        _bwd_prep_tma, (n_pad // prep_m, B * H),
        o, do, lse, delta, lse2, *o.stride(), *do.stride(), *lse.stride(), H, nq, n_pad,
        HEAD_DV=D, BLOCK_M=prep_m, BLOCK_DV=D, num_warps=1 if small else 4,
    )
    has_window = left >= 0 or right >= 0
    if has_window and causal:  # causal is a right window of 0 (both bottom-right aligned)
        right = 0 if right < 0 else min(right, 0)
    use_softcap = softcap is not None and float(softcap) > 0
    c = float(softcap) if use_softcap else 1.0
    floats = (sm_scale * _LOG2E_F, sm_scale / c, c * _LOG2E_F, sm_scale)
    ints = (left if left >= 0 else WINDOW_UNBOUNDED, right if right >= 0 else WINDOW_UNBOUNDED)
    stride_sb = slopes.stride(0) if (slopes is not None and slopes.dim() == 2) else 0
    n_kvblk = (nk + bn1 - 1) // bn1
    n_qblk = (nq + bm2 - 1) // bm2
    consts = dict(IS_CAUSAL=bool(causal) and not has_window, HAS_WINDOW=has_window, SOFTCAP=use_softcap,
                  ALIBI=slopes is not None, HEAD_DIM=D, BLOCK_M1=bm1, BLOCK_N1=bn1, BLOCK_M2=bm2, BLOCK_N2=bn2,
                  NUM_STAGES=config.num_stages, num_warps=config.num_warps, num_stages=config.num_stages)
    # a descriptor's block shape is fixed: the dK/dV branch streams BLOCK_M1 query rows and loads BLOCK_N1
    # key rows, the dQ branch loads BLOCK_M2 query rows and streams BLOCK_N2 key rows
    args = (_desc(q, bm1), _desc(do, bm1), _desc(k, bn1), _desc(v, bn1), _desc(lse2, bm1), _desc(delta, bm1),
            _desc(q, bm2), _desc(do, bm2), _desc(k, bn2), _desc(v, bn2), _desc(lse2, bm2), _desc(delta, bm2),
            dq, dk, dv, slopes, *dq.stride(), *dk.stride(), *dv.stride(), stride_sb,
            nq, nk, H, Hkv, group, n_kvblk, n_qblk, *floats, *ints)
    if config.fused:
        KERNEL_CACHE.launch(_bwd_tma_kernel, (n_kvblk + group * n_qblk, B * Hkv), *args, MODE=0, **consts)
    else:
        KERNEL_CACHE.launch(_bwd_tma_kernel, (n_kvblk, B * Hkv), *args, MODE=1, **consts)
        KERNEL_CACHE.launch(_bwd_tma_kernel, (group * n_qblk, B * Hkv), *args, MODE=2, **consts)
