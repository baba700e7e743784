"""Numerical edge cases of every op: fully masked rows, scores of magnitude 1e4, length-1
sequences, head dims that are not powers of two, and NaN containment.

NaN containment contract (what these tests hold the kernels to):

- dense/varlen: NaN in ``q[b, h, i]`` makes exactly row ``(b, h, i)`` NaN. NaN in ``k[b, g, j]``
  makes NaN exactly the rows of batch b, KV group g that may attend key j; every other row is
  bitwise what the clean input gives. NaN in ``v[b, g, j]`` makes NaN every row that may attend
  j; rows of other batches and KV groups are bitwise unchanged; rows of the same group that are
  masked from j are *unspecified* (a tile multiplies their zero probability by the NaN value, as
  the float64 reference's matmul does).
- paged: NaN in a token of sequence b reaches only rows of sequence b.
- linear: NaN in token t of a sequence reaches only that sequence: its rows t.. are NaN, other
  sequences (batch rows or packed sequences) and heads are bitwise unchanged. Rows before t stay
  clean, except that in chunk mode NaN in ``v`` may reach the earlier rows of its chunk (the
  masked intra-chunk product multiplies 0 by NaN, as the reference's parallel form does).
"""
from __future__ import annotations

import pytest
import torch

import attention_proto  # noqa: F401
from attention_proto.ops.dense.interface import attention, attention_varlen
from attention_proto.ops.dense.reference import attention_reference, attention_reference_varlen, dense_mask
from attention_proto.ops.linear.interface import linear_attention, linear_attention_step
from attention_proto.ops.linear.reference import linear_attention_parallel, step_reference
from attention_proto.ops.paged.interface import paged_attention
from attention_proto.ops.paged.testing import compare_paged, make_paged
from attention_proto.testing import assert_close_rule
from attention_proto.testing import ERROR_FLOOR
from test_fuzz_common import DEV, gen, gpu, nan_empty, randn

__all__ = ["nan_empty"]

pytestmark = [pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning"),
              pytest.mark.usefixtures("nan_empty")]

DTYPES = [torch.float16, torch.float32]
IDS = ["fp16", "fp32"]
#: low-precision paths, bf16 on a GPU only (the interpreter has no bf16 arithmetic)
LOWP = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32"),
        pytest.param(torch.bfloat16, id="bf16", marks=gpu)]


def qkv(B, H, Hkv, Nq, Nk, D, dtype, seed=0, scale=1.0):
    g = gen(seed)
    return (randn((B, H, Nq, D), g, dtype, scale=scale), randn((B, Hkv, Nk, D), g, dtype, scale=scale),
            randn((B, Hkv, Nk, D), g, dtype))


def dense_grads(q, k, v, do, **mods):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, **mods)
    out.backward(do)
    return out.detach(), [t.grad for t in leaves]


def ref_grads(q, k, v, do, cd, **mods):
    ins = [t.detach().cpu().to(cd).requires_grad_() for t in (q, k, v)]
    out, _ = attention_reference(*ins, compute_dtype=cd, **mods)
    return torch.autograd.grad(out, ins, do.cpu().to(cd))


# ------------------------------------------------------------------------------------------------
# fully masked rows
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_fully_masked_rows_forward_backward(dtype):
    # causal with Nq > Nk: the first Nq - Nk rows sit before every key
    q, k, v = qkv(2, 4, 2, 13, 5, 16, dtype, seed=1)
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    dead = torch.arange(13) < 8
    assert torch.isneginf(lse[:, :, dead].cpu()).all() and torch.isfinite(lse[:, :, ~dead].cpu()).all()
    assert (out[:, :, dead].cpu() == 0).all() and not torch.isnan(out).any()
    do = randn(out.shape, gen(2), dtype)
    _, (dq, dk, dv) = dense_grads(q, k, v, do, causal=True)
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name} not finite with fully masked rows"
    assert (dq[:, :, dead].cpu() == 0).all(), "rows without keys must get dq = 0"
    ref = ref_grads(q, k, v, do, torch.float64, causal=True)
    low = ref_grads(q, k, v, do, dtype, causal=True)
    for name, a, lo, hi in zip(("dq", "dk", "dv"), (dq, dk, dv), low, ref):
        assert_close_rule(a, lo, hi, dtype, factor=3, what=name)


