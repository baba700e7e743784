#!/usr/bin/env python3
"""P's exponentials half on the FMA units (forward.EXP2_SPLIT) against all on ex2 (GPU, bf16, ~1 min).

    PYTHONPATH=src python scripts/bench_exp2_split.py [--n 16384]

B1 H16 D128 causal (bench_mods.py's shape): plain, softcap 50 and causal ALiBi, each with EXP2_SPLIT
"off" and "all", timed in three interleaved rounds in one process (sittings differ by up to ~10%;
rounds of one process by less), median ms of ``runtime.timing.bench``. Prints the table last
(ms per round, and each variant over plain "off" per round); writes ``$OUT/bench_exp2_split.json``.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from attention_proto.ops.dense import forward as F
from attention_proto.runtime import timing
from attention_proto.studies import peers


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    args = ap.parse_args()
    q, k, v = peers.bhsd(1, 16, args.n, 128, dtype=torch.bfloat16, device="cuda", seed=1)
    mods = {"plain": {}, "softcap50": dict(softcap=50.0), "alibi": dict(alibi_slopes=True)}
    times = {}
    for rnd in range(3):
        for name, m in mods.items():
            for mode in ("off", "all"):
                F.EXP2_SPLIT = mode
                fn = lambda: F.flash_attention_forward(q, k, v, causal=True, **m)  # noqa: E731
                fn()
                torch.cuda.synchronize()
                times.setdefault(f"{name} {mode}", []).append(timing.bench(fn, warmup_ms=25, rep_ms=200).ms_median)
    F.EXP2_SPLIT = "off"
    res = {"gpu": torch.cuda.get_device_name(), "n": args.n, "ms": times}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_exp2_split.json"), "w") as f:
            json.dump(res, f, indent=1)
    base = times["plain off"]
    print(res["gpu"], f"B1 H16 N{args.n} D128 bf16 causal: ms per round | x plain-off per round")
    for key, ms in times.items():
        print(f"  {key:14s} " + " ".join(f"{t:7.3f}" for t in ms) + " | "
              + " ".join(f"{t / b:5.3f}" for t, b in zip(ms, base)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
