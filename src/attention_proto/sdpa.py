"""A drop-in ``scaled_dot_product_attention`` with the semantics of PyTorch's.

``attention_proto.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0,
is_causal=False, scale=None, enable_gqa=False)`` runs our kernels where they compute exactly
what ``torch.nn.functional.scaled_dot_product_attention`` computes, and falls back to PyTorch's
SDPA otherwise -- saying so once per reason (a :class:`SDPAFallbackWarning`). With the strict
switch (:func:`set_strict`, the :func:`strict` context manager, or ``ATTENTION_PROTO_STRICT=1``)
a fallback raises :class:`SDPAFallbackError` instead.

What maps onto our kernels:

- q [..., L, E], k [..., S, E], v [..., S, Ev] with the same leading dims (3-D inputs get one
  head); ``enable_gqa`` with Hq % Hkv == 0 (native GQA, no copies);
- ``is_causal``: PyTorch aligns it top-left (query i sees keys j <= i). For L <= S that is our
  bottom-right causal over the first L keys; for L > S the first S queries are causal and the
  rest see every key (two calls);
- ``attn_mask`` a boolean key-padding mask that broadcasts as [B|1, 1, 1, S] (the packed varlen
  path, no padded key computed).

What falls back: dropout, float masks, other boolean masks, Ev != E, dtypes or devices our
kernels do not take here (bfloat16 or CPU tensors under the interpreter, CPU tensors on a GPU
machine), head dims above 256, non-broadcastable GQA shapes, nested tensors.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import dispatch

Tensor = torch.Tensor
log = logging.getLogger("attention_proto.sdpa")

_TORCH_SDPA = F.scaled_dot_product_attention  # the original, even if someone patches F later


class SDPAFallbackWarning(UserWarning):
    """Our kernels could not take a scaled_dot_product_attention call; PyTorch's SDPA ran it."""


class SDPAFallbackError(RuntimeError):
    """Strict mode: a call that would have fallen back to PyTorch's SDPA."""


_STRICT = [os.environ.get("ATTENTION_PROTO_STRICT", "0") not in ("", "0", "false", "False")]
_WARNED: set = set()
_WARN_LOCK = threading.Lock()
_COUNTS = {"ours": 0, "fallback": 0}


def set_strict(flag: bool) -> None:
    """Strict mode on: unsupported calls raise SDPAFallbackError instead of falling back."""
    _STRICT[0] = bool(flag)


def is_strict() -> bool:
    return _STRICT[0]


@contextlib.contextmanager
def strict(flag: bool = True) -> Iterator[None]:
    """``with attention_proto.sdpa.strict(): ...`` -- raise instead of falling back inside the block."""
    old = _STRICT[0]
    _STRICT[0] = bool(flag)
    try:
        yield
    finally:
        _STRICT[0] = old


def fallback_counts() -> dict:
    """How many calls ran on our kernels and how many fell back (since import or the last reset)."""
    return dict(_COUNTS)


def reset_fallback_state() -> None:
    """Forget which reasons were already reported (they will be reported once again) and the counts."""
    with _WARN_LOCK:
        _WARNED.clear()
        _COUNTS.update(ours=0, fallback=0)


def _fallback(reasons: List[str]) -> None:
    msg = "attention_proto.scaled_dot_product_attention fell back to PyTorch's SDPA: " + "; ".join(reasons)
    if _STRICT[0]:
        raise SDPAFallbackError(msg.replace("fell back to", "would fall back to") + " (strict mode)")
    _COUNTS["fallback"] += 1
    if torch.compiler.is_compiling():
        return  # a warning inside a traced region would break the graph
    key = tuple(reasons)
    with _WARN_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(msg, SDPAFallbackWarning, stacklevel=3)
    log.info(msg)


def _key_padding(mask: Tensor, B: int, H: int, L: int, S: int) -> Optional[Tensor]:
    """A boolean mask broadcasting as [B|1, 1|H?, 1, S] with one row for all queries -> [B, S]; else None."""
    if mask.dtype != torch.bool or mask.dim() > 4 or mask.dim() < 1:
        return None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    b, h, l, s = m.shape
    if s != S or l != 1 or h != 1 or b not in (1, B):
        return None
    return m[:, 0, 0, :].expand(B, S)


