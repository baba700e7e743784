"""Rotary position embedding (RoPE): the spec and its plain-PyTorch form.

Two layouts of the rotated pairs:
- ``"half"`` (GPT-NeoX, Llama in Hugging Face): pairs (x[i], x[i + D/2]);
- ``"interleaved"`` (GPT-J, original RoFormer): pairs (x[2i], x[2i + 1]).

Pair i at position p turns by angle p * theta ** (-2i / D). Positions are
``q_offset + arange(Nq)`` for queries and ``k_offset + arange(Nk)`` for keys;
``q_offset`` defaults to Nk - Nq (the queries are the last Nq tokens, as in
decode and chunked prefill). ``cos``/``sin`` tables [max_pos, D/2] may be given
instead of theta; rows are looked up by position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

ROPE_LAYOUTS = ("half", "interleaved")


@dataclass(frozen=True)
class RopeSpec:
    layout: str = "half"
    theta: float = 10000.0
    q_offset: Optional[int] = None
    k_offset: int = 0
    cos: Optional[torch.Tensor] = None
    sin: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope layout must be one of {ROPE_LAYOUTS}; got {self.layout!r}")
        if (self.cos is None) != (self.sin is None):
            raise ValueError("rope cos and sin must be given together (both or neither)")
        if self.cos is not None and self.cos.shape != self.sin.shape:
            raise ValueError(
                f"rope cos and sin must have one shape [max_pos, D/2]; got {tuple(self.cos.shape)} "
                f"and {tuple(self.sin.shape)}"
            )

    def resolved_q_offset(self, nq: int, nk: int) -> int:
        return (nk - nq) if self.q_offset is None else int(self.q_offset)


def rope_cos_sin(
    positions: torch.Tensor, dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float64
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [len(positions), dim/2] of the rotation angles."""
    half = dim // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64, device=positions.device) * 2.0 / dim)
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


_THETA_TABLES: dict = {}  # (theta, D, device) -> (cos, sin, n): positions -n .. n-1


def theta_tables(theta: float, D: int, first: int, end: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [rows, D/2] whose row r holds position ``first + r``, covering at least
    positions ``first .. end - 1`` (``first`` may be negative).

    Views into one table per (theta, D, device) over positions -n .. n-1, computed in float64 and
    grown by doubling (n >= 1024): a call with new offsets costs no computation and no copy. The
    forward and the backward read the same rows for the same positions, so a score is rotated
    identically in both (the backward recomputes P from the forward's LSE: any rounding difference
    between the two rotations would leave P != exp(s - lse))."""
    key = (float(theta), int(D), str(device))
    tabs = _THETA_TABLES.get(key)
    reach = max(-first, end, 1)
    if tabs is None or tabs[2] < reach:
        n = max(1024, 1 << (reach - 1).bit_length())
        cos, sin = rope_cos_sin(torch.arange(-n, n), D, theta, torch.float32)
        tabs = (cos.to(device).contiguous(), sin.to(device).contiguous(), n)
        _THETA_TABLES[key] = tabs
    cos, sin, n = tabs
    return cos[n + first:], sin[n + first:]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate the last dim of x [..., N, D] by cos/sin [N, D/2]."""
    half = x.shape[-1] // 2
    if layout == "half":
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def cos_sin_for(spec: RopeSpec, start: int, n: int, dim: int, dtype: torch.dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(start, start + n, device=device)
    if spec.cos is not None:
        if n and start + n > spec.cos.shape[0]:
            raise ValueError(
                f"rope cos/sin tables have {spec.cos.shape[0]} positions; positions up to {start + n - 1} are needed"
            )
        return spec.cos[start : start + n].to(device=device, dtype=dtype), spec.sin[start : start + n].to(device=device, dtype=dtype)
    return tuple(t.to(device=device) for t in rope_cos_sin(pos, dim, spec.theta, dtype))  # type: ignore[return-value]


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, spec: RopeSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B,H,Nq,D] and k [B,Hkv,Nk,D] in their own dtype."""
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    qc, qs = cos_sin_for(spec, spec.resolved_q_offset(nq, nk), nq, d, q.dtype, q.device)
    kc, ks = cos_sin_for(spec, spec.k_offset, nk, d, k.dtype, k.device)
    return rotate(q, qc, qs, spec.layout), rotate(k, kc, ks, spec.layout)


def rope_tables(spec: RopeSpec, D: int, needed: int, device: torch.device,
                first: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables [max_pos, D/2] on ``device`` whose row r holds position ``first + r``,
    covering rows < ``needed``.

    User tables are checked and converted (no copy when already fp32, contiguous, on device; their
    row r is position r, so ``first`` must be 0); theta tables are views into one cached table
    (:func:`theta_tables`, shared with the backward).
    """
    if spec.cos is not None:
        if first:
            raise ValueError(f"rope: given cos/sin tables have no rows for negative positions (first={first})")
        cos, sin = spec.cos, spec.sin
        if cos.dim() != 2 or cos.shape[1] != D // 2:
            raise ValueError(f"rope cos/sin tables must be [max_pos, D/2] = [*, {D // 2}]; got {tuple(cos.shape)}")
        if needed > cos.shape[0]:
            raise ValueError(f"rope cos/sin tables have {cos.shape[0]} positions; positions up to {needed - 1} are needed")
        if cos.dtype != torch.float32 or cos.device != device or not cos.is_contiguous():
            cos = cos.to(device=device, dtype=torch.float32).contiguous()
        if sin.dtype != torch.float32 or sin.device != device or not sin.is_contiguous():
            sin = sin.to(device=device, dtype=torch.float32).contiguous()
        return cos, sin
    return theta_tables(spec.theta, D, first, first + needed, device)
