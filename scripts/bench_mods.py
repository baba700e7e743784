#!/usr/bin/env python3
"""Quick GPU check of the dense forward's modifier paths and varlen, ahead of a full study run.

    PYTHONPATH=src python scripts/bench_mods.py [--n 16384]

1. bf16 correctness of softcap, causal ALiBi, RoPE (dispatched: TMA path) and packed varlen
   (dispatched: the varlen TMA kernel) against the float64 reference (the error rule);
2. times (``runtime.timing.bench`` median, as the studies time) at D128 H16 B*N = 16k, causal: plain, softcap 50,
   ALiBi, RoPE as dispatched, separate RoPE kernel + attention, the RoPE kernel alone, FlexAttention
   plain and softcap; packed varlen (log-uniform lengths 128..8192, 64k tokens) against each
   sequence alone and against padding.

Prints a short table last (ms and ratio to plain causal). Not a study: no KB rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=16384)
    args = p.parse_args()
    from attention_proto.runtime import timing
    from attention_proto.ops.dense.forward import flash_attention_forward
    from attention_proto.ops.dense.interface import attention, attention_varlen
    from attention_proto.ops.dense.reference import alibi_slopes, attention_reference, attention_reference_varlen
    from attention_proto.ops.dense.rope import RopeSpec
    from attention_proto.ops.dense.rope_kernel import apply_rope
    from attention_proto.studies import peers
    from attention_proto.studies.flash_varlen import _lengths
    from attention_proto.testing import assert_close_rule

    dev, dt = "cuda", torch.bfloat16
    checks = []
    # --- correctness
    q, k, v = (torch.randn(2, 8, 1500, 128, device=dev, dtype=dt) for _ in range(3))
    for name, mods in (("softcap", dict(softcap=30.0, causal=True)),
                       ("alibi", dict(alibi_slopes=alibi_slopes(8).to(dev), causal=True)),
                       ("rope", dict(rope=RopeSpec("half"), causal=True)),
                       ("rope_il", dict(rope=RopeSpec("interleaved"), causal=False))):
        try:
            out, lse = flash_attention_forward(q, k, v, **mods)
            ro, rl = attention_reference(q, k, v, device=dev, **mods)
            to, _ = attention_reference(q, k, v, compute_dtype=dt, device=dev, **mods)
            assert_close_rule(out, to, ro, dt)
            assert_close_rule(lse, rl.float(), rl, dt, what="lse")
            checks.append((name, "ok"))
        except Exception as e:  # noqa: BLE001
            checks.append((name, f"FAIL {type(e).__name__}: {str(e)[:200]}"))
    lens = [700, 1, 0, 1999, 64]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    qv, kv_, vv = (torch.randn(sum(lens), 8, 128, device=dev, dtype=dt) for _ in range(3))
    try:
        out, lse = attention_varlen(qv, kv_, vv, cu, cu, causal=True, return_lse=True)
        ro, rl = attention_reference_varlen(qv, kv_, vv, cu, cu, causal=True)
        to, _ = attention_reference_varlen(qv, kv_, vv, cu, cu, causal=True, compute_dtype=dt)
        assert_close_rule(out, to, ro, dt)
        checks.append(("varlen", "ok"))
    except Exception as e:  # noqa: BLE001
        checks.append(("varlen", f"FAIL {type(e).__name__}: {str(e)[:200]}"))

    # --- timing
    n = args.n
    b = max(1, 16384 // n)
    q, k, v = peers.bhsd(b, 16, n, 128, dtype=dt, device=dev, seed=1)
    half = RopeSpec("half")
    bench = lambda fn: timing.bench(fn, warmup_ms=25, rep_ms=200).ms_median  # the studies' timing  # noqa: E731

    def sep():
        qr, kr = apply_rope(q, k, half)
        return flash_attention_forward(qr, kr, v, causal=True)

    jobs = [
        ("plain", lambda: flash_attention_forward(q, k, v, causal=True)),
        ("softcap50", lambda: flash_attention_forward(q, k, v, causal=True, softcap=50.0)),
        ("alibi", lambda: flash_attention_forward(q, k, v, causal=True, alibi_slopes=True)),
        ("rope (dispatched)", lambda: flash_attention_forward(q, k, v, causal=True, rope=half)),
        ("rope separate", sep),
        ("rope kernel only", lambda: apply_rope(q, k, half)),
    ]
    for what, sm in (("flex plain", None), ("flex softcap50", lambda s, bb, hh, qi, ki: 50.0 * torch.tanh(s / 50.0))):
        fn, why = peers.make_flex(q, k, v, True, score_mod=sm)
        if fn:
            jobs.append((what, fn))
    rows = []
    for what, fn in jobs:
        try:
            fn()
            torch.cuda.synchronize()
            rows.append((what, bench(fn)))
        except Exception as e:  # noqa: BLE001
            rows.append((what, None))
            print(what, "failed:", type(e).__name__, str(e)[:300], file=sys.stderr)
    # varlen
    lens = _lengths(65536, 128, 8192, seed=1)
    longest = max(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    qv = torch.randn(sum(lens), 16, 128, device=dev, dtype=dt)
    kv_, vv = torch.randn_like(qv), torch.randn_like(qv)
    vrows = []
    vrows.append(("varlen packed", bench(lambda: attention_varlen(qv, kv_, vv, cu, cu, longest, longest, causal=True))))
    seqs = [(qv[a:e].transpose(0, 1)[None], kv_[a:e].transpose(0, 1)[None], vv[a:e].transpose(0, 1)[None])
            for a, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    tot = 0.0
    for qs, ks, vs in seqs:
        tot += bench(lambda: attention(qs, ks, vs, causal=True))
    vrows.append(("varlen separate (sum)", tot))
    qp = torch.randn(len(lens), 16, longest, 128, device=dev, dtype=dt)
    vrows.append(("varlen padded", bench(lambda: attention(qp, qp, qp, causal=True))))

    print("\ncorrectness:", "; ".join(f"{a}: {s}" for a, s in checks))
    base = rows[0][1]
    print(f"\nN{n} B{b} H16 D128 bf16 causal (ms, x plain)")
    for what, ms in rows:
        print(f"  {what:22s} {ms if ms is None else round(ms, 4)!s:>9} {'' if not (ms and base) else round(ms / base, 3)}")
    print(f"varlen: {len(lens)} seqs, {sum(lens)} tokens, longest {longest}, mean {sum(lens) / len(lens):.0f}")
    pk = vrows[0][1]
    for what, ms in vrows:
        print(f"  {what:22s} {round(ms, 4):>9} packed speedup {round(ms / pk, 3)}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_mods.json"), "w") as f:
            json.dump({"checks": checks, "rows": rows, "varlen": vrows, "lens": lens}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
