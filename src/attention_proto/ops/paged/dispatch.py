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

1. ``slots = CTAS_PER_SM * SMs`` programs run at once (the default tile's
   shared memory lets about two CTAs share an SM on Hopper); a program reads
   at the same pace whether few or many run, until all slots are busy (then
   HBM is the limit).
2. Modelled time of P partitions: ``waves(P) * tokens_per_partition(P)``, with
   ``waves = ceil(B * Hkv * row_blocks * P / slots)``, times
   ``1 + SPLIT_PENALTY`` when P > 1 (partial writes, the reduce launch).
3. Every P from 2 up to ``MAX_PARTITIONS`` that keeps at least
   ``MIN_TOKENS_PER_PARTITION`` tokens per partition is scored; the smallest P
   within ``TIE`` (5%) of the lowest modelled time is V2's candidate, and V1 (P = 1)
   is taken unless that candidate models faster.

Every plan carries its reasons as sentences (``plan.reason``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from ...runtime.device import interpreter_mode, sm_count
from ..dense.reference import normalize_window

#: decode programs resident per SM (shared memory of the default tile: ~2 CTAs on Hopper)
CTAS_PER_SM = 2
#: a partition shorter than this reads too little to pay for its partial write
MIN_TOKENS_PER_PARTITION = 256
#: V2's relative handicap in the model (partial outputs + a second launch)
SPLIT_PENALTY = 0.05
#: modelled times within this fraction count as a tie (the model is no finer than that)
TIE = 0.05
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

    slots = CTAS_PER_SM * sms
    cap = max(1, min(MAX_PARTITIONS, span // MIN_TOKENS_PER_PARTITION))

    def waves(p: int) -> int:
        return math.ceil(programs_v1 * p / slots)

    def cost(p: int) -> float:
        return waves(p) * cover(p) * (1.0 + (SPLIT_PENALTY if p > 1 else 0.0))

    # partition counts with no empty partition (rounding to BLOCK_N can make a larger P need fewer)
    cands = [p for p in range(2, cap + 1) if -(-span // cover(p)) == p]
    best_v2 = None
    if cands:
        lowest = min(cost(p) for p in cands)
        # the fewest partitions within TIE of the lowest modelled time: fewer partials, stabler choices
        best_v2 = next(p for p in cands if cost(p) <= (1.0 + TIE) * lowest)
    if version == "v1":
        reasons.append("V1 forced by version='v1'")
        return PagedPlan("v1", 1, cover(1), cfg, row_blocks, programs_v1, sms, reasons)
    model = (f"model: waves x tokens per program on {slots} slots ({CTAS_PER_SM} per SM x {sms} SMs), "
             f"+{SPLIT_PENALTY:.0%} for a split")
    if version == "auto" and num_partitions is None:
        v1_txt = f"{part_desc} = {programs_v1} programs without a split run {waves(1)} wave(s) of {cover(1)} tokens"
        if best_v2 is None:
            reasons.append(f"V1: the longest sequence ({span} tokens) is too short to split into partitions of "
                           f">= {MIN_TOKENS_PER_PARTITION} tokens; {v1_txt}")
            return PagedPlan("v1", 1, cover(1), cfg, row_blocks, programs_v1, sms, reasons)
        v2_txt = (f"{best_v2} partitions run {programs_v1 * best_v2} programs, {waves(best_v2)} wave(s) of "
                  f"{cover(best_v2)} tokens")
        if cost(1) <= cost(best_v2):
            reasons.append(f"V1: {v1_txt}; the best split ({v2_txt}) models no faster ({model})")
            return PagedPlan("v1", 1, cover(1), cfg, row_blocks, programs_v1, sms, reasons)
        p = best_v2
        reasons.append(f"V2: {v1_txt}; {v2_txt}, modelled {cost(1) / cost(best_v2):.1f}x faster ({model})")
    elif num_partitions is not None:
        p = num_partitions
        reasons.append(f"V2 with {p} partitions, as requested")
    else:
        p = best_v2 or 1
        reasons.append(f"V2 forced by version='v2'; {p} partitions of {cover(p)} tokens for {part_desc} = "
                       f"{programs_v1} programs, {waves(p)} wave(s) ({model})")
    tpp = cover(p)
    used = -(-span // tpp)
    if used < p:
        reasons.append(f"{p - used} of {p} partitions are past the longest sequence and exit at once")
    reasons.append(f"{tpp} tokens per partition, {programs_v1 * p} programs")
    return PagedPlan("v2", p, tpp, cfg, row_blocks, programs_v1 * p, sms, reasons)
