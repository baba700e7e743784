#!/usr/bin/env python3
"""Partition counts that fill one wave at the paged bar shapes, and the workload for ncu (GPU, issue #5).

ncu (session 8, ``--ncu`` below) at B8 N4k: the V2 kernel runs 256 programs of 4 warps,
72 KB of shared memory each, so 3 fit an SM (396 slots on 132 SMs) and the grid fills 0.65 of a wave
(achieved occupancy 12%, DRAM 76-78% of peak against the read-only stream's 82-85%); the merge kernel
adds 4.3 us to the kernel's 53. P = 8 (512 programs: 1.3 waves) was slower. This times P = 4..8 at B8
N4k and B8 N32k, both protocols of bench_paged.py, beside the read of the same bytes:

    PYTHONPATH=src python scripts/probe_paged_partitions.py           # ~1 min

``--ncu``: no timing; the dispatch's call and the read of the same bytes at B8 N4k, three times
each, for Nsight Compute (``scripts/ncu_summary.py`` prints its CSV's key lines):

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats --csv --page details \
        -k 'regex:paged|read' --launch-skip 3 --launch-count 6 \
        python scripts/probe_paged_partitions.py --ncu > ncu.csv
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paged import Timer, read_only_fn  # noqa: E402

import attention_proto  # noqa: E402,F401
from attention_proto.ops.paged import paged_attention  # noqa: E402
from attention_proto.runtime.ceilings import measure_copy  # noqa: E402
from attention_proto.studies.paged import _block_table as block_table  # noqa: E402


def bar_inputs(B: int, N: int, Hq: int = 32, Hkv: int = 8, D: int = 128, page: int = 16):
    """(q, k_cache, v_cache, block_table, seq_lens, K/V bytes) of B sequences of N tokens, pages shuffled."""
    dt, dev, tokens = torch.bfloat16, "cuda", B * N
    g = torch.Generator(device=dev).manual_seed(0)
    kc = torch.randn(tokens // page, page, Hkv, D, device=dev, dtype=dt, generator=g)
    vc = torch.randn(tokens // page, page, Hkv, D, device=dev, dtype=dt, generator=g)
    bt = block_table([N] * B, page, torch.Generator().manual_seed(0), dev)
    sl = torch.full((B,), N, dtype=torch.int32, device=dev)
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt, generator=g)
    return q, kc, vc, bt, sl, 2 * tokens * Hkv * D * kc.element_size()


def ncu_workload() -> None:
    B, N = 8, 4096
    q, kc, vc, bt, sl, nbytes = bar_inputs(B, N)
    read = read_only_fn(nbytes, "cuda")
    for _ in range(3):
        paged_attention(q, kc, vc, bt, sl, check_inputs=False, max_seq_len=N, total_tokens=B * N)
        read()
    torch.cuda.synchronize()
    print(f"B{B} N{N}: {nbytes / 1e6:.0f} MB of K/V, paged and read-only, 3 calls each")


def main() -> None:
    if "--ncu" in sys.argv[1:]:
        return ncu_workload()
    timer = Timer(True, 10.0, 40.0)
    copy = measure_copy()[0]
    print(torch.cuda.get_device_name(), f"copy {copy:.0f} GB/s")
    print(f"{'shape':<9} {'variant':<10} {'study GB/s':>11} {'%':>5} {'clean GB/s':>11} {'%':>5}")
    for B, N in ((8, 4096), (8, 32768)):
        q, kc, vc, bt, sl, nbytes = bar_inputs(B, N)
        base = dict(check_inputs=False, max_seq_len=N, total_tokens=B * N)
        variants = [("auto", {})] + [(f"P={p}", dict(version="v2", num_partitions=p)) for p in (4, 5, 6, 7, 8)]
        fns = [(n, (lambda kw=kw: paged_attention(q, kc, vc, bt, sl, **base, **kw))) for n, kw in variants]
        fns.append(("read-only", read_only_fn(nbytes, "cuda")))
        for name, fn in fns:
            s, c = timer.both(fn)
            gs, gc = nbytes / s / 1e6, nbytes / c / 1e6
            print(f"B{B} N{N // 1024}k {name:<10} {gs:>11.0f} {100 * gs / copy:>4.0f}% {gc:>11.0f} {100 * gc / copy:>4.0f}%")


if __name__ == "__main__":
    main()
