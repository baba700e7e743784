"""Linear attention on a GPU (skipped without CUDA): bfloat16, realistic head dims, all chunk sizes.

The gated backward is checked against float64 at 64- and 128-wide K tiles on purpose:
Triton 3.4-3.7.0 miscompiles fla's gated dk/dg on Hopper at 64-wide tiles (fla #640).
Run: ``python -m pytest tests/test_linear_gpu.py -q``.
"""
from __future__ import annotations

import pytest
import torch

import attention_proto  # noqa: F401
from attention_proto.ops.linear import linear_attention, linear_attention_step
from attention_proto.ops.linear.reference import linear_attention_parallel, random_inputs
from attention_proto.testing import assert_close_rule, max_abs_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def run_grads(fn, inputs, do, dht):
    ins = [None if x is None else x.detach().clone().requires_grad_(True) for x in inputs]
    o, ht = fn(*ins)
    ((o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()).backward()
    return o.detach(), ht.detach(), [None if x is None else x.grad for x in ins]


def compare(inputs, dtype, chunk_size, cu=None, backward=True, seed=0):
    q, k, v, g, s0 = inputs
    ns = s0.shape[0]
    do = torch.randn(v.shape, generator=gen(seed), device=DEV).to(dtype)
    dht = torch.randn(ns, q.shape[2], q.shape[3], v.shape[3], generator=gen(seed + 1), device=DEV)

    def ours(q, k, v, g, s0):
        return linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True, chunk_size=chunk_size,
                                cu_seqlens=cu)

    def ref(cd):
        return lambda q, k, v, g, s0: linear_attention_parallel(q, k, v, g, None, s0, True, cu, compute_dtype=cd)

    if not backward:
        with torch.no_grad():
            o, ht = ours(*inputs)
            ro, rf = ref(torch.float64)(*[None if x is None else x.double() for x in inputs])
            lo, lf = ref(dtype)(*inputs)
        assert_close_rule(o, lo, ro, dtype, what="o")
        assert_close_rule(ht, lf, rf, dtype, what="final state")
        return
    o, ht, ga = run_grads(ours, inputs, do, dht)
    ro, rf, gr = run_grads(ref(torch.float64), [None if x is None else x.double() for x in inputs], do, dht)
    lo, lf, gl = run_grads(ref(dtype), inputs, do, dht)
    assert_close_rule(o, lo, ro, dtype, what="o")
    assert_close_rule(ht, lf, rf, dtype, what="final state")
    for name, a, r, lw in zip(("dq", "dk", "dv", "dg", "dh0"), ga, gr, gl):
        if r is not None:
            assert_close_rule(a, lw, r, dtype, factor=3, what=name)


@pytest.mark.parametrize("chunk_size", [32, 64, 128])
@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("gated", [False, True])
def test_bf16_fwd_bwd(chunk_size, K, gated):
    inputs = random_inputs(2, 1000, 4, K, 128, torch.bfloat16, DEV, gated=gated, h0=True, generator=gen(1))
    compare(inputs, torch.bfloat16, chunk_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(dtype):
    inputs = random_inputs(2, 777, 4, 128, 64, dtype, DEV, gated=True, h0=True, generator=gen(2))
    compare(inputs, dtype, 64)


@pytest.mark.parametrize("K,V", [(256, 256), (256, 64), (40, 200)])
def test_head_dims(K, V):
    inputs = random_inputs(1, 300, 2, K, V, torch.bfloat16, DEV, gated=True, h0=True, generator=gen(3))
    compare(inputs, torch.bfloat16, 64)


@pytest.mark.parametrize("K,V", [(64, 16), (64, 32), (32, 16), (16, 16), (128, 16), (32, 64), (96, 40)])
@pytest.mark.parametrize("packed", [False, True])
def test_small_head_dims_fp16(K, V, packed):
    # session-4 GPU fuzz: chunk_o's 4-warp tile at chunk 64 read shared memory out of bounds when V or K
    # gave a 16- or 32-wide tile (wrong outputs, then an illegal address); forward only, as found
    lens = [293, 198, 137, 247, 207]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV) if packed else None
    inputs = random_inputs(1, sum(lens), 1, K, V, torch.float16, DEV, gated=False, h0=True,
                           num_seqs=len(lens) if packed else 1, generator=gen(9))
    compare(inputs, torch.float16, 64, cu=cu, backward=False)