def test_window_masking_every_key_of_some_rows():
    # window (0, 0) without causal, Nq > Nk: row i sees only key i + Nk - Nq, absent for early rows
    q, k, v = qkv(1, 2, 1, 9, 4, 24, torch.float32, seed=3)
    out, lse = attention(q, k, v, window=(0, 0), return_lse=True)
    ro, rl = attention_reference(q, k, v, window=(0, 0))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl)) and torch.isneginf(rl[..., :5]).all()
    assert_close_rule(out, ro.float(), ro, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_no_keys_at_all(dtype):
    q, k, v = qkv(1, 2, 2, 3, 0, 16, dtype)
    out, lse = attention(q, k, v, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    do = randn(out.shape, gen(1), dtype)
    _, (dq, dk, dv) = dense_grads(q, k, v, do)
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


def test_varlen_empty_key_sequences():
    lq, lk = [3, 2, 4], [0, 5, 0]
    cq = torch.tensor([0, 3, 5, 9], dtype=torch.int32, device=DEV)
    ck = torch.tensor([0, 0, 5, 5], dtype=torch.int32, device=DEV)
    g = gen(4)
    q, k, v = randn((9, 2, 16), g, torch.float32), randn((5, 1, 16), g, torch.float32), randn((5, 1, 16), g, torch.float32)
    out, lse = attention_varlen(q, k, v, cq, ck, return_lse=True, causal=True)
    ro, rl = attention_reference_varlen(q, k, v, cq.cpu(), ck.cpu(), causal=True)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl))
    assert (out[:3] == 0).all() and (out[5:] == 0).all()
    assert_close_rule(out, ro.float(), ro, torch.float32)


# ------------------------------------------------------------------------------------------------
# scores of magnitude 1e4: no overflow in the low-precision paths
# ------------------------------------------------------------------------------------------------

def _big_scores(dtype, seed, B=1, H=2, Hkv=1, Nq=9, Nk=21, D=16):
    """q, k with |q.k| around 1e4 at scale 1 (entries ~ 25: fine in fp16 and bf16)."""
    q, k, v = qkv(B, H, Hkv, Nq, Nk, D, dtype, seed=seed, scale=25.0)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", LOWP)
def test_scores_1e4_forward(dtype, causal):
    q, k, v = _big_scores(dtype, 5)
    out, lse = attention(q, k, v, scale=1.0, causal=causal, return_lse=True)
    ro, rl = attention_reference(q, k, v, scale=1.0, causal=causal)
    assert rl.abs().max() > 3e3, "the test needs scores around 1e4"
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # against PyTorch in float32 (in fp16 PyTorch itself overflows): a stricter bound than the rule's
    t32, _ = attention_reference(q, k, v, scale=1.0, causal=causal, compute_dtype=torch.float32)
    assert_close_rule(out, t32, ro, dtype, what="out")
    assert (lse.double().cpu() - rl).abs().max() <= 1e-6 * rl.abs().max()


@pytest.mark.parametrize("dtype", LOWP)
def test_scores_1e4_backward(dtype):
    q, k, v = _big_scores(dtype, 6, Nq=7, Nk=7)
    do = randn(q.shape, gen(7), dtype)
    _, grads = dense_grads(q, k, v, do, scale=1.0, causal=True)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert torch.isfinite(g).all(), f"{name} overflowed with scores ~1e4"
    # p is one-hot up to exp(-gap): dv must be the reference's (exact up to rounding)
    ref = ref_grads(q, k, v, do, torch.float64, scale=1.0, causal=True)
    low = ref_grads(q, k, v, do, torch.float32, scale=1.0, causal=True)
    assert_close_rule(grads[2], low[2], ref[2], dtype, factor=3, what="dv")


@pytest.mark.parametrize("dtype", LOWP)
def test_scores_1e4_softcap_alibi(dtype):
    q, k, v = _big_scores(dtype, 8)
    slopes = torch.tensor([0.5, 2.0]).to(DEV)
    out = attention(q, k, v, scale=1.0, softcap=5e3, alibi_slopes=slopes, causal=True)
    ro, _ = attention_reference(q, k, v, scale=1.0, softcap=5e3, alibi_slopes=slopes.cpu(), causal=True)
    t32, _ = attention_reference(q, k, v, scale=1.0, softcap=5e3, alibi_slopes=slopes.cpu(), causal=True,
                                 compute_dtype=torch.float32)
    assert torch.isfinite(out).all()
    assert_close_rule(out, t32, ro, dtype)


