"""Studies 2 (stitching), 4 (constants) and 7 (modifiers): interpreter runs, CPU dry runs of the GPU halves, bars.

The dry runs walk each study's GPU code path with tiny shapes, fp16 on the CPU and a fake clock,
then ``analyze`` with the run marked "gpu": every finding must come out without an analysis
error. Synthetic rows at the bar shapes check the modifiers study's bar verdicts.
"""
from __future__ import annotations

import pytest
import torch

import attention_proto  # noqa: F401
from attention_proto.kb.store import KB
from attention_proto.runtime.timing import Timing
from attention_proto.studies.base import RunData, StudyContext
from attention_proto.studies.constants import ConstantsStudy
from attention_proto.studies.modifiers import ModifiersStudy
from attention_proto.studies.runner import run_studies
from attention_proto.studies.stitching import StitchingStudy
from attention_proto.warmup import ModelAttentionConfig

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")
#: the dry runs put CPU tensors through the kernels (the interpreter); a GPU machine runs the real studies
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dry run; on a GPU run the studies themselves")


def _ctx(tmp_path, study, quick=True, ceilings=None):
    kb = KB.in_dir(tmp_path)
    run_id = kb.start_run({"gpu": "fake", "mode": "gpu"}, [study], run_id=f"dry-{study}")
    ceilings = ceilings or {"matmul_tflops": 700.0, "copy_gbps": 3000.0}
    kb.set_ceilings(run_id, ceilings)
    ctx = StudyContext(kb, run_id, study, quick=quick, ceilings=ceilings, progress=False, log=lambda m: None)
    ctx.mode = "gpu"  # the timed branch, on the CPU
    return kb, run_id, ctx


def _data(kb, run_id):
    data = RunData(kb, run_id)
    data.mode = "gpu"
    return data


def _fake_bench(ctx, monkeypatch):
    calls = []

    def bench(fn, warmup_ms=0, rep_ms=0):
        calls.append(1)
        ms = 1.0 + 0.01 * len(calls)
        return Timing(ms, ms, ms)

    monkeypatch.setattr(ctx, "bench", bench)


@cpu_only
def test_interpreter_runs_of_the_three_studies(tmp_path):
    run_id = run_studies(["stitching", "constants", "modifiers"], tmp_path, progress=False, log=lambda m: None)
    kb = KB.in_dir(tmp_path)
    findings = {f["id"]: f for f in kb.findings(run_id=run_id)}
    for fid in ("stitching-attn_fwd-correct", "constants-attn_fwd-correct", "constants-model-variants",
                "constants-warmup-runs", "modifiers-attn_fwd-correct"):
        assert fid in findings, sorted(findings)
        assert findings[fid]["verdict"] in ("supported", "observation"), findings[fid]
    rows = kb.measurements(run_id)
    assert all(r["extra"]["ok"] for r in rows if "ok" in r["extra"])


def _no_analysis_errors(findings):
    bad = [f for f in findings if "analysis" in f.id or f.verdict == "inconclusive" and "failed" in f.claim]
    assert not bad, [(f.id, f.claim) for f in bad]


@cpu_only
def test_stitching_gpu_dry_run(tmp_path, monkeypatch):
    kb, run_id, ctx = _ctx(tmp_path, "stitching")
    _fake_bench(ctx, monkeypatch)
    st = StitchingStudy()
    st.shape, st.dtype, st.device = (1, 2, 32, 32), torch.float16, "cpu"
    st.ways = ("constexpr", "constexpr_default", "runtime", "hooks")
    st.measure(ctx)
    assert not ctx.errors, ctx.errors
    rows = kb.measurements(run_id)
    ways = {r["extra"]["way"] for r in rows}
    assert ways == set(st.ways)
    rt = [r for r in rows if r["extra"]["way"] == "runtime"]
    assert all(r["extra"]["first_call_s"] > 0 for r in rows)
    findings = st.analyze(_data(kb, run_id))
    ids = {f.id for f in findings}
    assert {"stitching-runtime-flags", "stitching-hooks", "stitching-dispatch"} <= ids, ids
    _no_analysis_errors(findings)
    assert len(rt) == 2


