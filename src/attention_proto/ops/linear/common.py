"""Shared pieces of the linear-attention kernels: sequence/chunk bookkeeping, address helpers, configs.

Every kernel sees its input as ``B`` rows of ``T`` tokens (``layout`` bshd: token stride
H*D, head stride D; bhsd: token stride D, head stride T*D). A *sequence* is a whole row
(dense batch) or a ``[bos, eos)`` slice of the single row (``cu_seqlens``). Chunk states
are stored per global chunk index: chunk ``i_t`` of sequence ``n`` is global chunk
``chunk_offsets[n] + i_t`` (dense batch: ``n * cdiv(T, BT) + i_t``).

Configs: the block sizes and warps of each kernel come from :func:`kernel_config`; they
can be overridden without code changes through the environment variable
``ATTENTION_PROTO_LINEAR_CONFIG``, a JSON object keyed by kernel name or
``name@BT`` (e.g. ``{"chunk_o@64": {"BK": 64, "BV": 64, "num_warps": 4}}``).
``ATTENTION_PROTO_LINEAR_TUNE=1`` (GPU only, off by default: each candidate is a
compile) times a few candidates per kernel on first use of a shape class and keeps the
fastest; :func:`config_report` returns the choices as that JSON.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ...runtime.cache import KERNEL_CACHE
from ...runtime.device import interpreter_mode

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the cheaper instruction


# ---- device-side helpers ------------------------------------------------------------------------

@triton.jit
def seq_coords(i_n, cu_seqlens, T, IS_VARLEN: tl.constexpr):
    """(batch row, first token of the sequence in its row, sequence length) of sequence ``i_n`` (int32).

    Offsets inside a tile stay int32 (64-bit tile offsets cost registers); the per-sequence base
    offsets are formed in int64 by :func:`row_offset`. One sequence must keep L * H * D < 2**31.
    """
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n)
        eos = tl.load(cu_seqlens + i_n + 1)
        i_b = i_n * 0
        seqlen = eos - bos
    else:
        i_b = i_n
        bos = i_n * 0
        seqlen = i_n * 0 + T
    return i_b, bos, seqlen


@triton.jit
def chunk_coords(i_tg, cu_seqlens, chunk_indices, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(sequence, chunk within the sequence) of global chunk ``i_tg`` (int32)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_tg)
        i_t = tl.load(chunk_indices + 2 * i_tg + 1)
    else:
        nt = tl.cdiv(T, BT)
        i_n = i_tg // nt
        i_t = i_tg % nt
    return i_n, i_t


@triton.jit
def row_offset(i_b, i_h, bos, T, H: tl.constexpr, D: tl.constexpr, HEAD_FIRST: tl.constexpr):
    """Element offset (int64) of token ``bos`` of head ``i_h`` in batch row ``i_b`` (D = 1 for the gate)."""
    if HEAD_FIRST:
        off = ((i_b.to(tl.int64) * H + i_h) * T + bos) * D
    else:
        off = ((i_b.to(tl.int64) * T + bos) * H + i_h) * D
    return off


@triton.jit
def chunk_gate(g, o_t, m_t, last, SG: tl.constexpr):
    """Chunk-local inclusive cumulative log2-decay of the chunk's tokens and its value at ``last``.

    Tokens past the end load 0, so the cumulative sum stays flat there.
    """
    b_g = tl.cumsum(tl.load(g + o_t * SG, mask=m_t, other=0.0).to(tl.float32) * 1.4426950408889634, 0)
    b_gl = tl.sum(tl.where(o_t == last, b_g, 0.0), 0)
    return b_g, b_gl


# ---- host-side bookkeeping ----------------------------------------------------------------------

def next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


@dataclass
class SeqInfo:
    """Where the sequences are: B rows of T tokens, NS sequences (lengths on the host)."""

    B: int
    T: int
    H: int
    K: int
    V: int
    head_first: bool
    cu_seqlens: Optional[torch.Tensor] = None  # int32 [NS + 1] on the kernel device
    lengths: List[int] = field(default_factory=list)
    _plans: Dict[int, "ChunkPlan"] = field(default_factory=dict, repr=False)

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def num_seqs(self) -> int:
        return len(self.lengths) if self.varlen else self.B

    def plan(self, BT: int) -> "ChunkPlan":
        if BT not in self._plans:
            self._plans[BT] = ChunkPlan.build(self, BT)
        return self._plans[BT]

    def strides(self) -> Tuple[int, int, int]:
        """Token strides of q/k, v/o and g."""
        if self.head_first:
            return self.K, self.V, 1
        return self.H * self.K, self.H * self.V, self.H


@dataclass
class ChunkPlan:
    BT: int
    num_chunks: int                                 # over all sequences
    chunk_offsets: Optional[torch.Tensor] = None    # int32 [NS + 1] (varlen)
    chunk_indices: Optional[torch.Tensor] = None    # int32 [num_chunks, 2]: (sequence, chunk) (varlen)
    last_chunk: List[int] = field(default_factory=list)

    @staticmethod
    def build(info: SeqInfo, BT: int) -> "ChunkPlan":
        if not info.varlen:
            return ChunkPlan(BT, info.B * triton.cdiv(info.T, BT))
        per = [triton.cdiv(n, BT) for n in info.lengths]
        offs = [0]
        for p in per:
            offs.append(offs[-1] + p)
        idx = [(n, t) for n, p in enumerate(per) for t in range(p)]
        dev = info.cu_seqlens.device
        co = torch.tensor(offs, dtype=torch.int32, device=dev)
        ci = (torch.tensor(idx, dtype=torch.int32, device=dev).reshape(-1, 2) if idx
              else torch.zeros(0, 2, dtype=torch.int32, device=dev))
        return ChunkPlan(BT, offs[-1], co, ci)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs use exact IEEE products (TF32 would break the float32 error rule); others ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ---- configs -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _overrides() -> Dict[str, Dict[str, int]]:
    raw = os.environ.get("ATTENTION_PROTO_LINEAR_CONFIG", "")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"ATTENTION_PROTO_LINEAR_CONFIG is not valid JSON ({e}); got {raw!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"ATTENTION_PROTO_LINEAR_CONFIG must be a JSON object; got {raw!r}")
    return data


#: the session-2 forward tiles (chunk_o 64 x 64 at chunk 64, chunk_h_long's deeper pipeline); on since
#: scripts/bench_linear.py on an H100 (session 3): with gate="cumsum", gated forward 1.00x fla-core at
#: N4k and 1.32x at N16k (the previous tiles and inline gate: 0.78x / 0.75x in the same run)
NEW_FORWARD_TILES = True


def kernel_config(name: str, BT: int, K: int, V: int) -> Dict[str, int]:
    """BK, BV, num_warps, num_stages of one kernel for chunk size BT and head dims K, V
    (chunk_dqk also DST, the form of its dk product: see chunk_backward).

    Under the interpreter one block covers the padded head dims (fewest programs). On a GPU
    the defaults are the largest tiles that ptxas compiles for sm_90 without spilling
    registers (checked ahead of time for K = V = 128 and chunks 32/64/128, bf16; one case
    that keeps a small spill is marked), to be confirmed or replaced by timing
    (``ATTENTION_PROTO_LINEAR_TUNE=1``). The state kernels (chunk_h, chunk_dh) walk the
    chunks in order, so they take 64 x 64 state tiles for parallelism across programs;
    ``chunk_h_long`` is chunk_h's config when its programs cannot fill the GPU (see
    :func:`.chunk.chunk_fwd_h`). chunk_o at chunk 64 takes fla-core's tuned tile instead.
    Override example: ``{"chunk_o@64": {"BK": 128, "BV": 128, "num_warps": 8, "num_stages": 2}}``
    restores the earlier chunk_o tile.
    """
    Kp, Vp = next_pow2(K), next_pow2(V)
    wide = Kp > 128          # 256-wide heads: halve the V tile of the K-looping kernels
    if interpreter_mode():
        cfg = dict(BK=Kp, BV=Vp, num_warps=4, num_stages=1)
        if name == "recurrent":
            cfg["BV"] = min(Vp, 32)
        if name == "chunk_dqk":
            cfg["DST"] = 0
    elif name in ("chunk_h", "chunk_dh", "chunk_h_long"):
        # chunk_h_long: chunk_h when there are too few (sequence, head, tile) programs to fill the SMs
        # twice (long sequences, small batch). Each program then waits on its own k/v loads every step;
        # 4 stages keep three chunks' loads in flight (Triton issues a load num_stages - 1 steps ahead)
        # (3 at chunk 128: two programs per SM must still fit in shared memory)
        cfg = dict(BK=min(64, Kp), BV=min(64, Vp), num_warps=8 if BT >= 128 else 4,
                   num_stages=(4 if BT <= 64 else 3) if (name == "chunk_h_long" and NEW_FORWARD_TILES) else 2)
    elif name == "chunk_o" and BT == 64 and not wide and NEW_FORWARD_TILES and Kp >= 64 and Vp >= 64:
        # fla-core's autotuned choice on the H100 (both gates): K in two pipelined 64-wide steps, 4 warps.
        # The single 128 x 128 step needs 173-176 registers gated (one 8-warp CTA per SM; ungated 128: two)
        # Only for full 64 x 64 tiles: with 4 warps and a 16- or 32-wide tile (V or K <= 32) Triton 3.6's
        # code reads shared memory out of bounds on the H100 (compute-sanitizer, GPU fuzz of session 4:
        # wrong outputs, then an illegal address); the 8-warp tile below is clean there
        cfg = dict(BK=64, BV=64, num_warps=4, num_stages=3)
    elif name in ("chunk_o", "chunk_dv"):
        bv = min(64 if (BT >= 128 or wide) else 128, Vp)
        cfg = dict(BK=min(128, Kp), BV=bv, num_warps=8 if BT * (bv + BT) > 4096 else 4, num_stages=2)
    elif name == "chunk_dqk":
        # dq, dk^T and ds accumulate together: narrow K tiles as the chunk grows (BT 128 keeps a
        # small spill at 32 x 32, every wider tile spills more)
        bk = min({32: 128, 64: 64}.get(BT, 32), Kp)
        cfg = dict(BK=bk, BV=min(32, Vp), num_warps=8 if BT * (2 * bk + BT) > 4096 else 4, num_stages=2, DST=0)
    elif name == "recurrent":
        cfg = dict(BK=Kp, BV=min(32, Vp), num_warps=4, num_stages=1)
    else:  # pragma: no cover - a typo in a kernel name
        raise KeyError(name)
    ov = _overrides()
    # chunk_h_long takes chunk_h's overrides first, then its own
    bases = ("chunk_h", name) if name == "chunk_h_long" else (name,)
    for key in [k for b in bases for k in (b, f"{b}@{BT}")]:
        if key in ov:
            cfg.update({k: int(v) for k, v in ov[key].items()})
    if name == "recurrent":
        cfg["BK"] = Kp  # the recurrent kernel keeps all of K in one tile
    return cfg


# ---- launching, with optional tuning ---------------------------------------------------------------

#: (kernel name, BT, K, V, key) -> config chosen (the default, an override or a tuned one)
_CHOSEN: Dict[Tuple, Dict[str, int]] = {}


def _candidates(name: str, K: int, V: int) -> List[Dict[str, int]]:
    Kp, Vp = next_pow2(K), next_pow2(V)
    if name in ("chunk_h", "chunk_dh", "chunk_h_long"):
        raw = [(bk, bv, w, 2) for bk in (32, 64) for bv in (32, 64) for w in (4, 8)] + [(128, 64, 8, 2)]
        raw += [(64, 64, 4, s) for s in (3, 4)] + [(64, 32, 4, s) for s in (3, 4)]
    elif name in ("chunk_o", "chunk_dv"):
        raw = [(64, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3), (128, 64, 8, 2),
               (128, 64, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2)]
    elif name == "chunk_dqk":
        raw = [(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2), (64, 128, 8, 2),
               (32, 64, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2)]
    else:
        return []
    seen, out = set(), []
    for bk, bv, w, s in raw:
        c = (min(bk, Kp), min(bv, Vp), w, s)
        if c not in seen:
            seen.add(c)
            out.append(dict(BK=c[0], BV=c[1], num_warps=w, num_stages=s))
    return out


def tuning() -> bool:
    """True when launches may tune their config (ATTENTION_PROTO_LINEAR_TUNE, GPU only)."""
    return (os.environ.get("ATTENTION_PROTO_LINEAR_TUNE", "0") not in ("", "0", "false", "False")
            and not interpreter_mode())


def launch(name: str, kernel: Any, grid_fn: Callable[[Dict[str, int]], Tuple[int, ...]], args: Tuple[Any, ...],
           consts: Dict[str, Any], BT: int, K: int, V: int, tunable: bool = True) -> Dict[str, int]:
    """Launch ``kernel`` through the kernel cache with its config; returns the config used.

    ``tunable`` must be False for a launch that is not idempotent (e.g. a state updated in place).
    """
    key = (name, BT, K, V, tuple(sorted((k, v) for k, v in consts.items() if isinstance(v, (bool, int, str)))),
           tuple(str(getattr(a, "dtype", "")) for a in args))
    cfg = _CHOSEN.get(key)
    if cfg is None:
        cfg = kernel_config(name, BT, K, V)
        if tunable and tuning() and not _overrides():
            cfg = _tune(name, kernel, grid_fn, args, consts, K, V, cfg)
        _CHOSEN[key] = cfg
    grid = grid_fn(cfg)
    if all(grid):
        KERNEL_CACHE.launch(kernel, grid, *args, **consts, **cfg)
    return cfg


def _tune(name, kernel, grid_fn, args, consts, K, V, default):
    from triton.testing import do_bench

    best, best_ms = default, float("inf")
    for cfg in [default] + [dict(c, **({"DST": default["DST"]} if "DST" in default else {}))
                            for c in _candidates(name, K, V) if c != default]:
        grid = grid_fn(cfg)
        if not all(grid):
            return default
        try:
            ms = do_bench(lambda: kernel[grid](*args, **consts, **cfg), warmup=5, rep=20)
        except Exception:  # noqa: BLE001 - a candidate that does not compile or fit is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best


def config_report() -> Dict[str, Dict[str, int]]:
    """The configs chosen so far, as ``{"name@BT": {...}}`` (the ATTENTION_PROTO_LINEAR_CONFIG format)."""
    return {f"{k[0]}@{k[1]}": dict(v) for k, v in _CHOSEN.items()}
