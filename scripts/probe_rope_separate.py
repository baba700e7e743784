#!/usr/bin/env python3
"""Why plain causal attention ran faster on RoPE-rotated inputs than on the raw ones (GPU, study 7).

Session 9's modifiers sitting (B1 H16 N16k D128 bf16 causal, default path): plain attention 1.920 ms,
the separate pipeline (RoPE kernel 0.119 ms + plain attention on its output) 1.868 ms, so attention on
the rotated q/k took ~1.75 ms. Same kernel, same shapes, contiguous BHSD both. This times plain
attention on (q, k), on the rotated (q_r, k_r), on copies of each, and on inputs with the rotated
values' magnitudes, alternating over rounds, to tell data (power/clocks) from layout or order:

    PYTHONPATH=src python scripts/probe_rope_separate.py     # ~1 min on an H100
"""
from __future__ import annotations

import torch

import attention_proto  # noqa: F401  (before any kernel module)
from attention_proto.ops.dense.forward import flash_attention_forward
from attention_proto.ops.dense.rope import RopeSpec
from attention_proto.ops.dense.rope_kernel import apply_rope
from attention_proto.runtime.timing import bench
from attention_proto.studies import peers


def main() -> None:
    B, H, N, D = 1, 16, 16384, 128
    q, k, v = peers.bhsd(B, H, N, D, dtype=torch.bfloat16, device="cuda", seed=N)
    qr, kr = apply_rope(q, k, RopeSpec("half"))
    zeros_q = (q == 0).float().mean().item(), (qr == 0).float().mean().item()
    inputs = {"raw": (q, k), "rotated": (qr, kr), "raw copy": (q.clone(), k.clone()),
              "rotated copy": (qr.clone(), kr.clone()), "fresh randn": peers.bhsd(B, H, N, D, seed=1)[:2],
              "raw, rotated k": (q, kr), "rotated q, raw k": (qr, k)}
    print(torch.cuda.get_device_name(), f"zero fraction q {zeros_q[0]:.4f} q_r {zeros_q[1]:.4f}",
          f"std q {q.float().std():.3f} q_r {qr.float().std():.3f} k {k.float().std():.3f} k_r {kr.float().std():.3f}")
    times = {n: [] for n in inputs}
    for _ in range(3):
        for name, (qq, kk) in inputs.items():
            times[name].append(bench(lambda qq=qq, kk=kk: flash_attention_forward(qq, kk, v, causal=True),
                                     warmup_ms=25, rep_ms=100).ms_median)
    times["rope kernel"] = [bench(lambda: apply_rope(q, k, RopeSpec("half")), warmup_ms=25, rep_ms=100).ms_median]
    times["fused rope"] = [bench(lambda: flash_attention_forward(q, k, v, causal=True, rope=RopeSpec("half")),
                                 warmup_ms=25, rep_ms=100).ms_median]
    print(f"\n{'inputs':<18} ms (3 rounds)")
    for n, ts in times.items():
        print(f"{n:<18} " + " ".join(f"{t:.3f}" for t in ts))


if __name__ == "__main__":
    main()
