"""scripts/profile_model.py (issue #7's diagnosis of the model forward) runs end to end in its smoke mode."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_model_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "src"), OUT=str(tmp_path))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_model.py"), "--cpu"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "attn_calls" in res.stdout and "syncs" in res.stdout
    assert (tmp_path / "profile_model_attention_proto.txt").exists()
