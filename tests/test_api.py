"""The typed API: Attention[Q, K, V] implementations, attention()/explain(), backends by name, errors."""
from __future__ import annotations

import pytest
import torch

import attention_proto  # noqa: F401
from attention_proto import api
from attention_proto.api import (Attention, DenseAttention, DenseTensor, PackedTensor, PagedDecodeAttention, PagedKV,
                                 VarlenAttention)
from attention_proto.ops.dense.reference import attention_reference, attention_reference_varlen
from attention_proto.ops.dense.rope import RopeSpec
from attention_proto.runtime.device import interpreter_mode
from attention_proto.testing import assert_close_rule, poison_

DEV = "cpu" if interpreter_mode() else "cuda"
GEN = torch.Generator().manual_seed(1234)


def rnd(*shape, dtype=torch.float16, grad=False):
    t = torch.randn(*shape, generator=GEN).to(DEV, dtype)
    return t.requires_grad_(grad)


def qkv(B=2, H=4, Hkv=2, N=13, Nk=19, D=32, dtype=torch.float16, grad=False):
    return rnd(B, H, N, D, dtype=dtype, grad=grad), rnd(B, Hkv, Nk, D, dtype=dtype, grad=grad), \
        rnd(B, Hkv, Nk, D, dtype=dtype, grad=grad)


def check(out, q, k, v, dtype, factor=2.0, **mods):
    if mods.get("alibi_slopes") is True:
        from attention_proto.ops.dense.reference import alibi_slopes

        mods["alibi_slopes"] = alibi_slopes(q.shape[1])
    ref, _ = attention_reference(q.detach(), k.detach(), v.detach(), **mods)
    low, _ = attention_reference(q.detach(), k.detach(), v.detach(), compute_dtype=dtype, device=q.device, **mods)
    assert_close_rule(out, low, ref, dtype, factor)


@pytest.mark.parametrize("mods", [
    dict(causal=True),
    dict(causal=True, window=(6, -1), softcap=7.5),
    dict(alibi_slopes=True, scale=0.3),
    dict(causal=True, rope=RopeSpec(layout="half")),
])
def test_attention_matches_reference(mods):
    q, k, v = qkv()
    out = api.attention(q, k, v, **mods)
    assert out.shape == q.shape and out.dtype == q.dtype
    check(out, q, k, v, torch.float16, **mods)


def test_bshd_layout_and_protocol_objects():
    q, k, v = qkv(dtype=torch.float32)
    attn = DenseAttention(causal=True, layout="bshd")
    assert isinstance(attn, Attention)
    out = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert out.shape == (2, 13, 4, 32)
    check(out.transpose(1, 2), q, k, v, torch.float32, causal=True)
    out2 = DenseAttention(causal=True)(DenseTensor(q), DenseTensor(k.transpose(1, 2), "bshd"), DenseTensor(v))
    check(out2, q, k, v, torch.float32, causal=True)


def test_gradients_through_the_custom_op():
    q, k, v = qkv(dtype=torch.float32, grad=True)
    mods = dict(causal=True, window=(5, -1), softcap=6.0)
    out = api.attention(q, k, v, **mods)
    do = rnd(*out.shape, dtype=torch.float32)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, **mods)
    g64 = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    q32, k32, v32 = (t.detach().requires_grad_(True) for t in (q, k, v))
    low, _ = attention_reference(q32, k32, v32, compute_dtype=torch.float32, **mods)
    g32 = torch.autograd.grad(low, (q32, k32, v32), do)
    for ours, lo, hi, name in zip((dq, dk, dv), g32, g64, "qkv"):
        assert_close_rule(ours, lo, hi, torch.float32, factor=3, what=f"d{name}")


def test_backends_by_name_agree():
    q, k, v = qkv(dtype=torch.float32)
    outs = {b: api.attention(q, k, v, causal=True, window=(4, 2), backend=b) for b in ("triton", "sdpa", "reference")}
    for b, o in outs.items():
        check(o, q, k, v, torch.float32, causal=True, window=(4, 2))


