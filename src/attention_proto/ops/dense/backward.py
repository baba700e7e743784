"""Dense attention backward: dQ, dK, dV with Triton, FlashAttention-2 style.

Given O and the forward's LSE (natural log, fp32) nothing N x N is stored:
every kernel recomputes P = exp(S - LSE) tile by tile.

Kernels (all launched through ``KERNEL_CACHE``):

1. ``_bwd_preprocess``: delta[i] = sum_d dO[i, d] * O[i, d] (fp32), one
   program per query block and head.
2. ``_bwd_dkdv``: one program per (KV block, kv head); it loops over the query
   heads of its GQA group and, for each, over the query blocks that can see
   the KV block (causal / window ranges skip fully masked blocks). dK and dV
   of the whole group are summed in registers: no repeated K/V copies, no
   atomics. Works in the transposed orientation (S^T = K Q^T) so that
   dV += P^T dO and dK += dS^T Q need no register transposes of P.
3. ``_bwd_dq``: one program per (query block, head), looping over KV blocks.

Separate dK/dV and dQ kernels make every output the sum of a fixed sequence
of tiles: the result is bitwise identical across runs (``deterministic=True``,
the default). ``deterministic=False`` instead adds dQ tiles inside the dK/dV
loop with fp32 atomics into a zeroed buffer (one pass over the scores
instead of two; the summation order, hence the rounding, varies by run).

Score math (mirrors the forward and ``reference.py``), per tile, fp32:
  s = scale * q.k; softcap: th = tanh(s / c), s = c * th; ALiBi: s -= slope *
  |i + off - j|; masks -> -inf; p = exp(s - lse) (LSE = -inf rows -> p = 0).
  dp = dO.v; ds = p * (dp - delta); softcap: ds *= 1 - th^2 (ALiBi is a
  constant bias: no slope gradient); dq = scale * ds.k, dk = scale * ds^T.q,
  dv = p^T.dO.

RoPE: q and k tiles are rotated on load (fp32 math, cast back to the input
dtype for the MMA), so the kernels produce the gradients w.r.t. the *rotated*
q/k. Since q_rot = R q, dq = R^T dq_rot: the inverse rotation is applied on
the host (torch, fp32) to the fp32 kernel outputs; it is O(N*D) work and
memory. (Doing it in-kernel needs a register permutation of the dq tile.)

Precision: fp16/bf16 MMA operands with fp32 accumulation; P and dS are cast
to the input dtype before their MMAs, as FlashAttention does. fp32 inputs use
``tl.dot(..., input_precision="ieee")`` (true fp32 products, no TF32) so
that fp32 results are fp32-accurate.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

import attention_proto  # noqa: F401  (sets TRITON_INTERPRET before kernels are defined)
from attention_proto.runtime.cache import KERNEL_CACHE
from attention_proto.runtime.device import interpreter_mode
from attention_proto.runtime.validation import (
    describe,
    require_dtype,
    require_int_tensor,
    require_rank,
    require_same_device,
    require_same_dtype,
    require_tensor,
)

from .common import LOG2E as _LOG2E_F
from .common import WINDOW_UNBOUNDED, kv_block_range, load_rope_tile, load_tile, q_block_range, tanh_f32
from .reference import normalize_window
from .rope import RopeSpec, rope_cos_sin, rotate

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = tl.constexpr(_LOG2E_F)  # a constexpr so that jitted code may read it
#: tests set this to fill every output and scratch buffer with NaN before the kernels run
POISON_OUTPUTS = False


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class BwdConfig:
    """Tile sizes of the backward.

    BLOCK_N: keys per dK/dV program; BLOCK_M: queries per step of its loop.
    The dQ kernel owns ``dq_block_m`` queries per program and steps over
    ``dq_block_n`` keys; by default (None) they are BLOCK_N and BLOCK_M, so
    that each program owns the larger tile. All are powers of two >= 16.
    """

    BLOCK_M: int = 32
    BLOCK_N: int = 64
    num_warps: int = 4
    num_stages: int = 2
    dq_block_m: Optional[int] = None
    dq_block_n: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("BLOCK_M", "BLOCK_N", "dq_block_m", "dq_block_n"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"BwdConfig.{name} must be a power of two >= 16 (tl.dot needs 16); got {v!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"BwdConfig.num_warps must be one of 1, 2, 4, 8, 16; got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"BwdConfig.num_stages must be a positive int; got {self.num_stages!r}")

    @property
    def dq_m(self) -> int:
        return self.dq_block_m or self.BLOCK_N

    @property
    def dq_n(self) -> int:
        return self.dq_block_n or self.BLOCK_M


def bwd_config_candidates(head_dim: int) -> list[BwdConfig]:
    """Candidates for a backward tile sweep on Hopper (each fits 227 KB of shared memory in fp16).

    Register budget: the dK/dV program holds two fp32 [BLOCK_N, D] accumulators,
    so BLOCK_N * D * 2 / (32 * num_warps) should stay near or below 128.
    """
    d = max(16, triton.next_power_of_2(head_dim))
    if d <= 64:
        return [
            BwdConfig(32, 128, 4, 3), BwdConfig(32, 128, 4, 4), BwdConfig(64, 128, 8, 3),
            BwdConfig(32, 64, 4, 3), BwdConfig(64, 64, 4, 3), BwdConfig(16, 128, 4, 4),
        ]
    if d <= 128:
        return [
            BwdConfig(32, 128, 8, 2), BwdConfig(32, 128, 8, 3), BwdConfig(64, 128, 8, 2),
            BwdConfig(32, 64, 4, 2), BwdConfig(32, 64, 4, 3), BwdConfig(64, 64, 4, 2),
            BwdConfig(16, 64, 4, 3),
        ]
    return [
        BwdConfig(32, 64, 8, 2), BwdConfig(16, 64, 4, 2), BwdConfig(32, 64, 4, 1),
        BwdConfig(16, 32, 4, 2), BwdConfig(32, 32, 4, 2),
    ]


def pick_bwd_config(head_dim: int, dtype: torch.dtype, seqlen_q: int, seqlen_k: int) -> BwdConfig:
    """Heuristic: tiny tiles under the interpreter, the first sweep candidate on GPU.

    fp32 operands take twice the shared memory of fp16: halve the key tile and
    use one stage less.
    """
    if interpreter_mode():
        return BwdConfig(BLOCK_M=16, BLOCK_N=32, num_warps=1, num_stages=1)
    cfg = bwd_config_candidates(head_dim)[0]
    if dtype == torch.float32:
        cfg = BwdConfig(cfg.BLOCK_M, max(16, cfg.BLOCK_N // 2), cfg.num_warps, max(1, cfg.num_stages - 1))
    return cfg


# --------------------------------------------------------------------------- jitted helpers


@triton.jit
def _load_qk(base, rows, n_rows, stride_r, stride_c, pos0, COS, SIN, stride_cs, max_pos,
             ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """A q or k tile in the input dtype, rotated (fp32 math) when ROPE; position = pos0 + row."""
    if ROPE != 0:
        x = load_rope_tile(base, rows, n_rows, stride_r, stride_c, pos0, COS, SIN, stride_cs, max_pos,
                           ROPE, HEAD_DIM, BLOCK_D, CHECK_ROWS).to(base.dtype.element_ty)
    else:
        x = load_tile(base, rows, n_rows, stride_r, stride_c, HEAD_DIM, BLOCK_D, CHECK_ROWS)
    return x


@triton.jit
def _scores(qk, rel, ok, scale, softcap, slope, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr):
    """Final scores of a tile (-inf where masked) and tanh(s/c) for the softcap gradient.

    ``rel`` = query position - key position and ``ok`` (allowed pairs) come broadcast to the
    tile's orientation ([M, N] in the dQ kernel, [N, M] in the dK/dV kernel).
    """
    s = qk * scale
    th = s
    if SOFTCAP:
        th = tanh_f32(s / softcap)
        s = softcap * th
    if ALIBI:
        s = s - slope * tl.abs(rel).to(tl.float32)
    if MASK:
        s = tl.where(ok, s, float("-inf"))
    return s, th


@triton.jit
def _row_stats(LSE, DELTA, l_base, rows, ok):
    lse = tl.load(LSE + l_base + rows, mask=ok, other=float("inf"))
    # fully masked rows carry LSE = -inf: +inf makes their p exactly 0 instead of NaN
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + l_base + rows, mask=ok, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_step(dk, dv, k, v, q_base, do_base, LSE, DELTA, l_base, DQ_base, start_m, offs_n,
               q_start, seqlen_q, seqlen_k, off, q_pos0, scale, softcap, slope, win_left, win_right,
               stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqm, stride_dqd,
               COS, SIN, stride_cs, max_pos,
               MASK: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, ROPE: tl.constexpr,
               FUSE_DQ: tl.constexpr, DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One query block against the program's key block, transposed (S^T = K Q^T, [BLOCK_N, BLOCK_M])."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = q_start + offs_m
    m_ok = offs_m < seqlen_q
    q = _load_qk(q_base, rows, q_start + seqlen_q, stride_qm, stride_qd, q_pos0, COS, SIN, stride_cs, max_pos,
                 ROPE, HEAD_DIM, BLOCK_D, MASK)
    do = load_tile(do_base, rows, q_start + seqlen_q, stride_dom, stride_dod, HEAD_DV, BLOCK_DV, MASK)
    lse2, delta = _row_stats(LSE, DELTA, l_base, rows * stride_lm, m_ok)

    rel = offs_m[None, :] + off - offs_n[:, None]
    ok = m_ok[None, :] & (offs_n < seqlen_k)[:, None] & (rel >= -win_right) & (rel <= win_left)
    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
    sT, thT = _scores(qkT, rel, ok, scale, softcap, slope, SOFTCAP, ALIBI, MASK)
    pT = tl.exp2(sT * LOG2E - lse2[None, :])
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    if SOFTCAP:
        dsT = dsT * (1.0 - thT * thT)
    dsT = dsT.to(q.dtype)
    dk += tl.dot(dsT, q, input_precision=DOT_PREC)
    if FUSE_DQ:
        dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PREC) * scale
        cols = tl.arange(0, BLOCK_D)
        tl.atomic_add(DQ_base + rows[:, None] * stride_dqm + cols[None, :] * stride_dqd, dq,
                      mask=m_ok[:, None] & (cols < HEAD_DIM)[None, :])
    return dk, dv


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, m_ok,
             k_start, seqlen_k, off, k_pos0, scale, softcap, slope, win_left, win_right,
             stride_kn, stride_kd, stride_vn, stride_vd, COS, SIN, stride_cs, max_pos,
             MASK: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, ROPE: tl.constexpr,
             DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One key block against the program's query block ([BLOCK_M, BLOCK_N] orientation)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    rows = k_start + offs_n
    k = _load_qk(k_base, rows, k_start + seqlen_k, stride_kn, stride_kd, k_pos0, COS, SIN, stride_cs, max_pos,
                 ROPE, HEAD_DIM, BLOCK_D, MASK)
    v = load_tile(v_base, rows, k_start + seqlen_k, stride_vn, stride_vd, HEAD_DV, BLOCK_DV, MASK)
    rel = offs_m[:, None] + off - offs_n[None, :]
    ok = m_ok[:, None] & (offs_n < seqlen_k)[None, :] & (rel >= -win_right) & (rel <= win_left)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    s, th = _scores(qk, rel, ok, scale, softcap, slope, SOFTCAP, ALIBI, MASK)
    p = tl.exp2(s * LOG2E - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - th * th)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


# --------------------------------------------------------------------------- kernels


@triton.jit
def _bwd_preprocess(O, DO, DELTA, CU_Q,
                    stride_ob, stride_oh, stride_om, stride_od, stride_dob, stride_doh, stride_dom, stride_dod,
                    stride_lb, stride_lh, stride_lm, H, nq,
                    IS_VARLEN: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, one program per (query block, head)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    q_start, seqlen_q, _ks, _sk = _seq_bounds(CU_Q, CU_Q, b, nq, nq, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    rows = q_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = load_tile(O + b64 * stride_ob + h * stride_oh, rows, q_start + seqlen_q, stride_om, stride_od,
                  HEAD_DV, BLOCK_DV, True)
    do = load_tile(DO + b64 * stride_dob + h * stride_doh, rows, q_start + seqlen_q, stride_dom, stride_dod,
                   HEAD_DV, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + rows * stride_lm, delta, mask=rows < q_start + seqlen_q)


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, nq, nk, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        # int64 starts: packed row offsets times the row stride can pass 2**31
        q_start = tl.load(CU_Q + b).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + b + 1) - q_start).to(tl.int32)
        k_start = tl.load(CU_K + b).to(tl.int64)
        seqlen_k = (tl.load(CU_K + b + 1) - k_start).to(tl.int32)
    else:
        q_start = b * 0
        k_start = b * 0
        seqlen_q = nq + b * 0
        seqlen_k = nk + b * 0
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DVP, DQ, SLOPES, COS, SIN, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_sb, nq, nk, HKV, GROUP,
    scale, softcap, win_left, win_right, stride_cs, max_pos, rope_q_off, rope_k_off,
    IS_VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    ROPE: tl.constexpr, ROPE_Q_DEFAULT: tl.constexpr, FUSE_DQ: tl.constexpr, DOT_PREC: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dK, dV of one key block of one kv head, summed over the query heads of its GQA group."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1) // HKV
    hkv = tl.program_id(1) % HKV
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CU_Q, CU_K, b, nq, nk, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    off = seqlen_k - seqlen_q  # bottom-right alignment: query i sits at key position i + off
    b64 = b.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    rows_n = k_start + offs_n
    # rope positions are pos0 + memory row: fold the sequence start into pos0
    q_pos0 = (off + rope_q_off if ROPE_Q_DEFAULT else rope_q_off) - q_start
    k = _load_qk(K + b64 * stride_kb + hkv * stride_kh, rows_n, k_start + seqlen_k, stride_kn, stride_kd,
                 rope_k_off - k_start, COS, SIN, stride_cs, max_pos, ROPE, HEAD_DIM, BLOCK_D, True)
    v = load_tile(V + b64 * stride_vb + hkv * stride_vh, rows_n, k_start + seqlen_k, stride_vn, stride_vd,
                  HEAD_DV, BLOCK_DV, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # query blocks: [lo, full_lo) and [full_hi, hi) need the mask, [full_lo, full_hi) none
    lo, hi = q_block_range(n0, seqlen_q, seqlen_k, win_left, win_right, BLOCK_N, False, HAS_WINDOW)
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = lo
    full_hi = lo
    if n0 + BLOCK_N <= seqlen_k:
        # every pair allowed: m0 + off + right >= n0 + BLOCK_N - 1 and m0 + BLOCK_M - 1 + off - left <= n0
        first = tl.maximum(n0 + BLOCK_N - 1 - off - win_right, lo)
        full_lo = tl.minimum(((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, hi)
        last = tl.minimum(tl.minimum(n0 - off + win_left + 1, seqlen_q), hi)
        full_hi = tl.maximum((last // BLOCK_M) * BLOCK_M, full_lo)
        full_lo = tl.minimum(full_lo, full_hi)
        full_lo = tl.maximum(full_lo, lo)

    for g in range(0, GROUP):
        h = hkv * GROUP + g
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + b64 * stride_sb + h).to(tl.float32)
        q_base = Q + b64 * stride_qb + h * stride_qh
        do_base = DO + b64 * stride_dob + h * stride_doh
        dq_base = DQ + b64 * stride_dqb + h * stride_dqh
        l_base = b64 * stride_lb + h * stride_lh
        for start_m in range(lo, full_lo, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, LSE, DELTA, l_base, dq_base, start_m, offs_n,
                                q_start, seqlen_q, seqlen_k, off, q_pos0, scale, softcap, slope, win_left, win_right,
                                stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqm, stride_dqd,
                                COS, SIN, stride_cs, max_pos, True, SOFTCAP, ALIBI, ROPE, FUSE_DQ, DOT_PREC,
                                HEAD_DIM, HEAD_DV, BLOCK_M, BLOCK_D, BLOCK_DV)
        for start_m in range(full_lo, full_hi, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, LSE, DELTA, l_base, dq_base, start_m, offs_n,
                                q_start, seqlen_q, seqlen_k, off, q_pos0, scale, softcap, slope, win_left, win_right,
                                stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqm, stride_dqd,
                                COS, SIN, stride_cs, max_pos, False, SOFTCAP, ALIBI, ROPE, FUSE_DQ, DOT_PREC,
                                HEAD_DIM, HEAD_DV, BLOCK_M, BLOCK_D, BLOCK_DV)
        for start_m in range(full_hi, hi, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, LSE, DELTA, l_base, dq_base, start_m, offs_n,
                                q_start, seqlen_q, seqlen_k, off, q_pos0, scale, softcap, slope, win_left, win_right,
                                stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqm, stride_dqd,
                                COS, SIN, stride_cs, max_pos, True, SOFTCAP, ALIBI, ROPE, FUSE_DQ, DOT_PREC,
                                HEAD_DIM, HEAD_DV, BLOCK_M, BLOCK_D, BLOCK_DV)

    n_ok = offs_n < seqlen_k
    cols = tl.arange(0, BLOCK_D)
    tl.store(DK + b64 * stride_dkb + hkv * stride_dkh + rows_n[:, None] * stride_dkn + cols[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & (cols < HEAD_DIM)[None, :])
    cols_v = tl.arange(0, BLOCK_DV)
    tl.store(DVP + b64 * stride_dvb + hkv * stride_dvh + rows_n[:, None] * stride_dvn + cols_v[None, :] * stride_dvd,
             dv.to(DVP.dtype.element_ty), mask=n_ok[:, None] & (cols_v < HEAD_DV)[None, :])


@triton.jit
def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, SLOPES, COS, SIN, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_sb, nq, nk, H, GROUP,
    scale, softcap, win_left, win_right, stride_cs, max_pos, rope_q_off, rope_k_off,
    IS_VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    ROPE: tl.constexpr, ROPE_Q_DEFAULT: tl.constexpr, DOT_PREC: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ of one query block of one head (deterministic mode)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(CU_Q, CU_K, b, nq, nk, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    off = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    rows = q_start + offs_m
    m_ok = offs_m < seqlen_q
    q_pos0 = (off + rope_q_off if ROPE_Q_DEFAULT else rope_q_off) - q_start
    q = _load_qk(Q + b64 * stride_qb + h * stride_qh, rows, q_start + seqlen_q, stride_qm, stride_qd, q_pos0,
                 COS, SIN, stride_cs, max_pos, ROPE, HEAD_DIM, BLOCK_D, True)
    do = load_tile(DO + b64 * stride_dob + h * stride_doh, rows, q_start + seqlen_q, stride_dom, stride_dod,
                   HEAD_DV, BLOCK_DV, True)
    lse2, delta = _row_stats(LSE, DELTA, b64 * stride_lb + h * stride_lh, rows * stride_lm, m_ok)
    slope = 0.0
    if ALIBI:
        slope = tl.load(SLOPES + b64 * stride_sb + h).to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b64 * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b64 * stride_vb + (h // GROUP) * stride_vh
    k_pos0 = rope_k_off - k_start
    # key blocks: [lo, full_lo) and [full_hi, hi) masked, [full_lo, full_hi) mask-free
    lo, full_lo, full_hi, hi = kv_block_range(m0, seqlen_q, seqlen_k, win_left, win_right, BLOCK_M, BLOCK_N,
                                              False, HAS_WINDOW)
    for start_n in range(lo, full_lo, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, m_ok, k_start, seqlen_k, off, k_pos0,
                      scale, softcap, slope, win_left, win_right, stride_kn, stride_kd, stride_vn, stride_vd,
                      COS, SIN, stride_cs, max_pos, True, SOFTCAP, ALIBI, ROPE, DOT_PREC, HEAD_DIM, HEAD_DV,
                      BLOCK_N, BLOCK_D, BLOCK_DV)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, m_ok, k_start, seqlen_k, off, k_pos0,
                      scale, softcap, slope, win_left, win_right, stride_kn, stride_kd, stride_vn, stride_vd,
                      COS, SIN, stride_cs, max_pos, False, SOFTCAP, ALIBI, ROPE, DOT_PREC, HEAD_DIM, HEAD_DV,
                      BLOCK_N, BLOCK_D, BLOCK_DV)
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, m_ok, k_start, seqlen_k, off, k_pos0,
                      scale, softcap, slope, win_left, win_right, stride_kn, stride_kd, stride_vn, stride_vd,
                      COS, SIN, stride_cs, max_pos, True, SOFTCAP, ALIBI, ROPE, DOT_PREC, HEAD_DIM, HEAD_DV,
                      BLOCK_N, BLOCK_D, BLOCK_DV)
    cols = tl.arange(0, BLOCK_D)
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + cols[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (cols < HEAD_DIM)[None, :])


# --------------------------------------------------------------------------- host side


def _strides4(t: torch.Tensor, varlen: bool) -> Tuple[int, int, int, int]:
    """(batch, head, seq, dim) strides; packed THD tensors have batch stride 0 (rows come from cu_seqlens)."""
    if varlen:
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _lse_strides(t: torch.Tensor, varlen: bool) -> Tuple[int, int, int]:
    if varlen:  # [H, Tq]
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _validate(do, q, k, v, o, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, varlen: bool) -> None:
    names = ("do", "q", "k", "v", "o", "lse")
    for name, t in zip(names, (do, q, k, v, o, lse)):
        require_tensor(name, t)
    layout = "[T, H, D] (packed, with cu_seqlens)" if varlen else "[B, H, N, D]"
    for name, t in zip(names[:5], (do, q, k, v, o)):
        require_rank(name, t, 3 if varlen else 4, layout)
    require_rank("lse", lse, 2 if varlen else 3, "[H, Tq]" if varlen else "[B, H, Nq]")
    require_dtype("q", q, SUPPORTED_DTYPES)
    require_same_dtype(("q", "k", "v", "o", "do"), (q, k, v, o, do))
    require_dtype("lse", lse, (torch.float32,))
    require_same_device(names, (do, q, k, v, o, lse))
    hd = 2 if varlen else 3
    hh = 1
    H, D, Hkv, Dv = q.shape[hh], q.shape[hd], k.shape[hh], v.shape[hd]
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ValueError(f"head dim up to {MAX_HEAD_DIM} is supported; got q {describe(q)}, v {describe(v)}")
    if D < 1 or Dv < 1:
        raise ValueError(f"head dims must be positive; got q {describe(q)}, v {describe(v)}")
    if k.shape[hd] != D:
        raise ValueError(f"k must have q's head dim {D}; got k {describe(k)}, q {describe(q)}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv}); got q {describe(q)}, k {describe(k)}")
    kv_shape = list(k.shape)
    kv_shape[hd] = Dv
    if list(v.shape) != kv_shape:
        raise ValueError(f"v must match k except in its head dim; got k {describe(k)}, v {describe(v)}")
    o_shape = list(q.shape)
    o_shape[hd] = Dv
    for name, t in (("o", o), ("do", do)):
        if list(t.shape) != o_shape:
            raise ValueError(f"{name} must have shape {tuple(o_shape)} (q's with v's head dim); got {describe(t)}")
    lse_shape = (H, q.shape[0]) if varlen else (q.shape[0], H, q.shape[2])
    if tuple(lse.shape) != lse_shape:
        raise ValueError(f"lse must have shape {lse_shape}; got {describe(lse)}")
    if alibi_slopes is not None:
        require_tensor("alibi_slopes", alibi_slopes)
        nb = (cu_seqlens_q.numel() - 1) if varlen else q.shape[0]
        if tuple(alibi_slopes.shape) not in ((H,), (nb, H)):
            raise ValueError(f"alibi_slopes must have shape ({H},) or ({nb}, {H}); got {describe(alibi_slopes)}")
        require_same_device(("q", "alibi_slopes"), (q, alibi_slopes))
    if varlen:
        require_int_tensor("cu_seqlens_q", cu_seqlens_q, 1)
        require_int_tensor("cu_seqlens_k", cu_seqlens_k, 1)
        require_same_device(("q", "cu_seqlens_q", "cu_seqlens_k"), (q, cu_seqlens_q, cu_seqlens_k))
        if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() < 2:
            raise ValueError(
                "cu_seqlens_q and cu_seqlens_k must both hold batch + 1 >= 2 offsets; got "
                f"{describe(cu_seqlens_q)} and {describe(cu_seqlens_k)}"
            )


@dataclass
class _Rope:
    kind: int  # 0 none, 1 half, 2 interleaved
    cos: torch.Tensor  # fp32 [P, D/2]; row r holds position r + pos0
    sin: torch.Tensor
    pos0: int
    q_default: bool  # q offset = Nk - Nq of each sequence


@functools.lru_cache(maxsize=16)
def _theta_tables(theta: float, D: int, first: int, end: int, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [end - first, D/2] for positions first..end-1, cached: training repeats the same shapes."""
    cos, sin = rope_cos_sin(torch.arange(first, end), D, theta, torch.float32)
    return cos.to(device).contiguous(), sin.to(device).contiguous()


