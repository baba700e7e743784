#!/usr/bin/env python3
"""Chunked linear-attention forward against fla-core's chunk_simple_gla (issue #6): every form of ours (GPU, < 4 min).

    PYTHONPATH=src:/tmp/site python scripts/bench_linear.py       # H100; fla-core importable as ``fla``
    PYTHONPATH=src python scripts/bench_linear.py --cpu            # smoke run under the interpreter, no fla

Bar shapes (the linear study's): bf16, B*N = 32768 tokens, H 16, K = V = 128, chunk 64, N in {4096, 16384},
ungated and gated (g = logsigmoid(N(3, 1)), float32, per head and token). The bar: gated forward >= 0.9x
fla-core (fla time / ours) at both lengths.

1. Compiles first, in worker processes (Triton holds the GIL while it compiles): each worker takes a slice of
   fla-core's autotune candidates (compiled, not timed) and of our variants, at toy sizes with the bar shapes'
   constexprs; the Triton disk cache then serves this process. fla-core then autotunes here on its first call
   per kernel key (keys never include N), with a 5/20 ms benchmark per candidate instead of Triton's 25/100.
2. Correctness of every variant of ours, bf16 against the float64 reference under the error rule of
   ``attention_proto.testing`` (initial and final state, a partial last chunk; a long-sequence batch that takes
   chunk_h's ``chunk_h_long`` config and a wide one that does not).
3. Timings, ``triton.testing.do_bench`` median (L2 flushed before each call), in one process: fla-core, then
   each variant of ours through the public ``linear_attention`` (forms set in ``chunk.FORWARD_OPTIONS``, tiles
   through ``ATTENTION_PROTO_LINEAR_CONFIG``); a per-kernel split of ours (default and old) and of fla-core
   (torch.profiler, when it works).

Variants: ``default`` (what ships), ``old`` (the forward before issue #6: gate scanned inside both kernels,
chunk_o 128x128 8 warps, chunk_h 2 stages everywhere), one change at a time from each, and other tiles. The
table printed last: ms and fla/ours per shape (``*`` marks the fastest of ours), then the override that
reproduces the fastest variant where it is not the default.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

TOKENS, H, D, CHUNK = 32768, 16, 128, 64
BAR_NS = (4096, 16384)
OLD_TILES = {"chunk_o@64": {"BK": 128, "BV": 128, "num_warps": 8, "num_stages": 2}, "chunk_h": {"num_stages": 2}}


def _o(bk, bv, w, s):
    return {"chunk_o@64": {"BK": bk, "BV": bv, "num_warps": w, "num_stages": s}}


# name -> (FORWARD_OPTIONS changes, config overrides, whether the change matters without a gate)
VARIANTS: Dict[str, Tuple[Dict, Dict, bool]] = {
    "default": ({}, {}, True),
    "old": (dict(gate="inline"), OLD_TILES, True),
    "old + gate cumsum": (dict(gate="cumsum"), OLD_TILES, False),
    "old + chunk_o 64x64": (dict(gate="inline"), {"chunk_h": {"num_stages": 2}}, True),
    "old + chunk_h long s4": (dict(gate="inline"), {"chunk_o@64": OLD_TILES["chunk_o@64"]}, True),
    "default, gate inline": (dict(gate="inline"), {}, False),
    "default, decay on k": (dict(decay_on="k"), {}, False),
    "default, early loads": (dict(early_loads=True), {}, True),
    "o 128x128 w8 s2": ({}, _o(128, 128, 8, 2), True),
    "o 128x128 w8 s2 early": (dict(early_loads=True), _o(128, 128, 8, 2), True),
    "o 128x64 w4 s2": ({}, _o(128, 64, 4, 2), True),
    "o 128x64 w4 s2 early": (dict(early_loads=True), _o(128, 64, 4, 2), True),
    "o 64x64 w4 s2 early": (dict(early_loads=True), _o(64, 64, 4, 2), True),
    "o 64x128 w8 s3": ({}, _o(64, 128, 8, 3), True),
    "h s2": ({}, {"chunk_h": {"num_stages": 2}}, True),
    "h s3": ({}, {"chunk_h": {"num_stages": 3}}, True),
    "h s4": ({}, {"chunk_h": {"num_stages": 4}}, True),
    "h 64x32 s3": ({}, {"chunk_h": {"BV": 32, "num_stages": 3}}, True),
}


# ---- helpers ------------------------------------------------------------------------------------

def proposed_defaults() -> None:
    """"default" below is the proposed forward (gate cumsum, the new tiles); the library keeps the
    GPU-checked forms (gate inline, the old tiles) as its defaults until this bench has run."""
    from attention_proto.ops.linear import chunk, common

    common.NEW_FORWARD_TILES = True
    chunk.FORWARD_OPTIONS["gate"] = "cumsum"


@contextlib.contextmanager
def variant(name: str):
    """Run with a variant's forms and tile overrides, then restore both."""
    from attention_proto.ops.linear import chunk, common

    forms, over, _ = VARIANTS[name]
    old_forms, old_env = dict(chunk.FORWARD_OPTIONS), os.environ.get("ATTENTION_PROTO_LINEAR_CONFIG")
    chunk.FORWARD_OPTIONS.update(forms)
    if over:
        os.environ["ATTENTION_PROTO_LINEAR_CONFIG"] = json.dumps(over)
    else:
        os.environ.pop("ATTENTION_PROTO_LINEAR_CONFIG", None)
    common._overrides.cache_clear()
    common._CHOSEN.clear()
    try:
        yield
    finally:
        chunk.FORWARD_OPTIONS.clear()
        chunk.FORWARD_OPTIONS.update(old_forms)
        if old_env is None:
            os.environ.pop("ATTENTION_PROTO_LINEAR_CONFIG", None)
        else:
            os.environ["ATTENTION_PROTO_LINEAR_CONFIG"] = old_env
        common._overrides.cache_clear()
        common._CHOSEN.clear()


