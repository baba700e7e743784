"""The runners behind the backends of :mod:`attention_proto.dispatch` (ours, PyTorch SDPA, the references).

Each runner takes validated operands and a :class:`attention_proto.api.Params` and computes the
call; the registry names them as ``"module:function"`` and imports them on first use.

- ``triton``: through the custom ops of :mod:`.torch_ops` (autograd, torch.compile, CUDA graphs);
  score_mod/mask_mod hooks go to :func:`attention_proto.ops.dense.interface.attention` (no backward).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with causal/window/key padding as a
  boolean mask and ALiBi as a float bias, all aligned bottom-right like ours; rows with no allowed
  key give 0 (SDPA would give NaN).
- ``reference``: the float64 references, cast back to the input dtype.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..api import PagedKV, Params

Tensor = torch.Tensor




def _query_mask(p: Params, Nq: int) -> Optional[Tensor]:
    """Which queries are real with a key padding mask: the tail of the key mask under causal/window."""
    kpm = p.key_padding_mask
    if kpm is None or not (p.causal or p.window != (-1, -1)):
        return None
    return kpm[:, kpm.shape[1] - Nq:]


def _run_triton_dense(q: Tensor, k: Tensor, v: Tensor, p: Params):
    from . import torch_ops

    if p.score_mod is not None or p.mask_mod is not None:
        from ..ops.dense.interface import attention as dense_attention

        return dense_attention(q, k, v, causal=p.causal, scale=p.scale, window=p.window, softcap=p.softcap,
                               alibi_slopes=p.alibi_slopes, rope=p.rope, return_lse=p.return_lse,
                               deterministic=p.deterministic, score_mod=p.score_mod, mask_mod=p.mask_mod)
    if p.key_padding_mask is not None:
        if p.rope is not None:
            raise NotImplementedError("rope with a key padding mask: rotate q/k before the call")
        return torch_ops.padded_attention(q, k, v, p.key_padding_mask.to(torch.bool), _query_mask(p, q.shape[2]),
                                          causal=p.causal, scale=p.scale, window=p.window, softcap=p.softcap,
                                          alibi_slopes=p.alibi_slopes, return_lse=p.return_lse,
                                          deterministic=p.deterministic)
    return torch_ops.flash_attention(q, k, v, causal=p.causal, scale=p.scale, window=p.window, softcap=p.softcap,
                                     alibi_slopes=p.alibi_slopes, rope=p.rope, return_lse=p.return_lse,
                                     deterministic=p.deterministic)


def _allowed_mask(Nq: int, Nk: int, p: Params, device) -> Optional[Tensor]:
    """[B or 1, 1, Nq, Nk] boolean mask from causal/window/key padding (None: everything allowed)."""
    from ..ops.dense.reference import dense_mask

    allowed = None
    if p.causal or p.window != (-1, -1):
        allowed = dense_mask(Nq, Nk, causal=p.causal, window=p.window, device=device)[None, None]
    kpm = p.key_padding_mask
    if kpm is not None:
        kp = kpm.to(torch.bool)[:, None, None, :]
        qm = _query_mask(p, Nq)
        if qm is not None:
            kp = kp & qm.to(torch.bool)[:, None, :, None]
        allowed = kp if allowed is None else allowed & kp
    return allowed


def _alibi_bias(Nq: int, Nk: int, H: int, slopes: Any, dtype, device) -> Tensor:
    from ..ops.dense.reference import alibi_slopes as standard

    s = standard(H) if slopes is True else slopes
    i = torch.arange(Nq, device=device, dtype=dtype)[:, None] + (Nk - Nq)
    j = torch.arange(Nk, device=device, dtype=dtype)[None, :]
    return -(s.to(device=device, dtype=dtype).reshape(1, H, 1, 1) * (i - j).abs())


def _run_sdpa_dense(q: Tensor, k: Tensor, v: Tensor, p: Params):
    """PyTorch SDPA with the modifiers turned into an explicit mask (bottom-right aligned, like ours)."""
    import torch.nn.functional as F

    if p.rope is not None:
        from ..ops.dense.rope import apply_rope_reference

        q, k = apply_rope_reference(q, k, p.rope)
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    allowed = _allowed_mask(Nq, Nk, p, q.device)
    mask: Optional[Tensor] = allowed
    if p.alibi_slopes is not None:
        bias = _alibi_bias(Nq, Nk, H, p.alibi_slopes, q.dtype, q.device)
        mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
    if p.attn_mask is not None:
        am = p.attn_mask
        if mask is None:
            mask = am
        elif am.dtype == torch.bool and mask.dtype == torch.bool:
            mask = mask & am
        else:
            a = am if am.dtype != torch.bool else torch.zeros(am.shape, dtype=q.dtype, device=q.device).masked_fill(~am, float("-inf"))
            m = mask if mask.dtype != torch.bool else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            mask = a + m
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, 1)
        v = v.repeat_interleave(H // Hkv, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p.dropout_p, scale=p.scale)
    if allowed is not None:
        # our convention: a row with no allowed key gives 0 (SDPA gives NaN)
        out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return out


def _run_reference_dense(q: Tensor, k: Tensor, v: Tensor, p: Params):
    """The float64 reference (any device), with masks; cast back to q's dtype."""
    from ..ops.dense.reference import attention_reference

    if p.key_padding_mask is None and p.attn_mask is None:
        out, lse = attention_reference(q, k, v, causal=p.causal, scale=p.scale, window=p.window, softcap=p.softcap,
                                       alibi_slopes=_std_slopes(p.alibi_slopes, q.shape[1]), rope=p.rope,
                                       device=q.device)
    else:
        if p.rope is not None:
            from ..ops.dense.rope import apply_rope_reference

            q, k = apply_rope_reference(q, k, p.rope)
        from .torch_ops import _masked_math

        Nq, Nk = q.shape[2], k.shape[2]
        allowed = _allowed_mask(Nq, Nk, p, q.device)
        if allowed is None:
            allowed = torch.ones(1, 1, Nq, Nk, dtype=torch.bool, device=q.device)
        if p.attn_mask is not None and p.attn_mask.dtype == torch.bool:
            allowed = allowed & p.attn_mask
        elif p.attn_mask is not None:
            raise NotImplementedError("the reference backend takes boolean masks only")
        scale = (1.0 / math.sqrt(q.shape[-1])) if p.scale is None else p.scale
        out, lse = _masked_math(q.double(), k.double(), v.double(), allowed, scale, p.softcap or 0.0,
                                _std_slopes(p.alibi_slopes, q.shape[1]))
    out = out.to(q.dtype)
    return (out, lse.float()) if p.return_lse else out


