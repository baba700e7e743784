"""Chunked linear attention, backward: state gradients (chunk_dh), then dq/dk/dg and dv per chunk.

Notation of :mod:`.chunk` (h_c: state entering chunk c, G: chunk-local cumulative
log-decay, G_L at the chunk's last token). ``dh_c`` is the gradient of the state
*leaving* chunk c (h_{c+1}); it follows the reverse recurrence

    dh_{c-1} = exp(G_L(c)) dh_c + scale * sum_{t in c} exp(G_t) q_t^T do_t

started from the final-state gradient (or 0); what is left after chunk 0 is the
initial-state gradient. Per chunk, with ds'[t, s] = scale exp(G_t - G_s) (do_t . v_s)
for s <= t:

    dq_t = scale exp(G_t) do_t h_c^T + sum_s ds'[t, s] k_s
    dk_s = exp(G_L - G_s) v_s dh_c^T + sum_t ds'[t, s] q_t
    dv_s = exp(G_L - G_s) k_s dh_c   + sum_{t >= s} scale exp(G_t - G_s) (q_t . k_s) do_t

The gate: treating the chunk-local G_t as the variables, dG_t = q_t . dq_t - k_t . dk_t,
plus, at the chunk's last token, d h_{c+1} / d G_L = h_{c+1}, i.e.
exp(G_L) <h_c, dh_c> + sum_s k_s . dk_inter_s. g enters G_t for every t >= its token
inside its chunk, so dg is the reverse cumulative sum of dG within the chunk -- no
dependency between chunks, and no long cancelling sum.

Triton on Hopper (3.4 to 3.7.0) miscompiles ``tl.dot(tl.trans(x), ...)`` when x is
itself a dot result (fla issue #640: dk and dg wrong at 64-wide K tiles). These
kernels never transpose a dot result: dk is accumulated transposed ([K, BT]) as
dot(q^T, ds') + dot(dh, v^T), where every transposed operand is a loaded tile, and
stored through transposed pointers; dv uses (k q^T), computed directly. A second form
(``DST=1`` in the chunk_dqk config) goes further and never feeds a dot result to a dot's
B operand either (see the kernel).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import (SeqInfo, chunk_coords, chunk_gate, dot_precision, kernel_config, launch, row_offset, seq_coords,
                     tuning)


@triton.jit(do_not_specialize=["T"])
def chunk_bwd_dh_kernel(
    q, do, g, dh, dht, dh0, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    SK: tl.constexpr, SV: tl.constexpr, SG: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    IS_VARLEN: tl.constexpr, HEAD_FIRST: tl.constexpr, PREC: tl.constexpr,
):
    NK: tl.constexpr = (K + BK - 1) // BK
    NV: tl.constexpr = (V + BV - 1) // BV
    pid = tl.program_id(0)
    i_nh = pid // (NK * NV)
    i_k = (pid % (NK * NV)) // NV
    i_v = pid % NV
    i_n = i_nh // H
    i_h = i_nh % H
    i_b, bos, L = seq_coords(i_n, cu_seqlens, T, IS_VARLEN)
    if IS_VARLEN:
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        boh = i_n.to(tl.int64) * tl.cdiv(T, BT)
    NT = tl.cdiv(L, BT)
    q += row_offset(i_b, i_h, bos, T, H, K, HEAD_FIRST)
    do += row_offset(i_b, i_h, bos, T, H, V, HEAD_FIRST)
    if USE_G:
        g += row_offset(i_b, i_h, bos, T, H, 1, HEAD_FIRST)

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_kv = m_k[:, None] & (o_v[None, :] < V)
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.0).to(tl.float32)

    for i in range(0, NT):
        i_t = NT - 1 - i
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < L
        tl.store(dh + ((boh + i_t) * H + i_h) * K * V + o_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        b_qt = tl.load(q + o_t[None, :] * SK + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_do = tl.load(do + o_t[:, None] * SV + o_v[None, :], mask=m_t[:, None] & (o_v[None, :] < V), other=0.0)
        if USE_G:
            last = tl.minimum(i_t * BT + BT, L) - 1
            b_g, b_gl = chunk_gate(g, o_t, m_t, last, SG)
            b_dh *= tl.exp2(b_gl)
            b_qt = (b_qt * (tl.exp2(b_g) * scale)[None, :]).to(b_qt.dtype)
        else:
            b_qt = (b_qt * scale).to(b_qt.dtype)
        b_dh = tl.dot(b_qt, b_do, b_dh, input_precision=PREC)

    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_kv, b_dh, mask=m_kv)


@triton.jit(do_not_specialize=["T", "dg_stride"])
def chunk_bwd_dqk_kernel(
    q, k, v, g, h, do, dh, dq, dk, dg, cu_seqlens, chunk_indices, scale, T, dg_stride,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    SK: tl.constexpr, SV: tl.constexpr, SG: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, STORE_DG: tl.constexpr, IS_VARLEN: tl.constexpr, HEAD_FIRST: tl.constexpr,
    PREC: tl.constexpr, DST: tl.constexpr = 0, DG_SCORES: tl.constexpr = 0,
):
    # DST = 0: dk accumulates transposed, dk^T = dh v^T + q^T ds' (ds' is the B operand of a dot).
    # DST = 1: ds'^T is computed by its own dot (v do^T) and dk = v dh^T + ds'^T q keeps every
    # dot result in the A slot; one more BT x BT x V matmul, the fallback if Triton mishandles
    # a dot result as a B operand on some GPU.
    NK: tl.constexpr = (K + BK - 1) // BK
    pid = tl.program_id(0)
    i_tg = pid // NK
    i_k = pid % NK
    i_h = tl.program_id(1)
    i_n, i_t = chunk_coords(i_tg, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    i_b, bos, L = seq_coords(i_n, cu_seqlens, T, IS_VARLEN)
    off_k = row_offset(i_b, i_h, bos, T, H, K, HEAD_FIRST)
    off_v = row_offset(i_b, i_h, bos, T, H, V, HEAD_FIRST)
    h += (i_tg.to(tl.int64) * H + i_h) * K * V
    dh += (i_tg.to(tl.int64) * H + i_h) * K * V

    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < L
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    if DST:
        b_dst = tl.zeros([BT, BT], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    else:
        b_dkt = tl.zeros([BK, BT], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, (V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = tl.load(do + off_v + o_t[:, None] * SV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_vt = tl.load(v + off_v + o_t[None, :] * SV + o_v[:, None], mask=m_v[:, None] & m_t[None, :], other=0.0)
        b_h = tl.load(h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_dh = tl.load(dh + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_ds = tl.dot(b_do, b_vt, b_ds, input_precision=PREC)                  # do . v     [BT, BT]
        b_dq = tl.dot(b_do, tl.trans(b_h), b_dq, input_precision=PREC)         # do h^T     [BT, BK]
        if DST:
            b_vv = tl.load(v + off_v + o_t[:, None] * SV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
            b_dot = tl.load(do + off_v + o_t[None, :] * SV + o_v[:, None], mask=m_v[:, None] & m_t[None, :],
                            other=0.0)
            b_dst = tl.dot(b_vv, b_dot, b_dst, input_precision=PREC)           # v . do     [BT, BT]
            b_dk = tl.dot(b_vv, tl.trans(b_dh), b_dk, input_precision=PREC)    # v dh^T     [BT, BK]
        else:
            b_dkt = tl.dot(b_dh, b_vt, b_dkt, input_precision=PREC)            # (v dh^T)^T [BK, BT]
        if STORE_DG:
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)

    # epilogue in two halves (dq, then dk) so that fewer tiles are live at once
    causal = o_t[:, None] >= o_t[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    m_kt = m_k[:, None] & m_t[None, :]
    if USE_G:
        last = tl.minimum(i_t * BT + BT, L) - 1
        b_g, b_gl = chunk_gate(g + row_offset(i_b, i_h, bos, T, H, 1, HEAD_FIRST), o_t, m_t, last, SG)
        b_ds = b_ds * tl.exp2(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf"))) * scale
        b_dq = b_dq * (tl.exp2(b_g) * scale)[:, None]
    else:
        b_ds = tl.where(causal, b_ds, 0.0) * scale
        b_dq = b_dq * scale
    b_kk = tl.load(k + off_k + o_t[:, None] * SK + o_k[None, :], mask=m_tk, other=0.0)
    b_ds_lp = b_ds.to(b_kk.dtype)
    if STORE_DG and DG_SCORES:
        # dG_t = q_t . dq_inter_t + sum_s A[t, s] - sum_t' A[t', t] - k_t . dk_inter_t (+ the last token's
        # term), A = ds' * (q k^T): a token's own pair A[t, t] enters both sums as one value and cancels
        # exactly (one token, no initial state: dg is exactly 0, as the float64 reference says)
        b_q = tl.load(q + off_k + o_t[:, None] * SK + o_k[None, :], mask=m_tk, other=0.0)
        b_dg = tl.sum(b_q.to(tl.float32) * b_dq, 1)
        b_a = b_ds * tl.dot(b_q, tl.trans(b_kk), input_precision=PREC)   # loaded tiles only
        b_dg += tl.sum(b_a, 1) - tl.sum(b_a, 0)
    b_dq = tl.dot(b_ds_lp, b_kk, b_dq, input_precision=PREC)
    tl.store(dq + off_k + o_t[:, None] * SK + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
    if STORE_DG and not DG_SCORES:
        b_q = tl.load(q + off_k + o_t[:, None] * SK + o_k[None, :], mask=m_tk, other=0.0)
        b_dg = tl.sum(b_q.to(tl.float32) * b_dq, 1)

    if DST:
        if USE_G:
            b_dk = b_dk * tl.exp2(b_gl - b_g)[:, None]
            b_dst = b_dst * tl.exp2(tl.where(o_t[:, None] <= o_t[None, :], b_g[None, :] - b_g[:, None],
                                             float("-inf"))) * scale
        else:
            b_dst = tl.where(o_t[:, None] <= o_t[None, :], b_dst, 0.0) * scale
        if STORE_DG:
            # d h_{c+1} / d G_L = h_{c+1}: exp(G_L) <h_c, dh_c> + sum_s k_s . dk_inter_s
            b_kdk = tl.sum(b_kk.to(tl.float32) * b_dk, 1)
            b_dgl = tl.exp2(b_gl) * tl.sum(b_hdh, 0) + tl.sum(b_kdk, 0)
            if DG_SCORES:
                b_dg = b_dg - b_kdk
        b_q2 = tl.load(q + off_k + o_t[:, None] * SK + o_k[None, :], mask=m_tk, other=0.0)
        b_dk = tl.dot(b_dst.to(b_q2.dtype), b_q2, b_dk, input_precision=PREC)
        tl.store(dk + off_k + o_t[:, None] * SK + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
        if STORE_DG and not DG_SCORES:
            b_dg = b_dg - tl.sum(b_kk.to(tl.float32) * b_dk, 1)
    else:
        if USE_G:
            b_dkt = b_dkt * tl.exp2(b_gl - b_g)[None, :]
        if STORE_DG:
            b_kt = tl.load(k + off_k + o_t[None, :] * SK + o_k[:, None], mask=m_kt, other=0.0).to(tl.float32)
            b_kdk = tl.sum(b_kt * b_dkt, 0)
            b_dgl = tl.exp2(b_gl) * tl.sum(b_hdh, 0) + tl.sum(b_kdk, 0)
            if DG_SCORES:
                b_dg = b_dg - b_kdk
        b_qt = tl.load(q + off_k + o_t[None, :] * SK + o_k[:, None], mask=m_kt, other=0.0)
        b_dkt = tl.dot(b_qt, b_ds_lp, b_dkt, input_precision=PREC)
        tl.store(dk + off_k + o_t[None, :] * SK + o_k[:, None], b_dkt.to(dk.dtype.element_ty), mask=m_kt)
        if STORE_DG and not DG_SCORES:
            b_dg = b_dg - tl.sum(b_kt * b_dkt, 0)
    if STORE_DG:
        b_dg = tl.where(o_t == last, b_dg + b_dgl, b_dg)
        b_dg = tl.where(m_t, b_dg, 0.0)
        b_dg = tl.cumsum(b_dg, 0, reverse=True)
        p_dg = dg + i_k.to(tl.int64) * dg_stride + row_offset(i_b, i_h, bos, T, H, 1, HEAD_FIRST) + o_t * SG
        tl.store(p_dg, b_dg, mask=m_t)


@triton.jit(do_not_specialize=["T"])
def chunk_bwd_dv_kernel(
    q, k, g, do, dh, dv, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    SK: tl.constexpr, SV: tl.constexpr, SG: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, HEAD_FIRST: tl.constexpr, PREC: tl.constexpr,
):
    NV: tl.constexpr = (V + BV - 1) // BV
    pid = tl.program_id(0)
    i_tg = pid // NV
    i_v = pid % NV
    i_h = tl.program_id(1)
    i_n, i_t = chunk_coords(i_tg, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    i_b, bos, L = seq_coords(i_n, cu_seqlens, T, IS_VARLEN)
    off_k = row_offset(i_b, i_h, bos, T, H, K, HEAD_FIRST)
    off_v = row_offset(i_b, i_h, bos, T, H, V, HEAD_FIRST)
    dh += (i_tg.to(tl.int64) * H + i_h) * K * V

    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < L
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_at = tl.zeros([BT, BT], dtype=tl.float32)   # [s, t] = k_s . q_t
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, (K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = tl.load(k + off_k + o_t[:, None] * SK + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_qt = tl.load(q + off_k + o_t[None, :] * SK + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_dh = tl.load(dh + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_at = tl.dot(b_k, b_qt, b_at, input_precision=PREC)
        b_dv = tl.dot(b_k, b_dh, b_dv, input_precision=PREC)
    causal_t = o_t[:, None] <= o_t[None, :]        # s <= t
    if USE_G:
        last = tl.minimum(i_t * BT + BT, L) - 1
        b_g, b_gl = chunk_gate(g + row_offset(i_b, i_h, bos, T, H, 1, HEAD_FIRST), o_t, m_t, last, SG)
        b_dv = b_dv * tl.exp2(b_gl - b_g)[:, None]
        b_at = b_at * tl.exp2(tl.where(causal_t, b_g[None, :] - b_g[:, None], float("-inf"))) * scale
    else:
        b_at = tl.where(causal_t, b_at, 0.0) * scale
    b_do = tl.load(do + off_v + o_t[:, None] * SV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_dv = tl.dot(b_at.to(b_do.dtype), b_do, b_dv, input_precision=PREC)
    tl.store(dv + off_v + o_t[:, None] * SV + o_v[None, :], b_dv.to(dv.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


# ---- host entry point -----------------------------------------------------------------------------

#: how the dq/dk kernel forms dg's intra-chunk part. "float32" (the default): from the scores,
#: sum_s A[t, s] - sum_t' A[t', t] with A = ds' * (q k^T), for float32 inputs, and q . dq - k . dk
#: (one BT x BT x K matmul less) for the others; "always" / "never": one form for every dtype. The
#: score form makes a token's own pair cancel exactly: on the H100 (session 6) the q . dq - k . dk form
#: gave dg = 1.1e-5 for one float32 token without an initial state, where the float64 and PyTorch
#: gradients are exactly 0 and the bound is 1e-5. Untimed on a GPU: "always" stays opt-in.
DG_FROM_SCORES = "float32"
DG_FORMS = ("float32", "always", "never")


def chunk_bwd_dh(q: torch.Tensor, do: torch.Tensor, g: Optional[torch.Tensor], dht: Optional[torch.Tensor],
                 scale: float, need_dh0: bool, info: SeqInfo, BT: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of the states leaving every chunk [num_chunks, H, K, V] and of the initial state (fp32)."""
    H, K, V = info.H, info.K, info.V
    plan = info.plan(BT)
    dh = torch.empty(plan.num_chunks, H, K, V, dtype=q.dtype, device=q.device)
    dh0 = torch.empty(info.num_seqs, H, K, V, dtype=torch.float32, device=q.device) if need_dh0 else None
    SK, SV, SG = info.strides()
    ns = info.num_seqs
    launch("chunk_dh", chunk_bwd_dh_kernel, lambda c: (triton.cdiv(K, c["BK"]) * triton.cdiv(V, c["BV"]) * ns * H,),
           (q, do, g, dh, dht, dh0, info.cu_seqlens, plan.chunk_offsets, float(scale), info.T),
           dict(H=H, K=K, V=V, SK=SK, SV=SV, SG=SG, BT=BT, USE_G=g is not None, USE_DHT=dht is not None,
                STORE_DH0=need_dh0, IS_VARLEN=info.varlen, HEAD_FIRST=info.head_first,
                PREC=dot_precision(q.dtype)), BT, K, V)
    return dh, dh0


