"""Public dense attention: :func:`attention` (BHSD/BSHD) and :func:`attention_varlen` (packed THD).

Both validate their inputs (typed errors naming the argument, what was received and what is
supported), then run the Triton forward -- through the autograd Function of
``ops/dense/autograd.py`` when gradients are needed, directly otherwise (the TMA kernel on Hopper
when it applies, the portable kernel elsewhere).

Empty inputs: B = 0 or Nq = 0 gives empty outputs (no launch); Nk = 0 gives output 0 and LSE
-inf on every row (there is no key to attend), like any fully masked row.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Tuple, Union

import torch

from ...runtime.device import interpreter_mode
from ...runtime.offsets import host_offsets
from ...runtime.validation import describe
from .forward import flash_attention_forward, normalize_window_arg, resolve_alibi
from .rope import RopeSpec

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LAYOUTS = ("bhsd", "bshd")

_KERNEL_DEVICE: list = []


def _kernel_device_type() -> str:
    if not _KERNEL_DEVICE:
        _KERNEL_DEVICE.append("cpu" if interpreter_mode() else "cuda")
    return _KERNEL_DEVICE[0]


def _is_jit_function(fn: Any) -> bool:
    from triton.runtime.jit import KernelInterface

    return isinstance(fn, KernelInterface)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

_Tensor = torch.Tensor


def _check_tensors(names: Sequence[str], tensors: Sequence[Any], rank: int, what: str) -> None:
    # hot path (every call): straight-line checks of the valid case; any failure re-checks in
    # order below to raise the precise error
    q, k, v = tensors
    if isinstance(q, _Tensor) and isinstance(k, _Tensor) and isinstance(v, _Tensor) \
            and q.dim() == rank and k.dim() == rank and v.dim() == rank:
        dt, dev = q.dtype, q.device
        if dt in SUPPORTED_DTYPES and k.dtype == dt and v.dtype == dt and k.device == dev and v.device == dev:
            kdev = _KERNEL_DEVICE[0] if _KERNEL_DEVICE else _kernel_device_type()
            if dev.type == kdev and not (kdev == "cpu" and dt == torch.bfloat16):
                return
    for n, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor; got {describe(t)}")
        if t.dim() != rank:
            raise ValueError(f"{n} must have {rank} dimensions ({what}); got {describe(t)}")
    dt = tensors[0].dtype
    for n, t in zip(names, tensors):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{n} has dtype {t.dtype}; supported: float16, bfloat16, float32 (got {describe(t)})")
    if any(t.dtype != dt for t in tensors):
        got = ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors))
        raise TypeError(f"q, k, v must share one dtype; got {got}")
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        got = ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors))
        raise ValueError(f"q, k, v must be on one device; got {got}")
    kdev = _kernel_device_type()
    if dev.type != kdev:
        raise ValueError(
            f"q is on {dev}; the kernels run on {kdev} here "
            f"({'no CUDA GPU: Triton interpreter on the CPU' if kdev == 'cpu' else 'CUDA GPU'}) (got {describe(tensors[0])})"
        )
    if dt == torch.bfloat16 and kdev == "cpu":
        raise TypeError(
            f"q has dtype bfloat16, which Triton's CPU interpreter cannot compute; use float16 or float32 "
            f"on the CPU, bfloat16 on a GPU (got {describe(tensors[0])})"
        )


def _check_heads_dims(B: Tuple[int, int, int], H: int, Hkv: Tuple[int, int], D: int, Dk: int, Dv: int,
                      q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, Nk: Optional[Tuple[int, int]]) -> None:
    if B is not None and not (B[0] == B[1] == B[2]):
        raise ValueError(f"q, k, v must share the batch size; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv[0] != Hkv[1]:
        raise ValueError(f"k and v must have the same number of heads; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Nk is not None and Nk[0] != Nk[1]:
        raise ValueError(f"k and v must have the same sequence length; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H <= 0 or Hkv[0] <= 0:
        raise ValueError(f"the number of heads must be positive; got H={H} (q {tuple(q.shape)}), Hkv={Hkv[0]} (k {tuple(k.shape)})")
    if H % Hkv[0]:
        raise ValueError(
            f"q heads ({H}) must be a multiple of k/v heads ({Hkv[0]}) for GQA/MQA; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in [1, {MAX_HEAD_DIM}]; got D={D} (q {tuple(q.shape)})")
    if Dk != D:
        raise ValueError(f"k head dim ({Dk}) must equal q head dim ({D}); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Dv != D:
        raise ValueError(
            f"v head dim ({Dv}) must equal q head dim ({D}) (Dv != D is not supported); got v {tuple(v.shape)}"
        )


_NO_WINDOW = (-1, -1)


def _check_modifiers(D: int, H: int, device: torch.device, causal, scale, window, softcap, alibi_slopes, rope,
                     score_mod, mask_mod, return_lse, deterministic) -> Tuple[int, int]:
    # hot path: plain attention (bools and None only)
    if window is None and scale is None and softcap is None and alibi_slopes is None and rope is None \
            and score_mod is None and mask_mod is None and (causal is True or causal is False) \
            and (return_lse is True or return_lse is False) and (deterministic is True or deterministic is False):
        return _NO_WINDOW
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {describe(causal)}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
            raise TypeError(f"scale must be None or a finite real number; got {describe(scale)}")
    if window is not None:
        ok = isinstance(window, int) and not isinstance(window, bool)
        if not ok and isinstance(window, (tuple, list)) and len(window) == 2:
            ok = all(w is None or (isinstance(w, int) and not isinstance(w, bool)) for w in window)
        if not ok:
            raise ValueError(
                f"window must be None, an int (left size) or a pair (left, right) of ints or None (-1/None = unbounded); "
                f"got {describe(window)}"
            )
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not (float(softcap) > 0 and math.isfinite(float(softcap))):
            raise ValueError(f"softcap must be None or a finite real number > 0; got {describe(softcap)}")
    if alibi_slopes is not None and alibi_slopes is not True and alibi_slopes is not False:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be None, True (standard slopes) or a float tensor [H]; got {describe(alibi_slopes)}")
        if not alibi_slopes.dtype.is_floating_point or tuple(alibi_slopes.shape) != (H,):
            raise ValueError(f"alibi_slopes must be a float tensor of shape [H] = [{H}]; got {describe(alibi_slopes)}")
        if alibi_slopes.device != device:
            raise ValueError(f"alibi_slopes must be on q's device {device}; got {describe(alibi_slopes)}")
    if rope is not None:
        if not isinstance(rope, RopeSpec):
            raise TypeError(f"rope must be None or a RopeSpec; got {describe(rope)}")
        if D % 2:
            raise ValueError(f"rope needs an even head dim; got D={D}")
        if rope.cos is not None and (rope.cos.dim() != 2 or rope.cos.shape[1] != D // 2):
            raise ValueError(f"rope cos/sin tables must be [max_pos, D/2] = [*, {D // 2}]; got {describe(rope.cos)}")
        if (rope.q_offset is not None and rope.q_offset < 0) or rope.k_offset < 0:
            raise ValueError(f"rope offsets must be >= 0; got q_offset={rope.q_offset}, k_offset={rope.k_offset}")
    for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if fn is not None and not _is_jit_function(fn):
            raise TypeError(f"{name} must be None or a @triton.jit function; got {describe(fn)}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool; got {describe(return_lse)}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool; got {describe(deterministic)}")
    return normalize_window_arg(window)


def _needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _autograd_fn(score_mod, mask_mod):
    if score_mod is not None or mask_mod is not None:
        raise NotImplementedError(
            "score_mod/mask_mod have no backward: call attention() under torch.no_grad() or on tensors "
            "that do not require grad"
        )
    try:
        from .autograd import DenseAttentionFn
    except ImportError as e:  # the backward lives in ops/dense/autograd.py (another module)
        raise NotImplementedError(
            f"gradients need the dense backward (attention_proto.ops.dense.autograd.DenseAttentionFn), "
            f"which could not be imported: {e}"
        ) from e
    return DenseAttentionFn


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------

def _forward(q, k, v, D: int, H: int, *, causal, scale, win, softcap, alibi_slopes, rope, score_mod, mask_mod,
             return_lse, deterministic, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """The validated call: through the autograd Function when a gradient is needed, else the forward alone."""
    if _needs_grad(q, k, v):
        fn = _autograd_fn(score_mod, mask_mod)
        sm_scale = (1.0 / math.sqrt(D)) if scale is None else float(scale)
        slopes = resolve_alibi(alibi_slopes, H, q.device)
        return fn.apply(q, k, v, causal, sm_scale, win, softcap, slopes, rope,
                        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic)
    return flash_attention_forward(
        q, k, v, causal=causal, scale=scale, window=win, softcap=softcap, alibi_slopes=alibi_slopes,
        rope=rope, score_mod=score_mod, mask_mod=mask_mod, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, return_lse=return_lse,
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Union[None, int, Tuple[Optional[int], Optional[int]]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Union[None, bool, torch.Tensor] = None,
    rope: Optional[RopeSpec] = None,
    layout: str = "bhsd",
    return_lse: bool = False,
    deterministic: bool = True,
    score_mod: Any = None,
    mask_mod: Any = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Dense softmax attention (FlashAttention forward in Triton; backward via autograd).

    Shapes (``layout="bhsd"``): q [B, H, Nq, D], k/v [B, Hkv, Nk, D] -> out [B, H, Nq, D].
    ``layout="bshd"``: q [B, Nq, H, D], k/v [B, Nk, Hkv, D] -> out [B, Nq, H, D] (no copies).
    Any strides; dtypes float16/bfloat16/float32 (bfloat16 only on a GPU); D <= 256; H % Hkv == 0
    (query head h uses KV head h // (H // Hkv)).

    Modifiers (reference semantics, :mod:`.reference`): ``causal`` and ``window`` (an int = left
    size, or (left, right) with -1/None unbounded) are aligned bottom-right (query i sits at key
    position i + Nk - Nq); ``scale`` defaults to 1/sqrt(D); ``softcap`` c > 0 gives
    c * tanh(s / c); ``alibi_slopes`` True (standard slopes) or a float tensor [H]; ``rope`` a
    :class:`RopeSpec` applied to q and k inside the kernel. ``score_mod``/``mask_mod``:
    ``@triton.jit`` hooks (see :mod:`.forward`; forward only).

    ``return_lse``: also return lse [B, H, Nq] fp32 (natural log; -inf on fully masked rows,
    whose output is 0). ``deterministic`` (default True): the backward's bitwise-reproducible mode (separate dQ and dK/dV
    kernels), measured faster than the fp32-atomic mode (``False``) on the H100 (finding flash-determinism-price).
    Nq = 0 or B = 0 gives empty outputs; Nk = 0 gives zeros and LSE -inf.
    """
    _check_tensors(("q", "k", "v"), (q, k, v), 4, "[B, H, N, D] or [B, N, H, D]")
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    elif layout != "bhsd":
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}; got {layout!r}")
    qs, ks, vs = q.shape, k.shape, v.shape
    _check_heads_dims((qs[0], ks[0], vs[0]), qs[1], (ks[1], vs[1]), qs[3], ks[3], vs[3], q, k, v, (ks[2], vs[2]))
    win = _check_modifiers(qs[3], qs[1], q.device, causal, scale, window, softcap, alibi_slopes, rope,
                           score_mod, mask_mod, return_lse, deterministic)
    out, lse = _forward(q, k, v, qs[3], qs[1], causal=causal, scale=scale, win=win, softcap=softcap,
                        alibi_slopes=alibi_slopes, rope=rope, score_mod=score_mod, mask_mod=mask_mod,
                        return_lse=return_lse, deterministic=deterministic)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def _check_cu_seqlens(name: str, cu: Any, total: int, device: torch.device, total_name: str) -> list:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor [B + 1]; got {describe(cu)}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32; got {describe(cu)}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of length B + 1 >= 1; got {describe(cu)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}; got {describe(cu)}")
    # the checks below need the values: one host sync per offsets tensor (layers sharing it reuse the copy)
    vals, _ = host_offsets(cu)
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0; got {name}[0] = {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must be non-decreasing; got {vals if len(vals) <= 16 else str(vals[:16]) + '...'}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of tokens of {total_name} ({total}); got {vals[-1]}")
    return vals


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Union[None, int, Tuple[Optional[int], Optional[int]]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Union[None, bool, torch.Tensor] = None,
    rope: Optional[RopeSpec] = None,
    return_lse: bool = False,
    deterministic: bool = True,
    score_mod: Any = None,
    mask_mod: Any = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Packed variable-length attention: B sequences concatenated along the token axis.

    Shapes: q [Tq, H, D], k/v [Tk, Hkv, D]; ``cu_seqlens_q``/``cu_seqlens_k`` int32 [B + 1]
    (start offsets, 0 first, non-decreasing, last = Tq / Tk); out [Tq, H, D]; lse [H, Tq].
    Each sequence b is attention over its own q[cu_q[b]:cu_q[b+1]] and k/v[cu_k[b]:cu_k[b+1]]
    with its own bottom-right causal/window alignment; RoPE positions restart per sequence
    (q positions default to Nk_b - Nq_b + i). ``max_seqlen_*`` (an upper bound of the lengths)
    default to the true maxima. Validation reads cu_seqlens on the host (one sync each).
    Other arguments as in :func:`attention`; empty sequences are allowed.
    """
    _check_tensors(("q", "k", "v"), (q, k, v), 3, "[T, H, D]")
    qs, ks, vs = q.shape, k.shape, v.shape
    if ks[0] != vs[0]:
        raise ValueError(f"k and v must have the same number of tokens; got k {tuple(ks)}, v {tuple(vs)}")
    _check_heads_dims(None, qs[1], (ks[1], vs[1]), qs[2], ks[2], vs[2], q, k, v, None)
    win = _check_modifiers(qs[2], qs[1], q.device, causal, scale, window, softcap, alibi_slopes, rope,
                           score_mod, mask_mod, return_lse, deterministic)
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, qs[0], q.device, "q")
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, ks[0], q.device, "k")
    if len(cq) != len(ck):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length B + 1; got {len(cq)} and {len(ck)}"
        )
    true_q = max((b - a for a, b in zip(cq, cq[1:])), default=0)
    true_k = max((b - a for a, b in zip(ck, ck[1:])), default=0)
    for name, given, true in (("max_seqlen_q", max_seqlen_q, true_q), ("max_seqlen_k", max_seqlen_k, true_k)):
        if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < true):
            raise ValueError(f"{name} must be None or an int >= the longest sequence ({true}); got {describe(given)}")
    if rope is not None and rope.cos is not None:
        q_need = (true_k if rope.q_offset is None else rope.q_offset + true_q)
        need = max(q_need, rope.k_offset + true_k)
        if need > rope.cos.shape[0]:
            raise ValueError(f"rope cos/sin tables have {rope.cos.shape[0]} positions; positions up to {need - 1} are needed")
    mq = true_q if max_seqlen_q is None else max_seqlen_q
    mk = true_k if max_seqlen_k is None else max_seqlen_k
    out, lse = _forward(q, k, v, qs[2], qs[1], causal=causal, scale=scale, win=win, softcap=softcap,
                        alibi_slopes=alibi_slopes, rope=rope, score_mod=score_mod, mask_mod=mask_mod,
                        return_lse=return_lse, deterministic=deterministic, cu_seqlens_q=cu_seqlens_q,
                        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=mq, max_seqlen_k=mk)
    return (out, lse) if return_lse else out
