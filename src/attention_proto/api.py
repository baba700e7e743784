"""The typed front door: ``Attention[Q, K, V]``, its implementations, and the dispatching functions.

Tensor kinds (what an attention object takes):

- :class:`DenseTensor` -- a [B, H, N, D] (``layout="bhsd"``) or [B, N, H, D] (``"bshd"``) tensor;
- :class:`PackedTensor` -- variable-length sequences packed on the token axis, [T, H, D] with
  ``cu_seqlens`` (int32 [B + 1]) and ``max_seqlen``;
- :class:`PagedKV` -- a paged KV pool [num_pages, page_size, Hkv, D] with its ``block_table`` and
  ``seq_lens``.

:class:`Attention` is a ``typing.Protocol`` generic over the three kinds; the implementations
(:class:`DenseAttention`, :class:`VarlenAttention`, :class:`PagedDecodeAttention`,
:class:`LinearAttention`) are thin objects that hold the modifiers, validate the inputs, ask the
backend registry (:mod:`attention_proto.dispatch`) which implementation runs the call, and run it.
Raw tensors are accepted wherever a kind is expected. :func:`attention` / :func:`attention_varlen`
are the same as functions, and :func:`explain` says which backend a call would use and why the
others were rejected -- without running anything.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Generic, Optional, Protocol, Tuple, TypeVar, Union, runtime_checkable

import torch

from . import dispatch
from .dispatch import Decision, Request
from .runtime.validation import describe

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# tensor kinds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseTensor:
    """A dense attention operand: [B, H, N, D] (``bhsd``) or [B, N, H, D] (``bshd``)."""

    data: Tensor
    layout: str = "bhsd"

    def __post_init__(self) -> None:
        if not isinstance(self.data, torch.Tensor):
            raise TypeError(f"DenseTensor.data must be a torch.Tensor; got {describe(self.data)}")
        if self.layout not in ("bhsd", "bshd"):
            raise ValueError(f"DenseTensor.layout must be 'bhsd' or 'bshd'; got {self.layout!r}")
        if self.data.dim() != 4:
            raise ValueError(f"DenseTensor.data must have 4 dimensions ([B, H, N, D] or [B, N, H, D]); "
                             f"got {describe(self.data)}")

    def bhsd(self) -> Tensor:
        return self.data if self.layout == "bhsd" else self.data.transpose(1, 2)


@dataclass(frozen=True)
class PackedTensor:
    """Packed variable-length sequences: data [T, H, D], cu_seqlens int32 [B + 1], max_seqlen (host int)."""

    data: Tensor
    cu_seqlens: Tensor
    max_seqlen: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.data, torch.Tensor) or self.data.dim() != 3:
            raise ValueError(f"PackedTensor.data must be a [T, H, D] tensor; got {describe(self.data)}")
        if not isinstance(self.cu_seqlens, torch.Tensor) or self.cu_seqlens.dim() != 1:
            raise ValueError(f"PackedTensor.cu_seqlens must be a 1-D int32 tensor [B + 1]; got {describe(self.cu_seqlens)}")
        if self.cu_seqlens.dtype != torch.int32:
            raise TypeError(f"PackedTensor.cu_seqlens must have dtype int32; got {describe(self.cu_seqlens)}")

    @staticmethod
    def from_padded(x: Tensor, mask: Tensor) -> "PackedTensor":
        """Pack a [B, N, H, D] tensor with a [B, N] boolean mask (True = a real token)."""
        lens = mask.sum(1, dtype=torch.int32)
        cu = torch.cat([lens.new_zeros(1), lens.cumsum(0, dtype=torch.int32)])
        return PackedTensor(x[mask.to(torch.bool)], cu, int(lens.max()) if lens.numel() else 0)


@dataclass(frozen=True)
class PagedKV:
    """A paged K or V pool [num_pages, page_size, Hkv, D] with block_table [B, max_pages] and seq_lens [B]."""

    cache: Tensor
    block_table: Tensor
    seq_lens: Tensor
    max_seq_len: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.cache, torch.Tensor) or self.cache.dim() != 4:
            raise ValueError(f"PagedKV.cache must be [num_pages, page_size, Hkv, D]; got {describe(self.cache)}")


Q = TypeVar("Q", contravariant=True)
K = TypeVar("K", contravariant=True)
V = TypeVar("V", contravariant=True)


@runtime_checkable
class Attention(Protocol[Q, K, V]):
    """Anything that computes attention of queries ``Q`` over keys ``K`` and values ``V``."""

    def __call__(self, q: Q, k: K, v: V) -> Any: ...

    def explain(self, q: Q, k: K, v: V) -> Decision: ...


# ---------------------------------------------------------------------------------------------
# parameters and requests
# ---------------------------------------------------------------------------------------------


@dataclass
class Params:
    """Normalised call parameters handed to a backend's runner."""

    causal: bool = False
    scale: Optional[float] = None
    window: Tuple[int, int] = (-1, -1)
    softcap: Optional[float] = None
    alibi_slopes: Any = None
    rope: Any = None
    return_lse: bool = False
    deterministic: bool = True
    score_mod: Any = None
    mask_mod: Any = None
    key_padding_mask: Optional[Tensor] = None
    attn_mask: Optional[Tensor] = None
    dropout_p: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)

    def modifiers(self) -> frozenset:
        m = set()
        if self.causal:
            m.add("causal")
        if self.window != (-1, -1):
            m.add("window")
        if self.softcap:
            m.add("softcap")
        if self.alibi_slopes is not None and self.alibi_slopes is not False:
            m.add("alibi")
        if self.rope is not None:
            m.add("rope")
        if self.score_mod is not None:
            m.add("score_mod")
        if self.mask_mod is not None:
            m.add("mask_mod")
        if self.key_padding_mask is not None:
            m.add("key_padding")
        if self.attn_mask is not None:
            m.add("bool_mask" if self.attn_mask.dtype == torch.bool else "float_mask")
        if self.dropout_p:
            m.add("dropout")
        if self.return_lse:
            m.add("lse")
        return frozenset(m)


