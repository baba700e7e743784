#!/usr/bin/env python3
"""Where the time of paged decode at B8 N4k goes beyond a read of the same bytes (GPU, issue #5).

The layout probe (``probe_paged_layout.py``) found every tile, merge and pool layout at 77-80% of
copy (clean L2) against the read's 91%: a cost that no variant moved. This splits it:

1. Kernel durations (CUPTI, torch.profiler) of one auto call at B8 N4k, L2 emptied by a read before
   each replay: the V2 decode kernel, the merge kernel, the fused-merge kernel, the read of the same bytes.
2. Fixed cost against streaming rate: B8 at N = 4k, 8k, 16k, 32k with the tile and P = 4 held, and
   the read of the same bytes; a least-squares line ``t = a + bytes / rate`` through each.
3. ``--deep``: fewer, deeper programs: V1 (64 programs at B8, no merge) and V2 P2/P4 with tiles that
   keep 3-5 K/V buffers in flight (one program an SM).
4. ``--small``: many small programs (shorter tiles, 2 warps) at P = 4..12.

    PYTHONPATH=src python scripts/probe_paged_overheads.py [--deep] [--small]   # ~20 s on a warm H100

Found on an H100 (session 9; ``results/nvidia-h100-80gb-hbm3/probes/``): decode kernel 49.9-50.2 us,
merge kernel 2.6-3.0 us, read kernel 46.1 us; graph replay + events add ~3.4 us to each wall time
(56.4-56.8 us ours, 49.4-49.6 us the read). Fits: ours 11.7-12.5 us fixed at 3017-3037 GB/s, the read
7.0-7.4 us at 3166-3172 GB/s. The fused merge makes the decode kernel 54.6-55.2 us (+4.7 us: dearer than
the merge kernel). V1 and the deep tiles: 51-78% (worse). Small tiles: n32 w4 P4 81% (decode 48.1 us),
n16 w2 P8 80%, the rest 64-80%. A prefetch of each program's first page ids into L1 while its length
loads (``prefetch.global.L1``; tried and removed) changed the decode kernel by 0.04 us.

Writes ``$OUT/probe_paged_overheads.json`` when ``OUT`` is set.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paged import Timer, read_only_fn  # noqa: E402
from probe_paged_layout import inputs  # noqa: E402

import attention_proto  # noqa: E402,F401  (before any kernel module)
from attention_proto.ops.paged import PagedConfig, paged_attention  # noqa: E402
from attention_proto.ops.paged.dispatch import ctas_per_sm  # noqa: E402
from attention_proto.ops.paged.testing import check_paged  # noqa: E402
from attention_proto.runtime.ceilings import measure_copy  # noqa: E402
from attention_proto.runtime.timing import bench_clean_l2, kernel_times_clean_l2  # noqa: E402
from attention_proto.studies.paged import _graphed as graphed  # noqa: E402


def kernel_times(fns, reps: int = 30):
    """{name: {kernel: mean us}}: runtime.timing.kernel_times_clean_l2 of each (name, replay)."""
    return {name: kernel_times_clean_l2(replay, reps) for name, replay in fns}


def main() -> int:
    timer = Timer(True, 10.0, 40.0)
    copy = measure_copy()[0]
    print(torch.cuda.get_device_name(), f"copy {copy:.0f} GB/s", flush=True)
    res = dict(gpu=torch.cuda.get_device_name(), copy_gbps=copy)

    # 1. kernel durations at B8 N4k, 2. fixed cost vs rate
    # (the graphs below read these tensors: they stay alive to the end, under their own names)
    q4, kc4, vc4, bt4, sl4, nbytes4 = inputs(8, 4096, "nhd")
    base = dict(check_inputs=False, max_seq_len=4096, total_tokens=8 * 4096)

    def call4(**kw):
        return graphed(lambda: paged_attention(q4, kc4, vc4, bt4, sl4, **base, **kw))

    read4 = graphed(read_only_fn(nbytes4, "cuda"))
    res["kernels_us"], res["wall_us"], res["fit"] = {}, {}, {}
    auto = call4()
    profiled = [("auto", auto), ("read-only", read4),
                ("fused", call4(config=PagedConfig(16, 64, 128, 4, 5, "fused")))]
    if "--deep" in sys.argv[1:]:
        profiled += [("pdl", call4(config=PagedConfig(16, 64, 128, 4, 5, "kernel_pdl"))),
                     ("v1 n128 w8 s7", call4(version="v1", config=PagedConfig(16, 128, 128, 8, 7, "kernel")))]
    res["kernels_us"].update(kernel_times(profiled))
    res["wall_us"].update({n: 1e3 * bench_clean_l2(f, warmup_ms=10, rep_ms=40).ms_median for n, f in profiled})
    fit = {"auto P4": [], "read-only": []}
    for N in (4096, 8192, 16384, 32768):
        q, kc, vc, bt, sl, nbytes = inputs(8, N, "nhd")
        kw = dict(check_inputs=False, max_seq_len=N, total_tokens=8 * N, version="v2", num_partitions=4)
        for name, fn in (("auto P4", lambda kw=kw: paged_attention(q, kc, vc, bt, sl, **kw)),
                         ("read-only", read_only_fn(nbytes, "cuda"))):
            fit[name].append((nbytes, timer.clean(graphed(fn)) * 1e3))
    for name, pts in fit.items():
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        res["fit"][name] = dict(
            points=pts, fixed_us=my - slope * mx, rate_gbps=1e-3 / slope)
    for k in res["kernels_us"]:
        print(f"{k:<24} wall {res['wall_us'][k]:6.2f} us  kernels " +
              ", ".join(f"{n} {t:.2f}" for n, t in res["kernels_us"][k].items()), flush=True)
    for k, v in res["fit"].items():
        print(f"fit {k:<22} fixed {v['fixed_us']:6.2f} us  rate {v['rate_gbps']:5.0f} GB/s", flush=True)
    if "--small" in sys.argv[1:]:
        # 4. many small programs, all resident at once (2 warps, shorter tiles: more programs an SM)
        q, kc, vc, bt, sl, nbytes = q4, kc4, vc4, bt4, sl4, nbytes4
        small = {"n64 w4 s5": PagedConfig(16, 64, 128, 4, 5, "kernel"),
                 "n32 w4 s5": PagedConfig(16, 32, 128, 4, 5, "kernel"),
                 "n64 w2 s5": PagedConfig(16, 64, 128, 2, 5, "kernel"),
                 "n32 w2 s5": PagedConfig(16, 32, 128, 2, 5, "kernel"),
                 "n16 w2 s5": PagedConfig(16, 16, 128, 2, 5, "kernel")}
        res["small"] = []
        for name, cfg in small.items():
            for P in (4, 6, 8, 12):
                kw = dict(base, version="v2", num_partitions=P, config=cfg)
                replay = graphed(lambda kw=kw: paged_attention(q, kc, vc, bt, sl, **kw))
                ks = kernel_times([("x", replay)], reps=20)["x"]
                c = timer.clean(replay)
                res["small"].append(dict(variant=f"{name} P{P}", clean_gbps=nbytes / c / 1e6, kernels_us=ks))
                print(f"small {name} P{P:<3} clean {nbytes / c / 1e6:5.0f} GB/s {100 * nbytes / c / 1e6 / copy:3.0f}%  "
                      + ", ".join(f"{n} {t:.2f}" for n, t in ks.items()), flush=True)
    if "--deep" not in sys.argv[1:]:
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "probe_paged_overheads.json").write_text(json.dumps(res, indent=1))
        return 0

    # 3. fewer, deeper programs at B8 N4k
    auto = call4()
    q, kc, vc, bt, sl, nbytes = q4, kc4, vc4, bt4, sl4, nbytes4
    deep = {
        "n128 w8 s7": PagedConfig(16, 128, 128, 8, 7, "kernel"),
        "n128 w4 s7": PagedConfig(16, 128, 128, 4, 7, "kernel"),
        "n64 w8 s9": PagedConfig(16, 64, 128, 8, 9, "kernel"),
        "n64 w4 s11": PagedConfig(16, 64, 128, 4, 11, "kernel"),
        "n32 w4 s13": PagedConfig(16, 32, 128, 4, 13, "kernel"),
    }
    rows = [dict(variant="auto", study_gbps=nbytes / timer.study(auto) / 1e6,
                 clean_gbps=nbytes / timer.clean(auto) / 1e6)]
    checks = {}
    qc, kcc, vcc, btc, slc, _ = inputs(2, 2048, "nhd")
    for name, cfg in deep.items():
        for ver, P in (("v1", None), ("v2", 2), ("v2", 4)):
            label = f"{name} {ver}{'' if P is None else f' P{P}'}"
            try:
                chk = check_paged(qc, kcc, vcc, btc, slc, torch.bfloat16, version=ver, num_partitions=P, config=cfg)
                checks[label] = round(chk.err_ratio, 3) if chk.ok else f"FAIL {chk.err_ratio:.3f}"
                kw = dict(base, version=ver, num_partitions=P, config=cfg)
                s, c = timer.both(lambda kw=kw: paged_attention(q, kc, vc, bt, sl, **kw))
                rows.append(dict(variant=label, per_sm=ctas_per_sm(cfg), study_gbps=nbytes / s / 1e6,
                                 clean_gbps=nbytes / c / 1e6))
            except Exception as e:  # noqa: BLE001 - a tile that does not compile is a row
                rows.append(dict(variant=label, error=f"{type(e).__name__}: {str(e)[:120]}"))
    res["deep"], res["checks"] = rows, checks
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "probe_paged_overheads.json").write_text(json.dumps(res, indent=1))
    print("checks:", json.dumps(checks))
    print(f"\nB8 N4k {'variant':<22} {'study GB/s':>10} {'%':>4} {'clean GB/s':>10} {'%':>4}")
    for r in rows:
        if "error" in r:
            print(f"       {r['variant']:<22} {r['error']}")
        else:
            print(f"       {r['variant']:<22} {r['study_gbps']:>10.0f} {100 * r['study_gbps'] / copy:>3.0f}% "
                  f"{r['clean_gbps']:>10.0f} {100 * r['clean_gbps'] / copy:>3.0f}%")
    return 0 if all(not isinstance(v, str) for v in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
