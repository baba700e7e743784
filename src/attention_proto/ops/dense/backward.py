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
the default here; the public ``attention()`` picks its own default).
``deterministic=False`` instead adds dQ tiles inside the dK/dV loop with fp32
atomics into a zeroed buffer (one pass over the scores instead of two; the
summation order, hence the rounding, varies by run).

Hopper fast path (``BwdConfig.path == "tma"``, :mod:`.backward_tma`): the same math with TMA
descriptor loads, ``tl.range`` pipelining, exp2-domain scores against a pre-scaled LSE, 64x128 dK/dV
and 128x64 dQ tiles, and dK/dV and dQ programs in one launch; deterministic in both modes (no
atomics). With ``config=None`` it is picked wherever :func:`.backward_tma.supports` holds (CUDA
sm_90+, fp16/bf16, D == Dv in 32/64/128, aligned strides, no varlen), for either value of
``deterministic``; the kernels of this module run everywhere else (and on an explicit portable
config).

Score math (mirrors the forward and ``reference.py``), per tile, fp32:
  s = scale * q.k; softcap: th = tanh(s / c), s = c * th; ALiBi: s -= slope *
  |i + off - j|; masks -> -inf; p = exp(s - lse) (LSE = -inf rows -> p = 0).
  dp = dO.v; ds = p * (dp - delta); softcap: ds *= 1 - th^2 (ALiBi is a
  constant bias: no slope gradient); dq = scale * ds.k, dk = scale * ds^T.q,
  dv = p^T.dO.

Masks: blocks that are fully allowed skip the mask arithmetic. The dQ kernel
runs three loops (masked edge, mask-free middle, masked edge); the dK/dV kernel
runs one loop with a runtime branch around the mask, because there three loops
cost ~50 more registers per thread (sm_90 ptxas) and spill at useful tiles.

RoPE: ``_rope_pass`` rotates q and k once into temporaries (fp32 math, rounded
to the input dtype, exactly as the forward's rotate-on-load rounds them before
its MMA), the main kernels run without RoPE, and the same pass applied with
the inverse rotation R^T turns the fp32 gradients w.r.t. rotated q/k into dq,
dk. Rotating on load inside the main kernels would redo the rotation of each
q tile once per KV block and, measured with ptxas for sm_90, pushes the dK/dV
kernel into spills (cos/sin and partner tiles live next to the accumulators).

Split scores (RoPE with softcap, 16-bit inputs): the rope pass also writes the rounding residue of
the rotated q and k (x_lo = x - x_hi, in the input dtype), and the kernels add q_hi.k_lo + q_lo.k_hi
to each score tile (2 more MMAs of the tile; scores accurate to ~2^-16 instead of the 16-bit
operands' ~2^-8); the gradient's tanh is then taken to fp32 accuracy (:func:`_scores`). The softcap
gradient's factor 1 - tanh^2(s / c) is steep where |s| ~ c, so a score's rounding error there is
amplified into dq/dk: with scale 1, D 256 and c 0.5 (scores far
past the cap; only the few near 0 carry the gradient) the rounded rotation alone made dq 3.6-7.9x
PyTorch's own bf16 error (session-8 GPU fuzz; a float64 emulation of the kernel reproduced the error
and put all of it on the rounding of the rotated operands). Without RoPE the operands are the exact
inputs and need no residue; without softcap the gradient is not sensitive to it. The TMA kernels
do not implement this mode (their softcap tiles already run at the register limit): rope + softcap
runs here. Cost on
the H100 (B1 H16:8 N4k causal bf16, backward alone): 1.96x / 1.60x of the TMA path at D128
(deterministic / fused dQ; the move off TMA alone is 1.40x / 1.33x), 1.46x / 1.21x at D256.

Precision: fp16/bf16 MMA operands with fp32 accumulation; P and dS are cast
to the input dtype before their MMAs, as FlashAttention does. fp32 inputs use
``tl.dot(..., input_precision="ieee")`` (true fp32 products, no TF32) so
that fp32 results are fp32-accurate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

import attention_proto  # noqa: F401  (sets TRITON_INTERPRET before kernels are defined)
from attention_proto.runtime.cache import KERNEL_CACHE
from attention_proto.runtime.device import interpreter_mode
from attention_proto.runtime.offsets import host_offsets
from attention_proto.runtime.validation import (
    describe,
    require_dtype,
    require_int_tensor,
    require_rank,
    require_same_device,
    require_same_dtype,
    require_tensor,
)

