"""The linear study's analysis on synthetic GPU rows (no GPU needed), and its crossover arithmetic."""
from __future__ import annotations

import math

import pytest

from attention_proto.kb.store import KB
from attention_proto.studies.base import RunData
from attention_proto.studies.linear import BAR_NS, NS_FULL, STUDY, crossover


def test_crossover_interpolates_in_log_space():
    pts = [(1024, 1.0, 0.5), (2048, 1.0, 0.8), (4096, 1.0, 1.6), (8192, 1.0, 3.2)]
    x = crossover(pts)
    assert x["status"] == "between" and (x["lo"], x["hi"]) == (2048, 4096)
    # ratio 0.8 -> 1.6 doubles over one doubling of N: crosses 1 at 2048 * 1.25
    assert x["estimate"] == pytest.approx(2048 * 1.25, rel=1e-9)
    assert crossover([(1024, 1.0, 2.0), (2048, 1.0, 4.0)])["status"] == "below"
    assert crossover([(1024, 2.0, 1.0)])["status"] == "above"
    assert crossover([])["status"] == "none"
    # a dip back below 1 moves the crossover past it
    assert crossover([(1024, 1.0, 2.0), (2048, 1.0, 0.9), (4096, 1.0, 2.0)])["lo"] == 2048


def _row(run_id, **kw):
    base = dict(run_id=run_id, study="linear", gpu="NVIDIA H100 (synthetic)", mode="gpu", causal=True,
                dtype="bfloat16", H=16, D=128, variant="", mods=[], extra={})
    base.update(kw)
    if base.get("N") is not None:
        base.setdefault("Nk", base["N"])
    base.setdefault("Hkv", base["H"])
    return base


