"""Hugging Face transformers: attention-proto as an attention implementation.

>>> from attention_proto.integrations import transformers as ap_hf
>>> ap_hf.register()                                           # once per process
>>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attention_proto")
>>> model.set_attn_implementation("attention_proto")           # or switch an existing model

:func:`register` adds :func:`attention_forward` to transformers' ``AttentionInterface`` and
:func:`mask_function` to its ``AttentionMaskInterface``. The mask function hands the attention the
raw 2-D padding mask (or None) instead of a materialised [B, 1, Nq, Nk] mask whenever the pattern
is one the attention rebuilds from what the model passes (``is_causal``, ``sliding_window``,
``softcap``, GQA from the shapes): causal or bidirectional, a sliding window, transformers'
packed-sequence overlay. Any other pattern (chunked attention, block overlays such as image tokens,
user ``or``/``and`` functions) is materialised as transformers' 4-D mask and computed eagerly,
never dropped. The paths, in order:

1. packed sequences: ``cu_seq_lens_q/k`` keyword arguments (as flash-attention collators give)
   -> ``attention_proto::varlen_fwd``; ``position_ids`` that restart in a batch of one: in inference
   (causal, no gradient) each token's sequence start is computed on the device and bounds its keys
   inside the dense kernel (``attention_proto::key_start_fwd``, no sync, also under torch.compile);
   with gradients (or bidirectional) the varlen path, whose lengths cost one sync per forward;
2. no padding (mask None or all ones) -> ``attention_proto::flash_fwd`` (causal bottom-right, so
   decode and chunked prefill over a cache need no mask); with :class:`PagedCache` and at most
   16 new tokens -> ``attention_proto::paged_decode`` over the cache's pages;
3. a 2-D padding mask (left or right padding, cached or not) -> ``attention_proto::padded_fwd``:
   the real tokens are packed and the varlen kernel runs, so no padding token is computed;
4. anything else (a 4-D mask, dropout in training, attention sinks, inputs our kernels do not take
   such as bfloat16 under the CPU interpreter) -> an eager PyTorch computation, reported once per
   reason (:class:`TransformersFallbackWarning`; ``strict=True`` in :func:`register` raises instead).

Semantics follow transformers' sdpa/eager masks: a causal sliding window ``w`` keeps keys
``j > i - w`` (our window (w - 1, -1)); a bidirectional one keeps ``|i - j| <= w``; restarting
``position_ids`` in a batch of one mark packed sequences, with or without a cache (transformers' sdpa
looks for them without a cache only, its flash-attention path always). Padded query rows come back as
0 (their values are never used). Known gaps: under ``torch.compile`` the mask function cannot read the
pattern's closures (:func:`compiled_pattern_kind`): chunked attention is materialised from the config,
but block overlays are not seen there, nor restarting position_ids in training (inference finds them
on the device); a StaticCache without an attention mask cannot tell filled slots from empty ones
(generate always passes a mask).
"""
from __future__ import annotations

import logging
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..dispatch import choose, reasons_from  # module level: an import per call costs ~1 us of host time
from ..runtime.offsets import derived
from . import torch_ops

NAME = "attention_proto"
log = logging.getLogger("attention_proto.transformers")

#: calls per path since import (or :func:`reset_stats`); not updated inside torch.compile
STATS: Dict[str, int] = {"dense": 0, "padded": 0, "varlen": 0, "paged": 0, "fallback": 0}
_STRICT = [False]
_PACKED_POSITION_IDS = [True]
_WARNED: set = set()
_LOCK = threading.Lock()


class TransformersFallbackWarning(UserWarning):
    """The attention_proto attention implementation computed a call with eager PyTorch."""


class AttentionProtoFallbackError(RuntimeError):
    """Strict mode: a call our kernels cannot take."""