from . import backward_tma
from .common import LOG2E as _LOG2E_F
from .common import WINDOW_UNBOUNDED, kv_block_range, load_tile, q_block_range, tanh_f32, tanh_for
from .common import seq_bounds as _seq_bounds
from .common import strides4 as _strides4
from .reference import normalize_window
from .rope import RopeSpec, theta_tables
from .rope_kernel import rope_pass as rotate_rows

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = tl.constexpr(_LOG2E_F)  # a constexpr so that jitted code may read it
BWD_PATHS = ("portable", "tma")
#: dispatch picks the Hopper TMA backward (ops/dense/backward_tma.py) with config=None. On by default
#: since scripts/bench_dense_bwd.py on an H100 (2026-11-26, session 3): gradients within 0.04-0.13 of
#: the bound, bitwise reruns equal, fwd+bwd 1.03-1.12x FlexAttention and 1.36-1.45x the portable path
TMA_BACKWARD_DEFAULT = True
#: RoPE + softcap on 16-bit inputs: split-precision scores on the portable kernels (module docstring).
#: False restores the rounded scores and the TMA path (for timing the mode's cost, and its tests)
SPLIT_ROPE_SOFTCAP_SCORES = True
#: tests set this to fill every output and scratch buffer with NaN before the kernels run
POISON_OUTPUTS = False
#: float32 inputs: form delta = rowsum(dO * O) as the diagonal of dO @ O^T through the same IEEE dot
#: that forms dP in the main kernels, so that dP - delta rounds alike where a row sees one key (P = 1,
#: O = V; the float64 and PyTorch float32 gradients are exactly 0 there). Measured on the H100
#: (session 5, tests/test_dense_backward.py::test_gpu_fp32_delta_by_dot_reduces_single_key_error): max
#: |dq| 2.4e-5 -> 8.4e-6, max |dk| 1.4e-4 -> 2.6e-5 on a single-key shape; closer, not exact, because
#: the forward's O was not exactly V there (its exponent's FMA left the product's rounding residue).
#: With the forward rounding that product on its own for float32 (common.mul_rn) the gradients are
#: exactly 0 on the H100 (session 6, test_gpu_fp32_single_key_exact)
DELTA_DOT_FP32 = True


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class BwdConfig:
    """Tile sizes of the backward.

    BLOCK_N: keys per dK/dV program; BLOCK_M: queries per step of its loop.
    The dQ kernel owns ``dq_block_m`` queries per program and steps over
    ``dq_block_n`` keys; by default (None) they are BLOCK_N and BLOCK_M, so
    that each program owns the larger tile. All are powers of two >= 16.

    ``path``: "portable" (the pointer-load kernels of this module) or "tma"
    (:mod:`.backward_tma`: descriptors, ``tl.range`` pipelining with
    ``num_stages`` stages, Hopper and the interpreter only; always
    deterministic). ``fused`` (tma only): dK/dV and dQ programs in one launch
    instead of two.
    """

    BLOCK_M: int = 32
    BLOCK_N: int = 64
    num_warps: int = 4
    num_stages: int = 2
    dq_block_m: Optional[int] = None
    dq_block_n: Optional[int] = None
    path: str = "portable"
    fused: bool = True

    def __post_init__(self) -> None:
        for name in ("BLOCK_M", "BLOCK_N", "dq_block_m", "dq_block_n"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 16 or v & (v - 1)):
                raise ValueError(f"BwdConfig.{name} must be a power of two >= 16 (tl.dot needs 16); got {v!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"BwdConfig.num_warps must be one of 1, 2, 4, 8, 16; got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"BwdConfig.num_stages must be a positive int; got {self.num_stages!r}")
        if self.path not in BWD_PATHS:
            raise ValueError(f"BwdConfig.path must be one of {BWD_PATHS}; got {self.path!r}")
        if not isinstance(self.fused, bool):
            raise TypeError(f"BwdConfig.fused must be a bool; got {self.fused!r}")

    @property
    def label(self) -> str:
        tail = "" if self.path == "portable" or self.fused else " split"
        return (f"{self.path} {self.BLOCK_M}x{self.BLOCK_N}/{self.dq_m}x{self.dq_n} "
                f"w{self.num_warps} s{self.num_stages}{tail}")

    @property
    def dq_m(self) -> int:
        return self.dq_block_m or self.BLOCK_N

    @property
    def dq_n(self) -> int:
        return self.dq_block_n or self.BLOCK_M


