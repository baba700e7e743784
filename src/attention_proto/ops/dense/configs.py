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
Entries of another GPU than the current one are ignored when ``gpu`` is present and differs, and
so are entries that :func:`config_problems` rejects (e.g. a warp-specialized 4-warp tile).

Known compile limits (triton 3.6, sm_90), checked by :func:`config_problems`:

- ``tma+ws`` (warp specialization) needs ``num_warps=8``: with 4 warps the
  ``NVGPUWarpSpecialization`` pass fails ("PassManager::run failed") for every tile, stage count
  and modifier tried (cross-compiled for sm_90, and on an H100); with 8 warps it compiles -- to
  the very cubin of path ``tma`` (checked for 128x64 w8 s3, D=128: byte-identical), i.e. the pass
  does not specialize this loop on sm_90, and "ws beats tma" differences are run-to-run noise.
- Fused RoPE (portable path) holds more shared memory per pipeline stage: the K tile, its partner
  columns and V in the input dtype plus fp32 cos/sin tiles (:func:`shared_memory_bytes`). With 3
  stages D=128 needs 256 KiB (> the 227 KiB of an H100), so RoPE configs are shrunk to fit.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, List, Optional

import torch

from ...runtime.device import interpreter_mode

PATHS = ("portable", "tma", "tma+ws")
TABLE_PATH = Path(__file__).resolve().parents[2] / "data" / "dense_fwd_configs.json"

# Hopper limits used to prune sweep candidates that cannot compile or would spill badly
_SMEM_BYTES = 227 * 1024
_MAX_ACC_REGS_PER_THREAD = 128
#: mbarriers and the like next to the tiles (the TMA kernels use ~1 KiB)
_SMEM_SLACK = 1024

#: Problems with at most this many score entries (B * H * Nq * Nk) run the portable kernel even where
#: the TMA path applies: the kernel lasts a few microseconds (2^22 scores at D=128 are ~2 GFLOP, ~5 us
#: on an H100), host work dominates, and the portable launch has no tensor descriptors to build/encode.
SMALL_PROBLEM_SCORES = 1 << 22

#: warp specialization (path "tma+ws") compiles only with this many warps in triton 3.6
WS_NUM_WARPS = 8

#: called by :func:`reload_table` (the forward's launch-plan cache registers its clear() here)
RELOAD_HOOKS: List[Callable[[], None]] = []


