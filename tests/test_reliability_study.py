"""The reliability study ingests the GPU fuzz table and the sanitizer logs into a run and judges the bars."""
from __future__ import annotations

import json

from attention_proto.kb.store import KB
from attention_proto.studies.base import RunData
from attention_proto.studies.reliability import SANITIZE_CASES, STUDY, ingest


def _run(tmp_path):
    kb = KB.in_dir(tmp_path / "kb")
    rid = kb.start_run({"gpu": "NVIDIA H100 80GB HBM3", "gpu_slug": "h100", "mode": "gpu"}, ["paged"])
    return kb, rid


def _write(d, fuzz_lines, cases, log):
    (d / "sanitizer-logs").mkdir(parents=True)
    (d / "fuzz.out").write_text("\n".join(fuzz_lines) + "\n")
    (d / "sanitizer-logs" / "memcheck.stdout").write_text("device: cuda\n" + "\n".join(cases) + "\n")
    (d / "sanitizer-logs" / "memcheck.log").write_text(log)


def test_ingest_and_bars_missed(tmp_path):
    kb, rid = _run(tmp_path)
    d = tmp_path / "rel"
    _write(d, ["dense_fwd              timeout  cases=   21 failures=0 (470.5 s)",
               "paged_decode           timeout  cases=  215 failures=30 (470.7 s)"],
           ["[ok]   dense_fwd_portable (230.99 s)", "[ok]   paged_decode (16.02 s)"], "========= COMPUTE-SANITIZER\n")
    (d / "notes.json").write_text(json.dumps({"paged_decode": "under investigation"}))
    assert ingest(kb, rid, d) == 5
    assert "reliability" in kb.run(rid)["studies"]
    f = {x.id: x for x in STUDY.analyze(RunData(kb, rid).scoped("reliability"))}
    fz = f["reliability-gpu-fuzz"]
    assert fz.verdict == "refuted" and "236 cases" in fz.claim and "under investigation" in fz.claim
    san = f["reliability-sanitizer-memcheck"]
    assert san.verdict == "inconclusive" and "cut short" in san.claim and san.metrics["ok"] == 2
    assert "not run: dense_fwd_hooks" in san.claim
    # ingesting again replaces the rows
    assert ingest(kb, rid, d) == 5 and len(kb.measurements(run_id=rid, study="reliability")) == 5


