"""The autograd Function of linear attention (thin: the kernels live in chunk*.py / fused_recurrent.py).

Inputs arrive validated and contiguous in their layout (``info.head_first``), g as float32.
The chunk forward keeps its chunk states for the backward (they are an output of the
first kernel anyway); the recurrent forward has none, so its backward recomputes them
with the chunk_h kernel. Both forms share the chunked backward: the gradients of the
recurrence do not depend on how the forward was evaluated.
"""
from __future__ import annotations

from typing import Optional

import torch

from .chunk import chunk_forward, chunk_fwd_h
from .chunk_backward import chunk_backward
from .common import SeqInfo
from .fused_recurrent import fused_recurrent_forward


def linear_forward(q, k, v, g, h0, scale: float, output_final_state: bool, BT: int, info: SeqInfo, mode: str):
    """(o, final state or None, chunk states or None) without autograd."""
    if mode == "chunk":
        return chunk_forward(q, k, v, g, scale, h0, output_final_state, info, BT)
    o, ht = fused_recurrent_forward(q, k, v, g, scale, h0, output_final_state, info)
    return o, ht, None


class LinearAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                h0: Optional[torch.Tensor], scale: float, output_final_state: bool, BT: int, info: SeqInfo,
                mode: str):
        o, ht, h = linear_forward(q, k, v, g, h0, scale, output_final_state, BT, info, mode)
        ctx.save_for_backward(q, k, v, g, h0, h)
        ctx.scale, ctx.BT, ctx.info = scale, BT, info
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do: Optional[torch.Tensor], dht: Optional[torch.Tensor]):
        q, k, v, g, h0, h = ctx.saved_tensors
        info: SeqInfo = ctx.info
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        if dht is not None:
            dht = dht.to(torch.float32).contiguous()
        if h is None:
            h, _ = chunk_fwd_h(k, v, g, h0, False, info, ctx.BT)
        dq, dk, dv, dg, dh0 = chunk_backward(q, k, v, g, h, do, dht, ctx.scale, info, ctx.BT,
                                             need_dg=ctx.needs_input_grad[3], need_dh0=ctx.needs_input_grad[4])
        return (dq, dk, dv, dg if ctx.needs_input_grad[3] else None, dh0 if ctx.needs_input_grad[4] else None,
                None, None, None, None, None)
