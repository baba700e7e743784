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
    import attention_proto.studies.linear_varlen as LV

    for name, val in dict(H=2, D=16, TOKENS_QUICK=60, LENGTHS=(4, 24)).items():
        monkeypatch.setattr(LV, name, val)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    kb = KB.in_dir(tmp_path)
    env = {"mode": "gpu", "gpu": "dry run", "triton": "3.6.0"}
    run_id = kb.start_run(env, ["linear"], quick=True)
    kb.set_ceilings(run_id, {"copy_gbps": 3000.0})
    logs = []
    ctx = StudyContext(kb, run_id, "linear", quick=True, ceilings={"copy_gbps": 3000.0}, progress=False,
                       log=logs.append)
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
            "linear-decode-new-state", "linear-vs-fla-fwd-ungated", "linear-varlen-packing"} <= ids, ids
    packed = [r for r in rows if r["op"] == "linear_fwd_varlen"]
    assert {r["variant"] for r in packed} >= {"packed", "padded", "each alone (sum)"}
    # every part of the run logs its seconds (the study has a time budget)
    for part in ("prewarm", "first calls of ours", "gradient checks", "fla-core autotune", "N32", "N64",
                 "chunk sweep N64", "decode", "packed sequences"):
        assert any(m.startswith(f"[linear] {part}") and " s (total " in m for m in logs), (part, logs)
    kb.close()


def test_plan_and_prewarm_jobs():
    """Quick and full plans keep the bar lengths and the crossover points; the prewarm covers every
    variant the run calls, and its jobs travel as JSON."""
    import json

    from attention_proto.studies import linear as L

    quick, full = L._plan(True), L._plan(False)
    assert set(L.BAR_NS) <= set(full.ns) and set(L.BAR_NS[:1]) <= set(quick.ns)
    assert {1024, 2048, 4096, 8192, 16384, 32768} <= set(full.ns)
    assert len(quick.checks) == 3 and len(full.checks) == 5
    for plan in (quick, full):
        jobs = L._jobs(plan)
        assert json.loads(json.dumps(jobs)) == jobs
        ours = {tuple(j[1:]) for j in jobs if j[0] == "ours"}
        for C, gated, backward in plan.variants:   # a backward job also compiles the forward
            assert (C, gated, backward) in ours or (C, gated, True) in ours
        assert {(j[1], j[2], j[3]) for j in jobs if j[0] == "check"} == {(C, g, d) for g, C, d in plan.checks}
        assert {j[1] for j in jobs if j[0] == "dense"} == set(plan.ns)
    # quick mode times the gated sweep forward only: no gated backward compiles at C32/C128
    assert ("ours", 32, True, True) not in {tuple(j) for j in L._jobs(quick)}


@pytest.fixture
def toy(monkeypatch):
    import torch

    import attention_proto.studies.linear as L

    for name, val in dict(TOKENS=64, H=2, D=16, DECODE_B=2, DTYPE=torch.float16, DEVICE="cpu",
                          FLA_TUNE_N=32).items():
        monkeypatch.setattr(L, name, val)
    import attention_proto.studies.linear_varlen as LV

    for name, val in dict(H=2, D=16, TOKENS_QUICK=60, LENGTHS=(4, 24)).items():
        monkeypatch.setattr(LV, name, val)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return L


def test_prewarm_worker_runs_every_job_kind(toy, capsys):
    import json

    toy._prewarm_worker(json.dumps({"index": 0, "workers": 2, "fla": False, "fla_gated_bwd": False,
                                    "jobs": [["ours", 32, True, True], ["ours", 32, False, False],
                                             ["check", 32, True, 1], ["dense", 32, True], ["decode"],
                                             ["noop"], ["nonsense"]]}))
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("PREWARM ")][-1]
    jobs = json.loads(line[len("PREWARM "):])["jobs"]
    assert [j[0] for j in jobs][-2:] == ["noop", "nonsense"]
    assert all(j[2] is None for j in jobs[:-1]), jobs
    assert "unknown prewarm job" in jobs[-1][2]


