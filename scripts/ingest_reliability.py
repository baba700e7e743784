#!/usr/bin/env python
"""Bring a GPU fuzz run and a compute-sanitizer run into a knowledge-base run, then recompute its findings.

    python scripts/ingest_reliability.py KB_DIR RUN_ID DIR

DIR holds what the GPU command left: ``fuzz.out`` (or ``fuzz-gpu.json``) from
``scripts/fuzz_gpu.py`` and ``sanitizer-logs/`` from ``scripts/sanitize.sh``; an optional
``notes.json`` maps an operation or sanitizer tool to a diagnosis made after the run. See
``attention_proto.studies.reliability``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from attention_proto.kb.store import KB  # noqa: E402
from attention_proto.studies.reliability import ingest  # noqa: E402
from attention_proto.studies.runner import analyze_run  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    kb = KB.in_dir(argv[0])
    n = ingest(kb, argv[1], Path(argv[2]))
    f = analyze_run(kb, argv[1], log=lambda m: print(m, file=sys.stderr))
    print(f"ingested {n} rows into run {argv[1]}; {f} findings recomputed")
    kb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
