"""Which paged decode kernel to run, with how many KV partitions, and why.

Two kernels (see :mod:`attention_proto.ops.paged.decode`):

- **V1**: one program per (sequence, KV head[, row block]); it walks the whole
  sequence and writes the output directly. No extra pass, but only
  ``B * Hkv`` programs: too few to fill the GPU when the batch is small.
- **V2**: the sequence is cut into ``P`` partitions, one program each; each
  writes a partial output and its LSE, and a reduce kernel merges them.
  ``P`` times more programs, at the price of a partial write per partition and
  a second (small) launch.

The rule (:func:`plan`), with constants to be calibrated by ``--study paged``:

1. ``V1`` when ``B * Hkv * row_blocks >= V1_MIN_PROGRAMS_PER_SM * SMs``:
   every SM already has work, splitting buys little.
2. Otherwise ``P = ceil(TARGET_PROGRAMS_PER_SM * SMs / programs_v1)``, capped
   so that each partition keeps at least ``MIN_TOKENS_PER_PARTITION`` tokens
   (shorter partitions spend more on their prologue/epilogue than they read)
   and at ``MAX_PARTITIONS``.
3. If that leaves ``P == 1`` (short sequences), ``V1``.

Every plan carries its reasons as sentences (``plan.reason``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from ...runtime.device import interpreter_mode, sm_count
from ..dense.reference import normalize_window

#: V1 is enough when this many programs per SM exist without splitting
V1_MIN_PROGRAMS_PER_SM = 1.0
#: how many programs per SM V2 aims at (two resident CTAs per SM hide the gather latency)
TARGET_PROGRAMS_PER_SM = 2.0
#: a partition shorter than this reads too little to pay for its partial write
MIN_TOKENS_PER_PARTITION = 512
#: the reduce kernel loops over partitions in chunks; more than this is never useful
MAX_PARTITIONS = 256
#: at most this many query rows (GQA group x Nq) share one program (register budget of the accumulator)
MAX_BLOCK_M = 64
VERSIONS = ("auto", "v1", "v2")


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclass(frozen=True)
class PagedConfig:
    """Tile shape of the decode kernel: rows (GQA group x Nq, padded), tokens per tile, head dim."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int