def test_key_padding_mask():
    q, k, v = qkv(N=11, Nk=17)
    kpm = torch.ones(2, 17, dtype=torch.bool, device=DEV)
    kpm[0, :5] = False    # left padding
    kpm[1, 14:] = False   # right padding (its last queries are padding too)
    out = api.attention(q, k, v, causal=True, key_padding_mask=kpm)
    qm = kpm[:, 17 - 11:]
    for b in range(2):
        qb, kb, vb = q[b:b + 1, :, qm[b]], k[b:b + 1, :, kpm[b]], v[b:b + 1, :, kpm[b]]
        check(out[b:b + 1, :, qm[b]], qb, kb, vb, torch.float16, causal=True)
        assert torch.all(out[b, :, ~qm[b]] == 0)
    # non-causal: every query is real, only keys are padded
    out = api.attention(q, k, v, key_padding_mask=kpm)
    for b in range(2):
        check(out[b:b + 1], q[b:b + 1], k[b:b + 1, :, kpm[b]], v[b:b + 1, :, kpm[b]], torch.float16)
    ref = api.attention(q, k, v, key_padding_mask=kpm, backend="sdpa")
    assert (out.float() - ref.float()).abs().max() < 2e-2


def test_varlen_attention_object():
    cq = torch.tensor([0, 5, 5, 14], dtype=torch.int32, device=DEV)
    ck = torch.tensor([0, 7, 10, 19], dtype=torch.int32, device=DEV)
    q, k, v = rnd(14, 4, 32), rnd(19, 2, 32), rnd(19, 2, 32)
    attn = VarlenAttention(causal=True)
    assert isinstance(attn, Attention)
    out = attn(PackedTensor(q, cq), PackedTensor(k, ck), PackedTensor(v, ck))
    ref, _ = attention_reference_varlen(q, k, v, cq, ck, causal=True)
    low, _ = attention_reference_varlen(q, k, v, cq, ck, causal=True, compute_dtype=torch.float16, device=DEV)
    assert_close_rule(out, low, ref, torch.float16)
    out2 = api.attention_varlen(q, k, v, cq, ck, 9, 9, causal=True)
    assert torch.equal(out, out2)
    d = api.explain(PackedTensor(q, cq), PackedTensor(k, ck), PackedTensor(v, ck), causal=True)
    assert d.request.kind == "varlen" and d.backend == "triton"


def test_packed_tensor_from_padded():
    x = rnd(2, 6, 4, 8)
    m = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool, device=DEV)
    p = PackedTensor.from_padded(x, m)
    assert p.data.shape == (8, 4, 8) and p.cu_seqlens.tolist() == [0, 3, 8] and p.max_seqlen == 5


def test_paged_decode_object_and_custom_op_path():
    pytest.importorskip("attention_proto.ops.paged.interface")
    from attention_proto.ops.paged.testing import compare_paged, make_paged

    g = torch.Generator().manual_seed(7)
    q, kc, vc, bt, lens = make_paged(3, 4, 2, 1, 32, 16, [5, 33, 17], torch.float16, DEV, g)
    k, v = PagedKV(kc, bt, lens), PagedKV(vc, bt, lens)
    attn = PagedDecodeAttention(softcap=9.0, return_lse=True)
    assert isinstance(attn, Attention)
    out, lse = attn(q, k, v)
    assert compare_paged(out, lse, q, kc, vc, bt, lens, torch.float16, softcap=9.0).ok
    fast = PagedDecodeAttention(softcap=9.0, check_inputs=False)(q, PagedKV(kc, bt, lens, max_seq_len=33), v)
    assert torch.allclose(fast.float(), out.float(), atol=2e-3)
    ref = PagedDecodeAttention(softcap=9.0, backend="reference")(q, k, v)
    assert (ref.float() - out.float()).abs().max() < 2e-2
    d = api.explain(q, k, v)
    assert d.request.kind == "paged" and d.backend == "triton"


