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