@dataclass(frozen=True)
class FwdConfig:
    """One forward launch: tile sizes, warps, pipeline depth, and which kernel (path).

    ``path``: "portable" (pointer loads, any strides, runs under the interpreter), "tma"
    (tensor descriptors + software pipelining, Hopper) or "tma+ws" (the same with warp
    specialization of the main loop; experimental in triton 3.6, needs 8 warps).
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


def shared_memory_bytes(cfg: FwdConfig, D: int, dtype: torch.dtype, rope: bool = False, split: bool = False) -> int:
    """Estimated shared memory of one program (bytes), fitted to cross-compiled sm_90 kernels.

    Without RoPE: the Q tile plus ``num_stages`` buffered (K, V) tiles (exact for the portable
    kernel, +1 KiB of barriers on the TMA path). With RoPE (portable only): Q, plus per buffered
    stage (``num_stages - 1`` of them) the K tile, its partner columns and V in the input dtype and
    the fp32 cos/sin tiles, plus the rotated K (and V with 1 stage) staged for the dot. Slightly
    conservative for interleaved RoPE (which needs 2 bytes less per element and stage).
    ``split`` (the forward's split scores, portable only): the residue tiles add one Q tile and, with
    RoPE in the kernel, one K tile, else one buffered K tile per stage (exact against 8 sm_90
    cross-compiles at D128/D256, session 9).
    """
    elt = torch.empty((), dtype=dtype).element_size()
    bd = block_d(D)
    stages = max(1, cfg.num_stages)
    q_tile = cfg.BLOCK_M * bd * elt
    kv = cfg.BLOCK_N * bd
    lo = (q_tile + (1 if rope else stages) * kv * elt) if split else 0
    if not rope:
        return q_tile + stages * 2 * kv * elt + lo + _SMEM_SLACK
    per_stage = 4 * elt + 8
    staged = 2 * elt if stages == 1 else elt
    return q_tile + kv * ((stages - 1) * per_stage + staged) + lo + _SMEM_SLACK


def fits(cfg: FwdConfig, D: int, dtype: torch.dtype, rope: bool = False, split: bool = False) -> bool:
    """Rough feasibility on Hopper: shared memory (:func:`shared_memory_bytes`) and accumulator registers."""
    bd = block_d(D)
    acc_regs = cfg.BLOCK_M * bd // (cfg.num_warps * 32)
    score_regs = cfg.BLOCK_M * cfg.BLOCK_N // (cfg.num_warps * 32)
    return (shared_memory_bytes(cfg, D, dtype, rope, split) <= _SMEM_BYTES
            and acc_regs + score_regs <= _MAX_ACC_REGS_PER_THREAD + 64)


def config_problems(cfg: FwdConfig) -> List[str]:
    """Why ``cfg`` cannot compile on Hopper with triton 3.6, independent of the inputs (empty: none known)."""
    out = []
    if cfg.path not in PATHS:
        out.append(f"path must be one of {PATHS}; got {cfg.path!r}")
    if cfg.path == "tma+ws" and cfg.num_warps != WS_NUM_WARPS:
        out.append(f"warp specialization (path 'tma+ws') needs num_warps={WS_NUM_WARPS}; got num_warps={cfg.num_warps} "
                   f"(triton 3.6 fails in its NVGPUWarpSpecialization pass)")
    return out


def shrink_to_fit(cfg: FwdConfig, D: int, dtype: torch.dtype, rope: bool = False, split: bool = False) -> FwdConfig:
    """``cfg`` with fewer stages, then narrower key blocks, then fewer rows until :func:`fits` holds."""
    while not fits(cfg, D, dtype, rope, split):
        if cfg.num_stages > 2:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.BLOCK_N > 32:
            cfg = replace(cfg, BLOCK_N=cfg.BLOCK_N // 2)
        elif cfg.num_stages > 1:
            cfg = replace(cfg, num_stages=1)
        elif cfg.BLOCK_M > 64 and cfg.path != "tma+ws":
            cfg = replace(cfg, BLOCK_M=cfg.BLOCK_M // 2, num_warps=min(cfg.num_warps, 4))
        else:
            break
    return cfg


def heuristic_forward_config(D: int, dtype: torch.dtype, causal: bool, N: int, path: str = "portable",
                             rope: bool = False) -> FwdConfig:
    """The fallback when no tuned entry applies.

    - Interpreter: 16 x 16 tiles (the interpreter runs programs one by one; tiny tiles keep
      CPU tests fast), 1 stage.
    - ``tma`` (what ``auto`` means on Hopper): from one smoke run on an H100 (triton 3.6, torch
      2.11, bf16, B*N = 16k, H*D = 2048; TFLOPS, ours vs SDPA cuDNN in the same process). The flash
      study's generated table supersedes these numbers.

      ======  ========  =====================================  ===============================
      D       N         best of the run (causal too)           runner-up
      ======  ========  =====================================  ===============================
      64      4k        64x64 w4 s3: 444 (causal 398)          128x64 w8 s3: 434; cuDNN 480
      128     4k        64x64 w4 s3: 520 (causal 483)          128x64 w8 s3: 508; cuDNN 676
      128     16k       128x64 w8 s3: 520 (causal 517)         +ws: 535; portable 528/522
      256     4k, 16k   128x64 w8 s2: 515 (causal 16k: 538)    portable 64x64 w4 s2: 377
      ======  ========  =====================================  ===============================

      So D <= 64, and D = 128 up to N = 4k: 64 x 64, 4 warps, 3 stages; D = 128 beyond 4k:
      128 x 64, 8 warps, 3 stages; D = 256: 128 x 64, 8 warps, 2 stages. 128 x 128 tiles with 8
      warps lost (296 at D=64, 460 at D=128) and are never the default.
    - ``tma+ws``: 128 x 64, 8 warps (warp specialization needs 8), 3 stages (2 for D = 256).
    - ``portable`` fp16/bf16: BLOCK_M 128, BLOCK_N 128 for D <= 64 else 64; num_warps 4 for
      D <= 64 else 8; num_stages 3 (2 for D > 128). D > 128 uses BLOCK_M 64 so the fp32
      accumulator [BLOCK_M, BLOCK_D] stays in registers and K/V stages fit shared memory.
      fp32 (ieee dots, twice the bytes): BLOCK_N halved, num_stages 2. Short sequences (N <= 64)
      use BLOCK_M 64 to avoid idle rows.
    - ``rope`` (portable only): the config is shrunk (stages, then BLOCK_N) until it fits shared
      memory with the RoPE operands (:func:`shared_memory_bytes`).
    """
    if interpreter_mode():
        return FwdConfig(16, 16, 4, 1, "portable")
    bd = block_d(D)
    p = "portable" if path == "auto" else path
    if p == "tma":
        if bd <= 64 or (bd <= 128 and N <= 4096):
            cfg = FwdConfig(64, 64, 4, 3, "tma")
        elif bd <= 128:
            cfg = FwdConfig(128, 64, 8, 3, "tma")
        else:
            cfg = FwdConfig(128, 64, 8, 2, "tma")
        return shrink_to_fit(cfg, D, dtype)
    if p == "tma+ws":
        return shrink_to_fit(FwdConfig(128, 64, WS_NUM_WARPS, 3 if bd <= 128 else 2, "tma+ws"), D, dtype)
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
    return shrink_to_fit(FwdConfig(bm, bn, warps, stages, p), D, dtype, rope)


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
    """Forget the cached table (after the study rewrote it) and every choice made from it."""
    _load_table.cache_clear()
    pick_forward_config.cache_clear()
    for hook in RELOAD_HOOKS:
        hook()


def _from_table(D: int, dtype: torch.dtype, causal: bool, N: int, paths: Iterable[str]) -> Optional[FwdConfig]:
    paths = tuple(paths)
    dn = _dtype_name(dtype)
    rows = []
    for e in _load_table():
        if e.get("dtype") != dn or bool(e.get("causal")) != bool(causal) or e.get("path", "portable") not in paths:
            continue
        try:
            cfg = FwdConfig(int(e["BLOCK_M"]), int(e["BLOCK_N"]), int(e["num_warps"]), int(e["num_stages"]),
                            str(e.get("path", "portable")))
            int(e["D"]), int(e["N"])
        except (KeyError, ValueError, TypeError):
            continue
        if not config_problems(cfg):
            rows.append((e, cfg))
    if not rows:
        return None
    ds = sorted({int(e["D"]) for e, _ in rows})
    wanted = [d for d in ds if d >= D]
    if not wanted:
        return None
    d_pick = wanted[0]
    rows = [r for r in rows if int(r[0]["D"]) == d_pick]
    ln = math.log2(max(N, 1))
    n_best = min({int(e["N"]) for e, _ in rows}, key=lambda n: abs(math.log2(max(n, 1)) - ln))
    rows = [r for r in rows if int(r[0]["N"]) == n_best]
    return max(rows, key=lambda r: float(r[0].get("tflops", 0.0)))[1]


@functools.lru_cache(maxsize=512)
def pick_forward_config(D: int, dtype: torch.dtype, causal: bool, N: int, path: str = "auto",
                        rope: bool = False, split: bool = False) -> FwdConfig:
    """The config for head dim D, dtype, causal flag, sequence length N and path.

    ``path``: "portable", "tma", "tma+ws", or "auto" (any path the table ranks best; without a
    table "tma" -- the caller passes "auto" only where the TMA path applies). ``rope``: the call
    rotates q and k; where the chosen config is the portable kernel's (also when "auto" picks a
    portable table entry), the tile loads rotate them and their extra shared memory may shrink the
    config (:func:`shrink_to_fit`; the TMA path rotates the keys in a separate pass and needs none).
    ``split``: the forward's split scores (portable only), whose residue tiles shrink it further.
    Cached per distinct argument tuple (callers bucket N to a power of two).
    """
    if path not in PATHS + ("auto",):
        raise ValueError(f"path must be one of {PATHS + ('auto',)}; got {path!r}")
    if interpreter_mode():
        return heuristic_forward_config(D, dtype, causal, N, "portable")
    allowed = PATHS if path == "auto" else (path,)
    cfg = _from_table(D, dtype, causal, N, allowed)
    if cfg is not None:
        # an "auto" pick may be a portable entry: its fused RoPE needs the shrink as much as a "portable" one
        return shrink_to_fit(cfg, D, dtype, rope, split) if ((rope or split) and cfg.path == "portable") else cfg
    cfg = heuristic_forward_config(D, dtype, causal, N, "tma" if path == "auto" else path, rope)
    return shrink_to_fit(cfg, D, dtype, rope, split) if (split and cfg.path == "portable") else cfg


def forward_candidates(D: int, dtype: torch.dtype, paths: Iterable[str] = PATHS,
                       include_known_failures: bool = False) -> List[FwdConfig]:
    """Configs for the tile sweep: BLOCK_M {64,128} x BLOCK_N {32,64,128} x warps {4,8} x stages {2,3,4}
    x path, without the ones :func:`fits` rejects, without 8 warps on 64-row tiles (two
    warpgroups need at least 128 rows of wgmma work on Hopper) and, unless
    ``include_known_failures``, without the ones :func:`config_problems` rejects (4-warp
    warp-specialized tiles: a sweep may still time them to record the compile failure)."""
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
                        if fits(cfg, D, dtype) and (include_known_failures or not config_problems(cfg)):
                            out.append(cfg)
    return out
