"""The linear kernels compile for Hopper (sm_90) without a GPU, and the study's variants do not spill.

Runs ``python -m attention_proto.ops.linear.aot --json`` in a subprocess (the kernels must be
imported without the interpreter): Triton's bundled ptxas compiles each kernel with its
default GPU config; cuobjdump reports registers, spilled bytes and wgmma use.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

pytestmark = pytest.mark.skipif(not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists(),
                                reason="Triton's bundled ptxas/cuobjdump not found")


def test_sm90_compile_no_spills():
    env = dict(os.environ, TRITON_INTERPRET="0")
    p = subprocess.run([sys.executable, "-m", "attention_proto.ops.linear.aot", "--json"], env=env,
                       capture_output=True, text=True, timeout=600)
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    assert p.returncode == 0, p.stderr[-2000:]
    # chunk_h, chunk_h_long, chunk_o, chunk_dh, chunk_dqk, chunk_dv, recurrent gated and not; chunk_cumsum gated;
    # chunk_dqk_fp32 gated: float32 inputs (IEEE dots, no tensor cores) with dg from the scores. It compiles;
    # it spills (232 bytes; 192 with the q . dq - k . dk form): a correctness path, not a fast one
    assert len(rows) == 16
    fp32 = [r for r in rows if r["kernel"] == "chunk_dqk_fp32"]
    assert len(fp32) == 1 and fp32[0]["gated"]
    rows = [r for r in rows if r["kernel"] != "chunk_dqk_fp32"]
    spills = [r for r in rows if r["spill_bytes"]]
    assert not spills, spills
    # the chunk-64 matmuls are Hopper wgmma, not the older mma.sync
    assert all(r["hgmma"] > 0 for r in rows if r["kernel"] not in ("recurrent", "chunk_cumsum")), rows
    # compiled as launched (16-byte aligned pointers): the state kernel's k/v loads are pipelined
    # (cp.async), which is what keeps its registers at the ungated ~64 (unaligned: ~170)
    h = {r["gated"]: r for r in rows if r["kernel"] == "chunk_h"}
    assert h[False]["regs"] <= 96 and h[True]["regs"] <= 128, h
