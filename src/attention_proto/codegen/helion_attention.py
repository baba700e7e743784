"""A dense attention forward written in Helion, the other high-level kernel DSL the codegen study tries.

Helion (PyTorch's kernel DSL, ``pip install helion``) writes kernels as PyTorch code over tiles
(``hl.tile``) and lowers them to Triton, so its code reaches the GPU through the same compiler
as ours and its cubins can be read the same way. This module imports ``helion`` at import time:
import it inside a ``try`` (the study records why it could not, e.g. no wheel on the machine).

The kernels are the textbook online-softmax forward over q/k/v viewed as ``[B*H, N, D]``
(bf16/fp16 in, fp32 statistics, exp2 with log2(e) folded into the scale). The causal one masks
with ``torch.where`` on tile indices and visits every key tile (no block skipping): the plain way
to write it in Helion. Configs are fixed (:data:`CONFIG`): Helion's autotuner runs for minutes,
far over the study's time budget.
"""
from __future__ import annotations

import math

import torch

import helion
import helion.language as hl

#: tile_bh = 1, tile_m = 128 queries, tile_n = 64 keys; 8 warps, 3 stages (our own heuristic's D128 tile)
CONFIG = helion.Config(block_sizes=[1, 128, 64], num_warps=8, num_stages=3)
LOG2E = 1.4426950408889634


@helion.kernel(static_shapes=True, config=CONFIG)
def helion_attention(q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q, k, v [B, H, N, D] (same N for q and k)."""
    n_q = q_in.size(-2)
    n_k = k_in.size(-2)
    d = hl.specialize(q_in.size(-1))
    qv = q_in.reshape([-1, n_q, d])
    kv = k_in.reshape([-1, n_k, d])
    vv = v_in.reshape([-1, n_k, d])
    out = torch.empty_like(qv)
    c = LOG2E / math.sqrt(d)
    for t_bh, t_m in hl.tile([qv.size(0), n_q]):
        row_max = hl.full([t_bh, t_m], float("-inf"), dtype=torch.float32)
        row_sum = hl.zeros([t_bh, t_m], dtype=torch.float32)
        acc = hl.zeros([t_bh, t_m, d], dtype=torch.float32)
        q_tile = qv[t_bh, t_m, :]
        for t_n in hl.tile(n_k):
            s = torch.bmm(q_tile, kv[t_bh, t_n, :].transpose(1, 2), out_dtype=torch.float32) * c
            new_max = torch.maximum(row_max, torch.amax(s, -1))
            p = torch.exp2(s - new_max[:, :, None])
            corr = torch.exp2(row_max - new_max)
            row_sum = row_sum * corr + torch.sum(p, -1)
            acc = torch.baddbmm(acc * corr[:, :, None], p.to(vv.dtype), vv[t_bh, t_n, :])
            row_max = new_max
        out[t_bh, t_m, :] = (acc / row_sum[:, :, None]).to(out.dtype)
    return out.view(q_in.size())


@helion.kernel(static_shapes=True, config=CONFIG)
def helion_attention_causal(q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
    """Causal (query i sees keys j <= i; N_q == N_k) softmax attention, q, k, v [B, H, N, D]."""
    n_q = q_in.size(-2)
    n_k = k_in.size(-2)
    d = hl.specialize(q_in.size(-1))
    qv = q_in.reshape([-1, n_q, d])
    kv = k_in.reshape([-1, n_k, d])
    vv = v_in.reshape([-1, n_k, d])
    out = torch.empty_like(qv)
    c = LOG2E / math.sqrt(d)
    for t_bh, t_m in hl.tile([qv.size(0), n_q]):
        row_max = hl.full([t_bh, t_m], float("-inf"), dtype=torch.float32)
        row_sum = hl.zeros([t_bh, t_m], dtype=torch.float32)
        acc = hl.zeros([t_bh, t_m, d], dtype=torch.float32)
        q_tile = qv[t_bh, t_m, :]
        for t_n in hl.tile(n_k):
            s = torch.bmm(q_tile, kv[t_bh, t_n, :].transpose(1, 2), out_dtype=torch.float32) * c
            keep = t_m.index[None, :, None] >= t_n.index[None, None, :]
            s = torch.where(keep, s, float("-inf"))
            # key tile 0 holds key 0, which every query sees: row maxima are finite from then on
            new_max = torch.maximum(row_max, torch.amax(s, -1))
            p = torch.exp2(s - new_max[:, :, None])
            corr = torch.exp2(row_max - new_max)
            row_sum = row_sum * corr + torch.sum(p, -1)
            acc = torch.baddbmm(acc * corr[:, :, None], p.to(vv.dtype), vv[t_bh, t_n, :])
            row_max = new_max
        out[t_bh, t_m, :] = (acc / row_sum[:, :, None]).to(out.dtype)
    return out.view(q_in.size())