def _params(causal=False, scale=None, window=None, softcap=None, alibi_slopes=None, rope=None, return_lse=False,
            deterministic=True, score_mod=None, mask_mod=None, key_padding_mask=None, H: Optional[int] = None,
            device: Optional[torch.device] = None) -> Params:
    from .ops.dense.forward import normalize_window_arg

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {describe(causal)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(float(scale))):
        raise TypeError(f"scale must be None or a finite real number; got {describe(scale)}")
    try:
        win = normalize_window_arg(window)
    except (TypeError, ValueError) as e:
        raise ValueError(f"window must be None, an int (left size) or a (left, right) pair of ints or None; "
                         f"got {describe(window)}") from e
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
                                or not (float(softcap) > 0 and math.isfinite(float(softcap)))):
        raise ValueError(f"softcap must be None or a finite real number > 0; got {describe(softcap)}")
    if isinstance(alibi_slopes, torch.Tensor):
        if not alibi_slopes.dtype.is_floating_point or (H is not None and tuple(alibi_slopes.shape) != (H,)):
            raise ValueError(f"alibi_slopes must be a float tensor of shape [H] = [{H}]; got {describe(alibi_slopes)}")
    elif alibi_slopes not in (None, True, False):
        raise TypeError(f"alibi_slopes must be None, True (standard slopes) or a float tensor [H]; "
                        f"got {describe(alibi_slopes)}")
    if rope is not None:
        from .ops.dense.rope import RopeSpec

        if not isinstance(rope, RopeSpec):
            raise TypeError(f"rope must be None or a RopeSpec; got {describe(rope)}")
    for name, val in (("return_lse", return_lse), ("deterministic", deterministic)):
        if not isinstance(val, bool):
            raise TypeError(f"{name} must be a bool; got {describe(val)}")
    if key_padding_mask is not None and not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be None or a bool tensor [B, Nk]; got {describe(key_padding_mask)}")
    return Params(causal=causal, scale=None if scale is None else float(scale), window=win,
                  softcap=None if softcap is None else float(softcap),
                  alibi_slopes=alibi_slopes if alibi_slopes is not False else None, rope=rope, return_lse=return_lse,
                  deterministic=deterministic, score_mod=score_mod, mask_mod=mask_mod,
                  key_padding_mask=key_padding_mask)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, rank: int, what: str) -> None:
    for n, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor; got {describe(t)}")
        if t.dim() != rank:
            raise ValueError(f"{n} must have {rank} dimensions ({what}); got {describe(t)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{n} must be a floating-point tensor; got {describe(t)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype; got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got q on {q.device}, k on {k.device}, v on {v.device}")


