"""Study `reliability`: the GPU fuzz run and the compute-sanitizer run, as rows and findings.

Both runs are scripts (``scripts/fuzz_gpu.py``, ``scripts/sanitize.sh``): they take minutes and
run on the GPU machine beside, not inside, ``attention-proto run``. Their outputs are brought
into a run of the knowledge base by :func:`ingest` (``python scripts/ingest_reliability.py KB
RUN_ID DIR [DIR ...]``: one folder per GPU command), one row per fuzzed operation and one per
sanitizer case, and :meth:`analyze` turns
the rows into findings against the bars of docs/reliability.md:

- GPU fuzz: at least 1,000 cases per operation with 0 failures;
- compute-sanitizer: 0 errors (memcheck, racecheck) over every kernel.

Inputs read from DIR: ``fuzz.out`` (the per-operation table ``fuzz_gpu.py`` prints), or the
``fuzz*.json`` summaries it writes (one per command, e.g. dense and the rest split); ``sanitizer-logs/<tool>.stdout`` (the per-case
``[ok]``/``[FAIL]`` lines of ``sanitize.py`` under the tool) and ``sanitizer-logs/<tool>.log``
(the tool's own report: error lines and ``ERROR SUMMARY``). ``notes.json`` (optional) maps an
operation or tool to a diagnosis made after the run (stored in the row's ``extra.note``); its key
``"resolved"`` maps an operation whose failures in that folder were fixed since to how
(``extra.resolved``). A failure stands until so marked, whatever later runs of the operation show.

``attention-proto run`` records nothing here (the study has no measurement of its own).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..kb.store import KB
from .base import Finding, RunData, Study, StudyContext

FUZZ_BAR = 1000
_FUZZ_LINE = re.compile(r"^(\w+)\s+(\w+)\s+cases=\s*(\d+)\s+failures=(\d+)\s+\(([\d.]+) s\)")
_CASE_LINE = re.compile(r"^\[(ok|FAIL|fail|skip|error)\]\s+(\S+)(?:\s+\(([\d.]+) s\))?")


def _fuzz_rows(d: Path) -> List[Dict[str, Any]]:
    # every summary scripts/fuzz_gpu.py wrote here (one per command: fuzz-gpu.json, fuzz-dense.json, ...)
    summaries = [json.loads(p.read_text()) for p in sorted(d.glob("fuzz*.json"))]
    summaries = [x for x in summaries if str(x.get("schema", "")).startswith("attention-proto/fuzz-gpu/")]
    if summaries:
        return [dict(op=op, status=r.get("status"), cases=r.get("cases"), failures=r.get("failures"),
                     seconds=r.get("seconds"), examples_requested=data.get("examples_requested"),
                     shards=r.get("shards", 1), **({"time": r["time"]} if r.get("time") else {}))
                for data in summaries for op, r in data.get("ops", {}).items()]
    out = []
    txt = d / "fuzz.out"
    if txt.exists():
        for line in txt.read_text().splitlines():
            m = _FUZZ_LINE.match(line.strip())
            if m:
                out.append(dict(op=m.group(1), status=m.group(2), cases=int(m.group(3)), failures=int(m.group(4)),
                                seconds=float(m.group(5)), examples_requested=None))
    return out


#: the cases of scripts/sanitize.py (each kernel in the source maps to one of them there; a test keeps
#: this list equal to the script's): the sanitizer bar needs every one of them clean under each tool
SANITIZE_CASES = ("dense_fwd_portable", "dense_fwd_hooks", "dense_fwd_varlen", "dense_fwd_tma", "dense_fwd_key_start",
                  "dense_fwd_runtime", "dense_rope_kernel", "dense_bwd", "dense_bwd_split", "dense_bwd_tma",
                  "paged_decode", "paged_append", "linear")


def _tool_summary(report: str) -> Optional[int]:
    """The error count of the tool's closing summary, or None when the log has none (the tool was cut short).
    memcheck/synccheck/initcheck end with ``ERROR SUMMARY: N errors``; racecheck with
    ``RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)``."""
    summary = re.findall(r"ERROR SUMMARY: (\d+)", report)
    if summary:
        return int(summary[-1])
    race = re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?", report)
    return int(race[-1]) if race else None


def _sanitizer_rows(d: Path) -> List[Dict[str, Any]]:
    out = []
    logs = d / "sanitizer-logs"
    for stdout in sorted(logs.glob("*.stdout")) if logs.exists() else []:
        tool = stdout.stem
        log = logs / f"{tool}.log"
        report = log.read_text(errors="replace") if log.exists() else ""
        errors = _tool_summary(report)
        error_lines = [ln for ln in report.splitlines() if ln.startswith("=========")
                       and not re.search(r"SUMMARY|COMPUTE-SANITIZER", ln)]
        cases = [m.groups() for m in map(_CASE_LINE.match, stdout.read_text(errors="replace").splitlines()) if m]
        for status, case, secs in cases:
            out.append(dict(tool=tool, case=case, status=status.lower(), seconds=float(secs) if secs else None,
                            part=d.name))
        out.append(dict(tool=tool, case="(tool)", status="finished" if errors is not None else "cut short",
                        errors=errors, error_lines=len(error_lines), first_errors=error_lines[:5], seconds=None,
                        part=d.name))
    return out


def ingest(kb: KB, run_id: str, dirs: Union[Path, Sequence[Path]]) -> int:
    """Add the rows of the fuzz and sanitizer outputs in ``dirs`` (one folder per GPU command; a tool
    may be split over several) to run ``run_id``, replacing the run's earlier reliability rows;
    returns how many."""
    dirs = [Path(dirs)] if isinstance(dirs, (str, Path)) else [Path(x) for x in dirs]
    run = kb.run(run_id)
    if "reliability" not in run["studies"]:
        kb.add_studies(run_id, ["reliability"])
    kb.delete_measurements(run_id, "reliability")
    n = 0
    base = dict(run_id=run_id, study="reliability", gpu=run["gpu"], mode=run["mode"])
    for d in dirs:
        notes = json.loads((d / "notes.json").read_text()) if (d / "notes.json").exists() else {}
        resolved = notes.get("resolved", {})
        for r in _fuzz_rows(d):
            extra = dict(r, part=d.name)
            if r["op"] in notes:
                extra["note"] = notes[r["op"]]
            if r["op"] in resolved:
                extra["resolved"] = resolved[r["op"]]
            kb.add_measurement(dict(base, op="fuzz_gpu", impl="attention_proto", variant=r["op"], extra=extra))
            n += 1
        for r in _sanitizer_rows(d):
            extra = dict(r)
            if r["tool"] in notes and r["case"] == "(tool)":
                extra["note"] = notes[r["tool"]]
            kb.add_measurement(dict(base, op="sanitizer", impl="attention_proto",
                                    variant=f"{r['tool']} {r['case']}", extra=extra))
            n += 1
    return n


def _sanitizer_finding(tool: str, rows: List[Dict[str, Any]]) -> Finding:
    """One tool's finding over all the commands (parts) that ran it: the bar needs every case of
    scripts/sanitize.py clean, no error reported by any part, and at least one part that finished."""
    heads = [r["extra"] for r in rows if r["extra"]["case"] == "(tool)"]
    cases = [r for r in rows if r["extra"]["case"] != "(tool)"]
    status: Dict[str, str] = {}
    for r in cases:
        c, st = r["extra"]["case"], r["extra"]["status"]
        if st not in ("ok", "skip"):
            status[c] = "bad"
        elif status.get(c) != "bad" and (st == "ok" or c not in status):
            status[c] = st
    ok_cases = [c for c in SANITIZE_CASES if status.get(c) == "ok"] + \
        sorted(c for c, st in status.items() if st == "ok" and c not in SANITIZE_CASES)
    bad = sorted(c for c, st in status.items() if st == "bad")
    missing = [c for c in SANITIZE_CASES if status.get(c) != "ok"]
    errs = sum((h.get("errors") if h.get("status") == "finished" else h.get("error_lines")) or 0 for h in heads)
    finished = [h for h in heads if h.get("status") == "finished"]
    parts = []
    for h in heads:
        ran = [r["extra"]["case"] for r in cases if r["extra"].get("part") == h.get("part")]
        parts.append(f"{h.get('part') or 'one command'}: {len(ran)} cases, "
                     + (f"finished with {h.get('errors')} errors" if h.get("status") == "finished" else
                        f"cut short by the command's time limit, {h.get('error_lines')} error reports in its log up "
                        f"to then") + (f" [{h['note']}]" if h.get("note") else ""))
    ok = bool(finished) and errs == 0 and not bad and not missing
    claim = (f"compute-sanitizer {tool} ran {len(ok_cases)} of the {len(SANITIZE_CASES)} cases of "
             f"scripts/sanitize.py clean ({', '.join(ok_cases) or 'none'}"
             + (f"; failed: {', '.join(bad)}" if bad else "")
             + (f"; not run: {', '.join(missing)}" if missing else "") + f") over {len(heads)} command(s) ("
             + "; ".join(parts) + f"), {errs} errors in all. The bar (0 errors over every kernel) is "
             + ("met." if ok else ("missed." if (errs or bad) else "not shown: " + (
                 "cases not run under the tool." if missing else "no run of the tool finished."))))
    return Finding(
        id=f"reliability-sanitizer-{tool}", title=f"compute-sanitizer {tool} over every kernel",
        claim=claim, verdict="supported" if ok else ("refuted" if (errs or bad) else "inconclusive"),
        metrics={"cases": len(status), "ok": len(ok_cases), "missing": missing, "parts": len(heads),
                 "finished": len(finished), "errors": errs},
        evidence=[r["id"] for r in rows])


class ReliabilityStudy(Study):
    name = "reliability"
    title = "GPU fuzz and compute-sanitizer runs (ingested from their scripts)"

    def measure(self, ctx: StudyContext) -> None:
        ctx.log("  reliability: nothing to measure here; scripts/fuzz_gpu.py and scripts/sanitize.sh run on the GPU "
                "machine and scripts/ingest_reliability.py brings their outputs into a run")

    def analyze(self, data: RunData) -> List[Finding]:
        out: List[Finding] = []
        all_fz = data.rows(op="fuzz_gpu")
        if all_fz:
            # an operation fuzzed by several commands is judged by its largest run (most cases; the
            # later of equals: folders are passed oldest first); the others are listed, and a failure
            # stands until marked resolved (below), so a short later run cannot hide one
            # (a run whose failures were resolved since judges nothing: the fix made it history)
            judged: Dict[str, Dict[str, Any]] = {}
            for r in sorted(all_fz, key=lambda r: (not r["extra"].get("resolved"), (r["extra"].get("cases") or 0),
                                                   r["id"])):
                judged[r["variant"]] = r
            fz = list(judged.values())
            older = [r for r in all_fz if judged[r["variant"]] is not r]

            def failing(r):  # failures logged, or a process that died (its case is never logged as failed)
                return bool(r["extra"].get("failures")) or r["extra"].get("status") in ("crashed", "error")

            # an operation whose only runs were fixed since has no run of the fixed code: short, not failed
            fixed_only = [r for r in fz if r["extra"].get("resolved")]
            short = [r for r in fz if (r["extra"].get("cases") or 0) < FUZZ_BAR or r in fixed_only]
            # a failure an earlier run found stands until its folder's notes.json marks it resolved: a
            # later run that stopped short of the failing case (or drew other cases) does not clear it
            open_failures = [r for r in older if failing(r) and not r["extra"].get("resolved")]
            failed = [r for r in fz if failing(r) and r not in fixed_only]
            failed += [r for r in open_failures if r["variant"] not in {x["variant"] for x in failed}]
            parts = []
            for r in fz:
                e = r["extra"]
                parts.append(f"{r['variant']} {e.get('cases')} cases, {e.get('failures')} failures ({e.get('status')}, "
                             f"{e.get('seconds'):.0f} s" + (f", {e['part']}" if e.get("part") else "") + ")"
                             + (f" [resolved since: {e['resolved']}; no run of the fix]" if r in fixed_only else "")
                             + (f" [{e['note']}]" if e.get("note") else ""))
            earlier = [f"{r['variant']} {r['extra'].get('cases')} cases, {r['extra'].get('failures')} failures"
                       + (f" ({r['extra']['part']})" if r["extra"].get("part") else "")
                       + (f" [{r['extra']['note']}]" if r["extra"].get("note") else "")
                       + (f" [resolved: {r['extra']['resolved']}]" if r["extra"].get("resolved") else "")
                       for r in older]
            still = sorted({f"{r['variant']} ({r['extra'].get('part')})" for r in open_failures})
            ok = not short and not failed
            out.append(Finding(
                id="reliability-gpu-fuzz", title=f"GPU fuzz: >= {FUZZ_BAR} cases per operation, 0 failures",
                claim=(f"The largest GPU fuzz run of each of {len(fz)} operations executed "
                       f"{sum(r['extra'].get('cases') or 0 for r in fz)} cases: " + "; ".join(parts)
                       + (". Other runs: " + "; ".join(earlier) if earlier else "")
                       + (". Failures found by an earlier run and not marked resolved, so still counted: "
                          + ", ".join(still) if still else "")
                       + f". The bar ({FUZZ_BAR} cases per operation, 0 failures) is {'met' if ok else 'missed'}: "
                       f"{len(short)} operations below {FUZZ_BAR} cases, {len(failed)} with failures."),
                verdict="supported" if ok else "refuted",
                metrics={"ops": len(fz), "short": [r["variant"] for r in short],
                         "failed": [r["variant"] for r in failed], "other_runs": len(older)},
                evidence=[r["id"] for r in all_fz]))
        sz = data.rows(op="sanitizer")
        for tool in sorted({r["extra"]["tool"] for r in sz}):
            out.append(_sanitizer_finding(tool, [r for r in sz if r["extra"]["tool"] == tool]))
        return out


STUDY = ReliabilityStudy()