def test_varlen_bf16():
    cu_l = [0, 1, 300, 301, 301, 1024]
    cu = torch.tensor(cu_l, dtype=torch.int32, device=DEV)
    inputs = random_inputs(1, cu_l[-1], 4, 128, 128, torch.bfloat16, DEV, gated=True, h0=True,
                           num_seqs=len(cu_l) - 1, generator=gen(4))
    compare(inputs, torch.bfloat16, 64, cu=cu)


def test_recurrent_mode_and_decode_bf16():
    q, k, v, g, s0 = random_inputs(2, 200, 4, 128, 128, torch.bfloat16, DEV, gated=True, h0=True, generator=gen(5))
    o_c, h_c = linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True)
    o_r, h_r = linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True, mode="recurrent")
    ro, rf = linear_attention_parallel(q.double(), k.double(), v.double(), g.double(), None, s0, True)
    lo, lf = linear_attention_parallel(q, k, v, g, None, s0, True, compute_dtype=torch.bfloat16)
    assert_close_rule(o_r, lo, ro, torch.bfloat16, what="recurrent o")
    assert_close_rule(h_r, lf, rf, torch.bfloat16, what="recurrent final state")
    state = s0.clone()
    outs = []
    for t in range(q.shape[1]):
        o_t, state = linear_attention_step(q[:, t], k[:, t], v[:, t], state, g=g[:, t], inplace=True)
        outs.append(o_t)
    assert_close_rule(torch.stack(outs, 1), lo, ro, torch.bfloat16, what="decode steps o")
    assert_close_rule(state, lf, rf, torch.bfloat16, what="decode steps state")


def _chunked_reference64(q, k, v, g, scale, C=256):
    """A float64 chunked evaluation for long sequences (the parallel form would need N^2 memory)."""
    B, N, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64, device=q.device)
    out = []
    q, k, v, g = q.double(), k.double(), v.double(), g.double()
    idx = torch.arange(C, device=q.device)
    for s in range(0, N, C):
        qc, kc, vc, gc = q[:, s:s + C], k[:, s:s + C], v[:, s:s + C], g[:, s:s + C]
        n = qc.shape[1]
        A = gc.cumsum(1)                                                  # [B, n, H]
        m = idx[:n, None] >= idx[None, :n]
        diff = (A[:, :, None] - A[:, None, :]).permute(0, 3, 1, 2)         # [B, H, t, s]
        D = torch.where(m, torch.exp(torch.where(m, diff, 0.0)), 0.0)
        att = torch.einsum("bthk,bshk->bhts", qc, kc) * D * scale
        o = torch.einsum("bhts,bshv->bthv", att, vc) + scale * torch.exp(A)[..., None] * torch.einsum("bthk,bhkv->bthv", qc, S)
        w = torch.exp(A[:, -1:, :] - A)                                   # [B, n, H]
        S = torch.exp(A[:, -1])[..., None, None] * S + torch.einsum("bshk,bshv->bhkv", kc * w[..., None], vc)
        out.append(o)
    return torch.cat(out, 1), S


@pytest.mark.parametrize("gated", [False, True])
def test_long_sequence_bf16(gated):
    """N = 32k: the fp32 state over 512 chunks stays within bf16 output accuracy of a float64 run."""
    q, k, v, g, _ = random_inputs(1, 32768, 2, 128, 128, torch.bfloat16, DEV, gated=True, generator=gen(6))
    if not gated:
        g = torch.zeros_like(g)
    o, ht = linear_attention(q, k, v, g=g if gated else None, output_final_state=True)
    ro, rf = _chunked_reference64(q, k, v, g, 128 ** -0.5)
    rel_o = max_abs_err(o, ro) / ro.abs().max().item()
    rel_h = max_abs_err(ht, rf) / rf.abs().max().item()
    assert rel_o < 2e-2 and rel_h < (1e-2 if gated else 1e-3), (rel_o, rel_h)


@pytest.mark.parametrize("K", [64, 128])
def test_gated_backward_dst_form(K, monkeypatch):
    """The fallback form of the dk product (DST=1) is right too, so it can replace the default."""
    from attention_proto.ops.linear import common

    monkeypatch.setenv("ATTENTION_PROTO_LINEAR_CONFIG", '{"chunk_dqk": {"DST": 1}}')
    common._overrides.cache_clear()
    common._CHOSEN.clear()
    try:
        inputs = random_inputs(2, 1000, 4, K, 128, torch.bfloat16, DEV, gated=True, h0=True, generator=gen(7))
        compare(inputs, torch.bfloat16, 64)
    finally:
        monkeypatch.delenv("ATTENTION_PROTO_LINEAR_CONFIG")
        common._overrides.cache_clear()
        common._CHOSEN.clear()