def test_bars_met(tmp_path):
    kb, rid = _run(tmp_path)
    d = tmp_path / "rel"
    _write(d, ["dense_fwd              passed   cases= 1000 failures=0 (100.0 s)"],
           [f"[ok]   {c} (1.0 s)" for c in SANITIZE_CASES], "========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
    ingest(kb, rid, d)
    f = {x.id: x for x in STUDY.analyze(RunData(kb, rid).scoped("reliability"))}
    assert f["reliability-gpu-fuzz"].verdict == "supported"
    assert f["reliability-sanitizer-memcheck"].verdict == "supported"


def test_one_case_is_not_every_kernel(tmp_path):
    kb, rid = _run(tmp_path)
    d = tmp_path / "rel"
    _write(d, [], ["[ok]   dense_fwd_portable (1.0 s)"], "========= ERROR SUMMARY: 0 errors\n")
    ingest(kb, rid, d)
    san = {x.id: x for x in STUDY.analyze(RunData(kb, rid).scoped("reliability"))}["reliability-sanitizer-memcheck"]
    assert san.verdict == "inconclusive" and "not shown" in san.claim


def test_tool_split_over_commands_and_racecheck_summary(tmp_path):
    """A memcheck cut short by one command and finished by the next covers every case; racecheck's
    summary line (no ERROR SUMMARY) counts as finished; an error in any part refutes."""
    kb, rid = _run(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    half = len(SANITIZE_CASES) // 2
    _write(first, [], [f"[ok]   {c} (1.0 s)" for c in SANITIZE_CASES[:half]], "========= COMPUTE-SANITIZER\n")
    _write(second, [], [f"[ok]   {c} (1.0 s)" for c in SANITIZE_CASES[half:]], "========= ERROR SUMMARY: 0 errors\n")
    (second / "sanitizer-logs" / "racecheck.stdout").write_text("\n".join(f"[ok]   {c}" for c in SANITIZE_CASES))
    (second / "sanitizer-logs" / "racecheck.log").write_text(
        "========= COMPUTE-SANITIZER\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    ingest(kb, rid, [first, second])
    f = {x.id: x for x in STUDY.analyze(RunData(kb, rid).scoped("reliability"))}
    mem = f["reliability-sanitizer-memcheck"]
    assert mem.verdict == "supported" and mem.metrics["parts"] == 2 and "cut short" in mem.claim
    assert f["reliability-sanitizer-racecheck"].verdict == "supported"
    (first / "sanitizer-logs" / "memcheck.log").write_text("========= Invalid __global__ read of size 4\n")
    ingest(kb, rid, [first, second])
    mem = {x.id: x for x in STUDY.analyze(RunData(kb, rid).scoped("reliability"))}["reliability-sanitizer-memcheck"]
    assert mem.verdict == "refuted" and mem.metrics["errors"] == 1


def test_fuzz_summaries_of_several_commands(tmp_path):
    """Every fuzz*.json summary in a folder is read (the dense and the other operations may be run by
    separate commands); files of another schema are ignored."""
    kb, rid = _run(tmp_path)
    d = tmp_path / "rel"
    d.mkdir()
    schema = "attention-proto/fuzz-gpu/1"
    (d / "fuzz-dense.json").write_text(json.dumps({"schema": schema, "examples_requested": 1000, "ops": {
        "dense_fwd": {"status": "passed", "cases": 1000, "failures": 0, "seconds": 90.0}}}))
    (d / "fuzz-rest.json").write_text(json.dumps({"schema": schema, "examples_requested": 1000, "ops": {
        "paged_decode": {"status": "passed", "cases": 1200, "failures": 0, "seconds": 60.0}}}))
    (d / "fuzz-notes.json").write_text(json.dumps({"not": "a summary"}))
    assert ingest(kb, rid, d) == 2
    fz = {x.id: x for x in STUDY.analyze(RunData(kb, rid).scoped("reliability"))}["reliability-gpu-fuzz"]
    assert fz.verdict == "supported" and "each of 2 operations executed 2200 cases" in fz.claim


def test_fuzz_later_folder_supersedes(tmp_path):
    """An operation fuzzed again in a later folder (after a fix) is judged by its largest run; the
    other one is still listed, with its note and how its failure was resolved."""
    kb, rid = _run(tmp_path)
    schema = "attention-proto/fuzz-gpu/1"
    old, new = tmp_path / "old", tmp_path / "new"
    for d, ops in ((old, {"linear_chunk_fwd": {"status": "failed", "cases": 56, "failures": 10, "seconds": 225.0},
                          "dense_fwd": {"status": "passed", "cases": 1001, "failures": 0, "seconds": 490.0}}),
                   (new, {"linear_chunk_fwd": {"status": "passed", "cases": 1000, "failures": 0, "seconds": 300.0}})):
        d.mkdir()
        (d / "fuzz.json").write_text(json.dumps({"schema": schema, "examples_requested": 1000, "ops": ops}))
    (old / "notes.json").write_text(json.dumps({"linear_chunk_fwd": "a bug",
                                                "resolved": {"linear_chunk_fwd": "fixed in abc"}}))
    assert ingest(kb, rid, [old, new]) == 3
    fz = {x.id: x for x in STUDY.analyze(RunData(kb, rid).scoped("reliability"))}["reliability-gpu-fuzz"]
    assert fz.verdict == "supported" and fz.metrics["other_runs"] == 1
    assert ("Other runs: linear_chunk_fwd 56 cases, 10 failures (old) [a bug] [resolved: fixed in abc]"
            in fz.claim)
    assert "not marked resolved" not in fz.claim
    assert len(fz.evidence) == 3


def test_fuzz_unresolved_earlier_failure_still_counts(tmp_path):
    """A later, shorter run of an operation that did not reach (or draw) the failing case does not
    clear a failure nobody marked resolved."""
    kb, rid = _run(tmp_path)
    schema = "attention-proto/fuzz-gpu/1"
    old, new = tmp_path / "old", tmp_path / "new"
    for d, ops in ((old, {"dense_bwd": {"status": "failed", "cases": 472, "failures": 3, "seconds": 500.0}}),
                   (new, {"dense_bwd": {"status": "timeout", "cases": 1200, "failures": 0, "seconds": 450.0}})):
        d.mkdir()
        (d / "fuzz.json").write_text(json.dumps({"schema": schema, "examples_requested": 1000, "ops": ops}))
    assert ingest(kb, rid, [old, new]) == 2
    fz = {x.id: x for x in STUDY.analyze(RunData(kb, rid).scoped("reliability"))}["reliability-gpu-fuzz"]
    assert fz.verdict == "refuted" and fz.metrics["failed"] == ["dense_bwd"] and fz.metrics["short"] == []
    assert "not marked resolved, so still counted: dense_bwd (old)" in fz.claim


def test_fuzz_operation_judged_by_its_largest_run(tmp_path):
    kb, rid = _run(tmp_path)
    schema = "attention-proto/fuzz-gpu/1"
    old, new = tmp_path / "old", tmp_path / "new"
    for d, cases in ((old, 1200), (new, 26)):
        d.mkdir()
        ops = {"dense_varlen_fwd": {"status": "timeout", "cases": cases, "failures": 0, "seconds": 400.0}}
        (d / "fuzz.json").write_text(json.dumps({"schema": schema, "examples_requested": 1000, "ops": ops}))
    ingest(kb, rid, [old, new])
    fz = {x.id: x for x in STUDY.analyze(RunData(kb, rid).scoped("reliability"))}["reliability-gpu-fuzz"]
    assert fz.verdict == "supported" and "dense_varlen_fwd 1200 cases" in fz.claim
    assert "Other runs: dense_varlen_fwd 26 cases, 0 failures (new)" in fz.claim


def test_fuzz_resolved_only_run_is_short_and_a_crash_is_a_failure(tmp_path):
    kb, rid = _run(tmp_path)
    schema = "attention-proto/fuzz-gpu/1"
    d = tmp_path / "only"
    d.mkdir()
    ops = {"paged_decode": {"status": "failed", "cases": 1200, "failures": 3, "seconds": 400.0},
           "paged_append": {"status": "crashed", "cases": 1100, "failures": 0, "seconds": 300.0}}
    (d / "fuzz.json").write_text(json.dumps({"schema": schema, "examples_requested": 1000, "ops": ops}))
    (d / "notes.json").write_text(json.dumps({"resolved": {"paged_decode": "fixed in abc"}}))
    ingest(kb, rid, [d])
    fz = {x.id: x for x in STUDY.analyze(RunData(kb, rid).scoped("reliability"))}["reliability-gpu-fuzz"]
    assert fz.verdict == "refuted"
    assert fz.metrics["short"] == ["paged_decode"] and fz.metrics["failed"] == ["paged_append"]
    assert "[resolved since: fixed in abc; no run of the fix]" in fz.claim
