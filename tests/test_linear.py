"""Linear attention on the CPU (Triton interpreter): chunked and recurrent forms, gradients,
decode steps, packed sequences and validation, against the float64 references.

Outputs are poisoned: torch.empty fills NaN here (deterministic mode with
fill_uninitialized_memory), so anything a kernel fails to write shows up as an error.
"""
from __future__ import annotations

import pytest
import torch

import attention_proto  # noqa: F401  - interpreter switch before the kernels import
from attention_proto.ops.linear import linear_attention, linear_attention_step
from attention_proto.ops.linear.reference import (linear_attention_parallel, linear_attention_recurrent,
                                                  random_inputs, step_reference)
from attention_proto.testing import assert_close_rule

from attention_proto.runtime.device import kernel_device

DEV = kernel_device()   # "cpu" under the interpreter; the same tests run on a GPU as they are


@pytest.fixture(autouse=True)
def poison_empty():
    """torch.empty / empty_like return NaN (float) while a test runs."""
    import torch.utils.deterministic as det

    old_det, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det)
    det.fill_uninitialized_memory = old_fill


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def ref_pair(q, k, v, g, s0, dtype, cu=None, layout="bshd"):
    """(float64 reference, PyTorch's own run in dtype) of (o, final state)."""
    ref = linear_attention_parallel(q, k, v, g, None, s0, True, cu, layout)
    low = linear_attention_parallel(q, k, v, g, None, s0, True, cu, layout, compute_dtype=dtype)
    return ref, low


def grads(fn, inputs, do, dht):
    ins = [None if x is None else x.detach().clone().requires_grad_(True) for x in inputs]
    o, ht = fn(*ins)
    ((o.to(torch.float64) * do.to(torch.float64)).sum() + (ht.to(torch.float64) * dht.to(torch.float64)).sum()).backward()
    return [None if x is None else x.grad for x in ins]


def check_grads(ours_fn, inputs, dtype, cu=None, layout="bshd", seed=0):
    g_ = gen(seed)
    q, k, v, g, s0 = inputs
    ns = s0.shape[0] if s0 is not None else (cu.numel() - 1 if cu is not None else q.shape[0])
    do = torch.randn(v.shape, generator=g_, device=DEV).to(dtype)
    H = q.shape[2] if layout == "bshd" else q.shape[1]
    dht = torch.randn(ns, H, q.shape[-1], v.shape[-1], generator=g_, device=DEV)
    ours = grads(ours_fn, inputs, do, dht)

    def ref_fn(cd):
        return lambda q, k, v, g, s0: linear_attention_parallel(q, k, v, g, None, s0, True, cu, layout, compute_dtype=cd)

    ref = grads(ref_fn(torch.float64), [None if x is None else x.double() for x in inputs], do, dht)
    low = grads(ref_fn(dtype), inputs, do, dht)
    for name, a, r, lo in zip(("dq", "dk", "dv", "dg", "dh0"), ours, ref, low):
        if r is None:
            continue
        assert a is not None, f"{name} missing"
        assert a.dtype == inputs[("dq", "dk", "dv", "dg", "dh0").index(name)].dtype
        assert_close_rule(a, lo, r, dtype, factor=3, what=name)


# ---- references -----------------------------------------------------------------------------

@pytest.mark.parametrize("gated,h0", [(False, False), (True, True)])
def test_references_agree(gated, h0):
    cu = torch.tensor([0, 1, 9, 9, 21], dtype=torch.int32, device=DEV)
    q, k, v, g, s0 = random_inputs(1, 21, 3, 6, 5, torch.float64, gated=gated, h0=h0, num_seqs=4, device=DEV, generator=gen(1))
    a, af = linear_attention_recurrent(q, k, v, g, 0.7, s0, True, cu)
    b, bf = linear_attention_parallel(q, k, v, g, 0.7, s0, True, cu)
    assert (a - b).abs().max() < 1e-10 and (af - bf).abs().max() < 1e-10


# ---- chunked forward ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("h0", [False, True])
def test_chunk_forward(dtype, gated, h0):
    # odd N: the last chunk is partial; K != V, neither a power of two
    q, k, v, g, s0 = random_inputs(2, 45, 2, 24, 40, dtype, gated=gated, h0=h0, device=DEV, generator=gen(2))
    o, ht = linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True, chunk_size=32)
    (ro, rf), (lo, lf) = ref_pair(q, k, v, g, s0, dtype)
    assert o.dtype == dtype and o.shape == v.shape and ht.dtype == torch.float32
    assert_close_rule(o, lo, ro, dtype, what="o")
    assert_close_rule(ht, lf, rf, dtype, what="final state")


