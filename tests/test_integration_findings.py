"""The integration study's findings from synthetic rows (the GPU measures them; the wording is checked here)."""
import pytest

from attention_proto.kb.store import KB
from attention_proto.studies.base import RunData, StudyContext
from attention_proto.studies.integration import STUDY


def _findings(tmp_path, direct_us, op_us):
    kb = KB.in_dir(tmp_path)
    run_id = kb.start_run({"gpu": "fake", "mode": "gpu"}, ["integration"], run_id="op")
    ctx = StudyContext(kb, run_id, "integration", quick=False, ceilings={}, progress=False, log=lambda m: None)
    for variant, us in (("direct", direct_us), ("custom_op", op_us)):
        ctx.record(op="op_boundary_host", impl="attention_proto", variant=variant, N=128,
                   extra={"us_per_call": us})
    data = RunData(kb, run_id)
    data.mode = "gpu"
    return {f.id: f for f in STUDY.analyze(data)}


@pytest.mark.parametrize("direct_us, op_us, text, noise", [(36.2, 45.1, "(+8.9 us, N128)", False),
                                                            (40.1, 28.0, "(-12.1 us, N128)", True)])
def test_op_overhead_claim_signs_the_difference(tmp_path, direct_us, op_us, text, noise):
    f = _findings(tmp_path, direct_us, op_us)["integration-op-overhead"]
    assert text in f.claim and "+-" not in f.claim
    assert ("within the host's noise" in f.claim) is noise
    assert f.metrics["host_us_overhead"] == pytest.approx(op_us - direct_us)


def test_model_forward_findings_with_rounds_and_the_search_off(tmp_path):
    from attention_proto.runtime.timing import Timing
    from attention_proto.studies.integration import NO_SEARCH

    kb = KB.in_dir(tmp_path)
    run_id = kb.start_run({"gpu": "fake", "mode": "gpu"}, ["integration"], run_id="fwd")
    ctx = StudyContext(kb, run_id, "integration", quick=False, ceilings={}, progress=False, log=lambda m: None)
    for impl, rounds in (("attention_proto", [11.4, 11.2, 11.3]), ("sdpa", [11.0, 11.1, 10.9]),
                         (NO_SEARCH, [10.8, 10.9, 10.7])):
        mid = sorted(rounds)[1]
        ctx.record(op="model_fwd", impl=impl, variant="llama 8L h2048 seq4096", N=4096,
                   timing=Timing(mid, mid, mid), extra={"round_ms": rounds, "rounds": 3})
    data = RunData(kb, run_id)
    data.mode = "gpu"
    f = {x.id: x for x in STUDY.analyze(data)}
    vs = f["integration-forward-vs-sdpa"]
    assert "11.30 ms with attention-proto and 11.00 ms with sdpa" in vs.claim and vs.verdict == "refuted"
    assert "median of 3 alternating rounds" in vs.claim
    ps = f["integration-forward-position-search"]
    assert "takes 10.80 ms against 11.30 ms with it" in ps.claim
    assert ps.metrics["speedup_vs_sdpa"] == pytest.approx(11.0 / 10.8)


def test_model_forward_host_bound_gpu_time_and_compiled_findings(tmp_path):
    from attention_proto.runtime.timing import Timing

    kb = KB.in_dir(tmp_path)
    run_id = kb.start_run({"gpu": "fake", "mode": "gpu"}, ["integration"], run_id="host")
    ctx = StudyContext(kb, run_id, "integration", quick=False, ceilings={}, progress=False, log=lambda m: None)
    for impl, ms, enq, gpu in (("attention_proto", 12.0, [11.9, 12.4, 12.1], 10.2), ("sdpa", 11.5, [9.0, 9.5, 8.8], 10.6)):
        ctx.record(op="model_fwd", impl=impl, variant="llama 8L h2048 seq4096", N=4096, timing=Timing(ms, ms, ms),
                   extra={"round_ms": [ms] * 3, "rounds": 3, "enqueue_ms": enq, "gpu_kernel_ms": gpu})
    for impl, ms in (("attention_proto", 7.4), ("sdpa", 7.7)):
        ctx.record(op="model_compile", impl=impl, variant="llama 8L h2048 seq4096", N=4096, timing=Timing(ms, ms, ms),
                   extra={"compile_s": 17.0, "enqueue_ms": 2.5})
    data = RunData(kb, run_id)
    data.mode = "gpu"
    f = {x.id: x for x in STUDY.analyze(data)}
    vs = f["integration-forward-vs-sdpa"]
    assert "took 12.10 ms of host time with attention-proto and 9.00 ms with sdpa" in vs.claim
    assert "host-bound (attention-proto:" in vs.claim  # 12.1 >= 0.9 * 10.2; sdpa's 9.0 < 0.9 * 10.6
    g = f["integration-forward-gpu-time"]
    assert "10.200 ms of GPU time with attention-proto and 10.600 ms with sdpa" in g.claim
    assert g.metrics["speedup_vs_sdpa"] == pytest.approx(10.6 / 10.2)
    c = f["integration-compiled-vs-sdpa"]
    assert "7.40 ms with attention-proto and 7.70 ms with sdpa" in c.claim
    assert f["integration-compiled-forward"].metrics["compiled_ms"] == pytest.approx(7.4)
