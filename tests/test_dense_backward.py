"""Dense attention backward (dQ, dK, dV) and DenseAttentionFn.

CPU tests run the Triton kernels in the interpreter at tiny odd shapes and
check the gradients against the float64 reference's autograd with the
gradient error rule (factor 3 of PyTorch's own error in the same dtype).
O and LSE come from the float64 reference, so the backward is tested alone;
the end-to-end tests go through DenseAttentionFn and the forward kernel.
GPU tests (marked ``gpu``) run bf16 at N 1024-4096, determinism and peak memory.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

import attention_proto  # noqa: F401
from attention_proto.ops.dense import backward
from attention_proto.ops.dense.autograd import DenseAttentionFn, dense_attention_autograd
from attention_proto.ops.dense.backward import BwdConfig, bwd_config_candidates, flash_attention_backward, pick_bwd_config
from attention_proto.ops.dense.reference import alibi_slopes, attention_reference, attention_reference_varlen
from attention_proto.ops.dense.rope import RopeSpec, rope_cos_sin
from attention_proto.runtime.device import kernel_device
from attention_proto.testing import assert_close_rule

DEV = kernel_device()
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def make(B, H, Hkv, Nq, Nk, D, dtype, seed=0, Dv=None, device=DEV):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, Hkv, Nk, D, generator=g)
    v = torch.randn(B, Hkv, Nk, Dv, generator=g)
    do = torch.randn(B, H, Nq, Dv, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def ref_grads(q, k, v, do, compute_dtype, device="cpu", varlen=None, **mods):
    """(out, lse, (dq, dk, dv)) of the reference computed in compute_dtype."""
    ins = [t.detach().to(device=device, dtype=compute_dtype).requires_grad_() for t in (q, k, v)]
    if varlen is None:
        out, lse = attention_reference(*ins, compute_dtype=compute_dtype, device=device, **mods)
    else:
        out, lse = attention_reference_varlen(*ins, *[c.cpu() for c in varlen], compute_dtype=compute_dtype, **mods)
    grads = torch.autograd.grad(out, ins, do.to(device=device, dtype=compute_dtype))
    return out.detach(), lse.detach(), grads


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """NaN-fill dq/dk/dv/delta before every kernel run, so that unwritten entries show up."""
    monkeypatch.setattr(backward, "POISON_OUTPUTS", True)


def check_bwd(B, H, Hkv, Nq, Nk, D, dtype, seed=0, Dv=None, config=None, deterministic=True, **mods):
    q, k, v, do = make(B, H, Hkv, Nq, Nk, D, dtype, seed, Dv)
    o64, lse64, g64 = ref_grads(q, k, v, do, torch.float64, **mods)
    _, _, glow = ref_grads(q, k, v, do, dtype, **mods)
    o = o64.to(device=DEV, dtype=dtype)
    lse = lse64.to(device=DEV, dtype=torch.float32)
    ours = flash_attention_backward(do, q, k, v, o, lse, config=config, deterministic=deterministic, **mods)
    for name, a, lo, hi, src in zip(("dq", "dk", "dv"), ours, glow, g64, (q, k, v)):
        assert a.shape == src.shape and a.dtype == src.dtype, (name, a.shape, a.dtype)
        assert torch.isfinite(a).all(), f"{name} has non-finite entries"
        assert_close_rule(a, lo, hi, dtype, factor=3, what=name)
    return ours


# --------------------------------------------------------------------------- shapes, GQA, causal

SHAPES = [
    # B, H, Hkv, Nq, Nk, D, causal
    (1, 1, 1, 1, 1, 40, False),
    (1, 2, 2, 17, 17, 64, True),
    (2, 4, 1, 17, 17, 40, False),  # GQA 4:1
    (1, 4, 1, 97, 97, 64, True),
    (1, 2, 1, 97, 97, 40, False),
    (1, 2, 1, 17, 97, 40, True),  # Nq < Nk (bottom-right causal)
    (1, 2, 2, 97, 17, 64, False),  # Nq > Nk
    (1, 1, 1, 1, 97, 64, True),  # decode-like
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,H,Hkv,Nq,Nk,D,causal", SHAPES)
def test_grads_match_reference(B, H, Hkv, Nq, Nk, D, causal, dtype):
    check_bwd(B, H, Hkv, Nq, Nk, D, dtype, seed=Nq * 7 + D, causal=causal)


def test_value_dim_differs():
    check_bwd(1, 2, 1, 17, 33, 40, torch.float32, Dv=24, causal=True)


def test_other_tile_sizes():
    # dQ tiles unlike dK/dV tiles, and dK/dV query steps of 32 rows
    cfg = BwdConfig(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1, dq_block_m=16, dq_block_n=64)
    check_bwd(1, 2, 1, 45, 70, 40, torch.float32, config=cfg, causal=True, window=(20, -1))


# --------------------------------------------------------------------------- modifiers, one at a time

MODS = {
    "window_left": dict(window=(9, -1)),
    "window_both": dict(window=(5, 3)),
    "window_right": dict(window=(-1, 4)),
    "window_causal": dict(window=(12, 7), causal=True),
    "softcap": dict(softcap=3.0),
    "alibi": dict(alibi_slopes=alibi_slopes(4)),
    "scale": dict(scale=0.3),
    "rope_half": dict(rope=RopeSpec("half")),
    "rope_interleaved": dict(rope=RopeSpec("interleaved", theta=500.0)),
    "rope_offsets": dict(rope=RopeSpec("half", q_offset=3, k_offset=5), causal=True),
    "all": dict(causal=True, window=(11, -1), softcap=5.0, alibi_slopes=alibi_slopes(4),
                rope=RopeSpec("interleaved")),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mod", list(MODS))
def test_modifier(mod, dtype):
    mods = dict(MODS[mod])
    if "alibi_slopes" in mods:
        mods["alibi_slopes"] = mods["alibi_slopes"].to(DEV)
    check_bwd(1, 4, 2, 29, 41, 40, dtype, seed=3, **mods)


def test_rope_tables():
    D = 32
    cos, sin = rope_cos_sin(torch.arange(64), D, 1000.0, torch.float32)
    spec = RopeSpec("half", cos=cos.to(DEV), sin=sin.to(DEV), q_offset=2)
    check_bwd(1, 2, 1, 19, 23, D, torch.float32, rope=spec)


def test_rope_queries_before_first_key():
    # Nq > Nk with the default q offset Nk - Nq < 0: negative positions, still a plain rotation
    check_bwd(1, 2, 2, 30, 9, 40, torch.float32, rope=RopeSpec("half"))


def test_alibi_per_batch_slopes():
    slopes = torch.rand(2, 4, generator=torch.Generator().manual_seed(1)) * 0.5
    q, k, v, do = make(2, 4, 4, 17, 17, 40, torch.float32, 5)
    refs = [ref_grads(q[b:b + 1], k[b:b + 1], v[b:b + 1], do[b:b + 1], torch.float64, alibi_slopes=slopes[b])
            for b in range(2)]
    o = torch.cat([r[0] for r in refs]).float().to(DEV)
    lse = torch.cat([r[1] for r in refs]).float().to(DEV)
    ours = flash_attention_backward(do, q, k, v, o, lse, alibi_slopes=slopes.to(DEV))
    for i, a in enumerate(ours):
        torch.testing.assert_close(a.double().cpu(), torch.cat([r[2][i] for r in refs]), atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------- split scores (rope + softcap)

#: the session-8 GPU fuzz failure's class: scale 1 at D 256 puts scores far past a cap of 0.5, so only
#: the few near 0 carry the gradient, where 1 - tanh^2(s / c) is steep: a 16-bit rounding of the
#: rotated q/k moved dq to 3.6-7.9x PyTorch's bf16 error (fp16 under the interpreter: up to 2.85x
#: over 20 seeds without the split scores, 0.21x with them)
SATURATED = dict(causal=True, scale=1.0, softcap=0.5, rope=RopeSpec("half"))


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "fused"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_scores_saturated_softcap_rope(seed, deterministic):
    # far inside the 3x rule: the split scores are accurate to ~2^-16, PyTorch's to its operands' 2^-11
    q, k, v, do = make(3, 6, 3, 1, 48, 256, torch.float16, seed=100 + seed)
    mods = dict(SATURATED, alibi_slopes=alibi_slopes(6))
    _, _, g64 = ref_grads(q, k, v, do, torch.float64, **mods)
    _, _, glow = ref_grads(q, k, v, do, torch.float16, **mods)
    o, lse = _ref_o_lse(q, k, v, do, **mods)
    mods["alibi_slopes"] = mods["alibi_slopes"].to(DEV)
    ours = flash_attention_backward(do, q, k, v, o, lse, deterministic=deterministic, **mods)
    for name, a, lo, hi in zip(("dq", "dk", "dv"), ours, glow, g64):
        e_ours = (a.double().cpu() - hi).abs().max().item()
        e_torch = (lo.double() - hi).abs().max().item()
        assert e_ours <= 0.75 * e_torch + 1e-3 * max(1.0, hi.abs().max().item()), (name, e_ours, e_torch)


def test_split_scores_reject_explicit_tma_config():
    q, k, v, do = make(1, 2, 2, 16, 16, 64, torch.float16)
    o, lse = _ref_o_lse(q, k, v, do, **SATURATED)
    with pytest.raises(ValueError, match="rope together with softcap"):
        flash_attention_backward(do, q, k, v, o, lse, config=BwdConfig(32, 64, 4, 2, path="tma"), **SATURATED)


def test_split_scores_off_for_fp32_and_without_softcap(monkeypatch):
    # the residues are only made where they matter (16-bit operands of rotated q/k, softcap on)
    seen = []
    real = backward.KERNEL_CACHE.launch

    def spy(kern, grid, *args, **kw):
        # the rope pass writes residues when its third argument (Y_LO) is a tensor
        seen.append((kern.fn.__name__, kw.get("SPLIT"), args[2] is not None))
        return real(kern, grid, *args, **kw)

    monkeypatch.setattr(backward.KERNEL_CACHE, "launch", spy)
    for dtype, mods, want in ((torch.float16, SATURATED, True), (torch.float32, SATURATED, False),
                              (torch.float16, dict(SATURATED, softcap=None), False)):
        seen.clear()
        q, k, v, do = make(1, 2, 1, 5, 9, 32, dtype)
        o, lse = _ref_o_lse(q, k, v, do, **mods)
        flash_attention_backward(do, q, k, v, o, lse, **mods)
        assert {s for n, s, _ in seen if n.startswith("_bwd_d")} == {want}, (dtype, mods, seen)
        assert any(w for n, _, w in seen if n == "_rope_pass") == want


def _ref_o_lse(q, k, v, do, **mods):
    o, lse = attention_reference(q, k, v, **mods)
    return o.to(device=DEV, dtype=q.dtype), lse.to(device=DEV, dtype=torch.float32)


# --------------------------------------------------------------------------- masked rows, determinism, varlen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fully_masked_rows_give_zero_grads(dtype):
    # Nq > Nk causal (bottom-right): rows i < Nq - Nk see no key, their LSE is -inf
    B, H, Nq, Nk = 1, 2, 40, 13
    dq, dk, dv = check_bwd(B, H, 1, Nq, Nk, 40, dtype, causal=True)
    masked = Nq - Nk
    assert torch.count_nonzero(dq[:, :, :masked]) == 0
    # the same rows with poisoned do / o contribute nothing to dk, dv
    q, k, v, do = make(B, H, 1, Nq, Nk, 40, dtype, 1)
    o, lse = _ref_o_lse(q, k, v, do, causal=True)
    assert torch.isinf(lse[:, :, :masked]).all()
    base = flash_attention_backward(do, q, k, v, o, lse, causal=True)
    do2 = do.clone()
    do2[:, :, :masked] = 1e4  # huge but finite: any leak of p != 0 would show
    o2 = o.clone()
    o2[:, :, :masked] = 0
    other = flash_attention_backward(do2, q, k, v, o2, lse, causal=True)
    for a, b in zip(base[1:], other[1:]):
        assert torch.equal(a, b)


def test_window_rows_without_keys():
    # a window that leaves the first rows without keys (Nq > Nk, window entirely right of them)
    check_bwd(1, 2, 1, 33, 12, 40, torch.float32, window=(2, 0))


@pytest.mark.parametrize("mods", [dict(causal=True), dict(window=(6, 2), softcap=4.0, rope=RopeSpec("half"))],
                         ids=["causal", "window_softcap_rope"])
def test_deterministic_is_bitwise_reproducible(mods):
    q, k, v, do = make(1, 4, 2, 45, 45, 40, torch.float16, 2)
    o, lse = _ref_o_lse(q, k, v, do, **mods)
    first = flash_attention_backward(do, q, k, v, o, lse, deterministic=True, **mods)
    second = flash_attention_backward(do, q, k, v, o, lse, deterministic=True, **mods)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fast_mode_atomics(dtype):
    check_bwd(1, 4, 2, 37, 50, 40, dtype, deterministic=False, causal=True)
    check_bwd(1, 2, 1, 21, 21, 32, dtype, deterministic=False, rope=RopeSpec("interleaved"), softcap=2.0)


@pytest.mark.parametrize("mods", [dict(causal=True), dict(window=(4, 1), rope=RopeSpec("half"))], ids=["causal", "window_rope"])
def test_varlen(mods):
    torch.manual_seed(7)
    lq, lk = [5, 0, 17, 33], [9, 4, 17, 20]
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    H, Hkv, D = 4, 2, 40
    q = torch.randn(sum(lq), H, D)
    k = torch.randn(sum(lk), Hkv, D)
    v = torch.randn(sum(lk), Hkv, D)
    do = torch.randn(sum(lq), H, D)
    o64, lse64, g64 = ref_grads(q, k, v, do, torch.float64, varlen=(cu_q, cu_k), **mods)
    _, _, g32 = ref_grads(q, k, v, do, torch.float32, varlen=(cu_q, cu_k), **mods)
    dev = [t.to(DEV) for t in (q, k, v, do)]
    ours = flash_attention_backward(dev[3], *dev[:3], o64.float().to(DEV), lse64.float().to(DEV),
                                    cu_seqlens_q=cu_q.to(DEV), cu_seqlens_k=cu_k.to(DEV),
                                    max_seqlen_q=max(lq), max_seqlen_k=max(lk), **mods)
    for name, a, lo, hi in zip(("dq", "dk", "dv"), ours, g32, g64):
        assert_close_rule(a, lo, hi, torch.float32, factor=3, what=name)


# --------------------------------------------------------------------------- TMA path (descriptors emulated by the interpreter)

TMA = dict(path="tma")
TMA_CFGS = {
    "fused": BwdConfig(16, 32, 1, 2, **TMA),
    "split": BwdConfig(16, 32, 1, 2, fused=False, **TMA),
    # dK/dV steps longer than its key block, dQ tiles unlike the dK/dV ones
    "tiles": BwdConfig(32, 16, 1, 3, dq_block_m=16, dq_block_n=32, **TMA),
    "square": BwdConfig(16, 16, 1, 2, **TMA),
}
TMA_SHAPES = [
    # B, H, Hkv, Nq, Nk, D, causal
    (1, 2, 2, 37, 37, 64, True),
    (1, 4, 1, 29, 41, 32, False),  # GQA 4:1, Nq < Nk
    (1, 2, 1, 45, 20, 32, True),  # Nq > Nk: the first rows see no key
    (2, 2, 2, 17, 50, 32, True),
    (1, 1, 1, 1, 33, 32, True),  # decode-like
]


@pytest.mark.parametrize("cfg", list(TMA_CFGS))
@pytest.mark.parametrize("B,H,Hkv,Nq,Nk,D,causal", TMA_SHAPES)
def test_tma_grads(B, H, Hkv, Nq, Nk, D, causal, cfg):
    check_bwd(B, H, Hkv, Nq, Nk, D, torch.float16, seed=Nq + Nk, config=TMA_CFGS[cfg], causal=causal)


def _tma_takes(mods, monkeypatch):
    """RoPE + softcap on 16-bit inputs run on the portable kernels (split scores); the TMA kernels still
    take them with the split off, so their modifier tests turn it off there."""
    if mods.get("rope") is not None and mods.get("softcap"):
        monkeypatch.setattr(backward, "SPLIT_ROPE_SOFTCAP_SCORES", False)


@pytest.mark.parametrize("mod", list(MODS) + ["window_rows_without_keys"])
def test_tma_modifier(mod, monkeypatch):
    mods = dict(MODS.get(mod, dict(window=(2, 0))))
    _tma_takes(mods, monkeypatch)
    if "alibi_slopes" in mods:
        mods["alibi_slopes"] = mods["alibi_slopes"].to(DEV)
    Nq, Nk = (33, 12) if mod == "window_rows_without_keys" else (29, 41)
    check_bwd(1, 4, 2, Nq, Nk, 32, torch.float16, seed=4, config=TMA_CFGS["fused"], **mods)


def test_tma_fully_masked_rows_and_bitwise():
    B, H, Nq, Nk, D = 1, 2, 40, 13, 32
    cfg = TMA_CFGS["fused"]
    dq, _, _ = check_bwd(B, H, 1, Nq, Nk, D, torch.float16, config=cfg, causal=True)
    masked = Nq - Nk
    assert torch.count_nonzero(dq[:, :, :masked]) == 0
    q, k, v, do = make(B, H, 1, Nq, Nk, D, torch.float16, 1)
    o, lse = _ref_o_lse(q, k, v, do, causal=True)
    base = flash_attention_backward(do, q, k, v, o, lse, causal=True, config=cfg)
    again = flash_attention_backward(do, q, k, v, o, lse, causal=True, config=cfg)
    assert all(torch.equal(a, b) for a, b in zip(base, again))
    do2 = do.clone()
    do2[:, :, :masked] = 1e4  # huge but finite: any leak of p != 0 would show
    o2 = o.clone()
    o2[:, :, :masked] = 0
    other = flash_attention_backward(do2, q, k, v, o2, lse, causal=True, config=cfg)
    for a, b in zip(base[1:], other[1:]):
        assert torch.equal(a, b)


def test_tma_strided_views():
    # BSHD views (transposed) for q/k/v, a non-contiguous dO (copied for its descriptor)
    cfg = TMA_CFGS["fused"]
    q, k, v, do = make(1, 2, 1, 21, 27, 32, torch.float16, 9)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    do_nc = do.transpose(2, 3).contiguous().transpose(2, 3)
    o, lse = _ref_o_lse(q, k, v, do, causal=True)
    ref = flash_attention_backward(do, q, k, v, o, lse, causal=True, config=cfg)
    ours = flash_attention_backward(do_nc, qt, kt, vt, o, lse, causal=True, config=cfg)
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)


def test_tma_supports_and_errors():
    from attention_proto.ops.dense.backward_tma import supports

    q, k, v, do = make(1, 2, 1, 8, 8, 32, torch.float16)
    assert supports(q, k, v, check_device=False) == []
    r = " | ".join(supports(q.float(), k.float(), v.float(), check_device=False))
    assert "float16 and bfloat16" in r
    q40, k40, v40, _ = make(1, 2, 1, 8, 8, 40, torch.float16)
    assert "head dim 40" in " | ".join(supports(q40, k40, v40, check_device=False))
    assert "varlen" in " | ".join(supports(q[0], k[0], v[0], varlen=True, check_device=False))
    assert "last-dim stride" in " | ".join(supports(q.transpose(2, 3), k, v, check_device=False))
    kb = torch.randn(1, 1, 8, 32, dtype=torch.float16).expand(1, 2, 8, 32)  # head stride 0: no descriptor
    assert "aligned" in " | ".join(supports(q, kb, kb, check_device=False))
    o, lse = _ref_o_lse(q40, k40, v40, None)
    with pytest.raises(ValueError, match="TMA backward path.*head dim 40"):
        flash_attention_backward(torch.randn_like(o), q40, k40, v40, o, lse, config=TMA_CFGS["fused"])
    with pytest.raises(ValueError, match="path must be one of"):
        BwdConfig(path="wgmma")
    with pytest.raises(TypeError, match="fused must be a bool"):
        BwdConfig(path="tma", fused=1)


def test_tma_config_picker():
    from attention_proto.ops.dense.backward import tma_bwd_config_candidates

    for d in (32, 64, 128):
        cands = tma_bwd_config_candidates(d)
        assert cands and all(c.path == "tma" for c in cands)
        assert len({c.label for c in cands}) == len(cands)
    assert "tma 64x128/128x64 w8 s3" == cands[0].label
    assert BwdConfig(path="tma", fused=False).label.endswith(" split")


# --------------------------------------------------------------------------- autograd Function


def _stub_forward(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=None, alibi_slopes=None,
                  rope=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, **_):
    assert cu_seqlens_q is None
    o, lse = attention_reference(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                                 alibi_slopes=alibi_slopes, rope=rope)
    return o.to(device=q.device, dtype=q.dtype), lse.to(device=q.device, dtype=torch.float32)


def _autograd_check(monkeypatch=None):
    if monkeypatch is not None:  # the reference as the forward: tests this module's plumbing alone
        monkeypatch.setitem(sys.modules, "attention_proto.ops.dense.forward",
                            types.SimpleNamespace(flash_attention_forward=_stub_forward))
    mods = dict(causal=True, softcap=4.0, rope=RopeSpec("half"))
    q, k, v, do = make(1, 4, 2, 23, 31, 40, torch.float32, 11)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, lse = dense_attention_autograd(*leaves, mods["causal"], None, (-1, -1), mods["softcap"], None,
                                            mods["rope"], None, None, None, None, True)
    assert not lse.requires_grad
    # q, k, v, out, lse only: nothing of size Nq x Nk
    assert len(saved) == 5 and max(saved) <= max(t.numel() for t in (q, k, v, out))
    out.backward(do)
    _, _, g64 = ref_grads(q, k, v, do, torch.float64, **mods)
    _, _, g32 = ref_grads(q, k, v, do, torch.float32, **mods)
    for name, leaf, lo, hi in zip(("dq", "dk", "dv"), leaves, g32, g64):
        assert_close_rule(leaf.grad, lo, hi, torch.float32, factor=3, what=name)


def test_autograd_function_with_reference_forward(monkeypatch):
    _autograd_check(monkeypatch)


@pytest.mark.parametrize("delta_dot", [True, False])
@pytest.mark.parametrize("varlen", [False, True])
def test_fp32_delta_by_dot_is_correct(monkeypatch, varlen, delta_dot):
    # both float32 deltas (DELTA_DOT_FP32: the dot-formed default, and rowsum(dO * O)) keep every gradient
    # within the rule (the single-key rounding they differ in shows only on a GPU: test_gpu_fp32_*)
    monkeypatch.setattr(backward, "DELTA_DOT_FP32", delta_dot)
    if varlen:
        check_bwd_varlen_fp32_delta()
    else:
        check_bwd(1, 2, 1, 37, 21, 40, torch.float32, causal=True)
        check_bwd(1, 2, 2, 5, 1, 24, torch.float32)


def check_bwd_varlen_fp32_delta():
    from attention_proto.ops.dense.interface import attention_varlen

    g = torch.Generator().manual_seed(3)
    lens = [5, 1, 12]
    T = sum(lens)
    cu = torch.tensor([0, 5, 6, 18], dtype=torch.int32, device=DEV)
    q, k, v, do = (torch.randn(T, 2, 24, generator=g).to(DEV) for _ in range(4))
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention_varlen(*ins, cu, cu, causal=True)
    grads = torch.autograd.grad(out, ins, do)
    for (s0, s1) in ((0, 5), (5, 6), (6, 18)):
        sl = [t[s0:s1].transpose(0, 1)[None] for t in (q, k, v, do)]
        _, _, g64 = ref_grads(*sl, torch.float64, causal=True)
        _, _, g32 = ref_grads(*sl, torch.float32, causal=True)
        for name, ours, r64, r32 in zip(("dq", "dk", "dv"), grads, g64, g32):
            assert_close_rule(ours[s0:s1].transpose(0, 1)[None], r32, r64, torch.float32, factor=3, what=name)


def test_autograd_function_end_to_end():
    pytest.importorskip("attention_proto.ops.dense.forward", reason="forward kernel not written yet")
    _autograd_check()


def test_autograd_lse_only_output(monkeypatch):
    monkeypatch.setitem(sys.modules, "attention_proto.ops.dense.forward",
                        types.SimpleNamespace(flash_attention_forward=_stub_forward))
    q, k, v, _ = make(1, 1, 1, 5, 5, 16, torch.float32)
    q.requires_grad_()
    out, lse = DenseAttentionFn.apply(q, k, v, False, None, (-1, -1), None, None, None, None, None, None, None, True)
    (out.sum() * 0 + out.sum()).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("layout,deterministic", [("bhsd", True), ("bshd", False)])
def test_public_attention_gradients(layout, deterministic):
    """attention() with requires_grad goes through DenseAttentionFn (both layouts, both backward modes)."""
    pytest.importorskip("attention_proto.ops.dense.forward", reason="forward kernel not written yet")
    from attention_proto.ops.dense.interface import attention

    mods = dict(causal=True, window=(13, -1), alibi_slopes=alibi_slopes(4).to(DEV))
    q, k, v, do = make(1, 4, 2, 27, 35, 40, torch.float16, 21)
    x = [t.transpose(1, 2).contiguous() if layout == "bshd" else t.clone() for t in (q, k, v)]
    x = [t.requires_grad_() for t in x]
    out = attention(*x, layout=layout, deterministic=deterministic, **mods)
    out.backward(do.transpose(1, 2) if layout == "bshd" else do)
    grads = [t.grad.transpose(1, 2) if layout == "bshd" else t.grad for t in x]
    _, _, g64 = ref_grads(q, k, v, do, torch.float64, **mods)
    _, _, glow = ref_grads(q, k, v, do, torch.float16, **mods)
    for name, a, lo, hi in zip(("dq", "dk", "dv"), grads, glow, g64):
        assert_close_rule(a, lo, hi, torch.float16, factor=3, what=name)


def test_public_attention_varlen_gradients():
    pytest.importorskip("attention_proto.ops.dense.forward", reason="forward kernel not written yet")
    from attention_proto.ops.dense.interface import attention_varlen

    lq, lk = [7, 19, 0, 12], [7, 25, 3, 12]
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(9)
    q, do = torch.randn(sum(lq), 4, 32, generator=g), torch.randn(sum(lq), 4, 32, generator=g)
    k, v = torch.randn(sum(lk), 1, 32, generator=g), torch.randn(sum(lk), 1, 32, generator=g)
    mods = dict(causal=True, softcap=6.0, rope=RopeSpec("interleaved"))
    x = [t.clone().to(DEV).requires_grad_() for t in (q, k, v)]
    out = attention_varlen(*x, cu_q.to(DEV), cu_k.to(DEV), deterministic=True, **mods)
    out.backward(do.to(DEV))
    _, _, g64 = ref_grads(q, k, v, do, torch.float64, varlen=(cu_q, cu_k), **mods)
    _, _, g32 = ref_grads(q, k, v, do, torch.float32, varlen=(cu_q, cu_k), **mods)
    for name, leaf, lo, hi in zip(("dq", "dk", "dv"), x, g32, g64):
        assert_close_rule(leaf.grad, lo, hi, torch.float32, factor=3, what=name)


# --------------------------------------------------------------------------- input checks, configs


def test_typed_errors():
    q, k, v, do = make(1, 2, 1, 8, 8, 16, torch.float32)
    o, lse = _ref_o_lse(q, k, v, do)
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attention_backward(do.half(), q, k, v, o, lse)
    with pytest.raises(TypeError, match="lse"):
        flash_attention_backward(do, q, k, v, o, lse.double())
    with pytest.raises(ValueError, match="lse must have shape"):
        flash_attention_backward(do, q, k, v, o, lse[:, :, :4])
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        flash_attention_backward(do, q, k.expand(1, 3, 8, 16), v.expand(1, 3, 8, 16), o, lse)
    with pytest.raises(ValueError, match="dimensions"):
        flash_attention_backward(do[0], q, k, v, o, lse)
    with pytest.raises(ValueError, match="given together"):
        flash_attention_backward(do, q, k, v, o, lse, cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="even head dim"):
        q3, k3, v3, do3 = make(1, 1, 1, 4, 4, 15, torch.float32)
        flash_attention_backward(do3, q3, k3, v3, *_ref_o_lse(q3, k3, v3, None), rope=RopeSpec())
    with pytest.raises(ValueError, match="power of two"):
        BwdConfig(BLOCK_M=24)


def test_config_picker():
    for d in (40, 64, 128, 256):
        assert bwd_config_candidates(d)
        cfg = pick_bwd_config(d, torch.float16, 1024, 1024)
        assert isinstance(cfg, BwdConfig)


# --------------------------------------------------------------------------- GPU (bf16, large N, memory)


@gpu
@needs_cuda
@pytest.mark.parametrize("N,D,causal", [(1024, 64, True), (2048, 128, False), (4096, 128, True), (1024, 256, True)])
def test_gpu_bf16_large(N, D, causal):
    B, H, Hkv = 1, 4, 2
    q, k, v, do = make(B, H, Hkv, N, N, D, torch.bfloat16, 0, device="cuda")
    o64, lse64, g64 = ref_grads(q, k, v, do, torch.float64, device="cuda", causal=causal)
    _, _, glow = ref_grads(q, k, v, do, torch.bfloat16, device="cuda", causal=causal)
    ours = flash_attention_backward(do, q, k, v, o64.bfloat16(), lse64.float(), causal=causal)
    for name, a, lo, hi in zip(("dq", "dk", "dv"), ours, glow, g64):
        assert_close_rule(a, lo, hi, torch.bfloat16, factor=3, what=name)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("mod", list(MODS) + ["gqa_varlen"])
def test_gpu_modifiers_compile_and_match(mod, dtype):
    if mod == "gqa_varlen":
        cu = torch.tensor([0, 300, 300, 1000], dtype=torch.int32, device="cuda")
        q = torch.randn(1000, 8, 64, device="cuda", dtype=dtype)
        k, v = (torch.randn(1000, 2, 64, device="cuda", dtype=dtype) for _ in range(2))
        do = torch.randn_like(q)
        o64, lse64, g64 = ref_grads(q, k, v, do, torch.float64, varlen=(cu, cu), causal=True)
        _, _, glow = ref_grads(q, k, v, do, dtype, varlen=(cu, cu), causal=True)
        ours = flash_attention_backward(do, q, k, v, o64.to("cuda", dtype), lse64.float().cuda(), causal=True,
                                        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=700, max_seqlen_k=700)
    else:
        mods = dict(MODS[mod])
        if "alibi_slopes" in mods:
            mods["alibi_slopes"] = mods["alibi_slopes"].cuda()
        q, k, v, do = make(2, 4, 2, 333, 517, 80, dtype, 1, device="cuda")
        o64, lse64, g64 = ref_grads(q, k, v, do, torch.float64, device="cuda", **mods)
        _, _, glow = ref_grads(q, k, v, do, dtype, device="cuda", **mods)
        ours = flash_attention_backward(do, q, k, v, o64.to(dtype), lse64.float(), **mods)
    for name, a, lo, hi in zip(("dq", "dk", "dv"), ours, glow, g64):
        assert_close_rule(a, lo, hi, dtype, factor=3, what=name)


@gpu
@needs_cuda
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_deterministic_bitwise(D):
    q, k, v, do = make(2, 8, 2, 2048, 2048, D, torch.bfloat16, 3, device="cuda")
    o, lse = attention_reference(q, k, v, causal=True, compute_dtype=torch.float32, device="cuda")
    o, lse = o.bfloat16(), lse.float()
    runs = [flash_attention_backward(do, q, k, v, o, lse, causal=True, deterministic=True) for _ in range(5)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@gpu
@needs_cuda
def test_gpu_fast_mode_matches():
    q, k, v, do = make(1, 4, 1, 1024, 1024, 128, torch.bfloat16, 4, device="cuda")
    o64, lse64, g64 = ref_grads(q, k, v, do, torch.float64, device="cuda", causal=True)
    _, _, glow = ref_grads(q, k, v, do, torch.bfloat16, device="cuda", causal=True)
    # the portable config: with config=None the (deterministic) TMA path runs on Hopper in both modes
    ours = flash_attention_backward(do, q, k, v, o64.bfloat16(), lse64.float(), causal=True, deterministic=False,
                                    config=bwd_config_candidates(128)[0])
    for name, a, lo, hi in zip(("dq", "dk", "dv"), ours, glow, g64):
        assert_close_rule(a, lo, hi, torch.bfloat16, factor=3, what=name)


@gpu
@needs_cuda
@pytest.mark.xfail(strict=True, reason="known gap (docs/reliability.md): through our own forward's O and LSE, "
                   "whose scores use the rounded rotated q/k, one of 120 gradient checks exceeds the 3x rule")
def test_gpu_split_scores_saturated_through_our_forward():
    """scripts/probe_softcap_grad.py's "fuzz s3" config, its 40 seeds: scale 1 at D 256, softcap 0.5, ALiBi,
    RoPE, Nq 1 (H100, session 8: worst dq 2.74x PyTorch's bf16 error, 7.89x before the split scores;
    0.43x from the float64 O/LSE)."""
    _saturated_through_our_forward()


def _saturated_through_our_forward():
    B, H, Hkv, Nq, Nk, D, dt = 3, 6, 3, 1, 48, 256, torch.bfloat16
    mods = dict(causal=True, scale=1.0, softcap=0.5, rope=RopeSpec("half"))
    for seed in range(40):
        g = torch.Generator(device="cuda").manual_seed(1000 + seed)
        q, k, v, do = (torch.randn(s, generator=g, device="cuda").to(dt)
                       for s in ((B, H, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D), (B, H, Nq, D)))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention_proto.attention(*leaves, layout="bhsd", alibi_slopes=True, **mods)
        ours = torch.autograd.grad(out, leaves, do)
        _, _, g64 = ref_grads(q, k, v, do, torch.float64, device="cuda", alibi_slopes=alibi_slopes(H), **mods)
        _, _, glow = ref_grads(q, k, v, do, dt, device="cuda", alibi_slopes=alibi_slopes(H), **mods)
        for name, a, lo, hi in zip(("dq", "dk", "dv"), ours, glow, g64):
            assert_close_rule(a, lo, hi, dt, factor=3, what=f"{name} (seed {1000 + seed})")


@gpu
@needs_cuda
def test_gpu_split_scores_saturated_through_our_split_forward(monkeypatch):
    """The same 40 seeds with the forward's split scores on (forward.SPLIT_ROPE_SOFTCAP_SCORES, opt-in):
    O and the LSE then come from the scores the backward uses, which should close the gap above
    (predicted from the probe: the backward from the float64 O/LSE stayed at 0.43x). Not yet run on a GPU."""
    from attention_proto.ops.dense import forward as F

    monkeypatch.setattr(F, "SPLIT_ROPE_SOFTCAP_SCORES", True)
    F.clear_launch_plans()
    _saturated_through_our_forward()
    F.clear_launch_plans()


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mod", list(MODS) + ["gqa", "plain"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_tma_modifiers(mod, dtype, D, monkeypatch):
    """The TMA path (default on Hopper) at ragged sizes with every modifier."""
    from attention_proto.ops.dense.backward import tma_bwd_config_candidates

    mods = dict(MODS.get(mod, dict(causal=True) if mod == "gqa" else {}))
    _tma_takes(mods, monkeypatch)
    if "alibi_slopes" in mods:
        mods["alibi_slopes"] = mods["alibi_slopes"].cuda()
    H, Hkv = (8, 2) if mod == "gqa" else (4, 2)
    q, k, v, do = make(2, H, Hkv, 333, 517, D, dtype, 1, device="cuda")
    o64, lse64, g64 = ref_grads(q, k, v, do, torch.float64, device="cuda", **mods)
    _, _, glow = ref_grads(q, k, v, do, dtype, device="cuda", **mods)
    cfg = tma_bwd_config_candidates(D)[0]
    ours = flash_attention_backward(do, q, k, v, o64.to(dtype), lse64.float(), config=cfg, **mods)
    for name, a, lo, hi in zip(("dq", "dk", "dv"), ours, glow, g64):
        assert_close_rule(a, lo, hi, dtype, factor=3, what=name)


@gpu
@needs_cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_tma_candidates_match_and_are_bitwise(D, causal):
    from attention_proto.ops.dense.backward import tma_bwd_config_candidates

    q, k, v, do = make(1, 4, 4, 1000, 1000, D, torch.bfloat16, 2, device="cuda")
    o64, lse64, g64 = ref_grads(q, k, v, do, torch.float64, device="cuda", causal=causal)
    _, _, glow = ref_grads(q, k, v, do, torch.bfloat16, device="cuda", causal=causal)
    for cfg in tma_bwd_config_candidates(D):
        ours = flash_attention_backward(do, q, k, v, o64.bfloat16(), lse64.float(), causal=causal, config=cfg)
        again = flash_attention_backward(do, q, k, v, o64.bfloat16(), lse64.float(), causal=causal, config=cfg)
        for name, a, b, lo, hi in zip(("dq", "dk", "dv"), ours, again, glow, g64):
            assert_close_rule(a, lo, hi, torch.bfloat16, factor=3, what=f"{cfg.label} {name}")
            assert torch.equal(a, b), f"{cfg.label} {name} not bitwise reproducible"


@gpu
@needs_cuda
def test_gpu_default_follows_tma_switch_on_hopper(monkeypatch):
    """With TMA_BACKWARD_DEFAULT on, dispatch takes the TMA backward on Hopper (the switch stays off
    until a GPU run has checked and timed that kernel)."""
    from attention_proto.ops.dense import backward as backward_mod
    from attention_proto.ops.dense import backward_tma

    monkeypatch.setattr(backward_mod, "TMA_BACKWARD_DEFAULT", True)
    from attention_proto.runtime.cache import KERNEL_CACHE

    q, k, v, do = make(1, 2, 2, 256, 256, 128, torch.bfloat16, 3, device="cuda")
    if backward_tma.supports(q, k, v):
        pytest.skip("not a Hopper GPU")
    o, lse = attention_reference(q, k, v, causal=True, compute_dtype=torch.float32, device="cuda")
    names = []
    launch = KERNEL_CACHE.launch

    def spy(kernel, grid, *a, **kw):
        names.append(kernel.fn.__name__)
        return launch(kernel, grid, *a, **kw)

    KERNEL_CACHE.launch = spy
    try:
        flash_attention_backward(do, q, k, v, o.bfloat16(), lse.float(), causal=True)
    finally:
        KERNEL_CACHE.launch = launch
    assert "_bwd_tma_kernel" in names, names


@gpu
@needs_cuda
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_peak_memory_is_linear_in_n(deterministic):
    # an N x N fp16 buffer would be 512 MiB at N = 16384; everything O(N * D) here is ~2 MiB a tensor
    N, D = 16384, 64
    q, k, v, do = make(1, 1, 1, N, N, D, torch.float16, 5, device="cuda")
    o = torch.randn_like(q)
    lse = torch.randn(1, 1, N, device="cuda") + 10.0
    flash_attention_backward(do, q, k, v, o, lse, causal=True, deterministic=deterministic)  # compile first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = flash_attention_backward(do, q, k, v, o, lse, causal=True, deterministic=deterministic)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * 2**20, f"backward allocated {extra / 2**20:.1f} MiB at N={N}"
    assert all(torch.isfinite(g).all() for g in grads)


@gpu
@needs_cuda
def test_gpu_autograd_end_to_end_bf16():
    pytest.importorskip("attention_proto.ops.dense.forward", reason="forward kernel not written yet")
    q, k, v, do = make(1, 8, 2, 2048, 2048, 128, torch.bfloat16, 6, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = dense_attention_autograd(*leaves, True, None, (-1, -1), None, None, None, None, None, None, None, True)
    out.backward(do)
    _, _, g64 = ref_grads(q, k, v, do, torch.float64, device="cuda", causal=True)
    _, _, glow = ref_grads(q, k, v, do, torch.bfloat16, device="cuda", causal=True)
    for name, leaf, lo, hi in zip(("dq", "dk", "dv"), leaves, glow, g64):
        assert_close_rule(leaf.grad, lo, hi, torch.bfloat16, factor=3, what=name)


# --------------------------------------------------------------------------- sm_90 compile check without a GPU

_SM90_SCRIPT = r'''
import os, re, subprocess, sys, tempfile
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class _Sm90:  # just enough driver for JITFunction.warmup: compile for sm_90, never launch
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")


driver.set_active(_Sm90())
from attention_proto.ops.dense import backward as bw
from attention_proto.ops.dense.rope import RopeSpec

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
compiled = []
bw.KERNEL_CACHE.launch = lambda kern, grid, *a, **kw: compiled.append((kern.fn.__name__, kern.warmup(*a, grid=grid, **kw)))
for D in (64, 128):
    for det in (True, False):
        q = torch.zeros(1, 4, 256, D, dtype=torch.bfloat16)
        k = torch.zeros(1, 2, 256, D, dtype=torch.bfloat16)
        mods = dict(causal=True, softcap=30.0, rope=RopeSpec("half")) if det else dict(causal=True)
        bw.flash_attention_backward(q, q, k, k, q, torch.zeros(1, 4, 256), deterministic=det,
                                    config=bw.bwd_config_candidates(D)[0], **mods)
    for causal in (True, False):  # the TMA default (H == Hkv, as at the bar shapes)
        q = torch.zeros(1, 4, 256, D, dtype=torch.bfloat16)
        bw.flash_attention_backward(q, q, q, q, q, torch.zeros(1, 4, 256), causal=causal,
                                    config=bw.tma_bwd_config_candidates(D)[0])
for name, kern in compiled:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kern.asm["ptx"])
    out = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
    spill = re.findall(r"(\d+) bytes spill stores", out.stderr + out.stdout)
    print(name, kern.metadata.shared, spill[-1] if spill else "?", int("C7515" in out.stderr + out.stdout))
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills():
    """Compile (no launch) the default tiles for Hopper on the CPU and read ptxas' spill counts."""
    import os
    import subprocess

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    assert len(rows) >= 12 and any(r[0] == "_bwd_tma_kernel" for r in rows), out.stdout
    for name, smem, spill, serialized in rows:
        assert int(smem) <= 227 * 1024, (name, smem)
        assert spill == "0", f"{name} spills {spill} bytes"
        if name == "_bwd_tma_kernel":  # C7515: ptxas put a wait after every wgmma
            assert serialized == "0", f"{name}: ptxas serialized its wgmma instructions"


