"""Fused recurrent linear attention: one token at a time, the state in registers.

One program per (sequence, head, V tile) holds the [K, BV] slice of the fp32 state and
walks the sequence: S = exp(g_t) S + k_t^T v_t, o_t = scale q_t S. With T = 1 this is
the decode step: it reads the state once and writes it once, so it runs at memory
speed; the state may be updated in place (each program reads its tile before it
writes the same tile). For training-length sequences the chunked kernels are the fast
path; this one is the decode kernel and an independent implementation to test them by.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import SeqInfo, launch, row_offset, seq_coords


@triton.jit(do_not_specialize=["T"])
def fused_recurrent_fwd_kernel(
    q, k, v, g, o, h0, ht, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    SK: tl.constexpr, SV: tl.constexpr, SG: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr, HEAD_FIRST: tl.constexpr,
):
    NV: tl.constexpr = (V + BV - 1) // BV
    pid = tl.program_id(0)
    i_nh = pid // NV
    i_v = pid % NV
    i_n = i_nh // H
    i_h = i_nh % H
    i_b, bos, L = seq_coords(i_n, cu_seqlens, T, IS_VARLEN)
    q += row_offset(i_b, i_h, bos, T, H, K, HEAD_FIRST)
    k += row_offset(i_b, i_h, bos, T, H, K, HEAD_FIRST)
    v += row_offset(i_b, i_h, bos, T, H, V, HEAD_FIRST)
    o += row_offset(i_b, i_h, bos, T, H, V, HEAD_FIRST)
    if USE_G:
        g += row_offset(i_b, i_h, bos, T, H, 1, HEAD_FIRST)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    for t in range(0, L):
        b_q = tl.load(q + t * SK + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + t * SK + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + t * SV + o_v, mask=m_v, other=0.0).to(tl.float32)
        if USE_G:
            b_h = b_h * tl.exp(tl.load(g + t * SG).to(tl.float32))
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0)
        tl.store(o + t * SV + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_kv, b_h, mask=m_kv)


def fused_recurrent_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                            scale: float, h0: Optional[torch.Tensor], output_final_state: bool, info: SeqInfo,
                            final_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(o, final state [NS, H, K, V] fp32 or None). ``final_out`` may alias ``h0`` (in-place update)."""
    H, K, V = info.H, info.K, info.V
    o = torch.empty_like(v)
    ht = None
    if output_final_state:
        ht = final_out if final_out is not None else torch.empty(info.num_seqs, H, K, V, dtype=torch.float32,
                                                                  device=q.device)
    SK, SV, SG = info.strides()
    ns = info.num_seqs
    # not tunable: with final_out aliasing h0 the launch updates its own input
    launch("recurrent", fused_recurrent_fwd_kernel, lambda c: (triton.cdiv(V, c["BV"]) * ns * H,),
           (q, k, v, g, o, h0, ht, info.cu_seqlens, float(scale), info.T),
           dict(H=H, K=K, V=V, SK=SK, SV=SV, SG=SG, USE_G=g is not None, USE_H0=h0 is not None,
                STORE_HT=ht is not None, IS_VARLEN=info.varlen, HEAD_FIRST=info.head_first), 0, K, V, tunable=False)
    return o, ht
