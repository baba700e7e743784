#!/usr/bin/env python3
"""Two opt-in forward paths of session 9, on the GPU (bf16): correctness, then cost (~2 min).

    PYTHONPATH=src python scripts/bench_rope_paths.py

1. Varlen + RoPE: "tile" (the portable kernel rotates q and every key tile as it loads them) against
   "rotate" (the packed RoPE pass, then the plain varlen kernel: the varlen TMA kernel on Hopper),
   ``forward.PORTABLE_ROPE``. Checked against the float64 reference on a small odd batch; timed on
   bench_mods.py's packed batch (log-uniform lengths 128..8192, 64k tokens, H16 D128, causal).
2. Split scores in the forward (``forward.SPLIT_ROPE_SOFTCAP_SCORES``, RoPE + softcap on 16-bit inputs):
   a Gemma-2-like call (B1, H16 on 8 KV heads, N4k, causal, softcap 50, RoPE half) at D128 and D256,
   the default dispatch (off) against the split (portable kernel), and the plain call without RoPE.

Prints a short table last; writes ``$OUT/bench_rope_paths.json`` when OUT is set.
"""
from __future__ import annotations

import json
import os

import torch

import attention_proto  # noqa: F401  (sets up the runtime before the kernel modules)
from attention_proto.ops.dense import forward as F
from attention_proto.ops.dense.interface import attention, attention_varlen
from attention_proto.ops.dense.reference import attention_reference_varlen
from attention_proto.ops.dense.rope import RopeSpec
from attention_proto.runtime import timing
from attention_proto.studies.flash_varlen import _lengths
from attention_proto.testing import assert_close_rule


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return timing.bench(fn, warmup_ms=25, rep_ms=200).ms_median


def check_varlen(mode: str, dt=torch.bfloat16) -> str:
    lens_q, lens_k = [700, 1, 0, 1999, 64, 97], [700, 5, 3, 1999, 64, 1025]
    cq = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    ck = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens_q), 8, 128, device="cuda", dtype=dt)
    k = torch.randn(sum(lens_k), 4, 128, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    mods = dict(causal=True, rope=RopeSpec("half"))
    try:
        with F.portable_rope(mode):
            F.clear_launch_plans()
            out, lse = attention_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), return_lse=True, **mods)
            plan = list(F._PLANS.values())[-1]
            kern = plan.kernel.fn.__name__ if hasattr(plan.kernel, "fn") else str(plan.kernel)
        ro, rl = attention_reference_varlen(q, k, v, cq, ck, **mods)
        to, _ = attention_reference_varlen(q, k, v, cq, ck, compute_dtype=dt, **mods)
        assert not torch.isnan(out).any(), "NaN in the output"
        assert_close_rule(out, to, ro, dt)
        return f"ok ({kern}, rotated first: {plan.rotate is not None})"
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"FAIL {type(e).__name__}: {str(e)[:300]}"


def main() -> int:
    res = {"gpu": torch.cuda.get_device_name(), "checks": {}, "varlen_ms": {}, "split_ms": {}}
    for mode in ("tile", "rotate"):
        res["checks"][f"varlen rope {mode}"] = check_varlen(mode)

    lens = _lengths(65536, 128, 8192, seed=1)
    longest = max(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    qv = torch.randn(sum(lens), 16, 128, device="cuda", dtype=torch.bfloat16)
    kv, vv = torch.randn_like(qv), torch.randn_like(qv)
    half = RopeSpec("half")
    res["varlen_ms"]["plain"] = bench(lambda: attention_varlen(qv, kv, vv, cu, cu, longest, longest, causal=True))
    for mode in ("tile", "rotate"):
        with F.portable_rope(mode):
            F.clear_launch_plans()
            res["varlen_ms"][f"rope {mode}"] = bench(
                lambda: attention_varlen(qv, kv, vv, cu, cu, longest, longest, causal=True, rope=half))
    F.clear_launch_plans()

    for D in (128, 256):
        g = torch.Generator(device="cuda").manual_seed(D)
        q = torch.randn(1, 16, 4096, D, generator=g, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, 4096, D, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        mods = dict(causal=True, softcap=50.0, rope=RopeSpec("half"))
        res["split_ms"][f"D{D} softcap only"] = bench(lambda: attention(q, k, v, causal=True, softcap=50.0))
        for split in (False, True):
            F.SPLIT_ROPE_SOFTCAP_SCORES = split
            F.clear_launch_plans()
            try:
                res["split_ms"][f"D{D} rope+softcap split={split}"] = bench(lambda: attention(q, k, v, **mods))
            except Exception as e:  # noqa: BLE001
                res["split_ms"][f"D{D} rope+softcap split={split}"] = f"FAIL {type(e).__name__}: {str(e)[:200]}"
        F.SPLIT_ROPE_SOFTCAP_SCORES = False
        F.clear_launch_plans()

    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_rope_paths.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(res["gpu"])
    for k, s in res["checks"].items():
        print(f"  check {k}: {s}")
    print(f"varlen {len(lens)} seqs, {sum(lens)} tokens, longest {longest} (ms)")
    for k, ms in res["varlen_ms"].items():
        print(f"  {k:28s} {ms:8.3f}")
    print("B1 H16:8 N4k causal (ms)")
    for k, ms in res["split_ms"].items():
        print(f"  {k:28s} {ms if isinstance(ms, str) else f'{ms:8.3f}'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