def inputs(B: int, N: int, Hh: int, Dd: int, gated: bool, dtype, dev: str, seed: int = 0):
    import torch

    gen = torch.Generator(device=dev).manual_seed(seed)
    q, k, v = (torch.randn(B, N, Hh, Dd, generator=gen, device=dev).to(dtype) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, N, Hh, generator=gen, device=dev) + 3.0) if gated else None
    return q, k, v, g


def ours_fn(q, k, v, g, h0=None, final=False):
    from attention_proto.ops.linear import linear_attention

    return lambda: linear_attention(q, k, v, g=g, initial_state=h0, output_final_state=final, chunk_size=CHUNK)


def fla_autotuners() -> list:
    from attention_proto.studies.linear import _fla_autotuners  # the study's: the same search

    return _fla_autotuners()


def load_fla():
    from attention_proto.studies.linear import _fla

    return _fla()


# ---- compile prewarm in worker processes ----------------------------------------------------------

def worker(spec_json: str) -> None:
    """One worker: its slice of fla's autotune candidates (compiled only), then its variants of ours."""
    import torch

    import attention_proto  # noqa: F401
    spec = json.loads(spec_json)
    done = []
    fla, _ = load_fla() if spec["fla"] else (None, None)
    if fla is not None:
        t0, err = time.perf_counter(), None
        try:
            i, n = spec["index"], spec["workers"]
            for at in fla_autotuners():
                cfgs = list(at.configs)
                at.configs = cfgs[i::n] or cfgs[i % len(cfgs):][:1]
                at.cache_results = False   # fake timings must not reach Triton's autotune cache
                vars(at)["do_bench"] = lambda kernel_call, quantiles=None: (kernel_call(), [1.0, 1.0, 1.0])[1]
            for B in sorted({TOKENS // N for N in BAR_NS}):   # fla's cumsum kernel takes B as a constexpr
                for gated in (False, True):
                    q, k, v, g = inputs(B, 256, H, D, gated, torch.bfloat16, "cuda")
                    with torch.no_grad():
                        fla(q, k, v, g=g)
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {str(e)[:200]}"
        done.append(["fla slice", round(time.perf_counter() - t0, 1), err])
    for name, gated in spec["ours"]:
        t0, err = time.perf_counter(), None
        try:
            with variant(name), torch.no_grad():
                # B 1 takes chunk_h_long (64 programs), B 9 the plain chunk_h config (576 programs)
                # with and without initial/final state (constexprs of chunk_h): the timed calls and the checks
                for B in (1, 9):
                    q, k, v, g = inputs(B, 2 * CHUNK, H, D, gated, torch.bfloat16, "cuda")
                    ours_fn(q, k, v, g)()
                    ours_fn(q, k, v, g, torch.zeros(B, H, D, D, device="cuda"), True)()
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {str(e)[:200]}"
        done.append([f"{name} {'gated' if gated else 'ungated'}", round(time.perf_counter() - t0, 1), err])
    torch.cuda.synchronize()
    print("PREWARM " + json.dumps(done), flush=True)


def prewarm(jobs: List[Tuple[str, bool]], with_fla: bool, workers: int, timeout_s: float) -> str:
    """Spread the compiles over ``workers`` processes (the linear study's spawner); returns a one-line summary."""
    from attention_proto.studies.linear import spawn_workers

    specs = [{"index": i, "workers": workers, "fla": with_fla, "ours": jobs[i::workers]} for i in range(workers)]
    results = spawn_workers(specs, timeout_s, [sys.executable, os.path.abspath(__file__), "--worker"])
    failed, busiest = [], 0.0
    for r in results:
        if isinstance(r, dict):  # {"error": ...}: the worker failed or ran late
            failed.append(f"worker {r['error'][:160]}")
            continue
        busiest = max(busiest, sum(d[1] for d in r))
        failed += [f"{d[0]}: {d[2]}" for d in r if d[2]]
    return (f"prewarm: {workers} workers, {len(jobs)} jobs of ours{' + fla slices' if with_fla else ''}, "
            f"busiest worker {busiest:.0f} s" + (f"; failed: {'; '.join(failed)[:600]}" if failed else ""))


# ---- correctness --------------------------------------------------------------------------------

def correctness(names: List[str], dtype, dev: str, shapes) -> List[str]:
    """Each variant, gated and not, against float64 (error rule); returns the failures."""
    import torch

    from attention_proto.ops.linear.reference import linear_attention_parallel
    from attention_proto.testing import check_error

    failures = []
    for (B, N, Hh, Dd) in shapes:
        for gated in (False, True):
            q, k, v, g = inputs(B, N, Hh, Dd, gated, dtype, dev, seed=N)
            h0 = torch.randn(B, Hh, Dd, Dd, device=dev, generator=torch.Generator(device=dev).manual_seed(1))
            ref = linear_attention_parallel(*(x.double() if x is not None else None for x in (q, k, v, g)), None,
                                            h0.double(), True)
            low = linear_attention_parallel(q, k, v, g, None, h0, True, compute_dtype=dtype)
            for name in names:
                if not gated and not VARIANTS[name][2]:
                    continue
                with variant(name), torch.no_grad():
                    o, ht = ours_fn(q, k, v, g, h0, True)()
                c1, c2 = check_error(o, low[0], ref[0], dtype), check_error(ht, low[1], ref[1], dtype)
                ok = c1.ok and c2.ok
                worst = max(c1.ours / c1.bound, c2.ours / c2.bound)
                print(f"  {'ok  ' if ok else 'FAIL'} B{B} N{N} H{Hh} D{Dd} {'gated  ' if gated else 'ungated'} "
                      f"{name:<24} worst error/bound {worst:.2f} (o {c1}; final {c2})", flush=True)
                if not ok:
                    failures.append(f"{name} B{B} N{N} {'gated' if gated else 'ungated'}")
    return failures


# ---- timing -------------------------------------------------------------------------------------

def timer(gpu: bool, warmup_ms: float, rep_ms: float) -> Callable[[Callable], float]:
    if gpu:
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

    def cpu_time(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu_time


def kernel_split(fn: Callable, iters: int = 10) -> Optional[Dict[str, float]]:
    """Mean device ms per call of each kernel ``fn`` launches (torch.profiler); None when it cannot."""
    import torch

    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        out: Dict[str, float] = {}
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
            if t and ev.count >= iters:
                out[ev.key[:40]] = t / 1e3 / iters
        return out or None
    except Exception:  # noqa: BLE001 - a profiler that does not run on this machine only loses the split
        return None


def fmt_split(split: Optional[Dict[str, float]]) -> str:
    if not split:
        return "(no profile)"
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(split.items(), key=lambda kv: -kv[1]))


# ---- main ---------------------------------------------------------------------------------------

def main() -> int:
    proposed_defaults()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="smoke run under the interpreter: tiny shapes, no fla")
    ap.add_argument("--no-fla", action="store_true", help="ours only")
    ap.add_argument("--no-prewarm", action="store_true", help="compile in this process (slower)")
    ap.add_argument("--workers", type=int, default=0, help="prewarm processes (default: CPUs - 2, at most 14)")
    ap.add_argument("--warmup-ms", type=float, default=5.0)
    ap.add_argument("--rep-ms", type=float, default=40.0)
    ap.add_argument("--variants", default="", help="comma-separated subset of the variants (default: all)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return 0
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    import attention_proto  # noqa: F401  (before any kernel module)
    from attention_proto.ops.linear.chunk import chunk_cumsum, chunk_fwd_h, chunk_fwd_o
    from attention_proto.ops.linear.common import SeqInfo, config_report

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        print("no CUDA GPU: use --cpu for the smoke run")
        return 2
    t_start = time.perf_counter()
    names = [n.strip() for n in args.variants.split(",") if n.strip()] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; known: {list(VARIANTS)}")
        return 2
    dev = "cuda" if gpu else "cpu"
    if gpu:
        dtype, Hh, Dd, bars = torch.bfloat16, H, D, [(TOKENS // N, N) for N in BAR_NS]
        # B 1: 64 chunk_h programs (chunk_h_long); B 9: 576 (plain chunk_h); N not a multiple of the chunk
        checks = [(1, 300, Hh, Dd), (9, 200, Hh, Dd)]
        print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
              f"{__import__('triton').__version__}", flush=True)
    else:
        dtype, Hh, Dd, bars = torch.float16, 2, 16, [(2, 70)]
        checks = [(2, 45, Hh, Dd)]
    fla, fla_why = (None, "--cpu" if args.cpu else "--no-fla") if (args.cpu or args.no_fla) else load_fla()
    if fla is None:
        print(f"fla-core: not timed ({fla_why})", flush=True)

    jobs = [(n, gt) for n in names for gt in (False, True) if gt or VARIANTS[n][2]]
    if gpu and not args.no_prewarm:
        n = args.workers or max(1, min(14, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                            else os.cpu_count() or 2) - 2))
        print(prewarm(jobs, fla is not None, n, timeout_s=150.0), flush=True)
        print(f"[{time.perf_counter() - t_start:.0f} s]", flush=True)

    print("correctness (bf16 against float64; the error rule of attention_proto.testing):" if gpu else
          "correctness (fp16 and fp32 against float64, interpreter):", flush=True)
    failures = correctness(names, dtype, dev, checks)
    if not gpu:
        failures += correctness(["default", "old"], torch.float32, dev, checks)
    print(f"[{time.perf_counter() - t_start:.0f} s]", flush=True)

    bench = timer(gpu, args.warmup_ms, args.rep_ms)
    cols = [(B, N, gt) for B, N in bars for gt in (False, True)]
    table: Dict[str, Dict[Tuple, float]] = {}
    splits: List[str] = []
    cfg: Dict = {}
    if fla is not None:
        from triton.testing import do_bench
        import functools

        tuners = fla_autotuners()
        for at in tuners:   # Autotuner.do_bench is a cached_property: an instance attribute overrides it
            vars(at)["do_bench"] = functools.partial(do_bench, warmup=5, rep=20)
    for B, N, gated in cols:
        q, k, v, g = inputs(B, N, Hh, Dd, gated, dtype, dev, seed=7)
        col = (B, N, gated)
        if fla is not None:
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    f = lambda: fla(q, k, v, g=g)[0]  # noqa: E731
                    f()   # autotunes on the first call per kernel key
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    table.setdefault("fla chunk_simple_gla", {})[col] = bench(f)
                    splits.append(f"  fla  B{B} N{N} {'gated' if gated else 'ungated'}: {fmt_split(kernel_split(f))}")
                print(f"fla B{B} N{N} {'gated' if gated else 'ungated'}: first call {first:.1f} s, "
                      f"{table['fla chunk_simple_gla'][col]:.3f} ms", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"fla B{B} N{N}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        for name in names:
            if not gated and not VARIANTS[name][2]:
                continue
            with variant(name), torch.no_grad():
                f = ours_fn(q, k, v, g)
                f()
                table.setdefault(name, {})[col] = bench(f)
                if gpu and name in ("default", "old"):
                    splits.append(f"  ours B{B} N{N} {'gated' if gated else 'ungated'} {name}: "
                                  f"{fmt_split(kernel_split(f))}")
                if name == "default":
                    cfg = config_report()
        # the default's kernels one by one (cumsum, chunk_h, chunk_o), by do_bench
        info = SeqInfo(B=B, T=N, H=Hh, K=Dd, V=Dd, head_first=False)
        with torch.no_grad():
            g32 = None if g is None else g.float().contiguous()
            gc = None if g is None else chunk_cumsum(g32, info, CHUNK)
            h, _ = chunk_fwd_h(k, v, g32, None, False, info, CHUNK, gc=gc)
            parts = [("cumsum", lambda: chunk_cumsum(g32, info, CHUNK))] if g is not None else []
            parts += [("chunk_h", lambda: chunk_fwd_h(k, v, g32, None, False, info, CHUNK, gc=gc)),
                      ("chunk_o", lambda: chunk_fwd_o(q, k, v, h, g32, Dd ** -0.5, info, CHUNK, gc=gc))]
            splits.append(f"  ours B{B} N{N} {'gated' if gated else 'ungated'} default, one kernel at a time: "
                          + ", ".join(f"{p} {bench(fn):.3f}" for p, fn in parts))
        print(f"[{time.perf_counter() - t_start:.0f} s] B{B} N{N} {'gated' if gated else 'ungated'} timed; "
              f"default configs {json.dumps(cfg)}", flush=True)
        del q, k, v, g

    # ---- report ----
    print("\nper-kernel device time, ms per call:")
    print("\n".join(splits) if splits else "  (none)")
    heads = [f"N{N} {'gated' if gt else 'ungated'}" for _, N, gt in cols]
    w = max(len(n) for n in table) + 2
    print(f"\nforward ms (median) and fla/ours | {'bf16' if gpu else 'fp16 interpreter'} B*N={cols[0][0] * cols[0][1]}"
          f" H{Hh} D{Dd} chunk {CHUNK}")
    print(f"{'variant':<{w}}" + "".join(f"| {h:<18}" for h in heads))
    fla_row = table.get("fla chunk_simple_gla", {})
    best = {c: min((r[c], n) for n, r in table.items() if n != "fla chunk_simple_gla" and c in r) for c in cols}
    for name, row in table.items():
        cells = []
        for c in cols:
            if c not in row:
                cells.append(f"| {'= ungated default':<18}" if name != "fla chunk_simple_gla" else f"| {'-':<18}")
                continue
            r = f" ({fla_row[c] / row[c]:.2f}x)" if c in fla_row and name != "fla chunk_simple_gla" else ""
            star = "*" if best[c][1] == name else " "
            cells.append(f"| {row[c]:7.3f}{star}{r:<10}")
        print(f"{name:<{w}}" + "".join(cells))
    for c, h in zip(cols, heads):
        ms, name = best[c]
        if name != "default" and "default" in table:
            forms, over, _ = VARIANTS[name]
            print(f"fastest at {h}: {name!r} ({ms:.3f} ms vs default {table['default'][c]:.3f}): forms {forms}, "
                  f"ATTENTION_PROTO_LINEAR_CONFIG='{json.dumps(over)}'")
    if failures:
        print(f"\nCORRECTNESS FAILURES: {failures}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