def _needs_grad(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def dense_request(q: Tensor, k: Tensor, v: Tensor, p: Params, layout: str = "bhsd") -> Dict[str, Any]:
    """Validate dense operands (BHSD views) and describe the call (the fields of a dispatch Request)."""
    _check_qkv(q, k, v, 4, "[B, H, N, D] or [B, N, H, D]")
    B, H, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if not (B == Bk == v.shape[0]):
        raise ValueError(f"q, k, v must share the batch size; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if v.shape[1] != Hkv or v.shape[2] != Nk:
        raise ValueError(f"k and v must have the same heads and length; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Dk != D:
        raise ValueError(f"k head dim ({Dk}) must equal q head dim ({D}); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if H < 1 or Hkv < 1 or H % Hkv:
        raise ValueError(f"q heads ({H}) must be a positive multiple of k/v heads ({Hkv}) for GQA/MQA; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    kpm = p.key_padding_mask
    if kpm is not None and (kpm.dim() != 2 or tuple(kpm.shape) != (B, Nk)):
        raise ValueError(f"key_padding_mask must be [B, Nk] = [{B}, {Nk}]; got {describe(kpm)}")
    if kpm is not None and (p.causal or p.window != (-1, -1)) and Nq > Nk:
        raise ValueError(f"with key_padding_mask and a causal/window mask the queries must be the last Nq of the "
                         f"Nk key positions; got Nq={Nq} > Nk={Nk}")
    return dict(kind="dense", device_type=q.device.type, dtype=q.dtype, head_dim=D, head_dim_v=v.shape[-1],
                num_heads=H, num_kv_heads=Hkv, layout=layout, modifiers=tuple(sorted(p.modifiers())),
                needs_grad=_needs_grad(q, k, v))


def _explain(fields: Dict[str, Any], prefer: Any) -> Decision:
    return dispatch.explain_request(Request(**fields), prefer=prefer)


def _runner(fields: Dict[str, Any], prefer: Any):
    """The chosen backend's runner, through dispatch.choose (traceable: torch.compile keeps no lock or cache)."""
    if prefer is None or prefer == "auto":
        pref = None
    else:
        pref = (prefer,) if isinstance(prefer, str) else tuple(prefer)
    name, _, text = dispatch.choose(prefer=pref, **fields)
    if name is None:
        raise dispatch.NoBackendError(text)
    return dispatch.get_backend(name).runner(fields["kind"])


# ---------------------------------------------------------------------------------------------
# implementations of the protocol
# ---------------------------------------------------------------------------------------------


def _dense(x: Union[DenseTensor, Tensor], layout: str, name: str) -> Tensor:
    if isinstance(x, DenseTensor):
        return x.bhsd()
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a DenseTensor or a torch.Tensor; got {describe(x)}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions ([B, H, N, D] or [B, N, H, D]); got {describe(x)}")
    return x if layout == "bhsd" else x.transpose(1, 2)


class DenseAttention(Generic[Q, K, V]):
    """Dense softmax attention with fixed modifiers: ``DenseAttention(causal=True)(q, k, v)``.

    Shapes: q [B, H, Nq, D], k/v [B, Hkv, Nk, Dv] (``layout="bhsd"``, or [B, N, H, D] with
    ``"bshd"``, or :class:`DenseTensor`); out like q with Dv. Modifiers as
    :func:`attention_proto.ops.dense.interface.attention`; ``key_padding_mask`` [B, Nk] bool
    (True = a real key; under causal/window the real queries are the mask's last Nq columns and
    padded query rows give 0). ``backend``: "auto" (first fit: triton, sdpa), a backend name, or
    a list of names in order of preference.
    """

    def __init__(self, *, causal: bool = False, scale: Optional[float] = None, window: Any = None,
                 softcap: Optional[float] = None, alibi_slopes: Any = None, rope: Any = None,
                 layout: str = "bhsd", return_lse: bool = False, deterministic: bool = True,
                 score_mod: Any = None, mask_mod: Any = None, backend: Any = "auto") -> None:
        if layout not in ("bhsd", "bshd"):
            raise ValueError(f"layout must be 'bhsd' or 'bshd'; got {layout!r}")
        self.layout, self.backend = layout, backend
        self.kw = dict(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                       rope=rope, return_lse=return_lse, deterministic=deterministic, score_mod=score_mod,
                       mask_mod=mask_mod)
        _params(**self.kw)  # validate early

    def _prepare(self, q, k, v, key_padding_mask):
        qq, kk, vv = _dense(q, self.layout, "q"), _dense(k, self.layout, "k"), _dense(v, self.layout, "v")
        p = _params(**self.kw, key_padding_mask=key_padding_mask, H=qq.shape[1] if qq.dim() == 4 else 1)
        req = dense_request(qq, kk, vv, p, self.layout)
        return qq, kk, vv, p, req

    def explain(self, q, k, v, key_padding_mask: Optional[Tensor] = None) -> Decision:
        *_, req = self._prepare(q, k, v, key_padding_mask)
        return _explain(req, self.backend)

    def __call__(self, q, k, v, key_padding_mask: Optional[Tensor] = None):
        qq, kk, vv, p, req = self._prepare(q, k, v, key_padding_mask)
        res = _runner(req, self.backend)(qq, kk, vv, p)
        if self.layout == "bshd":
            if isinstance(res, tuple):
                return res[0].transpose(1, 2), res[1]
            return res.transpose(1, 2)
        return res


def _packed(x: Union[PackedTensor, Tuple], name: str) -> PackedTensor:
    if isinstance(x, PackedTensor):
        return x
    raise TypeError(f"{name} must be a PackedTensor (data [T, H, D], cu_seqlens, max_seqlen); got {describe(x)}")


class VarlenAttention(Generic[Q, K, V]):
    """Attention over packed variable-length sequences: ``VarlenAttention(causal=True)(q, k, v)``.

    q, k, v are :class:`PackedTensor` (k and v share cu_seqlens); out [Tq, H, D]. Each sequence
    attends only to itself, with its own bottom-right causal/window alignment.
    """

    def __init__(self, *, causal: bool = False, scale: Optional[float] = None, window: Any = None,
                 softcap: Optional[float] = None, alibi_slopes: Any = None, rope: Any = None,
                 return_lse: bool = False, deterministic: bool = True, score_mod: Any = None,
                 mask_mod: Any = None, backend: Any = "auto") -> None:
        self.backend = backend
        self.kw = dict(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                       rope=rope, return_lse=return_lse, deterministic=deterministic, score_mod=score_mod,
                       mask_mod=mask_mod)
        _params(**self.kw)

    def _prepare(self, q, k, v):
        q, k, v = _packed(q, "q"), _packed(k, "k"), _packed(v, "v")
        _check_qkv(q.data, k.data, v.data, 3, "[T, H, D]")
        if k.data.shape[0] != v.data.shape[0] or k.data.shape[1] != v.data.shape[1]:
            raise ValueError(f"k and v must have the same tokens and heads; got k {tuple(k.data.shape)}, "
                             f"v {tuple(v.data.shape)}")
        if q.cu_seqlens.shape[0] != k.cu_seqlens.shape[0]:
            raise ValueError(f"q and k must hold the same number of sequences; got cu_seqlens of lengths "
                             f"{q.cu_seqlens.shape[0]} and {k.cu_seqlens.shape[0]}")
        if not torch.compiler.is_compiling():
            # the same checks as ops.dense.interface.attention_varlen (one host sync each); a traced
            # graph cannot sync, so under torch.compile the eager call is where they run
            from .ops.dense.interface import _check_cu_seqlens

            _check_cu_seqlens("cu_seqlens_q", q.cu_seqlens, q.data.shape[0], q.data.device, "q")
            _check_cu_seqlens("cu_seqlens_k", k.cu_seqlens, k.data.shape[0], q.data.device, "k")
        H, Hkv = q.data.shape[1], k.data.shape[1]
        if H % Hkv or q.data.shape[2] != k.data.shape[2]:
            raise ValueError(f"q heads must be a multiple of k heads and q/k head dims must match; got "
                             f"q {tuple(q.data.shape)}, k {tuple(k.data.shape)}")
        p = _params(**self.kw, H=H)
        req = dict(kind="varlen", device_type=q.data.device.type, dtype=q.data.dtype, head_dim=q.data.shape[2],
                   head_dim_v=v.data.shape[2], num_heads=H, num_kv_heads=Hkv, layout="thd",
                   modifiers=tuple(sorted(p.modifiers())), needs_grad=_needs_grad(q.data, k.data, v.data))
        return q, k, v, p, req

    def explain(self, q, k, v) -> Decision:
        *_, req = self._prepare(q, k, v)
        return _explain(req, self.backend)

    def __call__(self, q, k, v):
        q, k, v, p, req = self._prepare(q, k, v)
        run = _runner(req, self.backend)
        mq, mk = q.max_seqlen, k.max_seqlen
        if mq is None or mk is None:  # one host sync for both
            lq = q.cu_seqlens[1:] - q.cu_seqlens[:-1]
            lk = k.cu_seqlens[1:] - k.cu_seqlens[:-1]
            mq_, mk_ = (int(x) for x in torch.stack([lq.max(), lk.max()]).tolist()) if lq.numel() else (0, 0)
            mq, mk = mq if mq is not None else mq_, mk if mk is not None else mk_
        return run(q.data, k.data, v.data, p, q.cu_seqlens, k.cu_seqlens, mq, mk)


class PagedDecodeAttention(Generic[Q, K, V]):
    """Decode attention over a paged KV cache: ``PagedDecodeAttention()(q, PagedKV(k, bt, lens), PagedKV(v, bt, lens))``.

    q [B, Hq, Nq <= 16, D] (the last Nq tokens of each sequence, causal). ``check_inputs=False``
    runs through the ``attention_proto::paged_decode`` custom op with no host sync (CUDA graphs).
    """

    def __init__(self, *, scale: Optional[float] = None, softcap: Optional[float] = None, alibi_slopes: Any = None,
                 window: Any = None, return_lse: bool = False, check_inputs: bool = True,
                 backend: Any = "auto") -> None:
        self.backend, self.check_inputs = backend, check_inputs
        self.kw = dict(scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, window=window, return_lse=return_lse)
        _params(**self.kw)

    def _prepare(self, q, k, v):
        q = _dense(q, "bhsd", "q")
        for n, x in (("k", k), ("v", v)):
            if not isinstance(x, PagedKV):
                raise TypeError(f"{n} must be a PagedKV (cache, block_table, seq_lens); got {describe(x)}")
        p = _params(**self.kw, H=q.shape[1])
        if p.return_lse and not self.check_inputs:
            raise ValueError("return_lse needs check_inputs=True (the custom op returns the output only)")
        mods = set(p.modifiers())  # decode is causal by construction: not a requested modifier
        req = dict(kind="paged", device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1],
                   head_dim_v=v.cache.shape[-1], num_heads=q.shape[1], num_kv_heads=k.cache.shape[2],
                   layout="paged", modifiers=tuple(sorted(mods)), needs_grad=_needs_grad(q, k.cache, v.cache),
                   q_len=q.shape[2])
        return q, k, v, p, req

    def explain(self, q, k, v) -> Decision:
        *_, req = self._prepare(q, k, v)
        return _explain(req, self.backend)

    def __call__(self, q, k, v):
        q, k, v, p, req = self._prepare(q, k, v)
        return _runner(req, self.backend)(q, k, v, p, self.check_inputs)


class LinearAttention(Generic[Q, K, V]):
    """Chunked linear attention (:func:`attention_proto.ops.linear.interface.linear_attention`).

    Keyword arguments are passed through (``g``, ``scale``, ``initial_state``, ``layout``, ...).
    """

    def __init__(self, backend: Any = "auto", **kwargs: Any) -> None:
        self.backend, self.kwargs = backend, kwargs

    def _request(self, q, k, v) -> Dict[str, Any]:
        q, k, v = (x.data if isinstance(x, DenseTensor) else x for x in (q, k, v))
        _check_qkv(q, k, v, 4, "[B, N, H, K] (bshd) or [B, H, N, K] (bhsd)")
        layout = self.kwargs.get("layout", "bshd")
        h_dim = 2 if layout == "bshd" else 1
        mods = set()
        if self.kwargs.get("g") is not None:
            mods.add("gate")
        if self.kwargs.get("initial_state") is not None:
            mods.add("initial_state")
        return dict(kind="linear", device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1],
                    head_dim_v=v.shape[-1], num_heads=q.shape[h_dim], num_kv_heads=k.shape[h_dim],
                    layout=layout, modifiers=tuple(sorted(mods)), needs_grad=_needs_grad(q, k, v))

    def explain(self, q, k, v) -> Decision:
        return _explain(self._request(q, k, v), self.backend)

    def __call__(self, q, k, v):
        run = _runner(self._request(q, k, v), self.backend)
        q, k, v = (x.data if isinstance(x, DenseTensor) else x for x in (q, k, v))
        return run(q, k, v, **self.kwargs)


# ---------------------------------------------------------------------------------------------
# functions
# ---------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None,
              window: Any = None, softcap: Optional[float] = None, alibi_slopes: Any = None, rope: Any = None,
              layout: str = "bhsd", return_lse: bool = False, deterministic: bool = True, score_mod: Any = None,
              mask_mod: Any = None, key_padding_mask: Optional[Tensor] = None, backend: Any = "auto"):
    """Dense attention through the backend registry (ours first, PyTorch SDPA where ours cannot).

    Shapes: q [B, H, Nq, D], k/v [B, Hkv, Nk, Dv] (``layout="bhsd"``; ``"bshd"`` takes and returns
    [B, N, H, D]); out [B, H, Nq, Dv]. ``key_padding_mask`` [B, Nk] bool, True = a real key (see
    :class:`DenseAttention`). Other modifiers as :func:`attention_proto.ops.dense.interface.attention`.
    ``backend``: "auto", a name ("triton", "sdpa", "reference") or a list of names in order;
    :func:`explain` shows the decision. Gradients flow through the custom ops of
    :mod:`attention_proto.integrations.torch_ops` (torch.compile traces them without a graph break).
    """
    return DenseAttention(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                          rope=rope, layout=layout, return_lse=return_lse, deterministic=deterministic,
                          score_mod=score_mod, mask_mod=mask_mod, backend=backend)(q, k, v, key_padding_mask)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, *,
                     backend: Any = "auto", **modifiers: Any):
    """Packed variable-length attention through the registry: q [Tq, H, D], k/v [Tk, Hkv, D] -> [Tq, H, D]."""
    return VarlenAttention(backend=backend, **modifiers)(
        PackedTensor(q, cu_seqlens_q, max_seqlen_q), PackedTensor(k, cu_seqlens_k, max_seqlen_k),
        PackedTensor(v, cu_seqlens_k, max_seqlen_k))


def explain(q: Any, k: Any, v: Any, *, kind: Optional[str] = None, backend: Any = "auto", **kwargs: Any) -> Decision:
    """Which backend a call with these arguments would use, and why each other one was rejected.

    ``kind`` defaults from the operands: PagedKV -> "paged", PackedTensor -> "varlen", else "dense"
    (``kind="linear"`` for linear attention). Keyword arguments are those of the matching call
    (:func:`attention`, :class:`VarlenAttention`, :class:`PagedDecodeAttention`). Nothing runs;
    the returned :class:`~attention_proto.dispatch.Decision` prints as a short report and has
    ``as_dict()``.
    """
    if kind is None:
        kind = "paged" if isinstance(k, PagedKV) else "varlen" if isinstance(q, PackedTensor) else "dense"
    if kind == "dense":
        kpm = kwargs.pop("key_padding_mask", None)
        return DenseAttention(backend=backend, **kwargs).explain(q, k, v, key_padding_mask=kpm)
    if kind == "varlen":
        return VarlenAttention(backend=backend, **kwargs).explain(q, k, v)
    if kind == "paged":
        return PagedDecodeAttention(backend=backend, **kwargs).explain(q, k, v)
    if kind == "linear":
        return LinearAttention(backend=backend, **kwargs).explain(q, k, v)
    raise ValueError(f"kind must be one of {dispatch.KINDS}; got {kind!r}")


__all__ = ["Attention", "DenseTensor", "PackedTensor", "PagedKV", "DenseAttention", "VarlenAttention",
           "PagedDecodeAttention", "LinearAttention", "attention", "attention_varlen", "explain", "Params"]
