"""Chunked linear attention, forward: the gate's chunk-local cumulative sum, the state kernel
(chunk_h) and the output kernel (chunk_o).

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

Forms of the gated forward (:data:`FORWARD_OPTIONS`; the defaults are the fastest measured
or, where not yet measured, expected; ``scripts/bench_linear.py`` times every form):

- ``gate="cumsum"``: a small kernel (chunk_cumsum, ~4 bytes in and out per token and head)
  writes G once, in log2 units; chunk_h reads G_s and G_L with plain loads that the software
  pipeliner prefetches with k and v, chunk_o reads G_t. ``gate="inline"`` (the first form)
  recomputes G from g in every tile: in chunk_h's sequential loop that is a scan, a
  reduction and a layout conversion (shared memory round trips and barriers) per chunk, on
  the critical path of a kernel that runs only B*H*4 programs (128 at N 16k: one per SM).
- ``decay_on="v"``: chunk_h scales v's rows by exp(G_L - G_s) (the B operand of wgmma: the
  tile goes shared -> registers -> shared); ``"k"`` scales k^T's columns instead (the A
  operand, which wgmma may read from registers; Triton 3.6 still stages it through shared
  memory, so no gain is expected: a candidate for timing only).
- ``early_loads=True``: chunk_o issues the loads of v and G before its q.k / q.h loop, so
  their latency overlaps the first loads instead of following the matmuls. Off by default:
  at the default chunk_o tile it holds 8 KB more shared memory (80 KB: 2 CTAs per SM
  instead of 3), which other CTAs' loads hide better.

The sm_90 compile (``python -m attention_proto.ops.linear.aot``) of the gated chunk_h step, at
chunk 64 without initial or final state: the inline form has 13 barriers and 11 shuffles per step and 112 registers, the
cumsum form 6 barriers, no shuffles, 79 registers (ungated: 4 barriers, 64 registers).
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import (SeqInfo, chunk_coords, chunk_gate, dot_precision, kernel_config, launch, next_pow2,
                     row_offset, seq_coords)

#: defaults of :func:`chunk_forward`'s forms (see the module docstring); a caller may pass others
# measured on an H100 by scripts/bench_linear.py (session 3): "cumsum" beats "inline" (0.503 vs 0.524 ms
# gated N4k, 0.516 vs 0.542 at N16k with the new tiles); decay_on="k" ties "v" (within 0.6%)
FORWARD_OPTIONS: Dict[str, object] = dict(gate="cumsum", decay_on="v", early_loads=False)
GATE_FORMS = ("cumsum", "inline")
DECAY_OPERANDS = ("v", "k")


@triton.jit(do_not_specialize=["T"])
def chunk_cumsum_kernel(
    g, gc, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, SG: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    IS_VARLEN: tl.constexpr, HEAD_FIRST: tl.constexpr,
):
    """gc = chunk-local inclusive cumulative sum of g, times log2(e): one program per (chunk, head tile)."""
    i_tg = tl.program_id(0)
    i_n, i_t = chunk_coords(i_tg, cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    i_b, bos, L = seq_coords(i_n, cu_seqlens, T, IS_VARLEN)
    o_h = tl.program_id(1) * BH + tl.arange(0, BH)
    o_t = i_t * BT + tl.arange(0, BT)
    m = (o_t[:, None] < L) & (o_h[None, :] < H)
    # bshd: a chunk's gates of all heads are one contiguous [BT, H] block
    offs = row_offset(i_b, o_h, bos, T, H, 1, HEAD_FIRST)[None, :] + o_t[:, None] * SG
    b_g = tl.load(g + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(gc + offs, tl.cumsum(b_g * 1.4426950408889634, 0), mask=m)


@triton.jit(do_not_specialize=["T"])
def chunk_fwd_h_kernel(
    k, v, g, h, h0, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    SK: tl.constexpr, SV: tl.constexpr, SG: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr, HEAD_FIRST: tl.constexpr, PREC: tl.constexpr,
    G_CUM: tl.constexpr = False, DECAY_K: tl.constexpr = False,
):
    """G_CUM: ``g`` holds G (chunk_cumsum's output), else the raw log-decay; DECAY_K: decay k^T, else v."""
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
        if USE_G:
            last = tl.minimum(i_t * BT + BT, L) - 1
            if G_CUM:
                # plain loads whose addresses depend on i_t only: prefetched by the pipeliner
                b_g = tl.load(g + o_t * SG, mask=m_t, other=0.0)
                b_gl = tl.load(g + last * SG)
            else:
                b_g, b_gl = chunk_gate(g, o_t, m_t, last, SG)
            # tokens past the end: k, v are 0 there; the 0 factor also keeps a positive g from overflowing
            b_w = tl.where(m_t, tl.exp2(b_gl - b_g), 0.0)
        tl.store(h + ((boh + i_t) * H + i_h) * K * V + o_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        # k^T is loaded transposed through its pointers (no tl.trans of a register tile)
        b_kt = tl.load(k + o_t[None, :] * SK + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_v = tl.load(v + o_t[:, None] * SV + o_v[None, :], mask=m_t[:, None] & (o_v[None, :] < V), other=0.0)
        if USE_G:
            b_h *= tl.exp2(b_gl)
            if DECAY_K:
                b_kt = (b_kt * b_w[None, :]).to(b_kt.dtype)
            else:
                b_v = (b_v * b_w[:, None]).to(b_v.dtype)
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
    G_CUM: tl.constexpr = False, EARLY: tl.constexpr = False,
):
    """G_CUM: ``g`` holds G (chunk_cumsum's output), else the raw log-decay; EARLY: load v and G first."""
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
    if USE_G:
        g += row_offset(i_b, i_h, bos, T, H, 1, HEAD_FIRST)

    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < L
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    if EARLY:
        # issued before the loop: these loads' latency overlaps q, k and h's instead of following the matmuls
        b_v = tl.load(v + o_t[:, None] * SV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if USE_G and G_CUM:
            b_g = tl.load(g + o_t * SG, mask=m_t, other=0.0)
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
        if not G_CUM:
            b_g, _ = chunk_gate(g, o_t, m_t, L - 1, SG)
        elif not EARLY:
            b_g = tl.load(g + o_t * SG, mask=m_t, other=0.0)
        b_o = b_o * tl.exp2(b_g)[:, None]
        # -inf above the diagonal: exp2 gives exactly 0 there, never inf * 0
        b_a = b_a * tl.exp2(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))
    else:
        b_a = tl.where(causal, b_a, 0.0)
    if not EARLY:
        b_v = tl.load(v + o_t[:, None] * SV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    # scale before the cast: q.k itself may not fit float16
    b_o = b_o * scale + tl.dot((b_a * scale).to(b_v.dtype), b_v, input_precision=PREC)
    tl.store(o + o_t[:, None] * SV + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


# ---- host entry points ----------------------------------------------------------------------------

def _form(name: str, value, allowed) -> object:
    value = FORWARD_OPTIONS[name] if value is None else value
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _h_config_name(states: int, BT: int, K: int, V: int, device: torch.device) -> str:
    """"chunk_h_long" when chunk_h's programs (``states`` = sequences x heads, times the state tiles) are at
    most two per SM: each then stalls on its own loads, and deeper pipelining pays (see kernel_config)."""
    if device.type != "cuda":
        return "chunk_h"
    cfg = kernel_config("chunk_h", BT, K, V)
    programs = states * triton.cdiv(K, cfg["BK"]) * triton.cdiv(V, cfg["BV"])
    return "chunk_h_long" if programs <= 2 * _sm_count(device) else "chunk_h"


def chunk_cumsum(g: torch.Tensor, info: SeqInfo, BT: int) -> torch.Tensor:
    """G: the chunk-local inclusive cumulative sum of ``g`` (float32, g's shape and layout) in log2 units."""
    plan = info.plan(BT)
    gc = torch.empty_like(g, dtype=torch.float32)
    BH = min(next_pow2(info.H, 1), 64)
    # not through launch(): nothing to tune (a [BT, BH] tile, 4 warps)
    if plan.num_chunks:
        from ...runtime.cache import KERNEL_CACHE

        KERNEL_CACHE.launch(chunk_cumsum_kernel, (plan.num_chunks, triton.cdiv(info.H, BH)), g, gc, info.cu_seqlens,
                            plan.chunk_indices, info.T, H=info.H, SG=info.strides()[2], BT=BT, BH=BH,
                            IS_VARLEN=info.varlen, HEAD_FIRST=info.head_first, num_warps=4)
    return gc


def chunk_fwd_h(k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor], h0: Optional[torch.Tensor],
                output_final_state: bool, info: SeqInfo, BT: int,
                state_dtype: Optional[torch.dtype] = None, *, gc: Optional[torch.Tensor] = None,
                gate: Optional[str] = None, decay_on: Optional[str] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """States entering every chunk [num_chunks, H, K, V] (k's dtype) and the final state [NS, H, K, V] fp32.

    ``g`` is the raw log-decay (or None); ``gc`` its :func:`chunk_cumsum` when the caller has it.
    """
    H, K, V = info.H, info.K, info.V
    plan = info.plan(BT)
    gate = _form("gate", gate, GATE_FORMS)
    decay_on = _form("decay_on", decay_on, DECAY_OPERANDS)
    cum = g is not None and gate == "cumsum"
    if cum and gc is None:
        gc = chunk_cumsum(g, info, BT)
    h = torch.empty(plan.num_chunks, H, K, V, dtype=state_dtype or k.dtype, device=k.device)
    ht = torch.empty(info.num_seqs, H, K, V, dtype=torch.float32, device=k.device) if output_final_state else None
    SK, SV, SG = info.strides()
    ns = info.num_seqs
    launch(_h_config_name(ns * H, BT, K, V, k.device), chunk_fwd_h_kernel,
           lambda c: (triton.cdiv(K, c["BK"]) * triton.cdiv(V, c["BV"]) * ns * H,),
           (k, v, gc if cum else g, h, h0, ht, info.cu_seqlens, plan.chunk_offsets, info.T),
           dict(H=H, K=K, V=V, SK=SK, SV=SV, SG=SG, BT=BT, USE_G=g is not None, USE_H0=h0 is not None,
                STORE_HT=ht is not None, IS_VARLEN=info.varlen, HEAD_FIRST=info.head_first,
                PREC=dot_precision(k.dtype), G_CUM=cum, DECAY_K=g is not None and decay_on == "k"), BT, K, V)
    return h, ht


def chunk_fwd_o(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, g: Optional[torch.Tensor],
                scale: float, info: SeqInfo, BT: int, out: Optional[torch.Tensor] = None, *,
                gc: Optional[torch.Tensor] = None, gate: Optional[str] = None,
                early_loads: Optional[bool] = None) -> torch.Tensor:
    """Outputs (same layout and dtype as v) from q, k, v and the chunk states ``h``."""
    H, K, V = info.H, info.K, info.V
    plan = info.plan(BT)
    gate = _form("gate", gate, GATE_FORMS)
    early = bool(_form("early_loads", early_loads, (True, False)))
    cum = g is not None and gate == "cumsum"
    if cum and gc is None:
        gc = chunk_cumsum(g, info, BT)
    o = torch.empty_like(v) if out is None else out
    SK, SV, SG = info.strides()
    launch("chunk_o", chunk_fwd_o_kernel, lambda c: (plan.num_chunks * triton.cdiv(V, c["BV"]), H),
           (q, k, v, h, gc if cum else g, o, info.cu_seqlens, plan.chunk_indices, float(scale), info.T),
           dict(H=H, K=K, V=V, SK=SK, SV=SV, SG=SG, BT=BT, USE_G=g is not None, IS_VARLEN=info.varlen,
                HEAD_FIRST=info.head_first, PREC=dot_precision(q.dtype), G_CUM=cum, EARLY=early), BT, K, V)
    return o


def chunk_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor], scale: float,
                  h0: Optional[torch.Tensor], output_final_state: bool, info: SeqInfo, BT: int, *,
                  gate: Optional[str] = None, decay_on: Optional[str] = None, early_loads: Optional[bool] = None
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(o, final state or None, chunk states h): the gate's cumulative sum (gated, ``gate="cumsum"``),
    then chunk_h and chunk_o. The keywords pick a form (None: :data:`FORWARD_OPTIONS`)."""
    gate = _form("gate", gate, GATE_FORMS)
    gc = chunk_cumsum(g, info, BT) if g is not None and gate == "cumsum" else None
    h, ht = chunk_fwd_h(k, v, g, h0, output_final_state, info, BT, gc=gc, gate=gate, decay_on=decay_on)
    o = chunk_fwd_o(q, k, v, h, g, scale, info, BT, gc=gc, gate=gate, early_loads=early_loads)
    return o, ht, h