@cpu_only
def test_constants_gpu_dry_run(tmp_path, monkeypatch):
    kb, run_id, ctx = _ctx(tmp_path, "constants")
    _fake_bench(ctx, monkeypatch)
    st = ConstantsStudy()
    st.dtype, st.device = torch.float16, "cpu"
    st.compile_shape, st.overhead_shape, st.overhead_calls = (1, 2, 32, 32), (1, 2, 16, 32), 5
    st.runtime_n, st.runtime_tokens, st.runtime_hd = 32, 32, 128
    st.plan_max_seq_len, st.traffic_lens = 128, (20,)
    st.warm_model = ModelAttentionConfig("tiny", head_dim=32, num_heads=4, num_kv_heads=2)
    st.warm_options = dict(seq_lens=(17,), varlen=False, decode=False)
    st.measure(ctx)
    assert not ctx.errors, ctx.errors
    ops = {r["op"] for r in kb.measurements(run_id)}
    assert ops == {"compile", "launch_overhead", "attn_fwd", "warmup_plan", "warmup", "traffic_after_warmup"}
    findings = st.analyze(_data(kb, run_id))
    ids = {f.id for f in findings}
    assert {"constants-compile-time", "constants-launch-overhead", "constants-runtime-arguments",
            "constants-block-sizes", "constants-model-variants", "constants-warmup"} <= ids, ids
    _no_analysis_errors(findings)


def _modifiers_dry_run(tmp_path, monkeypatch, quick):
    """The modifiers study's GPU half at tiny CPU shapes with a fake clock; (kb, run_id, study)."""
    kb, run_id, ctx = _ctx(tmp_path, "modifiers", quick=quick)
    _fake_bench(ctx, monkeypatch)
    st = ModifiersStudy()
    st.ns, st.tokens, st.heads, st.head_dim, st.kv_heads_gqa = (48,), 48, 2, 32, 1
    st.window, st.bar_n, st.flex, st.dtype, st.device = 8, 48, False, torch.float16, "cpu"
    st.measure(ctx)
    assert not ctx.errors, ctx.errors
    return kb, run_id, st


@cpu_only
def test_modifiers_gpu_dry_run(tmp_path, monkeypatch):
    kb, run_id, st = _modifiers_dry_run(tmp_path, monkeypatch, quick=True)
    whats = {r["extra"]["what"] for r in kb.measurements(run_id)}
    assert {"plain", "rope", "rope_separate", "rope_kernel_only", "alibi", "softcap", "window", "gqa",
            "gqa_repeat"} <= whats
    findings = st.analyze(_data(kb, run_id))
    ids = {f.id for f in findings}
    assert {"modifiers-rope-fused-overhead", "modifiers-rope-fused-vs-separate", "modifiers-alibi-overhead",
            "modifiers-softcap-cost", "modifiers-window-speedup", "modifiers-gqa-native", "modifiers-overheads"} <= ids
    _no_analysis_errors(findings)


@cpu_only
def test_modifiers_bar_pairs_alternate_in_rounds(tmp_path, monkeypatch):
    # not quick, at the bar N: the bar pairs on the default path run BAR_ROUNDS rounds one after the
    # other (after everything else), each row keeps its rounds, the rest run once
    from attention_proto.studies.modifiers import BAR_ROUNDS

    kb, run_id, _ = _modifiers_dry_run(tmp_path, monkeypatch, quick=False)
    rows = {(r["extra"]["what"], r["extra"]["path"]): r for r in kb.measurements(run_id) if r["op"] == "attn_fwd"}
    for what in ("plain", "rope", "rope_separate", "alibi", "softcap"):
        rounds = rows[(what, "default")]["extra"]["round_ms"]
        assert len(rounds) == BAR_ROUNDS
        # the fake clock ticks per call: the five alternate, so each round is five calls after the last
        assert [round(b - a, 4) for a, b in zip(rounds, rounds[1:])] == [0.05] * (BAR_ROUNDS - 1)
    assert "round_ms" not in rows[("window", "default")]["extra"]
    assert "round_ms" not in rows[("softcap", "portable")]["extra"]


# ---------------------------------------------------------------------------------------------- bars

def _row(ctx, what, path, ms, N=16384, impl="attention_proto", mods=(), H=16, Hkv=16, **extra):
    B = 16384 // N
    flops = 4.0 * B * H * N * N * 128 / 2
    return ctx.record(op="attn_fwd", impl=impl, variant=f"{path} {what}", mods=list(mods), B=B, H=H, Hkv=Hkv, N=N,
                      D=128, dtype="bfloat16", causal=True, timing=Timing(ms, ms, ms), flops=flops,
                      extra=dict(what=what, path=path, **extra))


def _mufu(total, counts):
    return {"kernel": "_fwd_tma_kernel", "counts": counts, "total": total, "BLOCK_M": 128, "BLOCK_N": 64,
            "num_warps": 8, "scores_per_thread": 32}