@pytest.mark.parametrize("chunk_size,N", [(64, 70), (128, 131)])
def test_chunk_sizes(chunk_size, N):
    q, k, v, g, s0 = random_inputs(1, N, 1, 16, 16, torch.float32, gated=True, h0=True, device=DEV, generator=gen(3))
    o, ht = linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True, chunk_size=chunk_size)
    (ro, rf), (lo, lf) = ref_pair(q, k, v, g, s0, torch.float32)
    assert_close_rule(o, lo, ro, torch.float32, what="o")
    assert_close_rule(ht, lf, rf, torch.float32, what="final state")


def test_bhsd_layout_and_noncontiguous():
    q, k, v, g, s0 = random_inputs(2, 33, 2, 16, 32, torch.float32, gated=True, h0=True, device=DEV, generator=gen(4))
    qt, kt, vt, gt = (x.transpose(1, 2) for x in (q, k, v, g))   # non-contiguous bhsd views
    o, ht = linear_attention(qt, kt, vt, g=gt, initial_state=s0, output_final_state=True, layout="bhsd", chunk_size=32)
    (ro, rf), (lo, lf) = ref_pair(qt, kt, vt, gt, s0, torch.float32, layout="bhsd")
    assert o.shape == vt.shape
    assert_close_rule(o, lo, ro, torch.float32, what="o")
    assert_close_rule(ht, lf, rf, torch.float32, what="final state")
    check_grads(lambda q, k, v, g, s0: linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True,
                                                        layout="bhsd", chunk_size=32),
                [x.contiguous() for x in (qt, kt, vt, gt)] + [s0], torch.float32, layout="bhsd")


# ---- gradients ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gated,h0", [(False, False), (False, True), (True, False), (True, True)])
def test_chunk_backward(dtype, gated, h0):
    inputs = random_inputs(2, 45, 2, 24, 40, dtype, gated=gated, h0=h0, device=DEV, generator=gen(5))
    check_grads(lambda q, k, v, g, s0: linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True,
                                                        chunk_size=32), inputs, dtype)


@pytest.mark.parametrize("dst", [0, 1])
def test_one_token_dg_is_exactly_zero(small_tiles, monkeypatch, dst):
    """One float32 token, no initial state: the gate only decays the (zero) initial state, so dg is
    exactly 0 (float64 and PyTorch agree). The H100 fuzz found 1.1e-5 (bound 1e-5) from q . dq - k . dk;
    the score form (chunk_backward.DG_FROM_SCORES, default for float32) cancels a token's own pair (the
    interpreter reproduces the other form's 0.8e-5 to 1.5e-5 here)."""
    import json

    from attention_proto.ops.linear import chunk_backward

    cfg = json.loads(__import__("os").environ["ATTENTION_PROTO_LINEAR_CONFIG"])
    cfg["chunk_dqk"]["DST"] = dst
    monkeypatch.setenv("ATTENTION_PROTO_LINEAR_CONFIG", json.dumps(cfg))
    small_tiles._overrides.cache_clear()
    assert chunk_backward.DG_FROM_SCORES == "float32"
    worst = 0.0
    for seed in range(4):
        q, k, v, g, _ = random_inputs(1, 1, 2, 32, 100, torch.float32, gated=True, device=DEV, generator=gen(seed))
        ins = [x.clone().requires_grad_(True) for x in (q, k, v, g)]
        o, ht = linear_attention(*ins[:3], g=ins[3], output_final_state=True, chunk_size=32)
        g_ = gen(100 + seed)
        do, dht = torch.randn(o.shape, device=DEV, generator=g_), torch.randn(ht.shape, device=DEV, generator=g_)
        ((o * do).sum() + (ht * dht).sum()).backward()
        worst = max(worst, ins[3].grad.abs().max().item())
    assert worst == 0.0


def test_dg_form_setting_is_validated(monkeypatch):
    from attention_proto.ops.linear import chunk_backward

    monkeypatch.setattr(chunk_backward, "DG_FROM_SCORES", "sometimes")
    q, k, v, g, _ = random_inputs(1, 5, 1, 16, 16, torch.float32, gated=True, device=DEV, generator=gen(3))
    ins = [x.clone().requires_grad_(True) for x in (q, k, v, g)]
    o, _ = linear_attention(*ins[:3], g=ins[3], chunk_size=32)
    with pytest.raises(ValueError, match="DG_FROM_SCORES must be one of"):
        o.sum().backward()


