"""Our kernels as PyTorch custom ops (``torch.library.custom_op``), for torch.compile and CUDA graphs.

Ops (namespace ``attention_proto``):

- ``flash_fwd`` / ``flash_bwd``: dense attention, q [B, H, Nq, D], k/v [B, Hkv, Nk, D] (any strides);
- ``varlen_fwd`` / ``varlen_bwd``: packed sequences, q [Tq, H, D], k/v [Tk, Hkv, D], cu_seqlens int32;
- ``padded_fwd`` / ``padded_bwd``: a padded batch in BHSD with boolean masks ``k_mask`` [B, Nk] and
  ``q_mask`` [B, Nq] (True = a real token). Inside the op the real tokens are packed and the varlen
  kernel runs, so no padding token is computed; the data-dependent packing (one host sync) stays
  inside the op, where torch.compile does not see it (no graph break). Padded query rows give 0.
- ``paged_decode``: decode over a paged KV cache with no host sync (``check_inputs=False``), so a
  decode step with static shapes can be captured in a CUDA graph.

Each forward has a fake (meta) implementation giving the exact output shapes and strides, and
``register_autograd`` wires the backward op, so a compiled model keeps both passes in its graph.
Modifiers travel as plain scalars: ``window_left/right`` -1 = unbounded, ``softcap`` 0 = off,
``rope_mode`` 0/1/2 = none/half/interleaved, ``rope_q_offset`` -1 = bottom-right default.

The thin Python wrappers (:func:`flash_attention`, :func:`varlen_attention`,
:func:`padded_attention`, :func:`paged_decode`) take the library's usual arguments and call the ops.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

import attention_proto  # noqa: F401  (sets TRITON_INTERPRET before any kernel module is imported)

NS = "attention_proto"


# ---------------------------------------------------------------------------------------------
# argument packing
# ---------------------------------------------------------------------------------------------

def _rope_spec(mode: int, theta: float, q_offset: int, k_offset: int, cos: Optional[Tensor],
               sin: Optional[Tensor]):
    if mode == 0:
        return None
    from ..ops.dense.rope import RopeSpec

    return RopeSpec(layout="half" if mode == 1 else "interleaved", theta=theta,
                    q_offset=None if q_offset < 0 else q_offset, k_offset=k_offset, cos=cos, sin=sin)


def rope_args(rope: Any) -> Tuple[int, float, int, int, Optional[Tensor], Optional[Tensor]]:
    """A RopeSpec (or None) as the ops' six rope arguments."""
    if rope is None:
        return (0, 10000.0, -1, 0, None, None)
    mode = 1 if rope.layout == "half" else 2
    return (mode, float(rope.theta), -1 if rope.q_offset is None else int(rope.q_offset), int(rope.k_offset),
            rope.cos, rope.sin)


def window_args(window: Any) -> Tuple[int, int]:
    from ..ops.dense.forward import normalize_window_arg

    return normalize_window_arg(window)


def _window(wl: int, wr: int) -> Tuple[int, int]:
    return (wl, wr)


