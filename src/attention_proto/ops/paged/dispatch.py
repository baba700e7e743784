"""Which paged decode kernel to run, with how many KV partitions, and why.

Kernels (see :mod:`attention_proto.ops.paged.decode`):

- **V1**: one program per (sequence, KV head[, row block]); it walks the whole
  sequence and writes the output directly. Only ``B * Hkv`` programs: too few
  to fill the GPU when the batch is small or one sequence is long.
- **V2**: sequences are cut into partitions of ``tokens_per_partition`` tokens,
  one program each. With ``reduce="fused"`` (default) a sequence uses only the
  partitions it needs and the last program of each merges the partials (one
  launch); with ``reduce="kernel"`` (the GPU default) every partition runs and a
  second kernel merges. Measured on an H100 (``scripts/bench_paged.py``, session 3):
  the separate merge kernel ties or wins at every bar shape (B1 N64k: 78% of copy
  against 73% fused), so the fused merge is kept as an option, not the default.

The rule (:func:`plan`), with constants to be calibrated by ``scripts/bench_paged.py``:

1. ``slots = ctas_per_sm(config) * SMs`` programs are resident at once
   (:func:`ctas_per_sm`: shared memory of the pipelined tile, registers, warps),
   and ``k = SATURATING_PROGRAMS_PER_SM * SMs`` running programs saturate HBM:
   fewer run at a program's own pace (its pipeline's bytes in flight over the
   memory latency), more share the bandwidth. (Measured with one K/V buffer per
   program: ~19 GB/s a program, so ~1.2 programs per SM saturate the H100; two
   buffers should need fewer.)
2. Modelled time, in tokens read at one program's own pace, of a partition size
   ``t``, with ``C = PROGRAM_OVERHEAD_TOKENS`` (a program's fixed latency) and
   ``n(t)`` the programs that read something (``Hkv x row blocks x sum_b ceil(len_b / t)``):

   - equal lengths: programs start and end together, in waves of ``slots``; a wave
     of ``w`` programs takes ``(t + C) * max(1, w / k)``; ``T`` sums the waves;
   - mixed lengths (``total_tokens`` below ``batch x max_seq_len``; each sequence
     counted as ``max(1, mean / t + 1/2)`` partitions): the work flows over
     ``min(k, slots)`` programs' worth of bandwidth and the last program to
     start ends about half a program later:
     ``T = (work + C * n(t) + C_EMPTY * empty(t)) / min(k, slots) + t / 2`` (at least
     ``t + C``), ``work`` =
     total tokens x Hkv x row blocks, ``empty(t)`` the programs launched past their
     sequence's end (they exit at once). A mixed batch is split by its total work,
     not by its longest sequence alone;

   times ``1 + SPLIT_PENALTY`` for a split. Both favour the smallest partitions
   that keep HBM busy (FlashInfer fills the resident slots with the smallest
   chunks; this adds a cost per program instead of a hard cap).
3. Every partition count from 2 up to ``MAX_PARTITIONS`` that keeps at least
   ``MIN_TOKENS_PER_PARTITION`` tokens per partition (and leaves no partition
   of the longest sequence empty) is scored; the cheapest is V2's candidate,
   and V1 (P = 1) is taken unless that candidate models more than ``TIE`` faster.

Every plan carries its reasons as sentences (``plan.reason``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from ...runtime.device import interpreter_mode, sm_count
from ..dense.reference import normalize_window

#: a partition shorter than this reads too little to pay for its partial write
MIN_TOKENS_PER_PARTITION = 256
#: V2's relative handicap in the model (partial outputs and their merge)
SPLIT_PENALTY = 0.05
#: a program's fixed cost (start-up latency, epilogue) in tokens of reading
PROGRAM_OVERHEAD_TOKENS = 64
#: a program launched past its sequence's end (it reads the length and exits), in tokens
EMPTY_PROGRAM_TOKENS = 32
#: running programs per SM whose reads saturate HBM (1.2 measured with one K/V buffer; a guess
#: between that and the occupancy for two buffers: calibrate with scripts/bench_paged.py)
SATURATING_PROGRAMS_PER_SM = 1.5
#: V2 must model more than this fraction faster than V1 to be chosen (the model is no finer)
TIE = 0.05
#: the reduce kernel loops over partitions in chunks; more than this is never useful
MAX_PARTITIONS = 256
#: at most this many query rows (GQA group x Nq) share one program (register budget of the accumulator)
MAX_BLOCK_M = 64
VERSIONS = ("auto", "v1", "v2")
REDUCES = ("fused", "kernel", "kernel_pdl")
#: the merge the GPU tiles use: a second kernel (faster than the fused merge at every bar shape of
#: bench_paged.py on an H100, 2026-11-26 session 3); the interpreter's tiles keep "fused" (its tests)
DEFAULT_REDUCE = "kernel"

# Hopper (sm_90) per-SM limits for the occupancy estimate
SMEM_PER_SM = 228 * 1024
SMEM_PER_CTA_RESERVED = 1024
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
#: registers per thread of the decode kernel (ptxas, sm_90, BLOCK_M 16, D 128: 90-128)
REGS_PER_THREAD = 128


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclass(frozen=True)
class PagedConfig:
    """Tile shape of the decode kernel and how V2 merges.

    BLOCK_M rows (GQA group x Nq, padded), BLOCK_N tokens per step, BLOCK_D head dim (padded),
    warps, pipeline stages (see :func:`attention_proto.ops.paged.decode.kv_buffers`: 3-4 stages
    give one K/V buffer, 5-6 two, 7-8 three), and ``reduce``: "fused" (the last partition
    merges, one launch), "kernel" (a second launch merges) or "kernel_pdl" (the second launch by
    programmatic dependent launch on Hopper: scheduled while the partitions run, it waits for
    them on ``griddepcontrol.wait``, so no launch gap between the two; opt-in: on an H100 no faster
    than "kernel" (bench_paged.py, session 6); under the interpreter the same as "kernel").
    """

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int
    reduce: str = "fused"


def default_config(rows: int, head_dim: int, elem_bytes: int = 2) -> PagedConfig:
    """Tiles for a decode step.

    - BLOCK_M: the rows of one KV head's query group, padded to a power of two >= 16 (tl.dot's
      minimum M); capped at MAX_BLOCK_M (larger groups are split into row blocks).
    - BLOCK_N: about 16 KB of K per tile (64 tokens at D=128 bf16, 128 at D=64); the tile may
      span several pages (rows are gathered through the block table), so shared memory does
      not depend on the page size.
    - 4 warps (8 when BLOCK_M reaches 64, and for fp32); 5 pipeline stages: two K/V buffers, so the next
      tile's loads are in flight while this one is computed (3 stages leave one buffer: the
      page-id load takes a stage). Under the interpreter: 16-token tiles, 1 stage (fast CPU tests).
    - reduce :data:`DEFAULT_REDUCE` ("kernel") on the GPU, "fused" under the interpreter.
    """
    bd = max(16, _pow2_at_least(head_dim))
    bm = min(MAX_BLOCK_M, max(16, _pow2_at_least(rows)))
    if interpreter_mode():
        return PagedConfig(bm, 16, bd, 4, 1)
    return gpu_config(rows, head_dim, elem_bytes)


def gpu_config(rows: int, head_dim: int, elem_bytes: int = 2) -> PagedConfig:
    """:func:`default_config`'s GPU tile, also under the interpreter (to model a GPU's plan)."""
    bd = max(16, _pow2_at_least(head_dim))
    bm = min(MAX_BLOCK_M, max(16, _pow2_at_least(rows)))
    bn = max(16, min(128, 16384 // (bd * elem_bytes)))
    # 8 warps for 64-row tiles and for fp32 (4 warps spill ~400 bytes at fp32, D 128)
    return PagedConfig(bm, bn, bd, 8 if bm >= 64 or elem_bytes >= 4 else 4, 5, DEFAULT_REDUCE)


def smem_bytes(cfg: PagedConfig, elem_bytes: int = 2) -> int:
    """Shared memory of the compiled decode kernel (matches ptxas for sm_90 within a few %)."""
    bufs = max(1, (cfg.num_stages - 1) // 2)
    kv = bufs * (2 * cfg.BLOCK_N * cfg.BLOCK_D * elem_bytes + 4 * cfg.BLOCK_N)  # K, V tiles and page ids
    return kv + cfg.BLOCK_M * cfg.BLOCK_D * elem_bytes + cfg.BLOCK_M * cfg.BLOCK_N * elem_bytes  # q, P


def ctas_per_sm(cfg: PagedConfig, elem_bytes: int = 2, smem_per_sm: int = SMEM_PER_SM) -> int:
    """Resident decode programs per SM: the tightest of shared memory, registers, warps."""
    by_smem = smem_per_sm // (smem_bytes(cfg, elem_bytes) + SMEM_PER_CTA_RESERVED)
    by_regs = REGS_PER_SM // (REGS_PER_THREAD * 32 * cfg.num_warps)
    by_warps = MAX_WARPS_PER_SM // cfg.num_warps
    return max(1, min(by_smem, by_regs, by_warps, MAX_CTAS_PER_SM))


#: resident programs per SM of the default tile (GQA group 4, D 128, bf16) -- quoted by the study
CTAS_PER_SM = ctas_per_sm(gpu_config(4, 128, 2), 2)


@dataclass
class PagedPlan:
    """The kernel choice for one call, and why."""

    version: str                 # "v1" or "v2"
    num_partitions: int          # 1 for v1 (the grid's partition axis)
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
                    **{k: getattr(self.config, k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages",
                                                            "reduce")})


def plan(
    *,
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    q_len: int,
    head_dim: int,
    max_seq_len: int,
    total_tokens: Optional[int] = None,
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
        total_tokens: the sum of the sequence lengths, when known (mixed lengths: splits by the
            batch's work); default ``batch * max_seq_len`` (all as long as the longest).
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
    if config is not None and config.reduce not in REDUCES:
        raise ValueError(f"config.reduce must be one of {', '.join(map(repr, REDUCES))}; got {config.reduce!r}")
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
    # the batch's tokens (every sequence at most `span`), and whether they are mixed
    seq_tokens = batch * span if total_tokens is None else min(max(int(total_tokens), batch), batch * span)
    mixed = seq_tokens < batch * span
    mean = seq_tokens / batch
    tiles = batch * num_kv_heads * row_blocks
    part_desc = f"{batch} sequences x {num_kv_heads} KV heads" + (f" x {row_blocks} row blocks" if row_blocks > 1 else "")

    def cover(p: int) -> int:
        return max(bn, -(-(-(-span // p)) // bn) * bn)

    slots = ctas_per_sm(cfg, elem_bytes) * sms
    k_sat = max(1.0, SATURATING_PROGRAMS_PER_SM * sms)
    cap = max(1, min(MAX_PARTITIONS, span // MIN_TOKENS_PER_PARTITION))
    C = PROGRAM_OVERHEAD_TOKENS

    def programs(p: int) -> float:
        t = cover(p)
        per_seq = -(-span // t)
        if mixed:
            per_seq = max(1.0, min(per_seq, mean / t + 0.5))
        if p > 1 and cfg.reduce in ("kernel", "kernel_pdl"):
            per_seq = p  # every partition runs (empty ones write -inf partials)
        return tiles * per_seq

    def cost(p: int) -> float:
        t = min(cover(p), span)
        n = programs(p)
        if mixed:
            empty = max(0.0, tiles * p - n)
            work = seq_tokens * num_kv_heads * row_blocks + C * n + EMPTY_PROGRAM_TOKENS * empty
            time = max(work / min(k_sat, slots) + t / 2, t + C)
        else:
            full, last = divmod(n, slots)
            time = (t + C) * (full * max(1.0, slots / k_sat) + (max(1.0, last / k_sat) if last else 0.0))
        return time * (1.0 + (SPLIT_PENALTY if p > 1 else 0.0))

    # partition counts with no empty partition (rounding to BLOCK_N can make a larger P need fewer)
    cands = [p for p in range(2, cap + 1) if -(-span // cover(p)) == p]
    best_v2 = min(cands, key=lambda p: (cost(p), p)) if cands else None
    if version == "v1":
        reasons.append("V1 forced by version='v1'")
        return PagedPlan("v1", 1, cover(1), cfg, row_blocks, tiles, sms, reasons)
    lens_txt = f"{seq_tokens} tokens in all, longest {span}" if mixed else f"{span} tokens each"
    model = (f"model: {'work over the bandwidth + half a program' if mixed else 'waves x tokens per program'}, "
             f"{slots} slots ({ctas_per_sm(cfg, elem_bytes)} per SM x {sms} SMs), {k_sat:.0f} programs saturate HBM, "
             f"+{C} tokens per program, +{SPLIT_PENALTY:.0%} for a split")
    if version == "auto" and num_partitions is None:
        v1_txt = f"{part_desc} ({lens_txt}) = {tiles} programs without a split model {cost(1):.0f}"
        if best_v2 is None:
            reasons.append(f"V1: the longest sequence ({span} tokens) is too short to split into partitions of "
                           f">= {MIN_TOKENS_PER_PARTITION} tokens; {v1_txt}")
            return PagedPlan("v1", 1, cover(1), cfg, row_blocks, tiles, sms, reasons)
        v2_txt = (f"{best_v2} partitions of {cover(best_v2)} tokens ({programs(best_v2):.0f} programs that read) "
                  f"model {cost(best_v2):.0f}")
        if cost(1) <= (1.0 + TIE) * cost(best_v2):
            reasons.append(f"V1: {v1_txt}; the best split ({v2_txt}) is not more than {TIE:.0%} faster ({model})")
            return PagedPlan("v1", 1, cover(1), cfg, row_blocks, tiles, sms, reasons)
        p = best_v2
        reasons.append(f"V2: {v1_txt}; {v2_txt}, {cost(1) / cost(best_v2):.1f}x faster ({model})")
    elif num_partitions is not None:
        p = num_partitions
        reasons.append(f"V2 with {p} partitions, as requested")
    else:
        p = best_v2 or 1
        reasons.append(f"V2 forced by version='v2'; {p} partitions of {cover(p)} tokens for {part_desc} "
                       f"({model})")
    tpp = cover(p)
    used = -(-span // tpp)
    if used < p:
        reasons.append(f"{p - used} of {p} partitions are past the longest sequence and exit at once")
    reasons.append(f"{tpp} tokens per partition, {tiles * p} programs launched, merge: {cfg.reduce}")
    return PagedPlan("v2", p, tpp, cfg, row_blocks, tiles * p, sms, reasons)
