#!/usr/bin/env python
"""The recorded GPU fuzz run: every operation's hypothesis test at >= 1000 examples, one JSON summary.

Runs the ``gpu``-marked fuzz tests of ``tests/test_fuzz_*.py`` (larger shapes, bf16/fp16/fp32),
one pytest process per operation (``--jobs`` at a time: Triton compiles are CPU-bound, the
cases are small), with ``ATTENTION_PROTO_FUZZ_EXAMPLES`` examples each. Every executed case is
logged by the tests (``ATTENTION_PROTO_FUZZ_LOG``); this script counts them per operation. A
process that dies (a fault, an illegal address) is reported with the case it was running; one
that runs past ``--timeout`` is stopped and reported with the cases it finished.

Usage::

    python scripts/fuzz_gpu.py OUT.json [--examples 1000] [--ops dense_fwd,paged_decode] [--jobs 4] [--shards 1]
                               [--timeout 540] [--cpu]

``--cpu`` runs the CPU variants instead (a smoke test of this script without a GPU).

Variant pools: compiles, not the cases, are what a GPU fuzz run spends its time on (every new
head dim, dtype, modifier combination or int specialization class is a Triton compile of 1-20 s;
without pools the first H100 run managed 21-521 cases per operation in 470 s). So the GPU tests
draw each case's kernel-shaping part from a fixed, covering pool per operation
(``tests/fuzz_pools.py``: 16-32 variants in which every value of every dimension and the main
pairwise interactions appear) and only the rest freely; a variant compiles once and a few times
more for int specialization. Seeded ``--shards`` of one operation split the pool between them
(shard i of n draws variants i, i + n, ...): concurrent shards drawing from the whole pool each
compiled nearly all of it (session 6 on the H100: dense_fwd spent 1853 s inside cases over 8
processes for 1000 cases, 156 cases over 1 s, where paged_append spent 55 s). The recorded run uses the pools; ``ATTENTION_PROTO_FUZZ_POOL=0`` in
the environment restores independent draws (the summary's ``pools`` says which ran).

Summary JSON (schema ``attention-proto/fuzz-gpu/1``)::

    {"schema": ..., "examples_requested": 1000, "started": ISO time, "wall_seconds": float,
     "environment": {gpu, gpu_slug, torch, triton, cuda, driver, git_commit, hypothesis, ...},
     "ops": {"dense_fwd": {"test": node id, "status": "passed" | "failed" | "timeout" | "crashed"
                                                       | "skipped" | "error",
                           "cases": executed cases, "passed": cases that passed,
                           "failures": failing executions (hypothesis shrinking repeats a failure),
                           "seconds": float, "returncode": int,
                           "first_failures": [{"case": {...}, "error": "..."}] (up to 5),
                           "crash_case": the case running when the process died, or null,
                           "time": {in_cases_s, median_case_s, max_case_s, cases_over_1s, first_case_after_s}
                                   (where the time went: inside cases or outside; summed over shards),
                           "pytest_tail": last lines of pytest's output (when not passed)}, ...},
     "total_cases": int, "total_failures": int,
     "pools": {"enabled": bool, "variants": {op: pool size}} (null with --cpu: the CPU tests draw freely),
     "ok": true iff every op ran >= examples_requested cases with 0 failures}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: operation -> (GPU test node id, CPU test node id)
OPS = {
    "dense_fwd": ("tests/test_fuzz_dense.py::test_fuzz_dense_forward_gpu", "tests/test_fuzz_dense.py::test_fuzz_dense_forward"),
    "dense_bwd": ("tests/test_fuzz_dense.py::test_fuzz_dense_backward_gpu", "tests/test_fuzz_dense.py::test_fuzz_dense_backward"),
    "dense_varlen_fwd": ("tests/test_fuzz_dense.py::test_fuzz_dense_varlen_forward_gpu",
                         "tests/test_fuzz_dense.py::test_fuzz_dense_varlen_forward"),
    "dense_varlen_bwd": ("tests/test_fuzz_dense.py::test_fuzz_dense_varlen_backward_gpu",
                         "tests/test_fuzz_dense.py::test_fuzz_dense_varlen_backward"),
    "paged_decode": ("tests/test_fuzz_paged.py::test_fuzz_paged_decode_gpu", "tests/test_fuzz_paged.py::test_fuzz_paged_decode"),
    "paged_append": ("tests/test_fuzz_paged.py::test_fuzz_paged_cache_append_gpu",
                     "tests/test_fuzz_paged.py::test_fuzz_paged_cache_append"),
    "linear_chunk_fwd": ("tests/test_fuzz_linear.py::test_fuzz_linear_chunk_forward_gpu",
                         "tests/test_fuzz_linear.py::test_fuzz_linear_forward"),
    "linear_recurrent_fwd": ("tests/test_fuzz_linear.py::test_fuzz_linear_recurrent_forward_gpu",
                             "tests/test_fuzz_linear.py::test_fuzz_linear_forward"),
    "linear_bwd": ("tests/test_fuzz_linear.py::test_fuzz_linear_backward_gpu", "tests/test_fuzz_linear.py::test_fuzz_linear_backward"),
    "linear_step": ("tests/test_fuzz_linear.py::test_fuzz_linear_step_gpu", "tests/test_fuzz_linear.py::test_fuzz_linear_step"),
}


def environment() -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    env = {}
    try:
        from attention_proto.runtime.device import device_facts

        env.update(device_facts())
    except Exception as e:  # noqa: BLE001 - the summary still gets written
        env["device_facts_error"] = f"{type(e).__name__}: {e}"
    try:
        import hypothesis

        env["hypothesis"] = hypothesis.__version__
    except ImportError:
        pass
    return env


#: operation -> its variant pool in tests/fuzz_pools.py (the varlen forward and backward share one)
POOL_OF = {op: ("dense_varlen" if op.startswith("dense_varlen") else op) for op in OPS}


def pool_summary(ops) -> dict:
    """Whether the GPU tests draw from the variant pools (the env var is inherited), and their sizes."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from fuzz_pools import POOLS, pools_enabled
    except Exception as e:  # noqa: BLE001 - the summary still gets written (the tests will fail the same way)
        return {"error": f"{type(e).__name__}: {e}"}
    return {"enabled": pools_enabled(), "variants": {op: POOLS[POOL_OF[op]].size for op in ops}}