def _as_4d(q: Tensor, k: Tensor, v: Tensor) -> Optional[Tuple[Tensor, Tensor, Tensor, Tuple[int, ...]]]:
    """BHSD views of q, k, v and q's leading shape, or None when the shapes do not fit."""
    if q.dim() != k.dim() or q.dim() != v.dim() or q.dim() < 3:
        return None
    lead = tuple(q.shape[:-2])
    if q.dim() == 3:
        if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
            return None
        return q[:, None], k[:, None], v[:, None], lead
    if q.dim() == 4:
        return q, k, v, lead
    if tuple(k.shape[:-2]) != lead or tuple(v.shape[:-2]) != lead:
        return None
    n = 1
    for x in lead[:-1]:
        n *= x
    H = lead[-1]
    return (q.reshape(n, H, *q.shape[-2:]), k.reshape(n, H, *k.shape[-2:]), v.reshape(n, H, *v.shape[-2:]), lead)


def _unsupported(q: Tensor, k: Tensor, v: Tensor, attn_mask, dropout_p: float, is_causal: bool, enable_gqa: bool
                 ) -> Tuple[List[str], Optional[tuple]]:
    """Reasons our kernels cannot take this call (empty: they can), and the prepared inputs."""
    why: List[str] = []
    if any(getattr(t, "is_nested", False) for t in (q, k, v)):
        return ["nested tensors"], None
    if not (q.dtype == k.dtype == v.dtype):
        return [f"mixed dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}"], None
    shaped = _as_4d(q, k, v)
    if shaped is None:
        return [f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not share leading "
                f"dims (broadcasting is not supported)"], None
    q4, k4, v4, lead = shaped
    B, H, L, E = q4.shape
    Bk, Hkv, S, Ek = k4.shape
    if Bk != B or v4.shape[0] != B:
        return [f"batch sizes differ (q {tuple(q.shape)}, k {tuple(k.shape)}): broadcasting is not supported"], None
    if Hkv != H:
        if not enable_gqa:
            return [f"q has {H} heads and k {Hkv} without enable_gqa (PyTorch decides what that means)"], None
        if Hkv < 1 or H % Hkv:
            return [f"enable_gqa with {H} query heads not a multiple of {Hkv} KV heads"], None
    if dropout_p:
        why.append(f"dropout_p={dropout_p} (no dropout in our kernels)")
    if is_causal and attn_mask is not None:
        return ["is_causal together with attn_mask (PyTorch rejects it)"], None
    kpm = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            why.append(f"a float attn_mask ({attn_mask.dtype}, shape {tuple(attn_mask.shape)}; only boolean "
                       f"key-padding masks [B, 1, 1, S] map onto our kernels)")
        else:
            kpm = _key_padding(attn_mask, B, H, L, S)
            if kpm is None:
                why.append(f"a boolean attn_mask of shape {tuple(attn_mask.shape)} that is not a key-padding "
                           f"mask [B|1, 1, 1, S={S}]")
    mods = {"key_padding"} if kpm is not None else set()
    if is_causal:
        mods.add("causal")
    name, rejected, _ = dispatch.choose(
        "dense", q.device.type, q.dtype, E, v4.shape[-1], H, Hkv, "bhsd", tuple(sorted(mods)),
        torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)), None, ("triton",))
    if name is None:
        why.extend(dispatch.reasons_from(rejected, "triton"))
    return why, (q4, k4, v4, lead, kpm)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on attention-proto's kernels where possible.

    Same arguments, shapes and results as PyTorch's: query [..., L, E], key [..., S, E],
    value [..., S, Ev] -> [..., L, Ev]; ``is_causal`` top-left aligned; ``attn_mask`` boolean
    (True = take part) or additive float; ``scale`` defaults to 1/sqrt(E). Unsupported inputs
    fall back to PyTorch (reported once per reason) or raise in strict mode.
    """
    why, prepared = _unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if why:
        _fallback(why)
        kw = {"enable_gqa": True} if enable_gqa else {}
        return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, **kw)
    from .integrations import torch_ops

    _COUNTS["ours"] += 1
    q, k, v, lead, kpm = prepared
    L, S = q.shape[2], k.shape[2]
    if kpm is not None:
        out = torch_ops.padded_attention(q, k, v, kpm, None, causal=False, scale=scale)
    elif not is_causal:
        out = torch_ops.flash_attention(q, k, v, scale=scale)
    elif L <= S:
        # top-left causal never reaches keys past L - 1: it is bottom-right causal over the first L keys
        out = torch_ops.flash_attention(q, k[:, :, :L], v[:, :, :L], causal=True, scale=scale)
    else:
        head = torch_ops.flash_attention(q[:, :, :S], k, v, causal=True, scale=scale)
        tail = torch_ops.flash_attention(q[:, :, S:], k, v, causal=False, scale=scale)
        out = torch.cat([head, tail], dim=2)
    return out.reshape(*lead, L, v.shape[-1])


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through ours inside the block.

    Code that looks the function up at call time (Hugging Face's ``sdpa`` attention, most
    models) then runs our kernels; fallbacks still reach PyTorch's original.
    """
    old = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = old