def default_config(rows: int, head_dim: int, elem_bytes: int = 2) -> PagedConfig:
    """Tiles for a decode step.

    - BLOCK_M: the rows of one KV head's query group, padded to a power of two >= 16 (tl.dot's
      minimum M); capped at MAX_BLOCK_M (larger groups are split into row blocks).
    - BLOCK_N: about 16 KB of K per tile (64 tokens at D=128 bf16, 128 at D=64); the tile may
      span several pages (rows are gathered through the block table), so shared memory does
      not depend on the page size.
    - 4 warps (8 when BLOCK_M reaches 64), 3 pipeline stages (1 under the interpreter, and
      16-token tiles there to keep CPU tests fast).
    """
    bd = max(16, _pow2_at_least(head_dim))
    bm = min(MAX_BLOCK_M, max(16, _pow2_at_least(rows)))
    if interpreter_mode():
        return PagedConfig(bm, 16, bd, 4, 1)
    bn = max(16, min(128, 16384 // (bd * elem_bytes)))
    return PagedConfig(bm, bn, bd, 8 if bm >= 64 else 4, 3 if bd <= 128 else 2)


@dataclass
class PagedPlan:
    """The kernel choice for one call, and why."""

    version: str                 # "v1" or "v2"
    num_partitions: int          # 1 for v1
    tokens_per_partition: int    # a multiple of BLOCK_N; covers the longest sequence for v1
    config: PagedConfig
    row_blocks: int              # programs per (sequence, KV head) along the query rows
    programs: int                # decode programs launched
    sm_count: int
    reasons: List[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def as_dict(self) -> dict:
        return dict(version=self.version, num_partitions=self.num_partitions,
                    tokens_per_partition=self.tokens_per_partition, programs=self.programs,
                    row_blocks=self.row_blocks, sm_count=self.sm_count, reason=self.reason,
                    **{k: getattr(self.config, k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages")})


def plan(
    *,
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    q_len: int,
    head_dim: int,
    max_seq_len: int,
    window: Optional[Sequence[Optional[int]] | int] = None,
    version: str = "auto",
    num_partitions: Optional[int] = None,
    sms: Optional[int] = None,
    elem_bytes: int = 2,
    config: Optional[PagedConfig] = None,
) -> PagedPlan:
    """Choose V1 or V2 and the partition count for a decode call.

    Args:
        batch, num_q_heads, num_kv_heads, q_len, head_dim: the call's shape (q_len = Nq <= 16).
        max_seq_len: the longest sequence (an upper bound is fine: it only sizes partitions).
        window: the sliding window; only ``left + Nq`` tokens per sequence are read with one.
        version: "auto", "v1" or "v2" (forced).
        num_partitions: forces V2's partition count (with version "v2" or "auto").
        sms: SM count (default: the device's; 132 without a GPU).
        elem_bytes: bytes per K/V element (sizes the tiles).
        config: tile override (the study's config sweep); default :func:`default_config`.

    Returns:
        A :class:`PagedPlan`; ``plan.reason`` says why.
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {', '.join(map(repr, VERSIONS))}; got {version!r}")
    if num_partitions is not None and (not isinstance(num_partitions, int) or num_partitions < 1):
        raise ValueError(f"num_partitions must be a positive int or None; got {num_partitions!r}")
    if version == "v1" and num_partitions not in (None, 1):
        raise ValueError(f"num_partitions={num_partitions} needs version 'v2' (or 'auto'); V1 has one partition")
    if num_partitions is not None and num_partitions > MAX_PARTITIONS:
        raise ValueError(f"num_partitions must be at most {MAX_PARTITIONS}; got {num_partitions}")
    sms = int(sms or sm_count())
    group = num_q_heads // num_kv_heads
    rows = group * q_len
    cfg = config or default_config(rows, head_dim, elem_bytes)
    row_blocks = -(-rows // cfg.BLOCK_M)
    bn = cfg.BLOCK_N
    left, _ = normalize_window(window)
    # tokens one sequence's program(s) must cover: the whole sequence, or the window's span
    # (+ one tile: the kernel starts at the tile boundary below the window)
    span = max(1, int(max_seq_len))
    reasons: List[str] = []
    if left >= 0:
        span = min(span, left + q_len + bn)
        reasons.append(f"window {left}: each sequence reads at most {span} tokens")
    programs_v1 = batch * num_kv_heads * row_blocks
    part_desc = f"{batch} sequences x {num_kv_heads} KV heads" + (f" x {row_blocks} row blocks" if row_blocks > 1 else "")

    def cover(p: int) -> int:
        return max(bn, -(-(-(-span // p)) // bn) * bn)

    if version == "v1" or (version == "auto" and num_partitions is None):
        if version == "v1":
            reasons.append("V1 forced by version='v1'")
            p = 1
        elif programs_v1 >= V1_MIN_PROGRAMS_PER_SM * sms:
            reasons.append(f"V1: {part_desc} = {programs_v1} programs already cover the {sms} SMs "
                           f"(>= {V1_MIN_PROGRAMS_PER_SM:g} per SM)")
            p = 1
        else:
            want = math.ceil(TARGET_PROGRAMS_PER_SM * sms / programs_v1)
            cap_len = max(1, span // MIN_TOKENS_PER_PARTITION)
            p = max(1, min(want, cap_len, MAX_PARTITIONS))
            if p == 1:
                reasons.append(f"V1: {part_desc} = {programs_v1} programs for {sms} SMs, but the longest "
                               f"sequence ({span} tokens) is too short to split into partitions of "
                               f">= {MIN_TOKENS_PER_PARTITION} tokens")
            else:
                limit = ("SM target" if p == want else
                         f"partitions of >= {MIN_TOKENS_PER_PARTITION} tokens" if p == cap_len else
                         f"MAX_PARTITIONS={MAX_PARTITIONS}")
                reasons.append(f"V2: {part_desc} = {programs_v1} programs would leave most of the {sms} SMs "
                               f"idle; {want} partitions reach {TARGET_PROGRAMS_PER_SM:g} programs per SM, "
                               f"{p} taken (limited by the {limit})")
        if p == 1:
            tpp = cover(1)
            return PagedPlan("v1", 1, tpp, cfg, row_blocks, programs_v1, sms, reasons)
    else:
        if num_partitions is not None:
            p = num_partitions
            reasons.append(f"V2 with {p} partitions, as requested")
        else:
            want = math.ceil(TARGET_PROGRAMS_PER_SM * sms / programs_v1)
            p = max(1, min(want, max(1, span // MIN_TOKENS_PER_PARTITION), MAX_PARTITIONS))
            reasons.append(f"V2 forced by version='v2'; {p} partitions for {part_desc} = {programs_v1} "
                           f"programs on {sms} SMs")
    tpp = cover(p)
    used = -(-span // tpp)
    if used < p:
        reasons.append(f"{p - used} of {p} partitions are past the longest sequence and exit at once")
    reasons.append(f"{tpp} tokens per partition, {programs_v1 * p} programs")
    return PagedPlan("v2", p, tpp, cfg, row_blocks, programs_v1 * p, sms, reasons)
