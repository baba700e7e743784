#!/usr/bin/env python3
"""The paged bar shape (B8 N4k, GQA 32:8, D128, page 16, bf16) for Nsight Compute (GPU, issue #5).

Runs the dispatch's call (V2, P = 4) and the trivial read of the same bytes, three times each, so
that ncu can compare their memory throughput, occupancy and stall reasons:

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section Occupancy --section LaunchStats --section WarpStateStats --csv --page details \\
        -k 'regex:paged|read' --launch-skip 2 --launch-count 4 \\
        python scripts/probe_paged_ncu.py

(PYTHONPATH=src.) It times nothing itself; the table bench_paged.py prints is the timing.
"""
from __future__ import annotations

import torch

import attention_proto  # noqa: F401  (sets up the runtime before the kernel modules)
from attention_proto.ops.paged import paged_attention
from attention_proto.runtime.ceilings import read_stream_fn
from attention_proto.studies.paged import _block_table as block_table


def main() -> None:
    B, N, Hq, Hkv, D, page = 8, 4096, 32, 8, 128, 16
    dt, dev = torch.bfloat16, "cuda"
    tokens = B * N
    g = torch.Generator(device=dev).manual_seed(0)
    kc = torch.randn(tokens // page, page, Hkv, D, device=dev, dtype=dt, generator=g)
    vc = torch.randn(tokens // page, page, Hkv, D, device=dev, dtype=dt, generator=g)
    bt = block_table([N] * B, page, torch.Generator().manual_seed(0), dev)
    sl = torch.full((B,), N, dtype=torch.int32, device=dev)
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt, generator=g)
    nbytes = 2 * tokens * Hkv * D * kc.element_size()
    read = read_stream_fn(nbytes, dev)
    for _ in range(3):
        paged_attention(q, kc, vc, bt, sl, check_inputs=False, max_seq_len=N, total_tokens=tokens)
        read()
    torch.cuda.synchronize()
    print(f"B{B} N{N}: {nbytes / 1e6:.0f} MB of K/V, paged and read-only, 3 calls each")


if __name__ == "__main__":
    main()
