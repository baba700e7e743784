"""Portable FlashAttention forward (Triton): runs on any CUDA GPU and under the interpreter.

Design
------
- One program per (query block of BLOCK_M rows, batch * head); grid ``(cdiv(Nq, BLOCK_M), B * H)``.
  Query head ``h`` reads KV head ``h // (H // Hkv)`` through strides (GQA/MQA without copies).
- Q is loaded once (RoPE fused into the load); the program walks its key blocks with the
  online softmax in fp32, in the log2 domain (``exp2``; scores are multiplied by log2(e)).
- Key blocks come in three ranges (:func:`common.kv_block_range`): masked edges and a
  mask-free middle, so causal/window tiles pay for masks only on the diagonal band and fully
  masked blocks are never visited. With causal masks the query blocks run longest-first.
- Every tensor goes through its strides: BHSD, BSHD (a transposed view), slices; the output
  is allocated like q (``empty_like`` keeps q's stride order).
- fp32 inputs use ``tl.dot(..., input_precision="ieee")``: true fp32 products rather than TF32,
  so fp32 results stay within the error rule against the float64 reference.
- Fully masked rows (no allowed key) give output 0 and LSE -inf, never NaN: the running max is
  replaced by 0 in the exponent while it is still -inf.
- Varlen: packed q [Tq, H, D], k/v [Tk, Hkv, D] with ``cu_seqlens``; the batch index selects a
  sequence whose own lengths define the bottom-right alignment; lse is [H, Tq].
- Plain scores keep the softmax scale out of the tile: the row max is taken on raw ``q k^T`` and
  ``exp2(qk * scale * log2(e) - m)`` is one FFMA per element (see :func:`attn_step`).

Host side: a call's host work (path and config choice, TMA support checks, strides, integer
arguments, constexprs) is cached in a launch plan keyed by everything it depends on but the data
pointers and float values; a repeated call only builds its tensor arguments and, on a GPU, launches
the compiled kernel through ``runtime.cache.DirectLaunch`` instead of Triton's argument binding.
Unused pointer arguments (ALiBi, RoPE tables, cu_seqlens, an unwanted LSE) go in as None, which
Triton treats as a constexpr (the launcher converts fewer pointers). Problems of at most
:data:`.configs.SMALL_PROBLEM_SCORES` scores run the portable kernel (no descriptors to encode).

Hooks: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` and ``mask_mod(b, h, q_idx, kv_idx) ->
bool`` are ``@triton.jit`` functions applied to whole tiles: ``score`` is the [BLOCK_M, BLOCK_N]
fp32 tile of scaled scores (natural units, after softcap and ALiBi), ``q_idx`` is [BLOCK_M, 1],
``kv_idx`` is [1, BLOCK_N] (positions inside the sequence), ``b``/``h`` are scalars; results must
broadcast to the tile. They run before the built-in causal/window masks. A mask_mod disables
nothing else: block skipping still follows only the built-in masks.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Hashable, Iterator, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...runtime.cache import KERNEL_CACHE
from ...runtime.device import interpreter_mode, l2_bytes, sm_count_of
from ...runtime.validation import describe
from .common import (WINDOW_UNBOUNDED, apply_mask, apply_score_mods, key_start_bounds, kv_block_range,
                     load_rope_tile, load_tile, mul_rn, split_hi_lo, tanh_for)
from .configs import (RELOAD_HOOKS, SMALL_PROBLEM_SCORES, FwdConfig, block_d, fits, pick_forward_config,
                      shared_memory_bytes)
from .rope import RopeSpec, rope_tables
from .rope_kernel import rope_pass, rotate_into

_LOG2E = 1.4426950408889634


def natural_scores(has_softcap: bool, has_alibi: bool, causal: bool, score_mod: Any, positive_scale: bool) -> bool:
    """USE_NATURAL of a launch: whether the scores take :func:`attn_step`'s general path (natural
    units, every modifier composable) rather than a late-scaled one (plain, softcap alone, ALiBi
    alone under a causal mask; all need a positive scale)."""
    if score_mod is not None or not positive_scale:
        return True
    if has_softcap and has_alibi:
        return True
    return has_alibi and not causal


@triton.jit
def attn_step(acc, l_i, m_i, q, k, v, b, h, offs_m, offs_n, seqlen_k, off,
              sm_scale, qk_scale2, softcap, slope, alibi_rel, win_left, win_right,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, SCORE_MOD: tl.constexpr,
              MASK_MOD: tl.constexpr, USE_NATURAL: tl.constexpr, HAS_HOOKS: tl.constexpr,
              DOT_PREC: tl.constexpr, q_lo, k_lo, SPLIT: tl.constexpr):
    """One online-softmax update with key tile ``k`` [BLOCK_N, BLOCK_D] and value tile ``v``.

    SPLIT (split scores, :data:`SPLIT_ROPE_SOFTCAP_SCORES`): ``q_lo``/``k_lo`` are the 16-bit rounding
    residues of the rotated q and k tiles, and the scores add ``q.k_lo + q_lo.k`` (the backward's form).

    ``m_i`` is the running row max in log2 units, ``l_i`` the running row sum, ``acc`` the
    unnormalised output. Shared by the portable and the TMA kernels.

    Plain scores (not USE_NATURAL) stay unscaled: the row max is taken on ``qk`` and scaled once
    per row, and ``exp2(qk * qk_scale2 - m)`` is one FFMA per element (scaling first costs an
    extra FMUL per element: the scaled tile feeds both the max and the exponent). This needs
    ``qk_scale2 > 0``; the host sends other scales through USE_NATURAL.

    Two modifiers have a cheaper form when alone (no hooks, positive scale; the host decides,
    :func:`natural_scores`, and sends every other combination through USE_NATURAL):

    - softcap: the tile holds ``t = tanh(qk * (scale / c))`` (one FMUL and, for 16-bit inputs, one
      ``tanh.approx``: :func:`.common.tanh_for`) and, like plain scores, is scaled late: ``exp2(t * c * log2(e) - m)`` is one
      FFMA (the general path: FMULs, a division and an exp2-based tanh).
    - ALiBi under a causal mask (every visible key has ``j <= i + off``, so the bias is
      ``slope * (j - i - off)``, no absolute value): the bias splits into a row term
      ``-slope * (i - m0)`` (``m0`` the program's first row), which the softmax ignores and the
      kernel's epilogue takes off the LSE (:func:`alibi_lse_shift`), a per-tile scalar
      ``slope * alibi_rel`` (``alibi_rel = start_n - m0 - off``) that goes into the row max, and
      ``slope * c`` for column c of the tile, added by the scaling FFMA (``qk * scale + slope *
      c``): one FADD per score more than plain (the exponent's ``s - m``). Adding the column
      term on the tensor cores instead (a 16-deep dot of ones with the bias split in three
      input-dtype parts) needs a 4 KB operand tile that does not fit beside the tuned
      128x128x3-stage tile's 224 KB on the H100. Every term stays small (relative to the block),
      so large positions lose no precision.
    """
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if SPLIT:
        qk += tl.dot(q, tl.trans(k_lo), tl.dot(q_lo, tl.trans(k), input_precision=DOT_PREC), input_precision=DOT_PREC)
    late = qk_scale2  # scale applied in the exponent's FFMA (every path but USE_NATURAL's)
    shift = 0.0  # per-tile scalar added to every score of the tile (fast ALiBi), in log2 units
    if USE_NATURAL:
        s = qk * sm_scale
        s = apply_score_mods(s, offs_m, offs_n, off, softcap, slope, HAS_SOFTCAP, HAS_ALIBI, q.dtype)
        if SCORE_MOD is not None:
            s = SCORE_MOD(s, b, h, offs_m[:, None], offs_n[None, :])
        s = s * 1.4426950408889634
    elif HAS_SOFTCAP:
        s = tanh_for(qk * (sm_scale / softcap), q.dtype)
        late = softcap * 1.4426950408889634
    elif HAS_ALIBI:
        slope2 = slope * 1.4426950408889634
        s = qk * qk_scale2 + (slope2 * tl.arange(0, k.shape[0]).to(tl.float32))[None, :]
        late = 1.0
        shift = slope2 * alibi_rel.to(tl.float32)
    else:
        s = qk
    if MASKED:
        s = apply_mask(s, offs_m, offs_n, seqlen_k, off, win_left, win_right, IS_CAUSAL, HAS_WINDOW, True)
    if MASK_MOD is not None:
        s = tl.where(MASK_MOD(b, h, offs_m[:, None], offs_n[None, :]), s, float("-inf"))
    if USE_NATURAL:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * late + shift)
    if MASKED or HAS_HOOKS:
        # rows with no allowed key yet: exponentiate against 0, not -inf (-inf - -inf = NaN)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    if USE_NATURAL:
        p = tl.math.exp2(s - m_use[:, None])
    elif q.dtype == tl.float32:
        # float32 inputs: the row max takes exp2(0) = 1 exactly, as in the reference's softmax (a fused
        # s * late - m leaves the product's rounding residue), so a row with one visible key returns
        # that value exactly and the backward cancels there (see backward.DELTA_DOT_FP32). Not on the
        # fast causal-ALiBi form, whose per-tile shift rounds m - shift (shift is 0 everywhere else)
        p = tl.math.exp2(mul_rn(s, late) - (m_use - shift)[:, None])
    else:
        p = tl.math.exp2(s * late - (m_use - shift)[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def alibi_lse_shift(lse, offs_m, m0, slope, HAS_ALIBI: tl.constexpr, USE_NATURAL: tl.constexpr):
    """The true LSE from the one :func:`attn_step`'s causal-ALiBi form leaves (natural units).

    That form drops the row term ``-slope * (i - m0)`` from every score of row i, so the LSE it
    accumulates is too large by ``slope * (i - m0)``; -inf (fully masked rows) stays -inf.
    """
    if HAS_ALIBI and not USE_NATURAL:
        lse = lse - slope * (offs_m - m0).to(tl.float32)
    return lse


@triton.jit
def _fwd_block(acc, l_i, m_i, q, q_lo, k_base, k_lo_base, v_base, start_n, b, h, offs_m, seqlen_k, off,
               skn, skd, svn, svd, sm_scale, qk_scale2, softcap, slope, alibi_c0, win_left, win_right,
               COS, SIN, stride_cs, max_pos, rope_k_off,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, ROPE: tl.constexpr,
               SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, USE_NATURAL: tl.constexpr,
               HAS_HOOKS: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr):
    # SPLIT: the key tile's rounding residue comes from the rotation in registers (ROPE) or from
    # k_lo_base (keys rotated before the launch, residues beside them with k's strides)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if ROPE != 0:
        k32 = load_rope_tile(k_base, offs_n, seqlen_k, skn, skd, rope_k_off, COS, SIN, stride_cs, max_pos,
                             ROPE, HEAD_DIM, BLOCK_D, MASKED)
        if SPLIT:
            k, k_lo = split_hi_lo(k32, q.dtype)
        else:
            k = k32.to(q.dtype)
            k_lo = k
    else:
        k = load_tile(k_base, offs_n, seqlen_k, skn, skd, HEAD_DIM, BLOCK_D, MASKED)
        if SPLIT:
            k_lo = load_tile(k_lo_base, offs_n, seqlen_k, skn, skd, HEAD_DIM, BLOCK_D, MASKED)
        else:
            k_lo = k
    v = load_tile(v_base, offs_n, seqlen_k, svn, svd, HEAD_DIM, BLOCK_D, MASKED)
    return attn_step(acc, l_i, m_i, q, k, v, b, h, offs_m, offs_n, seqlen_k, off,
                     sm_scale, qk_scale2, softcap, slope, start_n - alibi_c0, win_left, win_right,
                     MASKED, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, SCORE_MOD, MASK_MOD,
                     USE_NATURAL, HAS_HOOKS, DOT_PREC, q_lo, k_lo, SPLIT)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, ALIBI, COS, SIN, CU_Q, CU_K, KEY_START, Q_LO, K_LO,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, slb, slh, slm,
    seqlen_q_arg, seqlen_k_arg, H, GROUP, num_m_blocks,
    sm_scale, qk_scale2, softcap, win_left, win_right,
    stride_cs, max_pos, rope_q_off, rope_q_auto, rope_k_off,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    ROPE: tl.constexpr, SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, USE_NATURAL: tl.constexpr,
    HAS_HOOKS: tl.constexpr, IS_VARLEN: tl.constexpr, CHECK_M: tl.constexpr, REVERSE_M: tl.constexpr,
    DOT_PREC: tl.constexpr, SPLIT: tl.constexpr = False,
):
    # SPLIT: split scores (RoPE + softcap, 16-bit): with ROPE the residues of the rotated q/k are taken
    # in registers; without (q and k rotated before the launch), Q_LO/K_LO hold them with q's/k's strides
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if REVERSE_M:
        # causal: the last query blocks see the most keys; start them first
        pid_m = num_m_blocks - 1 - pid_m
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    if IS_VARLEN:
        cq0 = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - cq0
        ck0 = tl.load(CU_K + b)
        seqlen_k = tl.load(CU_K + b + 1) - ck0
        q_start = cq0.to(tl.int64)
        k_start = ck0.to(tl.int64)
    else:
        seqlen_q = seqlen_q_arg
        seqlen_k = seqlen_k_arg
        q_start = 0
        k_start = 0
    m0 = pid_m * BLOCK_M
    if IS_VARLEN:
        if m0 >= seqlen_q:
            return
    off = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q_base = Q + b64 * sqb + h64 * sqh + q_start * sqm
    k_base = K + b64 * skb + hk64 * skh + k_start * skn
    v_base = V + b64 * svb + hk64 * svh + k_start * svn
    offs_m = m0 + tl.arange(0, BLOCK_M)
    k_lo_base = k_base
    if ROPE != 0:
        q32 = load_rope_tile(q_base, offs_m, seqlen_q, sqm, sqd, rope_q_off + rope_q_auto * off,
                             COS, SIN, stride_cs, max_pos, ROPE, HEAD_DIM, BLOCK_D, CHECK_M)
        if SPLIT:
            q, q_lo = split_hi_lo(q32, Q.dtype.element_ty)
        else:
            q = q32.to(Q.dtype.element_ty)
            q_lo = q
    else:
        q = load_tile(q_base, offs_m, seqlen_q, sqm, sqd, HEAD_DIM, BLOCK_D, CHECK_M)
        if SPLIT:
            q_lo = load_tile(Q_LO + b64 * sqb + h64 * sqh + q_start * sqm, offs_m, seqlen_q, sqm, sqd,
                             HEAD_DIM, BLOCK_D, CHECK_M)
            k_lo_base = K_LO + b64 * skb + hk64 * skh + k_start * skn
        else:
            q_lo = q
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + h)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = kv_block_range(m0, seqlen_q, seqlen_k, win_left, win_right,
                                              BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    left = win_left
    if KEY_START is not None:
        # per-row first keys (packed documents): a left window per row in the leading band only
        ks_base = KEY_START + b64 * seqlen_q_arg
        lo, full_lo, full_hi, left = key_start_bounds(ks_base, offs_m, seqlen_q, seqlen_k, lo, full_lo, full_hi,
                                                      hi, win_left, BLOCK_N, HAS_WINDOW)
    if HAS_WINDOW or KEY_START is not None:
        # leading band of a sliding window (or of the rows' first keys): masked
        for start_n in range(lo, full_lo, BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, q_lo, k_base, k_lo_base, v_base, start_n, b, h, offs_m, seqlen_k, off,
                skn, skd, svn, svd, sm_scale, qk_scale2, softcap, slope, m0 + off, left, win_right,
                COS, SIN, stride_cs, max_pos, rope_k_off, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                IS_CAUSAL, HAS_WINDOW or KEY_START is not None, HAS_SOFTCAP, HAS_ALIBI, ROPE, SCORE_MOD, MASK_MOD,
                USE_NATURAL, HAS_HOOKS, DOT_PREC, SPLIT)
    # mask-free middle
    for start_n in range(full_lo, full_hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, q_lo, k_base, k_lo_base, v_base, start_n, b, h, offs_m, seqlen_k, off,
            skn, skd, svn, svd, sm_scale, qk_scale2, softcap, slope, m0 + off, win_left, win_right,
            COS, SIN, stride_cs, max_pos, rope_k_off, HEAD_DIM, BLOCK_D, BLOCK_N, False,
            IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, ROPE, SCORE_MOD, MASK_MOD,
            USE_NATURAL, HAS_HOOKS, DOT_PREC, SPLIT)
    # diagonal band (causal / right window) and the ragged tail (Nk % BLOCK_N): masked
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, q_lo, k_base, k_lo_base, v_base, start_n, b, h, offs_m, seqlen_k, off,
            skn, skd, svn, svd, sm_scale, qk_scale2, softcap, slope, m0 + off, win_left, win_right,
            COS, SIN, stride_cs, max_pos, rope_k_off, HEAD_DIM, BLOCK_D, BLOCK_N, True,
            IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, ROPE, SCORE_MOD, MASK_MOD,
            USE_NATURAL, HAS_HOOKS, DOT_PREC, SPLIT)
    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    out = acc * (1.0 / l_safe)[:, None]  # one division per row, not per element
    offs_d = tl.arange(0, BLOCK_D)
    o_ptrs = O + b64 * sob + h64 * soh + q_start * som + offs_m[:, None] * som + offs_d[None, :] * sod
    out = out.to(O.dtype.element_ty)
    if CHECK_M:
        if BLOCK_D != HEAD_DIM:
            tl.store(o_ptrs, out, mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))
        else:
            tl.store(o_ptrs, out, mask=offs_m[:, None] < seqlen_q)
    else:
        if BLOCK_D != HEAD_DIM:
            tl.store(o_ptrs, out, mask=offs_d[None, :] < HEAD_DIM)
        else:
            tl.store(o_ptrs, out)
    if LSE is not None:  # None (a constexpr): the caller needs no LSE
        lse = tl.where(l_ok, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        lse = alibi_lse_shift(lse, offs_m, m0, slope, HAS_ALIBI, USE_NATURAL)
        l_ptrs = LSE + b64 * slb + h64 * slh + q_start * slm + offs_m * slm
        if CHECK_M:
            tl.store(l_ptrs, lse, mask=offs_m < seqlen_q)
        else:
            tl.store(l_ptrs, lse)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------

_ALIBI: dict = {}
_NO_WINDOW = (-1, -1)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def normalize_window_arg(window: Any) -> Tuple[int, int]:
    """(left, right) with -1 = unbounded; accepts None, an int (left only) or a pair."""
    if window is None:
        return (-1, -1)
    if isinstance(window, int) and not isinstance(window, bool):
        return (window if window >= 0 else -1, -1)
    left, right = window
    return (-1 if left is None or left < 0 else int(left), -1 if right is None or right < 0 else int(right))


def resolve_alibi(alibi_slopes: Any, H: int, device: torch.device) -> Optional[torch.Tensor]:
    """None, True (standard slopes, cached per H and device) or a tensor [H] -> fp32 [H] on device."""
    if alibi_slopes is None or alibi_slopes is False:
        return None
    if alibi_slopes is True:
        key = (H, device)
        t = _ALIBI.get(key)
        if t is None:
            from .reference import alibi_slopes as standard

            t = standard(H).to(device)
            _ALIBI[key] = t
        return t
    if alibi_slopes.dtype != torch.float32 or alibi_slopes.device != device or not alibi_slopes.is_contiguous():
        alibi_slopes = alibi_slopes.to(device=device, dtype=torch.float32).contiguous()
    return alibi_slopes


def _tma_path_usable(q, k, v, out, varlen: bool = False) -> bool:
    if interpreter_mode() or not q.is_cuda:
        return False
    if varlen:
        from .forward_tma_varlen import supports
    else:
        from .forward_tma import supports

    return not supports(q, k, v, out=out)


# ----------------------------------------------------------------------------------------------
# launch plans: the host work of a call signature, done once
# ----------------------------------------------------------------------------------------------

class _Rotation(NamedTuple):
    """RoPE applied before a launch (see :data:`PORTABLE_ROPE`): q (unless ``q_pos`` is None: the
    kernel rotates it) and k go rotated into contiguous scratch tensors, with their 16-bit rounding
    residues beside them when ``residues`` (split scores). Dense: ``q_pos``/``k_pos`` are the first
    table rows. Varlen (``varlen`` = (batch, max_seqlen_q, max_seqlen_k)): they are the table offsets
    of each sequence's row 0, q's shifted by ``seqlen_k - seqlen_q`` when ``q_default``."""

    mode: int
    q_pos: Optional[int]
    k_pos: int
    residues: bool = False
    varlen: Optional[Tuple[int, int, int]] = None
    q_default: bool = False

    def apply(self, q, k, cos, sin, cu_q=None, cu_k=None):
        """(q', k', q residues or None, k residues or None)."""
        k_rot = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        k_lo = torch.empty_like(k_rot) if self.residues else None
        q_rot = q_lo = None
        if self.q_pos is not None:
            q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            q_lo = torch.empty_like(q_rot) if self.residues else None
        if self.varlen is None:
            if q_rot is not None:
                rotate_into(q, q_rot, cos, sin, self.q_pos, self.mode, q_lo)
            rotate_into(k, k_rot, cos, sin, self.k_pos, self.mode, k_lo)
        else:
            batch, max_q, max_k = self.varlen
            kw = dict(varlen=True, batch=batch, nq=max_q, nk=max_k, q_default=self.q_default, mode=self.mode)
            if q_rot is not None:
                rope_pass(q, q_rot, cos, sin, cu_q, cu_k, is_q=True, pos_off=self.q_pos, y_lo=q_lo, **kw)
            rope_pass(k, k_rot, cos, sin, cu_q, cu_k, is_q=False, pos_off=self.k_pos, y_lo=k_lo, **kw)
        return (q if q_rot is None else q_rot), k_rot, q_lo, k_lo


class _Plan:
    """Everything one call signature launches except tensors and float values.

    Keyed by shapes, strides, dtypes, device, modifier flags, integer modifier values, config and
    whether every pointer is 16-byte aligned (see :func:`flash_attention_forward`), so the integer
    kernel arguments, the constexprs and the path/config choice are fixed per plan. That is what
    makes a :class:`~attention_proto.runtime.cache.DirectLaunch` valid for it.
    """

    __slots__ = ("kernel", "grid", "ints_a", "ints_b", "consts", "specs", "aligned", "direct", "rotate")

    def __init__(self, kernel, grid, ints_a, ints_b, consts, specs, aligned, rotate=None):
        self.kernel, self.grid, self.ints_a, self.ints_b, self.consts = kernel, grid, ints_a, ints_b, consts
        # TMA: descriptor (shape, strides, block) of q, k, v, out, then make_descriptor; None: portable
        self.specs = specs
        self.aligned = aligned
        self.direct = None
        # a _Rotation applied before the launch; None: no RoPE, or the kernel rotates q and k itself
        self.rotate = rotate


#: the order of a causal TMA forward's programs. "head": each head's query blocks in turn, heaviest
#: first. "lpt": the heaviest blocks of every head first (longest processing time first), over chunks of
#: heads whose K/V fit in half the L2 (:func:`lpt_heads`). "auto" (the default): "lpt" when the launch
#: has at most LPT_MAX_WAVES programs per SM, where the tail of the last wave is a large part of the
#: time, else "head". Measured on an H100 (scripts/bench_dense_fwd.py --lpt, bf16, session 6): lpt/head
#: 1.157x at B1 H16:4 N4k D128 (512 programs, 3.9 a SM), 1.03x at B4 H16 N4k (15.5 a SM), 0.97x at
#: B1 H16 N16k (15.5), 0.92x at B4 H32 N4k D64: at many waves the heads-first order's L2 reuse wins.
CAUSAL_SCHEDULE = "auto"
SCHEDULES = ("head", "lpt", "auto")
LPT_MAX_WAVES = 4.0


#: how the portable forward applies a fused RoPE. "tile": the kernel rotates q and every key tile as
#: it loads them (partner-column loads, a shrunk tile). "rotate": q and k are rotated into scratch
#: tensors by the RoPE kernel first and the plain kernel runs on its plain tile. "auto" (the default):
#: "rotate" when a call has at least ROPE_ROTATE_MIN_Q queries and more than SMALL_PROBLEM_SCORES scores
#: (K is then re-read by several query blocks), else "tile" (decode-like calls: two more launches would
#: cost more than rotating each key tile once). Varlen calls, judged by their longest sequences, are
#: rotated by the packed RoPE pass (positions restart per sequence) and may then take the varlen TMA
#: kernel, which has no RoPE of its own. Measured on an H100 (modifiers study, session 9, B1 H16 N16k
#: D128 bf16 causal): the "tile" kernel 16.88 ms against 2.55 ms without RoPE on its tile; the RoPE
#: kernel + the plain portable kernel 2.28 ms (the RoPE kernel alone 0.12 ms). Varlen (session 10,
#: scripts/bench_rope_paths.py: 33 sequences, 64k tokens, H16 D128 bf16 causal): "tile" 17.08 ms,
#: "rotate" 2.77 ms (the varlen TMA kernel), 2.32 ms without RoPE. The dense TMA path always rotates
#: the keys first and q in registers.
PORTABLE_ROPE = "auto"
PORTABLE_ROPE_MODES = ("tile", "rotate", "auto")
#: split scores in the forward for RoPE + softcap on 16-bit inputs, as the backward takes them
#: (backward.SPLIT_ROPE_SOFTCAP_SCORES): each score adds q.k_lo + q_lo.k, the products with the 16-bit
#: rounding residues of the rotated q and k, so O and the LSE come from the scores the backward
#: uses. Such calls run on the portable kernel (residues in registers when it rotates per tile, or
#: written beside the rotated tensors by the RoPE kernel). Why: through our own forward the RoPE +
#: softcap gradient still reached 2.74x PyTorch's bf16 error at scale 1, D 256, cap 0.5 (H100,
#: session 8; 0.43x from the float64 O/LSE). Off by default: on an H100 (session 10,
#: scripts/bench_rope_paths.py, B1 H16:8 N4k causal bf16, softcap 50 + RoPE half) it takes 0.411 against
#: 0.186 ms at D128 (the TMA kernel) and 1.115 against 0.494 ms at D256 (2.2x), for gradients that
#: already pass the 3x rule without it except at that saturated corner; with it the GPU twin test
#: passes (probe_softcap_grad.py split_fwd: worst dq 0.13-0.95x PyTorch's error, 0 over the bound, in
#: the six of its ten configs that the run printed).
SPLIT_ROPE_SOFTCAP_SCORES = False
ROPE_ROTATE_MIN_Q = 128


def portable_rope_rotates(mode: str, B: int, H: int, Nq: int, Nk: int) -> bool:
    """Whether a forward with RoPE off the TMA kernel rotates q and k before the launch (see
    :data:`PORTABLE_ROPE`); varlen calls pass their sequence count as B and their longest sequences
    as Nq, Nk."""
    if mode not in PORTABLE_ROPE_MODES:
        raise ValueError(f"forward.PORTABLE_ROPE must be one of {PORTABLE_ROPE_MODES}; got {mode!r}")
    if mode == "tile":
        return False
    return mode == "rotate" or (Nq >= ROPE_ROTATE_MIN_Q and B * H * Nq * Nk > SMALL_PROBLEM_SCORES)


def portable_rope(mode: str) -> "contextlib.AbstractContextManager[None]":
    """Run a block with :data:`PORTABLE_ROPE` set to ``mode`` (the modifiers study times "tile").
    Process-wide, not thread-safe, like :func:`causal_schedule`."""
    return _switch("PORTABLE_ROPE", mode, PORTABLE_ROPE_MODES, "portable_rope: mode")


@contextlib.contextmanager
def _switch(name: str, value: str, allowed: Tuple[str, ...], what: str) -> Iterator[None]:
    """Set the module switch ``name`` to ``value`` for a block (checked against ``allowed``; ``what``
    names the argument in the error), and restore it after."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}; got {value!r}")
    g = globals()
    prev, g[name] = g[name], value
    try:
        yield
    finally:
        g[name] = prev


def causal_schedule(order: str) -> "contextlib.AbstractContextManager[None]":
    """Run a block with :data:`CAUSAL_SCHEDULE` set to ``order`` (warmup compiles both orders: "auto"
    picks by batch and SM count, so a serving batch may take the other one). Process-wide, not
    thread-safe: both orders compute the same tiles, so a race costs a compile, never a result."""
    return _switch("CAUSAL_SCHEDULE", order, SCHEDULES, "causal_schedule: order")


def use_lpt(schedule: str, programs: int, sms: int) -> bool:
    """Whether a causal launch of ``programs`` programs on ``sms`` SMs takes the LPT order."""
    return schedule == "lpt" or (schedule == "auto" and programs <= LPT_MAX_WAVES * sms)


def lpt_heads(B: int, H: int, Hkv: int, Nk: int, D: int, elem_bytes: int, l2: Optional[int] = None) -> int:
    """Query heads per LPT chunk: as many as keep their K/V (shared within a GQA group) within half the
    L2 (``l2`` bytes; default the current device's, :func:`...runtime.device.l2_bytes`)."""
    if l2 is None:
        l2 = l2_bytes()
    kv_per_query_head = 2.0 * Nk * D * elem_bytes * Hkv / H
    return max(1, min(B * H, int(l2 // 2 // max(1.0, kv_per_query_head))))


_PLANS: Dict[Hashable, _Plan] = {}
_MAX_PLANS = 4096  # distinct call signatures kept (cleared when full: shapes of a long-running server)


def clear_launch_plans() -> None:
    """Forget every cached launch plan (tests; :func:`.configs.reload_table` calls it too)."""
    _PLANS.clear()


RELOAD_HOOKS.append(clear_launch_plans)


def _launch(plan: _Plan, args: tuple) -> None:
    d = plan.direct
    if d is not None and d(plan.grid, args):
        return
    compiled = KERNEL_CACHE.launch(plan.kernel, plan.grid, *args, **plan.consts)
    if plan.aligned and (d is None or d.generation != KERNEL_CACHE.generation):
        plan.direct = KERNEL_CACHE.direct(plan.kernel, compiled, args, plan.consts)


def _make_plan(q, k, v, out, lse, *, B, H, Hkv, Nq, Nk, D, varlen, causal, left, right, has_softcap, has_alibi,
               rope_mode, rope_args, score_mod, mask_mod, config, aligned, positive_scale, split=False) -> _Plan:
    """Pick the path and config and compute the integer arguments and constexprs of a launch.

    ``split``: split scores (:data:`SPLIT_ROPE_SOFTCAP_SCORES`), on the portable kernel only."""
    if CAUSAL_SCHEDULE not in SCHEDULES:
        raise ValueError(f"forward.CAUSAL_SCHEDULE must be one of {SCHEDULES}; got {CAUSAL_SCHEDULE!r}")
    if split and config is not None and config.path != "portable":
        raise ValueError(f"config.path={config.path!r}: rope together with softcap on 16-bit inputs takes split "
                         "scores (forward.SPLIT_ROPE_SOFTCAP_SCORES), which only the portable kernel has; pass a "
                         "portable config, config=None, or set forward.SPLIT_ROPE_SOFTCAP_SCORES = False")
    # a portable launch with RoPE: rotate q and k first (the plain kernel and tile), or in the kernel
    rotates = rope_mode != 0 and portable_rope_rotates(PORTABLE_ROPE, B, H, Nq, Nk)
    if split and config is not None and not interpreter_mode() and not fits(config, D, q.dtype, not rotates, True):
        raise ValueError(f"config={config}: with split scores (forward.SPLIT_ROPE_SOFTCAP_SCORES) its residue "
                         f"tiles need {shared_memory_bytes(config, D, q.dtype, not rotates, True)} bytes of shared "
                         "memory, more than Hopper's 227 KB; pass a smaller portable config (configs.shrink_to_fit("
                         "config, D, dtype, rope, split=True)) or config=None")
    rotation = None
    if rotates:
        _, _, q_off, q_auto, k_off = rope_args
        rotation = (_Rotation(rope_mode, q_off, k_off, split, (B, Nq, Nk), bool(q_auto)) if varlen else
                    _Rotation(rope_mode, q_off + q_auto * (Nk - Nq), k_off, split))
        if varlen:
            # the varlen kernels read the rotated copies: plan with contiguous stand-ins of their layout
            q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if config is None:
        path = "portable"
        small = B * H * Nq * Nk <= SMALL_PROBLEM_SCORES
        varlen_rope = varlen and rope_mode != 0 and not rotates  # the varlen TMA kernel does not rotate
        if not split and not varlen_rope and not small and _tma_path_usable(q, k, v, out, varlen):
            path = "tma" if varlen else "auto"  # varlen has no warp-specialized kernel
        # a portable config (also one the table picks under "auto") is shrunk for the fused RoPE loads
        # unless q and k are rotated first; the TMA path rotates the keys in a separate pass: its tiles
        # are the plain kernel's
        config = pick_forward_config(D, q.dtype, bool(causal), _next_pow2(max(Nq, Nk)), path,
                                     rope_mode != 0 and not rotates, split)
    if config.path != "portable" and varlen:
        from . import forward_tma, forward_tma_varlen

        reasons = forward_tma_varlen.supports(q, k, v, rope=None if rope_mode == 0 or rotates else rope_mode,
                                              out=out, check_device=not interpreter_mode(), config=config)
        if reasons:
            raise ValueError("the varlen TMA forward path does not apply: " + "; ".join(reasons))
        grid, specs, ints_a, ints_b, consts = forward_tma_varlen.varlen_launch_parts(
            q, k, v, out, lse, batch=B, max_seqlen_q=Nq, causal=causal, window=(left, right), has_softcap=has_softcap,
            has_alibi=has_alibi, score_mod=score_mod, mask_mod=mask_mod, config=config, positive_scale=positive_scale)
        specs = specs + (None, forward_tma.make_descriptor)  # no output descriptor: pointer stores
        return _Plan(forward_tma_varlen._fwd_tma_varlen_kernel, grid, ints_a, ints_b, consts, specs, aligned,
                     rotation)
    if config.path != "portable":
        from . import forward_tma

        rotate = None
        if rope_mode != 0:
            # the kernel reads the rotated keys from a scratch tensor allocated per call like this one
            k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
            stride_cs, max_pos, q_off, q_auto, k_off = rope_args
            rope_ints = (stride_cs, max_pos, q_off + q_auto * (Nk - Nq))
            rotate = _Rotation(rope_mode, None, k_off)  # the kernel rotates q in registers
        else:
            rope_ints = (0, 0, 0)
        reasons = forward_tma.supports(q, k, v, out=out, check_device=not interpreter_mode(), config=config)
        if reasons:
            raise ValueError("the TMA forward path does not apply: " + "; ".join(reasons))
        lpt = 0
        programs = B * H * ((Nq + config.BLOCK_M - 1) // config.BLOCK_M)
        if causal and score_mod is None and mask_mod is None and use_lpt(CAUSAL_SCHEDULE, programs,
                                                                         sm_count_of(q.device)):
            lpt = lpt_heads(B, H, Hkv, Nk, D, k.element_size(), l2_bytes(q.device))
        grid, specs, ints_a, ints_b, consts = forward_tma.tma_launch_parts(
            q, k, v, out, lse, causal=causal, window=(left, right), has_softcap=has_softcap, has_alibi=has_alibi,
            score_mod=score_mod, mask_mod=mask_mod, config=config, positive_scale=positive_scale,
            rope_mode=rope_mode, rope_ints=rope_ints, lpt_heads=lpt)
        specs = specs + (forward_tma.make_descriptor,)  # kept with the specs: no import per call
        return _Plan(forward_tma._fwd_tma_kernel, grid, ints_a, ints_b, consts, specs, aligned, rotate)

    rotate = rotation
    if rotates:
        # q and k rotated into contiguous scratch tensors before the launch: the plain kernel reads them
        rope_mode, rope_args = 0, (0, 0, 0, 0, 0)
    BM, BN = config.BLOCK_M, config.BLOCK_N
    num_m = (Nq + BM - 1) // BM  # not triton.cdiv: a jit function, slow to call from Python
    if varlen:
        strides = (0, q.stride(1), q.stride(0), q.stride(2), 0, k.stride(1), k.stride(0), k.stride(2),
                   0, v.stride(1), v.stride(0), v.stride(2), 0, out.stride(1), out.stride(0), out.stride(2),
                   0) + (lse.stride() if lse is not None else (0, 0))
    elif rotate is not None:
        # the scratch copies' (contiguous) strides
        strides = (torch.empty(q.shape, device="meta").stride() + torch.empty(k.shape, device="meta").stride()
                   + v.stride() + out.stride() + (lse.stride() if lse is not None else (0, 0, 0)))
    else:
        strides = q.stride() + k.stride() + v.stride() + out.stride() + (lse.stride() if lse is not None else (0, 0, 0))
    ints_a = tuple(strides) + (Nq, Nk, H, H // Hkv, num_m)
    ints_b = (left if left >= 0 else WINDOW_UNBOUNDED, right if right >= 0 else WINDOW_UNBOUNDED) + rope_args
    use_natural = natural_scores(has_softcap, has_alibi, bool(causal), score_mod, positive_scale)
    consts = dict(
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=BM, BLOCK_N=BN,
        IS_CAUSAL=bool(causal), HAS_WINDOW=left >= 0 or right >= 0, HAS_SOFTCAP=has_softcap, HAS_ALIBI=has_alibi,
        ROPE=rope_mode, SCORE_MOD=score_mod, MASK_MOD=mask_mod, USE_NATURAL=use_natural,
        HAS_HOOKS=score_mod is not None or mask_mod is not None,
        IS_VARLEN=varlen, CHECK_M=varlen or (Nq % BM != 0), REVERSE_M=bool(causal),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
        **({"SPLIT": True} if split else {}),
    )
    return _Plan(_fwd_kernel, (num_m, B * H), ints_a, ints_b, consts, None, aligned, rotate)


def _output_keys(out, lse, return_lse) -> Tuple[Any, Any]:
    """Plan-key entries of the outputs: None where we allocate (strides, dtype and alignment are
    then fixed by q's), the facts of a caller's tensor, False for an LSE nobody wants."""
    out_key = None if out is None else (out.stride(), out.dtype, out.data_ptr() & 15)
    if lse is not None:
        return out_key, (lse.stride(), lse.dtype, lse.data_ptr() & 15)
    return out_key, (None if return_lse else False)


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Any = (-1, -1),
    softcap: Optional[float] = None,
    alibi_slopes: Any = None,
    rope: Optional[RopeSpec] = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    config: Optional[FwdConfig] = None,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    return_lse: bool = True,
    key_start: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Low-level dense attention forward. Returns ``(out, lse)``.

    Shapes: q [B, H, Nq, D], k/v [B, Hkv, Nk, D] (any strides; a BSHD tensor is passed as
    ``x.transpose(1, 2)``); out [B, H, Nq, D] with q's stride order; lse [B, H, Nq] fp32.
    Varlen (``cu_seqlens_q``/``cu_seqlens_k`` int32 [B + 1]): q [Tq, H, D], k/v [Tk, Hkv, D],
    out [Tq, H, D], lse [H, Tq]; ``max_seqlen_*`` default to the largest length (one host sync).

    Semantics are those of :mod:`.reference` (scale default 1/sqrt(D); softcap, then ALiBi, then
    score_mod, then masks; bottom-right causal/window; LSE natural log, -inf and output 0 on
    fully masked rows). ``window``: (left, right), -1 = unbounded. ``alibi_slopes``: True or a
    float tensor [H]. ``rope``: a :class:`RopeSpec` (q positions default to Nk - Nq + i, per
    sequence for varlen). ``config``: a :class:`FwdConfig`; None picks one: on Hopper the TMA path
    when it applies and the problem is not tiny (:data:`.configs.SMALL_PROBLEM_SCORES`), else the
    portable kernel. ``out``/``lse``: optional preallocated outputs of the shapes above (tests
    poison them with NaN). ``return_lse=False`` (and no ``lse`` given): the kernel writes no LSE
    and None is returned in its place (inference: one allocation and one store fewer).
    ``key_start``: int32 [B, Nq], contiguous, or None: query row i sees only keys j >= key_start[b, i]
    besides its other masks (packed causal documents: each row's document start; no host sync,
    no varlen). Inputs are checked only lightly here: :func:`.interface.attention` is the
    validating entry point.

    Host work is cached per call signature (shapes, strides, dtypes, device, modifier flags and
    integer values, config, pointer alignment): a repeated call builds only its tensor arguments
    and, on a GPU, launches the compiled kernel directly (``runtime.cache.DirectLaunch``).
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        # the kernels index cu_seqlens as contiguous arrays: a strided view is copied (B + 1 ints)
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
        Tq, H, D = q.shape
        Hkv = k.shape[1]
        B = cu_seqlens_q.shape[0] - 1
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B > 0 else 0
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if B > 0 else 0
        Nq, Nk = int(max_seqlen_q), int(max_seqlen_k)
        out_key, lse_key = _output_keys(out, lse, return_lse)
        out = torch.empty_like(q) if out is None else out
        if lse_key is None:
            lse = torch.empty((H, Tq), device=q.device, dtype=torch.float32)
        if Tq == 0 or B == 0:
            return out, lse
    else:
        B, H, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        out_key, lse_key = _output_keys(out, lse, return_lse)
        out = torch.empty_like(q) if out is None else out
        if lse_key is None:
            lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
        if B == 0 or Nq == 0 or H == 0:
            return out, lse
    if v.shape[-1] != D:
        raise ValueError(f"v head dim {v.shape[-1]} != q head dim {D}: Dv != D is not supported")
    sm_scale = (1.0 / math.sqrt(D)) if scale is None else float(scale)
    if window is None or window == _NO_WINDOW:
        left = right = -1
    else:
        left, right = normalize_window_arg(window)
    has_softcap = softcap is not None and float(softcap) > 0.0
    slopes = None if alibi_slopes is None else resolve_alibi(alibi_slopes, H, q.device)

    ptrs = q.data_ptr() | k.data_ptr() | v.data_ptr()
    if out_key is not None:
        ptrs |= out_key[2]
    if lse_key:
        ptrs |= lse_key[2]
    if slopes is not None:
        ptrs |= slopes.data_ptr()
    if rope is not None:
        if D % 2:
            raise ValueError(f"rope needs an even head dim; got D={D}")
        q_auto = rope.q_offset is None
        q_off = 0 if q_auto else int(rope.q_offset)
        k_off = int(rope.k_offset)
        if q_off < 0 or k_off < 0:
            raise ValueError(f"rope offsets must be >= 0; got q_offset={rope.q_offset}, k_offset={rope.k_offset}")
        if q_auto:
            # Default query positions are Nk - Nq + i (per sequence when varlen): negative where a
            # sequence has more queries than keys, and a table has no negative rows. RoPE scores
            # depend only on the difference of q and k positions, so every position is shifted by
            # the same amount (the kernel adds q_off to the queries' positions, k_off to the keys').
            shift = Nq if varlen else max(0, Nq - Nk)
            if shift and rope.cos is not None:
                # a user table need not be linear in the position: it is read at the true positions
                raise ValueError(
                    "rope: with the default q_offset the queries sit at positions Nk - Nq + i, negative "
                    f"where a sequence has more queries than keys (Nq={Nq}, Nk={Nk}{', varlen' if varlen else ''}), "
                    "and given cos/sin tables have no negative rows; pass RopeSpec(q_offset=...) explicitly "
                    "(q_offset=0: positions restart at 0 in each sequence)")
            q_off, k_off = shift, k_off + shift
        else:
            shift = 0
        needed = max(q_off + Nk if q_auto else q_off + Nq, k_off + Nk)
        # the shifted indices read a table whose row r holds position r - shift: the rotation stays at
        # the true positions (as in the backward and the reference), only the indices move
        cos, sin = rope_tables(rope, D, needed, q.device, first=-shift)
        rope_mode = 1 if rope.layout == "half" else 2
        rope_args = (cos.stride(0), cos.shape[0], q_off, int(q_auto), k_off)
        ptrs |= cos.data_ptr() | sin.data_ptr()
    else:
        cos = sin = None  # unused pointers go in as None: a constexpr, nothing for the launcher to convert
        rope_mode = 0
        rope_args = (0, 0, 0, 0, 0)
    if key_start is not None:
        if varlen or tuple(key_start.shape) != (B, Nq) or key_start.dtype != torch.int32 \
                or not key_start.is_contiguous() or key_start.device != q.device:
            raise ValueError(f"key_start must be a contiguous int32 tensor [B, Nq] = [{B}, {Nq}] on {q.device}, "
                             f"without cu_seqlens; got {describe(key_start)}{' with cu_seqlens' if varlen else ''}")
        ptrs |= key_start.data_ptr()
    if varlen:
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
        ptrs |= cu_q.data_ptr() | cu_k.data_ptr()
        vkey = (B, Nq, Nk, cu_q.dtype, cu_k.dtype)  # the grid spans B sequences; the shapes hold tokens
    else:
        cu_q = cu_k = None
        vkey = None
    aligned = (ptrs & 15) == 0
    split = (SPLIT_ROPE_SOFTCAP_SCORES and rope is not None and has_softcap
             and q.dtype in (torch.float16, torch.bfloat16))
    # every integer argument, constexpr and path/config choice is a function of this key
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype, q.device,
           out_key, lse_key, vkey, bool(causal), left, right, has_softcap, slopes is not None, rope_mode,
           rope_args, score_mod, mask_mod, config, aligned, sm_scale > 0.0, CAUSAL_SCHEDULE, LPT_MAX_WAVES,
           key_start is not None, (PORTABLE_ROPE, ROPE_ROTATE_MIN_Q) if rope is not None else None, split)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _make_plan(q, k, v, out, lse, B=B, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, varlen=varlen, causal=causal,
                          left=left, right=right, has_softcap=has_softcap, has_alibi=slopes is not None,
                          rope_mode=rope_mode, rope_args=rope_args, score_mod=score_mod, mask_mod=mask_mod,
                          config=config, aligned=aligned, positive_scale=sm_scale > 0.0, split=split)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    floats = (sm_scale, sm_scale * _LOG2E, float(softcap) if has_softcap else 0.0)
    specs = plan.specs
    q_lo = k_lo = None
    if plan.rotate is not None:
        q, k, q_lo, k_lo = plan.rotate.apply(q, k, cos, sin, cu_q, cu_k)
        if plan.rotate.q_pos is not None:  # q and k both rotated: the plain kernels take no tables
            cos = sin = None
    if specs is None:
        args = (q, k, v, out, lse, slopes, cos, sin, cu_q, cu_k, key_start, q_lo, k_lo) + plan.ints_a + floats \
            + plan.ints_b
    elif specs[3] is None:  # varlen TMA: descriptors over q, k, v; the output by pointer
        make_descriptor = specs[4]
        args = (make_descriptor(q, *specs[0]), make_descriptor(k, *specs[1]), make_descriptor(v, *specs[2]),
                out, lse, slopes, cu_q, cu_k) + plan.ints_a + floats + plan.ints_b
    else:
        make_descriptor = specs[4]
        args = (make_descriptor(q, *specs[0]), make_descriptor(k, *specs[1]), make_descriptor(v, *specs[2]),
                make_descriptor(out, *specs[3]), lse, slopes, cos, sin, key_start) + plan.ints_a + floats + plan.ints_b
    _launch(plan, args)
    return out, lse
