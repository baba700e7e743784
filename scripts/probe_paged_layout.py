#!/usr/bin/env python3
"""Does the pool layout limit paged decode at the bar shapes? NHD against HND pages (GPU, issue #5).

Session 8's ncu put the decode kernel at ~0.92x the read of the same bytes at B8 N4k. In an NHD
pool (``[num_pages, page_size, Hkv, D]``) one program reads, per token, 256 contiguous bytes
(D 128, bf16) out of every 2 KB token row: the 8 KV heads' programs interleave in every DRAM row.
An HND pool (``[num_pages, Hkv, page_size, D]``, read through its ``transpose(1, 2)`` view by the
same kernel) gives each program one 4 KB run per page (page 16). This times both layouts at the
bar shapes with the same kernel, tiles and partition counts, the merge variants, SDPA cuDNN on
contiguous K/V and the read of the same bytes, under both protocols of ``bench_paged.py``:

    PYTHONPATH=src python scripts/probe_paged_layout.py       # ~2 min on an H100

Prints one table (GB/s and % of the copy ceiling, study protocol / clean L2) and writes the rows
as JSON to ``$OUT/probe_paged_layout.json`` when ``OUT`` is set.

Found on an H100 (session 9; ``results/nvidia-h100-80gb-hbm3/probes/``): the layout does not matter.
B8 N4k auto, clean L2: NHD 80%, HND 77% of copy (every tile and P within 71-80% in both); B8 N32k 97%
both; B1 N64k 86% both. SDPA cuDNN 83% / 100% / 91%, the read 91% / 103% / 96%.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paged import Timer, read_only_fn  # noqa: E402

import attention_proto  # noqa: E402,F401  (before any kernel module)
from attention_proto.ops.paged import PagedConfig, explain, paged_attention  # noqa: E402
from attention_proto.ops.paged.dispatch import gpu_config  # noqa: E402
from attention_proto.ops.paged.testing import check_paged  # noqa: E402
from attention_proto.runtime.ceilings import measure_copy  # noqa: E402
from attention_proto.studies import peers  # noqa: E402
from attention_proto.studies.paged import _block_table as block_table  # noqa: E402


def inputs(B: int, N: int, layout: str, Hq: int = 32, Hkv: int = 8, D: int = 128, page: int = 16):
    """q, K/V pools seen as [pages, page, Hkv, D] (HND: stored head-major), block table, lengths, bytes."""
    dt, dev, tokens = torch.bfloat16, "cuda", B * N
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (tokens // page, page, Hkv, D) if layout == "nhd" else (tokens // page, Hkv, page, D)
    kc = torch.randn(*shape, device=dev, dtype=dt, generator=g)
    vc = torch.randn(*shape, device=dev, dtype=dt, generator=g)
    if layout == "hnd":
        kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)
    bt = block_table([N] * B, page, torch.Generator().manual_seed(0), dev)
    sl = torch.full((B,), N, dtype=torch.int32, device=dev)
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt, generator=g)
    return q, kc, vc, bt, sl, 2 * tokens * Hkv * D * 2


def main() -> int:
    timer = Timer(True, 10.0, 40.0)
    copy = measure_copy()[0]
    print(torch.cuda.get_device_name(), f"copy {copy:.0f} GB/s", flush=True)
    default = gpu_config(4, 128)
    tiles = {
        "auto": None,
        "fused": PagedConfig(16, 64, 128, 4, 5, "fused"),
        "pdl": PagedConfig(16, 64, 128, 4, 5, "kernel_pdl"),
        "n128 w8": PagedConfig(16, 128, 128, 8, 5, "kernel"),
        "n64 w8": PagedConfig(16, 64, 128, 8, 5, "kernel"),
        "n32 s7": PagedConfig(16, 32, 128, 4, 7, "kernel"),
    }
    # correctness of the HND pool at a bar-like shape, every tile (bf16 against the float64 reference)
    fails = []
    q, kc, vc, bt, sl, _ = inputs(2, 2048, "hnd")
    for name, cfg in tiles.items():
        res = check_paged(q, kc, vc, bt, sl, torch.bfloat16, version="v2", num_partitions=4, config=cfg or default)
        print(f"check hnd {name}: {'ok' if res.ok else 'FAIL'} err/bound {res.err_ratio:.3f}", flush=True)
        if not res.ok:
            fails.append(name)
    rows = []
    for B, N, parts in ((8, 4096, (2, 4, 8)), (8, 32768, (4, 8)), (1, 65536, (16, 32))):
        for layout in ("nhd", "hnd"):
            q, kc, vc, bt, sl, nbytes = inputs(B, N, layout)
            base = dict(check_inputs=False, max_seq_len=N, total_tokens=B * N)
            variants = [(n, dict(config=c) if c else {}) for n, c in tiles.items()]
            variants += [(f"P={p}", dict(version="v2", num_partitions=p)) for p in parts]
            for name, kw in variants:
                plan = explain(q, kc, bt, max_seq_len=N, total_tokens=B * N, version=kw.get("version", "auto"),
                               num_partitions=kw.get("num_partitions"), config=kw.get("config"))
                s, c = timer.both(lambda kw=kw: paged_attention(q, kc, vc, bt, sl, **base, **kw))
                rows.append(dict(shape=f"B{B} N{N // 1024}k", layout=layout, variant=name,
                                 plan=f"{plan.version} P{plan.num_partitions}", study_gbps=nbytes / s / 1e6,
                                 clean_gbps=nbytes / c / 1e6))
        kk = torch.randn(B, 8, N, 128, device="cuda", dtype=torch.bfloat16)
        vv = torch.randn_like(kk)
        fn, _ = peers.make_sdpa("sdpa_cudnn", q, kk, vv, causal=False)
        peer_fns = [("sdpa_cudnn", fn), ("read-only", read_only_fn(nbytes, "cuda"))]
        for name, fn in peer_fns:
            if fn is None:
                continue
            s, c = timer.both(fn)
            rows.append(dict(shape=f"B{B} N{N // 1024}k", layout="-", variant=name, plan="",
                             study_gbps=nbytes / s / 1e6, clean_gbps=nbytes / c / 1e6))
        del kk, vv
        print(f"B{B} N{N // 1024}k done", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "probe_paged_layout.json").write_text(
            json.dumps(dict(gpu=torch.cuda.get_device_name(), copy_gbps=copy, rows=rows, check_failures=fails), indent=1))
    print(f"\n{'shape':<9} {'layout':<6} {'variant':<10} {'plan':<7} {'study GB/s':>10} {'%':>4} {'clean GB/s':>10} {'%':>4}")
    for r in rows:
        print(f"{r['shape']:<9} {r['layout']:<6} {r['variant']:<10} {r['plan']:<7} {r['study_gbps']:>10.0f} "
              f"{100 * r['study_gbps'] / copy:>3.0f}% {r['clean_gbps']:>10.0f} {100 * r['clean_gbps'] / copy:>3.0f}%")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