def _std_slopes(slopes: Any, H: int) -> Optional[Tensor]:
    if slopes is True:
        from ..ops.dense.reference import alibi_slopes

        return alibi_slopes(H)
    return slopes


def _run_triton_varlen(q, k, v, p: Params, cu_q, cu_k, max_q, max_k):
    from . import torch_ops

    if p.score_mod is not None or p.mask_mod is not None:
        from ..ops.dense.interface import attention_varlen as dense_varlen

        return dense_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=p.causal, scale=p.scale, window=p.window,
                            softcap=p.softcap, alibi_slopes=p.alibi_slopes, rope=p.rope, return_lse=p.return_lse,
                            deterministic=p.deterministic, score_mod=p.score_mod, mask_mod=p.mask_mod)
    return torch_ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=p.causal, scale=p.scale,
                                      window=p.window, softcap=p.softcap, alibi_slopes=p.alibi_slopes, rope=p.rope,
                                      return_lse=p.return_lse, deterministic=p.deterministic)


def _run_reference_varlen(q, k, v, p: Params, cu_q, cu_k, max_q, max_k):
    from ..ops.dense.reference import attention_reference_varlen

    out, lse = attention_reference_varlen(q, k, v, cu_q, cu_k, causal=p.causal, scale=p.scale, window=p.window,
                                          softcap=p.softcap, alibi_slopes=_std_slopes(p.alibi_slopes, q.shape[1]),
                                          rope=p.rope, device=q.device)
    out = out.to(q.dtype)
    return (out, lse.float()) if p.return_lse else out


def _run_triton_paged(q, kv: "PagedKV", vv: "PagedKV", p: Params, check_inputs: bool = True):
    if not check_inputs:
        from .torch_ops import paged_decode

        out = paged_decode(q, kv.cache, vv.cache, kv.block_table, kv.seq_lens, scale=p.scale, softcap=p.softcap,
                           alibi_slopes=p.alibi_slopes, window=p.window, max_seq_len=kv.max_seq_len)
        return out
    from ..ops.paged.interface import paged_attention

    return paged_attention(q, kv.cache, vv.cache, kv.block_table, kv.seq_lens, scale=p.scale, softcap=p.softcap,
                           alibi_slopes=p.alibi_slopes, window=p.window, max_seq_len=kv.max_seq_len,
                           return_lse=p.return_lse)


def _run_reference_paged(q, kv: "PagedKV", vv: "PagedKV", p: Params, check_inputs: bool = True):
    from ..ops.paged.reference import paged_attention_reference

    out, lse = paged_attention_reference(q, kv.cache, vv.cache, kv.block_table, kv.seq_lens, scale=p.scale,
                                         softcap=p.softcap, alibi_slopes=p.alibi_slopes, window=p.window)
    out = out.to(device=q.device, dtype=q.dtype)
    return (out, lse.float().to(q.device)) if p.return_lse else out


def _run_triton_linear(q, k, v, **kwargs):
    from ..ops.linear.interface import linear_attention

    return linear_attention(q, k, v, **kwargs)
