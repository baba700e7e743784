"""Study `reliability`: the GPU fuzz run and the compute-sanitizer run, as rows and findings.

Both runs are scripts (``scripts/fuzz_gpu.py``, ``scripts/sanitize.sh``): they take minutes and
run on the GPU machine beside, not inside, ``attention-proto run``. Their outputs are brought
into a run of the knowledge base by :func:`ingest` (``python scripts/ingest_reliability.py KB
RUN_ID DIR``), one row per fuzzed operation and one per sanitizer case, and :meth:`analyze` turns
the rows into findings against the bars of docs/reliability.md:

- GPU fuzz: at least 1,000 cases per operation with 0 failures;
- compute-sanitizer: 0 errors (memcheck, racecheck) over every kernel.

Inputs read from DIR: ``fuzz.out`` (the per-operation table ``fuzz_gpu.py`` prints), or
``fuzz-gpu.json`` when the script finished; ``sanitizer-logs/<tool>.stdout`` (the per-case
``[ok]``/``[FAIL]`` lines of ``sanitize.py`` under the tool) and ``sanitizer-logs/<tool>.log``
(the tool's own report: error lines and ``ERROR SUMMARY``). ``notes.json`` (optional) maps an
operation or tool to a diagnosis made after the run (stored in the row's ``extra.note``).

``attention-proto run`` records nothing here (the study has no measurement of its own).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..kb.store import KB
from .base import Finding, RunData, Study, StudyContext

FUZZ_BAR = 1000
_FUZZ_LINE = re.compile(r"^(\w+)\s+(\w+)\s+cases=\s*(\d+)\s+failures=(\d+)\s+\(([\d.]+) s\)")
_CASE_LINE = re.compile(r"^\[(ok|FAIL|fail|skip|error)\]\s+(\S+)(?:\s+\(([\d.]+) s\))?")


def _fuzz_rows(d: Path) -> List[Dict[str, Any]]:
    js = d / "fuzz-gpu.json"
    if js.exists():
        data = json.loads(js.read_text())
        return [dict(op=op, status=r.get("status"), cases=r.get("cases"), failures=r.get("failures"),
                     seconds=r.get("seconds"), examples_requested=data.get("examples_requested"))
                for op, r in data.get("ops", {}).items()]
    out = []
    txt = d / "fuzz.out"
    if txt.exists():
        for line in txt.read_text().splitlines():
            m = _FUZZ_LINE.match(line.strip())
            if m:
                out.append(dict(op=m.group(1), status=m.group(2), cases=int(m.group(3)), failures=int(m.group(4)),
                                seconds=float(m.group(5)), examples_requested=None))
    return out


def _sanitizer_rows(d: Path) -> List[Dict[str, Any]]:
    out = []
    logs = d / "sanitizer-logs"
    for stdout in sorted(logs.glob("*.stdout")) if logs.exists() else []:
        tool = stdout.stem
        log = logs / f"{tool}.log"
        report = log.read_text(errors="replace") if log.exists() else ""
        summary = re.findall(r"ERROR SUMMARY: (\d+)", report)
        error_lines = [ln for ln in report.splitlines() if ln.startswith("=========")
                       and not re.search(r"SUMMARY|COMPUTE-SANITIZER", ln)]
        cases = [m.groups() for m in map(_CASE_LINE.match, stdout.read_text(errors="replace").splitlines()) if m]
        for status, case, secs in cases:
            out.append(dict(tool=tool, case=case, status=status.lower(), seconds=float(secs) if secs else None))
        out.append(dict(tool=tool, case="(tool)", status="finished" if summary else "cut short",
                        errors=int(summary[-1]) if summary else None, error_lines=len(error_lines),
                        first_errors=error_lines[:5], seconds=None))
    return out


def ingest(kb: KB, run_id: str, d: Path) -> int:
    """Add the rows of the fuzz and sanitizer outputs in ``d`` to run ``run_id``; returns how many."""
    run = kb.run(run_id)
    notes = json.loads((d / "notes.json").read_text()) if (d / "notes.json").exists() else {}
    if "reliability" not in run["studies"]:
        kb.add_studies(run_id, ["reliability"])
    kb.delete_measurements(run_id, "reliability")
    n = 0
    base = dict(run_id=run_id, study="reliability", gpu=run["gpu"], mode=run["mode"])
    for r in _fuzz_rows(d):
        extra = dict(r)
        if r["op"] in notes:
            extra["note"] = notes[r["op"]]
        kb.add_measurement(dict(base, op="fuzz_gpu", impl="attention_proto", variant=r["op"], extra=extra))
        n += 1
    for r in _sanitizer_rows(d):
        extra = dict(r)
        if r["tool"] in notes and r["case"] == "(tool)":
            extra["note"] = notes[r["tool"]]
        kb.add_measurement(dict(base, op="sanitizer", impl="attention_proto", variant=f"{r['tool']} {r['case']}",
                                extra=extra))
        n += 1
    return n


class ReliabilityStudy(Study):
    name = "reliability"
    title = "GPU fuzz and compute-sanitizer runs (ingested from their scripts)"

    def measure(self, ctx: StudyContext) -> None:
        ctx.log("  reliability: nothing to measure here; scripts/fuzz_gpu.py and scripts/sanitize.sh run on the GPU "
                "machine and scripts/ingest_reliability.py brings their outputs into a run")

    def analyze(self, data: RunData) -> List[Finding]:
        out: List[Finding] = []
        fz = data.rows(op="fuzz_gpu")
        if fz:
            short = [r for r in fz if (r["extra"].get("cases") or 0) < FUZZ_BAR]
            failed = [r for r in fz if r["extra"].get("failures")]
            parts = []
            for r in fz:
                e = r["extra"]
                parts.append(f"{r['variant']} {e.get('cases')} cases, {e.get('failures')} failures ({e.get('status')}, "
                             f"{e.get('seconds'):.0f} s)" + (f" [{e['note']}]" if e.get("note") else ""))
            ok = not short and not failed
            out.append(Finding(
                id="reliability-gpu-fuzz", title=f"GPU fuzz: >= {FUZZ_BAR} cases per operation, 0 failures",
                claim=(f"The GPU fuzz run executed {sum(r['extra'].get('cases') or 0 for r in fz)} cases over "
                       f"{len(fz)} operations: " + "; ".join(parts) + f". The bar ({FUZZ_BAR} cases per operation, "
                       f"0 failures) is {'met' if ok else 'missed'}: {len(short)} operations below {FUZZ_BAR} cases, "
                       f"{len(failed)} with failures."),
                verdict="supported" if ok else "refuted",
                metrics={"ops": len(fz), "short": [r["variant"] for r in short],
                         "failed": [r["variant"] for r in failed]},
                evidence=[r["id"] for r in fz]))
        sz = data.rows(op="sanitizer")
        tools = sorted({r["extra"]["tool"] for r in sz})
        for tool in tools:
            rows = [r for r in sz if r["extra"]["tool"] == tool]
            head = next((r for r in rows if r["extra"]["case"] == "(tool)"), None)
            cases = [r for r in rows if r["extra"]["case"] != "(tool)"]
            ok_cases = [r["extra"]["case"] for r in cases if r["extra"]["status"] == "ok"]
            bad = [r["extra"]["case"] for r in cases if r["extra"]["status"] not in ("ok", "skip")]
            he = head["extra"] if head else {}
            finished = he.get("status") == "finished"
            errs = he.get("errors") if finished else he.get("error_lines")
            ok = finished and errs == 0 and not bad
            claim = (f"compute-sanitizer {tool} ran {len(cases)} cases of scripts/sanitize.py "
                     f"({len(ok_cases)} ok: {', '.join(ok_cases) or 'none'}"
                     + (f"; failed: {', '.join(bad)}" if bad else "") + "); "
                     + (f"the tool finished with {errs} errors." if finished else
                        f"the tool was cut short by the command's time limit after those cases, with {errs} error "
                        f"reports in its log up to then (no ERROR SUMMARY).")
                     + (f" [{he['note']}]" if he.get("note") else "")
                     + f" The bar (0 errors over every kernel) is {'met' if ok else 'not shown'}.")
            out.append(Finding(
                id=f"reliability-sanitizer-{tool}", title=f"compute-sanitizer {tool} over every kernel",
                claim=claim, verdict="supported" if ok else ("refuted" if (errs or bad) else "inconclusive"),
                metrics={"cases": len(cases), "ok": len(ok_cases), "finished": finished, "errors": errs},
                evidence=[r["id"] for r in rows]))
        return out


STUDY = ReliabilityStudy()