def test_linear_attention_explains_or_runs():
    q, k, v = (rnd(1, 16, 2, 16, dtype=torch.float32) for _ in range(3))
    d = api.explain(q, k, v, kind="linear")
    try:
        import attention_proto.ops.linear.interface  # noqa: F401
    except ImportError:
        assert d.backend is None and "no linear attention" in " ".join(d.reasons_for("triton"))
        return
    assert d.backend == "triton"
    from attention_proto.ops.linear.reference import linear_attention_parallel

    out, _ = api.LinearAttention(chunk_size=32)(q, k, v)
    assert out.shape == v.shape
    ref = linear_attention_parallel(q, k, v)
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert (out.double() - ref.to(out.device).double()).abs().max() < 1e-3


def test_explain_without_running():
    q, k, v = qkv(dtype=torch.float16)
    d = api.explain(q, k, v, causal=True, softcap=5.0, backend=["sdpa", "triton"])
    assert d.backend == "triton" and d.requested == ("sdpa", "triton")
    assert "softcap" in " ".join(d.reasons_for("sdpa"))
    assert "dense bhsd" in str(d)


@pytest.mark.parametrize("bad, err, match", [
    (dict(q=torch.zeros(2, 3)), ValueError, "q must have 4 dimensions"),
    (dict(k="k"), TypeError, "k must be a DenseTensor or a torch.Tensor"),
    (dict(v=torch.zeros(2, 2, 19, 32, dtype=torch.float32)), TypeError, "share one dtype"),
    (dict(q=torch.zeros(2, 5, 13, 32, dtype=torch.float16)), ValueError, "multiple of k/v heads"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(softcap=-1.0), ValueError, "softcap must be None or a finite real number > 0"),
    (dict(window="left"), ValueError, "window must be None"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must be a float tensor of shape \[H\] = \[4\]"),
    (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"key_padding_mask must be \[B, Nk\]"),
    (dict(backend="nope"), ValueError, "unknown backend"),
])
def test_typed_errors(bad, err, match):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    for name in ("q", "k", "v"):
        if name in bad:
            t = bad.pop(name)
            args[name] = t.to(DEV) if isinstance(t, torch.Tensor) else t
    if "key_padding_mask" in bad:
        bad["key_padding_mask"] = bad["key_padding_mask"].to(DEV)
    with pytest.raises(err, match=match):
        api.attention(args["q"], args["k"], args["v"], **bad)


def test_unsupported_combination_names_every_backend():
    q, k, v = qkv(grad=True, dtype=torch.float32)
    from attention_proto.dispatch import NoBackendError

    @__import__("triton").jit
    def bias(score, b, h, q_idx, kv_idx):
        return score

    with pytest.raises(NoBackendError, match="triton: rejected: no backward with score_mod"):
        api.attention(q, k, v, score_mod=bias)


def test_outputs_are_fresh():
    q, k, v = qkv()
    out = api.attention(q, k, v, causal=True)
    poison_(out)
    again = api.attention(q, k, v, causal=True)
    assert torch.isfinite(again).all()


def test_attention_inside_torch_compile_fullgraph():
    """The registry's decision is taken at trace time (dispatch.choose): no graph break, gradients flow."""
    import torch._dynamo as dynamo

    q, k, v = qkv(dtype=torch.float32, grad=True, N=7, Nk=10)

    def f(q, k, v):
        return api.attention(q, k, v, causal=True, window=(3, -1)) * 2

    dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, ref = cf(q, k, v), f(q, k, v)
    assert (out - ref).abs().max() < 1e-6
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.sum(), (q, k, v))
    assert max(float((a - b).abs().max()) for a, b in zip(g1, g2)) < 1e-6
    dynamo.reset()
