#!/usr/bin/env python3
"""Cost of the split-precision scores of the RoPE + softcap backward (GPU, bf16, ~1 min).

    PYTHONPATH=src python scripts/bench_split_scores.py

A Gemma-2-like layer (B1, 16 query heads on 8 KV heads, N 4096, causal, softcap 50, RoPE half):
the backward alone (``flash_attention_backward`` from the forward's O and LSE), median ms of
``runtime.timing.bench``, deterministic (the public default) and fused dQ, for

- ``before``: the split off (``backward.SPLIT_ROPE_SOFTCAP_SCORES = False``): rounded scores, the
  TMA kernels where they apply (D <= 128);
- ``portable rounded``: the split off, forced onto the portable kernels (the split's own path);
- ``split <tile>``: the split on, on the default portable tile and on the others that compile
  without large spills (sm_90 ptxas).

Each variant's dq/dk/dv error against float64 is printed beside its time (max |err| / PyTorch's
bf16 error, the 3x rule's ratio), at a short shape (N 512) where the float64 reference fits.
"""
from __future__ import annotations

import torch

import attention_proto  # noqa: F401  (sets up the runtime before the kernel modules)
from attention_proto.ops.dense import backward
from attention_proto.ops.dense.backward import BwdConfig, bwd_config_candidates, flash_attention_backward
from attention_proto.ops.dense.forward import flash_attention_forward
from attention_proto.ops.dense.reference import attention_reference
from attention_proto.ops.dense.rope import RopeSpec
from attention_proto.runtime.timing import bench


def inputs(B, H, Hkv, N, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, N, D, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, N, D, generator=g, device="cuda", dtype=torch.bfloat16)
    do = torch.randn(B, H, N, D, generator=g, device="cuda", dtype=torch.bfloat16)
    return q, k, v, do


def variants(D):
    out = [("before", False, None), ("portable rounded", False, bwd_config_candidates(D)[0])]
    out.append(("split default", True, None))
    if D == 128:
        out.append(("split 32x64 w8 s2", True, BwdConfig(32, 64, 8, 2)))
        out.append(("split 16x128 w8 s3", True, BwdConfig(16, 128, 8, 3)))
    return out


def errors(D, mods, split, cfg, det):
    q, k, v, do = inputs(1, 4, 2, 512, D, seed=1)
    backward.SPLIT_ROPE_SOFTCAP_SCORES = split
    ins64 = [t.double().requires_grad_() for t in (q, k, v)]
    o64, _ = attention_reference(*ins64, compute_dtype=torch.float64, device="cuda", **mods)
    g64 = torch.autograd.grad(o64, ins64, do.double())
    insb = [t.clone().requires_grad_() for t in (q, k, v)]
    ob, _ = attention_reference(*insb, compute_dtype=torch.bfloat16, device="cuda", **mods)
    gb = torch.autograd.grad(ob, insb, do)
    o, lse = flash_attention_forward(q, k, v, **mods)
    ours = flash_attention_backward(do, q, k, v, o, lse, config=cfg, deterministic=det, **mods)
    return [(a.double() - h).abs().max().item() / max((b.double() - h).abs().max().item(), 1e-30)
            for a, b, h in zip(ours, gb, g64)]


def main() -> None:
    rows = []
    for D in (128, 256):
        for cap in (50.0, 0.5):
            mods = dict(causal=True, softcap=cap, rope=RopeSpec("half"))
            q, k, v, do = inputs(1, 16, 8, 4096, D)
            for name, split, cfg in variants(D):
                backward.SPLIT_ROPE_SOFTCAP_SCORES = split
                o, lse = flash_attention_forward(q, k, v, **mods)
                for det in (True, False):
                    fn = lambda: flash_attention_backward(do, q, k, v, o, lse, config=cfg,  # noqa: E731
                                                          deterministic=det, **mods)
                    try:
                        ms = bench(fn, 10.0, 50.0).ms_median
                        err = errors(D, mods, split, cfg, det)
                    except Exception as e:  # noqa: BLE001 - a tile that does not fit: say so, go on
                        rows.append((D, cap, name, det, None, f"{type(e).__name__}: {str(e)[:80]}"))
                        continue
                    rows.append((D, cap, name, det, ms, " ".join(f"{x:.2f}" for x in err)))
    backward.SPLIT_ROPE_SOFTCAP_SCORES = True
    print(torch.cuda.get_device_name(), torch.__version__)
    print(f"{'D':>4} {'cap':>5} {'variant':<20} {'mode':<5} {'bwd ms':>8} {'x before':>9}  err/torch dq dk dv (N512)")
    base = {}
    for D, cap, name, det, ms, err in rows:
        if name == "before" and ms:
            base[(D, cap, det)] = ms
    for D, cap, name, det, ms, err in rows:
        rel = f"{ms / base[(D, cap, det)]:.3f}" if ms and (D, cap, det) in base else "-"
        print(f"{D:>4} {cap:>5} {name:<20} {'det' if det else 'fused':<5} "
              f"{(f'{ms:.3f}' if ms else '-'):>8} {rel:>9}  {err}")


if __name__ == "__main__":
    main()
