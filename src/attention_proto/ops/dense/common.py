"""Shared ``@triton.jit`` helpers of the dense attention kernels (forward and backward).

Stable API (the backward kernels import these; change signatures only together):

- :func:`tanh_f32` -- tanh to fp32 accuracy (``1 - 2 / (exp(2x) + 1)``); :func:`tanh_approx` -- one
  ``tanh.approx.f32`` on the GPU; :func:`tanh_for` -- the approximate form for 16-bit inputs only.
- :func:`apply_score_mods` -- softcap then ALiBi on a tile of *scaled* scores (natural units).
- :func:`apply_mask` -- causal / sliding-window (bottom-right aligned) and key-bound mask:
  masked entries become ``-inf``.
- :func:`kv_block_range` -- which key blocks a query block visits, split into
  masked edges and a mask-free middle (fully masked blocks are never visited).
- :func:`q_block_range` -- the dual: which query rows can see a key block (for dK/dV).
- :func:`load_tile` -- a [R, BLOCK_D] tile load with compile-time-optional row/column bounds.
- :func:`load_rope_tile` -- the same load with RoPE (half-split or interleaved) fused in,
  cos/sin from fp32 tables [max_pos, D/2]; ``INVERSE=True`` rotates by the opposite angle.
- :func:`rope_rows` / :func:`rotate_pairs` -- RoPE on a tile already in registers (the TMA path's
  query tile, the standalone RoPE kernel), partners by register shuffle.

Conventions (those of :mod:`attention_proto.ops.dense.reference`): query row ``i`` sits at key
position ``i + off`` with ``off = Nk - Nq`` (bottom-right alignment); causal allows
``j <= i + off``; window (left, right) allows ``i + off - left <= j <= i + off + right``.
Unbounded window sides are passed as :data:`WINDOW_UNBOUNDED` (a large positive int) so
that the kernels need no per-side flags. Index tiles are ``offs_m`` [BLOCK_M] and ``offs_n``
[BLOCK_N], both relative to the start of the (per-sequence) query/key range.
"""
from __future__ import annotations

import attention_proto  # noqa: F401  (sets TRITON_INTERPRET before triton decorates anything)
import triton
import triton.language as tl

from ...runtime.device import interpreter_mode

#: stand-in for "no bound" on a window side; large, yet i + off +/- it stays inside int32
WINDOW_UNBOUNDED = 1 << 30

#: RoPE modes as the kernels see them (constexpr ``ROPE``)
ROPE_NONE, ROPE_HALF, ROPE_INTERLEAVED = 0, 1, 2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

#: compile-time: the kernels run in Triton's interpreter (no inline PTX there)
_INTERPRETED = tl.constexpr(interpreter_mode())


@triton.jit
def tanh_f32(x):
    """tanh(x) for fp32 x to fp32 accuracy: 1 - 2 / (exp(2x) + 1), saturating cleanly to +-1 (exp2 ->
    inf or 0). What fp32 inputs, paged decode and the hooks use."""
    e = tl.math.exp2(x * 2.8853900817779268)  # 2 * log2(e)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def tanh_approx(x):
    """tanh(x) by one ``tanh.approx.f32`` on the GPU (the interpreter, which runs no PTX: the exp2 form).

    A single MUFU op with relative error ~2^-11, the form FlashAttention-3 uses for softcap. The
    exp2 form costs an ex2 and a full-precision division (an rcp plus Newton steps) per element:
    on the H100 softcap with it ran 61% slower than plain causal attention, the extra
    special-function work on the softmax's critical path (finding modifiers-softcap-bound).
    """
    if _INTERPRETED:
        return tanh_f32(x)
    else:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def mul_rn(x, c):
    """``x * c`` rounded on its own: PTX ``mul.rn.f32``, which the compiler may not fuse into an FMA
    with a following add (a plain product may be: ``x * c - m`` becomes ``fma(x, c, -m)``, which
    leaves the product's rounding residue where ``round(x * c) - m`` is exactly 0). The interpreter
    (numpy) never fuses: a plain product there."""
    if _INTERPRETED:
        return x * c
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [x, c], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def tanh_for(x, DTYPE: tl.constexpr):
    """tanh for scores of inputs of ``DTYPE``: :func:`tanh_approx` for 16-bit inputs (its ~2^-11 error
    is below their own rounding), :func:`tanh_f32` for fp32 inputs (it is not: on the H100 the
    approximate form broke the fp32 error rule in paged-decode fuzz cases). The forward and the
    backward both choose by the input dtype, so the backward recomputes the forward's scores."""
    if DTYPE == tl.float32:
        return tanh_f32(x)
    else:
        return tanh_approx(x)


