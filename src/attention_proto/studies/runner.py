"""Run studies into a KB: the main job behind ``attention-proto run``."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..kb.store import KB
from ..runtime.ceilings import measure_ceilings
from ..runtime.device import device_facts, interpreter_mode
from . import load_study
from .base import RunData, StudyContext


def analyze_run(kb: KB, run_id: str, names: Optional[Sequence[str]] = None,
                log: Callable[[str], None] = print) -> int:
    """(Re)compute the findings of a stored run from its rows; returns how many were written."""
    data = RunData(kb, run_id)
    names = list(names or data.run["studies"])
    n = 0
    for name in names:
        study = load_study(name)
        kb.delete_findings(run_id, name)
        try:
            findings = study.analyze(data.scoped(name))
        except Exception as e:  # noqa: BLE001 - one study's analysis bug must not hide the others
            log(f"[{name}] analysis failed: {type(e).__name__}: {e}")
            continue
        for f in findings:
            kb.add_finding(dict(id=f.id, study=name, title=f.title, claim=f.claim, verdict=f.verdict,
                                metrics=f.metrics, evidence=f.evidence, run_id=run_id, mode=data.mode))
            n += 1
    return n


def run_studies(names: Sequence[str], out: Path, quick: bool = False, progress: bool = True,
                log: Callable[[str], None] | None = None, run_id: str | None = None,
                resume: str | None = None) -> str:
    """Measure and analyze ``names`` into the KB under ``out``; returns the run id.

    ``resume``: add the studies to an existing run of the same KB (same GPU and mode), reusing its
    ceilings, so that one run may be measured in several sittings (each GPU command is time-limited).
    A study the run already has is measured again: its earlier rows are dropped first, and the
    run's environment records each sitting's studies and git commit (:meth:`KB.add_sitting`).
    Findings of every study of the run are recomputed at the end.
    """
    log = log or (lambda m: print(m, file=sys.stderr))
    for n in names:
        load_study(n)  # unknown names fail before anything runs
    env = device_facts()
    kb = KB.in_dir(out)
    ceilings: Dict = {}
    if resume:
        prev = kb.run(resume)
        if prev["gpu"] != env["gpu"] or prev["mode"] != env["mode"]:
            raise ValueError(f"cannot resume run {resume}: it was measured on {prev['gpu']} ({prev['mode']}), "
                             f"this is {env['gpu']} ({env['mode']})")
        run_id = resume
        for n in names:
            if n in prev["studies"]:
                dropped = kb.delete_measurements(run_id, n)
                log(f"resume: study {n} is measured again ({dropped} earlier rows dropped)")
        kb.add_studies(run_id, names)
        kb.add_sitting(run_id, names, env, quick=quick)
        ceilings = prev["ceilings"]
    else:
        run_id = kb.start_run(env, names, quick=quick, run_id=run_id)
    if not interpreter_mode() and not ceilings:
        log("measuring the matmul and copy ceilings ...")
        ceilings = measure_ceilings()
        kb.set_ceilings(run_id, ceilings)
        log(f"  matmul {ceilings['matmul_tflops']:.0f} TFLOPS, copy {ceilings['copy_gbps']:.0f} GB/s")
    failures: Dict[str, List[str]] = {}
    for name in names:
        study = load_study(name)
        ctx = StudyContext(kb, run_id, name, quick, ceilings, progress=progress, log=log)
        t0 = time.perf_counter()
        log(f"study {name}: {study.title}")
        with ctx.guard(f"study {name}"):
            study.measure(ctx)
        if ctx.errors:
            failures[name] = ctx.errors
        log(f"  {name} measured in {time.perf_counter() - t0:.1f} s ({len(ctx.errors)} failures)")
    analyze_run(kb, run_id, kb.run(run_id)["studies"], log=log)
    kb.finish_run(run_id)
    for name, errs in failures.items():
        log(f"{name}: {len(errs)} parts failed: " + "; ".join(errs[:3]))
    kb.close()
    return run_id

