"""Dense forward modifiers: each alone, then a pairwise grid of combinations (CPU interpreter).

Every case runs our forward into NaN-poisoned outputs and checks out and lse against the float64
reference with the error rule (see ``test_dense_forward.check``).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import attention_proto  # noqa: F401
from attention_proto.ops.dense.interface import attention_varlen
from attention_proto.ops.dense.reference import alibi_slopes
from attention_proto.ops.dense.rope import RopeSpec, rope_cos_sin
from test_dense_forward import DEV, DTYPES, check, qkv, rand


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
@pytest.mark.parametrize("mods", [
    dict(window=7),
    dict(window=(7, -1)),
    dict(window=(-1, 5)),
    dict(window=(6, 3)),
    dict(window=(0, 0)),
    dict(window=(6, 3), causal=True),
    dict(softcap=2.0),
    dict(softcap=50.0),
    dict(alibi_slopes=True),
    dict(alibi_slopes="tensor"),
    dict(rope=RopeSpec("half")),
    dict(rope=RopeSpec("interleaved")),
    dict(rope=RopeSpec("half", theta=500.0, q_offset=3, k_offset=2)),
    dict(rope="tables"),
    dict(scale=0.05),
], ids=["win-int", "win-left", "win-right", "win-both", "win-diag", "win-causal", "softcap2", "softcap50",
        "alibi", "alibi-tensor", "rope-half", "rope-inter", "rope-offsets", "rope-tables", "scale"])
def test_modifier_alone(mods, dtype):
    mods = dict(mods)
    Nq, Nk, D = 21, 37, 40
    q, k, v = qkv(1, 2, 2, Nq, Nk, D, dtype)
    if mods.get("alibi_slopes") == "tensor":
        mods["alibi_slopes"] = torch.tensor([0.3, 1.7]).to(q.device)
    if mods.get("rope") == "tables":
        cos, sin = rope_cos_sin(torch.arange(64), D, 10000.0, torch.float64)
        mods["rope"] = RopeSpec("interleaved", cos=cos.float().to(q.device), sin=sin.float().to(q.device))
    if mods.get("softcap"):
        q, k = q * 3, k * 3  # large scores so the cap matters
    check(q, k, v, dtype, **mods)


# pairwise grid -------------------------------------------------------------------------------

FACTORS = {
    "causal": [False, True],
    "window": [None, (9, 2)],
    "softcap": [None, 4.0],
    "alibi": [None, True],
    "rope": [None, "half", "interleaved"],
    "gqa": [1, 2],
}


def pairwise_cases():
    """Greedy covering array: every value pair of every two factors appears in some case."""
    names = list(FACTORS)
    full = list(itertools.product(*FACTORS.values()))
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(range(len(names)), 2)
                 for va in range(len(FACTORS[names[a]])) for vb in range(len(FACTORS[names[b]]))}
    index = [[FACTORS[n].index(x) for n, x in zip(names, row)] for row in full]
    cases = []
    while uncovered:
        def gain(ix):
            return sum((a, ix[a], b, ix[b]) in uncovered for a, b in itertools.combinations(range(len(names)), 2))

        best = max(range(len(full)), key=lambda r: gain(index[r]))
        ix = index[best]
        uncovered -= {(a, ix[a], b, ix[b]) for a, b in itertools.combinations(range(len(names)), 2)}
        cases.append(dict(zip(names, full[best])))
    return cases


CASES = pairwise_cases()


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items() if v not in (None, False, 1)) or "plain"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_pairwise(case):
    i = CASES.index(case)
    dtype = DTYPES[i % 2]  # alternate fp16 / fp32
    H = 4
    Hkv = H // case["gqa"]
    q, k, v = qkv(1, H, Hkv, 19, 26, 32, dtype)
    mods = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"])
    if case["softcap"]:
        q = q * 2
    if case["alibi"]:
        mods["alibi_slopes"] = alibi_slopes(H).to(q.device)
    if case["rope"]:
        mods["rope"] = RopeSpec(case["rope"])
    check(q, k, v, dtype, **mods)


def test_pairwise_grid_is_small_and_complete():
    assert len(CASES) <= 12
    for a, b in itertools.combinations(FACTORS, 2):
        seen = {(c[a], c[b]) for c in CASES}
        assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)


# RoPE on the portable kernel: rotated in the kernel ("tile") or by the RoPE kernel first ("rotate") ---

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
@pytest.mark.parametrize("mods", [
    dict(rope=RopeSpec("half"), causal=True),
    dict(rope=RopeSpec("interleaved"), window=(9, 2)),
    dict(rope=RopeSpec("half", theta=500.0, q_offset=3, k_offset=2), softcap=4.0),
    dict(rope="tables", alibi_slopes=True, causal=True),
], ids=["half-causal", "inter-window", "offsets-softcap", "tables-alibi"])
@pytest.mark.parametrize("Nq,Nk,gqa", [(21, 37, 1), (40, 33, 2), (1, 50, 2)])
def test_portable_rope_rotated_first_matches_the_reference(mods, dtype, Nq, Nk, gqa, monkeypatch):
    """forward.PORTABLE_ROPE = "rotate": q and k go through the RoPE kernel into scratch tensors and the
    plain kernel runs on its plain tile (H100: 2.28 ms against the in-kernel rotation's 16.88 ms at
    B1 H16 N16k). Same rule against the float64 reference as the in-kernel rotation, whose output it
    matches to rounding; Nq > Nk exercises the shifted default query positions."""
    from attention_proto.ops.dense import forward as F

    mods = dict(mods)
    H, D = 4, 40
    q, k, v = qkv(1, H, H // gqa, Nq, Nk, D, dtype)
    if mods.get("rope") == "tables":
        cos, sin = rope_cos_sin(torch.arange(64), D, 10000.0, torch.float64)
        mods["rope"] = RopeSpec("interleaved", cos=cos.float().to(q.device), sin=sin.float().to(q.device))
        if Nq > Nk:
            mods["rope"] = RopeSpec("interleaved", cos=mods["rope"].cos, sin=mods["rope"].sin, q_offset=0)
    if mods.get("alibi_slopes"):
        mods["alibi_slopes"] = alibi_slopes(H).to(q.device)
    if mods.get("softcap"):
        q = q * 2
    outs = {}
    for mode in ("tile", "rotate"):
        monkeypatch.setattr(F, "PORTABLE_ROPE", mode)
        F.clear_launch_plans()
        outs[mode] = check(q, k, v, dtype, **mods)
        (plan,) = F._PLANS.values()
        assert plan.kernel is F._fwd_kernel
        assert (plan.rotate is not None) == (mode == "rotate")
        assert plan.consts["ROPE"] == (0 if mode == "rotate" else (1 if mods["rope"].layout == "half" else 2))
    F.clear_launch_plans()
    # the same rotated operands up to the rounding order of the rotation: outputs agree closely
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert torch.allclose(outs["tile"][0].float(), outs["rotate"][0].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
@pytest.mark.parametrize("split", [False, True], ids=["plain", "split"])
@pytest.mark.parametrize("q_offset", [None, 0])
def test_varlen_rope_rotated_first_matches_the_reference(dtype, split, q_offset, monkeypatch):
    """Varlen + RoPE rotated by the packed RoPE pass first (positions restart per sequence; the default
    query positions shift by seqlen_k - seqlen_q per sequence), then the plain varlen kernel: against
    the float64 reference sequence by sequence, and equal to the in-kernel rotation up to rounding."""
    from attention_proto.ops.dense import forward as F
    from test_dense_forward import _varlen_inputs, check_varlen_per_sequence

    lq, lk = [5, 1, 0, 19, 3, 12], [7, 1, 4, 19, 0, 9]  # Nq > Nk in the last: shifted default positions
    q, k, v, cq, ck = _varlen_inputs(lq, lk, 4, 2, 32, dtype)
    if split and dtype == torch.float32:
        pytest.skip("split scores are for 16-bit inputs")
    mods = dict(causal=True, softcap=4.0 if split else None, rope=RopeSpec("half", q_offset=q_offset))
    monkeypatch.setattr(F, "SPLIT_ROPE_SOFTCAP_SCORES", split)
    outs = {}
    for mode in ("tile", "rotate"):
        monkeypatch.setattr(F, "PORTABLE_ROPE", mode)
        F.clear_launch_plans()
        out, lse = attention_varlen(q * 2, k * 2, v, cq, ck, max(lq), max(lk), return_lse=True, **mods)
        (plan,) = F._PLANS.values()
        assert (plan.rotate is not None) == (mode == "rotate") and plan.consts.get("SPLIT", False) == split
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        check_varlen_per_sequence(out, q * 2, k * 2, v, cq, ck, dtype, what=f" ({mode})", **mods)
        outs[mode] = out
    F.clear_launch_plans()
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert torch.allclose(outs["tile"].float(), outs["rotate"].float(), atol=tol, rtol=tol)


def test_portable_rope_mode_rule(monkeypatch):
    from attention_proto.ops.dense import forward as F
    from attention_proto.ops.dense.configs import SMALL_PROBLEM_SCORES

    assert F.PORTABLE_ROPE == "auto"
    big = SMALL_PROBLEM_SCORES  # B * H * Nq * Nk above it with Nq = Nk = 2048, H = 2
    assert F.portable_rope_rotates("auto", 1, 2, 2048, 2048)
    assert F.portable_rope_rotates("rotate", 1, 2, 8, 8) and not F.portable_rope_rotates("auto", 1, 2, 8, 8)
    assert not F.portable_rope_rotates("auto", 64, 32, 1, 65536)  # decode: rotate each key tile once
    assert not F.portable_rope_rotates("auto", 1, 1, 128, big // 128)  # at the small-problem limit
    assert F.portable_rope_rotates("rotate", 1, 1, 1, 1) and not F.portable_rope_rotates("tile", 9, 9, 4096, 4096)
    with pytest.raises(ValueError, match="PORTABLE_ROPE must be one of"):
        F.portable_rope_rotates("fused", 1, 1, 1, 1)
    # the bad value is caught at the call, naming the switch
    monkeypatch.setattr(F, "PORTABLE_ROPE", "fast")
    F.clear_launch_plans()
    q, k, v = qkv(1, 2, 2, 8, 8, 16, torch.float16)
    with pytest.raises(ValueError, match="PORTABLE_ROPE"):
        F.flash_attention_forward(q, k, v, rope=RopeSpec("half"))
    F.clear_launch_plans()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_gpu_portable_rope_rotated_first_bf16(layout):
    """bf16 at a size where "auto" rotates q and k first (B1 H4 N2048 GQA 4:2, past the small-problem
    limit) on the portable config, against the float64 reference, with the shifted query positions."""
    from attention_proto.ops.dense import forward as F
    from attention_proto.ops.dense.configs import pick_forward_config
    from attention_proto.ops.dense.reference import attention_reference
    from attention_proto.testing import assert_close_rule, poison_

    dtype, N, D = torch.bfloat16, 2048, 128
    q, k, v = (torch.randn(1, h, N, D, device="cuda", dtype=dtype) for h in (4, 2, 2))
    spec = RopeSpec(layout)
    cfg = pick_forward_config(D, dtype, True, N, "portable")
    out = poison_(torch.empty_like(q))
    F.clear_launch_plans()
    F.flash_attention_forward(q, k, v, causal=True, rope=spec, config=cfg, out=out)
    (plan,) = [p for p in F._PLANS.values() if p.kernel is F._fwd_kernel]
    assert plan.rotate is not None and plan.consts["ROPE"] == 0
    ro, _ = attention_reference(q, k, v, causal=True, rope=spec, device="cuda")
    to, _ = attention_reference(q, k, v, causal=True, rope=spec, compute_dtype=dtype, device="cuda")
    assert not torch.isnan(out).any()
    assert_close_rule(out, to, ro, dtype)
    F.clear_launch_plans()


def test_portable_rope_context_sets_and_restores():
    from attention_proto.ops.dense import forward as F

    before = F.PORTABLE_ROPE
    with F.portable_rope("tile"):
        assert F.PORTABLE_ROPE == "tile"
        with F.portable_rope("rotate"):
            assert F.PORTABLE_ROPE == "rotate"
        assert F.PORTABLE_ROPE == "tile"
    assert F.PORTABLE_ROPE == before
    with pytest.raises(ValueError, match="portable_rope: mode must be one of"):
        with F.portable_rope("fused"):
            pass
    assert F.PORTABLE_ROPE == before


# split scores in the forward (RoPE + softcap on 16-bit inputs; forward.SPLIT_ROPE_SOFTCAP_SCORES) ---------

#: scale 1 at D 256 puts the scores far past a cap of 0.5 (the session-8 GPU fuzz class): the 16-bit
#: rounding of the rotated q/k moves O and the LSE as much as PyTorch's own fp16 error (1.2x / 1.25x of
#: it under the interpreter without the split, 0.29x / ~0 with it)
SATURATED = dict(causal=True, scale=1.0, softcap=0.5, rope=RopeSpec("half"))


def _split_on(monkeypatch, mode):
    from attention_proto.ops.dense import forward as F

    monkeypatch.setattr(F, "SPLIT_ROPE_SOFTCAP_SCORES", True)
    monkeypatch.setattr(F, "PORTABLE_ROPE", mode)
    F.clear_launch_plans()
    return F


@pytest.mark.parametrize("mode", ["tile", "rotate"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_split_scores_saturated_softcap_rope(mode, seed, monkeypatch):
    from attention_proto.ops.dense.reference import attention_reference
    from attention_proto.testing import poison_

    F = _split_on(monkeypatch, mode)
    g = torch.Generator().manual_seed(300 + seed)
    q, k, v = (torch.randn(2, h, n, 256, generator=g).to(torch.float16) for h, n in ((6, 5), (3, 48), (3, 48)))
    q, k, v = (t.to(DEV) for t in (q, k, v))
    mods = dict(SATURATED, alibi_slopes=alibi_slopes(6))
    out, lse = poison_(torch.empty_like(q)), poison_(torch.empty(2, 6, 5, device=q.device))
    F.flash_attention_forward(q, k, v, out=out, lse=lse, **dict(mods, alibi_slopes=mods["alibi_slopes"].to(DEV)))
    (plan,) = F._PLANS.values()
    assert plan.consts.get("SPLIT") is True and plan.kernel is F._fwd_kernel
    assert (plan.rotate is not None) == (mode == "rotate")
    ro, rl = attention_reference(q.cpu(), k.cpu(), v.cpu(), **mods)
    to, tl_ = attention_reference(q.cpu(), k.cpu(), v.cpu(), compute_dtype=torch.float16, **mods)
    for name, a, lo, hi in (("out", out, to, ro), ("lse", lse, tl_, rl)):
        assert not torch.isnan(a).any(), name
        e_ours = (a.cpu().double() - hi).abs().max().item()
        e_torch = (lo.double() - hi).abs().max().item()
        assert e_ours <= 0.5 * e_torch + 1e-4, (name, e_ours, e_torch)
    F.clear_launch_plans()


def test_forward_split_scores_only_where_they_matter(monkeypatch):
    from attention_proto.ops.dense import forward as F

    assert F.SPLIT_ROPE_SOFTCAP_SCORES is False  # opt-in until run on a GPU
    _split_on(monkeypatch, "auto")
    for dtype, mods, want in ((torch.float16, SATURATED, True), (torch.float32, SATURATED, None),
                              (torch.float16, dict(SATURATED, softcap=None), None),
                              (torch.float16, dict(SATURATED, rope=None), None)):
        F.clear_launch_plans()
        q, k, v = qkv(1, 2, 1, 5, 9, 32, dtype)
        F.flash_attention_forward(q, k, v, **mods)
        (plan,) = F._PLANS.values()
        assert plan.consts.get("SPLIT") is want, (dtype, mods)
    F.clear_launch_plans()


def test_forward_split_scores_reject_an_explicit_tma_config(monkeypatch):
    from test_dense_forward import TMA_CFG

    F = _split_on(monkeypatch, "auto")
    q, k, v = qkv(1, 2, 2, 16, 16, 64, torch.float16)
    with pytest.raises(ValueError, match="only the portable kernel has"):
        F.flash_attention_forward(q, k, v, config=TMA_CFG, **SATURATED)
    F.clear_launch_plans()


def test_rotate_into_writes_the_rounding_residues():
    from attention_proto.ops.dense.rope import rope_tables
    from attention_proto.ops.dense.rope import apply_rope_reference
    from attention_proto.ops.dense.rope_kernel import rotate_into

    for D, layout in ((64, "half"), (40, "interleaved")):  # the shuffle kernel and the generic one
        x = rand(2, 3, 37, D, dtype=torch.float16, scale=4.0)
        cos, sin = rope_tables(RopeSpec(layout), D, 64, x.device)
        y, y_lo = torch.empty_like(x), torch.empty_like(x)
        rotate_into(x, y, cos, sin, 5, 1 if layout == "half" else 2, y_lo)
        _, ref = apply_rope_reference(x.cpu().double(), x.cpu().double(), RopeSpec(layout, k_offset=5))
        scale = ref.abs().max().item()
        assert (y.cpu().double() - ref).abs().max().item() <= 2.0 ** -10 * scale  # hi: the rotation, rounded
        # hi + lo carries ~22 bits: the residue is what the rounding dropped
        assert (y.cpu().double() + y_lo.cpu().double() - ref).abs().max().item() <= 2.0 ** -18 * scale
        with pytest.raises(ValueError, match="y_lo must match y"):
            rotate_into(x, y, cos, sin, 5, 1, y_lo[:, :, :5])


def test_varlen_tma_kernel_takes_rope_rotated_first(monkeypatch):
    """The varlen TMA kernel has no RoPE; with q and k rotated first it runs RoPE calls (descriptors
    emulated by the interpreter), and "tile" still refuses them with a clear error."""
    from attention_proto.ops.dense import forward as F
    from attention_proto.ops.dense.reference import attention_reference_varlen
    from attention_proto.testing import assert_close_rule, poison_
    from test_dense_forward import TMA_CFG, _varlen_inputs

    lq, lk = [5, 1, 0, 19, 3, 20], [7, 1, 4, 19, 0, 33]
    q, k, v, cq, ck = _varlen_inputs(lq, lk, 4, 2, 32, torch.float16)
    mods = dict(causal=True, rope=RopeSpec("interleaved"))
    monkeypatch.setattr(F, "PORTABLE_ROPE", "tile")
    F.clear_launch_plans()
    with pytest.raises(ValueError, match="varlen TMA forward path does not apply.*RoPE"):
        F.flash_attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, config=TMA_CFG, **mods)
    monkeypatch.setattr(F, "PORTABLE_ROPE", "rotate")
    F.clear_launch_plans()
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(4, q.shape[0], device=q.device))
    F.flash_attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, config=TMA_CFG, out=out, lse=lse, **mods)
    (plan,) = F._PLANS.values()
    assert plan.kernel.fn.__name__ == "_fwd_tma_varlen_kernel" and plan.rotate.varlen == (6, 20, 33)
    ro, rl = attention_reference_varlen(q.cpu(), k.cpu(), v.cpu(), cq.cpu(), ck.cpu(), **mods)
    to, _ = attention_reference_varlen(q.cpu(), k.cpu(), v.cpu(), cq.cpu(), ck.cpu(), compute_dtype=torch.float16,
                                       **mods)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close_rule(out, to, ro, torch.float16)
    F.clear_launch_plans()


def test_forward_split_scores_refuse_an_explicit_config_over_shared_memory(monkeypatch):
    # a portable tile that fits plain but not with the residue tiles (the Hopper model of configs.fits)
    from attention_proto.ops.dense.configs import FwdConfig, fits

    F = _split_on(monkeypatch, "tile")
    big = FwdConfig(128, 64, 8, 3, "portable")
    assert not fits(big, 128, torch.float16, rope=True, split=True)
    monkeypatch.setattr(F, "interpreter_mode", lambda: False)  # the check models the GPU; the launch is never reached
    q, k, v = qkv(1, 2, 2, 16, 16, 128, torch.float16)
    with pytest.raises(ValueError, match="residue tiles need .* bytes of shared memory"):
        F.flash_attention_forward(q, k, v, config=big, **SATURATED)
    F.clear_launch_plans()