def _rope_tables(rope: Optional[RopeSpec], D: int, spans, device) -> _Rope:
    """fp32 cos/sin tables covering every position in ``spans`` ((first, last + 1) intervals)."""
    if rope is None:
        dummy = torch.zeros(1, 1, dtype=torch.float32, device=device)
        return _Rope(0, dummy, dummy, 0, True)
    if D % 2:
        raise ValueError(f"rope needs an even head dim; got {D}")
    spans = [r for r in spans if r[1] > r[0]]
    pmin = min((a for a, _ in spans), default=0)
    pmax = max((b for _, b in spans), default=1)
    if rope.cos is not None:
        if tuple(rope.cos.shape[1:]) != (D // 2,):
            raise ValueError(f"rope cos/sin must have shape [max_pos, {D // 2}]; got {describe(rope.cos)}")
        if pmin < 0 or pmax > rope.cos.shape[0]:
            raise ValueError(
                f"rope cos/sin tables have {rope.cos.shape[0]} positions; positions {pmin}..{pmax - 1} are needed"
            )
        cos = rope.cos.to(device=device, dtype=torch.float32).contiguous()
        sin = rope.sin.to(device=device, dtype=torch.float32).contiguous()
        pos0 = 0
    else:  # only the span in use; it may start below 0 (Nq > Nk puts queries before key 0)
        cos, sin = _theta_tables(float(rope.theta), D, pmin, max(pmax, pmin + 1), str(device))
        pos0 = pmin
    return _Rope(1 if rope.layout == "half" else 2, cos, sin, pos0, rope.q_offset is None)


def _unrotate(x: torch.Tensor, tab: _Rope, positions: torch.Tensor, layout: str, varlen: bool) -> torch.Tensor:
    """Apply R^T (rotation by -angle) to gradients w.r.t. rotated q/k; positions index rows (N or T)."""
    c, s = tab.cos[positions - tab.pos0], tab.sin[positions - tab.pos0]
    if varlen:  # x [T, H, D]: broadcast over heads
        c, s = c[:, None, :], s[:, None, :]
    return rotate(x, c, -s, layout)


def flash_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[Sequence[Optional[int]] | int] = (-1, -1),
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    rope: Optional[RopeSpec] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    deterministic: bool = True,
    config: Optional[BwdConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of dense attention, from the forward's O and LSE.

    Shapes (BHSD): do/o [B, H, Nq, Dv], q [B, H, Nq, D], k [B, Hkv, Nk, D],
    v [B, Hkv, Nk, Dv], lse fp32 [B, H, Nq] (natural log, -inf on fully
    masked rows). Varlen (cu_seqlens_q/k int32 [batch + 1] given): q/o/do
    [Tq, H, D(v)], k/v [Tk, Hkv, D(v)], lse [H, Tq]. H % Hkv == 0, D and Dv
    <= 256, dtypes fp16/bf16/fp32. The modifiers (causal, scale, window,
    softcap, alibi_slopes [H] or [B, H], rope) must be those of the forward;
    their semantics are :mod:`attention_proto.ops.dense.reference`'s.

    Returns dq, dk, dv shaped and typed like q, k, v. ``deterministic=True``
    (default) gives bitwise-identical results across runs;
    ``deterministic=False`` fuses dQ into the dK/dV pass with fp32 atomics.
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (varlen); got only one")
    _validate(do, q, k, v, o, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, varlen)
    if config is not None and not isinstance(config, BwdConfig):
        raise TypeError(f"config must be a BwdConfig or None; got {describe(config)}")
    left, right = normalize_window(window)
    if causal:  # causal is a right window of 0 (both bottom-right aligned)
        right = 0 if right < 0 else min(right, 0)
    has_window = left >= 0 or right >= 0
    win_left = left if left >= 0 else WINDOW_UNBOUNDED
    win_right = right if right >= 0 else WINDOW_UNBOUNDED
    D, Dv = q.shape[-1], v.shape[-1]
    sc = (1.0 / math.sqrt(D)) if scale is None else float(scale)
    use_softcap = softcap is not None and float(softcap) > 0

    lq = lk = None  # per-sequence lengths, read on the host only when needed (one sync)
    if varlen:
        H, Hkv, B = q.shape[1], k.shape[1], cu_seqlens_q.numel() - 1
        if max_seqlen_q is None or max_seqlen_k is None or rope is not None:
            lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
            lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
            if cu_seqlens_q[-1].item() != q.shape[0] or cu_seqlens_k[-1].item() != k.shape[0] or min(lq + lk) < 0:
                raise ValueError(
                    f"cu_seqlens must be non-decreasing and end at Tq={q.shape[0]} / Tk={k.shape[0]}; got "
                    f"{cu_seqlens_q.tolist()} and {cu_seqlens_k.tolist()}"
                )
        # grid sizes; given maxima are trusted (attention_varlen checks them) so no sync is needed
        nq = max(max_seqlen_q or 0, max(lq) if lq else 0)
        nk = max(max_seqlen_k or 0, max(lk) if lk else 0)
    else:
        B, H, nq, _ = q.shape
        Hkv, nk = k.shape[1], k.shape[2]
        lq, lk = [nq], [nk]
    dev = q.device

    # with rope the kernels produce gradients w.r.t. rotated q/k: keep them fp32 until rotated back
    dq = torch.empty(q.shape, dtype=torch.float32 if rope is not None else q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=torch.float32 if rope is not None else k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_().to(q.dtype), dk.zero_().to(k.dtype), dv.zero_()

    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    if POISON_OUTPUTS:
        for t in (dq, dk, dv, delta):
            t.fill_(float("nan"))
    qo, spans = [], []
    if rope is not None:
        qo = [rope.resolved_q_offset(a, b) for a, b in zip(lq, lk)]
        spans = [(s, s + n) for s, n in zip(qo, lq)] + [(rope.k_offset, rope.k_offset + n) for n in lk]
    tab = _rope_tables(rope, D, spans, dev)
    rope_q_off = (-tab.pos0 if tab.q_default else int(rope.q_offset) - tab.pos0) if rope is not None else 0
    rope_k_off = (int(rope.k_offset) - tab.pos0) if rope is not None else 0
    slopes = alibi_slopes.to(torch.float32).contiguous() if alibi_slopes is not None else tab.cos
    stride_sb = slopes.stride(0) if (alibi_slopes is not None and slopes.dim() == 2) else 0
    cu_q = cu_seqlens_q.to(torch.int32).contiguous() if varlen else delta
    cu_k = cu_seqlens_k.to(torch.int32).contiguous() if varlen else delta

    cfg = config or pick_bwd_config(D, q.dtype, nq, nk)
    BD = max(16, triton.next_power_of_2(D))
    BDV = max(16, triton.next_power_of_2(Dv))
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    pre_m = 16 if interpreter_mode() else 64
    KERNEL_CACHE.launch(
        _bwd_preprocess, (triton.cdiv(nq, pre_m), B * H),
        o, do, delta, cu_q, *_strides4(o, varlen), *_strides4(do, varlen), *_lse_strides(delta, varlen), H, nq,
        IS_VARLEN=varlen, HEAD_DV=Dv, BLOCK_M=pre_m, BLOCK_DV=BDV, num_warps=1 if interpreter_mode() else 4,
    )

    fuse = not deterministic
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=dev) if fuse else dq
    flags = dict(
        IS_VARLEN=varlen, HAS_WINDOW=has_window, SOFTCAP=use_softcap, ALIBI=alibi_slopes is not None,
        ROPE=tab.kind, ROPE_Q_DEFAULT=tab.q_default, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        HEAD_DIM=D, HEAD_DV=Dv, BLOCK_D=BD, BLOCK_DV=BDV,
    )
    mods = (sc, float(softcap) if use_softcap else 1.0, win_left, win_right,
            tab.cos.stride(0), tab.cos.shape[0], rope_q_off, rope_k_off)
    heads = (*_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(do, varlen),
             *_lse_strides(lse, varlen))
    KERNEL_CACHE.launch(
        _bwd_dkdv, (triton.cdiv(nk, cfg.BLOCK_N), B * Hkv),
        q, k, v, do, lse, delta, dk, dv, dq_acc, slopes, tab.cos, tab.sin, cu_q, cu_k,
        *heads, *_strides4(dk, varlen), *_strides4(dv, varlen), *_strides4(dq_acc, varlen),
        stride_sb, nq, nk, Hkv, H // Hkv, *mods,
        FUSE_DQ=fuse, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, **flags, **launch,
    )
    if fuse:
        dq = dq_acc if rope is not None else dq_acc.to(q.dtype)
    else:
        KERNEL_CACHE.launch(
            _bwd_dq, (triton.cdiv(nq, cfg.dq_m), B * H),
            q, k, v, do, lse, delta, dq, slopes, tab.cos, tab.sin, cu_q, cu_k,
            *heads, *_strides4(dq, varlen), stride_sb, nq, nk, H, H // Hkv, *mods,
            BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, **flags, **launch,
        )

    if rope is not None:
        def positions(lens, starts):
            return torch.cat([torch.arange(st, st + n, device=dev) for n, st in zip(lens, starts)])

        dq = _unrotate(dq, tab, positions(lq, qo), rope.layout, varlen).to(q.dtype)
        dk = _unrotate(dk, tab, positions(lk, [rope.k_offset] * len(lk)), rope.layout, varlen).to(k.dtype)
    return dq, dk, dv
