"""The TMA forward's softcap form against a fixed row reference (forward.softcap_bounded)."""
import pytest
import torch

import attention_proto  # noqa: F401  (sets TRITON_INTERPRET before the kernel modules)
from attention_proto.ops.dense import forward as F
from attention_proto.ops.dense.configs import FwdConfig
from attention_proto.ops.dense.rope import RopeSpec
from test_dense_forward import check, qkv

TMA_CFG = FwdConfig(16, 16, 4, 2, "tma")


def test_softcap_bounded_rule():
    assert F.softcap_bound_max(torch.bfloat16) == pytest.approx((126 + 32) / (2 * 1.4426950408889634))
    assert F.softcap_bound_max(torch.float16) == pytest.approx((14 + 15) / (2 * 1.4426950408889634))
    assert F.softcap_bounded(50.0, torch.bfloat16) and F.softcap_bounded(0.5, torch.float16)
    for dt in (torch.bfloat16, torch.float16):
        assert F.softcap_bounded(F.softcap_bound_max(dt), dt)
        assert not F.softcap_bounded(F.softcap_bound_max(dt) * 1.001, dt)
    assert not F.softcap_bounded(50.0, torch.float16)
    assert not F.softcap_bounded(5.0, torch.float32) and not F.softcap_bounded(None, torch.float16)


CASES = {
    "causal_nq>nk": (dict(causal=True, softcap=3.0), 45, 13, 2.0),  # fully masked rows: 0 and -inf
    "window": (dict(window=(6, 3), softcap=5.0), 30, 41, 2.0),
    "saturated_at_the_max_cap": (dict(causal=True, softcap=10.0), 37, 37, 40.0),  # scores pinned at +-cap
    "small_cap_saturated": (dict(softcap=0.5), 33, 33, 8.0),
    "rope_offsets": (dict(rope=RopeSpec("half", q_offset=5, k_offset=3), softcap=4.0), 23, 23, 2.0),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_tma_forward_softcap_fixed_reference(case, monkeypatch):
    mods, Nq, Nk, scale = CASES[case]
    monkeypatch.setattr(F, "SOFTCAP_FIXED_REFERENCE", True)
    F.clear_launch_plans()
    q, k, v = qkv(1, 4, 2, Nq, Nk, 32, torch.float16)
    check(q * scale, k * scale, v, torch.float16, config=TMA_CFG, **mods)
    (plan,) = F._PLANS.values()
    assert plan.consts.get("SOFTCAP_BOUND") is True
    F.clear_launch_plans()


def test_softcap_fixed_reference_not_taken(monkeypatch):
    # a cap past the bound, the switch off, and softcap with ALiBi (natural units) keep the running max
    for mods, switch in ((dict(softcap=11.0), True), (dict(softcap=5.0), False),
                         (dict(softcap=5.0, alibi_slopes=True, causal=True), True)):
        monkeypatch.setattr(F, "SOFTCAP_FIXED_REFERENCE", switch)
        F.clear_launch_plans()
        q, k, v = qkv(1, 4, 2, 21, 21, 32, torch.float16)
        check(q, k, v, torch.float16, config=TMA_CFG, **mods)
        (plan,) = F._PLANS.values()
        assert not plan.consts.get("SOFTCAP_BOUND", False), mods
    F.clear_launch_plans()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cap,scale", [(50.0, 1.0), (50.0, 30.0), (54.0, 30.0), (0.5, 4.0)])
def test_gpu_softcap_fixed_reference_bf16(cap, scale):
    """bf16 at D128 N1025 on the dispatched TMA forward, scores up to saturation, against float64."""
    F.clear_launch_plans()
    q, k, v = (torch.randn(2, h, 1025, 128, device="cuda", dtype=torch.bfloat16) for h in (8, 4, 4))
    check(q * scale, k, v, torch.bfloat16, causal=True, softcap=cap)
    assert any(p.consts.get("SOFTCAP_BOUND") for p in F._PLANS.values())
    F.clear_launch_plans()
