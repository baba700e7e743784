#!/usr/bin/env python
"""Run every Triton kernel of the library once, at small odd shapes, for compute-sanitizer.

``scripts/sanitize.sh`` runs this file under ``compute-sanitizer --tool memcheck`` (then
racecheck, synccheck, initcheck) with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``: every tensor is its
own cudaMalloc, so a read or write past a tensor's end is outside any allocation and memcheck
sees it (inside PyTorch's cached blocks it would land in a neighbour's memory, unseen).

Each case launches one or more kernels (dense forward portable/TMA/run-time-flag paths, hooks,
varlen, RoPE, the dense backward in both modes, paged decode V1/V2 and the cache append, linear
chunked/recurrent forward and backward and the decode step) and checks its outputs are finite
where they must be. Without a GPU the same cases run under Triton's interpreter (GPU-only cases
are skipped): a smoke test of this script.

The kernels launched are read back from ``KERNEL_CACHE``; the kernels the source launches are
found by scanning ``src/attention_proto/ops`` (``KERNEL_CACHE.launch(k``, ``_Plan(k``,
``launch("name", k``), so a new kernel that no case covers is reported (``--strict``: exit 1).

Usage::

    python scripts/sanitize.py [--only REGEX] [--list] [--summary PATH.json] [--strict]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import attention_proto  # noqa: E402,F401  - interpreter switch before the kernels import
from attention_proto.runtime.cache import KERNEL_CACHE  # noqa: E402
from attention_proto.runtime.device import interpreter_mode, kernel_device  # noqa: E402

DEV = kernel_device()
GPU = DEV == "cuda"
LOW = torch.bfloat16 if GPU else torch.float16  # the interpreter computes no bf16
CASES: Dict[str, Callable[[], None]] = {}
GPU_ONLY: Dict[str, str] = {}  # case -> why it needs a GPU


def case(name: str, gpu_only: str = ""):
    def deco(fn):
        CASES[name] = fn
        if gpu_only:
            GPU_ONLY[name] = gpu_only
        return fn
    return deco


def rnd(*shape, dtype=None, scale=1.0):
    g = torch.Generator().manual_seed(hash(shape) % (2**31))
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype or LOW, device=DEV)


def finite(*ts):
    for t in ts:
        if t is not None and t.dtype.is_floating_point and not torch.isfinite(t).all():
            raise AssertionError(f"non-finite values in a {tuple(t.shape)} result")


def sync():
    if GPU:
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# dense forward
# ------------------------------------------------------------------------------------------------

def _qkv(B=2, H=4, Hkv=2, Nq=37, Nk=53, D=40, dtype=None):
    return rnd(B, H, Nq, D, dtype=dtype), rnd(B, Hkv, Nk, D, dtype=dtype), rnd(B, Hkv, Nk, D, dtype=dtype)


@case("dense_fwd_portable")
def _dense_fwd_portable():
    from attention_proto.ops.dense.forward import flash_attention_forward
    from attention_proto.ops.dense.rope import RopeSpec

    cfg = None  # these sizes are below SMALL_PROBLEM_SCORES: the picker's portable config
    runs = [
        dict(),
        dict(causal=True),
        dict(causal=True, window=(7, 0), softcap=20.0, alibi_slopes=True),
        dict(window=(5, 3)),
        dict(causal=True, rope=RopeSpec("half")),
        dict(rope=RopeSpec("interleaved", q_offset=3, k_offset=1)),
    ]
    for D, dt in ((40, LOW), (64, torch.float32), (72, torch.float16), (256, LOW)):
        q, k, v = _qkv(D=D, dtype=dt)
        for mods in runs:
            o, l = flash_attention_forward(q, k, v, config=cfg, **mods)
            finite(o)
    # BSHD views (strided), Nq > Nk (fully masked rows), Nk = 1
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(Nq=29, Nk=11))
    finite(flash_attention_forward(q, k, v, causal=True, config=cfg)[0])
    finite(flash_attention_forward(*_qkv(Nq=5, Nk=1), config=cfg)[0])


@case("dense_fwd_hooks")
def _dense_fwd_hooks():
    from attention_proto.ops.dense.forward import flash_attention_forward
    from attention_proto.ops.dense.mods_library import mask_mod, score_mod

    q, k, v = _qkv(Nq=37, Nk=37)
    sm = score_mod(softcap=15.0, alibi_heads=4)
    mm = mask_mod(window=(9, 0), causal=True)
    finite(flash_attention_forward(q, k, v, score_mod=sm)[0])
    finite(flash_attention_forward(q, k, v, mask_mod=mm)[0])
    finite(flash_attention_forward(q, k, v, score_mod=sm, mask_mod=mm, causal=True)[0])


@case("dense_fwd_varlen")
def _dense_fwd_varlen():
    from attention_proto.ops.dense.forward import flash_attention_forward
    from attention_proto.ops.dense.rope import RopeSpec

    lq, lk = [5, 0, 33, 1, 17], [9, 4, 33, 1, 0]
    cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32, device=DEV)
    ck = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32, device=DEV)
    q, k, v = rnd(sum(lq), 4, 40), rnd(sum(lk), 2, 40), rnd(sum(lk), 2, 40)
    for mods in (dict(), dict(causal=True, window=(6, -1), softcap=10.0, alibi_slopes=True),
                 dict(causal=True, rope=RopeSpec("half", q_offset=0))):
        o, _ = flash_attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, **mods)
        finite(o)
    # RoPE rotated first (the packed RoPE pass), then the plain varlen kernel: portable at D40, the
    # varlen TMA kernel at D64 (what "auto" takes for long varlen batches)
    from attention_proto.ops.dense.forward import portable_rope

    with portable_rope("rotate"):
        for d in (40, 64):
            q, k, v = rnd(sum(lq), 4, d), rnd(sum(lk), 2, d), rnd(sum(lk), 2, d)
            o, _ = flash_attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True,
                                           rope=RopeSpec("interleaved"))
            finite(o)


@case("dense_fwd_tma", gpu_only="TMA descriptors need a Hopper GPU")
def _dense_fwd_tma():
    from attention_proto.ops.dense.configs import FwdConfig, config_problems
    from attention_proto.ops.dense.forward import flash_attention_forward
    from attention_proto.ops.dense.rope import RopeSpec
    from attention_proto.runtime.device import is_hopper

    if not is_hopper():
        print("  (not Hopper: the TMA path does not apply; skipped)")
        return
    for path, cfg in (("tma", FwdConfig(64, 64, 4, 3, "tma")), ("tma", FwdConfig(128, 64, 8, 2, "tma")),
                      ("tma+ws", FwdConfig(128, 64, 8, 2, "tma+ws"))):
        if config_problems(cfg):
            continue
        for D in (64, 128):
            q, k, v = _qkv(Nq=197, Nk=253, D=D)
            for mods in (dict(), dict(causal=True), dict(window=(31, 5), softcap=20.0, alibi_slopes=True),
                         dict(causal=True, softcap=20.0), dict(causal=True, alibi_slopes=True),
                         dict(causal=True, rope=RopeSpec("half")), dict(rope=RopeSpec("interleaved", q_offset=4))):
                finite(flash_attention_forward(q, k, v, config=cfg, **mods)[0])
    # packed sequences through the varlen TMA kernel: tiles run into the next sequence and past the end
    lq, lk = [5, 0, 133, 1, 77], [9, 4, 133, 1, 0]
    cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32, device=DEV)
    ck = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32, device=DEV)
    q, k, v = rnd(sum(lq), 4, 128), rnd(sum(lk), 2, 128), rnd(sum(lk), 2, 128)
    for cfg in (FwdConfig(64, 64, 4, 3, "tma"), FwdConfig(128, 128, 8, 3, "tma")):
        for mods in (dict(), dict(causal=True), dict(causal=True, window=(20, 0), softcap=10.0),
                     dict(causal=True, alibi_slopes=True)):
            finite(flash_attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, config=cfg, **mods)[0])


@case("dense_fwd_key_start")
def _dense_fwd_key_start():
    """Per-row first keys (packed documents; session 7): both forward kernels read KEY_START."""
    from attention_proto.ops.dense.configs import FwdConfig
    from attention_proto.ops.dense.forward import flash_attention_forward
    from attention_proto.runtime.device import is_hopper

    def starts(B, N):
        ks = torch.zeros(B, N, dtype=torch.int32)
        for b in range(B):
            for c in (3, 17 + b, N // 2):
                ks[b, c:] = c
        ks[0, 5] = 2**31 - 1  # clamped: a fully masked row
        return ks.to(DEV)

    runs = (dict(causal=True), dict(causal=True, window=(6, -1), softcap=20.0), dict(causal=True, alibi_slopes=True))
    q, k, v = _qkv(Nq=61, Nk=61, D=64)
    for mods in runs:
        finite(flash_attention_forward(q, k, v, key_start=starts(2, 61), **mods)[0])
    if is_hopper():
        for cfg in (FwdConfig(64, 64, 4, 3, "tma"), FwdConfig(128, 64, 8, 2, "tma")):
            q, k, v = _qkv(Nq=197, Nk=197, D=128)
            for mods in runs:
                finite(flash_attention_forward(q, k, v, key_start=starts(2, 197), config=cfg, **mods)[0])


@case("dense_fwd_runtime")
def _dense_fwd_runtime():
    from attention_proto.ops.dense.forward_runtime import flash_attention_forward_runtime

    q, k, v = _qkv()
    for mods in (dict(), dict(causal=True, softcap=20.0, alibi_slopes=True), dict(window=(5, 2))):
        finite(flash_attention_forward_runtime(q, k, v, **mods)[0])
        finite(flash_attention_forward_runtime(q, k, v, runtime_head_dim=True, **mods)[0])


@case("dense_rope_kernel")
def _dense_rope_kernel():
    from attention_proto.ops.dense.rope import RopeSpec
    from attention_proto.ops.dense.rope_kernel import apply_rope

    for D in (72, 64):  # 72: the partner-load kernel; 64: the register-shuffle kernel (5 heads: a partial group)
        q, k, _ = _qkv(Nq=21, Nk=53, D=D, H=5, Hkv=1) if D == 64 else _qkv(Nq=21, Nk=53, D=D)
        for spec in (RopeSpec("half"), RopeSpec("interleaved", q_offset=2, k_offset=3)):
            finite(*apply_rope(q, k, spec))


# ------------------------------------------------------------------------------------------------
# dense backward
# ------------------------------------------------------------------------------------------------

@case("dense_bwd")
def _dense_bwd():
    from attention_proto.ops.dense.interface import attention, attention_varlen
    from attention_proto.ops.dense.rope import RopeSpec

    for D in (40, 64):
        q, k, v = _qkv(Nq=37, Nk=45, D=D)
        for det in (True, False):
            for mods in (dict(causal=True), dict(window=(7, 2), softcap=20.0, alibi_slopes=True),
                         dict(causal=True, rope=RopeSpec("half"))):
                leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                attention(*leaves, deterministic=det, **mods).sum().backward()
                finite(*(t.grad for t in leaves))
    lq = [5, 0, 33, 17]
    cu = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32, device=DEV)
    leaves = [rnd(sum(lq), h, 40).requires_grad_() for h in (4, 2, 2)]
    attention_varlen(*leaves, cu, cu, causal=True, deterministic=False).sum().backward()
    finite(*(t.grad for t in leaves))


@case("dense_bwd_split")
def _dense_bwd_split():
    # RoPE + softcap on 16-bit inputs: the rope pass writes the residues, both portable kernels
    # read them (split scores); ragged sizes, GQA, both dQ modes
    from attention_proto.ops.dense.interface import attention
    from attention_proto.ops.dense.rope import RopeSpec

    for D in (40, 64):
        q, k, v = _qkv(Nq=37, Nk=45, D=D)
        for det in (True, False):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            attention(*leaves, deterministic=det, causal=True, softcap=5.0, alibi_slopes=True,
                      rope=RopeSpec("half")).sum().backward()
            finite(*(t.grad for t in leaves))


@case("dense_bwd_tma", gpu_only="TMA descriptors need a Hopper GPU")
def _dense_bwd_tma():
    from attention_proto.ops.dense.backward import flash_attention_backward, tma_bwd_config_candidates
    from attention_proto.ops.dense.forward import flash_attention_forward
    from attention_proto.runtime.device import is_hopper

    if not is_hopper():
        print("  (not Hopper: the TMA backward does not apply; skipped)")
        return
    from attention_proto.ops.dense.reference import alibi_slopes

    for D in (64, 128):
        q, k, v = _qkv(Nq=197, Nk=253, D=D)
        do = rnd(*q.shape)
        slopes = alibi_slopes(q.shape[1]).to(DEV)
        for cfg in tma_bwd_config_candidates(D)[:2]:
            for mods in (dict(), dict(causal=True), dict(window=(31, 5), softcap=20.0, alibi_slopes=slopes)):
                o, lse = flash_attention_forward(q, k, v, **mods)
                finite(*flash_attention_backward(do, q, k, v, o, lse, config=cfg, **mods))


# ------------------------------------------------------------------------------------------------
# paged
# ------------------------------------------------------------------------------------------------

@case("paged_decode")
def _paged_decode():
    from attention_proto.ops.paged.interface import paged_attention
    from attention_proto.ops.paged.testing import make_paged

    g = torch.Generator().manual_seed(0)
    for Nq, D, page, lens in ((1, 128, 16, [1, 37, 300]), (3, 40, 8, [3, 9, 77]), (16, 64, 32, [16, 129])):
        q, kc, vc, bt, sl = make_paged(len(lens), 8, 2, Nq, D, page, lens, LOW, DEV, g)
        kc, vc = torch.nan_to_num(kc), torch.nan_to_num(vc)
        for kw in (dict(version="v1"), dict(version="v2", num_partitions=3),
                   dict(version="v2", num_partitions=2, softcap=10.0, window=17,
                        alibi_slopes=torch.linspace(0.1, 1, 8, device=DEV)),
                   dict(check_inputs=False)):
            finite(paged_attention(q, kc, vc, bt, sl, **kw))


@case("paged_append")
def _paged_append():
    from attention_proto.ops.paged.cache import PagedKVCache

    for layout in ("nhd", "hnd"):
        cache = PagedKVCache(40, 8, 2, 40, max_seqs=3, dtype=LOW, device=DEV, layout=layout, seed=1)
        ids = [cache.add_sequence() for _ in range(3)]
        cache.append(ids, rnd(3, 2, 21, 40), rnd(3, 2, 21, 40), counts=[21, 3, 0])
        cache.append(ids, rnd(3, 2, 1, 40), rnd(3, 2, 1, 40))
        finite(cache.attend(ids, rnd(3, 4, 1, 40)))


# ------------------------------------------------------------------------------------------------
# linear
# ------------------------------------------------------------------------------------------------

@case("linear")
def _linear():
    from attention_proto.ops.linear.interface import linear_attention, linear_attention_step

    g32 = torch.Generator().manual_seed(3)
    for K, V in ((64, 48), (40, 128), (64, 16)):  # (64, 16): narrow chunk_o tiles (session-4 fuzz find)
        q, k, v = rnd(2, 77, 3, K, scale=0.3), rnd(2, 77, 3, K, scale=0.3), rnd(2, 77, 3, V)
        gate = torch.nn.functional.logsigmoid(torch.randn(2, 77, 3, generator=g32) + 2).to(DEV)
        h0 = rnd(2, 3, K, V, dtype=torch.float32)
        for mode in ("chunk", "recurrent"):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, gate, h0)]
            o, ht = linear_attention(*leaves[:3], g=leaves[3], initial_state=leaves[4], output_final_state=True,
                                     mode=mode)
            (o.float().sum() + ht.sum()).backward()
            finite(o, ht, *(t.grad for t in leaves))
        cu = torch.tensor([0, 1, 40, 40, 77], dtype=torch.int32, device=DEV)
        o, ht = linear_attention(q[:1], k[:1], v[:1], cu_seqlens=cu, output_final_state=True, chunk_size=32)
        finite(o, ht)
        o, s = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], h0, g=gate[:, 0])
        finite(o, s)


# ------------------------------------------------------------------------------------------------
# kernel discovery and the driver
# ------------------------------------------------------------------------------------------------

_PATTERNS = (re.compile(r"KERNEL_CACHE\.launch\(\s*(\w+)"), re.compile(r"_Plan\(\s*(?:\w+\.)?(\w+)"),
             re.compile(r"\blaunch\(\s*\"[^\"]+\",\s*(\w+)"),
             re.compile(r"\blaunch\(\s*\w+\([^()]*\),\s*(\w+_kernel)\b"))  # launch(<config name call>, kernel
_NOT_KERNELS = {"kernel", "plan", "self"}


def discover_kernels(root: Path = ROOT / "src" / "attention_proto" / "ops") -> List[str]:
    """Names of the Triton kernels the library's ops launch (found in their source)."""
    names = set()
    for path in root.rglob("*.py"):
        text = path.read_text()
        for pat in _PATTERNS:
            names.update(m.group(1) for m in pat.finditer(text))
    return sorted(names - _NOT_KERNELS)