def cpu_threads(jobs: int) -> int:
    """CPU threads per pytest process: the cores shared among ``jobs`` processes (at least 1). Each
    process's PyTorch would otherwise start one OpenMP thread per core for the references and the
    checks' CPU reductions: 15 processes x 16 spinning threads on 16 cores."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def run_op(op: str, node: str, examples: int, timeout: float, workdir: Path, shard: int = -1,
           threads: int = 0, shards: int = 1) -> dict:
    """One pytest process fuzzing ``op``; ``shard`` >= 0: seeded (``--hypothesis-seed``), its own log;
    ``threads`` > 0: its OMP_NUM_THREADS (unless the caller's environment sets one)."""
    log = workdir / (f"{op}.jsonl" if shard < 0 else f"{op}.{shard}.jsonl")
    for p in (log, Path(str(log) + ".current")):
        p.unlink(missing_ok=True)
    env = dict(os.environ, ATTENTION_PROTO_FUZZ_EXAMPLES=str(examples), ATTENTION_PROTO_FUZZ_LOG=str(log),
               PYTHONUNBUFFERED="1")
    env.pop("ATTENTION_PROTO_FUZZ_SHARD", None)  # set below per shard only: an exported one would narrow the pool
    if threads > 0:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    cmd = [sys.executable, "-m", "pytest", node, "-q", "-x", "-p", "no:cacheprovider", "-rA",
           "-W", "ignore::DeprecationWarning"]
    if shard >= 0:
        env["ATTENTION_PROTO_FUZZ_SEEDED"] = "1"
        cmd.append(f"--hypothesis-seed={1000 + shard}")
        if shards > 1:  # each shard draws its own part of the variant pool (tests/fuzz_pools.shard_part)
            env["ATTENTION_PROTO_FUZZ_SHARD"] = f"{shard}/{shards}"
    t0, launched = time.perf_counter(), time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out, timed_out = proc.returncode, proc.stdout + proc.stderr, False
    except subprocess.TimeoutExpired as e:
        rc, timed_out = -9, True
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    secs = time.perf_counter() - t0
    rows = []
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    rows = [r for r in rows if r.get("op") == op] or rows
    fails = [r for r in rows if not r["ok"]]
    skipped = " skipped" in out and " passed" not in out and not rows
    if timed_out:
        status = "timeout"
    elif rc == 0:
        status = "skipped" if skipped else "passed"
    elif rc == 1:
        status = "failed"
    elif rc < 0 or rc > 5:
        status = "crashed"
    else:
        status = "error"  # pytest usage/collection errors (rc 2-5)
    crash_case = None
    current = Path(str(log) + ".current")
    if status in ("crashed", "timeout") and current.exists():
        try:
            crash_case = json.loads(current.read_text())
        except json.JSONDecodeError:
            crash_case = current.read_text()[:2000]
    res = {
        "test": node, "status": status, "cases": len(rows), "passed": len(rows) - len(fails),
        "failures": len(fails), "seconds": round(secs, 1), "returncode": rc,
        "first_failures": [{"case": r["case"], "error": r["error"]} for r in fails[:5]],
        "crash_case": crash_case, "time": case_time(rows, launched),
    }
    if status != "passed":
        res["pytest_tail"] = out[-4000:]
    return res


def case_time(rows: list, launched: float) -> dict:
    """Where one process's time went: inside its cases (kernels, references, checks) or outside them
    (startup, compiles of a case's first kernels are inside; hypothesis and pytest are outside)."""
    secs = sorted(r["seconds"] for r in rows if isinstance(r.get("seconds"), (int, float)))
    ats = [r["at"] for r in rows if isinstance(r.get("at"), (int, float))]
    if not secs:
        return {}
    first = min(ats) - launched - (rows[0].get("seconds") or 0.0) if ats else None
    return {"in_cases_s": round(sum(secs), 4), "median_case_s": round(secs[len(secs) // 2], 4),
            "max_case_s": round(secs[-1], 4), "cases_over_1s": sum(x > 1.0 for x in secs),
            "first_case_after_s": None if first is None else round(first, 1)}


def merge_shards(parts: list) -> dict:
    """One operation's result from its shards: cases and failures summed, the worst status."""
    order = ("crashed", "error", "failed", "timeout", "passed", "skipped")
    status = min((p["status"] for p in parts), key=order.index)
    res = {
        "test": parts[0]["test"], "status": status, "shards": len(parts),
        "cases": sum(p["cases"] for p in parts), "passed": sum(p["passed"] for p in parts),
        "failures": sum(p["failures"] for p in parts), "seconds": max(p["seconds"] for p in parts),
        "returncode": max((p["returncode"] for p in parts), key=abs),
        "first_failures": [f for p in parts for f in p["first_failures"]][:5],
        "crash_case": next((p["crash_case"] for p in parts if p["crash_case"]), None),
        "time": merge_times([p.get("time") or {} for p in parts]),
    }
    tails = [p["pytest_tail"] for p in parts if p.get("pytest_tail")]
    if tails:
        res["pytest_tail"] = tails[0]
    return res


def merge_times(ts: list) -> dict:
    """The shards' case_time: sums, the largest max, the median of the medians, the earliest first case."""
    ts = [t for t in ts if t]
    if not ts:
        return {}
    firsts = [t["first_case_after_s"] for t in ts if t.get("first_case_after_s") is not None]
    meds = sorted(t["median_case_s"] for t in ts)
    return {"in_cases_s": round(sum(t["in_cases_s"] for t in ts), 2), "median_case_s": meds[len(meds) // 2],
            "max_case_s": max(t["max_case_s"] for t in ts), "cases_over_1s": sum(t["cases_over_1s"] for t in ts),
            "first_case_after_s": min(firsts) if firsts else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="where to write the summary JSON")
    ap.add_argument("--examples", type=int, default=1000, help="hypothesis examples per operation (default 1000)")
    ap.add_argument("--ops", default="", help=f"comma-separated subset of: {', '.join(OPS)}")
    ap.add_argument("--jobs", type=int, default=4, help="pytest processes at once (default 4)")
    ap.add_argument("--shards", type=int, default=1,
                    help="seeded processes per operation, each running examples/shards cases (default 1: one "
                         "derandomized process); compiles dominate, so shards of one op share Triton's disk cache")
    ap.add_argument("--timeout", type=float, default=540.0, help="seconds per operation before it is stopped")
    ap.add_argument("--cpu", action="store_true", help="run the CPU variants (smoke test of this script)")
    args = ap.parse_args(argv)

    ops = [o.strip() for o in args.ops.split(",") if o.strip()] or list(OPS)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        ap.error(f"unknown ops {unknown}; known: {', '.join(OPS)}")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    results = {}
    env = environment()
    pools = None if args.cpu else pool_summary(ops)

    def write_summary() -> dict:
        # written after every operation: a command stopped by its time limit keeps what finished
        summary = {
            "schema": "attention-proto/fuzz-gpu/1",
            "examples_requested": args.examples,
            "mode": "cpu-variants" if args.cpu else "gpu",
            "started": started,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "environment": env,
            "ops": dict(results),
            "total_cases": sum(r["cases"] for r in results.values()),
            "total_failures": sum(r["failures"] for r in results.values()),
            "pools": pools,
            # shards > 1: each shard drew its own part of the variant pool (tests/fuzz_pools.shard_part)
            "pool_split_over_shards": args.shards > 1,
            "complete": len(results) == len(ops),
        }
        summary["ok"] = summary["complete"] and all(
            r["status"] == "passed" and r["failures"] == 0 and r["cases"] >= args.examples for r in results.values())
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return summary

    # processes at once: --jobs (each operation's shards share the inner pool of that size)
    threads = cpu_threads(args.jobs)
    env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS", str(threads))
    with tempfile.TemporaryDirectory(prefix="fuzz-gpu-") as tmp:
        work = Path(tmp)

        def one(op):
            node = OPS[op][1 if args.cpu else 0]
            if args.shards <= 1:
                r = run_op(op, node, args.examples, args.timeout, work, threads=threads)
            else:
                per = -(-args.examples // args.shards)
                parts = list(inner.map(lambda i: run_op(op, node, per, args.timeout, work, shard=i, threads=threads,
                                                        shards=args.shards), range(args.shards)))
                r = merge_shards(parts)
            tm = r.get("time") or {}
            # the first part of the line is what studies.reliability parses; the rest says where the time went
            print(f"{op:22s} {r['status']:8s} cases={r['cases']:5d} failures={r['failures']} ({r['seconds']} s)"
                  + (f"  in cases {tm['in_cases_s']} s over {r.get('shards', 1)} process(es), median case "
                     f"{tm['median_case_s'] * 1e3:.0f} ms, {tm['cases_over_1s']} over 1 s, first case after "
                     f"{tm['first_case_after_s']} s" if tm else ""), flush=True)
            for f in (r.get("first_failures") or [])[:2]:  # on stdout too: the JSON may not come back
                print(f"    failure: {json.dumps(f, default=str)[:600]}", flush=True)
            return op, r

        # shards run in their own pool (ops x shards processes, at most --jobs at once)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as inner, \
                ThreadPoolExecutor(max_workers=max(1, args.jobs if args.shards <= 1 else len(ops))) as pool:
            for fut in as_completed([pool.submit(one, op) for op in ops]):
                op, r = fut.result()
                results[op] = r
                write_summary()
    summary = write_summary()
    print(f"{summary['total_cases']} cases, {summary['total_failures']} failures, ok={summary['ok']} -> {args.out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
