"""Plain-PyTorch linear attention: the ground truth for every linear kernel.

Semantics (shared by the chunked and the recurrent kernels):

- Layout ``"bshd"`` (fla's): q, k [B, N, H, K], v [B, N, H, V]; log-decay g [B, N, H].
  Layout ``"bhsd"``: q, k [B, H, N, K], v [B, H, N, V], g [B, H, N]. K and V may differ.
- Per head, a [K, V] state S (float32 in the kernels) follows the recurrence

      S_t = exp(g_t) * S_{t-1} + k_t^T v_t            (S_{-1} = initial_state, or 0)
      o_t = scale * q_t S_t                            (scale defaults to K ** -0.5)

  so o_t includes token t itself (causal, inclusive). ``g`` is the per-token per-head
  log-decay (<= 0; RetNet's constant decay is g = log(gamma_h) everywhere; simple-GLA's
  data-dependent gate is a per-token g); ``g=None`` means no decay (g = 0).
- initial_state / final state: [NS, H, K, V] (NS = B, or the number of sequences with
  ``cu_seqlens``); the final state is S after the last token of each sequence.
- Packed input: with ``cu_seqlens`` (int32 [NS + 1]) the batch dimension is 1 and the
  N axis holds NS sequences back to back; each restarts from its own initial state and
  nothing crosses a boundary.

Two independent forms: :func:`linear_attention_recurrent` (token by token; the
definition) and :func:`linear_attention_parallel` (quadratic: masked decay matrix
exp(A_t - A_s), A the inclusive cumulative sum of g). Both compute in ``compute_dtype``
(float64 by default). The parallel form run in float16/bfloat16/float32 is "PyTorch's
own error" in the error rule: its matmuls run in that dtype, its decay factors are
computed in float32 and rounded to that dtype (a cumulative sum in float16 would be
the dtype's fault, not the method's).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


def to_bshd(x: Optional[Tensor], layout: str, is_gate: bool = False) -> Optional[Tensor]:
    """View a tensor of ``layout`` as bshd ([B, N, H, D], or [B, N, H] for g)."""
    if x is None or layout == "bshd":
        return x
    return x.transpose(1, 2)


def _segments(N: int, B: int, cu_seqlens: Optional[Tensor]) -> List[Tuple[int, int, int]]:
    """(batch row, start, end) of each sequence."""
    if cu_seqlens is None:
        return [(b, 0, N) for b in range(B)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _decay_cumsum(g: Optional[Tensor], n: int, H: int, like: Tensor) -> Tensor:
    """Inclusive cumulative log-decay A [n, H] in float64 (zeros without g)."""
    if g is None:
        return torch.zeros(n, H, dtype=torch.float64, device=like.device)
    return g.to(torch.float64).cumsum(0)


def linear_attention_recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None, scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None, layout: str = "bshd", compute_dtype: torch.dtype = torch.float64,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The recurrence token by token (the definition). Returns (o, final_state or None).

    o has q's layout and ``compute_dtype``; the final state is [NS, H, K, V] in ``compute_dtype``.
    """
    q, k, v, g = (to_bshd(x, layout) for x in (q, k, v, g))
    B, N, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    cd = compute_dtype
    o = torch.zeros(B, N, H, V, dtype=cd, device=q.device)
    finals = []
    for i, (b, s0, s1) in enumerate(_segments(N, B, cu_seqlens)):
        S = (initial_state[i].to(cd) if initial_state is not None
             else torch.zeros(H, K, V, dtype=cd, device=q.device))
        for t in range(s0, s1):
            if g is not None:
                S = S * torch.exp(g[b, t].to(cd))[:, None, None]
            S = S + k[b, t].to(cd)[:, :, None] * v[b, t].to(cd)[:, None, :]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t].to(cd), S)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return to_bshd(o, layout), final