def test_spawn_workers_reports_and_kills_late_ones():
    from attention_proto.studies import linear as L

    spec = {"index": 0, "workers": 1, "fla": False, "fla_gated_bwd": False, "jobs": [["noop"], ["nonsense"]]}
    (ok,) = L.spawn_workers([spec], timeout_s=120)
    assert [j[0] for j in ok["jobs"]] == ["noop", "nonsense"] and ok["jobs"][0][2] is None, ok
    (late,) = L.spawn_workers([spec], timeout_s=0.05)   # Python cannot even start in 50 ms
    assert "timed out" in late["error"], late


def test_fla_autotuners_sliced_compiled_and_tuned(toy, monkeypatch):
    """fla's autotune handling against a stand-in fla module with a real (interpreted) Triton autotuner."""
    import sys
    import types

    import torch
    import triton
    import triton.language as tl
    import triton.testing

    @triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (16, 32, 64)], key=["n"])
    @triton.jit
    def plus_one(x, y, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + i, tl.load(x + i, mask=i < n) + 1, mask=i < n)

    def fake_fla(q, k, v, g=None):
        x = q.detach().reshape(-1)
        y = torch.empty_like(x)
        plus_one[lambda m: (triton.cdiv(x.numel(), m["BLOCK"]),)](x, y, x.numel())
        return q * 2 + (y.view_as(q) - y.view_as(q)), None

    monkeypatch.setitem(sys.modules, "fla.ops.stand_in", types.SimpleNamespace(plus_one=plus_one))
    monkeypatch.setattr(toy, "_fla", lambda: (fake_fla, None))
    (at,) = [a for a in toy._fla_autotuners() if a is plus_one]   # found through sys.modules
    timed = []

    def fake_bench(fn, quantiles=None, **kw):
        fn()
        timed.append(kw)
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    info = toy.STUDY._fla_tune(types.SimpleNamespace(log=lambda m: None), fake_fla, refusal="RuntimeError: #640")
    assert timed and timed[0] == toy.FLA_TUNE_BENCH and "do_bench" not in vars(at)
    assert info["fla_configs"]["plus_one"] and info["fla_tuned_at"] == "B2 N32"
    configs = list(at.configs)
    at.cache.clear()
    toy._fla_compile_slice(0, 2, gated_bwd=False)   # worker 0 of 2: configs 0 and 2, "tuned" without timing
    assert [c.kwargs["BLOCK"] for c in at.configs] == [16, 64] and at.cache and not at.cache_results
    assert vars(at)["do_bench"] is toy._compile_only
    for index, want in ((1, [32]), (4, [32])):      # one config: Triton compiles it without a candidate loop
        at.configs = configs
        toy._fla_compile_slice(index, 5 if index == 4 else 2, gated_bwd=False)
        assert [c.kwargs["BLOCK"] for c in at.configs] == want


def test_fla_gated_bwd_refusal_asks_fla(monkeypatch):
    import sys
    import types

    from attention_proto.studies import linear as L

    monkeypatch.setattr(L, "DEVICE", "cpu")
    assert L._fla_gated_bwd_refusal() is None or "fla" in sys.modules   # no fla here: no answer

    def install(exc):
        def chunk_bwd_dqkwg(**kw):
            raise exc
        for name in ("fla", "fla.ops", "fla.ops.common"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "fla.ops.common.chunk_o",
                            types.SimpleNamespace(chunk_bwd_dqkwg=chunk_bwd_dqkwg))

    install(RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs ... (see #640). Please upgrade"))
    assert L._fla_gated_bwd_refusal().startswith("RuntimeError: Triton >= 3.4.0")
    install(IndexError("tuple index out of range"))
    assert L._fla_gated_bwd_refusal() is None


def test_packing_bars_of_issue_11():
    """Shared by the flash and linear packed-sequence findings: >= 0.9x one by one, and >= 1.5x over
    padding only when the mean length is under half the longest."""
    from attention_proto.studies.flash_varlen import packing_bars

    def row(ms, mean=100.0, longest=1000):
        return {"ms_median": ms, "extra": {"mean": mean, "longest": longest}}

    assert packing_bars(row(1.0), row(2.0), row(0.95)) == (2.0, 0.95, True)
    assert packing_bars(row(1.0), row(1.4), row(1.0))[2] is False            # padding not beaten by 1.5x
    assert packing_bars(row(1.0, mean=600), row(1.4), row(1.0))[2] is True   # ... not required then
    assert packing_bars(row(1.0), row(3.0), row(0.8))[2] is False            # slower than one by one
