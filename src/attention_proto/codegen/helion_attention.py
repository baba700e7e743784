"""A dense attention forward written in Helion, the other high-level kernel DSL the codegen study tries.

Helion (PyTorch's kernel DSL, ``pip install helion``) writes kernels as PyTorch code over tiles
(``hl.tile``) and lowers them to Triton, so its code reaches the GPU through the same compiler
as ours and its cubins can be read the same way. This module imports ``helion`` at import time:
import it inside a ``try`` (the study records why it could not, e.g. no wheel on the machine).

The kernels are the textbook online-softmax forward over q/k/v viewed as ``[B*H, N, D]``
(bf16/fp16 in, fp32 statistics, exp2 with log2(e) folded into the scale). The causal one masks
with ``torch.where`` on tile indices and visits every key tile (no block skipping): the plain way
to write it in Helion. Configs are fixed: Helion's autotuner runs for minutes, far over the study's
time budget. :data:`CONFIG` is a tile that compiles with Triton 3.6 (key tile = D = 128);
:data:`OUR_TILE` is our own heuristic's D128 tile (128 x 64, 8 warps, 3 stages), which Helion 1.5.1
+ Triton 3.6 fail to compile for sm_90 (an assertion in Triton's layout pass, seen when
cross-compiling on a CPU machine) -- the study records what the GPU says.
"""
from __future__ import annotations

import math

import torch

import helion
import helion.language as hl

#: block_sizes = [tile over B*H, query tile, key tile]
CONFIG = helion.Config(block_sizes=[1, 128, 128], num_warps=8, num_stages=2)
OUR_TILE = helion.Config(block_sizes=[1, 128, 64], num_warps=8, num_stages=3)
LOG2E = 1.4426950408889634


def attention_fwd(q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
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


def attention_fwd_causal(q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
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


_KERNELS: dict = {}


def kernel(causal: bool, config: "helion.Config" = CONFIG):
    """The Helion kernel (compiled on first call, per input shape) for ``causal`` with ``config``."""
    key = (causal, str(config))
    if key not in _KERNELS:
        fn = attention_fwd_causal if causal else attention_fwd
        _KERNELS[key] = helion.kernel(fn, static_shapes=True, config=config)
    return _KERNELS[key]