@pytest.mark.parametrize("dtype", LOWP)
def test_scores_1e4_paged(dtype):
    g = gen(9)
    q, kc, vc, bt, sl = make_paged(2, 4, 2, 2, 16, 8, [5, 19], torch.float32, DEV, g)
    q, kc = (q * 25).to(dtype), (kc * 25).to(dtype)
    vc = vc.to(dtype)
    out, lse = paged_attention(q, kc, vc, bt, sl, scale=1.0, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    res = compare_paged(out, lse, q, kc, vc, bt, sl, torch.float32, scale=1.0)
    assert res.out.ours <= 2 * res.out.torch_err + ERROR_FLOOR[dtype] * 4, str(res)


# ------------------------------------------------------------------------------------------------
# length 1
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_length_one_dense(dtype):
    q, k, v = qkv(2, 2, 1, 1, 1, 16, dtype, seed=10)
    do = randn(q.shape, gen(11), dtype)
    out, grads = dense_grads(q, k, v, do, causal=True)
    # one key: softmax is 1, out = v exactly (up to the cast), dq = 0
    assert torch.equal(out, v.expand(2, 2, 1, 16).to(dtype))
    ref = ref_grads(q, k, v, do, torch.float64, causal=True)
    low = ref_grads(q, k, v, do, dtype, causal=True)
    for name, a, lo, hi in zip(("dq", "dk", "dv"), grads, low, ref):
        assert_close_rule(a, lo, hi, dtype, factor=3, what=name)


def test_length_one_varlen_and_paged():
    cu = torch.arange(5, dtype=torch.int32, device=DEV)
    g = gen(12)
    q, k, v = (randn((4, 2, 8), g, torch.float32) for _ in range(3))
    out = attention_varlen(q, k, v, cu, cu, causal=True)
    assert_close_rule(out, v.float(), v.double().cpu(), torch.float32)
    q, kc, vc, bt, sl = make_paged(3, 2, 1, 1, 8, 4, [1, 1, 1], torch.float16, DEV, g)
    out, lse = paged_attention(q, kc, vc, bt, sl, return_lse=True)
    assert compare_paged(out, lse, q, kc, vc, bt, sl, torch.float16).ok


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_length_one_linear(mode):
    g = gen(13)
    q, k, v = randn((2, 1, 2, 8), g, torch.float16), randn((2, 1, 2, 8), g, torch.float16), randn((2, 1, 2, 24), g, torch.float16)
    o, ht = linear_attention(q, k, v, output_final_state=True, mode=mode)
    ro, rf = linear_attention_parallel(q, k, v, None, None, None, True)
    lo, lf = linear_attention_parallel(q, k, v, None, None, None, True, compute_dtype=torch.float16)
    assert_close_rule(o, lo, ro, torch.float16)
    assert_close_rule(ht, lf, rf, torch.float16, what="final state")


# ------------------------------------------------------------------------------------------------
# head dims that are not powers of two
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("D", [1, 3, 24, 72])
def test_dense_odd_head_dims(D):
    dtype = torch.float32
    q, k, v = qkv(1, 2, 1, 11, 13, D, dtype, seed=20 + D)
    do = randn(q.shape, gen(21), dtype)
    out, grads = dense_grads(q, k, v, do, causal=True)
    ro, _ = attention_reference(q, k, v, causal=True)
    assert_close_rule(out, ro.float(), ro, dtype)
    ref = ref_grads(q, k, v, do, torch.float64, causal=True)
    low = ref_grads(q, k, v, do, dtype, causal=True)
    for name, a, lo, hi in zip(("dq", "dk", "dv"), grads, low, ref):
        assert_close_rule(a, lo, hi, dtype, factor=3, what=name)


@pytest.mark.parametrize("D", [24, 40])
def test_paged_odd_head_dims(D):
    q, kc, vc, bt, sl = make_paged(2, 2, 1, 2, D, 8, [3, 17], torch.float16, DEV, gen(D))
    out, lse = paged_attention(q, kc, vc, bt, sl, return_lse=True)
    assert compare_paged(out, lse, q, kc, vc, bt, sl, torch.float16).ok


def test_linear_odd_head_dims():
    g = gen(22)
    q, k, v = randn((1, 37, 2, 24), g, torch.float32), randn((1, 37, 2, 24), g, torch.float32), randn((1, 37, 2, 40), g, torch.float32)
    o, ht = linear_attention(q, k, v, output_final_state=True, chunk_size=32)
    ro, rf = linear_attention_parallel(q, k, v, None, None, None, True)
    assert_close_rule(o, ro.float(), ro, torch.float32)
    assert_close_rule(ht, rf.float(), rf, torch.float32, what="final state")
    s = randn((3, 2, 24, 40), g, torch.float32)
    o1, s1 = linear_attention_step(q[0, :3], k[0, :3], v[0, :3], s)
    r1, rs = step_reference(q[0, :3], k[0, :3], v[0, :3], s)
    assert_close_rule(o1, r1.float(), r1, torch.float32)
    assert_close_rule(s1, rs.float(), rs, torch.float32, what="state")


# ------------------------------------------------------------------------------------------------
# NaN containment
# ------------------------------------------------------------------------------------------------

def _row_nan(out):
    """[..., N, D] -> [..., N] True where the row has a NaN."""
    return torch.isnan(out).any(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_nan_in_q_stays_in_its_row(dtype):
    q, k, v = qkv(2, 4, 2, 20, 20, 16, dtype, seed=30)
    clean = attention(q, k, v, causal=True)
    q2 = q.clone()
    q2[1, 2, 7, 3] = float("nan")
    out = attention(q2, k, v, causal=True)
    hit = torch.zeros(2, 4, 20, dtype=torch.bool)
    hit[1, 2, 7] = True
    assert torch.equal(_row_nan(out).cpu(), hit)
    assert torch.equal(out[~hit.to(out.device)], clean[~hit.to(out.device)]), "rows without the NaN changed"


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_in_k_or_v_reaches_only_rows_that_see_it(which, causal):
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 19, 23, 16
    q, k, v = qkv(B, H, Hkv, Nq, Nk, D, torch.float32, seed=31)
    clean = attention(q, k, v, causal=causal, window=(6, -1))
    j = 17
    bad = (k if which == "k" else v).clone()
    bad[0, 1, j, 5] = float("nan")
    out = attention(q, bad if which == "k" else k, bad if which == "v" else v, causal=causal, window=(6, -1))
    sees = dense_mask(Nq, Nk, causal=causal, window=(6, -1))[:, j]        # [Nq]
    expect = torch.zeros(B, H, Nq, dtype=torch.bool)
    expect[0, 2:4] = sees                                                  # heads 2, 3 read KV head 1
    nan_rows = _row_nan(out).cpu()
    assert (nan_rows[expect]).all(), "a row that attends the NaN key is not NaN"
    same_group = torch.zeros_like(expect)
    same_group[0, 2:4] = True
    others = ~same_group
    assert torch.equal(out.cpu()[others], clean.cpu()[others]), "NaN leaked into another batch or KV group"
    if which == "k":  # masked entries are replaced, not multiplied: masked rows stay clean
        rest = same_group & ~expect
        assert torch.equal(out.cpu()[rest], clean.cpu()[rest]), "NaN key leaked into rows masked from it"


def test_nan_in_varlen_sequence_stays_in_it():
    cq = torch.tensor([0, 5, 12, 20], dtype=torch.int32, device=DEV)
    g = gen(32)
    q, k, v = (randn((20, 2, 16), g, torch.float32) for _ in range(3))
    clean = attention_varlen(q, k, v, cq, cq, causal=True)
    v2 = v.clone()
    v2[8, 0, 0] = float("nan")  # sequence 1 (tokens 5..11)
    out = attention_varlen(q, k, v2, cq, cq, causal=True)
    assert torch.equal(out[:5], clean[:5]) and torch.equal(out[12:], clean[12:])
    assert torch.isnan(out[8:12, 0]).any(-1).all(), "rows of sequence 1 that see token 8 must be NaN"
    assert torch.equal(out[:, 1], clean[:, 1]), "NaN leaked into another head"


def test_nan_in_paged_sequence_stays_in_it():
    q, kc, vc, bt, sl = make_paged(3, 4, 2, 2, 16, 4, [6, 13, 9], torch.float32, DEV, gen(33))
    clean = paged_attention(q, kc, vc, bt, sl)
    kc2 = kc.clone()
    kc2[int(bt[1, 1]), 2, 0, 0] = float("nan")   # sequence 1, token 6
    out = paged_attention(q, kc2, vc, bt, sl)
    assert torch.equal(out[[0, 2]], clean[[0, 2]]), "NaN leaked into another sequence"
    assert torch.isnan(out[1, :2]).any(-1).all() and not torch.isnan(out[1, 2:]).any()


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_nan_in_linear_sequence_stays_in_it(mode, which):
    cu = torch.tensor([0, 21, 40, 70], dtype=torch.int32, device=DEV)
    g = gen(34)
    q, k, v = (randn((1, 70, 2, 16), g, torch.float32) for _ in range(3))
    clean, _ = linear_attention(q, k, v, cu_seqlens=cu, mode=mode, chunk_size=32)
    k2, v2 = k.clone(), v.clone()
    (k2 if which == "k" else v2)[0, 30, 1, 2] = float("nan")   # sequence 1 (tokens 21..39), head 1
    out, _ = linear_attention(q, k2, v2, cu_seqlens=cu, mode=mode, chunk_size=32)
    assert torch.equal(out[0, :21], clean[0, :21]) and torch.equal(out[0, 40:], clean[0, 40:])
    assert torch.equal(out[0, :, 0], clean[0, :, 0]), "NaN leaked into another head"
    assert torch.isnan(out[0, 30:40, 1]).any(-1).all(), "rows at and after the NaN token must be NaN"
    if mode == "recurrent" or which == "k":
        # earlier rows never see token 30 (the chunked form's masked v product, 0 x NaN, is the
        # documented exception: NaN in v may reach earlier rows of its chunk)
        assert torch.equal(out[0, 21:30], clean[0, 21:30]), "NaN reached rows before its token"