def chunk_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor], h: torch.Tensor,
                   do: torch.Tensor, dht: Optional[torch.Tensor], scale: float, info: SeqInfo, BT: int,
                   need_dg: bool = True, need_dh0: bool = True):
    """(dq, dk, dv, dg fp32 or None, dh0 fp32 or None) from the forward's chunk states ``h``.

    All of q, k, v, do share one layout (``info``); g is the float32 log-decay or None.
    """
    H, K, V = info.H, info.K, info.V
    plan = info.plan(BT)
    dh, dh0 = chunk_bwd_dh(q, do, g, dht, scale, need_dh0, info, BT)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    SK, SV, SG = info.strides()
    store_dg = g is not None and need_dg
    if DG_FROM_SCORES not in DG_FORMS:
        raise ValueError(f"chunk_backward.DG_FROM_SCORES must be one of {DG_FORMS}; got {DG_FROM_SCORES!r}")
    dg_scores = store_dg and (DG_FROM_SCORES == "always" or (DG_FROM_SCORES == "float32" and q.dtype == torch.float32))
    # dg holds one partial per K tile (summed below): room for the default tiling, or for the
    # narrowest tile a tuning run may try
    prec = dot_precision(q.dtype)
    consts = dict(H=H, K=K, V=V, SK=SK, SV=SV, SG=SG, BT=BT, USE_G=g is not None, STORE_DG=store_dg,
                  IS_VARLEN=info.varlen, HEAD_FIRST=info.head_first, PREC=prec, DG_SCORES=int(dg_scores))
    max_nk = triton.cdiv(K, 16 if tuning() else kernel_config("chunk_dqk", BT, K, V)["BK"])
    dg_all = torch.empty((max_nk,) + tuple(g.shape), dtype=torch.float32, device=q.device) if store_dg else None
    cfg = launch("chunk_dqk", chunk_bwd_dqk_kernel, lambda c: (plan.num_chunks * triton.cdiv(K, c["BK"]), H),
                 (q, k, v, g, h, do, dh, dq, dk, dg_all, info.cu_seqlens, plan.chunk_indices, float(scale), info.T,
                  g.numel() if store_dg else 0), consts, BT, K, V)
    launch("chunk_dv", chunk_bwd_dv_kernel, lambda c: (plan.num_chunks * triton.cdiv(V, c["BV"]), H),
           (q, k, g, do, dh, dv, info.cu_seqlens, plan.chunk_indices, float(scale), info.T),
           dict(H=H, K=K, V=V, SK=SK, SV=SV, SG=SG, BT=BT, USE_G=g is not None, IS_VARLEN=info.varlen,
                HEAD_FIRST=info.head_first, PREC=prec), BT, K, V)
    dg = None
    if store_dg:
        nk = triton.cdiv(K, cfg["BK"])
        if plan.num_chunks == 0:
            dg_all[:nk].zero_()
        dg = dg_all[0] if nk == 1 else dg_all[:nk].sum(0)
    return dq, dk, dv, dg, dh0
