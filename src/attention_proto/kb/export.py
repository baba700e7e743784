"""Export one run of the KB to ``results/<gpu-slug>/``: jsonl files, REPORT.md and plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from .store import FINDING_FIELDS, KB, MEASUREMENT_FIELDS, _clean


def _jsonl(path: Path, rows: List[Dict[str, Any]]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(_clean(r), sort_keys=False) + "\n")


def measurement_record(row: Dict[str, Any]) -> Dict[str, Any]:
    rec = {"id": row["id"]}
    rec.update({k: row.get(k) for k in MEASUREMENT_FIELDS})
    return rec


def finding_record(f: Dict[str, Any]) -> Dict[str, Any]:
    rec = {k: f.get(k) for k in FINDING_FIELDS}
    env = f.get("env") or {}
    rec["env"] = {k: env.get(k) for k in ("gpu", "driver", "torch", "triton", "cuda", "python", "git_commit", "date")}
    return rec


def export_run(kb: KB, run_id: Optional[str], results_dir: Path, plots: bool = True) -> Path:
    """Write runs.jsonl, measurements.jsonl, findings.jsonl, REPORT.md and plots for ``run_id``.

    Returns the folder written: ``results_dir / <gpu-slug>``.
    """
    from .report import render_report

    run_id = run_id or kb.latest_run_id()
    if run_id is None:
        raise ValueError(f"the KB at {kb.path} holds no run to export; run `attention-proto run` first")
    run = kb.run(run_id)
    folder = Path(results_dir) / run["gpu_slug"]
    folder.mkdir(parents=True, exist_ok=True)
    _jsonl(folder / "runs.jsonl", [run])
    measurements = kb.measurements(run_id)
    _jsonl(folder / "measurements.jsonl", [measurement_record(r) for r in measurements])
    findings = kb.findings(run_id=run_id)
    _jsonl(folder / "findings.jsonl", [finding_record(f) for f in findings])
    plot_files: List[str] = []
    if plots:
        from .plots import make_plots

        plot_files = make_plots(measurements, run, folder)
    (folder / "REPORT.md").write_text(render_report(run, measurements, findings, plot_files))
    if any(r["study"] == "codegen" for r in measurements):
        from ..codegen.report import write_codegen_json

        write_codegen_json(measurements, folder)
    return folder