@pytest.mark.parametrize("dst", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dg_score_form_for_every_dtype(small_tiles, monkeypatch, dst, dtype):
    """DG_FROM_SCORES = "always" (opt-in below float32): the score form meets the gradient rule over
    several chunks, K and V tiles, with an initial state."""
    import json

    from attention_proto.ops.linear import chunk_backward

    cfg = json.loads(__import__("os").environ["ATTENTION_PROTO_LINEAR_CONFIG"])
    cfg["chunk_dqk"]["DST"] = dst
    monkeypatch.setenv("ATTENTION_PROTO_LINEAR_CONFIG", json.dumps(cfg))
    small_tiles._overrides.cache_clear()
    monkeypatch.setattr(chunk_backward, "DG_FROM_SCORES", "always")
    inputs = random_inputs(2, 45, 2, 24, 40, dtype, gated=True, h0=True, device=DEV, generator=gen(25))
    check_grads(lambda q, k, v, g, s0: linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True,
                                                        chunk_size=32), inputs, dtype)


def test_backward_without_final_state_grad():
    q, k, v, g, _ = random_inputs(1, 37, 2, 16, 16, torch.float32, gated=True, device=DEV, generator=gen(6))
    ins = [x.clone().requires_grad_(True) for x in (q, k, v, g)]
    o, ht = linear_attention(*ins[:3], g=ins[3], chunk_size=32)
    assert ht is None
    do = torch.randn(o.shape, device=DEV, generator=gen(7))
    (o * do).sum().backward()
    rins = [x.double().clone().requires_grad_(True) for x in (q, k, v, g)]
    r, _ = linear_attention_parallel(*rins)
    (r * do.double()).sum().backward()
    for a, b in zip(ins, rins):
        assert (a.grad.double() - b.grad).abs().max() <= 1e-4 * max(1.0, b.grad.abs().max().item())


# ---- recurrent form and decode ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_recurrent_mode(dtype):
    inputs = random_inputs(1, 23, 2, 16, 24, dtype, gated=True, h0=True, device=DEV, generator=gen(8))
    q, k, v, g, s0 = inputs
    o, ht = linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True, mode="recurrent")
    (ro, rf), (lo, lf) = ref_pair(q, k, v, g, s0, dtype)
    assert_close_rule(o, lo, ro, dtype, what="o")
    assert_close_rule(ht, lf, rf, dtype, what="final state")
    if dtype == torch.float32:   # its backward is the chunked one, after recomputing the chunk states
        check_grads(lambda q, k, v, g, s0: linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True,
                                                            mode="recurrent", chunk_size=32), inputs, dtype)


@pytest.mark.parametrize("gated", [False, True])
def test_decode_steps_match_chunked(gated):
    B, N, H, K, V = 2, 13, 2, 16, 24
    q, k, v, g, s0 = random_inputs(B, N, H, K, V, torch.float32, gated=gated, h0=True, device=DEV, generator=gen(9))
    o_chunk, ht_chunk = linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True, chunk_size=32)
    state = s0.clone()
    outs = []
    for t in range(N):
        o_t, state = linear_attention_step(q[:, t], k[:, t], v[:, t], state, g=None if g is None else g[:, t],
                                           inplace=(t % 2 == 1))
        outs.append(o_t)
    o_steps = torch.stack(outs, 1)
    assert (o_steps - o_chunk).abs().max() <= 1e-4 * max(1.0, o_chunk.abs().max().item())
    assert (state - ht_chunk).abs().max() <= 1e-4 * max(1.0, ht_chunk.abs().max().item())


def test_decode_step_fp16_against_reference():
    B, H, K, V = 3, 2, 24, 40
    q, k, v, g, s0 = random_inputs(B, 1, H, K, V, torch.float16, gated=True, h0=True, device=DEV, generator=gen(10))
    o, s1 = linear_attention_step(q, k, v, s0, g=g)          # [B, 1, H, D] form
    ro, rs = step_reference(q[:, 0], k[:, 0], v[:, 0], s0, g[:, 0])
    lo, ls = step_reference(q[:, 0], k[:, 0], v[:, 0], s0, g[:, 0], compute_dtype=torch.float16)
    assert o.shape == v.shape and o.dtype == torch.float16 and s1.dtype == torch.float32
    assert_close_rule(o[:, 0], lo, ro, torch.float16, what="o")
    assert_close_rule(s1, ls, rs, torch.float16, what="state")


# ---- packed sequences -----------------------------------------------------------------------

