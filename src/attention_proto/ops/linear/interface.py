"""Public linear attention: :func:`linear_attention` (chunked or recurrent, trains) and
:func:`linear_attention_step` (one decode step).

Semantics: :mod:`attention_proto.ops.linear.reference`. Inputs are validated first
(typed errors naming the argument, what was received and what is supported, as the
dense :func:`attention_proto.ops.dense.interface.attention`); then the kernels run
through the autograd Function when a gradient is needed, directly otherwise.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Tuple

import torch

from ...runtime.device import interpreter_mode
from ...runtime.offsets import host_offsets
from ...runtime.validation import describe
from .autograd import LinearAttentionFunction, linear_forward
from .common import SeqInfo
from .fused_recurrent import fused_recurrent_forward

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
CHUNK_SIZES = (32, 64, 128)
MODES = ("chunk", "recurrent")
LAYOUTS = ("bshd", "bhsd")


# ---- validation ----------------------------------------------------------------------------------

def _kernel_device_type() -> str:
    return "cpu" if interpreter_mode() else "cuda"


def _check_qkv(q, k, v, rank: int, what: str) -> None:
    for n, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor; got {describe(t)}")
        if t.dim() != rank:
            raise ValueError(f"{n} must have {rank} dimensions ({what}); got {describe(t)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{n} has dtype {t.dtype}; supported: float16, bfloat16, float32 (got {describe(t)})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype; got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got q on {q.device}, k on {k.device}, v on {v.device}")
    kdev = _kernel_device_type()
    if q.device.type != kdev:
        raise ValueError(
            f"q is on {q.device}; the kernels run on {kdev} here "
            f"({'no CUDA GPU: Triton interpreter on the CPU' if kdev == 'cpu' else 'CUDA GPU'}) (got {describe(q)})")
    if q.dtype == torch.bfloat16 and kdev == "cpu":
        raise TypeError(
            f"q has dtype bfloat16, which Triton's CPU interpreter cannot compute; use float16 or float32 "
            f"on the CPU, bfloat16 on a GPU (got {describe(q)})")


def _check_dims(K: int, V: int, H: int, q, v) -> None:
    if H <= 0:
        raise ValueError(f"the number of heads must be positive; got H={H} (q {tuple(q.shape)})")
    if not 1 <= K <= MAX_HEAD_DIM:
        raise ValueError(f"q/k head dim K must be in [1, {MAX_HEAD_DIM}]; got K={K} (q {tuple(q.shape)})")
    if not 1 <= V <= MAX_HEAD_DIM:
        raise ValueError(f"v head dim V must be in [1, {MAX_HEAD_DIM}]; got V={V} (v {tuple(v.shape)})")


def _check_scale(scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(float(scale))):
        raise TypeError(f"scale must be None or a finite real number; got {describe(scale)}")


def _check_gate(g, shape: Tuple[int, ...], device: torch.device, what: str) -> None:
    if g is None:
        return
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"g must be None or a torch.Tensor ({what}); got {describe(g)}")
    if g.dtype not in GATE_DTYPES:
        raise TypeError(f"g has dtype {g.dtype}; supported: float32 (float16/bfloat16 are widened) (got {describe(g)})")
    if tuple(g.shape) != tuple(shape):
        raise ValueError(f"g must have shape {what} = {list(shape)}; got {describe(g)}")
    if g.device != device:
        raise ValueError(f"g must be on q's device {device}; got {describe(g)}")


def _check_state(name: str, s, shape: Tuple[int, ...], device: torch.device) -> None:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a float32 torch.Tensor [NS, H, K, V]; got {describe(s)}")
    if s.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {s.dtype}; supported: float32 (states are kept in float32) "
                        f"(got {describe(s)})")
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [NS, H, K, V] = {list(shape)}; got {describe(s)}")
    if s.device != device:
        raise ValueError(f"{name} must be on q's device {device}; got {describe(s)}")


def check_cu_seqlens(cu_seqlens, total: int, batch: int, device: torch.device) -> Tuple[List[int], Dict]:
    """Validate packed-sequence offsets; returns the sequence lengths and the dict kept with the
    offsets' host copy (one host sync per offsets tensor: calls with the same unchanged tensor reuse
    both, :mod:`...runtime.offsets`)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be None or an int32 torch.Tensor [NS + 1]; got {describe(cu_seqlens)}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype int32; got {describe(cu_seqlens)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries (NS + 1); got {describe(cu_seqlens)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on q's device {device}; got {describe(cu_seqlens)}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch dimension must be 1 (sequences packed along N); got B={batch}")
    cu, kept = host_offsets(cu_seqlens)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0; got {cu[:8]}{' ...' if len(cu) > 8 else ''}")
    bad = next((i for i in range(1, len(cu)) if cu[i] < cu[i - 1]), None)
    if bad is not None:
        raise ValueError(f"cu_seqlens must be non-decreasing; entry {bad} = {cu[bad]} < entry {bad - 1} = {cu[bad - 1]}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at the number of tokens N = {total}; got last entry {cu[-1]}")
    return [cu[i + 1] - cu[i] for i in range(len(cu) - 1)], kept


# ---- public API ----------------------------------------------------------------------------------

def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    cu_seqlens: Optional[torch.Tensor] = None,
    mode: str = "chunk",
    layout: str = "bshd",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal linear attention with an optional per-head scalar decay (RetNet / simple GLA).

    Per head, S_t = exp(g_t) S_{t-1} + k_t^T v_t and o_t = scale * q_t S_t (S is [K, V], float32).

    Shapes (``layout="bshd"``, fla's): q, k [B, N, H, K]; v [B, N, H, V]; g [B, N, H].
    ``layout="bhsd"``: q, k [B, H, N, K]; v [B, H, N, V]; g [B, H, N]. Returns
    ``(o, final_state)``: o like v (q's dtype), final_state [NS, H, K, V] float32 when
    ``output_final_state`` else None.

    - dtypes float16/bfloat16/float32 for q, k, v (bfloat16 only on a GPU); K, V <= 256 and
      may differ. g: float32 log-decay (<= 0; not checked: it would cost a device sync),
      None for none; float16/bfloat16 are widened.
    - ``initial_state``: float32 [NS, H, K, V] (NS = B, or the number of packed sequences).
    - ``cu_seqlens``: int32 [NS + 1] offsets of packed sequences along N (B must be 1);
      every sequence starts from its own initial state and ends in its own final state.
    - ``mode``: "chunk" (chunk_size in 32/64/128) or "recurrent" (token by token; its
      backward is the chunked one, with ``chunk_size``).
    - Gradients flow to q, k, v, g and initial_state (and from the final state).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}; got {layout!r}")
    head_first = layout == "bhsd"
    what = "[B, H, N, D]" if head_first else "[B, N, H, D]"
    _check_qkv(q, k, v, 4, what)
    if head_first:
        B, H, N, K = q.shape
        Vdim = v.shape[3]
        want_k, want_v = (B, H, N, K), (B, H, N, Vdim)
    else:
        B, N, H, K = q.shape
        Vdim = v.shape[3]
        want_k, want_v = (B, N, H, K), (B, N, H, Vdim)
    if tuple(k.shape) != want_k:
        raise ValueError(f"k must have q's shape {list(want_k)} ({what}); got {describe(k)}")
    if tuple(v.shape) != want_v:
        raise ValueError(f"v must match q in all but the last dimension {list(want_v[:3])} ({what}); got {describe(v)}")
    _check_dims(K, Vdim, H, q, v)
    _check_scale(scale)
    _check_gate(g, (B, H, N) if head_first else (B, N, H), q.device, "[B, H, N]" if head_first else "[B, N, H]")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    if isinstance(chunk_size, bool) or chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {', '.join(map(str, CHUNK_SIZES))}; got {chunk_size!r}")
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool; got {describe(output_final_state)}")
    lengths: List[int] = []
    kept: Dict = {}
    if cu_seqlens is not None:
        lengths, kept = check_cu_seqlens(cu_seqlens, N, B, q.device)
        cu_seqlens = cu_seqlens.contiguous()  # the kernels index it as a contiguous array
    num_seqs = len(lengths) if cu_seqlens is not None else B
    if initial_state is not None:
        _check_state("initial_state", initial_state, (num_seqs, H, K, Vdim), q.device)

    scale = K ** -0.5 if scale is None else float(scale)
    info = SeqInfo(B=B, T=N, H=H, K=K, V=Vdim, head_first=head_first, cu_seqlens=cu_seqlens, lengths=lengths)
    if cu_seqlens is not None:
        # chunk plans (index tensors copied to the device) are kept with the offsets' host copy
        info._plans = kept.setdefault("linear_chunk_plans", {})
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
    g32 = None if g is None else g.to(torch.float32).contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()

    if B * N == 0:  # nothing to run: empty output, the state passes through
        o = v.new_empty(v.shape)
        if not output_final_state:
            return o, None
        return o, (h0.clone() if h0 is not None else
                   torch.zeros(num_seqs, H, K, Vdim, dtype=torch.float32, device=q.device))

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g32, h0))
    if needs_grad:
        return LinearAttentionFunction.apply(q, k, v, g32, h0, scale, output_final_state, chunk_size, info, mode)
    o, ht, _ = linear_forward(q, k, v, g32, h0, scale, output_final_state, chunk_size, info, mode)
    return o, ht


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    *,
    g: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    inplace: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decode step of :func:`linear_attention` (no gradient).

    Shapes: q, k [B, H, K] (or [B, 1, H, K]); v [B, H, V] (or [B, 1, H, V]); g [B, H]
    (or [B, 1, H]) or None; state float32 [B, H, K, V]. Returns ``(o, new_state)``: o
    shaped like v, new_state float32 [B, H, K, V]; ``inplace=True`` writes the new
    state into ``state`` and returns it.
    """
    three = isinstance(q, torch.Tensor) and q.dim() == 3
    _check_qkv(q, k, v, 3 if three else 4, "[B, H, D]" if three else "[B, 1, H, D]")
    if not three and (q.shape[1] != 1 or k.shape[1] != 1 or v.shape[1] != 1):
        raise ValueError(f"a decode step takes one token: q, k, v must be [B, 1, H, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, K = q.shape[0], q.shape[-2], q.shape[-1]
    Vdim = v.shape[-1]
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have q's shape {list(q.shape)}; got {describe(k)}")
    if tuple(v.shape[:-1]) != tuple(q.shape[:-1]):
        raise ValueError(f"v must match q in all but the last dimension {list(q.shape[:-1])}; got {describe(v)}")
    _check_dims(K, Vdim, H, q, v)
    _check_scale(scale)
    _check_gate(g, (B, H) if three else (B, 1, H), q.device, "[B, H]" if three else "[B, 1, H]")
    _check_state("state", state, (B, H, K, Vdim), q.device)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool; got {describe(inplace)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, g, state)):
        raise NotImplementedError("linear_attention_step is a decode kernel without a backward; for training use "
                                  "linear_attention(...) (mode='chunk' or 'recurrent')")
    if inplace and not state.is_contiguous():
        raise ValueError(f"inplace=True needs a contiguous state; got strides {state.stride()}")
    scale = K ** -0.5 if scale is None else float(scale)
    info = SeqInfo(B=B, T=1, H=H, K=K, V=Vdim, head_first=False)
    q4, k4, v4 = (t.reshape(B, 1, H, t.shape[-1]).contiguous() for t in (q, k, v))
    g4 = None if g is None else g.reshape(B, 1, H).to(torch.float32).contiguous()
    h0 = state.contiguous()
    o, ht = fused_recurrent_forward(q4, k4, v4, g4, scale, h0, True, info, final_out=h0 if inplace else None)
    return o.reshape(v.shape), ht