def register(name: str = NAME, *, strict: bool = False, packed_position_ids: bool = True) -> str:
    """Register :func:`attention_forward` with transformers' ``AttentionInterface`` under ``name``.

    Afterwards ``from_pretrained(..., attn_implementation=name)`` and
    ``model.set_attn_implementation(name)`` use our kernels. ``strict=True`` makes unsupported
    calls raise :class:`AttentionProtoFallbackError` instead of running eagerly.
    ``packed_position_ids=False`` turns off the search for packed sequences in ``position_ids``
    (restarting positions in a batch of one). In inference the search runs on the device (each
    token's sequence start, read by the dense kernel: no sync; its cost on the H100 is in
    docs/perf-notes.md, session 7); with gradients it costs one device-to-host sync per forward.
    Without it restarting positions are one sequence, as in transformers' sdpa with a cache
    (``cu_seq_lens_q/k`` still select the varlen path). Returns ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for arg, val in (("strict", strict), ("packed_position_ids", packed_position_ids)):
        if not isinstance(val, bool):
            raise TypeError(f"register: {arg} must be a bool; got {type(val).__name__} {val!r}")
    _masking_utils()
    _STRICT[0] = strict
    _PACKED_POSITION_IDS[0] = packed_position_ids
    AttentionInterface.register(name, attention_forward)
    # without a mask function transformers would hand the attention no mask at all
    AttentionMaskInterface.register(name, mask_function)
    return name


#: transformers.masking_utils, imported once outside any trace: under torch.compile an ``import`` of
#: transformers (a ``_LazyModule``, not a plain module) is a graph break in torch 2.11 ("Bad import
#: result"), measured on the H100 run
_MASKING_UTILS: List[Any] = []


def _masking_utils() -> Any:
    if not _MASKING_UTILS:
        import transformers.masking_utils as mu

        _MASKING_UTILS.append(mu)
    return _MASKING_UTILS[0]


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function: Any = None, attention_mask: Optional[Tensor] = None, use_vmap: bool = False,
                  **kwargs: Any) -> Optional[Tensor]:
    """transformers mask interface: the 2-D padding mask [B, L] (None when there is no padding).

    The causal/window pattern is rebuilt by :func:`attention_forward` from what the model passes;
    with transformers' packed-sequence overlay on a batch of one it finds the segments in position_ids.
    Every other pattern (:func:`mask_pattern_kind` "other": chunked attention, block overlays such as
    bidirectional image tokens, user functions, ``use_vmap``; packing in a batch of several) and
    bidirectional masks on causal models (``config.is_causal=False``) are materialised as transformers'
    4-D boolean mask, which the attention computes eagerly. Under torch.compile the closures cannot be
    read: :func:`compiled_pattern_kind` decides from the config alone.
    """
    mu = _MASKING_UTILS[0] if _MASKING_UTILS else _masking_utils()

    config = kwargs.get("config")
    forced_bidirectional = mask_function is mu.bidirectional_mask_function and config is not None and \
        getattr(config, "is_causal", True) is False
    kind = "plain"
    if mask_function is not None and torch.compiler.is_compiling():
        kind = compiled_pattern_kind(mask_function, mu, config)
    elif mask_function is not None:
        kind = mask_pattern_kind(mask_function, mu)
        if kind == "packed" and batch_size != 1:
            kind = "other"  # the varlen path takes one packed row; a batch of several is computed exactly
    if use_vmap or forced_bidirectional or kind == "other":
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            allow_is_causal_skip=False, use_vmap=use_vmap, device=kwargs.get("device", "cpu"))
    if attention_mask is None:
        return None
    if attention_mask.shape[1] > kv_length:
        attention_mask = attention_mask[:, -kv_length:]  # a sliding cache keeps the last kv_length positions
    if not torch.compiler.is_compiling() and attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None  # one sync per forward (not per layer)
    return attention_mask


def compiled_pattern_kind(mask_function: Any, mu: Any, config: Any) -> str:
    """:func:`mask_pattern_kind` under torch.compile, where neither a closure's contents nor (on some
    torch versions) its name can be read: "other" for chunked attention (``config.attention_chunk_size``),
    else "plain". So under compile block overlays and restarting position_ids are not seen (the known gap
    in the module docstring); transformers always adds its packed overlay while tracing a forward without
    a cache, so judging and-combinations as "other" would send every such forward to eager attention."""
    if mask_function is mu.causal_mask_function or mask_function is mu.bidirectional_mask_function:
        return "plain"
    return "other" if getattr(config, "attention_chunk_size", None) is not None else "plain"


def _closure_vars(fn: Any) -> Dict[str, Any]:
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    try:
        return dict(zip(code.co_freevars, (c.cell_contents for c in cells)))
    except ValueError:  # an empty cell
        return {}


def mask_pattern_kind(mask_function: Any, mu: Any = None) -> str:
    """What a transformers mask function describes (eager mode), for :func:`mask_function`.

    "plain": causal or bidirectional, possibly with a sliding window (the attention rebuilds it);
    "packed": the same with transformers' packed-sequence overlay (found from position_ids without a
    cache; the attention finds the segments in position_ids); "other": anything else (chunked
    attention, block overlays, user functions): materialised. Reads the ``and_masks`` closures of
    ``transformers.masking_utils``; an unknown function is "other", so the fallback is always the
    exact mask, never a dropped pattern.
    """
    mu = mu or _masking_utils()
    found = set()

    def ok(fn: Any, depth: int = 0) -> bool:
        if depth > 8:
            return False
        if fn is mu.causal_mask_function or fn is mu.bidirectional_mask_function:
            return True
        name = getattr(fn, "__qualname__", "")
        if name == "and_masks.<locals>.and_mask":
            parts = _closure_vars(fn).get("mask_functions")
            return isinstance(parts, tuple) and all(ok(f, depth + 1) for f in parts)
        if name in ("sliding_window_overlay.<locals>.inner_mask", "sliding_window_bidirectional_overlay.<locals>.inner_mask"):
            return True
        if name == "packed_sequence_mask_function.<locals>.inner_mask":
            found.add("packed")
            return True
        if name == "remap_positions_for_packed_sequence.<locals>.inner_mask":
            found.add("packed")
            inner = _closure_vars(fn).get("mask_function")
            return inner is not None and ok(inner, depth + 1)
        return False

    if not ok(mask_function):
        return "other"
    return "packed" if found else "plain"


def reset_stats() -> None:
    with _LOCK:
        for k in STATS:
            STATS[k] = 0
        _WARNED.clear()


def _count(path: str) -> None:
    if not torch.compiler.is_compiling():
        STATS[path] += 1


def _report(reason: str) -> None:
    if _STRICT[0]:
        raise AttentionProtoFallbackError(f"attention_proto cannot run this attention call: {reason} (strict mode)")
    if torch.compiler.is_compiling():
        return
    with _LOCK:
        if reason in _WARNED:
            return
        _WARNED.add(reason)
    msg = f"attention_proto attention fell back to eager PyTorch: {reason}"
    warnings.warn(msg, TransformersFallbackWarning, stacklevel=3)
    log.info(msg)


# ---------------------------------------------------------------------------------------------
# the paged cache
# ---------------------------------------------------------------------------------------------


@dataclass
class PagedState:
    """What a :class:`PagedCache` layer hands the attention function for a decode step."""

    k_pool: Tensor
    v_pool: Tensor
    block_table: Tensor
    seq_lens: Tensor
    capacity: int


#: attribute of the key view a PagedLayer returns for a decode step: its PagedState
_PAGED_ATTR = "_attention_proto_paged"


def _cache_classes():
    from transformers.cache_utils import Cache, CacheLayerMixin

    return Cache, CacheLayerMixin


def _make_paged_layer_class():
    Cache, CacheLayerMixin = _cache_classes()

    class PagedLayer(CacheLayerMixin):
        """One layer's K/V in pages of ``page_size`` tokens ([num_pages, page_size, Hkv, D] pools).

        Sequence b owns pages ``b * P .. b * P + P - 1`` (P = pages per sequence), so the pool also
        reads as a dense [B, Hkv, L, D] view without a copy (prefill and padded batches use it).
        """

        is_sliding = False
        is_compileable = False
        is_croppable = True

        def __init__(self, max_cache_len: int, page_size: int = 16) -> None:
            super().__init__()
            self.max_cache_len, self.page_size = int(max_cache_len), int(page_size)
            self.length = 0

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            B, Hkv, _, D = key_states.shape
            P = -(-self.max_cache_len // self.page_size)
            self.batch_size, self.pages_per_seq, self.device = B, P, key_states.device
            shape = (B * P, self.page_size, Hkv, D)
            self.k_pool = torch.zeros(shape, dtype=key_states.dtype, device=self.device)
            self.v_pool = torch.zeros(shape, dtype=value_states.dtype, device=self.device)
            self.block_table = torch.arange(B * P, dtype=torch.int32, device=self.device).view(B, P)
            self.seq_lens = torch.zeros(B, dtype=torch.int32, device=self.device)
            self.length = 0
            self.is_initialized = True

        def _dense(self, pool: Tensor, n: int) -> Tensor:
            seq = pool.view(self.batch_size, self.pages_per_seq * self.page_size, pool.shape[2], pool.shape[3])
            return seq[:, :n].transpose(1, 2)

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            T = key_states.shape[2]
            if self.length + T > self.pages_per_seq * self.page_size:
                raise ValueError(f"PagedCache is full: {self.length} + {T} tokens exceed max_cache_len="
                                 f"{self.max_cache_len}; build the cache with a larger max_cache_len")
            from ..ops.paged.cache import paged_kv_append

            paged_kv_append(key_states.to(self.k_pool.dtype), value_states.to(self.v_pool.dtype), self.k_pool,
                            self.v_pool, self.block_table, self.seq_lens)
            self.seq_lens += T
            past = self.length
            self.length += T
            state = None
            if past > 0 and T <= 16:
                state = PagedState(self.k_pool, self.v_pool, self.block_table, self.seq_lens,
                                   self.pages_per_seq * self.page_size)
            # transformers >= 5.2x hands the attention's kwargs to the cache as ``kwargs=``: the
            # state travels there. Older releases (4.57, 5.17, 5.18: ``update(k, v, layer_idx)``)
            # pass nothing, so the state also rides on the returned key view (below)
            fwd_kwargs = kwargs.get("kwargs")
            if isinstance(fwd_kwargs, dict):
                if state is not None:
                    fwd_kwargs["attention_proto_paged"] = state
                else:
                    fwd_kwargs.pop("attention_proto_paged", None)
            if past == 0:
                return key_states, value_states  # prefill: the new tokens are the whole sequence
            keys = self._dense(self.k_pool, self.length)
            if state is not None and not torch.compiler.is_compiling():
                setattr(keys, _PAGED_ATTR, state)  # a fresh view per call: never stale
            return keys, self._dense(self.v_pool, self.length)

        def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
            return self.length + query_length, 0

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return self.max_cache_len

        def crop(self, max_length: int) -> None:
            if max_length < 0:
                max_length = self.length + max_length
            if self.is_initialized and 0 <= max_length < self.length:
                self.length = max_length
                self.seq_lens.fill_(max_length)

        def reset(self) -> None:
            if self.is_initialized:
                self.k_pool.zero_()
                self.v_pool.zero_()
                self.seq_lens.zero_()
            self.length = 0

        def reorder_cache(self, beam_idx: Tensor) -> None:
            raise NotImplementedError("PagedCache does not support beam search (reorder_cache)")

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("PagedCache does not support batch_repeat_interleave")

        def batch_select_indices(self, indices: Tensor) -> None:
            raise NotImplementedError("PagedCache does not support batch_select_indices")

    return PagedLayer


_PAGED_LAYER: List[Any] = []


def PagedCache(config: Any = None, *, max_cache_len: int, page_size: int = 16, num_layers: Optional[int] = None):
    """A transformers ``Cache`` whose layers keep K/V in pages, so that decode runs our paged kernel.

    ``model.generate(..., past_key_values=PagedCache(model.config, max_cache_len=...))``: prompt
    and generated tokens together must fit ``max_cache_len``. Decode steps (<= 16 new tokens,
    no padding) then go through ``attention_proto::paged_decode``; prefill and padded batches
    read the pages as a dense view (no copy). Works with the ``attention_proto`` implementation
    only (other implementations see the dense view and stay correct). No beam search.
    """
    if not _PAGED_LAYER:
        _PAGED_LAYER.append(_make_paged_layer_class())
    Cache, _ = _cache_classes()
    n = num_layers if num_layers is not None else getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"PagedCache needs the number of layers: a config with num_hidden_layers or num_layers=; "
                         f"got config={type(config).__name__}, num_layers={num_layers!r}")
    if not isinstance(max_cache_len, int) or max_cache_len < 1:
        raise ValueError(f"max_cache_len must be a positive int; got {max_cache_len!r}")
    if not isinstance(page_size, int) or page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two; got {page_size!r}")
    return Cache(layers=[_PAGED_LAYER[0](max_cache_len, page_size) for _ in range(n)])


# ---------------------------------------------------------------------------------------------
# the attention function
# ---------------------------------------------------------------------------------------------

def _find_packed(position_ids: Tensor) -> Optional[Tuple[Tensor, int]]:
    idx = torch.nonzero(torch_ops.sequence_starts(position_ids)[0]).flatten().to(torch.int32)
    if idx.numel() <= 1:
        return None
    cu = torch.cat([idx, torch.tensor([position_ids.shape[-1]], dtype=torch.int32, device=idx.device)])
    return cu, int((cu[1:] - cu[:-1]).max())


def _packed_cu_seqlens(position_ids: Tensor) -> Optional[Tuple[Tensor, int]]:
    """cu_seqlens and the longest length when a [1, N] position_ids holds several sequences (else None).

    Sequences restart their positions (:func:`torch_ops.sequence_starts`), as transformers'
    packed-sequence detection. One sync per distinct tensor (kept by :func:`...runtime.offsets.derived`:
    every layer of a forward gets the same position_ids).
    """
    return derived(position_ids, "packed_cu_seqlens", _find_packed)


def _key_starts(position_ids: Tensor) -> Tensor:
    """Each token's sequence start in a [B, N] position_ids (:func:`torch_ops.key_starts_from_positions`),
    computed once per tensor in eager mode (:func:`...runtime.offsets.derived`)."""
    return derived(position_ids, "key_starts", torch_ops.key_starts_from_positions)


def _window(sliding_window: Optional[int], causal: bool) -> Tuple[int, int]:
    if not sliding_window:
        return (-1, -1)
    w = int(sliding_window)
    return (w - 1, -1) if causal else (w, w)


def _kernel_reason(query: Tensor, key: Tensor, value: Tensor) -> Optional[str]:
    """Why our kernels cannot take these tensors here (None: they can)."""
    name, rejected, _ = choose("dense", query.device.type, query.dtype, query.shape[-1], value.shape[-1],
                               query.shape[1], key.shape[1], "bhsd", (),
                               torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)),
                               None, ("triton",))
    return None if name is not None else "; ".join(reasons_from(rejected, "triton"))


def _masks_2d(mask: Tensor, Nq: int, Nk: int) -> Tuple[Tensor, Tensor]:
    """(q_mask [B, Nq], k_mask [B, Nk]) from transformers' 2-D mask over past + new tokens."""
    m = mask.to(torch.bool)
    L = m.shape[1]
    q_mask = m[:, L - Nq:] if L >= Nq else torch.ones(m.shape[0], Nq, dtype=torch.bool, device=m.device)
    if L >= Nk:
        k_mask = m[:, L - Nk:]  # a sliding cache keeps the last Nk positions
    else:  # a static cache: slots past the mask are not filled yet
        k_mask = torch.cat([m, torch.zeros(m.shape[0], Nk - L, dtype=torch.bool, device=m.device)], 1)
    return q_mask, k_mask


