"""Paged decode kernels: one pass (V1), split-KV (V2) with a fused merge, and the separate reduce.

One program handles one (sequence b, KV head, row block[, partition]). Its query
tile packs the rows of the whole GQA group: row ``r`` is query head
``kvh * G + r // Nq`` and query token ``r % Nq`` (G = Hq / Hkv), so each page of
K/V is read once per KV head, not once per query head. The tile is padded to
BLOCK_M >= 16 rows for ``tl.dot``.

The KV loop walks tiles of BLOCK_N tokens aligned to BLOCK_N. Each token's page
comes from the block table: when a tile lies inside one page (page_size >=
BLOCK_N) one scalar lookup serves the tile, otherwise every row is gathered
from its own page. Either way the tile, hence the shared memory of the
pipeline, does not depend on the page size.

Pipelining: the page ids are a load that the K/V loads depend on, so Triton's
pipeliner spends pipeline stages on that indirection: ``num_stages`` 3 or 4
leave ONE K/V buffer (each iteration waits for its own tile: load latency is not
hidden), 5-6 give two buffers, 7 gives three (read from the compiled TTGIR with
``codegen.cross``). :func:`kv_buffers` states the rule; the dispatch sizes
occupancy with it.

Safety: tokens at or past ``min(seq_len, max_pages * page_size)`` are masked,
so no block-table entry past the sequence is read, and every page id read is
clamped into ``[0, num_pages)``: even a corrupt block table (with
``check_inputs=False``) cannot make the kernel read outside the pool.

Score math per tile (fp32), as the dense reference: s = scale * q.k; softcap
``c * tanh(s / c)`` (the exact exp2 form, :func:`tanh_f32`, never ``tanh.approx``: its
~2^-11 relative error breaks fp32 outputs and the fp32 LSE in every dtype, and decode is
bound by HBM, not by special-function ops); ALiBi ``- slope * |pos - j|``; causal (``j <= pos``) and
window (``j >= pos - left``) masks, with ``pos = seq_len - Nq + i``; then an
online softmax in base 2. P is cast to the K/V dtype for the second MMA
(FlashAttention's choice). fp32 inputs use ``input_precision="ieee"`` (true
fp32 products, no TF32) so that fp32 results are fp32-accurate.

Modes (``MODE``):

- ``SINGLE`` (V1): one program walks the whole sequence and writes the output.
- ``SPLIT`` (V2, ``reduce="kernel"``): every partition writes ``o_p = acc / l``
  and ``lse_p`` (natural log), empty ones lse -inf; a second kernel merges:
  ``out = sum_p exp(lse_p - M) o_p / sum_p exp(lse_p - M)``, ``lse = M + log(sum ...)``.
- ``FUSED`` (V2, ``reduce="fused"``): sequence b uses only
  ``n_b = ceil((kv_end - lo) / tokens_per_part)`` partitions; the others exit at
  once. With ``n_b == 1`` the program writes the output itself (short sequences
  of a mixed batch cost what V1 costs). Otherwise each writes its partial, then
  takes a ticket from an int32 counter per (sequence, KV head, row block)
  (``atomic_add``, acq_rel, GPU scope, after a CTA barrier so that every
  thread's partial stores are ordered before the release); the program that
  draws the last ticket merges the partials in partition order (bitwise the
  same whichever program is last) and resets the counter to 0 for the next
  call. No second launch. The counters must be zero at launch
  (:mod:`attention_proto.ops.paged.workspace`).

A row that sees no key ends with out 0 and lse -inf in every mode.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # programmatic dependent launch

import attention_proto  # noqa: F401  (sets TRITON_INTERPRET before kernels are defined)
from attention_proto.runtime.cache import KERNEL_CACHE

from ..dense.common import _INTERPRETED, tanh_f32
from .dispatch import PagedPlan
from .workspace import merge_counters

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
#: partitions the reduce kernel merges per loop step
REDUCE_BLOCK_P = 16
#: fp32 elements of partial output the fused merge holds per step (MERGE_P x MERGE_M x BLOCK_D)
MERGE_ELEMS = 4096
MODE_SINGLE, MODE_SPLIT, MODE_FUSED = 0, 1, 2


def kv_buffers(num_stages: int) -> int:
    """K/V shared-memory buffers Triton 3.6's pipeliner gives the decode loop at ``num_stages``.

    One stage goes to the page-id load the K/V loads depend on: ``(num_stages - 1) // 2``
    buffers, at least one (3-4 stages: 1, 5-6: 2, 7-8: 3; from the compiled TTGIR, sm_90).
    """
    return max(1, (int(num_stages) - 1) // 2)


@triton.jit
def _merge_partials(
    PO, PL, Out, Lse, b, kvh, rb, n_act, num_parts, rows_per_kvh, Hkv, Nq, G,
    s_ob, s_oh, s_on, s_lb, s_lh, s_ln,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    MERGE_M: tl.constexpr, MERGE_P: tl.constexpr,
):
    # partials live in [rows, num_parts, HEAD_DIM] with row = (b * Hkv + kvh) * rows_per_kvh + r:
    # the [B, Hq, Nq, P, D] order; MERGE_M >= the valid rows of this row block
    offs_r = rb * BLOCK_M + tl.arange(0, MERGE_M)
    r_ok = offs_r < rows_per_kvh
    rows = (b * Hkv + kvh) * rows_per_kvh + offs_r
    offs_p = tl.arange(0, MERGE_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_run = tl.full([MERGE_M], float("-inf"), tl.float32)
    den = tl.zeros([MERGE_M], tl.float32)
    acc = tl.zeros([MERGE_M, BLOCK_D], tl.float32)
    for p0 in range(0, n_act, MERGE_P):
        p = p0 + offs_p
        pr_ok = (p < n_act)[:, None] & r_ok[None, :]
        # .cg: read from L2, never from this SM's L1 (other programs wrote these)
        lp = tl.load(PL + rows[None, :] * num_parts + p[:, None], mask=pr_ok, other=float("-inf"),
                     cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(lp, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2((m_run - m_use) * LOG2E)
        w = tl.math.exp2((lp - m_use[None, :]) * LOG2E)
        o_ptrs = PO + ((rows[None, :, None] * num_parts + p[:, None, None]) * HEAD_DIM + offs_d[None, None, :])
        o = tl.load(o_ptrs, mask=pr_ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 0)
        den = den * alpha + tl.sum(w, 0)
        m_run = m_new
    empty = den == 0.0
    d_safe = tl.where(empty, 1.0, den)
    m_fin = tl.where(m_run == float("-inf"), 0.0, m_run)
    head = kvh * G + offs_r // Nq
    qi = offs_r % Nq
    tl.store(Out + b * s_ob + head[:, None] * s_oh + qi[:, None] * s_on + offs_d[None, :],
             (acc / d_safe[:, None]).to(Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b * s_lb + head * s_lh + qi * s_ln, tl.where(empty, float("-inf"), m_fin + tl.log(d_safe)),
             mask=r_ok)


@triton.jit(do_not_specialize=["tokens_per_part", "num_parts", "num_pages", "max_pages", "win_left"])
def _paged_decode_kernel(
    Q, K, V, BT, SL, Alibi, Out, Lse, PO, PL, Ctr,
    sm_scale, softcap, win_left, tokens_per_part, num_parts, num_pages, max_pages,
    Hkv, Nq, G, rows_per_kvh, num_row_blocks,
    s_qb, s_qh, s_qn,
    s_kp, s_kt, s_kh,
    s_vp, s_vt, s_vh,
    s_btb,
    s_ob, s_oh, s_on,
    s_lb, s_lh, s_ln,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MERGE_M: tl.constexpr, MERGE_P: tl.constexpr,
    MODE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT: tl.constexpr,  # MODE != 0; unused here: the study looks compiled kernels up by it
    PDL: tl.constexpr = False,
):
    if PDL:
        # the reduce kernel may be scheduled now (it waits for this grid's completion itself)
        gdc_launch_dependents()
    pid = tl.program_id(0)
    part = tl.program_id(1)
    rb = pid % num_row_blocks
    bh = pid // num_row_blocks
    kvh = bh % Hkv
    b = (bh // Hkv).to(tl.int64)

    seq_len = tl.load(SL + b).to(tl.int32)
    # never look past the block table's row: tokens beyond its pages are masked
    kv_end = tl.minimum(seq_len, max_pages * PAGE_SIZE)

    offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows_per_kvh
    head = kvh * G + offs_m // Nq
    qi = offs_m % Nq
    q_pos = seq_len - Nq + qi  # position of each query row inside its sequence
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + b * s_qb + head[:, None] * s_qh + qi[:, None] * s_qn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_ALIBI:
        slope = tl.load(Alibi + head, mask=row_ok, other=0.0).to(tl.float32)

    lo = seq_len * 0
    if HAS_WINDOW:
        # the first key any row of this sequence may see (rows are the last Nq tokens)
        lo = tl.maximum(seq_len - Nq - win_left, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    n_act = 1
    if MODE == 0:
        start = lo
        end = kv_end
    else:
        start = lo + part * tokens_per_part
        end = tl.minimum(start + tokens_per_part, kv_end)
        if MODE == 2:
            # partitions this sequence uses; the rest (past its end) exit without a write
            n_act = tl.minimum(tl.maximum((kv_end - lo + tokens_per_part - 1) // tokens_per_part, 1), num_parts)
            end = tl.where(part < n_act, end, start)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = BT + b * s_btb
    k_head = K + kvh * s_kh
    v_head = V + kvh * s_vh
    qk_scale = sm_scale * LOG2E
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        if PAGE_SIZE >= BLOCK_N:
            # the tile lies inside one page (n0 is a multiple of BLOCK_N, which divides PAGE_SIZE)
            page = tl.load(bt_row + n0 // PAGE_SIZE)
            page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
            slot = (n0 % PAGE_SIZE) + tl.arange(0, BLOCK_N)
            k_off = page * s_kp + slot[:, None] * s_kt
            v_off = page * s_vp + slot[:, None] * s_vt
        else:
            pages = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_ok, other=0)
            pages = tl.minimum(tl.maximum(pages, 0), num_pages - 1).to(tl.int64)
            slot = offs_n % PAGE_SIZE
            k_off = pages[:, None] * s_kp + slot[:, None] * s_kt
            v_off = pages[:, None] * s_vp + slot[:, None] * s_vt
        if BLOCK_D == HEAD_DIM:
            kv_mask = n_ok[:, None]  # row mask only: keeps the D axis provably unmasked (vector loads)
        else:
            kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_head + k_off + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if HAS_SOFTCAP or HAS_ALIBI:
            s = s * sm_scale
            if HAS_SOFTCAP:
                # exact tanh, never tanh.approx: its ~2^-11 error broke fp32 bounds in the GPU fuzz (issue #10)
                s = softcap * tanh_f32(s / softcap)
            if HAS_ALIBI:
                dist = q_pos[:, None] - offs_n[None, :]
                dist = tl.where(dist < 0, -dist, dist)
                s = s - slope[:, None] * dist.to(tl.float32)
            s = s * LOG2E
        else:
            s = s * qk_scale
        keep = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            keep = keep & (offs_n[None, :] >= q_pos[:, None] - win_left)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet: no NaN
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + v_off + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    out_mask = row_ok[:, None] & d_ok[None, :]
    o_ptrs = Out + b * s_ob + head[:, None] * s_oh + qi[:, None] * s_on + offs_d[None, :]
    l_ptrs = Lse + b * s_lb + head * s_lh + qi * s_ln
    # partial rows: [B, Hq, Nq, P, D] order, row = (b * Hkv + kvh) * rows_per_kvh + offs_m
    prow = (b * Hkv + kvh) * rows_per_kvh + offs_m
    po_ptrs = PO + (prow[:, None] * num_parts + part) * HEAD_DIM + offs_d[None, :]
    pl_ptrs = PL + prow * num_parts + part
    if MODE == 0:
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=out_mask)
        tl.store(l_ptrs, lse, mask=row_ok)
    elif MODE == 1:
        tl.store(po_ptrs, o, mask=out_mask)
        tl.store(pl_ptrs, lse, mask=row_ok)
    else:
        active = part < n_act
        if n_act == 1:
            tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=out_mask & active)
            tl.store(l_ptrs, lse, mask=row_ok & active)
        else:
            tl.store(po_ptrs, o, mask=out_mask & active)
            tl.store(pl_ptrs, lse, mask=row_ok & active)
            # every thread's partial stores precede the release of the ticket (CTA barrier, then a
            # cumulative release at GPU scope); the acquire orders the merge's loads after the
            # other programs' releases
            tl.debug_barrier()
            ticket = tl.atomic_add(Ctr + pid, 1, mask=active, sem="acq_rel", scope="gpu")
            if active & (ticket == n_act - 1):
                _merge_partials(PO, PL, Out, Lse, b, kvh, rb, n_act, num_parts, rows_per_kvh, Hkv, Nq, G,
                                s_ob, s_oh, s_on, s_lb, s_lh, s_ln,
                                HEAD_DIM, BLOCK_M, BLOCK_D, MERGE_M, MERGE_P)
                # ready for the next call (which is stream-ordered after this one)
                tl.atomic_xchg(Ctr + pid, 0, sem="relaxed", scope="gpu")


@triton.jit
def _paged_reduce_kernel(
    PO, PL, Out, Lse, P,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
):
    # one program per (b, h, i) row; PO [R, P, HEAD_DIM] fp32, PL [R, P] fp32, Out [R, HEAD_DIM], Lse [R]
    if PDL:
        gdc_wait()  # launched early (programmatic dependent launch): the partitions' writes first
    row = tl.program_id(0).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # one pass, online over chunks of BLOCK_P partitions: the LSE and output loads of a chunk are
    # issued together (a first pass for the max cost one more L2 round trip: 2.8-3.0 us against
    # 2.5-2.6 us at B8 N4k on an H100); with P <= BLOCK_P the result is the two-pass one, bit for bit
    m_run = tl.max(tl.full([BLOCK_P], float("-inf"), tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p_ok = p0 + offs_p < P
        lp = tl.load(PL + row * P + p0 + offs_p, mask=p_ok, other=float("-inf"))
        o = tl.load(PO + (row * P + p0 + offs_p[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(lp, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2((m_run - m_use) * LOG2E)
        w = tl.math.exp2((lp - m_use) * LOG2E)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        den = den * alpha + w
        m_run = m_new
    m_use = tl.where(m_run == float("-inf"), 0.0, m_run)
    total = tl.sum(den, 0)
    empty = total == 0.0
    t_safe = tl.where(empty, 1.0, total)
    tl.store(Out + row * HEAD_DIM + offs_d, (acc / t_safe).to(Out.dtype.element_ty), mask=d_ok)
    tl.store(Lse + row, tl.where(empty, float("-inf"), m_use + tl.log(t_safe)))


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def merge_tile(rows_per_kvh: int, block_m: int, block_d: int) -> Tuple[int, int]:
    """(MERGE_M, MERGE_P): rows and partitions the fused merge holds per step."""
    mm = min(block_m, _pow2_at_least(rows_per_kvh))
    mp = max(1, min(16, MERGE_ELEMS // (mm * block_d)))
    return mm, 1 << (mp.bit_length() - 1)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    plan: PagedPlan,
    *,
    scale: float,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    window_left: int = -1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the decode kernel(s) of ``plan`` on validated inputs. Returns (out, lse fp32).

    q ``[B, Hq, Nq, D]`` (unit stride in D), caches ``[num_pages, page_size, Hkv, D]`` (unit
    stride in D, any other strides), block_table ``[B, max_pages]``, seq_lens ``[B]``.
    """
    B, Hq, Nq, D = q.shape
    num_pages, page_size, Hkv, _ = k_cache.shape
    cfg = plan.config
    G = Hq // Hkv
    rows = G * Nq
    out = torch.empty(B, Hq, Nq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, Nq, device=q.device, dtype=torch.float32)
    split = plan.version == "v2"
    P = plan.num_partitions if split else 1
    mode = MODE_SINGLE
    o_buf, l_buf, ctr = out, lse, seq_lens  # placeholders: never read in MODE_SINGLE
    # programmatic dependent launch needs a GPU (the interpreter runs "kernel_pdl" as "kernel")
    pdl = split and cfg.reduce == "kernel_pdl" and not _INTERPRETED
    if pdl and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 9:
        raise ValueError(f"config.reduce='kernel_pdl' needs programmatic dependent launch (compute capability 9.0 "
                         f"or newer); got {torch.cuda.get_device_name(q.device)} with capability "
                         f"{torch.cuda.get_device_capability(q.device)}: use reduce='kernel'")
    if split:
        mode = MODE_FUSED if cfg.reduce == "fused" else MODE_SPLIT
        o_buf = torch.empty(B, Hq, Nq, P, D, device=q.device, dtype=torch.float32)
        l_buf = torch.empty(B, Hq, Nq, P, device=q.device, dtype=torch.float32)
        if mode == MODE_FUSED:
            ctr = merge_counters(B * Hkv * plan.row_blocks, q.device)
    merge_m, merge_p = merge_tile(rows, cfg.BLOCK_M, cfg.BLOCK_D)
    has_alibi = alibi_slopes is not None
    alibi = alibi_slopes if has_alibi else seq_lens  # any pointer: never read without HAS_ALIBI
    grid = (B * Hkv * plan.row_blocks, P)
    KERNEL_CACHE.launch(
        _paged_decode_kernel, grid,
        q, k_cache, v_cache, block_table, seq_lens, alibi, out, lse, o_buf, l_buf, ctr,
        float(scale), float(softcap or 1.0), int(window_left), int(plan.tokens_per_partition), int(P),
        int(num_pages), int(block_table.shape[1]),
        Hkv, Nq, G, rows, plan.row_blocks,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        PAGE_SIZE=page_size, HEAD_DIM=D, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D,
        MERGE_M=merge_m, MERGE_P=merge_p,
        MODE=mode, HAS_SOFTCAP=bool(softcap), HAS_ALIBI=has_alibi, HAS_WINDOW=window_left >= 0,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", SPLIT=mode != MODE_SINGLE,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"PDL": True} if pdl else {}),
    )
    if mode == MODE_SPLIT:
        extra = dict(PDL=True, launch_pdl=True) if pdl else {}
        KERNEL_CACHE.launch(
            _paged_reduce_kernel, (B * Hq * Nq,),
            o_buf, l_buf, out, lse, P,
            HEAD_DIM=D, BLOCK_P=REDUCE_BLOCK_P, BLOCK_D=cfg.BLOCK_D, num_warps=4, **extra,
        )
    return out, lse