def test_analyze_synthetic_gpu_run(tmp_path):
    kb = KB.in_dir(tmp_path)
    env = {"mode": "gpu", "gpu": "NVIDIA H100 (synthetic)", "triton": "3.6.0"}
    run_id = kb.start_run(env, ["linear"])
    kb.set_ceilings(run_id, {"copy_gbps": 3000.0, "matmul_tflops": 700.0})
    add = lambda **kw: kb.add_measurement(_row(run_id, **kw))  # noqa: E731
    for N in NS_FULL:
        B = max(1, 32768 // N)
        for gated in (False, True):
            ex = {"chunk_size": 64, "gated": gated, "K": 128, "V": 128}
            add(op="linear_fwd", impl="attention_proto", N=N, B=B, ms_median=1.0, extra=ex)
            add(op="linear_fwd_bwd", impl="attention_proto", N=N, B=B, ms_median=3.0, extra=ex)
            add(op="linear_fwd", impl="fla", N=N, B=B, ms_median=1.1, extra=ex)
            if gated:
                add(op="linear_fwd_bwd", impl="fla", N=N, B=B, extra={**ex, "unsupported": "RuntimeError: #640"})
            else:
                add(op="linear_fwd_bwd", impl="fla", N=N, B=B, ms_median=2.0, extra=ex)
        add(op="attn_fwd", impl="attention_proto", N=N, B=B, ms_median=0.4 * N / 1024)
        add(op="attn_fwd_bwd", impl="attention_proto", N=N, B=B, ms_median=1.0 * N / 1024)
        add(op="attn_fwd", impl="sdpa_cudnn", N=N, B=B, ms_median=0.3 * N / 1024)
    for N in BAR_NS:
        for C, ms in ((32, 1.3), (128, 1.2)):
            add(op="linear_fwd", impl="attention_proto", N=N, B=32768 // N, ms_median=ms,
                extra={"chunk_size": C, "gated": False, "sweep": True})
    add(op="linear_decode", impl="attention_proto", variant="new state", B=64, N=1, ms_median=0.05, gbps=2700.0,
        extra={"K": 128, "V": 128, "inplace": False})
    for K in (64, 128):
        add(op="linear_grad_check", impl="attention_proto", N=1000, B=2, H=4, D=K, mods=["gated"],
            extra={"ok": True, "err_ratio": 0.4, "worst": "dk", "K": K, "chunk_size": 64, "gated": True})

    findings = {f.id: f for f in STUDY.analyze(RunData(kb, run_id))}
    fwd = findings["linear-crossover-fwd-attention_proto"]
    # dense/linear = 0.4 N / 1024: crosses 1 at N = 2560, inside FLA's 2k-4k
    assert fwd.metrics["crossover_N"] == pytest.approx(2560, rel=1e-6) and fwd.verdict == "supported"
    assert "2560" in fwd.claim
    fb = findings["linear-crossover-fwd-bwd-attention_proto"]
    assert fb.metrics["crossover_N"] == pytest.approx(3072, rel=1e-6)
    assert findings["linear-crossover-fwd-bwd-sdpa_cudnn"].verdict == "inconclusive"
    ug = findings["linear-vs-fla-fwd-ungated"]
    assert ug.metrics["min_at_bar"] == pytest.approx(1.1) and ug.verdict == "supported"
    fbu = findings["linear-vs-fla-fwd-bwd-ungated"]
    assert fbu.metrics["min_at_bar"] == pytest.approx(2 / 3) and fbu.verdict == "refuted"
    fbg = findings["linear-vs-fla-fwd-bwd-gated"]
    assert fbg.verdict == "observation" and "#640" in fbg.claim
    ch = findings["linear-chunk-size"]
    assert ch.metrics["winner"] == 64 and ch.metrics["wins"] == {"64": 2}
    dec = findings["linear-decode-new-state"]
    assert dec.metrics["fraction_of_copy"] == pytest.approx(0.9)
    hop = findings["linear-gated-backward-hopper"]
    assert hop.verdict == "supported" and "#640" in hop.claim
    for f in findings.values():   # every claim is a filled sentence
        assert f.claim.endswith(".") and "{" not in f.claim
        assert not any(isinstance(v, float) and math.isnan(v) for v in f.metrics.values() if isinstance(v, float))
    kb.close()


def test_gpu_path_dry_run_on_cpu(tmp_path, monkeypatch):
    """The GPU half of measure() run end to end at toy sizes on the interpreter (fake timings):
    catches Python errors in code that otherwise first runs on the GPU machine."""
    import torch

    import attention_proto.studies.linear as L
    from attention_proto.runtime.timing import Timing
    from attention_proto.studies.base import StudyContext

    for name, val in dict(TOKENS=64, H=2, D=16, NS_QUICK=(32, 64), BAR_NS=(64,), DECODE_B=2, CHECK_N=40,
                          DTYPE=torch.float16, DEVICE="cpu").items():
        monkeypatch.setattr(L, name, val)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    kb = KB.in_dir(tmp_path)
    env = {"mode": "gpu", "gpu": "dry run", "triton": "3.6.0"}
    run_id = kb.start_run(env, ["linear"], quick=True)
    kb.set_ceilings(run_id, {"copy_gbps": 3000.0})
    ctx = StudyContext(kb, run_id, "linear", quick=True, ceilings={"copy_gbps": 3000.0}, progress=False,
                       log=lambda m: None)
    ctx.mode, ctx.device, ctx.gpu = "gpu", "cpu", "dry run"
    calls = []

    def fake_bench(fn, **kw):
        fn()
        calls.append(1)
        return Timing(1.0 + 0.01 * len(calls), 0.9, 1.1)

    ctx.bench = fake_bench
    L.STUDY.measure(ctx)
    # only the peers that cannot run here may fail (cuDNN on the CPU is a recorded 'unsupported', not an error)
    assert not ctx.errors, ctx.errors
    rows = kb.measurements(run_id)
    ours = [r for r in rows if r["impl"] == "attention_proto" and r["op"].startswith("linear_fwd")]
    assert ours and all(r["ms_median"] for r in ours)
    checks = [r for r in rows if r["op"] == "linear_grad_check"]
    assert len(checks) == 3 and all(r["extra"]["ok"] for r in checks), checks
    fla = [r for r in rows if r["impl"] == "fla"]
    assert fla and all("unsupported" in r["extra"] for r in fla)
    findings = L.STUDY.analyze(RunData(kb, run_id))
    ids = {f.id for f in findings}
    assert {"linear-gated-backward-hopper", "linear-crossover-fwd-attention_proto", "linear-chunk-size",
            "linear-decode-new-state", "linear-vs-fla-fwd-ungated"} <= ids, ids
    kb.close()
