#!/usr/bin/env python3
"""Paged decode against the copy ceiling: every candidate of issue #5 at the bar shapes (GPU, ~2 min).

    PYTHONPATH=src python scripts/bench_paged.py            # H100
    PYTHONPATH=src python scripts/bench_paged.py --cpu      # smoke run under the interpreter (tiny, fp16)

GQA 32:8, D 128, page 16, bf16, shuffled block tables, ``check_inputs=False`` (no host sync), every
call replayed from a CUDA graph. Shapes: B8 N4k, B8 N32k, B32 N4k, B1 N64k and a mixed batch of 32
(log-uniform 1k..32k, the longest 32k). Rate = unique KV bytes read / time.

1. bf16 correctness of every candidate against the float64 reference (mixed lengths, and a window +
   softcap for the default), and a graph-replayed fused call against the eager one.
2. Timings, two ways:
   - ``study``: exactly the paged study's protocol (``runtime.timing.bench`` = triton's ``do_bench``,
     10 ms warm-up / 40 ms, of a graph replay). do_bench clears L2 by WRITING 256 MB, so the timed
     kernel starts with L2 full of dirty lines (~50 MB on an H100) that it must write back while it
     reads: a fixed cost of ~15 us, 20-25% of a 134 MB shape (B8 N4k).
   - ``clean``: L2 cleared by READING 256 MB before each replay (same cold cache, nothing to write back).
   The ``read-only`` row times a trivial Triton kernel that streams the same number of bytes
   (contiguous), under the same protocol: the best any kernel can do at that size.
3. Candidates (each selectable through ``version`` / ``num_partitions`` / ``config``):
   - ``old``: the previous default (3 stages = one K/V buffer, separate reduce kernel, the old
     wave model's choice of V1/V2 and partitions);
   - ``kernel s3`` / ``fused s3`` / ``kernel s5``: one change at a time from the old one, with the new
     dispatch's partitions;
   - ``kernel_pdl s5``: ``kernel s5`` with the reduce launched by programmatic dependent launch;
   - ``auto``: the new default (5 stages = two K/V buffers, fused merge, new dispatch);
   - ``fused nN sS wW``: other tiles (the dispatch re-plans for their occupancy);
   - ``auto P=k``: the default tile at forced partition counts (is the dispatch's choice the best?);
   - ``sdpa_cudnn``: SDPA cuDNN over contiguous K/V ``[B, 8, N, 128]`` (the mixed batch: padded).
   Plus a device-to-device copy of 2 GiB (read + write bytes / time): the ceiling.

The table printed last: GB/s and % of the copy ceiling per candidate and shape (``*`` = the best
of ours at that shape), the study protocol first, then the clean one.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

# the study's helpers: the same lengths, page tables and CUDA-graph capture as the committed rows
from attention_proto.studies.paged import _block_table as block_table, _graphed as graphed, _mixed_lengths

OLD_PLAN = {  # what the previous dispatch chose (wave model, 2 CTAs per SM): version, partitions
    "B8 N4k": ("v2", 4), "B8 N32k": ("v2", 4), "B32 N4k": ("v1", None), "B1 N64k": ("v2", 32),
    "B32 mixed": ("v1", None),
}


def mixed_lengths(B: int, lo: int, hi: int, seed: int = 0) -> List[int]:
    return _mixed_lengths(B, lo, hi, torch.Generator().manual_seed(seed))


class Timer:
    """The two protocols (median ms); CPU smoke mode: one wall-clock call."""

    def __init__(self, gpu: bool, warmup_ms: float, rep_ms: float) -> None:
        self.gpu, self.warmup_ms, self.rep_ms = gpu, warmup_ms, rep_ms

    def study(self, replay) -> float:
        from attention_proto.runtime.timing import bench

        return bench(replay, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms).ms_median

    def clean(self, replay) -> float:
        # L2 emptied of the inputs by reading 256 MB (clean lines: nothing to write back)
        from attention_proto.runtime.timing import bench_clean_l2

        return bench_clean_l2(replay, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms).ms_median

    def both(self, fn) -> Tuple[float, float]:
        if not self.gpu:
            t0 = time.perf_counter()
            fn()
            dt = (time.perf_counter() - t0) * 1e3
            return dt, dt
        replay = graphed(fn)
        return self.study(replay), self.clean(replay)


def read_only_fn(nbytes: int, device: str):
    """Streams ``nbytes`` (contiguous 16-bit elements), writing one fp32 per program."""
    from attention_proto.runtime.ceilings import read_stream_fn

    return read_stream_fn(nbytes, device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="smoke run under the interpreter: tiny shapes, fp16")
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=40.0)
    ap.add_argument("--no-sweep", action="store_true", help="skip the forced partition counts")
    args = ap.parse_args()
    if args.cpu:
        import os

        os.environ["TRITON_INTERPRET"] = "1"
    import attention_proto  # noqa: F401  (before any kernel module)
    from attention_proto.ops.paged import PagedConfig, explain, paged_attention
    from attention_proto.ops.paged.dispatch import ctas_per_sm, gpu_config
    from attention_proto.ops.paged.testing import check_paged, make_paged

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("no CUDA GPU: use --cpu for the smoke run")
        return 2
    dev = "cuda" if gpu else "cpu"
    dt = torch.bfloat16 if gpu else torch.float16
    t_start = time.perf_counter()
    if gpu:
        Hq, Hkv, D, page = 32, 8, 128, 16
        shapes = {"B8 N4k": [4096] * 8, "B8 N32k": [32768] * 8, "B32 N4k": [4096] * 32,
                  "B1 N64k": [65536], "B32 mixed": mixed_lengths(32, 1024, 32768)}
        check_lens, sweep = [1, 300, 1000, 2048, 4099, 777], (2, 4, 8, 16, 32, 64)
    else:
        Hq, Hkv, D, page = 4, 2, 16, 8
        shapes = {"B2 N64": [64] * 2, "B3 mixed": [5, 64, 20]}
        check_lens, sweep = [1, 30, 77, 40], (2, 4)
    bd = max(16, 1 << (D - 1).bit_length())

    def tile(bn, w, s, reduce="fused"):
        return PagedConfig(16, bn if gpu else 16, bd, w, s if gpu else 1, reduce)

    default = gpu_config(Hq // Hkv, D) if gpu else tile(64, 4, 5)
    # name -> (config, version override, partitions override); None: the dispatch decides
    cands: Dict[str, Tuple[PagedConfig, Optional[str], Optional[int]]] = {
        "old": (tile(64, 4, 3, "kernel"), "old", None),
        "kernel s3": (tile(64, 4, 3, "kernel"), None, None),
        "fused s3": (tile(64, 4, 3, "fused"), None, None),
        "kernel s5": (tile(64, 4, 5, "kernel"), None, None),
        "kernel_pdl s5": (tile(64, 4, 5, "kernel_pdl"), None, None),  # the reduce without a launch gap
        "auto": (default, None, None),
        "fused n32 s7": (tile(32, 4, 7), None, None),
        "fused n64 s7": (tile(64, 4, 7), None, None),
        "fused n128 w8 s5": (tile(128, 8, 5), None, None),
    }

    # ---- 1. correctness ---------------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(7)
    q, kc, vc, bt, sl = make_paged(len(check_lens), Hq, Hkv, 1, D, page, check_lens, dt, dev, gen)
    checks: List[Tuple[str, str]] = []
    for name, (cfg, ver, parts) in cands.items():
        for version, P in (("v1", None), ("v2", None), ("v2", 7)) if ver is None else (("v2", 4),):
            try:
                res = check_paged(q, kc, vc, bt, sl, dt, version=version, num_partitions=P, config=cfg)
                checks.append((f"{name} {version}{'/' + str(P) if P else ''}",
                               f"{'ok' if res.ok else 'FAIL'} err/bound {res.err_ratio:.2f}"))
            except Exception as e:  # noqa: BLE001 - reported in the table
                checks.append((f"{name} {version}", f"FAIL {type(e).__name__}: {str(e)[:160]}"))
    for kw in ({"window": 700, "softcap": 30.0}, {"window": 5}):
        try:
            res = check_paged(q, kc, vc, bt, sl, dt, config=default, version="v2", **kw)
            checks.append((f"auto v2 {kw}", f"{'ok' if res.ok else 'FAIL'} err/bound {res.err_ratio:.2f}"))
        except Exception as e:  # noqa: BLE001
            checks.append((f"auto v2 {kw}", f"FAIL {type(e).__name__}: {str(e)[:160]}"))
    if gpu:  # the captured fused call (slab counters) must equal the eager one, replay after replay
        kw = dict(version="v2", num_partitions=8, check_inputs=False, max_seq_len=max(check_lens), config=default)
        graphed(lambda: paged_attention(q, kc, vc, bt, sl, **kw))  # warm-ups (and the slab)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_g = paged_attention(q, kc, vc, bt, sl, **kw)
        ok = True
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            ok &= torch.equal(out_g, paged_attention(q, kc, vc, bt, sl, **kw))
        checks.append(("auto v2/8 graph replays == eager", "ok" if ok else "FAIL"))
    print(f"correctness ({time.perf_counter() - t_start:.0f} s):")
    for name, res in checks:
        print(f"  {name:34s} {res}")

    # ---- 2. timings -------------------------------------------------------------------------------------
    timer = Timer(gpu, args.warmup_ms, args.rep_ms)
    from attention_proto.runtime.ceilings import measure_copy

    copy_gbps = measure_copy()[0] if gpu else float("nan")
    max_tokens = max(sum(-(-n // page) * page for n in lens) for lens in shapes.values())
    pg = torch.Generator(device=dev).manual_seed(1234)
    pool_k = torch.randn(max_tokens * Hkv * D, device=dev, dtype=dt, generator=pg)
    pool_v = torch.randn(max_tokens * Hkv * D, device=dev, dtype=dt, generator=pg)
    rows: Dict[str, Dict[str, Tuple[float, float, str]]] = {}  # name -> shape -> (study GB/s, clean GB/s, note)
    plans: Dict[str, str] = {}

    def record(name, shape, nbytes, fn, note=""):
        try:
            ms_s, ms_c = timer.both(fn)
            rows.setdefault(name, {})[shape] = (nbytes / ms_s / 1e6, nbytes / ms_c / 1e6, note)
        except Exception as e:  # noqa: BLE001 - a failed candidate is a row, not a crash
            rows.setdefault(name, {})[shape] = (float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:80]}")

    gen = torch.Generator().manual_seed(0)
    for shape, lens in shapes.items():
        B, N, total = len(lens), max(lens), sum(lens)
        nbytes = 2.0 * total * Hkv * D * pool_k.element_size()
        tokens = sum(-(-n // page) * page for n in lens)
        shp = (tokens // page, page, Hkv, D)
        kc, vc = pool_k[:tokens * Hkv * D].view(shp), pool_v[:tokens * Hkv * D].view(shp)
        bt = block_table(lens, page, gen, dev)
        sl = torch.tensor(lens, dtype=torch.int32, device=dev)
        q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt)
        base = dict(check_inputs=False, max_seq_len=N, total_tokens=total)
        for name, (cfg, ver, parts) in cands.items():
            if ver == "old":
                ver, parts = OLD_PLAN.get(shape, ("v2", 2))
                kw = dict(base, version=ver, num_partitions=parts, config=cfg, total_tokens=None)
            else:
                kw = dict(base, config=cfg)
            p = explain(q, kc, bt, max_seq_len=N, total_tokens=kw["total_tokens"], version=kw.get("version", "auto"),
                        num_partitions=kw.get("num_partitions"), config=cfg)
            note = f"{p.version} P{p.num_partitions} t{p.tokens_per_partition}"
            if name == "auto":
                plans[shape] = f"{note} ({ctas_per_sm(cfg)}/SM)"
            record(name, shape, nbytes, lambda kw=kw: paged_attention(q, kc, vc, bt, sl, **kw), note)
        if not args.no_sweep:
            for P in sweep:
                if P * 256 <= N or not gpu:
                    kw = dict(base, version="v2", num_partitions=P, config=default)
                    record(f"auto P={P}", shape, nbytes, lambda kw=kw: paged_attention(q, kc, vc, bt, sl, **kw))
        if gpu:
            from attention_proto.studies import peers

            kk = torch.randn(B, Hkv, N, D, device=dev, dtype=dt)
            vv = torch.randn_like(kk)
            fn, why = peers.make_sdpa("sdpa_cudnn", q, kk, vv, causal=False)
            if fn is not None:
                record("sdpa_cudnn", shape, nbytes, fn, "padded" if total < B * N else "")
            del kk, vv
        record("read-only", shape, nbytes, read_only_fn(int(nbytes), dev))
        print(f"{shape}: done at {time.perf_counter() - t_start:.0f} s; auto: {plans.get(shape)}", flush=True)

    # ---- 3. table -----------------------------------------------------------------------------------------
    ours = [n for n in rows if n not in ("sdpa_cudnn", "read-only")]
    names = shapes.keys()
    print(f"\ncopy ceiling {copy_gbps:.0f} GB/s (2 GiB device copy, read + write); total {time.perf_counter() - t_start:.0f} s")
    print("auto plans: " + "; ".join(f"{s}: {p}" for s, p in plans.items()))
    for proto, idx in (("study protocol (do_bench: L2 flushed by a 256 MB write)", 0),
                       ("clean L2 (flushed by a 256 MB read)", 1)):
        print(f"\n{proto}: GB/s (% of copy)")
        print(f"{'':18s}" + "".join(f"{s:>18s}" for s in names))
        best = {s: max((rows[n][s][idx] for n in ours if s in rows[n] and rows[n][s][idx] == rows[n][s][idx]),
                       default=float("nan")) for s in names}
        for n in list(ours) + ["sdpa_cudnn", "read-only"]:
            if n not in rows:
                continue
            cells = []
            for s in names:
                v = rows[n].get(s, (float("nan"),) * 3)[idx]
                pct = f"{100 * v / copy_gbps:3.0f}%" if copy_gbps == copy_gbps and v == v else "  - "
                star = "*" if n in ours and v == best[s] else " "
                num = f"{v:8.0f}" if v >= 10 or v != v else f"{v:8.4f}"
                cells.append(f"{num} ({pct}){star}" if v == v else f"{'-':>17s}")
            print(f"{n:18s}" + "".join(f"{c:>18s}" for c in cells))
    print("\nplans (version, partitions, tokens per partition):")
    for n in ours:
        if not n.startswith("auto P="):
            print(f"  {n:18s}" + "; ".join(f"{s}: {rows[n][s][2]}" for s in names if s in rows[n]))
    fails = [n for n, r in checks if not r.startswith("ok")]
    errs = [(n, s, r[2]) for n in rows for s, r in rows[n].items() if r[0] != r[0]]
    for n, s, e in errs:
        print(f"error: {n} at {s}: {e}")
    if fails:
        print("CORRECTNESS FAILURES: " + ", ".join(fails))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
