"""Half of P's exponentials on the FMA units (forward.EXP2_SPLIT, common.exp2_fma / exp2_split)."""
import pytest
import torch
import triton
import triton.language as tl

import attention_proto  # noqa: F401  (sets TRITON_INTERPRET before the kernel modules)
from attention_proto.ops.dense import forward as F
from attention_proto.ops.dense.common import exp2_fma
from attention_proto.ops.dense.configs import FwdConfig
from attention_proto.ops.dense.rope import RopeSpec
from test_dense_forward import check, qkv

TMA_CFG = FwdConfig(16, 16, 4, 2, "tma")


@triton.jit
def _exp2_fma_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(Y + offs, exp2_fma(tl.load(X + offs, mask=ok, other=0.0)), mask=ok)


def test_exp2_fma_accuracy_and_edges(device):
    x = torch.cat([torch.linspace(-126.0, 0.01, 20001), -torch.rand(5000) * 30,
                   torch.tensor([0.0, -0.5, 0.5, -1.0, -126.5, -127.0, -127.4, -200.0, float("-inf")])])
    x = x.to(torch.float32).to(device)
    y = torch.full_like(x, float("nan"))
    _exp2_fma_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    xd, yd = x.double().cpu(), y.double().cpu()
    assert not torch.isnan(yd).any()
    normal = xd >= -126.0
    rel = ((yd[normal] - torch.exp2(xd[normal])) / torch.exp2(xd[normal])).abs().max().item()
    assert rel <= 3e-6, rel
    # at and below -127 (masked scores are -inf): exactly +0, never a wrapped exponent
    low = xd <= -127.0
    assert (yd[low] == 0).all() and not torch.signbit(y.cpu()[low]).any()
    tiny = (xd > -127.0) & (xd < -126.0)
    assert ((yd[tiny] >= 0) & (yd[tiny] < 2.0 ** -125)).all()


CASES = {
    "softcap_causal_nq>nk": dict(Nq=45, Nk=13, causal=True, softcap=3.0),  # fully masked rows
    "softcap_window": dict(Nq=30, Nk=41, window=(6, 3), softcap=5.0),
    "plain_causal": dict(Nq=37, Nk=37, causal=True),
    "alibi_causal": dict(Nq=20, Nk=29, alibi_slopes=True, causal=True),
    "rope_softcap": dict(Nq=23, Nk=23, rope=RopeSpec("half", q_offset=5, k_offset=3), softcap=4.0),
    "softcap_alibi_natural": dict(Nq=21, Nk=21, softcap=4.0, alibi_slopes=True, causal=True),
}


@pytest.mark.parametrize("mode", ["softcap", "all"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_tma_forward_with_exp2_split(case, mode, monkeypatch):
    mods = dict(CASES[case])
    Nq, Nk = mods.pop("Nq"), mods.pop("Nk")
    monkeypatch.setattr(F, "EXP2_SPLIT", mode)
    F.clear_launch_plans()
    q, k, v = qkv(1, 4, 2, Nq, Nk, 32, torch.float16)
    check(q * 2, k * 2, v, torch.float16, config=TMA_CFG, **mods)
    (plan,) = F._PLANS.values()
    natural = "alibi_slopes" in mods and "softcap" in mods
    expect = not natural and (mode == "all" or "softcap" in mods)
    assert plan.consts.get("EXP2_SPLIT", False) == expect
    F.clear_launch_plans()


def test_exp2_split_bad_mode_is_named(monkeypatch):
    monkeypatch.setattr(F, "EXP2_SPLIT", "fast")
    F.clear_launch_plans()
    q, k, v = qkv(1, 2, 2, 16, 16, 32, torch.float16)
    with pytest.raises(ValueError, match="EXP2_SPLIT must be one of"):
        F.flash_attention_forward(q, k, v, config=TMA_CFG, softcap=2.0)
    F.clear_launch_plans()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mods", [dict(causal=True, softcap=50.0), dict(causal=True), dict(causal=False, softcap=5.0)],
                         ids=["softcap_causal", "causal", "softcap"])
def test_gpu_exp2_split_bf16(mods, monkeypatch):
    """bf16 at D128 N1025 on the dispatched (TMA) path with EXP2_SPLIT="all", against float64."""
    monkeypatch.setattr(F, "EXP2_SPLIT", "all")
    F.clear_launch_plans()
    q, k, v = (torch.randn(2, h, 1025, 128, device="cuda", dtype=torch.bfloat16) for h in (8, 4, 4))
    check(q, k, v, torch.bfloat16, **mods)
    assert any(p.consts.get("EXP2_SPLIT") for p in F._PLANS.values())
    F.clear_launch_plans()
