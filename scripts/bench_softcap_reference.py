#!/usr/bin/env python3
"""Softcap with a fixed row reference (forward.SOFTCAP_FIXED_REFERENCE) against the running row max (GPU, ~1 min).

    PYTHONPATH=src python scripts/bench_softcap_reference.py [--n 16384]

B1 H16 D128 bf16 causal (the modifiers study's bar shape): plain causal, softcap 50 with the fixed
reference (the default) and with the running max, in three interleaved rounds of one process
(``runtime.timing.bench`` medians), then each variant's error against float64 at N 2048. Prints ms
per round and the ratio to plain per round; writes ``$OUT/bench_softcap_reference.json``.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from attention_proto.ops.dense import forward as F
from attention_proto.ops.dense.reference import attention_reference
from attention_proto.runtime import timing
from attention_proto.studies import peers
from attention_proto.testing import assert_close_rule


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    args = ap.parse_args()
    q, k, v = peers.bhsd(1, 16, args.n, 128, dtype=torch.bfloat16, device="cuda", seed=1)
    variants = {"plain": (True, {}), "softcap50 fixed": (True, dict(softcap=50.0)),
                "softcap50 running max": (False, dict(softcap=50.0))}
    times = {}
    for _ in range(3):
        for name, (fixed, mods) in variants.items():
            F.SOFTCAP_FIXED_REFERENCE = fixed
            fn = lambda: F.flash_attention_forward(q, k, v, causal=True, **mods)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            times.setdefault(name, []).append(timing.bench(fn, warmup_ms=25, rep_ms=200).ms_median)
    checks = {}
    qs, ks, vs = (x[:, :4, :2048].contiguous() for x in (q, k, v))
    for fixed in (True, False):
        for scale in (1.0, 30.0):
            F.SOFTCAP_FIXED_REFERENCE = fixed
            F.clear_launch_plans()
            out, lse = F.flash_attention_forward(qs * scale, ks, vs, causal=True, softcap=50.0)
            ro, rl = attention_reference(qs * scale, ks, vs, causal=True, softcap=50.0, device="cuda")
            to, _ = attention_reference(qs * scale, ks, vs, causal=True, softcap=50.0, compute_dtype=torch.bfloat16,
                                        device="cuda")
            try:
                assert_close_rule(out, to, ro, torch.bfloat16)
                assert_close_rule(lse, rl.float(), rl, torch.bfloat16, what="lse")
                err = (out.double() - ro).abs().max().item() / max((to.double() - ro).abs().max().item(), 1e-30)
                checks[f"fixed={fixed} q x{scale:g}"] = f"ok (max err {err:.2f}x torch's)"
            except AssertionError as e:
                checks[f"fixed={fixed} q x{scale:g}"] = f"FAIL {str(e)[:200]}"
    F.SOFTCAP_FIXED_REFERENCE = True
    F.clear_launch_plans()
    res = {"gpu": torch.cuda.get_device_name(), "n": args.n, "ms": times, "checks": checks}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_softcap_reference.json"), "w") as f:
            json.dump(res, f, indent=1)
    base = times["plain"]
    print(res["gpu"], f"B1 H16 N{args.n} D128 bf16 causal: ms per round | x plain per round")
    for key, ms in times.items():
        print(f"  {key:22s} " + " ".join(f"{t:7.3f}" for t in ms) + " | " + " ".join(f"{t / b:5.3f}" for t, b in zip(ms, base)))
    for key, s in checks.items():
        print(f"  check {key}: {s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