CU = [0, 1, 34, 34, 50]   # a length-1 sequence, a two-chunk one, an empty one


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_forward(mode, dtype):
    cu = torch.tensor(CU, dtype=torch.int32, device=DEV)
    q, k, v, g, s0 = random_inputs(1, CU[-1], 2, 16, 24, dtype, gated=True, h0=True, num_seqs=4, device=DEV, generator=gen(11))
    o, ht = linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True, cu_seqlens=cu, mode=mode,
                             chunk_size=32)
    for i in range(len(CU) - 1):   # the reference run per sequence
        a, b = CU[i], CU[i + 1]
        (ro, rf), (lo, lf) = ref_pair(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], s0[i:i + 1], dtype)
        assert_close_rule(o[:, a:b], lo, ro, dtype, what=f"o of sequence {i}")
        assert_close_rule(ht[i:i + 1], lf, rf, dtype, what=f"final state of sequence {i}")


def test_varlen_no_leak_and_gradients():
    cu = torch.tensor(CU, dtype=torch.int32, device=DEV)
    inputs = random_inputs(1, CU[-1], 2, 16, 24, torch.float32, gated=True, h0=True, num_seqs=4, device=DEV, generator=gen(12))
    q, k, v, g, s0 = inputs
    o1, h1 = linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk_size=32)
    k2, v2 = k.clone(), v.clone()
    k2[:, 1:34] += 5.0          # change sequence 1 only
    v2[:, 1:34] -= 3.0
    o2, h2 = linear_attention(q, k2, v2, g=g, initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk_size=32)
    assert torch.equal(o1[:, :1], o2[:, :1]) and torch.equal(o1[:, 34:], o2[:, 34:])
    assert torch.equal(h1[[0, 2, 3]], h2[[0, 2, 3]])
    assert torch.equal(h1[2], s0[2])   # the empty sequence passes its state through
    check_grads(lambda q, k, v, g, s0: linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True,
                                                        cu_seqlens=cu, chunk_size=32), inputs, torch.float32, cu=cu)


# ---- validation and edge cases ---------------------------------------------------------------

def _qkv(B=1, N=8, H=2, K=16, V=16, dtype=torch.float32):
    return random_inputs(B, N, H, K, V, dtype, device=DEV, generator=gen(13))[:3]


@pytest.mark.parametrize("cu,err,match", [
    (torch.tensor([0, 3, 8], dtype=torch.int64, device=DEV), TypeError, "int32"),
    (torch.tensor([1, 3, 8], dtype=torch.int32, device=DEV), ValueError, "start at 0"),
    (torch.tensor([0, 5, 3, 8], dtype=torch.int32, device=DEV), ValueError, "non-decreasing"),
    (torch.tensor([0, 3, 7], dtype=torch.int32, device=DEV), ValueError, "end at the number of tokens"),
    (torch.tensor([[0, 8]], dtype=torch.int32, device=DEV), ValueError, "1-D"),
    ([0, 8], TypeError, "int32 torch.Tensor"),
])
def test_cu_seqlens_validation(cu, err, match):
    q, k, v = _qkv()
    with pytest.raises(err, match=match):
        linear_attention(q, k, v, cu_seqlens=cu)


def test_validation_errors():
    q, k, v = _qkv()
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEV)
    q2, k2, v2 = _qkv(B=2)
    with pytest.raises(ValueError, match="batch dimension must be 1"):
        linear_attention(q2, k2, v2, cu_seqlens=cu)
    if DEV == "cpu":
        with pytest.raises(TypeError, match="bfloat16"):
            linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    else:
        with pytest.raises(ValueError, match="kernels run on cuda"):
            linear_attention(q.cpu(), k.cpu(), v.cpu())
    with pytest.raises(TypeError, match="share one dtype"):
        linear_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="dtype"):
        linear_attention(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="4 dimensions"):
        linear_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="k must have q's shape"):
        linear_attention(q, k[:, :4], v)
    with pytest.raises(ValueError, match="v must match q"):
        linear_attention(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match="head dim K"):
        linear_attention(*_qkv(K=300))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, chunk_size=48)
    with pytest.raises(ValueError, match="mode"):
        linear_attention(q, k, v, mode="parallel")
    with pytest.raises(ValueError, match="layout"):
        linear_attention(q, k, v, layout="sbhd")
    with pytest.raises(ValueError, match="g must have shape"):
        linear_attention(q, k, v, g=torch.zeros(1, 8, 3, device=DEV))
    with pytest.raises(TypeError, match="initial_state has dtype"):
        linear_attention(q, k, v, initial_state=torch.zeros(1, 2, 16, 16, dtype=torch.float64, device=DEV))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        linear_attention(q, k, v, initial_state=torch.zeros(2, 2, 16, 16, device=DEV))
    with pytest.raises(TypeError, match="scale"):
        linear_attention(q, k, v, scale="1")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        linear_attention(q.tolist(), k, v)
    with pytest.raises(NotImplementedError, match="without a backward"):
        linear_attention_step(q[:, 0].requires_grad_(True), k[:, 0], v[:, 0], torch.zeros(1, 2, 16, 16, device=DEV))
    with pytest.raises(TypeError, match="state has dtype"):
        linear_attention_step(q[:, 0], k[:, 0], v[:, 0], torch.zeros(1, 2, 16, 16, device=DEV).half())