@triton.jit
def apply_score_mods(s, offs_m, offs_n, off, softcap, slope,
                     HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DTYPE: tl.constexpr):
    """Softcap (``c * tanh(s / c)``) then ALiBi (``-slope * |i + off - j|``) on scaled scores ``s``.

    ``s`` is [BLOCK_M, BLOCK_N] fp32 in natural units (already multiplied by the softmax scale);
    ``slope`` is this head's ALiBi slope (fp32 scalar); ``DTYPE`` the inputs' dtype (which tanh,
    :func:`tanh_for`). Order matches the reference.
    """
    if HAS_SOFTCAP:
        s = softcap * tanh_for(s * (1.0 / softcap), DTYPE)  # one scalar division, not one per element
    if HAS_ALIBI:
        dist = offs_m[:, None] + off - offs_n[None, :]
        dist = tl.where(dist < 0, -dist, dist)
        s = s - slope * dist.to(tl.float32)
    return s


@triton.jit
def apply_mask(s, offs_m, offs_n, seqlen_k, off, win_left, win_right,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, CHECK_N: tl.constexpr):
    """Set masked entries of the score tile ``s`` to -inf (causal, window, and ``j < seqlen_k``)."""
    pos = offs_m[:, None] + off  # key position of each query row
    j = offs_n[None, :]
    if CHECK_N:
        keep = j < seqlen_k
        if IS_CAUSAL:
            keep = keep & (j <= pos)
    elif IS_CAUSAL:
        keep = j <= pos
    else:
        keep = j >= 0
    if HAS_WINDOW:
        keep = keep & (j >= pos - win_left) & (j <= pos + win_right)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def kv_block_range(m0, seqlen_q, seqlen_k, win_left, win_right,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key blocks visited by query rows [m0, min(m0 + BLOCK_M, seqlen_q)).

    Returns ``(lo, full_lo, full_hi, hi)`` with ``lo <= full_lo <= full_hi`` and all three
    multiples of BLOCK_N: blocks starting in [lo, full_lo) and [full_hi, hi) need the mask
    (:func:`apply_mask` with CHECK_N), blocks in [full_lo, full_hi) need none (every row may see
    every key, all inside seqlen_k). Blocks with no allowed (row, key) pair are outside [lo, hi).
    """
    off = seqlen_k - seqlen_q
    m_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    lo = m0 * 0
    hi = seqlen_k
    full_lo = m0 * 0
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(hi, m_last + off + 1)
        # a mask-free block must end at or before the first row's last key (m0 + off)
        full_hi = tl.minimum(full_hi, (tl.maximum(m0 + off + 1, 0) // BLOCK_N) * BLOCK_N)
    if HAS_WINDOW:
        hi = tl.minimum(hi, m_last + off + win_right + 1)
        full_hi = tl.minimum(full_hi, (tl.maximum(m0 + off + win_right + 1, 0) // BLOCK_N) * BLOCK_N)
        lo = tl.maximum(m0 + off - win_left, 0)
        # a mask-free block must start at or after the last row's first key
        full_lo = ((tl.maximum(m_last + off - win_left, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    hi_blk = ((hi + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi_blk)
    full_hi = tl.maximum(tl.minimum(full_hi, hi_blk), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def key_start_bounds(ks_base, offs_m, seqlen_q, seqlen_k, lo, full_lo, full_hi, hi, win_left,
                     BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Fold per-row first keys into :func:`kv_block_range`'s bounds (packed causal documents).

    Row i may see keys j >= ``ks_base[i]`` (besides its other masks). The first keys are clamped to
    [0, seqlen_k] (the same masks: below 0 nothing is masked, from seqlen_k on every key is; and no
    int32 overflow below). Returns ``(lo, full_lo, full_hi, left)``: the key blocks start no lower
    than the smallest first key of the rows, and the leading masked band [lo, full_lo) reaches the
    largest one (rounded up to a block), into the diagonal band where that is further (``full_hi``
    moves up with it). Only that band needs the first keys: every key of a later block is at or after
    every row's first key, so the mask-free middle and the diagonal band run exactly as without them.
    ``left`` [BLOCK_M, 1] is the band's per-row left window (the tighter of the two where a window is
    set too), which :func:`apply_mask` applies as ``j >= pos - left``. A first key past the row's
    position leaves the row fully masked (output 0, LSE -inf).
    """
    ok = offs_m < seqlen_q
    ks = tl.minimum(tl.maximum(tl.load(ks_base + offs_m, mask=ok, other=0), 0), seqlen_k)
    ks_lo = tl.min(tl.where(ok, ks, seqlen_k), 0)
    ks_hi = tl.max(tl.where(ok, ks, 0), 0)
    lo = tl.maximum(lo, (ks_lo // BLOCK_N) * BLOCK_N)
    hi_blk = ((hi + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, ((ks_hi + BLOCK_N - 1) // BLOCK_N) * BLOCK_N), hi_blk)
    full_lo = tl.maximum(full_lo, lo)
    full_hi = tl.maximum(full_hi, full_lo)
    left = offs_m + (seqlen_k - seqlen_q) - ks
    if HAS_WINDOW:
        left = tl.minimum(left, win_left)
    return lo, full_lo, full_hi, left[:, None]


@triton.jit
def q_block_range(n0, seqlen_q, seqlen_k, win_left, win_right,
                  BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query rows [lo, hi) that may see at least one key of [n0, min(n0 + BLOCK_N, seqlen_k)).

    ``lo`` is not rounded to a block: the caller rounds it down to its BLOCK_M. Rows outside
    this range see no key of the block, so a dK/dV loop can skip them entirely.
    """
    off = seqlen_k - seqlen_q
    n_last = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    lo = n0 * 0
    hi = seqlen_q
    if IS_CAUSAL:
        lo = tl.maximum(lo, n0 - off)
    if HAS_WINDOW:
        lo = tl.maximum(lo, n0 - off - win_right)
        hi = tl.minimum(hi, n_last - off + win_left + 1)
    hi = tl.maximum(hi, lo)
    return lo, hi


@triton.jit
def load_tile(base, rows, n_rows, stride_row, stride_col,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a [len(rows), BLOCK_D] tile ``base[rows, :HEAD_DIM]``, zero outside the bounds.

    The row bound (``rows < n_rows``) is checked only when CHECK_ROWS; the column bound only
    when HEAD_DIM is not a power of two (BLOCK_D > HEAD_DIM), so full tiles load unmasked.
    """
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    if CHECK_ROWS:
        if BLOCK_D != HEAD_DIM:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if BLOCK_D != HEAD_DIM:
            x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def load_rope_tile(base, rows, n_rows, stride_row, stride_col, pos0,
                   COS, SIN, stride_cs, max_pos,
                   ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   CHECK_ROWS: tl.constexpr, INVERSE: tl.constexpr = False):
    """Load ``base[rows, :HEAD_DIM]`` rotated by RoPE at positions ``pos0 + rows``; fp32 result.

    ROPE 1 = half-split pairs (d, d + D/2), 2 = interleaved pairs (2i, 2i + 1). Each element is
    ``x[d] * cos[p, f(d)] + sign(d) * x[partner(d)] * sin[p, f(d)]``: the partner column is a
    second (cached) load of the same rows, so any HEAD_DIM (even) works with padding.
    COS/SIN are fp32 tables with row stride ``stride_cs`` and ``max_pos`` rows; rows past the
    table read as 0 (the host checks the positions beforehand).
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    cols = tl.arange(0, BLOCK_D)
    if ROPE == 1:
        first = cols < HALF
        partner = tl.where(first, cols + HALF, cols - HALF)
        freq = tl.where(first, cols, cols - HALF)
    else:
        first = (cols % 2) == 0
        partner = tl.where(first, cols + 1, cols - 1)
        freq = cols // 2
    sign = tl.where(first, -1.0, 1.0)
    if INVERSE:
        sign = -sign
    row_ok = rows < n_rows
    col_ok = cols < HEAD_DIM
    if CHECK_ROWS:
        m2 = row_ok[:, None] & col_ok[None, :]
    else:
        m2 = (rows[:, None] >= 0) & col_ok[None, :]
    row_ptr = base + rows[:, None] * stride_row
    x = tl.load(row_ptr + cols[None, :] * stride_col, mask=m2, other=0.0).to(tl.float32)
    xp = tl.load(row_ptr + partner[None, :] * stride_col, mask=m2, other=0.0).to(tl.float32)
    pos = pos0 + rows
    cs_mask = m2 & (pos[:, None] < max_pos) & (pos[:, None] >= 0)
    cs_off = pos[:, None].to(tl.int64) * stride_cs + freq[None, :]
    c = tl.load(COS + cs_off, mask=cs_mask, other=0.0)
    s = tl.load(SIN + cs_off, mask=cs_mask, other=0.0)
    return x * c + sign[None, :] * xp * s


@triton.jit
def rotate_pairs(x, c, s, ROPE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rotate a register tile ``x`` [R, HEAD_DIM] (HEAD_DIM a power of two) by cos/sin tiles [R, D/2].

    The partner columns come from a register shuffle instead of a second load: the pairs are split
    out with reshape/permute + ``tl.split``, rotated in fp32 and joined back. ROPE 1 = half-split
    pairs (d, d + D/2), 2 = interleaved (2i, 2i + 1). Same arithmetic as :func:`load_rope_tile`;
    the result has ``x``'s dtype.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    R: tl.constexpr = x.shape[0]
    xf = x.to(tl.float32)
    if ROPE == 1:
        pairs = tl.permute(tl.reshape(xf, [R, 2, HALF]), (0, 2, 1))  # [R, HALF, 2]: (x[f], x[f + HALF])
    else:
        pairs = tl.reshape(xf, [R, HALF, 2])  # (x[2f], x[2f + 1])
    a, b = tl.split(pairs)
    rot = tl.join(a * c - b * s, b * c + a * s)  # [R, HALF, 2]
    if ROPE == 1:
        rot = tl.permute(rot, (0, 2, 1))  # [R, 2, HALF]
    return tl.reshape(rot, [R, HEAD_DIM]).to(x.dtype)


@triton.jit
def rope_rows(x, pos, COS, SIN, stride_cs, max_pos, ROPE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rotate a register tile ``x`` [R, HEAD_DIM] (HEAD_DIM a power of two) by RoPE at ``pos`` [R].

    cos/sin from fp32 tables [max_pos, D/2] (rows outside the table read as 0: the host checks
    the positions); the rotation is :func:`rotate_pairs`.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    ok = (pos >= 0) & (pos < max_pos)
    cs_off = pos[:, None].to(tl.int64) * stride_cs + tl.arange(0, HALF)[None, :]
    c = tl.load(COS + cs_off, mask=ok[:, None], other=0.0)
    s = tl.load(SIN + cs_off, mask=ok[:, None], other=0.0)
    return rotate_pairs(x, c, s, ROPE, HEAD_DIM)


@triton.jit
def seq_bounds(CU_Q, CU_K, b, nq, nk, IS_VARLEN: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k) of batch entry b."""
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


def strides4(t, varlen: bool) -> tuple:
    """(batch, head, seq, dim) strides of a tensor; packed THD tensors have batch stride 0 (rows come from
    cu_seqlens)."""
    if varlen:
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


@triton.jit
def split_hi_lo(x, DTYPE: tl.constexpr):
    """fp32 ``x`` as two ``DTYPE`` values: ``hi`` = x rounded, ``lo`` = the residue x - hi rounded (the
    split scores' operands: hi.k + hi.k_lo + lo.k carries x to ~2^-16 where hi alone has ~2^-8)."""
    hi = x.to(DTYPE)
    return hi, (x - hi.to(tl.float32)).to(DTYPE)

