#!/usr/bin/env python
"""Bring GPU fuzz and compute-sanitizer runs into a knowledge-base run, then recompute its findings.

    python scripts/ingest_reliability.py KB_DIR RUN_ID DIR [DIR ...] [--commit "abc1234 (what ran there)"]

Each DIR holds what one GPU command left: ``fuzz.out`` (or ``fuzz-gpu.json``) from
``scripts/fuzz_gpu.py`` and/or ``sanitizer-logs/`` from ``scripts/sanitize.sh``; an optional
``notes.json`` maps an operation or sanitizer tool to a diagnosis made after the run. A tool may be
split over several commands (e.g. the cases one command's time limit cut off, run by the next):
its finding merges them. The run's earlier reliability rows are replaced. ``--commit`` records a
sitting of the study ``reliability`` with that commit (the device copy's .git can be stale). See
``attention_proto.studies.reliability``.
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from attention_proto.kb.store import KB  # noqa: E402
from attention_proto.studies.reliability import ingest  # noqa: E402
from attention_proto.studies.runner import analyze_run  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kb_dir")
    ap.add_argument("run_id")
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--commit", default="", help="record a sitting of `reliability` with this commit text")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    kb = KB.in_dir(args.kb_dir)
    n = ingest(kb, args.run_id, args.dirs)
    if args.commit:
        driver = kb.run(args.run_id)["env"].get("driver")
        kb.add_sitting(args.run_id, ["reliability"], {"git_commit": args.commit, "driver": driver,
                                                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    f = analyze_run(kb, args.run_id, log=lambda m: print(m, file=sys.stderr))
    print(f"ingested {n} rows from {len(args.dirs)} folder(s) into run {args.run_id}; {f} findings recomputed")
    kb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