@pytest.mark.parametrize("good", [True, False])
def test_modifiers_bar_verdicts(tmp_path, monkeypatch, good):
    kb, run_id, ctx = _ctx(tmp_path, "modifiers", quick=False)
    hw = dict(sm_clock_mhz=1980.0, sm_count=132, mufu_per_clk_per_sm=16)
    _row(ctx, "plain", "default", 10.0, mufu_ptx=_mufu(132, {"ex2": 68, "div": 64}), **hw)
    _row(ctx, "plain", "portable", 11.0)
    _row(ctx, "plain", "rope_tile", 11.0)
    _row(ctx, "rope", "rope_tile", 60.0, mods=["rope"], config={"BLOCK_M": 64, "BLOCK_N": 32})
    _row(ctx, "rope", "default", 10.3 if good else 11.5, mods=["rope"])
    _row(ctx, "rope_separate", "default", 10.5 if good else 10.4, mods=["rope"])
    _row(ctx, "alibi", "default", 10.4 if good else 11.0, mods=["alibi"])
    _row(ctx, "softcap", "default", 11.5 if good else 13.0, mods=["softcap:50"],
         mufu_ptx=_mufu(324, {"ex2": 132, "div": 192}), **hw)
    _row(ctx, "softcap", "flex", 25.0 if good else 15.0, impl="flex", mods=["softcap:50"])
    _row(ctx, "plain", "flex", 12.0, impl="flex")
    _row(ctx, "window", "default", 2.0 if good else 3.0, mods=["window:1024"])
    _row(ctx, "gqa", "default", 10.2 if good else 11.0, Hkv=4, mods=["gqa:4"],
         peak_extra_bytes=(66 if good else 400) << 20,
         out_lse_bytes=65 << 20, kv_copy_bytes=1 << 30)
    _row(ctx, "plain", "default", 3.0, N=4096)
    _row(ctx, "window", "default", 1.5, N=4096, mods=["window:1024"])
    f = {x.id: x for x in ModifiersStudy().analyze(_data(kb, run_id))}
    want = "supported" if good else "refuted"
    for fid in ("modifiers-rope-fused-overhead", "modifiers-rope-fused-vs-separate", "modifiers-alibi-overhead",
                "modifiers-softcap-cost", "modifiers-window-speedup", "modifiers-gqa-native"):
        assert f[fid].verdict == want, (fid, f[fid].claim)
    assert "64x32" in f["modifiers-rope-fused-overhead"].claim
    bound = f["modifiers-softcap-bound"]
    assert bound.metrics["mufu_ops_per_score"]["softcap"] == pytest.approx(4.0)
    assert "MUFU" in bound.claim


def test_modifiers_overheads_from_alternating_rounds(tmp_path):
    # per-round ratios, then their median: 19%, 30%, 1% -> 19% (bar 20%: met), where the ratio of the
    # two median rounds (12.1 / 10.0) would read 21%
    kb, run_id, ctx = _ctx(tmp_path, "modifiers", quick=False)
    _row(ctx, "plain", "default", 10.0, round_ms=[10.0, 10.0, 12.0])
    _row(ctx, "softcap", "default", 12.1, mods=["softcap:50"], round_ms=[11.9, 13.0, 12.1])
    _row(ctx, "alibi", "default", 10.4, mods=["alibi"])  # timed once: the plain ratio
    _row(ctx, "softcap", "flex", 25.0, impl="flex", mods=["softcap:50"])
    f = {x.id: x for x in ModifiersStudy().analyze(_data(kb, run_id))}
    soft = f["modifiers-softcap-cost"]
    assert soft.metrics["overhead"] == pytest.approx(0.19) and soft.verdict == "supported", soft.claim
    assert soft.metrics["round_overheads"] == [0.19, 0.3, pytest.approx(0.0083, abs=1e-4)]
    assert "median of 3 alternating rounds" in soft.claim
    # fused against separate RoPE: per-round ratios too (1.02x, 0.97x, 1.10x -> 1.02x: met)
    kb, run_id, ctx = _ctx(tmp_path / "sep", "modifiers", quick=False)
    _row(ctx, "rope", "default", 10.0, mods=["rope"], round_ms=[10.0, 10.0, 9.0])
    _row(ctx, "rope_separate", "default", 9.7, mods=["rope"], round_ms=[10.2, 9.7, 9.9])
    sep = {x.id: x for x in ModifiersStudy().analyze(_data(kb, run_id))}["modifiers-rope-fused-vs-separate"]
    assert sep.metrics["separate_over_fused"] == pytest.approx(1.02) and sep.verdict == "supported", sep.claim
    assert sep.metrics["round_ratios"] == [1.02, 0.97, 1.1] and "1.02x, 0.97x, 1.10x" in sep.claim
    alibi = f["modifiers-alibi-overhead"]
    assert alibi.metrics["overhead"] == pytest.approx(0.04) and alibi.metrics["round_overheads"] is None
    assert "alternating" not in alibi.claim

