"""The KB: write, read, export, schema check."""
import json
import sqlite3

import pytest

from attention_proto.kb.export import export_run
from attention_proto.kb.store import KB, MEASUREMENT_FIELDS, SchemaMismatch

ENV = {"gpu": "Test GPU", "gpu_slug": "test-gpu", "mode": "gpu", "torch": "x", "triton": "y", "driver": "d",
       "cuda": "c", "git_commit": "abc", "date": "2026-11-26"}


def _fill(kb):
    rid = kb.start_run(ENV, ["ceilings"], quick=True)
    kb.set_ceilings(rid, {"matmul_tflops": 700.0, "copy_gbps": 3000.0})
    m1 = kb.add_measurement(dict(run_id=rid, study="ceilings", op="attn_fwd", impl="sdpa_cudnn", variant="",
                                 mods=["causal"], B=1, H=2, Hkv=2, N=128, Nk=128, D=64, dtype="bfloat16",
                                 causal=True, extra={"x": float("inf")}, ms_median=1.0, ms_p20=0.9, ms_p80=1.1,
                                 tflops=500.0, gbps=None, gpu="Test GPU", mode="gpu"))
    kb.add_finding(dict(id="ceilings-x", study="ceilings", title="t", claim="c 500", verdict="observation",
                        metrics={"tflops": 500.0}, evidence=[m1], run_id=rid, mode="gpu"))
    return rid, m1


def test_round_trip(tmp_path):
    kb = KB.in_dir(tmp_path)
    rid, m1 = _fill(kb)
    kb.finish_run(rid)
    kb.close()
    kb = KB.in_dir(tmp_path)  # reopen: schema version checked
    rows = kb.measurements(rid, study="ceilings", causal=True)
    assert len(rows) == 1 and rows[0]["mods"] == ["causal"] and rows[0]["extra"] == {"x": "inf"}
    assert rows[0]["causal"] is True
    f = kb.findings(run_id=rid)[0]
    assert f["evidence"] == [m1] and f["env"]["gpu"] == "Test GPU"
    assert kb.findings(gpu="test-gpu") and not kb.findings(gpu="other")
    assert kb.run(rid)["ceilings"]["copy_gbps"] == 3000.0
    with pytest.raises(ValueError, match="unknown measurement field"):
        kb.measurements(rid, nope=1)


def test_export_writes_the_five_files(tmp_path):
    kb = KB.in_dir(tmp_path / "kb")
    rid, _ = _fill(kb)
    folder = export_run(kb, rid, tmp_path / "results", plots=False)
    assert folder.name == "test-gpu"
    for name in ("runs.jsonl", "measurements.jsonl", "findings.jsonl", "REPORT.md"):
        assert (folder / name).exists(), name
    m = json.loads((folder / "measurements.jsonl").read_text().splitlines()[0])
    assert all(k in m for k in MEASUREMENT_FIELDS)
    f = json.loads((folder / "findings.jsonl").read_text().splitlines()[0])
    assert set(f) >= {"id", "study", "title", "claim", "verdict", "metrics", "evidence", "run_id", "mode", "env"}
    report = (folder / "REPORT.md").read_text()
    assert "ceilings-x" in report and rid in report


def test_schema_version_is_checked(tmp_path):
    kb = KB.in_dir(tmp_path)
    kb.close()
    con = sqlite3.connect(tmp_path / "attention_proto.sqlite")
    con.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(SchemaMismatch, match="schema version 99"):
        KB.in_dir(tmp_path)


def test_bad_rows_are_refused(tmp_path):
    kb = KB.in_dir(tmp_path)
    rid = kb.start_run(ENV, [])
    with pytest.raises(ValueError, match="missing"):
        kb.add_measurement({"run_id": rid, "study": "s"})
    with pytest.raises(ValueError, match="verdict"):
        kb.add_finding(dict(id="a", study="s", title="t", claim="c", verdict="maybe", metrics={}, evidence=[],
                            run_id=rid, mode="gpu"))