#: kernels only a GPU case launches (checked as covered only there)
GPU_ONLY_KERNELS = {"_fwd_tma_kernel", "_fwd_tma_varlen_kernel", "_bwd_tma_kernel", "_bwd_prep_tma"}

#: which case launches each kernel: a kernel added to the source must be added here (and to a
#: case); tests/test_fuzz_common.py checks that every discovered kernel has an entry
KERNEL_CASES = {
    "_fwd_kernel": "dense_fwd_portable", "_fwd_tma_kernel": "dense_fwd_tma", "_fwd_runtime_kernel": "dense_fwd_runtime",
    "_fwd_tma_varlen_kernel": "dense_fwd_tma", "_rope_rows_kernel": "dense_rope_kernel",
    "_bwd_tma_kernel": "dense_bwd_tma", "_bwd_prep_tma": "dense_bwd_tma",
    "_rope_kernel": "dense_rope_kernel", "_bwd_preprocess": "dense_bwd", "_bwd_dkdv": "dense_bwd",
    "_bwd_dq": "dense_bwd", "_rope_pass": "dense_bwd", "_paged_decode_kernel": "paged_decode",
    "_paged_reduce_kernel": "paged_decode", "_paged_append_kernel": "paged_append",
    "chunk_fwd_h_kernel": "linear", "chunk_fwd_o_kernel": "linear", "chunk_cumsum_kernel": "linear", "chunk_bwd_dh_kernel": "linear",
    "chunk_bwd_dqk_kernel": "linear", "chunk_bwd_dv_kernel": "linear", "fused_recurrent_fwd_kernel": "linear",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run the cases whose name matches this regex")
    ap.add_argument("--list", action="store_true", help="list the cases and the discovered kernels, run nothing")
    ap.add_argument("--summary", default="", help="write a JSON summary (cases, kernels, errors) here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a discovered kernel was not launched")
    args = ap.parse_args(argv)

    found = discover_kernels()
    names = [n for n in CASES if re.search(args.only, n)]
    if args.list:
        for n in CASES:
            print(f"{n}{'  (gpu only: ' + GPU_ONLY[n] + ')' if n in GPU_ONLY else ''}")
        print("kernels in the source:", ", ".join(found))
        return 0
    print(f"device: {DEV}{' (Triton interpreter)' if interpreter_mode() else ''}; "
          f"PYTORCH_NO_CUDA_MEMORY_CACHING={os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING')}")
    results = {}
    for n in names:
        if n in GPU_ONLY and not GPU:
            results[n] = {"status": "skipped", "why": GPU_ONLY[n]}
            print(f"[skip] {n}: {GPU_ONLY[n]}")
            continue
        t0 = time.perf_counter()
        try:
            CASES[n]()
            sync()
            results[n] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 2)}
            print(f"[ok]   {n} ({results[n]['seconds']} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - every case runs; the summary carries the failure
            results[n] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"[FAIL] {n}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    launched = sorted({e.kernel_name for e in KERNEL_CACHE.entries()})
    expected = [k for k in found if GPU or k not in GPU_ONLY_KERNELS]
    missing = [k for k in expected if k not in launched] if not args.only else []
    summary = {
        "device": DEV, "interpreter": interpreter_mode(),
        "gpu": torch.cuda.get_device_name(0) if GPU else None,
        "torch": torch.__version__, "only": args.only, "cases": results,
        "kernels_in_source": found, "kernels_launched": launched, "kernels_not_launched": missing,
        "variants_compiled": len(KERNEL_CACHE.entries()),
    }
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"kernels launched ({len(launched)}): {', '.join(launched)}")
    if missing:
        print(f"WARNING: kernels in the source that no case launched: {', '.join(missing)}")
    failed = [n for n, r in results.items() if r["status"] == "error"]
    if failed:
        print(f"FAILED cases: {', '.join(failed)}")
    return 1 if failed or (args.strict and missing) else 0


if __name__ == "__main__":
    sys.exit(main())