def _single_key_grads(monkeypatch, delta_dot: bool, seed: int):
    # one key per row: the float64 and PyTorch float32 gradients of q and k are exactly 0 (P = 1)
    monkeypatch.setattr(backward, "DELTA_DOT_FP32", delta_dot)
    q, k, v, do = make(1, 8, 2, 240, 1, 80, torch.float32, seed=seed)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = dense_attention_autograd(*ins, causal=False, scale=1.0)
    dq, dk, _ = torch.autograd.grad(out, ins, do)
    return dq.abs().max().item(), dk.abs().max().item()


@gpu
@needs_cuda
def test_gpu_fp32_delta_by_dot_reduces_single_key_error(monkeypatch):
    # session 5 on the H100 (seed 1318): rowsum delta max |dq| 2.4e-5, |dk| 1.4e-4; dot delta 8.4e-6, 2.6e-5
    for seed in (1318, 7, 2024):
        rowsum = _single_key_grads(monkeypatch, False, seed)
        dot = _single_key_grads(monkeypatch, True, seed)
        print(f"seed {seed}: rowsum delta max |dq|, |dk| {rowsum[0]:.3e} {rowsum[1]:.3e}; "
              f"dot delta {dot[0]:.3e} {dot[1]:.3e}")
        assert dot[0] <= rowsum[0] and dot[1] <= rowsum[1]


@gpu
@needs_cuda
def test_gpu_fp32_single_key_exact(monkeypatch):
    dq, dk = _single_key_grads(monkeypatch, backward.DELTA_DOT_FP32, 1318)
    assert dq == 0.0 and dk == 0.0
