"""Standalone RoPE in Triton: rotate q and k into new tensors (the "separate RoPE + attention" baseline).

Study 7 compares the dense forward with RoPE fused into its tile loads against this kernel
followed by attention on the rotated tensors. Both rotate through the same helper
(:func:`.common.load_rope_tile`: fp32 rotation of a row tile with its partner columns, cos/sin
from fp32 tables [max_pos, D/2]) and round the result to the input dtype, so they compute the same
values; the difference is the extra write and read of q and k here.

One program per (BLOCK_N rows, batch * head); q and k are two launches of one compiled kernel
(the layout and head dim are constexpr, positions and strides are run-time). Semantics are
:func:`.rope.apply_rope_reference`'s: q positions ``q_offset + i`` (default ``Nk - Nq + i``), k
positions ``k_offset + j``; layouts "half" (pairs d, d + D/2) and "interleaved" (2i, 2i + 1).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ...runtime.cache import KERNEL_CACHE
from ...runtime.device import interpreter_mode
from ...runtime.validation import (describe, require_dtype, require_rank, require_same_device, require_same_dtype,
                                   require_tensor)
from .common import (ROPE_HALF, ROPE_INTERLEAVED, load_rope_tile, rotate_pairs, seq_bounds, split_hi_lo,
                     strides4)
from .configs import block_d
from .rope import RopeSpec, rope_tables

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rope_kernel(X, Y, Y_LO, COS, SIN,
                 sxb, sxh, sxn, sxd, syb, syh, syn, syd,
                 N, H, pos0, stride_cs, max_pos,
                 ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # Y_LO (None: not written): the rounding residue of each rotated element, Y's strides and dtype
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y = load_rope_tile(X + b * sxb + h * sxh, rows, N, sxn, sxd, pos0, COS, SIN, stride_cs, max_pos,
                       ROPE, HEAD_DIM, BLOCK_D, True)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < HEAD_DIM)
    y_off = b * syb + h * syh + rows[:, None] * syn + cols[None, :] * syd
    y_hi, y_lo = split_hi_lo(y, Y.dtype.element_ty)
    tl.store(Y + y_off, y_hi, mask=mask)
    if Y_LO is not None:
        tl.store(Y_LO + y_off, y_lo, mask=mask)


@triton.jit
def _rope_rows_kernel(X, Y, Y_LO, COS, SIN,
                      sxb, sxh, sxn, syb, syh, syn,
                      N, H, pos0, stride_cs, max_pos,
                      ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr):
    # HEAD_DIM a power of two, unit last strides: one load of each row tile, the partner columns
    # by a register shuffle; cos/sin [BLOCK_N, D/2] loaded once for HEADS heads (they share the
    # positions), so the table costs a fraction of the tensor's own traffic
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h0 = tl.program_id(2) * HEADS
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HEAD_DIM)
    pos = pos0 + rows
    ok = (pos >= 0) & (pos < max_pos)
    cs_off = pos[:, None].to(tl.int64) * stride_cs + tl.arange(0, HALF)[None, :]
    c = tl.load(COS + cs_off, mask=ok[:, None], other=0.0)
    s = tl.load(SIN + cs_off, mask=ok[:, None], other=0.0)
    mask = (rows < N)[:, None]
    for i in tl.static_range(HEADS):
        h = (h0 + i).to(tl.int64)
        hmask = mask & (h < H)
        x = tl.load(X + b * sxb + h * sxh + rows[:, None] * sxn + cols[None, :], mask=hmask, other=0.0)
        y_off = b * syb + h * syh + rows[:, None] * syn + cols[None, :]
        if Y_LO is None:
            tl.store(Y + y_off, rotate_pairs(x, c, s, ROPE, HEAD_DIM).to(Y.dtype.element_ty), mask=hmask)
        else:
            # rotated in fp32 (the same arithmetic), stored rounded, the residue beside it
            y_hi, y_lo = split_hi_lo(rotate_pairs(x.to(tl.float32), c, s, ROPE, HEAD_DIM), Y.dtype.element_ty)
            tl.store(Y + y_off, y_hi, mask=hmask)
            tl.store(Y_LO + y_off, y_lo, mask=hmask)


@triton.jit
def _rope_pass(X, Y, Y_LO, COS, SIN, CU_Q, CU_K,
               stride_xb, stride_xh, stride_xm, stride_xd, stride_yb, stride_yh, stride_ym, stride_yd,
               nq, nk, H, stride_cs, max_pos, pos_off,
               IS_VARLEN: tl.constexpr, IS_Q: tl.constexpr, Q_DEFAULT: tl.constexpr, ROPE: tl.constexpr,
               INVERSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Y = R X (INVERSE: R^T X) for the rows of q (IS_Q) or k; table row = pos_off + position.

    Y_LO (Y's strides and dtype; None: not written) gets the rounding residue R X - Y (split scores).
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    q_start, seqlen_q, k_start, seqlen_k = seq_bounds(CU_Q, CU_K, b, nq, nk, IS_VARLEN)
    if IS_Q:
        start = q_start
        n = seqlen_q
        pos0 = pos_off + (seqlen_k - seqlen_q if Q_DEFAULT else 0) - q_start
    else:
        start = k_start
        n = seqlen_k
        pos0 = pos_off - k_start
    if pid_m * BLOCK_M >= n:
        return
    b64 = b.to(tl.int64)
    rows = start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    x = load_rope_tile(X + b64 * stride_xb + h * stride_xh, rows, start + n, stride_xm, stride_xd, pos0,
                       COS, SIN, stride_cs, max_pos, ROPE, HEAD_DIM, BLOCK_D, True, INVERSE)
    cols = tl.arange(0, BLOCK_D)
    y_off = b64 * stride_yb + h * stride_yh + rows[:, None] * stride_ym + cols[None, :] * stride_yd
    y_ok = (rows < start + n)[:, None] & (cols < HEAD_DIM)[None, :]
    y, y_lo = split_hi_lo(x, Y.dtype.element_ty)
    tl.store(Y + y_off, y, mask=y_ok)
    if Y_LO is not None:
        tl.store(Y_LO + y_off, y_lo, mask=y_ok)


def _block_n(D: int) -> int:
    if interpreter_mode():
        return 16
    return 64 if block_d(D) <= 128 else 32  # ~16 KB of fp32 rotation work per program


def rotate_into(x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos0: int, mode: int,
                y_lo: Optional[torch.Tensor] = None) -> None:
    """Write ``x`` [B, H, N, D] rotated at positions ``pos0 + j`` into ``y`` (same shape; no checks).

    ``cos``/``sin``: fp32 tables [max_pos, D/2] covering the positions; ``mode`` 1 half, 2
    interleaved. The dense forward's TMA path rotates its keys with this before the attention launch.
    ``y_lo`` (y's shape, strides and dtype): also the rounding residue of each element, fp32 rotation
    minus ``y`` (the forward's split scores).
    """
    B, H, N, D = x.shape
    if B == 0 or H == 0 or N == 0:
        return
    if y_lo is not None and (y_lo.shape != y.shape or y_lo.stride() != y.stride() or y_lo.dtype != y.dtype):
        raise ValueError(f"rotate_into: y_lo must match y (shape {tuple(y.shape)}, strides {y.stride()}, {y.dtype}); "
                         f"got {describe(y_lo)} with strides {y_lo.stride()}")
    if D >= 16 and D & (D - 1) == 0 and x.stride(3) == 1 and y.stride(3) == 1 and x.dtype == y.dtype:
        bn = 16 if interpreter_mode() else max(16, 8192 // D)  # ~8K elements (16 KB of bf16) per head
        heads = min(4, H)
        KERNEL_CACHE.launch(
            _rope_rows_kernel, ((N + bn - 1) // bn, B, (H + heads - 1) // heads),
            x, y, y_lo, cos, sin, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
            N, H, pos0, cos.stride(0), cos.shape[0], ROPE=mode, HEAD_DIM=D, BLOCK_N=bn, HEADS=heads, num_warps=4,
        )
        return
    bn = _block_n(D)
    KERNEL_CACHE.launch(
        _rope_kernel, ((N + bn - 1) // bn, B * H),
        x, y, y_lo, cos, sin, *x.stride(), *y.stride(), N, H, pos0, cos.stride(0), cos.shape[0],
        ROPE=mode, HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_N=bn, num_warps=4,
    )


def rope_pass(x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_q, cu_k, *,
              varlen: bool, batch: int, nq: int, nk: int, is_q: bool, q_default: bool, pos_off: int, mode: int,
              inverse: bool = False, y_lo: Optional[torch.Tensor] = None) -> None:
    """Rotate the rows of q (``is_q``) or k into ``y`` (same shape; no checks): ``x`` [B, H, N, D], or
    packed [T, H, D] when ``varlen`` (sequence b's rows ``cu[b]:cu[b + 1]``, ``cu_q`` for q, ``cu_k``
    for k; ``nq``/``nk`` then the longest sequences). Row i of a sequence takes table row
    ``pos_off + i``, plus ``seqlen_k - seqlen_q`` for q when ``q_default``. ``inverse``: R^T (the
    backward's gradients). ``y_lo``: also the rounding residues (y's strides). The backward rotates
    with this; the dense forward rotates packed q and k with it before a plain varlen launch.
    """
    small = interpreter_mode()
    D = x.shape[-1]
    rb = 16 if small else max(16, 2048 // block_d(D))  # four [rb, BD] fp32 tiles live at once
    KERNEL_CACHE.launch(
        _rope_pass, (triton.cdiv(nq if is_q else nk, rb), batch * x.shape[1]),
        x, y, y_lo, cos, sin, cu_q, cu_k, *strides4(x, varlen), *strides4(y, varlen),
        nq, nk, x.shape[1], cos.stride(0), cos.shape[0], pos_off,
        IS_VARLEN=varlen, IS_Q=is_q, Q_DEFAULT=q_default, ROPE=mode, INVERSE=inverse, HEAD_DIM=D, BLOCK_M=rb,
        BLOCK_D=block_d(D), num_warps=1 if small else 4,
    )


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    rope: RopeSpec,
    *,
    out_q: Optional[torch.Tensor] = None,
    out_k: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by RoPE. Returns ``(q_rot, k_rot)``, new tensors unless ``out_q``/``out_k`` are given.

    Shapes: q [B, H, Nq, D], k [B, Hkv, Nk, D] (any strides; D even, <= 256); outputs have the
    inputs' shapes and dtype (contiguous when allocated here). ``rope``: a :class:`.rope.RopeSpec`
    (layout, theta or cos/sin tables [max_pos, D/2], q_offset default Nk - Nq, k_offset).
    The rotation is computed in fp32 and rounded once to the output dtype.
    """
    for name, t in (("q", q), ("k", k)):
        require_tensor(name, t)
        require_rank(name, t, 4, "[B, H, N, D]")
        require_dtype(name, t, SUPPORTED_DTYPES)
    require_same_dtype(("q", "k"), (q, k))
    require_same_device(("q", "k"), (q, k))
    if not isinstance(rope, RopeSpec):
        raise TypeError(f"rope must be a RopeSpec; got {describe(rope)}")
    D = q.shape[3]
    if k.shape[3] != D or q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must share the batch size and head dim; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if D % 2 or D > 256:
        raise ValueError(f"rope needs an even head dim <= 256; got D={D} (q {describe(q)})")
    Nq, Nk = q.shape[2], k.shape[2]
    q_off = rope.resolved_q_offset(Nq, Nk)
    if q_off < 0 or rope.k_offset < 0:
        raise ValueError(f"rope positions must be >= 0; got q_offset={q_off} (Nq={Nq}, Nk={Nk}), k_offset={rope.k_offset}")
    for name, o, x in (("out_q", out_q, q), ("out_k", out_k, k)):
        if o is not None and (not isinstance(o, torch.Tensor) or o.shape != x.shape or o.dtype != x.dtype
                              or o.device != x.device):
            raise ValueError(f"{name} must be a tensor shaped, typed and placed like {name[4:]} "
                             f"({describe(x)}); got {describe(o)}")
    needed = max(q_off + Nq, rope.k_offset + Nk)
    cos, sin = rope_tables(rope, D, needed, q.device)
    mode = ROPE_HALF if rope.layout == "half" else ROPE_INTERLEAVED
    out_q = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out_q is None else out_q
    out_k = torch.empty(k.shape, dtype=k.dtype, device=k.device) if out_k is None else out_k
    rotate_into(q, out_q, cos, sin, q_off, mode)
    rotate_into(k, out_k, cos, sin, int(rope.k_offset), mode)
    return out_q, out_k