def bwd_config_candidates(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> list[BwdConfig]:
    """Candidates for a backward tile sweep on Hopper, best guess first.

    Each was compiled for sm_90 (triton 3.6, ptxas -v; bf16, causal, both
    modes) and kept only without register spills in either kernel (all
    modifiers on: at most a few dozen bytes); shared memory <= 152 KB.
    The dK/dV program holds two fp32 [BLOCK_N, D] accumulators plus K and V,
    which is what limits the tiles. fp32 (ieee dots run on FMA units, all in
    registers) gets small tiles only.
    """
    d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        return [BwdConfig(16, 32, 4, 1), BwdConfig(16, 16, 4, 1)] if d <= 64 else [BwdConfig(16, 16, 8, 1)]
    if d <= 64:
        return [
            BwdConfig(32, 128, 8, 3), BwdConfig(32, 128, 8, 2), BwdConfig(64, 128, 8, 2), BwdConfig(64, 128, 8, 3),
            BwdConfig(16, 128, 8, 3), BwdConfig(32, 64, 4, 2), BwdConfig(32, 64, 4, 3), BwdConfig(32, 64, 8, 2),
        ]
    if d <= 128:
        return [
            BwdConfig(32, 128, 8, 2), BwdConfig(16, 128, 8, 3), BwdConfig(32, 64, 8, 2), BwdConfig(32, 128, 8, 3),
            BwdConfig(16, 32, 4, 2),
        ]
    return [BwdConfig(32, 32, 8, 2), BwdConfig(16, 32, 8, 2), BwdConfig(16, 32, 4, 1)]


def tma_bwd_config_candidates(head_dim: int) -> list[BwdConfig]:
    """Candidates of the TMA backward (:mod:`.backward_tma`, D in 32/64/128), best guess first.

    The first is FlexAttention's H100 tiling (dK/dV 64x128, dQ 128x64, 8 warps, 3 stages).
    ptxas -v for sm_90a (bf16, H == Hkv; ``scripts/bench_dense_bwd.py --sm90``), causal / not:
    at D128 the 64x128 tiles take 247 / 239 registers, no spills, 161 KB of shared memory at 3
    stages (128 KB at 2, 194 KB at 4), one CTA per SM; 32x128 takes 201 / 203; 64x64 with 4 warps
    and 2 stages takes 246 / 239 and 97 KB, so two CTAs fit an SM. At D64: 64x128 180 / 181
    registers, 81 KB; 64x64 4 warps 3 stages 175 / 180, 65 KB. Softcap costs the 64x128 tiles a
    few dozen spill bytes at D128 (see :func:`pick_bwd_config`). The portable kernels at 64x128
    spill 80-170 bytes, which is why they stayed at 32x128.
    """
    t = dict(path="tma")
    small = [BwdConfig(64, 64, 4, 3 if head_dim <= 64 else 2, **t)]  # 4 warps: two CTAs per SM
    return [BwdConfig(64, 128, 8, 3, **t)] + small + [
        BwdConfig(64, 128, 8, 2, **t), BwdConfig(64, 128, 8, 4, **t), BwdConfig(64, 128, 8, 3, fused=False, **t),
        BwdConfig(32, 128, 8, 3, dq_block_m=128, dq_block_n=64, **t)]


def pick_bwd_config(head_dim: int, dtype: torch.dtype, seqlen_q: int, seqlen_k: int, tma: bool = False,
                    softcap: bool = False) -> BwdConfig:
    """Heuristic: tiny tiles under the interpreter, the first TMA candidate where ``tma`` (the caller
    checked :func:`.backward_tma.supports`), else the first portable sweep candidate.

    With softcap the TMA path takes 32-query dK/dV steps: tanh(s/c) stays live for the gradient and
    the 64-query tile then spills at D128 (ptxas for sm_90a: 255 registers, 44 bytes of spills).
    Short sequences (<= 64 keys) take 64-key blocks so that fewer rows idle.
    """
    if interpreter_mode():
        return BwdConfig(BLOCK_M=16, BLOCK_N=32, num_warps=1, num_stages=1)
    if tma:
        if softcap and head_dim > 64:
            return BwdConfig(32, 128, 8, 3, dq_block_m=128, dq_block_n=64, path="tma")
        return tma_bwd_config_candidates(head_dim)[0]
    cfg = bwd_config_candidates(head_dim, dtype)[0]
    if max(seqlen_q, seqlen_k) <= 64 and cfg.BLOCK_N > 64:
        cfg = BwdConfig(cfg.BLOCK_M, 64, 4, cfg.num_stages)
    return cfg


# --------------------------------------------------------------------------- jitted helpers


@triton.jit
def _scores(qk, rel, scale, softcap, slope, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DTYPE: tl.constexpr,
            EXACT: tl.constexpr = False):
    """Scores of a tile before masking, and tanh(s/c) for the softcap gradient.

    ``rel`` = query position - key position, broadcast to the tile's orientation
    ([M, N] in the dQ kernel, [N, M] in the dK/dV kernel). EXACT (split scores): the returned tanh,
    the gradient's, is taken to fp32 accuracy (1 - tanh^2 near saturation is as sensitive to
    tanh.approx's 2^-11 as to the scores), while the scores keep the forward's tanh: p must match
    the LSE that the forward formed with it.
    """
    s = qk * scale
    th = s
    if SOFTCAP:
        x = s / softcap
        th = tanh_for(x, DTYPE)  # the forward's tanh for this dtype
        s = softcap * th
        if EXACT:
            th = tanh_f32(x)
    if ALIBI:
        s = s - slope * tl.abs(rel).to(tl.float32)
    return s, th


@triton.jit
def _row_stats(LSE, DELTA, l_base, rows, ok):
    """LSE (times log2 e, for exp2) and delta of a row block."""
    lse = tl.load(LSE + l_base + rows, mask=ok, other=float("inf"))
    # fully masked rows carry LSE = -inf: +inf makes their p exactly 0 instead of NaN
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + l_base + rows, mask=ok, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_step(dk, dv, k, v, q_base, do_base, LSE, DELTA, l_base, DQ_base, start_m, masked, offs_n,
               q_start, seqlen_q, seqlen_k, off, scale, softcap, slope, win_left, win_right,
               stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqm, stride_dqd,
               q_lo_base, k_lo,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, FUSE_DQ: tl.constexpr, DOT_PREC: tl.constexpr,
               SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One query block against the program's key block, transposed (S^T = K Q^T, [BLOCK_N, BLOCK_M]).

    ``masked`` (runtime) says whether this block needs the causal/window/bounds mask. SPLIT: the
    scores add the residues' products (``q_lo_base``: rows of q's residue, same strides as q;
    ``k_lo``: the key block's residue tile).
    """
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = q_start + offs_m
    m_ok = offs_m < seqlen_q
    q = load_tile(q_base, rows, q_start + seqlen_q, stride_qm, stride_qd, HEAD_DIM, BLOCK_D, True)
    do = load_tile(do_base, rows, q_start + seqlen_q, stride_dom, stride_dod, HEAD_DV, BLOCK_DV, True)
    lse2, delta = _row_stats(LSE, DELTA, l_base, rows * stride_lm, m_ok)

    rel = offs_m[None, :] + off - offs_n[:, None]
    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
    if SPLIT:
        q_lo = load_tile(q_lo_base, rows, q_start + seqlen_q, stride_qm, stride_qd, HEAD_DIM, BLOCK_D, True)
        qkT += tl.dot(k_lo, tl.trans(q), tl.dot(k, tl.trans(q_lo), input_precision=DOT_PREC),
                      input_precision=DOT_PREC)
    sT, thT = _scores(qkT, rel, scale, softcap, slope, SOFTCAP, ALIBI, q.dtype, SPLIT)
    if masked:
        ok = m_ok[None, :] & (offs_n < seqlen_k)[:, None] & (rel >= -win_right) & (rel <= win_left)
        sT = tl.where(ok, sT, float("-inf"))
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
        # relaxed: the adds need no ordering, only atomicity (cheaper than the default acq_rel)
        tl.atomic_add(DQ_base + rows[:, None] * stride_dqm + cols[None, :] * stride_dqd, dq,
                      mask=m_ok[:, None] & (cols < HEAD_DIM)[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, m_ok,
             k_start, seqlen_k, off, scale, softcap, slope, win_left, win_right,
             stride_kn, stride_kd, stride_vn, stride_vd, q_lo, k_lo_base,
             MASK: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DOT_PREC: tl.constexpr,
             SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One key block against the program's query block ([BLOCK_M, BLOCK_N] orientation).

    SPLIT: the scores add the residues' products (``q_lo``: the query block's residue tile;
    ``k_lo_base``: k's residue, same strides as k).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    rows = k_start + offs_n
    k = load_tile(k_base, rows, k_start + seqlen_k, stride_kn, stride_kd, HEAD_DIM, BLOCK_D, MASK)
    v = load_tile(v_base, rows, k_start + seqlen_k, stride_vn, stride_vd, HEAD_DV, BLOCK_DV, MASK)
    rel = offs_m[:, None] + off - offs_n[None, :]
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if SPLIT:
        k_lo = load_tile(k_lo_base, rows, k_start + seqlen_k, stride_kn, stride_kd, HEAD_DIM, BLOCK_D, MASK)
        qk += tl.dot(q_lo, tl.trans(k), tl.dot(q, tl.trans(k_lo), input_precision=DOT_PREC),
                     input_precision=DOT_PREC)
    s, th = _scores(qk, rel, scale, softcap, slope, SOFTCAP, ALIBI, q.dtype, SPLIT)
    if MASK:
        ok = m_ok[:, None] & (offs_n < seqlen_k)[None, :] & (rel >= -win_right) & (rel <= win_left)
        s = tl.where(ok, s, float("-inf"))
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
                    IS_VARLEN: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                    DELTA_DOT: tl.constexpr = False):
    """delta = rowsum(dO * O) in fp32, one program per (query block, head); DELTA_DOT: see DELTA_DOT_FP32."""
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
    if DELTA_DOT:
        prod = tl.dot(do, tl.trans(o), input_precision="ieee")
        eye = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_M)[None, :]
        delta = tl.sum(tl.where(eye, prod, 0.0), axis=1)  # adding zeros keeps the diagonal exact
    else:
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + rows * stride_lm, delta, mask=rows < q_start + seqlen_q)


@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DVP, DQ, SLOPES, CU_Q, CU_K, Q_LO, K_LO,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_sb, nq, nk, HKV, GROUP, scale, softcap, win_left, win_right,
    IS_VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    FUSE_DQ: tl.constexpr, DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPLIT: tl.constexpr = False,
):
    """dK, dV of one key block of one kv head, summed over the query heads of its GQA group.

    SPLIT: Q_LO/K_LO hold the residues of the rotated q/k (q's and k's strides): split scores.
    """
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
    k = load_tile(K + b64 * stride_kb + hkv * stride_kh, rows_n, k_start + seqlen_k, stride_kn, stride_kd,
                  HEAD_DIM, BLOCK_D, True)
    v = load_tile(V + b64 * stride_vb + hkv * stride_vh, rows_n, k_start + seqlen_k, stride_vn, stride_vd,
                  HEAD_DV, BLOCK_DV, True)
    k_lo = k
    if SPLIT:
        k_lo = load_tile(K_LO + b64 * stride_kb + hkv * stride_kh, rows_n, k_start + seqlen_k, stride_kn,
                         stride_kd, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # query blocks [lo, hi); those in [full_lo, full_hi) see every key of the block (no mask)
    lo, hi = q_block_range(n0, seqlen_q, seqlen_k, win_left, win_right, BLOCK_N, False, HAS_WINDOW)
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = lo
    full_hi = lo
    if n0 + BLOCK_N <= seqlen_k:
        # all pairs allowed iff m0 + off + right >= n0 + BLOCK_N - 1 and m0 + BLOCK_M - 1 + off - left <= n0
        first = tl.maximum(n0 + BLOCK_N - 1 - off - win_right, lo)
        full_lo = tl.minimum(((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, hi)
        last = tl.minimum(tl.minimum(n0 - off + win_left + 1, seqlen_q), hi)
        full_hi = tl.maximum((last // BLOCK_M) * BLOCK_M, full_lo)

    for g in range(0, GROUP):
        h = hkv * GROUP + g
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + b64 * stride_sb + h).to(tl.float32)
        l_base = b64 * stride_lb + h * stride_lh
        for start_m in range(lo, hi, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Q + b64 * stride_qb + h * stride_qh, DO + b64 * stride_dob + h * stride_doh,
                                LSE, DELTA, l_base, DQ + b64 * stride_dqb + h * stride_dqh, start_m,
                                (start_m < full_lo) | (start_m >= full_hi), offs_n,
                                q_start, seqlen_q, seqlen_k, off, scale, softcap, slope, win_left, win_right,
                                stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqm, stride_dqd,
                                Q_LO + b64 * stride_qb + h * stride_qh, k_lo,
                                SOFTCAP, ALIBI, FUSE_DQ, DOT_PREC, SPLIT, HEAD_DIM, HEAD_DV, BLOCK_M, BLOCK_D,
                                BLOCK_DV)

    n_ok = offs_n < seqlen_k
    cols = tl.arange(0, BLOCK_D)
    tl.store(DK + b64 * stride_dkb + hkv * stride_dkh + rows_n[:, None] * stride_dkn + cols[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & (cols < HEAD_DIM)[None, :])
    cols_v = tl.arange(0, BLOCK_DV)
    tl.store(DVP + b64 * stride_dvb + hkv * stride_dvh + rows_n[:, None] * stride_dvn + cols_v[None, :] * stride_dvd,
             dv.to(DVP.dtype.element_ty), mask=n_ok[:, None] & (cols_v < HEAD_DV)[None, :])


@triton.jit
def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, SLOPES, CU_Q, CU_K, Q_LO, K_LO,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_sb, nq, nk, H, GROUP, scale, softcap, win_left, win_right,
    IS_VARLEN: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPLIT: tl.constexpr = False,
):
    """dQ of one query block of one head (deterministic mode); SPLIT: as :func:`_bwd_dkdv`."""
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
    q = load_tile(Q + b64 * stride_qb + h * stride_qh, rows, q_start + seqlen_q, stride_qm, stride_qd,
                  HEAD_DIM, BLOCK_D, True)
    do = load_tile(DO + b64 * stride_dob + h * stride_doh, rows, q_start + seqlen_q, stride_dom, stride_dod,
                   HEAD_DV, BLOCK_DV, True)
    lse2, delta = _row_stats(LSE, DELTA, b64 * stride_lb + h * stride_lh, rows * stride_lm, m_ok)
    slope = 0.0
    if ALIBI:
        slope = tl.load(SLOPES + b64 * stride_sb + h).to(tl.float32)
    q_lo = q
    if SPLIT:
        q_lo = load_tile(Q_LO + b64 * stride_qb + h * stride_qh, rows, q_start + seqlen_q, stride_qm, stride_qd,
                         HEAD_DIM, BLOCK_D, True)
    k_lo_base = K_LO + b64 * stride_kb + (h // GROUP) * stride_kh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b64 * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b64 * stride_vb + (h // GROUP) * stride_vh
    # key blocks: [lo, full_lo) and [full_hi, hi) masked, [full_lo, full_hi) mask-free
    lo, full_lo, full_hi, hi = kv_block_range(m0, seqlen_q, seqlen_k, win_left, win_right, BLOCK_M, BLOCK_N,
                                              False, HAS_WINDOW)
    for start_n in range(lo, full_lo, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, m_ok, k_start, seqlen_k, off,
                      scale, softcap, slope, win_left, win_right, stride_kn, stride_kd, stride_vn, stride_vd,
                      q_lo, k_lo_base, True, SOFTCAP, ALIBI, DOT_PREC, SPLIT, HEAD_DIM, HEAD_DV, BLOCK_N,
                      BLOCK_D, BLOCK_DV)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, m_ok, k_start, seqlen_k, off,
                      scale, softcap, slope, win_left, win_right, stride_kn, stride_kd, stride_vn, stride_vd,
                      q_lo, k_lo_base, False, SOFTCAP, ALIBI, DOT_PREC, SPLIT, HEAD_DIM, HEAD_DV, BLOCK_N,
                      BLOCK_D, BLOCK_DV)
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_m, m_ok, k_start, seqlen_k, off,
                      scale, softcap, slope, win_left, win_right, stride_kn, stride_kd, stride_vn, stride_vd,
                      q_lo, k_lo_base, True, SOFTCAP, ALIBI, DOT_PREC, SPLIT, HEAD_DIM, HEAD_DV, BLOCK_N,
                      BLOCK_D, BLOCK_DV)
    cols = tl.arange(0, BLOCK_D)
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + cols[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (cols < HEAD_DIM)[None, :])


# --------------------------------------------------------------------------- host side


def _lse_strides(t: torch.Tensor, varlen: bool) -> Tuple[int, int, int]:
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


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
    H, D, Hkv, Dv = q.shape[1], q.shape[hd], k.shape[1], v.shape[hd]
    if not (1 <= D <= MAX_HEAD_DIM and 1 <= Dv <= MAX_HEAD_DIM):
        raise ValueError(f"head dims from 1 to {MAX_HEAD_DIM} are supported; got q {describe(q)}, v {describe(v)}")
    if k.shape[hd] != D:
        raise ValueError(f"k must have q's head dim {D}; got k {describe(k)}, q {describe(q)}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv}); got q {describe(q)}, k {describe(k)}")
    kv_shape, o_shape = list(k.shape), list(q.shape)
    kv_shape[hd] = o_shape[hd] = Dv
    if list(v.shape) != kv_shape:
        raise ValueError(f"v must match k except in its head dim; got k {describe(k)}, v {describe(v)}")
    for name, t in (("o", o), ("do", do)):
        if list(t.shape) != o_shape:
            raise ValueError(f"{name} must have shape {tuple(o_shape)} (q's with v's head dim); got {describe(t)}")
    lse_shape = (H, q.shape[0]) if varlen else (q.shape[0], H, q.shape[2])
    if tuple(lse.shape) != lse_shape:
        raise ValueError(f"lse must have shape {lse_shape}; got {describe(lse)}")
    if varlen:
        require_int_tensor("cu_seqlens_q", cu_seqlens_q, 1)
        require_int_tensor("cu_seqlens_k", cu_seqlens_k, 1)
        require_same_device(("q", "cu_seqlens_q", "cu_seqlens_k"), (q, cu_seqlens_q, cu_seqlens_k))
        if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() < 2:
            raise ValueError("cu_seqlens_q and cu_seqlens_k must both hold batch + 1 >= 2 offsets; got "
                             f"{describe(cu_seqlens_q)} and {describe(cu_seqlens_k)}")
    if alibi_slopes is not None:
        require_tensor("alibi_slopes", alibi_slopes)
        nb = (cu_seqlens_q.numel() - 1) if varlen else q.shape[0]
        if tuple(alibi_slopes.shape) not in ((H,), (nb, H)):
            raise ValueError(f"alibi_slopes must have shape ({H},) or ({nb}, {H}); got {describe(alibi_slopes)}")
        require_same_device(("q", "alibi_slopes"), (q, alibi_slopes))


def _rope_tables(rope: RopeSpec, D: int, spans, device) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """fp32 cos/sin tables covering every position in ``spans`` ((first, last + 1) intervals), and the
    position of their row 0 (below 0 when Nq > Nk puts queries before key 0)."""
    if D % 2:
        raise ValueError(f"rope needs an even head dim; got {D}")
    spans = [r for r in spans if r[1] > r[0]]
    pmin = min((a for a, _ in spans), default=0)
    pmax = max((b for _, b in spans), default=1)
    if rope.cos is None:
        return (*theta_tables(float(rope.theta), D, pmin, max(pmax, pmin + 1), str(device)), pmin)
    if tuple(rope.cos.shape[1:]) != (D // 2,):
        raise ValueError(f"rope cos/sin must have shape [max_pos, {D // 2}]; got {describe(rope.cos)}")
    if pmin < 0 or pmax > rope.cos.shape[0]:
        raise ValueError(f"rope cos/sin tables have {rope.cos.shape[0]} positions; positions {pmin}..{pmax - 1} "
                         "are needed")
    f32 = dict(device=device, dtype=torch.float32)
    return rope.cos.to(**f32).contiguous(), rope.sin.to(**f32).contiguous(), 0


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

    Shapes (BHSD, any strides): do/o [B, H, Nq, Dv], q [B, H, Nq, D],
    k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], lse fp32 [B, H, Nq] (natural log,
    -inf on fully masked rows). Varlen (cu_seqlens_q/k int32 [batch + 1]):
    q/o/do [Tq, H, D(v)], k/v [Tk, Hkv, D(v)], lse [H, Tq]; max_seqlen_q/k,
    when given, must be >= the longest sequence (then no host sync happens
    unless rope is set). H % Hkv == 0, D and Dv <= 256, dtypes
    fp16/bf16/fp32. The modifiers (causal, scale, window, softcap,
    alibi_slopes [H] or [B, H], rope) must be those of the forward; their
    semantics are :mod:`attention_proto.ops.dense.reference`'s.

    Returns dq, dk, dv shaped and typed like q, k, v (contiguous).
    ``deterministic=True`` gives bitwise-identical results across runs;
    ``deterministic=False`` lets the portable kernels fuse dQ into the dK/dV pass
    with fp32 atomics (the TMA path is deterministic either way).
    ``config``: tiles and path (see :class:`BwdConfig`); None picks the TMA path
    where it applies (:func:`pick_bwd_config`). An explicit ``path="tma"`` config
    on inputs it does not support raises ValueError with the reasons.
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (varlen); got only one")
    _validate(do, q, k, v, o, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, varlen)
    if config is not None and not isinstance(config, BwdConfig):
        raise TypeError(f"config must be a BwdConfig or None; got {describe(config)}")
    left, right = normalize_window(window)
    window_lr = (left, right)  # before causal is folded in (the TMA path takes both)
    if causal:  # causal is a right window of 0 (both bottom-right aligned)
        right = 0 if right < 0 else min(right, 0)
    D, Dv = q.shape[-1], v.shape[-1]
    sc = (1.0 / math.sqrt(D)) if scale is None else float(scale)
    use_softcap = softcap is not None and float(softcap) > 0
    # split scores (module docstring): RoPE rounds the rotated operands, softcap's gradient amplifies it
    split = SPLIT_ROPE_SOFTCAP_SCORES and rope is not None and use_softcap and q.dtype != torch.float32

    lq = lk = None  # per-sequence lengths, read on the host only when needed (one sync)
    if varlen:
        H, Hkv, B = q.shape[1], k.shape[1], cu_seqlens_q.numel() - 1
        if max_seqlen_q is None or max_seqlen_k is None or rope is not None:
            cq, _ = host_offsets(cu_seqlens_q)  # the forward's host copy when the tensor is unchanged
            ck, _ = host_offsets(cu_seqlens_k)
            lq = [b - a for a, b in zip(cq, cq[1:])]
            lk = [b - a for a, b in zip(ck, ck[1:])]
            if cq[-1] != q.shape[0] or ck[-1] != k.shape[0] or min(lq + lk) < 0:
                raise ValueError(f"cu_seqlens must be non-decreasing and end at Tq={q.shape[0]} / Tk={k.shape[0]}; "
                                 f"got {cq} and {ck}")
        nq = max(max_seqlen_q or 0, max(lq) if lq else 0)  # grid sizes
        nk = max(max_seqlen_k or 0, max(lk) if lk else 0)
    else:
        B, H, nq, _ = q.shape
        Hkv, nk = k.shape[1], k.shape[2]
        lq, lk = [nq], [nk]
    dev = q.device
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    # with rope the main kernels see rotated q/k and produce fp32 gradients w.r.t. them
    gdt = torch.float32 if rope is not None else None
    dq = torch.empty(q.shape, dtype=gdt or q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=gdt or k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    if POISON_OUTPUTS:
        for t in (dq, dk, dv, delta):
            t.fill_(float("nan"))
    slopes = alibi_slopes.to(torch.float32).contiguous() if alibi_slopes is not None else delta
    stride_sb = slopes.stride(0) if (alibi_slopes is not None and slopes.dim() == 2) else 0
    cu_q = cu_seqlens_q.to(torch.int32).contiguous() if varlen else delta
    cu_k = cu_seqlens_k.to(torch.int32).contiguous() if varlen else delta
    if config is None:
        # the TMA backward wherever it applies (TMA_BACKWARD_DEFAULT), except for split scores
        tma_ok = TMA_BACKWARD_DEFAULT and not varlen and not split and not backward_tma.supports(q, k, v)
        cfg = pick_bwd_config(D, q.dtype, nq, nk, tma=tma_ok, softcap=use_softcap)
    else:
        cfg = config
    if cfg.path == "tma" and split:
        raise ValueError("the TMA backward path (BwdConfig.path='tma') does not take rope together with softcap "
                         f"for 16-bit inputs (got q {describe(q)}): their gradient needs split-precision scores, "
                         "which only the portable kernels compute; pass config=None or a portable BwdConfig")
    if cfg.path == "tma":
        reasons = backward_tma.supports(q, k, v, varlen=varlen, check_device=not interpreter_mode())
        if reasons:
            raise ValueError("the TMA backward path (BwdConfig.path='tma') does not apply: " + "; ".join(reasons))
    BD = max(16, triton.next_power_of_2(D))
    BDV = max(16, triton.next_power_of_2(Dv))
    small = interpreter_mode()

    q_in, k_in = q, k
    if rope is not None:
        qo = [rope.resolved_q_offset(a, b) for a, b in zip(lq, lk)]
        spans = [(s, s + n) for s, n in zip(qo, lq)] + [(rope.k_offset, rope.k_offset + n) for n in lk]
        cos, sin, pos0 = _rope_tables(rope, D, spans, dev)

        def rope_pass(x: torch.Tensor, is_q: bool, inverse: bool, dtype: torch.dtype, lo=None) -> torch.Tensor:
            y = torch.empty(x.shape, dtype=dtype, device=dev)
            pos_off = (-pos0 if (rope.q_offset is None or not is_q) else int(rope.q_offset) - pos0)
            pos_off += 0 if is_q else int(rope.k_offset)
            rotate_rows(x, y, cos, sin, cu_q, cu_k, varlen=varlen, batch=B, nq=nq, nk=nk, is_q=is_q,
                        q_default=rope.q_offset is None, pos_off=pos_off, mode=1 if rope.layout == "half" else 2,
                        inverse=inverse, y_lo=lo)
            return y

        if split:  # residues with the temporaries' own (contiguous) strides: the kernels reuse q's/k's
            q_lo = torch.empty(q.shape, dtype=q.dtype, device=dev)
            k_lo = torch.empty(k.shape, dtype=k.dtype, device=dev)
        q_in = rope_pass(q, True, False, q.dtype, q_lo if split else None)
        k_in = rope_pass(k, False, False, k.dtype, k_lo if split else None)
    if not split:
        q_lo, k_lo = q_in, k_in  # unused (SPLIT=False)

    if cfg.path == "tma":  # always deterministic: separate dK/dV and dQ programs, no atomics
        backward_tma.run_tma_backward(
            do, q_in, k_in, v, o, lse, dq, dk, dv, sm_scale=sc, causal=causal, left=window_lr[0],
            right=window_lr[1], softcap=float(softcap) if use_softcap else None,
            slopes=slopes if alibi_slopes is not None else None, config=cfg, poison=POISON_OUTPUTS)
        if rope is not None:
            dq, dk = rope_pass(dq, True, True, q.dtype), rope_pass(dk, False, True, k.dtype)
        return dq, dk, dv

    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    pre_m = 16 if small else 64
    KERNEL_CACHE.launch(
        _bwd_preprocess, (triton.cdiv(nq, pre_m), B * H),
        o, do, delta, cu_q, *_strides4(o, varlen), *_strides4(do, varlen), *_lse_strides(delta, varlen), H, nq,
        IS_VARLEN=varlen, HEAD_DV=Dv, BLOCK_M=pre_m, BLOCK_DV=BDV, num_warps=1 if small else 4,
        DELTA_DOT=DELTA_DOT_FP32 and o.dtype == torch.float32 and do.dtype == torch.float32,
    )
    fuse = not deterministic
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=dev) if fuse else dq
    flags = dict(
        IS_VARLEN=varlen, HAS_WINDOW=left >= 0 or right >= 0, SOFTCAP=use_softcap, ALIBI=alibi_slopes is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", HEAD_DIM=D, HEAD_DV=Dv, BLOCK_D=BD, BLOCK_DV=BDV,
    )
    mods = (sc, float(softcap) if use_softcap else 1.0,
            left if left >= 0 else WINDOW_UNBOUNDED, right if right >= 0 else WINDOW_UNBOUNDED)
    common_args = (*_strides4(q_in, varlen), *_strides4(k_in, varlen), *_strides4(v, varlen),
                   *_strides4(do, varlen), *_lse_strides(lse, varlen))
    KERNEL_CACHE.launch(
        _bwd_dkdv, (triton.cdiv(nk, cfg.BLOCK_N), B * Hkv),
        q_in, k_in, v, do, lse, delta, dk, dv, dq_acc, slopes, cu_q, cu_k, q_lo, k_lo,
        *common_args, *_strides4(dk, varlen), *_strides4(dv, varlen), *_strides4(dq_acc, varlen),
        stride_sb, nq, nk, Hkv, H // Hkv, *mods,
        FUSE_DQ=fuse, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, SPLIT=split, **flags, **launch,
    )
    if fuse:
        dq = dq_acc if rope is not None else dq_acc.to(q.dtype)
    else:
        KERNEL_CACHE.launch(
            _bwd_dq, (triton.cdiv(nq, cfg.dq_m), B * H),
            q_in, k_in, v, do, lse, delta, dq, slopes, cu_q, cu_k, q_lo, k_lo,
            *common_args, *_strides4(dq, varlen), stride_sb, nq, nk, H, H // Hkv, *mods,
            BLOCK_M=cfg.dq_m, BLOCK_N=cfg.dq_n, SPLIT=split, **flags, **launch,
        )
    if rope is not None:  # d/dx of R x is R^T applied to the gradient
        dq, dk = rope_pass(dq, True, True, q.dtype), rope_pass(dk, False, True, k.dtype)
    return dq, dk, dv
