"""The CLI: errors, and the main job end to end in interpreter mode."""
import json

import pytest

from attention_proto.cli import main


def test_unknown_study_lists_known_ones(capsys):
    assert main(["run", "--study", "nope", "--out", "/tmp/never"]) == 2
    err = capsys.readouterr().err
    assert "unknown study 'nope'" in err and "ceilings" in err and "flash" in err


def test_run_ceilings_in_interpreter_writes_kb_and_report(tmp_path, capsys):
    assert main(["run", "--study", "ceilings", "--out", str(tmp_path), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "interpreter" in captured.err
    assert (tmp_path / "attention_proto.sqlite").exists()
    reports = list((tmp_path / "results").glob("*/REPORT.md"))
    assert reports and "Interpreter mode" in reports[0].read_text()
    assert main(["findings", "--out", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["mode"] == "interpreter" for r in rows)
    fid = rows[0]["id"]
    assert main(["findings", "--out", str(tmp_path), "--id", fid]) == 0
    assert "evidence" in capsys.readouterr().out
    assert main(["findings", "--out", str(tmp_path), "--study", "ceilings", "--verdict", "supported"]) == 0


def test_findings_without_kb_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no knowledge base"):
        main(["findings", "--out", str(tmp_path / "empty")])


def test_env_prints_facts(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "triton" in out and "mode" in out


def test_resume_adds_studies_to_one_run(tmp_path, capsys):
    from attention_proto.kb.store import KB

    assert main(["run", "--study", "ceilings", "--out", str(tmp_path), "--no-progress"]) == 0
    kb = KB.in_dir(tmp_path)
    rid = kb.latest_run_id()
    kb.close()
    assert main(["run", "--study", "codegen", "--out", str(tmp_path), "--no-progress", "--resume", rid]) == 0
    kb = KB.in_dir(tmp_path)
    assert len(kb.runs()) == 1
    assert kb.run(rid)["studies"] == ["ceilings", "codegen"]
    assert {f["study"] for f in kb.findings(run_id=rid)} >= {"ceilings", "codegen"}


def test_resume_measures_a_study_again(tmp_path, monkeypatch):
    """A study the run already has is measured again: its old rows go, the sittings record who measured what."""
    from attention_proto.kb.store import KB
    from attention_proto.studies import runner

    real = runner.device_facts
    commit = {"c": "aaaaaaa"}
    monkeypatch.setattr(runner, "device_facts", lambda: {**real(), "git_commit": commit["c"]})
    assert main(["run", "--study", "ceilings", "--out", str(tmp_path), "--no-progress"]) == 0
    kb = KB.in_dir(tmp_path)
    rid = kb.latest_run_id()
    n0 = len(kb.measurements(run_id=rid, study="ceilings"))
    kb.close()
    assert n0 > 0
    commit["c"] = "bbbbbbb"
    assert main(["run", "--study", "ceilings", "--out", str(tmp_path), "--no-progress", "--resume", rid]) == 0
    kb = KB.in_dir(tmp_path)
    assert len(kb.measurements(run_id=rid, study="ceilings")) == n0
    env = kb.run(rid)["env"]
    assert [st["studies"] for st in env["sittings"]] == [["ceilings"]]
    assert "bbbbbbb" in env["git_commit"] and "aaaaaaa" not in env["git_commit"]
