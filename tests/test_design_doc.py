"""docs/design.md cites at least 20 finding ids, every one present in the committed H100 findings."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_design_doc_cites_findings_that_exist():
    text = (ROOT / "docs" / "design.md").read_text()
    cited = set(re.findall(r"`([a-z0-9]+(?:-[a-z0-9_]+)+)`", text))
    findings = ROOT / "results" / "nvidia-h100-80gb-hbm3" / "findings.jsonl"
    ids = {json.loads(line)["id"] for line in findings.read_text().splitlines() if line.strip()}
    cited = {c for c in cited if c.split("-")[0] in {f.split("-")[0] for f in ids}}
    missing = sorted(cited - ids)
    assert not missing, f"design.md cites findings that are not in the KB export: {missing}"
    assert len(cited) >= 20, f"design.md cites only {len(cited)} finding ids"