def _softcap(c: float) -> Optional[float]:
    return float(c) if c > 0 else None


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` with the strides the fake gives (``empty_like(ref)``); copies only when they differ."""
    if t.stride() == ref.stride() and t.shape == ref.shape:
        return t  # empty_like keeps a dense tensor's strides: nothing to check (no allocation)
    want = torch.empty_like(ref, dtype=t.dtype)
    if t.stride() == want.stride():
        return t
    want.copy_(t)
    return want


def _dispatch(op, impl, tensors: Tuple[Tensor, ...]):
    """The op, or its implementation called directly in eager mode when no gradient is recorded.

    The op's dispatch costs ~60 us of host time per call (`integration-op-overhead`) and buys
    nothing in eager inference (it exists for torch.compile's tracing and for autograd); a model
    forward calls attention once per layer, so the direct call is taken there. Same kernels, same
    outputs (the implementation is the op's body)."""
    if torch.compiler.is_compiling():
        return op
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return op
    return impl


# ---------------------------------------------------------------------------------------------
# dense
# ---------------------------------------------------------------------------------------------

def _flash_fwd_impl(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, window_left: int, window_right: int,
              softcap: float, alibi_slopes: Optional[Tensor], rope_mode: int, rope_theta: float,
              rope_q_offset: int, rope_k_offset: int, rope_cos: Optional[Tensor],
              rope_sin: Optional[Tensor], deterministic: bool) -> Tuple[Tensor, Tensor]:
    from ..ops.dense.forward import flash_attention_forward

    rope = _rope_spec(rope_mode, rope_theta, rope_q_offset, rope_k_offset, rope_cos, rope_sin)
    out, lse = flash_attention_forward(q, k, v, causal=causal, scale=scale, window=_window(window_left, window_right),
                                       softcap=_softcap(softcap), alibi_slopes=alibi_slopes, rope=rope)
    return _like(out, q), lse


flash_fwd = torch.library.custom_op(f"{NS}::flash_fwd", mutates_args=())(_flash_fwd_impl)


@flash_fwd.register_fake
def _(q, k, v, causal, scale, window_left, window_right, softcap, alibi_slopes, rope_mode, rope_theta,
      rope_q_offset, rope_k_offset, rope_cos, rope_sin, deterministic):
    B, H, Nq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op(f"{NS}::flash_bwd", mutates_args=())
def flash_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool, scale: float,
              window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor], rope_mode: int,
              rope_theta: float, rope_q_offset: int, rope_k_offset: int, rope_cos: Optional[Tensor],
              rope_sin: Optional[Tensor], deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from ..ops.dense.backward import flash_attention_backward

    rope = _rope_spec(rope_mode, rope_theta, rope_q_offset, rope_k_offset, rope_cos, rope_sin)
    dq, dk, dv = flash_attention_backward(
        do, q, k, v, o, lse, causal=causal, scale=scale, window=_window(window_left, window_right),
        softcap=_softcap(softcap), alibi_slopes=alibi_slopes, rope=rope, deterministic=deterministic)
    return _like(dq, q), _like(dk, k), _like(dv, v)


@flash_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale, window_left, window_right, softcap, alibi_slopes, rope_mode, rope_theta,
      rope_q_offset, rope_k_offset, rope_cos, rope_sin, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_DENSE_ARGS = ("causal", "scale", "window_left", "window_right", "softcap", "alibi_slopes", "rope_mode",
               "rope_theta", "rope_q_offset", "rope_k_offset", "rope_cos", "rope_sin", "deterministic")


def _setup_dense(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = inputs[3:]
    ctx.set_materialize_grads(True)


def _backward_dense(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.attention_proto.flash_bwd(dout, q, k, v, out, lse, *ctx.args)
    return (dq, dk, dv) + (None,) * len(_DENSE_ARGS)


flash_fwd.register_autograd(_backward_dense, setup_context=_setup_dense)


# ---------------------------------------------------------------------------------------------
# per-row first keys (packed documents in one row; no backward)
# ---------------------------------------------------------------------------------------------

def _key_start_fwd_impl(q: Tensor, k: Tensor, v: Tensor, key_start: Tensor, scale: float, window_left: int,
                        softcap: float) -> Tensor:
    from ..ops.dense.forward import flash_attention_forward

    out, _ = flash_attention_forward(q, k, v, causal=True, scale=scale, window=_window(window_left, -1),
                                     softcap=_softcap(softcap), key_start=key_start, return_lse=False)
    return _like(out, q)


key_start_fwd = torch.library.custom_op(f"{NS}::key_start_fwd", mutates_args=())(_key_start_fwd_impl)


@key_start_fwd.register_fake
def _(q, k, v, key_start, scale, window_left, softcap):
    return torch.empty_like(q)


def sequence_starts(position_ids: Tensor) -> Tensor:
    """bool [B, N]: where a sequence starts in ``position_ids`` [B, N]: the first token, and every
    position that is not one more than the previous one (transformers' packed-sequence rule)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def key_starts_from_positions(position_ids: Tensor) -> Tensor:
    """int32 [B, N]: the index of the first token of each token's sequence in ``position_ids`` [B, N]
    (:func:`sequence_starts`), so ``[0 1 2 0 1]`` gives ``[0 0 0 3 3]``. Computed on the device, no sync."""
    idx = torch.arange(position_ids.shape[-1], device=position_ids.device).expand_as(position_ids)
    return torch.where(sequence_starts(position_ids), idx, 0).cummax(dim=-1).values.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------------------------

def _varlen_fwd_impl(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
               max_seqlen_k: int, causal: bool, scale: float, window_left: int, window_right: int, softcap: float,
               alibi_slopes: Optional[Tensor], rope_mode: int, rope_theta: float, rope_q_offset: int,
               rope_k_offset: int, rope_cos: Optional[Tensor], rope_sin: Optional[Tensor],
               deterministic: bool) -> Tuple[Tensor, Tensor]:
    from ..ops.dense.forward import flash_attention_forward

    rope = _rope_spec(rope_mode, rope_theta, rope_q_offset, rope_k_offset, rope_cos, rope_sin)
    out, lse = flash_attention_forward(
        q, k, v, causal=causal, scale=scale, window=_window(window_left, window_right), softcap=_softcap(softcap),
        alibi_slopes=alibi_slopes, rope=rope, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    return _like(out, q), lse


varlen_fwd = torch.library.custom_op(f"{NS}::varlen_fwd", mutates_args=())(_varlen_fwd_impl)


@varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right,
      softcap, alibi_slopes, rope_mode, rope_theta, rope_q_offset, rope_k_offset, rope_cos, rope_sin, deterministic):
    T, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op(f"{NS}::varlen_bwd", mutates_args=())
def varlen_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
               cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float,
               window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor], rope_mode: int,
               rope_theta: float, rope_q_offset: int, rope_k_offset: int, rope_cos: Optional[Tensor],
               rope_sin: Optional[Tensor], deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from ..ops.dense.backward import flash_attention_backward

    rope = _rope_spec(rope_mode, rope_theta, rope_q_offset, rope_k_offset, rope_cos, rope_sin)
    dq, dk, dv = flash_attention_backward(
        do, q, k, v, o, lse, causal=causal, scale=scale, window=_window(window_left, window_right),
        softcap=_softcap(softcap), alibi_slopes=alibi_slopes, rope=rope, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, deterministic=deterministic)
    return _like(dq, q), _like(dk, k), _like(dv, v)


@varlen_bwd.register_fake
def _(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
      window_right, softcap, alibi_slopes, rope_mode, rope_theta, rope_q_offset, rope_k_offset, rope_cos, rope_sin,
      deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_q, cu_k = inputs[:5]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = inputs[5:]
    ctx.set_materialize_grads(True)


def _backward_varlen(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.attention_proto.varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return (dq, dk, dv, None, None) + (None,) * (len(ctx.args))


varlen_fwd.register_autograd(_backward_varlen, setup_context=_setup_varlen)


# ---------------------------------------------------------------------------------------------
# padded batches (key/query padding masks), packed inside the op
# ---------------------------------------------------------------------------------------------

class _Packing:
    """Where the real tokens of a padded batch are, read on the host once."""

    def __init__(self, q_mask: Tensor, k_mask: Tensor) -> None:
        lens_q = q_mask.sum(1, dtype=torch.int32)
        lens_k = k_mask.sum(1, dtype=torch.int32)
        # number of runs of real keys per row: 1 for left/right padding, more when there are holes
        runs = k_mask[:, :1].to(torch.int32).sum(1)
        if k_mask.shape[1] > 1:
            runs = runs + (k_mask[:, 1:] & ~k_mask[:, :-1]).sum(1, dtype=torch.int32)
        stats = torch.stack([lens_q.max(), lens_k.max(), runs.max()]).to(torch.int64)
        mq, mk, nruns = (int(x) for x in stats.tolist())  # the one host sync
        self.max_q, self.max_k, self.holes = mq, mk, nruns > 1
        zero = torch.zeros(1, dtype=torch.int32, device=q_mask.device)
        self.cu_q = torch.cat([zero, lens_q.cumsum(0, dtype=torch.int32)])
        self.cu_k = torch.cat([zero, lens_k.cumsum(0, dtype=torch.int32)])


def _pack(x: Tensor, mask: Tensor) -> Tensor:
    """BHSD x [B, H, N, D] and mask [B, N] -> packed [T, H, D] (real tokens, batch-major)."""
    return x.transpose(1, 2)[mask]


def _unpack_into(out: Tensor, packed: Tensor, mask: Tensor) -> None:
    out.transpose(1, 2)[mask] = packed


def _masked_math(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float, softcap: float,
                 alibi: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """fp32 torch attention with an explicit allowed mask [B, 1, Nq, Nk]; out 0 / lse -inf when nothing allowed."""
    H, Hkv = q.shape[1], k.shape[1]
    kk = k.float().repeat_interleave(H // Hkv, 1)
    vv = v.float().repeat_interleave(H // Hkv, 1)
    s = torch.matmul(q.float(), kk.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        Nq, Nk = q.shape[2], k.shape[2]
        i = torch.arange(Nq, device=q.device, dtype=torch.float32)[:, None] + (Nk - Nq)
        j = torch.arange(Nk, device=q.device, dtype=torch.float32)[None, :]
        s = s - alibi.float().reshape(1, H, 1, 1) * (i - j).abs()
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return torch.matmul(p, vv).to(q.dtype), lse


def _masked_math_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float, softcap: float,
                     alibi: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`_masked_math` (fp32): dS = P * (dP - rowsum(dP * P)), softcap chain rule, GQA sums."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = H // Hkv
    qf, kf, vf, dof = q.float(), k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1), do.float()
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    th = None
    if softcap > 0:
        th = torch.tanh(s / softcap)
        s = softcap * th
    if alibi is not None:
        i = torch.arange(Nq, device=q.device, dtype=torch.float32)[:, None] + (Nk - Nq)
        j = torch.arange(Nk, device=q.device, dtype=torch.float32)[None, :]
        s = s - alibi.float().reshape(1, H, 1, 1) * (i - j).abs()
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    dv = torch.matmul(p.transpose(-1, -2), dof)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    if th is not None:
        ds = ds * (1.0 - th * th)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    dk = dk.reshape(B, Hkv, G, Nk, D).sum(2)
    dv = dv.reshape(B, Hkv, G, Nk, v.shape[-1]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def padding_allowed(q_mask: Tensor, k_mask: Tensor, causal: bool, window_left: int, window_right: int) -> Tensor:
    """The [B, 1, Nq, Nk] allowed mask of a padded batch in absolute positions (queries are the last Nq)."""
    Nq, Nk = q_mask.shape[1], k_mask.shape[1]
    i = torch.arange(Nq, device=k_mask.device)[:, None] + (Nk - Nq)
    j = torch.arange(Nk, device=k_mask.device)[None, :]
    allowed = torch.ones(Nq, Nk, dtype=torch.bool, device=k_mask.device)
    if causal:
        allowed &= j <= i
    if window_left >= 0:
        allowed &= j >= i - window_left
    if window_right >= 0:
        allowed &= j <= i + window_right
    return allowed[None, None] & k_mask[:, None, None, :] & q_mask[:, None, :, None]


def _padded_fwd_impl(q: Tensor, k: Tensor, v: Tensor, q_mask: Tensor, k_mask: Tensor, causal: bool, scale: float,
               window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
               deterministic: bool) -> Tuple[Tensor, Tensor]:
    B, H, Nq, D = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((B, H, Nq), float("-inf"), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    pk = _Packing(q_mask, k_mask)
    if pk.holes and (window_left >= 0 or window_right >= 0 or alibi_slopes is not None):
        # windows and ALiBi count padded positions too: packing would change distances
        o, l = _masked_math(q, k, v, padding_allowed(q_mask, k_mask, causal, window_left, window_right),
                            scale, softcap, alibi_slopes)
        out.copy_(torch.where(q_mask[:, None, :, None], o, torch.zeros_like(o)))
        lse.copy_(torch.where(q_mask[:, None, :], l, lse))
        return out, lse
    if pk.max_q == 0:
        return out, lse
    from ..ops.dense.forward import flash_attention_forward

    o, l = flash_attention_forward(
        _pack(q, q_mask), _pack(k, k_mask), _pack(v, k_mask), causal=causal, scale=scale,
        window=(window_left, window_right), softcap=_softcap(softcap), alibi_slopes=alibi_slopes,
        cu_seqlens_q=pk.cu_q, cu_seqlens_k=pk.cu_k, max_seqlen_q=pk.max_q, max_seqlen_k=max(pk.max_k, 1))
    _unpack_into(out, o, q_mask)
    lse.transpose(1, 2)[q_mask] = l.transpose(0, 1)
    return out, lse


padded_fwd = torch.library.custom_op(f"{NS}::padded_fwd", mutates_args=())(_padded_fwd_impl)


@padded_fwd.register_fake
def _(q, k, v, q_mask, k_mask, causal, scale, window_left, window_right, softcap, alibi_slopes, deterministic):
    B, H, Nq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op(f"{NS}::padded_bwd", mutates_args=())
def padded_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, q_mask: Tensor, k_mask: Tensor,
               causal: bool, scale: float, window_left: int, window_right: int, softcap: float,
               alibi_slopes: Optional[Tensor], deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.numel() == 0:
        return dq, dk, dv
    pk = _Packing(q_mask, k_mask)
    if pk.holes and (window_left >= 0 or window_right >= 0 or alibi_slopes is not None):
        # (autograd is off inside an op's implementation: the gradient is written out by hand)
        g = _masked_math_bwd(do * q_mask[:, None, :, None].to(do.dtype), q, k, v,
                             padding_allowed(q_mask, k_mask, causal, window_left, window_right), scale, softcap,
                             alibi_slopes)
        dq.copy_(g[0]), dk.copy_(g[1]), dv.copy_(g[2])
        return dq, dk, dv
    if pk.max_q == 0:
        return dq, dk, dv
    from ..ops.dense.backward import flash_attention_backward

    pq, pkk, pv = _pack(q, q_mask), _pack(k, k_mask), _pack(v, k_mask)
    g = flash_attention_backward(
        _pack(do, q_mask), pq, pkk, pv, _pack(o, q_mask), lse.transpose(1, 2)[q_mask].transpose(0, 1).contiguous(),
        causal=causal, scale=scale, window=(window_left, window_right), softcap=_softcap(softcap),
        alibi_slopes=alibi_slopes, cu_seqlens_q=pk.cu_q, cu_seqlens_k=pk.cu_k, max_seqlen_q=pk.max_q,
        max_seqlen_k=max(pk.max_k, 1), deterministic=deterministic)
    _unpack_into(dq, g[0], q_mask)
    _unpack_into(dk, g[1], k_mask)
    _unpack_into(dv, g[2], k_mask)
    return dq, dk, dv


@padded_bwd.register_fake
def _(do, q, k, v, o, lse, q_mask, k_mask, causal, scale, window_left, window_right, softcap, alibi_slopes,
      deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_padded(ctx, inputs, output):
    q, k, v, q_mask, k_mask = inputs[:5]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_mask, k_mask)
    ctx.args = inputs[5:]
    ctx.set_materialize_grads(True)


def _backward_padded(ctx, dout, dlse):
    q, k, v, out, lse, q_mask, k_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.attention_proto.padded_bwd(dout, q, k, v, out, lse, q_mask, k_mask, *ctx.args)
    return (dq, dk, dv, None, None) + (None,) * len(ctx.args)


padded_fwd.register_autograd(_backward_padded, setup_context=_setup_padded)


# ---------------------------------------------------------------------------------------------
# paged decode (no backward)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op(f"{NS}::paged_decode", mutates_args=())
def paged_decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float,
                    softcap: float, alibi_slopes: Optional[Tensor], window_left: int, max_seq_len: int) -> Tensor:
    from ..ops.paged.interface import paged_attention

    out = paged_attention(q, k_cache, v_cache, block_table, seq_lens, scale=scale, softcap=_softcap(softcap),
                          alibi_slopes=alibi_slopes, window=window_left if window_left >= 0 else None,
                          max_seq_len=max_seq_len if max_seq_len > 0 else None, check_inputs=False)
    return out.contiguous()


@paged_decode_op.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, scale, softcap, alibi_slopes, window_left, max_seq_len):
    return q.new_empty(q.shape)


# ---------------------------------------------------------------------------------------------
# wrappers with the library's arguments
# ---------------------------------------------------------------------------------------------

def _scale(scale: Optional[float], D: int) -> float:
    return (1.0 / math.sqrt(D)) if scale is None else float(scale)


def _slopes(alibi_slopes: Any, H: int, device: torch.device) -> Optional[Tensor]:
    if alibi_slopes is None or alibi_slopes is False:
        return None
    from ..ops.dense.forward import resolve_alibi

    return resolve_alibi(alibi_slopes, H, device)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None,
                    window: Any = None, softcap: Optional[float] = None, alibi_slopes: Any = None, rope: Any = None,
                    return_lse: bool = False, deterministic: bool = True):
    """Dense attention through the ``attention_proto::flash_fwd`` op (autograd via ``flash_bwd``).

    q [B, H, Nq, D], k/v [B, Hkv, Nk, D] (any strides; pass BSHD as ``x.transpose(1, 2)``);
    returns out [B, H, Nq, D] with q's stride order (and lse [B, H, Nq] fp32 with ``return_lse``).
    Semantics as :func:`attention_proto.ops.dense.interface.attention`; no input validation here.
    """
    wl, wr = window_args(window)
    out, lse = _dispatch(torch.ops.attention_proto.flash_fwd, _flash_fwd_impl, (q, k, v))(
        q, k, v, bool(causal), _scale(scale, q.shape[-1]), wl, wr, float(softcap or 0.0),
        _slopes(alibi_slopes, q.shape[1], q.device), *rope_args(rope), bool(deterministic))
    return (out, lse) if return_lse else out


def key_start_attention(q: Tensor, k: Tensor, v: Tensor, key_start: Tensor, *, scale: Optional[float] = None,
                        window_left: int = -1, softcap: Optional[float] = None) -> Tensor:
    """Causal attention where query row i sees only keys j >= key_start[b, i], through
    ``attention_proto::key_start_fwd`` (forward only: inference).

    q [B, H, N, D], k/v [B, Hkv, N, D]; ``key_start`` int32 [B, N] contiguous (packed sequences in
    one row: each token's sequence start, :func:`key_starts_from_positions`); a causal sliding
    window of ``window_left`` keys back may narrow it further. Returns out [B, H, N, D].
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError("key_start_attention has no backward (inference only); use varlen_attention "
                                  "with cu_seqlens for training")
    op = torch.ops.attention_proto.key_start_fwd if torch.compiler.is_compiling() else _key_start_fwd_impl
    return op(q, k, v, key_start, _scale(scale, q.shape[-1]), int(window_left), float(softcap or 0.0))


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, *, causal: bool = False, scale: Optional[float] = None, window: Any = None,
                     softcap: Optional[float] = None, alibi_slopes: Any = None, rope: Any = None,
                     return_lse: bool = False, deterministic: bool = True):
    """Packed attention through ``attention_proto::varlen_fwd``: q [Tq, H, D], k/v [Tk, Hkv, D] -> [Tq, H, D]."""
    wl, wr = window_args(window)
    out, lse = _dispatch(torch.ops.attention_proto.varlen_fwd, _varlen_fwd_impl, (q, k, v))(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal),
        _scale(scale, q.shape[-1]), wl, wr, float(softcap or 0.0), _slopes(alibi_slopes, q.shape[1], q.device),
        *rope_args(rope), bool(deterministic))
    return (out, lse) if return_lse else out


def padded_attention(q: Tensor, k: Tensor, v: Tensor, k_mask: Tensor, q_mask: Optional[Tensor] = None, *,
                     causal: bool = False, scale: Optional[float] = None, window: Any = None,
                     softcap: Optional[float] = None, alibi_slopes: Any = None, return_lse: bool = False,
                     deterministic: bool = True):
    """Attention over a padded batch through ``attention_proto::padded_fwd`` (no padding token computed).

    q [B, H, Nq, D], k/v [B, Hkv, Nk, D]; ``k_mask`` [B, Nk] and ``q_mask`` [B, Nq] boolean (True = a
    real token; ``q_mask`` None = every query is real). Each sequence's real queries sit at its last
    real key positions (causal/window aligned bottom-right over the real tokens, as for a packed
    batch). Padded query rows give 0 (lse -inf).
    """
    if q_mask is None:
        q_mask = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
    wl, wr = window_args(window)
    out, lse = _dispatch(torch.ops.attention_proto.padded_fwd, _padded_fwd_impl, (q, k, v))(
        q, k, v, q_mask.to(torch.bool), k_mask.to(torch.bool), bool(causal), _scale(scale, q.shape[-1]), wl, wr,
        float(softcap or 0.0), _slopes(alibi_slopes, q.shape[1], q.device), bool(deterministic))
    return (out, lse) if return_lse else out


def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, *,
                 scale: Optional[float] = None, softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
                 window: Any = None, max_seq_len: Optional[int] = None) -> Tensor:
    """Paged decode through ``attention_proto::paged_decode`` (no host sync: CUDA-graph capturable).

    q [B, Hq, Nq <= 16, D]; pools [num_pages, page_size, Hkv, D]; block_table [B, max_pages];
    seq_lens [B]. ``max_seq_len``: a host-side bound of seq_lens (default: the table's capacity).
    """
    wl, _ = window_args(window)
    return torch.ops.attention_proto.paged_decode(
        q, k_cache, v_cache, block_table, seq_lens, _scale(scale, q.shape[-1]), float(softcap or 0.0),
        alibi_slopes, wl, int(max_seq_len or 0))


def op_names() -> List[str]:
    """The registered ops, ``attention_proto::*``."""
    return [f"{NS}::{n}" for n in ("flash_fwd", "flash_bwd", "key_start_fwd", "varlen_fwd", "varlen_bwd", "padded_fwd",
                                   "padded_bwd", "paged_decode")]
