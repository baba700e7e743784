"""torch.library custom ops (fake impls, autograd, torch.compile) and the drop-in scaled_dot_product_attention."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import attention_proto  # noqa: F401
from attention_proto.integrations import torch_ops
from attention_proto.ops.dense.reference import attention_reference
from attention_proto.runtime.device import interpreter_mode

DEV = "cpu" if interpreter_mode() else "cuda"
GEN = torch.Generator().manual_seed(99)


def rnd(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, generator=GEN).to(DEV, dtype).requires_grad_(grad)


def qkv(B=2, H=4, Hkv=2, N=9, Nk=11, D=16, dtype=torch.float32, grad=False):
    return rnd(B, H, N, D, dtype=dtype, grad=grad), rnd(B, Hkv, Nk, D, dtype=dtype, grad=grad), \
        rnd(B, Hkv, Nk, D, dtype=dtype, grad=grad)


def test_ops_are_registered():
    for name in torch_ops.op_names():
        ns, op = name.split("::")
        assert hasattr(getattr(torch.ops, ns), op), name


#: opcheck's aot_dispatch test reruns the op many times under the interpreter: run it on the GPU only
FAST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")
UTILS = FAST_UTILS if interpreter_mode() else FAST_UTILS + ("test_aot_dispatch_dynamic",)


def test_opcheck_flash_fwd():
    q, k, v = qkv(grad=True)
    args = (q, k, v, True, 0.25, 3, -1, 5.0, None, 1, 10000.0, -1, 0, None, None, True)
    res = torch.library.opcheck(torch.ops.attention_proto.flash_fwd.default, args, test_utils=UTILS)
    assert all(v == "SUCCESS" for v in res.values()), res


def test_eager_inference_skips_the_op_dispatch(monkeypatch):
    """Eager calls without gradients run the op's body directly (no ~60 us dispatch); with gradients,
    or while compiling, the op runs (autograd and tracing need it). Same outputs either way."""
    direct = []
    real = torch_ops._flash_fwd_impl

    def spy(*a):
        direct.append(1)
        return real(*a)

    monkeypatch.setattr(torch_ops, "_flash_fwd_impl", spy)
    q, k, v = qkv()
    with torch.no_grad():
        a = torch_ops.flash_attention(q, k, v, causal=True)
    assert direct == [1]
    b = torch_ops.flash_attention(q, k, v, causal=True)  # grad mode on, nothing requires grad
    assert direct == [1, 1] and torch.equal(a, b)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    c = torch_ops.flash_attention(qg, kg, vg, causal=True)
    assert direct == [1, 1], "inputs that require grad must go through the op (its autograd)"
    assert c.grad_fn is not None and torch.equal(a, c.detach())


def test_opcheck_varlen_and_padded():
    q, k, v = rnd(12, 4, 16, grad=True), rnd(15, 2, 16, grad=True), rnd(15, 2, 16, grad=True)
    cq = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEV)
    ck = torch.tensor([0, 8, 15], dtype=torch.int32, device=DEV)
    args = (q, k, v, cq, ck, 7, 8, True, 0.25, -1, -1, 0.0, None, 0, 10000.0, -1, 0, None, None, True)
    res = torch.library.opcheck(torch.ops.attention_proto.varlen_fwd.default, args, test_utils=UTILS)
    assert all(v == "SUCCESS" for v in res.values()), res
    q, k, v = qkv(grad=True)
    km = torch.ones(2, 11, dtype=torch.bool, device=DEV)
    km[0, :4] = False
    args = (q, k, v, km[:, 2:], km, True, 0.25, -1, -1, 0.0, None, True)
    # the full check (with aot_dispatch) for the op whose packing is data-dependent
    res = torch.library.opcheck(torch.ops.attention_proto.padded_fwd.default, args)
    assert all(v == "SUCCESS" for v in res.values()), res


def test_opcheck_paged_decode():
    pytest.importorskip("attention_proto.ops.paged.interface")
    from attention_proto.ops.paged.testing import make_paged

    g = torch.Generator().manual_seed(3)
    q, kc, vc, bt, lens = make_paged(2, 4, 2, 1, 16, 8, [9, 20], torch.float32, DEV, g)
    args = (q, kc, vc, bt, lens, 0.25, 0.0, None, -1, 24)
    res = torch.library.opcheck(torch.ops.attention_proto.paged_decode.default, args,
                                test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in res.values()), res


def _grads(fn, inputs, do):
    return torch.autograd.grad(fn(*inputs), inputs, do)


def test_padded_op_with_holes_and_window_falls_back_exactly():
    """Holes in a padding mask change window distances: the op computes that case with explicit masks."""
    q, k, v = qkv(N=11, Nk=11, grad=True)
    km = torch.ones(2, 11, dtype=torch.bool, device=DEV)
    km[0, 3:5] = False
    kw = dict(causal=True, window=(3, -1))
    out = torch_ops.padded_attention(q, k, v, km, km, **kw)
    allowed = torch_ops.padding_allowed(km, km, True, 3, -1)
    ref = torch_ops._masked_math(q.double(), k.double(), v.double(), allowed, 0.25, 0.0, None)[0]
    sel = km[:, None, :, None].expand_as(out)
    assert (out - ref.float())[sel].abs().max() < 1e-5
    do = rnd(*out.shape)
    g1 = torch.autograd.grad(out, (q, k, v), do)
    qq, kk, vv = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    r = torch_ops._masked_math(qq, kk, vv, allowed, 0.25, 0.0, None)[0]
    g2 = torch.autograd.grad(r, (qq, kk, vv), (do * km[:, None, :, None]).double())
    for a, b in zip(g1, g2):
        assert (a.double() - b).abs().max() < 1e-4


def test_padded_op_gradients_match_per_sequence_reference():
    q, k, v = qkv(N=7, Nk=12, grad=True)
    km = torch.ones(2, 12, dtype=torch.bool, device=DEV)
    km[1, :5] = False
    qm = km[:, 5:]
    out = torch_ops.padded_attention(q, k, v, km, qm, causal=True, softcap=4.0)
    do = rnd(*out.shape)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    for b in range(2):
        qb, kb, vb = (t[b:b + 1, :, m].detach().double().requires_grad_(True) for t, m in ((q, qm[b]), (k, km[b]), (v, km[b])))
        r, _ = attention_reference(qb, kb, vb, causal=True, softcap=4.0)
        gq, gk, gv = torch.autograd.grad(r, (qb, kb, vb), do[b:b + 1, :, qm[b]].double())
        assert (dq[b:b + 1, :, qm[b]].double() - gq).abs().max() < 1e-4
        assert (dk[b:b + 1, :, km[b]].double() - gk).abs().max() < 1e-4
        assert (dv[b:b + 1, :, km[b]].double() - gv).abs().max() < 1e-4
        assert torch.all(dk[b, :, ~km[b]] == 0) and torch.all(dq[b, :, ~qm[b]] == 0)


def test_torch_compile_fullgraph_forward_and_backward():
    import torch._dynamo as dynamo

    q, k, v = qkv(grad=True)
    km = torch.ones(2, 11, dtype=torch.bool, device=DEV)
    km[0, :3] = False

    def f(q, k, v, km):
        a = torch_ops.flash_attention(q, k, v, causal=True, window=(4, -1))
        b = torch_ops.padded_attention(q, k, v, km, km[:, 2:], causal=True)
        return (a * 2 + b).sum(dim=-1)

    dynamo.reset()
    ex = dynamo.explain(f)(q, k, v, km)
    assert ex.graph_break_count == 0 and ex.graph_count == 1
    dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(q, k, v, km)
    ref = f(q, k, v, km)
    assert (out - ref).abs().max() < 1e-5
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() < 1e-5
    dynamo.reset()


# ------------------------------------------------------------------------------------------------
# the drop-in SDPA
# ------------------------------------------------------------------------------------------------

from attention_proto import sdpa as ap_sdpa  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_fallback_state():
    ap_sdpa.reset_fallback_state()
    yield
    ap_sdpa.set_strict(False)


@pytest.mark.parametrize("L, S, causal", [(9, 9, True), (7, 13, True), (13, 7, True), (5, 11, False)])
def test_dropin_matches_torch(L, S, causal):
    q, k, v = rnd(2, 4, L, 16), rnd(2, 2, S, 16), rnd(2, 2, S, 16)
    ours = ap_sdpa.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, scale=0.3)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, scale=0.3)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-5
    assert ap_sdpa.fallback_counts() == {"ours": 1, "fallback": 0}


def test_dropin_shapes_3d_5d_and_key_padding():
    q, k, v = rnd(3, 9, 16), rnd(3, 12, 16), rnd(3, 12, 16)
    assert (ap_sdpa.scaled_dot_product_attention(q, k, v) - F.scaled_dot_product_attention(q, k, v)).abs().max() < 1e-5
    q, k, v = rnd(2, 3, 2, 9, 16), rnd(2, 3, 2, 12, 16), rnd(2, 3, 2, 12, 16)
    a = ap_sdpa.scaled_dot_product_attention(q, k, v, is_causal=True)
    b = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert a.shape == b.shape and (a - b).abs().max() < 1e-5
    q, k, v = rnd(2, 4, 9, 16), rnd(2, 4, 12, 16), rnd(2, 4, 12, 16)
    m = torch.ones(2, 1, 1, 12, dtype=torch.bool, device=DEV)
    m[0, ..., :5] = False
    a = ap_sdpa.scaled_dot_product_attention(q, k, v, attn_mask=m)
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert (a - b).abs().max() < 1e-5
    assert ap_sdpa.fallback_counts()["fallback"] == 0


def test_dropin_gradients():
    q, k, v = rnd(2, 4, 9, 16, grad=True), rnd(2, 2, 9, 16, grad=True), rnd(2, 2, 9, 16, grad=True)
    do = rnd(2, 4, 9, 16)
    g1 = torch.autograd.grad(ap_sdpa.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v), do)
    g2 = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v), do)
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() < 1e-4


def test_fallback_is_reported_once_per_reason_and_strict_raises():
    q, k, v = rnd(2, 4, 9, 16), rnd(2, 4, 12, 16), rnd(2, 4, 12, 16)
    fmask = rnd(9, 12)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            out = ap_sdpa.scaled_dot_product_attention(q, k, v, attn_mask=fmask)
        ap_sdpa.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    msgs = [str(x.message) for x in w if issubclass(x.category, ap_sdpa.SDPAFallbackWarning)]
    assert len(msgs) == 2, msgs
    assert "float attn_mask" in msgs[0] and "dropout_p=0.5" in msgs[1]
    assert (out - F.scaled_dot_product_attention(q, k, v, attn_mask=fmask)).abs().max() < 1e-6
    assert ap_sdpa.fallback_counts()["fallback"] == 4
    with ap_sdpa.strict():
        with pytest.raises(ap_sdpa.SDPAFallbackError, match="float attn_mask"):
            ap_sdpa.scaled_dot_product_attention(q, k, v, attn_mask=fmask)
        ap_sdpa.scaled_dot_product_attention(q, k, v)  # supported calls still run
    assert not ap_sdpa.is_strict()


def test_unsupported_dtype_falls_back_with_the_dispatch_reason():
    if not interpreter_mode():
        pytest.skip("bfloat16 is supported on the GPU")
    q, k, v = (rnd(1, 2, 5, 16, dtype=torch.bfloat16) for _ in range(3))
    with pytest.warns(ap_sdpa.SDPAFallbackWarning, match="bfloat16 not supported on cpu"):
        ap_sdpa.scaled_dot_product_attention(q, k, v)


def test_patched_routes_torch_calls():
    q, k, v = rnd(1, 2, 5, 16), rnd(1, 2, 5, 16), rnd(1, 2, 5, 16)
    with ap_sdpa.patched():
        assert F.scaled_dot_product_attention is ap_sdpa.scaled_dot_product_attention
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert F.scaled_dot_product_attention is not ap_sdpa.scaled_dot_product_attention
    assert ap_sdpa.fallback_counts()["ours"] == 1


def test_dropin_under_torch_compile():
    import torch._dynamo as dynamo

    q, k, v = rnd(2, 4, 9, 16), rnd(2, 2, 9, 16), rnd(2, 2, 9, 16)

    def f(q, k, v):
        return ap_sdpa.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) + 1

    dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="eager")
    assert (cf(q, k, v) - f(q, k, v)).abs().max() < 1e-6
    dynamo.reset()
