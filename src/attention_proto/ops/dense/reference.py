"""Plain-PyTorch dense attention: the ground truth for every dense kernel.

Semantics (shared by every kernel in the library; see docs/conventions.md):

- Layout BHSD: q [B, H, Nq, D], k/v [B, Hkv, Nk, D(v)]; H % Hkv == 0 and query
  head h reads KV head h // (H // Hkv) (GQA/MQA).
- Scores s = scale * q.k (scale defaults to 1/sqrt(D)), then in this order:
  softcap (s = c * tanh(s / c)), ALiBi (s -= slope_h * |i + Nk - Nq - j|),
  masks (causal and sliding window, both aligned bottom-right:
  query i sits at position i + Nk - Nq of the key sequence).
- Causal: key j allowed iff j <= i + Nk - Nq.
- Window (left, right): key j allowed iff i + off - left <= j <= i + off + right
  (off = Nk - Nq; a negative or None side is unbounded), as FlashAttention's
  ``window_size``.
- RoPE rotates q and k before the dot product (see :mod:`attention_proto.ops.dense.rope`).
- LSE is the natural-log sum of exp of the final scores, per (b, h, i);
  a fully masked row gives output 0 and LSE -inf.

The reference computes in ``compute_dtype`` (float64 by default, on the CPU);
the same function run in fp16/fp32 is "PyTorch's own error" in the error rule.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .rope import RopeSpec, apply_rope_reference


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The standard ALiBi slopes (Press et al.), float32, shape [num_heads]."""

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive; got {num_heads}")
    if math.log2(num_heads).is_integer():
        slopes = power_of_2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def normalize_window(window: Optional[Sequence[Optional[int]] | int]) -> Tuple[int, int]:
    """(left, right) with -1 meaning unbounded. An int w means (w, -1)."""
    if window is None:
        return (-1, -1)
    if isinstance(window, int):
        return (window if window >= 0 else -1, -1)
    left, right = window
    return (-1 if left is None or left < 0 else int(left), -1 if right is None or right < 0 else int(right))


def dense_mask(
    nq: int,
    nk: int,
    *,
    causal: bool = False,
    window: Optional[Sequence[Optional[int]] | int] = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean [Nq, Nk] mask, True where query i may attend key j."""
    left, right = normalize_window(window)
    i = torch.arange(nq, device=device)[:, None] + (nk - nq)
    j = torch.arange(nk, device=device)[None, :]
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    return allowed


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[Sequence[Optional[int]] | int] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    rope: Optional[RopeSpec] = None,
    compute_dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    key_start: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense attention in BHSD layout. Returns (out [B,H,Nq,Dv], lse [B,H,Nq]).

    Both are in ``compute_dtype``; lse is -inf and out is 0 on fully masked rows. ``key_start``
    [B, Nq] (ints): row i of batch b sees only keys j >= key_start[b, i] (packed documents).
    """
    q = q.to(device=device, dtype=compute_dtype)
    k = k.to(device=device, dtype=compute_dtype)
    v = v.to(device=device, dtype=compute_dtype)
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv
    if rope is not None:
        q, k = apply_rope_reference(q, k, rope)
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    sc = (1.0 / math.sqrt(D)) if scale is None else float(scale)
    s = torch.matmul(q, k.transpose(-1, -2)) * sc
    if softcap is not None and softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(device=device, dtype=compute_dtype).reshape(1, H, 1, 1)
        i = torch.arange(Nq, device=device, dtype=compute_dtype)[:, None] + (Nk - Nq)
        j = torch.arange(Nk, device=device, dtype=compute_dtype)[None, :]
        s = s - slopes * (i - j).abs()
    allowed = dense_mask(Nq, Nk, causal=causal, window=window, device=device)
    if key_start is not None:
        j = torch.arange(Nk, device=device)
        allowed = allowed & (j[None, None, :] >= key_start.to(device=device, dtype=torch.int64)[:, :, None])[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    p = torch.where(finite[..., None], p, torch.zeros_like(p))
    out = torch.matmul(p, v)
    return out, lse


def attention_reference_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    **kwargs,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed (THD) reference: q [Tq, H, D], k/v [Tk, Hkv, D]; runs each sequence alone.

    Returns (out [Tq, H, Dv], lse [H, Tq]) in the reference's compute dtype.
    """
    compute_dtype = kwargs.get("compute_dtype", torch.float64)
    outs, lses = [], []
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    H = q.shape[1]
    for b in range(len(cq) - 1):
        qs = q[cq[b] : cq[b + 1]].transpose(0, 1)[None]
        ks = k[ck[b] : ck[b + 1]].transpose(0, 1)[None]
        vs = v[ck[b] : ck[b + 1]].transpose(0, 1)[None]
        if qs.shape[2] == 0:
            dev = kwargs.get("device", "cpu")  # where attention_reference puts the other sequences' parts
            outs.append(torch.zeros(0, H, v.shape[-1], dtype=compute_dtype, device=dev))
            lses.append(torch.zeros(H, 0, dtype=compute_dtype, device=dev))
            continue
        o, l = attention_reference(qs, ks, vs, **kwargs)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)