def _parallel_one(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], scale: float, h0: Optional[Tensor],
                  cd: torch.dtype) -> Tuple[Tensor, Tensor]:
    """One sequence: q/k [n, H, K], v [n, H, V], g [n, H] -> o [n, H, V], final [H, K, V]."""
    n, H, K = q.shape
    V = v.shape[-1]
    # decay factors in float64 (float32 rounding in the low-precision run), then in cd
    A = _decay_cumsum(g, n, H, q)                                   # [n, H]
    if cd != torch.float64:
        A = A.to(torch.float32)
    qh, kh, vh = (x.to(cd).transpose(0, 1) for x in (q, k, v))      # [H, n, D]
    idx = torch.arange(n, device=q.device)
    causal = idx[:, None] >= idx[None, :]
    diff = A.transpose(0, 1)[:, :, None] - A.transpose(0, 1)[:, None, :]   # [H, t, s] = A_t - A_s
    decay = torch.where(causal, torch.exp(torch.where(causal, diff, torch.zeros_like(diff))), torch.zeros_like(diff))
    scores = (qh @ kh.transpose(1, 2)) * scale                      # [H, n, n]
    o = (scores * decay.to(cd)) @ vh                                # [H, n, V]
    if n:
        a_last = A[-1]                                              # [H]
        w = torch.exp(a_last[None, :] - A).to(cd)                   # [n, H]: exp(A_N - A_s)
        final = torch.einsum("nhk,nhv->hkv", (k.to(cd) * w[:, :, None]), v.to(cd))
    else:
        a_last = torch.zeros(H, dtype=A.dtype, device=q.device)
        final = torch.zeros(H, K, V, dtype=cd, device=q.device)
    if h0 is not None:
        h0c = h0.to(cd)
        o = o + scale * torch.exp(A).transpose(0, 1).to(cd)[:, :, None] * (qh @ h0c)
        final = final + torch.exp(a_last).to(cd)[:, None, None] * h0c
    return o.transpose(0, 1), final


def linear_attention_parallel(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None, scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None, layout: str = "bshd", compute_dtype: torch.dtype = torch.float64,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The quadratic form: o = ((scale q k^T) * D) v + scale exp(A_t) q_t S0, D[t, s] = exp(A_t - A_s) for s <= t.

    Differentiable (autograd gives the reference gradients, g and initial_state included).
    """
    q, k, v, g = (to_bshd(x, layout) for x in (q, k, v, g))
    B, N, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    outs: List[Tensor] = []
    finals: List[Tensor] = []
    rows: List[List[Tensor]] = [[] for _ in range(B)]
    for i, (b, s0, s1) in enumerate(_segments(N, B, cu_seqlens)):
        o, fin = _parallel_one(q[b, s0:s1], k[b, s0:s1], v[b, s0:s1], None if g is None else g[b, s0:s1],
                               scale, None if initial_state is None else initial_state[i], compute_dtype)
        rows[b].append(o)
        finals.append(fin)
    for b in range(B):
        outs.append(torch.cat(rows[b], 0) if rows[b] else
                    torch.zeros(0, H, v.shape[-1], dtype=compute_dtype, device=q.device))
    o = torch.stack(outs)
    final = torch.stack(finals) if output_final_state else None
    return to_bshd(o, layout), final


def linear_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None, scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None, layout: str = "bshd", compute_dtype: torch.dtype = torch.float64,
    form: str = "parallel",
) -> Tuple[Tensor, Optional[Tensor]]:
    """Reference output and final state; ``form`` is "parallel" (differentiable, fast) or "recurrent"."""
    fn = linear_attention_parallel if form == "parallel" else linear_attention_recurrent
    return fn(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, layout, compute_dtype)


def step_reference(q: Tensor, k: Tensor, v: Tensor, state: Tensor, g: Optional[Tensor] = None,
                   scale: Optional[float] = None, compute_dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    """One decode step: q/k [B, H, K], v [B, H, V], g [B, H], state [B, H, K, V] -> (o [B, H, V], new state)."""
    cd = compute_dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S = state.to(cd)
    if g is not None:
        S = S * torch.exp(g.to(cd))[..., None, None]
    S = S + k.to(cd)[..., :, None] * v.to(cd)[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q.to(cd), S)
    return o, S


def random_inputs(B: int, N: int, H: int, K: int, V: int, dtype: torch.dtype, device: str = "cpu",
                  gated: bool = False, h0: bool = False, generator: Optional[torch.Generator] = None,
                  num_seqs: Optional[int] = None) -> Sequence[Optional[Tensor]]:
    """Random q, k, v (dtype), g (float32, log-sigmoid of N(2, 1): decays around 0.9), h0 (float32)."""
    gen = generator
    q = torch.randn(B, N, H, K, generator=gen, device=device).to(dtype)
    k = torch.randn(B, N, H, K, generator=gen, device=device).to(dtype)
    v = torch.randn(B, N, H, V, generator=gen, device=device).to(dtype)
    g = (torch.nn.functional.logsigmoid(torch.randn(B, N, H, generator=gen, device=device) + 2.0)
         if gated else None)
    ns = B if num_seqs is None else num_seqs
    s0 = torch.randn(ns, H, K, V, generator=gen, device=device) if h0 else None
    return q, k, v, g, s0
