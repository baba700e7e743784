#!/usr/bin/env python3
"""Is the paged decode kernel at the limit of its own access pattern? (GPU, issue #5, ~1 min)

At B8 N4k (GQA 32:8, D128, page 16, bf16, 134 MB of K/V) the decode kernel takes ~49.7 us against
~46.1 us for a trivial contiguous read of the same bytes (finding ``paged-time-breakdown``). This
times, with L2 emptied by a read before each call (CUPTI kernel durations and graph-replay wall):

- our decode (auto: V2 P4, BLOCK_N 64) over the study's shuffled block table and over the identity
  table (pages in pool order), and the BLOCK_N 32 tile;
- ``gather-head``: a kernel with the decode's access pattern and no math: one program per (sequence,
  KV head, partition) reads its 64-token K and V tiles through the block table, row by row;
- ``gather-page``: reads whole pages (32 KB: every head of 16 tokens) in block-table order;
- the contiguous read (``runtime.ceilings.read_stream_fn``).

If gather-head over shuffled pages takes what our decode takes, the decode kernel's math and
pipeline are not what separates it from the read: the scattered, per-head access is.

    PYTHONPATH=src python scripts/probe_paged_gather.py     # writes $OUT/probe_paged_gather.json
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paged import Timer, read_only_fn  # noqa: E402
from probe_paged_layout import inputs  # noqa: E402

from attention_proto.ops.paged import PagedConfig, paged_attention  # noqa: E402
from attention_proto.runtime.ceilings import measure_copy  # noqa: E402
from attention_proto.runtime.timing import kernel_times_clean_l2  # noqa: E402
from attention_proto.studies.paged import _graphed as graphed  # noqa: E402


@triton.jit
def _gather_head_kernel(K, V, BT, Out, tokens_per_part, num_parts, Hkv, s_kp, s_kt, s_kh, s_btb,
                        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    part = tl.program_id(1)
    kvh = pid % Hkv
    b = (pid // Hkv).to(tl.int64)
    start = part * tokens_per_part
    acc = tl.zeros([BLOCK_N, D], tl.float32)
    offs_d = tl.arange(0, D)
    for n0 in range(start, start + tokens_per_part, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        pages = tl.load(BT + b * s_btb + offs_n // PAGE).to(tl.int64)
        off = pages[:, None] * s_kp + (offs_n % PAGE)[:, None] * s_kt + kvh * s_kh + offs_d[None, :]
        acc += tl.load(K + off).to(tl.float32) + tl.load(V + off).to(tl.float32)
    tl.store(Out + pid * num_parts + part, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _gather_page_kernel(K, V, BT, Out, pages_per_prog, pages_per_seq, s_btb,
                        PAGE_ELEMS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    acc = tl.zeros([BLOCK], tl.float32)
    offs = tl.arange(0, BLOCK)
    first = chunk * pages_per_prog
    for i in range(0, pages_per_prog * (PAGE_ELEMS // BLOCK)):
        pi = first + i // (PAGE_ELEMS // BLOCK)
        sub = i % (PAGE_ELEMS // BLOCK)
        page = tl.load(BT + b * s_btb + pi).to(tl.int64)
        off = page * PAGE_ELEMS + sub * BLOCK + offs
        acc += tl.load(K + off).to(tl.float32) + tl.load(V + off).to(tl.float32)
    tl.store(Out + b * tl.num_programs(1) + chunk, tl.sum(acc, 0))


def main() -> int:
    timer = Timer(True, 10.0, 40.0)
    copy = measure_copy()[0]
    B, N, page = 8, 4096, 16
    q, kc, vc, bt, sl, nbytes = inputs(B, N, "nhd")
    bt_id = torch.arange(B * N // page, device="cuda", dtype=bt.dtype).view(B, -1).contiguous()
    Hkv = kc.shape[2]
    base = dict(check_inputs=False, max_seq_len=N, total_tokens=B * N)
    out = torch.empty(4096, device="cuda", dtype=torch.float32)

    def gather_head(table, P=4, bn=64, stages=5, warps=4):
        return lambda: _gather_head_kernel[(B * Hkv, P)](
            kc, vc, table, out, N // P, P, Hkv, kc.stride(0), kc.stride(1), kc.stride(2), table.stride(0),
            PAGE=page, BLOCK_N=bn, D=128, num_warps=warps, num_stages=stages)

    def gather_page(table, chunks=32, stages=3):
        per_seq = N // page
        return lambda: _gather_page_kernel[(B, chunks)](
            kc, vc, table, out, per_seq // chunks, per_seq, table.stride(0),
            PAGE_ELEMS=page * Hkv * 128, BLOCK=4096, num_warps=8, num_stages=stages)

    variants = [
        ("decode auto, shuffled", lambda: paged_attention(q, kc, vc, bt, sl, **base)),
        ("decode auto, identity", lambda: paged_attention(q, kc, vc, bt_id, sl, **base)),
        ("decode n32 w4 P4, shuffled", lambda: paged_attention(q, kc, vc, bt, sl, **base, version="v2",
                                                               num_partitions=4,
                                                               config=PagedConfig(16, 32, 128, 4, 5, "kernel"))),
        ("gather-head P4, shuffled", gather_head(bt)),
        ("gather-head P4, identity", gather_head(bt_id)),
        ("gather-head P16, shuffled", gather_head(bt, P=16)),
        ("gather-head P4 s3, shuffled", gather_head(bt, stages=3)),
        ("gather-page, shuffled", gather_page(bt)),
        ("gather-page, identity", gather_page(bt_id)),
        ("read (contiguous)", read_only_fn(nbytes, "cuda")),
    ]
    res = dict(gpu=torch.cuda.get_device_name(), copy_gbps=copy, kv_bytes=nbytes, rows={})
    for name, fn in variants:
        replay = graphed(fn)
        wall = timer.clean(replay) * 1e3
        ks = kernel_times_clean_l2(replay, 20)
        res["rows"][name] = dict(wall_us=wall, kernels_us=ks, pct_copy=100 * nbytes / (wall * 1e3) / copy)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "probe_paged_gather.json").write_text(json.dumps(res, indent=1))
    print(res["gpu"], f"copy {copy:.0f} GB/s; B8 N4k, 134 MB; L2 emptied by a read before each call")
    for name, r in res["rows"].items():
        print(f"  {name:30s} wall {r['wall_us']:6.2f} us ({r['pct_copy']:3.0f}% of copy)  kernels "
              + ", ".join(f"{k[:28]} {t:.2f}" for k, t in r["kernels_us"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
