"""Launch configurations of the dense forward: the picker, its tuned table and the sweep candidates.

:func:`pick_forward_config` reads ``attention_proto/data/dense_fwd_configs.json`` when it exists
(the flash study writes it; never type tuned numbers into it by hand) and otherwise falls back to
a documented heuristic. Table schema (version 1)::

    {"version": 1,
     "gpu": "nvidia-h100-80gb-hbm3",          # runtime.device.gpu_slug() of the tuning card
     "entries": [
        {"D": 128, "dtype": "bfloat16", "causal": true, "N": 4096, "path": "tma",
         "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3,
         "tflops": 512.0},                    # optional: the measured rate, used to rank paths
        ...]}

Lookup: entries with the same D (else the smallest tabulated D >= D), dtype and causal flag and an
allowed path; among them the N nearest in log2; for ``path="auto"`` the best ``tflops`` at that N.
Entries of another GPU than the current one are ignored when ``gpu`` is present and differs.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, List, Optional

import torch

from ...runtime.device import interpreter_mode

PATHS = ("portable", "tma", "tma+ws")
TABLE_PATH = Path(__file__).resolve().parents[2] / "data" / "dense_fwd_configs.json"

# Hopper limits used to prune sweep candidates that cannot compile or would spill badly
_SMEM_BYTES = 227 * 1024
_MAX_ACC_REGS_PER_THREAD = 128


@dataclass(frozen=True)
class FwdConfig:
    """One forward launch: tile sizes, warps, pipeline depth, and which kernel (path).

    ``path``: "portable" (pointer loads, any strides, runs under the interpreter), "tma"
    (tensor descriptors + software pipelining, Hopper) or "tma+ws" (the same with warp
    specialization of the main loop; experimental in triton 3.6).
    """

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    path: str = "portable"

    def as_dict(self) -> dict:
        return asdict(self)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def block_d(D: int) -> int:
    """BLOCK_D: the next power of two >= max(D, 16) (tl.dot needs K >= 16)."""
    return max(16, 1 << (int(D) - 1).bit_length())


def heuristic_forward_config(D: int, dtype: torch.dtype, causal: bool, N: int, path: str = "portable") -> FwdConfig:
    """The fallback when no tuned entry applies.

    - Interpreter: 16 x 16 tiles (the interpreter runs programs one by one; tiny tiles keep
      CPU tests fast), 1 stage.
    - GPU, fp16/bf16: BLOCK_M 128, BLOCK_N 128 for D <= 64 else 64; num_warps 4 for D <= 64
      else 8; num_stages 3 (2 for D > 128). D > 128 uses BLOCK_M 64 so the fp32 accumulator
      [BLOCK_M, BLOCK_D] stays in registers and K/V stages fit shared memory.
    - GPU, fp32 (ieee dots, twice the bytes): BLOCK_N halved, num_stages 2.
    - Short sequences (N <= 64) use BLOCK_M 64 to avoid idle rows.
    """
    if interpreter_mode():
        return FwdConfig(16, 16, 4, 1, "portable")
    bd = block_d(D)
    if bd <= 64:
        bm, bn, warps, stages = 128, 128, 4, 3
    elif bd <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 64, 64, 4, 2
    if dtype == torch.float32:
        bn = max(32, bn // 2)
        stages = 2
        if bd > 128:
            bn = 32
    if N <= 64:
        bm = 64
        warps = 4
    p = "portable" if path == "auto" else path
    return FwdConfig(bm, bn, warps, stages, p)


@functools.lru_cache(maxsize=1)
def _load_table() -> tuple:
    if not TABLE_PATH.exists():
        return ()
    try:
        data = json.loads(TABLE_PATH.read_text())
    except (OSError, ValueError):
        return ()
    gpu = data.get("gpu")
    if gpu and not interpreter_mode():
        from ...runtime.device import gpu_slug

        if gpu != gpu_slug():
            return ()
    return tuple(e for e in data.get("entries", []) if isinstance(e, dict))


def reload_table() -> None:
    """Forget the cached table (after the study rewrote it)."""
    _load_table.cache_clear()
    pick_forward_config.cache_clear()


def _from_table(D: int, dtype: torch.dtype, causal: bool, N: int, paths: Iterable[str]) -> Optional[FwdConfig]:
    paths = tuple(paths)
    dn = _dtype_name(dtype)
    rows = [e for e in _load_table() if e.get("dtype") == dn and bool(e.get("causal")) == bool(causal)
            and e.get("path", "portable") in paths]
    if not rows:
        return None
    ds = sorted({int(e["D"]) for e in rows if "D" in e})
    wanted = [d for d in ds if d >= D]
    if not wanted:
        return None
    d_pick = wanted[0]
    rows = [e for e in rows if int(e.get("D", -1)) == d_pick]
    ln = math.log2(max(N, 1))
    n_best = min({int(e["N"]) for e in rows}, key=lambda n: abs(math.log2(max(n, 1)) - ln))
    rows = [e for e in rows if int(e["N"]) == n_best]
    best = max(rows, key=lambda e: float(e.get("tflops", 0.0)))
    try:
        return FwdConfig(int(best["BLOCK_M"]), int(best["BLOCK_N"]), int(best["num_warps"]),
                         int(best["num_stages"]), str(best.get("path", "portable")))
    except (KeyError, ValueError, TypeError):
        return None


@functools.lru_cache(maxsize=512)
def pick_forward_config(D: int, dtype: torch.dtype, causal: bool, N: int, path: str = "auto") -> FwdConfig:
    """The config for head dim D, dtype, causal flag, sequence length N and path.

    ``path``: "portable", "tma", "tma+ws", or "auto" (any path the table ranks best; without a
    table "tma" -- the caller passes "auto" only where the TMA path applies).
    Cached per distinct argument tuple (callers bucket N to a power of two).
    """
    if path not in PATHS + ("auto",):
        raise ValueError(f"path must be one of {PATHS + ('auto',)}; got {path!r}")
    if interpreter_mode():
        return heuristic_forward_config(D, dtype, causal, N, "portable")
    allowed = PATHS if path == "auto" else (path,)
    cfg = _from_table(D, dtype, causal, N, allowed)
    if cfg is not None:
        return cfg
    return heuristic_forward_config(D, dtype, causal, N, "tma" if path == "auto" else path)


def fits(cfg: FwdConfig, D: int, dtype: torch.dtype) -> bool:
    """Rough feasibility on Hopper: shared memory for Q + stages x (K + V), accumulator registers."""
    elt = torch.empty((), dtype=dtype).element_size()
    bd = block_d(D)
    stages = max(1, cfg.num_stages)
    smem = (cfg.BLOCK_M * bd + stages * 2 * cfg.BLOCK_N * bd) * elt
    acc_regs = cfg.BLOCK_M * bd // (cfg.num_warps * 32)
    score_regs = cfg.BLOCK_M * cfg.BLOCK_N // (cfg.num_warps * 32)
    return smem <= _SMEM_BYTES and acc_regs + score_regs <= _MAX_ACC_REGS_PER_THREAD + 64


def forward_candidates(D: int, dtype: torch.dtype, paths: Iterable[str] = PATHS) -> List[FwdConfig]:
    """Configs for the tile sweep: BLOCK_M {64,128} x BLOCK_N {32,64,128} x warps {4,8} x stages {2,3,4}
    x path, without the ones :func:`fits` rejects and without 8 warps on 64-row tiles (two
    warpgroups need at least 128 rows of wgmma work on Hopper)."""
    out = []
    for path in paths:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}; got {path!r}")
        for bm in (64, 128):
            for bn in (32, 64, 128):
                for warps in (4, 8):
                    if warps == 8 and bm < 128:
                        continue
                    for stages in (2, 3, 4):
                        cfg = FwdConfig(bm, bn, warps, stages, path)
                        if fits(cfg, D, dtype):
                            out.append(cfg)
    return out
