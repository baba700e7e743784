"""Chunked linear attention, forward: the state kernel (chunk_h) and the output kernel (chunk_o).

With chunks of BT tokens and G the chunk-local inclusive cumulative log-decay
(G_t = sum of g over the chunk's tokens up to t, G_L its value at the chunk's last
token), the state entering chunk c+1 is

    h_{c+1} = exp(G_L) h_c + sum_s exp(G_L - G_s) k_s^T v_s

(chunk_h: one program per (sequence, head, K tile, V tile) walks the chunks in order,
state in fp32 registers, and stores h_c, the state *entering* chunk c, in the input
dtype, which is what the output kernel's matmul consumes), and inside chunk c

    o_t = scale * ( exp(G_t) q_t h_c + sum_{s <= t in chunk} exp(G_t - G_s) (q_t . k_s) v_s )

(chunk_o: one program per (chunk, V tile, head), fully parallel). Every exponent is a
difference G_t - G_s with s <= t or G_L - G_s, so it is <= 0 for g <= 0: no overflow.
Decays run as exp2 of log2-scaled G.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import SeqInfo, chunk_coords, chunk_gate, dot_precision, launch, row_offset, seq_coords


@triton.jit(do_not_specialize=["T"])
def chunk_fwd_h_kernel(
    k, v, g, h, h0, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    SK: tl.constexpr, SV: tl.constexpr, SG: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
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
    k += row_offset(i_b, i_h, bos, T, H, K, HEAD_FIRST)
    v += row_offset(i_b, i_h, bos, T, H, V, HEAD_FIRST)
    if USE_G:
        g += row_offset(i_b, i_h, bos, T, H, 1, HEAD_FIRST)

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_kv = m_k[:, None] & (o_v[None, :] < V)
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.0).to(tl.float32)

    for i_t in range(0, NT):
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < L
        tl.store(h + ((boh + i_t) * H + i_h) * K * V + o_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        # k^T is loaded transposed through its pointers (no tl.trans of a register tile)
        b_kt = tl.load(k + o_t[None, :] * SK + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_v = tl.load(v + o_t[:, None] * SV + o_v[None, :], mask=m_t[:, None] & (o_v[None, :] < V), other=0.0)
        if USE_G:
            last = tl.minimum(i_t * BT + BT, L) - 1
            b_g, b_gl = chunk_gate(g, o_t, m_t, last, SG)
            b_h *= tl.exp2(b_gl)
            b_v = (b_v * tl.exp2(b_gl - b_g)[:, None]).to(b_v.dtype)
        b_h = tl.dot(b_kt, b_v, b_h, input_precision=PREC)

    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_kv, b_h, mask=m_kv)


@triton.jit(do_not_specialize=["T"])
def chunk_fwd_o_kernel(
    q, k, v, h, g, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    SK: tl.constexpr, SV: tl.constexpr, SG: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, HEAD_FIRST: tl.constexpr, PREC: tl.constexpr,
):
    NV: tl.constexpr = (V + BV - 1) // BV
    pid = tl.program_id(0)
    i_tg = pid // NV          # V tiles of one chunk are neighbours: they share q and k in L2
    i_v = pid % NV
    i_h = tl.program_id(1)
    i_n, i_t = chunk_coords(i_tg, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    i_b, bos, L = seq_coords(i_n, cu_seqlens, T, IS_VARLEN)
    q += row_offset(i_b, i_h, bos, T, H, K, HEAD_FIRST)
    k += row_offset(i_b, i_h, bos, T, H, K, HEAD_FIRST)
    v += row_offset(i_b, i_h, bos, T, H, V, HEAD_FIRST)
    o += row_offset(i_b, i_h, bos, T, H, V, HEAD_FIRST)
    h += (i_tg.to(tl.int64) * H + i_h) * K * V

    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < L
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, (K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + o_t[:, None] * SK + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_kt = tl.load(k + o_t[None, :] * SK + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_h = tl.load(h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_o = tl.dot(b_q, b_h, b_o, input_precision=PREC)
        b_a = tl.dot(b_q, b_kt, b_a, input_precision=PREC)

    causal = o_t[:, None] >= o_t[None, :]
    if USE_G:
        last = tl.minimum(i_t * BT + BT, L) - 1
        b_g, b_gl = chunk_gate(g + row_offset(i_b, i_h, bos, T, H, 1, HEAD_FIRST), o_t, m_t, last, SG)
        b_o = b_o * tl.exp2(b_g)[:, None]
        # -inf above the diagonal: exp2 gives exactly 0 there, never inf * 0
        b_a = b_a * tl.exp2(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))
    else:
        b_a = tl.where(causal, b_a, 0.0)
    b_v = tl.load(v + o_t[:, None] * SV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    # scale before the cast: q.k itself may not fit float16
    b_o = b_o * scale + tl.dot((b_a * scale).to(b_v.dtype), b_v, input_precision=PREC)
    tl.store(o + o_t[:, None] * SV + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


# ---- host entry points ----------------------------------------------------------------------------

def chunk_fwd_h(k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor], h0: Optional[torch.Tensor],
                output_final_state: bool, info: SeqInfo, BT: int,
                state_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """States entering every chunk [num_chunks, H, K, V] (k's dtype) and the final state [NS, H, K, V] fp32."""
    H, K, V = info.H, info.K, info.V
    plan = info.plan(BT)
    h = torch.empty(plan.num_chunks, H, K, V, dtype=state_dtype or k.dtype, device=k.device)
    ht = torch.empty(info.num_seqs, H, K, V, dtype=torch.float32, device=k.device) if output_final_state else None
    SK, SV, SG = info.strides()
    ns = info.num_seqs
    launch("chunk_h", chunk_fwd_h_kernel, lambda c: (triton.cdiv(K, c["BK"]) * triton.cdiv(V, c["BV"]) * ns * H,),
           (k, v, g, h, h0, ht, info.cu_seqlens, plan.chunk_offsets, info.T),
           dict(H=H, K=K, V=V, SK=SK, SV=SV, SG=SG, BT=BT, USE_G=g is not None, USE_H0=h0 is not None,
                STORE_HT=ht is not None, IS_VARLEN=info.varlen, HEAD_FIRST=info.head_first,
                PREC=dot_precision(k.dtype)), BT, K, V)
    return h, ht


def chunk_fwd_o(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, g: Optional[torch.Tensor],
                scale: float, info: SeqInfo, BT: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Outputs (same layout and dtype as v) from q, k, v and the chunk states ``h``."""
    H, K, V = info.H, info.K, info.V
    plan = info.plan(BT)
    o = torch.empty_like(v) if out is None else out
    SK, SV, SG = info.strides()
    launch("chunk_o", chunk_fwd_o_kernel, lambda c: (plan.num_chunks * triton.cdiv(V, c["BV"]), H),
           (q, k, v, h, g, o, info.cu_seqlens, plan.chunk_indices, float(scale), info.T),
           dict(H=H, K=K, V=V, SK=SK, SV=SV, SG=SG, BT=BT, USE_G=g is not None, IS_VARLEN=info.varlen,
                HEAD_FIRST=info.head_first, PREC=dot_precision(q.dtype)), BT, K, V)
    return o


def chunk_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor], scale: float,
                  h0: Optional[torch.Tensor], output_final_state: bool, info: SeqInfo, BT: int
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(o, final state or None, chunk states h): the two kernels in sequence."""
    h, ht = chunk_fwd_h(k, v, g, h0, output_final_state, info, BT)
    o = chunk_fwd_o(q, k, v, h, g, scale, info, BT)
    return o, ht, h