def test_empty_sequence_axis():
    q, k, v = _qkv(N=0)
    s0 = torch.randn(1, 2, 16, 16, device=DEV, generator=gen(14))
    o, ht = linear_attention(q, k, v, initial_state=s0, output_final_state=True)
    assert o.shape == v.shape and torch.equal(ht, s0)


# ---- multi-tile configs (the interpreter's defaults use one tile per head dim) -----------------

@pytest.fixture
def small_tiles(monkeypatch):
    from attention_proto.ops.linear import common

    cfg = {name: {"BK": 16, "BV": 16} for name in ("chunk_h", "chunk_o", "chunk_dh", "chunk_dqk", "chunk_dv")}
    cfg["recurrent"] = {"BV": 16}
    monkeypatch.setenv("ATTENTION_PROTO_LINEAR_CONFIG", __import__("json").dumps(cfg))
    common._overrides.cache_clear()
    common._CHOSEN.clear()
    yield common
    monkeypatch.delenv("ATTENTION_PROTO_LINEAR_CONFIG")
    common._overrides.cache_clear()
    common._CHOSEN.clear()


@pytest.mark.parametrize("dst", [0, 1])
def test_multi_tile_configs(small_tiles, monkeypatch, dst):
    """K = 24 and V = 40 in 16-wide tiles: several K and V tiles, dg summed over K-tile partials;
    both forms of the dk product (DST 0 and 1)."""
    import json

    cfg = json.loads(__import__("os").environ["ATTENTION_PROTO_LINEAR_CONFIG"])
    cfg["chunk_dqk"]["DST"] = dst
    monkeypatch.setenv("ATTENTION_PROTO_LINEAR_CONFIG", json.dumps(cfg))
    small_tiles._overrides.cache_clear()
    assert small_tiles.kernel_config("chunk_dqk", 32, 24, 40)["BK"] == 16
    inputs = random_inputs(2, 45, 2, 24, 40, torch.float32, gated=True, h0=True, device=DEV, generator=gen(15))
    check_grads(lambda q, k, v, g, s0: linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True,
                                                        chunk_size=32), inputs, torch.float32)
    q, k, v, g, s0 = inputs
    o, ht = linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True, mode="recurrent")
    (ro, rf), (lo, lf) = ref_pair(q, k, v, g, s0, torch.float32)
    assert_close_rule(o, lo, ro, torch.float32, what="recurrent o")
    assert_close_rule(ht, lf, rf, torch.float32, what="recurrent final state")
    assert set(small_tiles.config_report()) >= {"chunk_h@32", "chunk_o@32", "chunk_dqk@32", "chunk_dv@32"}


def test_bad_config_override(monkeypatch):
    from attention_proto.ops.linear import common

    monkeypatch.setenv("ATTENTION_PROTO_LINEAR_CONFIG", "{not json")
    common._overrides.cache_clear()
    try:
        with pytest.raises(ValueError, match="ATTENTION_PROTO_LINEAR_CONFIG"):
            common.kernel_config("chunk_o", 64, 128, 128)
    finally:
        monkeypatch.delenv("ATTENTION_PROTO_LINEAR_CONFIG")
        common._overrides.cache_clear()


def test_varlen_bhsd():
    cu = torch.tensor(CU, dtype=torch.int32, device=DEV)
    q, k, v, g, s0 = random_inputs(1, CU[-1], 2, 16, 24, torch.float32, gated=True, h0=True, num_seqs=4,
                                   device=DEV, generator=gen(16))
    qt, kt, vt, gt = (x.transpose(1, 2).contiguous() for x in (q, k, v, g))
    o, ht = linear_attention(qt, kt, vt, g=gt, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                             layout="bhsd", chunk_size=32)
    (ro, rf), (lo, lf) = ref_pair(q, k, v, g, s0, torch.float32, cu=cu)
    assert_close_rule(o.transpose(1, 2), lo, ro, torch.float32, what="o")
    assert_close_rule(ht, lf, rf, torch.float32, what="final state")
