"""The ``attention-proto`` command (also ``python -m attention_proto``).

    attention-proto run [--study NAME ...] [--quick] [--out DIR] [--results DIR]
    attention-proto report [--out DIR] [--run ID] [--results DIR]
    attention-proto findings [--out DIR] [--study S] [--verdict V] [--gpu G] [--run ID] [--id ID] [--json]
    attention-proto analyze [--out DIR] [--run ID]
    attention-proto env [--no-ceilings]
    attention-proto warmup --model llama|mistral|gemma2 [--dtype bf16] [--train] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .kb.store import DEFAULT_OUT, KB, KB_FILENAME, VERDICTS


def _kb_or_exit(out: Path) -> KB:
    path = out / KB_FILENAME
    if not path.exists():
        sys.exit(f"attention-proto: no knowledge base at {path}; run `attention-proto run --out {out}` first")
    return KB(path)


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime.device import interpreter_mode
    from .studies import known_studies
    from .studies.runner import run_studies
    from .kb.export import export_run

    names = args.study or known_studies()
    unknown = [n for n in names if n not in known_studies()]
    if unknown:
        print(f"attention-proto: unknown study {', '.join(map(repr, unknown))}; known studies: "
              f"{', '.join(known_studies())}", file=sys.stderr)
        return 2
    if interpreter_mode():
        print("No CUDA GPU: running Triton's interpreter at small sizes; every result is marked "
              "mode: interpreter (correctness, not performance).", file=sys.stderr)
    out = Path(args.out)
    run_id = run_studies(names, out, quick=args.quick, progress=not args.no_progress, resume=args.resume)
    kb = KB.in_dir(out)
    folder = export_run(kb, run_id, Path(args.results) if args.results else out / "results")
    n_f = len(kb.findings(run_id=run_id))
    n_m = len(kb.measurements(run_id))
    print(f"run {run_id}: {n_m} measurements, {n_f} findings; KB {kb.path}; report {folder / 'REPORT.md'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .kb.export import export_run

    out = Path(args.out)
    kb = _kb_or_exit(out)
    folder = export_run(kb, args.run, Path(args.results) if args.results else out / "results")
    print(f"wrote {folder / 'REPORT.md'}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .studies.runner import analyze_run

    kb = _kb_or_exit(Path(args.out))
    run_id = args.run or kb.latest_run_id()
    if run_id is None:
        sys.exit("attention-proto: the KB holds no run")
    n = analyze_run(kb, run_id)
    print(f"run {run_id}: {n} findings computed")
    return 0


def cmd_findings(args: argparse.Namespace) -> int:
    kb = _kb_or_exit(Path(args.out))
    rows = kb.findings(run_id=args.run, study=args.study, verdict=args.verdict, gpu=args.gpu, finding_id=args.id)
    if args.id and not rows:
        print(f"attention-proto: no finding {args.id!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if args.id:
        for f in rows:
            print(f"{f['id']} [{f['verdict']}] ({f['study']}, run {f['run_id']}, {f['gpu']}, {f['mode']})")
            print(f"  {f['title']}")
            print(f"  {f['claim']}")
            print(f"  metrics: {json.dumps(f['metrics'], default=str)}")
            ev = {r['id']: r for r in kb.measurements(f['run_id'])}
            print(f"  evidence ({len(f['evidence'])} measurements):")
            for i in f["evidence"]:
                r = ev.get(i)
                if r:
                    print(f"    #{i} {r['study']}/{r['op']} {r['impl']} {r['variant']} B{r['B']} H{r['H']} "
                          f"N{r['N']} D{r['D']} causal={r['causal']} mods={r['mods']} ms={r['ms_median']} "
                          f"tflops={r['tflops']} gbps={r['gbps']} extra={json.dumps(r['extra'], default=str)[:120]}")
        return 0
    for f in rows:
        print(f"{f['id']:<44} {f['verdict']:<12} {f['claim']}")
    print(f"({len(rows)} findings)", file=sys.stderr)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from .runtime.device import device_facts, interpreter_mode
    from .runtime.ceilings import measure_ceilings

    facts = dict(device_facts())
    if not interpreter_mode() and not args.no_ceilings:
        c = measure_ceilings()
        facts["matmul_tflops"] = round(c["matmul_tflops"], 1)
        facts["copy_gbps"] = round(c["copy_gbps"], 1)
    for k, v in facts.items():
        print(f"{k:<32} {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attention-proto", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run studies and write the KB and report")
    r.add_argument("--study", action="append", metavar="NAME", help="study to run (repeatable; default: all)")
    r.add_argument("--quick", action="store_true", help="smaller sweeps")
    r.add_argument("--out", default=str(DEFAULT_OUT), help=f"KB folder (default: {DEFAULT_OUT}/)")
    r.add_argument("--results", default=None, help="export folder (default: OUT/results)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--resume", metavar="RUN_ID", help="add these studies to an existing run of the KB in --out")
    r.set_defaults(fn=cmd_run)

    rp = sub.add_parser("report", help="export a run: jsonl files, REPORT.md and plots")
    rp.add_argument("--out", default=str(DEFAULT_OUT))
    rp.add_argument("--run", default=None, help="run id (default: latest)")
    rp.add_argument("--results", default=None, help="export folder (default: OUT/results)")
    rp.set_defaults(fn=cmd_report)

    a = sub.add_parser("analyze", help="recompute a run's findings from its measurements")
    a.add_argument("--out", default=str(DEFAULT_OUT))
    a.add_argument("--run", default=None)
    a.set_defaults(fn=cmd_analyze)

    f = sub.add_parser("findings", help="list findings, or one with its evidence (--id)")
    f.add_argument("--out", default=str(DEFAULT_OUT))
    f.add_argument("--study")
    f.add_argument("--verdict", choices=VERDICTS)
    f.add_argument("--gpu", help="GPU name or slug")
    f.add_argument("--run")
    f.add_argument("--id", help="show one finding with its evidence")
    f.add_argument("--json", action="store_true")
    f.set_defaults(fn=cmd_findings)

    e = sub.add_parser("env", help="device facts and measured ceilings")
    e.add_argument("--no-ceilings", action="store_true", help="skip measuring the ceilings")
    e.set_defaults(fn=cmd_env)

    from .warmup import add_warmup_args, cmd_warmup

    w = sub.add_parser("warmup", help="precompile the kernel variants a model configuration needs")
    add_warmup_args(w)
    w.set_defaults(fn=cmd_warmup)

    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
