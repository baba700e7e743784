"""Autograd glue of dense attention: the forward kernel, then the backward kernels.

Call signature (``ops/dense/interface.py`` calls it with exactly these
positional arguments, in this order)::

    out, lse = DenseAttentionFn.apply(
        q, k, v,              # [B, H, Nq, D], [B, Hkv, Nk, D], [B, Hkv, Nk, Dv]
                              # (varlen: [Tq, H, D], [Tk, Hkv, D], [Tk, Hkv, Dv])
        causal,               # bool
        scale,                # float or None (1/sqrt(D))
        window,               # (left, right) with -1 unbounded, an int, or None
        softcap,              # float or None
        alibi_slopes,         # fp32 [H] (or [B, H]) or None
        rope,                 # RopeSpec or None
        cu_seqlens_q,         # int32 [batch + 1] or None
        cu_seqlens_k,         # int32 [batch + 1] or None
        max_seqlen_q,         # int or None
        max_seqlen_k,         # int or None
        deterministic,        # bool: bitwise-reproducible backward (separate dQ kernel)
    )

``out`` is [B, H, Nq, Dv] (varlen [Tq, H, Dv]) in q's dtype; ``lse`` is fp32
[B, H, Nq] (varlen [H, Tq]), natural log, -inf on fully masked rows, and is
not differentiable. Only q, k, v, out and lse are saved for the backward
(O(N * D) memory): the backward recomputes the scores tile by tile.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .backward import flash_attention_backward
from .rope import RopeSpec


class DenseAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window, softcap, alibi_slopes, rope, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_q, max_seqlen_k, deterministic):
        from .forward import flash_attention_forward  # lazy: the forward module imports its own kernels

        out, lse = flash_attention_forward(
            q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
            rope=rope, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
        )
        ctx.save_for_backward(q, k, v, out, lse)
        # small, non-differentiable side inputs: kept as attributes, not in the saved-tensor list
        ctx.alibi_slopes = alibi_slopes
        ctx.cu_seqlens = (cu_seqlens_q, cu_seqlens_k)
        ctx.max_seqlen = (max_seqlen_q, max_seqlen_k)
        ctx.mods = dict(causal=causal, scale=scale, window=window, softcap=softcap, rope=rope)
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:  # only lse was used downstream: it carries no gradient
            dout = torch.zeros_like(out)
        dq, dk, dv = flash_attention_backward(
            dout, q, k, v, out, lse, alibi_slopes=ctx.alibi_slopes,
            cu_seqlens_q=ctx.cu_seqlens[0], cu_seqlens_k=ctx.cu_seqlens[1],
            max_seqlen_q=ctx.max_seqlen[0], max_seqlen_k=ctx.max_seqlen[1],
            deterministic=ctx.deterministic, **ctx.mods,
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


def dense_attention_autograd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[Sequence[Optional[int]] | int] = (-1, -1),
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    rope: Optional[RopeSpec] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    deterministic: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Differentiable dense attention: ``DenseAttentionFn.apply`` with the documented argument order.

    Returns (out, lse); see the module docstring for shapes. No input checks
    here beyond the kernels' own: the public ``attention()`` validates.
    """
    return DenseAttentionFn.apply(q, k, v, causal, scale, window, softcap, alibi_slopes, rope, cu_seqlens_q,
                                  cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic)