def _eager(module, query, key, value, allowed: Optional[Tensor], float_mask: Optional[Tensor], scaling: float,
           softcap: Optional[float], dropout: float, s_aux: Optional[Tensor]) -> Tensor:
    """transformers' eager attention (fp32 softmax), for the calls our kernels do not take."""
    H, Hkv = query.shape[1], key.shape[1]
    k = key.repeat_interleave(H // Hkv, 1) if H != Hkv else key
    v = value.repeat_interleave(H // Hkv, 1) if H != Hkv else value
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    if softcap:
        w = softcap * torch.tanh(w / softcap)
    if float_mask is not None:
        w = w + float_mask[..., : k.shape[2]]
    if allowed is not None:
        w = w.masked_fill(~allowed, torch.finfo(w.dtype).min)
    if s_aux is not None:
        sink = s_aux.reshape(1, -1, 1, 1).expand(w.shape[0], -1, w.shape[2], 1).to(w.dtype)
        w = torch.cat([w, sink], -1)
    p = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    if s_aux is not None:
        p = p[..., :-1]
    p = torch.nn.functional.dropout(p, p=dropout, training=getattr(module, "training", False))
    return torch.matmul(p, v).transpose(1, 2).contiguous()


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs: Any) -> Tuple[Tensor, None]:
    """transformers attention function: query [B, H, Nq, D], key/value [B, Hkv, Nk, D] -> ([B, Nq, H, D], None)."""
    B, H, Nq, D = query.shape
    Nk = key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
    cap = float(softcap) if softcap else None
    win = _window(sliding_window, causal)
    paged: Optional[PagedState] = kwargs.get("attention_proto_paged")
    if paged is None and not torch.compiler.is_compiling():
        # transformers releases whose attention does not pass its kwargs to the cache (see PagedLayer.update)
        paged = getattr(key, _PAGED_ATTR, None)
    s_aux = kwargs.get("s_aux")
    if kwargs.get("output_attentions", False):
        _report("output_attentions=True is not supported (the attention weights are returned as None)")

    reason = None
    if s_aux is not None:
        reason = "attention sinks (s_aux)"
    elif dropout and getattr(module, "training", False):
        reason = f"attention dropout {dropout} in training"
    elif attention_mask is not None and attention_mask.dim() != 2:
        reason = f"a {attention_mask.dim()}-D attention mask (only 2-D padding masks map onto our kernels)"
    else:
        reason = _kernel_reason(query, key, value)
    if reason is not None:
        _report(reason)
        _count("fallback")
        allowed = float_mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            # a prepared mask already holds the causal/window pattern (as transformers' sdpa assumes)
            if attention_mask.dtype == torch.bool:
                allowed = attention_mask[..., :Nk]
            else:
                float_mask = attention_mask
        else:
            if attention_mask is not None:
                qm, km = _masks_2d(attention_mask, Nq, Nk)
            else:
                qm = torch.ones(B, Nq, dtype=torch.bool, device=query.device)
                km = torch.ones(B, Nk, dtype=torch.bool, device=query.device)
            allowed = torch_ops.padding_allowed(qm, km, causal, *win)
        return _eager(module, query, key, value, allowed, float_mask, scale, cap,
                      dropout if getattr(module, "training", False) else 0.0, s_aux), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    pos_ids = kwargs.get("position_ids")
    if (cu_q is None and attention_mask is None and B == 1 and Nq == Nk and Nq > 1 and pos_ids is not None
            and pos_ids.dim() == 2 and pos_ids.shape[-1] == Nq and _PACKED_POSITION_IDS[0]):
        if causal and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
            # restarting position_ids mark packed sequences: each row's first key, computed on the device
            # (memoized per tensor), bounds its keys inside the dense kernel -- no sync
            _count("dense")
            out = torch_ops.key_start_attention(query, key, value, _key_starts(pos_ids), scale=scale,
                                                window_left=win[0], softcap=cap)
            return out.transpose(1, 2), None
        if not torch.compiler.is_compiling():
            # training (the key-start kernel has no backward) or bidirectional: the varlen path, whose
            # lengths need one sync per forward (memoized per tensor)
            packed = _packed_cu_seqlens(pos_ids)
            if packed is not None:
                cu_q = cu_k = packed[0]
                kwargs["max_length_q"] = kwargs["max_length_k"] = packed[1]
    if cu_q is not None and cu_k is not None and B == 1:
        _count("varlen")
        mq = kwargs.get("max_length_q")
        mk = kwargs.get("max_length_k")
        if mq is None or mk is None:
            lens = torch.stack([(cu_q[1:] - cu_q[:-1]).max(), (cu_k[1:] - cu_k[:-1]).max()]).tolist()
            mq, mk = (mq if mq is not None else lens[0]), (mk if mk is not None else lens[1])
        out = torch_ops.varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                         cu_q.to(torch.int32), cu_k.to(torch.int32), int(mq), int(mk), causal=causal,
                                         scale=scale, window=win, softcap=cap)
        return out[None], None

    if attention_mask is None:  # the mask function returns None when nothing is padded
        if paged is not None and Nq <= 16 and causal and not (torch.is_grad_enabled() and query.requires_grad):
            _count("paged")
            out = torch_ops.paged_decode(query, paged.k_pool, paged.v_pool, paged.block_table, paged.seq_lens,
                                         scale=scale, softcap=cap, window=win, max_seq_len=paged.capacity)
            return out.transpose(1, 2), None
        _count("dense")
        out = torch_ops.flash_attention(query, key, value, causal=causal, scale=scale, window=win, softcap=cap)
        return out.transpose(1, 2), None
    _count("padded")
    q_mask, k_mask = _masks_2d(attention_mask, Nq, Nk)
    out = torch_ops.padded_attention(query, key, value, k_mask, q_mask, causal=causal, scale=scale, window=win,
                                     softcap=cap)
    return out.transpose(1, 2), None
