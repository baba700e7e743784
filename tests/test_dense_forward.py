"""Dense FlashAttention forward: shapes, layouts, masking edge cases, varlen, hooks, validation.

CPU tests run the Triton interpreter in fp16/fp32 against the float64 reference with the error
rule (ours <= 2 x PyTorch's own error in the same dtype + floor); outputs are poisoned with NaN.
GPU tests (marked gpu) cover bf16 at larger sizes on the portable and the TMA paths.
"""
from __future__ import annotations

import math

import pytest
import torch

import attention_proto  # noqa: F401
import triton
import triton.language as tl
from attention_proto.ops.dense import configs as cfgmod
from attention_proto.ops.dense.common import WINDOW_UNBOUNDED, kv_block_range, q_block_range
from attention_proto.ops.dense.configs import FwdConfig, forward_candidates, pick_forward_config
from attention_proto.ops.dense.forward import flash_attention_forward
from attention_proto.ops.dense.interface import attention, attention_varlen
from attention_proto.ops.dense.reference import (attention_reference, attention_reference_varlen,
                                                 dense_mask)
from attention_proto.ops.dense.rope import RopeSpec
from attention_proto.runtime.device import interpreter_mode, kernel_device
from attention_proto.testing import assert_close_rule, poison_

DEV = kernel_device()
GEN = torch.Generator().manual_seed(1234)


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=GEN) * scale).to(dtype=dtype).to(DEV)


def qkv(B, H, Hkv, Nq, Nk, D, dtype):
    return rand(B, H, Nq, D, dtype=dtype), rand(B, Hkv, Nk, D, dtype=dtype), rand(B, Hkv, Nk, D, dtype=dtype)


def check(q, k, v, dtype, config=None, **mods):
    """Run our forward into NaN-poisoned outputs and apply the error rule to out and lse."""
    B, H, Nq, D = q.shape
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(B, H, Nq, device=q.device, dtype=torch.float32))
    o, l = flash_attention_forward(q, k, v, out=out, lse=lse, config=config, **mods)
    assert o.data_ptr() == out.data_ptr() and l.data_ptr() == lse.data_ptr()
    ref_mods = {kk: vv for kk, vv in mods.items() if kk not in ("score_mod", "mask_mod")}
    if ref_mods.get("alibi_slopes") is True:
        from attention_proto.ops.dense.reference import alibi_slopes

        ref_mods["alibi_slopes"] = alibi_slopes(H)
    ro, rl = attention_reference(q.cpu(), k.cpu(), v.cpu(), **ref_mods)
    to, tl_ = attention_reference(q.cpu(), k.cpu(), v.cpu(), compute_dtype=dtype, **ref_mods)
    assert not torch.isnan(o).any(), "NaN in output"
    assert not torch.isnan(l).any(), "NaN in lse"
    assert_close_rule(o, to, ro, dtype, what="out")
    # fully masked rows: exactly 0 and -inf
    dead = torch.isinf(rl)
    assert torch.equal(torch.isinf(l.cpu()), dead), "LSE -inf pattern differs from the reference"
    if dead.any():
        assert (o.cpu()[dead] == 0).all(), "fully masked rows must give output 0"
    live = ~dead
    if live.any():
        assert_close_rule(l.cpu()[live], tl_.float()[live], rl[live], dtype, what="lse")
    return o, l


DTYPES = [torch.float16, torch.float32]


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("N,D", [(1, 64), (17, 40), (97, 96), (130, 64)])
def test_square(N, D, causal, dtype):
    q, k, v = qkv(1, 2, 2, N, N, D, dtype)
    check(q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Nq,Nk,D", [(17, 97, 64), (97, 17, 40), (1, 130, 64), (130, 33, 96)])
def test_nq_ne_nk(Nq, Nk, D, causal, dtype):
    q, k, v = qkv(1, 2, 2, Nq, Nk, D, dtype)
    check(q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("H,Hkv", [(4, 1), (8, 2)], ids=["mqa", "gqa4"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa(H, Hkv, causal):
    q, k, v = qkv(2, H, Hkv, 23, 31, 32, torch.float16)
    check(q, k, v, torch.float16, causal=causal)


def test_scale_and_large_values():
    q, k, v = qkv(1, 2, 2, 33, 33, 64, torch.float32)
    check(q * 4, k * 4, v, torch.float32, scale=0.3)


def test_block_configs_portable():
    """Other tile shapes through the same kernel (rectangular tiles, BLOCK_M != BLOCK_N)."""
    q, k, v = qkv(1, 2, 1, 45, 70, 40, torch.float32)
    for cfg in (FwdConfig(32, 16, 4, 1), FwdConfig(16, 32, 4, 1)):
        check(q, k, v, torch.float32, config=cfg, causal=True)
        check(q, k, v, torch.float32, config=cfg, window=(9, 3))


# ----------------------------------------------------------------------------------------------
# fully masked rows
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
def test_causal_nq_gt_nk_rows_without_keys(dtype):
    q, k, v = qkv(1, 2, 2, 40, 17, 64, dtype)
    o, l = check(q, k, v, dtype, causal=True)
    assert torch.isinf(l[:, :, :23]).all() and (o[:, :, :23] == 0).all()
    assert torch.isfinite(l[:, :, 23:]).all()


def test_window_masks_rows():
    q, k, v = qkv(1, 2, 2, 20, 3, 32, torch.float32)
    o, l = check(q, k, v, torch.float32, window=(1, 0))
    assert torch.isinf(l[:, :, :17]).all()


def test_window_masks_everything():
    # every query sits left of all keys: Nq = 30, Nk = 4, right = 0 with causal -> rows < 26 empty;
    # with left=0, right=0 and off=-26 none of the first 26 rows has a key
    q, k, v = qkv(1, 1, 1, 30, 4, 16, torch.float32)
    o, l = check(q, k, v, torch.float32, window=(0, 0))
    assert torch.isinf(l[:, :, :26]).all() and (o[:, :, :26] == 0).all()


def test_nk_zero():
    q = rand(1, 2, 5, 32)
    k = rand(1, 2, 0, 32)
    out, lse = attention(q, k, k, return_lse=True)
    assert out.shape == q.shape and (out == 0).all() and torch.isneginf(lse).all()


def test_nq_zero_and_b_zero():
    q = rand(1, 2, 0, 32)
    k = rand(1, 2, 7, 32)
    out, lse = attention(q, k, k, return_lse=True)
    assert out.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)
    q = rand(0, 2, 3, 32)
    out = attention(q, rand(0, 2, 7, 32), rand(0, 2, 7, 32))
    assert out.shape == (0, 2, 3, 32)


# ----------------------------------------------------------------------------------------------
# layouts and strides
# ----------------------------------------------------------------------------------------------

def test_bshd_layout_via_interface():
    dtype = torch.float16
    q = rand(2, 19, 4, 64, dtype=dtype)
    k = rand(2, 25, 2, 64, dtype=dtype)
    v = rand(2, 25, 2, 64, dtype=dtype)
    out, lse = attention(q, k, v, causal=True, layout="bshd", return_lse=True)
    assert out.shape == q.shape and out.stride() == q.stride(), "out must keep q's BSHD layout"
    ro, rl = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    to, _ = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                compute_dtype=dtype)
    assert_close_rule(out.transpose(1, 2), to, ro, dtype)
    assert lse.shape == (2, 4, 19)


def test_bshd_strided_low_level():
    q, k, v = (rand(1, 21, 2, 32).transpose(1, 2), rand(1, 18, 2, 32).transpose(1, 2),
               rand(1, 18, 2, 32).transpose(1, 2))
    o, _ = check(q, k, v, torch.float32, causal=True)


def test_non_contiguous_inputs():
    big = rand(2, 3, 40, 80)
    q = big[:, :2, 3:30, 8:72]          # slice of heads, rows and head dim
    k = rand(2, 40, 2, 64)[:, ::2].transpose(1, 2)  # every other key, BSHD view
    v = rand(2, 2, 20, 128)[..., ::2]   # strided head dim
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    check(q, k, v, torch.float32, causal=True)


def test_output_layout_follows_q():
    q = rand(1, 9, 2, 32).transpose(1, 2)
    k = rand(1, 2, 9, 32)
    o, _ = flash_attention_forward(q, k, k)
    assert o.stride() == q.stride()


# ----------------------------------------------------------------------------------------------
# hooks
# ----------------------------------------------------------------------------------------------

@triton.jit
def alibi_score_mod(score, b, h, q_idx, kv_idx):
    # slopes 0.5 for head 0 and 0.25 for head 1; Nq == Nk so no offset
    slope = tl.where(h == 0, 0.5, 0.25)
    d = q_idx - kv_idx
    d = tl.where(d < 0, -d, d)
    return score - slope * d.to(tl.float32)


@triton.jit
def causal_mask_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def test_score_mod_reproduces_alibi():
    q, k, v = qkv(1, 2, 2, 29, 29, 32, torch.float32)
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(1, 2, 29))
    flash_attention_forward(q, k, v, score_mod=alibi_score_mod, out=out, lse=lse)
    ro, rl = attention_reference(q, k, v, alibi_slopes=torch.tensor([0.5, 0.25]))
    to, _ = attention_reference(q, k, v, alibi_slopes=torch.tensor([0.5, 0.25]), compute_dtype=torch.float32)
    assert_close_rule(out, to, ro, torch.float32)
    assert_close_rule(lse, rl.float(), rl, torch.float32, what="lse")


def test_mask_mod_reproduces_causal():
    q, k, v = qkv(1, 2, 2, 37, 37, 32, torch.float16)
    out = attention(q, k, v, mask_mod=causal_mask_mod)
    ro, _ = attention_reference(q, k, v, causal=True)
    to, _ = attention_reference(q, k, v, causal=True, compute_dtype=torch.float16)
    assert_close_rule(out, to, ro, torch.float16)


def test_mask_mod_all_false_gives_zero_rows():
    @triton.jit
    def none_mask(b, h, q_idx, kv_idx):
        return (kv_idx < 0) & (q_idx >= 0)

    q, k, v = qkv(1, 1, 1, 5, 9, 16, torch.float32)
    out, lse = attention(q, k, v, mask_mod=none_mask, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


# ----------------------------------------------------------------------------------------------
# varlen
# ----------------------------------------------------------------------------------------------

def _varlen_inputs(lq, lk, H, Hkv, D, dtype):
    cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32, device=DEV)
    ck = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32, device=DEV)
    q = rand(int(cq[-1]), H, D, dtype=dtype)
    k = rand(int(ck[-1]), Hkv, D, dtype=dtype)
    v = rand(int(ck[-1]), Hkv, D, dtype=dtype)
    return q, k, v, cq, ck


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "fp32"])
@pytest.mark.parametrize("mods", [dict(causal=False), dict(causal=True), dict(causal=True, window=(5, 0)),
                                  dict(rope=RopeSpec("half"), causal=True)], ids=["full", "causal", "window", "rope"])
def test_varlen(mods, dtype):
    lq, lk = [5, 1, 0, 19, 3], [7, 1, 4, 19, 0]
    q, k, v, cq, ck = _varlen_inputs(lq, lk, 4, 2, 32, dtype)
    out, lse = attention_varlen(q, k, v, cq, ck, max(lq), max(lk), return_lse=True, **mods)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    ro, rl = attention_reference_varlen(q.cpu(), k.cpu(), v.cpu(), cq.cpu(), ck.cpu(), **mods)
    to, _ = attention_reference_varlen(q.cpu(), k.cpu(), v.cpu(), cq.cpu(), ck.cpu(), compute_dtype=dtype, **mods)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close_rule(out, to, ro, dtype)
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(rl))
    live = torch.isfinite(rl)
    assert_close_rule(lse.cpu()[live], rl.float()[live], rl[live], dtype, what="lse")


def test_varlen_poisoned_low_level():
    q, k, v, cq, ck = _varlen_inputs([3, 17], [17, 3], 2, 1, 16, torch.float32)
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(2, q.shape[0]))
    flash_attention_forward(q, k, v, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck, out=out, lse=lse)
    ro, rl = attention_reference_varlen(q, k, v, cq, ck, causal=True)
    assert_close_rule(out, ro.float(), ro, torch.float32)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))


# ----------------------------------------------------------------------------------------------
# block ranges (common.py): visited blocks cover every allowed pair, skip fully masked blocks
# ----------------------------------------------------------------------------------------------

@triton.jit
def _ranges_kernel(OUT, QOUT, Nq, Nk, wl, wr, BM: tl.constexpr, BN: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    pid = tl.program_id(0)
    lo, flo, fhi, hi = kv_block_range(pid * BM, Nq, Nk, wl, wr, BM, BN, IS_CAUSAL, HAS_WINDOW)
    tl.store(OUT + pid * 4 + 0, lo)
    tl.store(OUT + pid * 4 + 1, flo)
    tl.store(OUT + pid * 4 + 2, fhi)
    tl.store(OUT + pid * 4 + 3, hi)
    qlo, qhi = q_block_range(pid * BN, Nq, Nk, wl, wr, BN, IS_CAUSAL, HAS_WINDOW)
    tl.store(QOUT + pid * 2 + 0, qlo)
    tl.store(QOUT + pid * 2 + 1, qhi)


def test_block_ranges_exhaustive_random():
    g = torch.Generator().manual_seed(7)
    for _ in range(60):
        Nq, Nk = (int(x) for x in torch.randint(1, 70, (2,), generator=g))
        BM, BN = (16, 32)[int(torch.randint(0, 2, (1,), generator=g))], (16, 32)[int(torch.randint(0, 2, (1,), generator=g))]
        causal = bool(torch.randint(0, 2, (1,), generator=g))
        wl, wr = (int(x) - 1 for x in torch.randint(0, 20, (2,), generator=g))
        has_w = wl >= 0 or wr >= 0
        window = (wl, wr)
        allowed = dense_mask(Nq, Nk, causal=causal, window=window if has_w else None)
        nm, nn = triton.cdiv(Nq, BM), triton.cdiv(Nk, BN)
        grid = max(nm, nn)
        out = torch.zeros(grid * 4, dtype=torch.int32, device=DEV)
        qout = torch.zeros(grid * 2, dtype=torch.int32, device=DEV)
        _ranges_kernel[(grid,)](out, qout, Nq, Nk, wl if wl >= 0 else WINDOW_UNBOUNDED,
                                wr if wr >= 0 else WINDOW_UNBOUNDED, BM=BM, BN=BN, IS_CAUSAL=causal, HAS_WINDOW=has_w)
        out, qout = out.view(-1, 4).cpu().tolist(), qout.view(-1, 2).cpu().tolist()
        ctx = f"Nq={Nq} Nk={Nk} BM={BM} BN={BN} causal={causal} window={window}"
        for mb in range(nm):
            lo, flo, fhi, hi = out[mb]
            rows = allowed[mb * BM:(mb + 1) * BM]
            assert lo % BN == 0 and flo % BN == 0 and fhi % BN == 0 and lo <= flo <= fhi, ctx
            for nb in range(nn):
                s = nb * BN
                blk = rows[:, s:s + BN]
                visited = (lo <= s < flo) or (flo <= s < fhi) or (fhi <= s < hi)
                if blk.any():
                    assert visited, f"block {nb} of q block {mb} holds allowed pairs but is skipped: {ctx}"
                else:
                    assert not visited, f"fully masked block {nb} of q block {mb} is visited: {ctx} {out[mb]}"
                if flo <= s < fhi:
                    assert blk.shape[1] == BN and blk.all(), f"block {nb} of q block {mb} is not mask-free: {ctx}"
        for nb in range(nn):
            qlo, qhi = qout[nb]
            cols = allowed[:, nb * BN:(nb + 1) * BN].any(1)
            idx = cols.nonzero().flatten().tolist()
            if idx:
                assert qlo <= idx[0] and idx[-1] < qhi, ctx
            else:
                assert qhi <= qlo or not cols[qlo:qhi].any(), ctx


# ----------------------------------------------------------------------------------------------
# TMA path: its indexing runs under the interpreter too (descriptors are emulated)
# ----------------------------------------------------------------------------------------------

TMA_CFG = FwdConfig(16, 16, 4, 2, "tma")


@pytest.mark.parametrize("path", ["tma", "tma+ws"])
@pytest.mark.parametrize("case", [
    dict(Nq=37, Nk=37, causal=False), dict(Nq=37, Nk=37, causal=True), dict(Nq=13, Nk=45, causal=True),
    dict(Nq=45, Nk=13, causal=True), dict(Nq=30, Nk=41, window=(6, 3)), dict(Nq=33, Nk=33, softcap=3.0),
    dict(Nq=20, Nk=29, alibi_slopes=True, causal=True), dict(Nq=25, Nk=25, layout="bshd", causal=True),
    dict(Nq=21, Nk=21, mask_mod=causal_mask_mod), dict(Nq=29, Nk=29, score_mod=alibi_score_mod),
    dict(Nq=19, Nk=35, causal=True, rope=RopeSpec("half")), dict(Nq=35, Nk=19, causal=True, rope=RopeSpec("interleaved")),
    dict(Nq=23, Nk=23, rope=RopeSpec("half", q_offset=5, k_offset=3), softcap=4.0),
    dict(Nq=20, Nk=29, alibi_slopes=True),
], ids=["full", "causal", "nq<nk", "nq>nk", "window", "softcap", "alibi", "bshd", "mask_mod", "score_mod",
        "rope_half", "rope_interleaved_nq>nk", "rope_offsets_softcap", "alibi_noncausal"])
def test_tma_kernel_logic(case, path):
    case = dict(case)
    cfg = FwdConfig(16, 16, 8 if path == "tma+ws" else 4, 2, path)  # warp specialization needs 8 warps
    Nq, Nk, layout = case.pop("Nq"), case.pop("Nk"), case.pop("layout", "bhsd")
    H, Hkv = (2, 2) if "score_mod" in case else (4, 2)
    q, k, v = qkv(1, H, Hkv, Nq, Nk, 32, torch.float16)
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    if interpreter_mode():
        from attention_proto.ops.dense.forward_tma import supports

        assert supports(q, k, v, check_device=False) == []
    if "score_mod" in case:
        out = poison_(torch.empty_like(q))
        lse = poison_(torch.empty(1, H, Nq, device=q.device))
        flash_attention_forward(q, k, v, config=cfg, out=out, lse=lse, **case)
        ro, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), alibi_slopes=torch.tensor([0.5, 0.25]))
        to, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), alibi_slopes=torch.tensor([0.5, 0.25]),
                                    compute_dtype=torch.float16)
        assert_close_rule(out, to, ro, torch.float16)
        return
    if "mask_mod" in case:
        out = flash_attention_forward(q, k, v, config=cfg, **case)[0]
        ro, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), causal=True)
        to, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), causal=True, compute_dtype=torch.float16)
        assert_close_rule(out, to, ro, torch.float16)
        return
    check(q, k, v, torch.float16, config=cfg, **case)


def test_tma_supports_reasons():
    from attention_proto.ops.dense.forward_tma import supports

    q, k, v = qkv(1, 2, 2, 8, 8, 40, torch.float32)
    r = " | ".join(supports(q, k, v, rope=RopeSpec(), varlen=True))
    for needle in ("float32", "head dim 40", "varlen"):
        assert needle in r, (needle, r)
    if interpreter_mode():
        assert "interpreter" in r
    q, k, v = qkv(1, 2, 2, 8, 8, 64, torch.float16)
    r = " ".join(supports(q, k, v.transpose(2, 3).contiguous().transpose(2, 3), check_device=False))
    assert "last-dim stride" in r
    r = " ".join(supports(q, k, torch.empty(1, 2, 8, 65, dtype=torch.float16, device=DEV)[..., :64], check_device=False))
    assert "16-byte aligned" in r
    kb = torch.randn(1, 1, 8, 64, dtype=torch.float16, device=DEV).expand(1, 2, 8, 64)  # head stride 0
    assert "a stride is 0" in " ".join(supports(q, kb, kb, check_device=False))
    r = " ".join(supports(q, k[:, :, :0], v[:, :, :0], check_device=False))
    assert "empty sequence" in r
    from attention_proto.ops.dense import forward_tma_varlen

    r = " | ".join(forward_tma_varlen.supports(q[0], k[0], v[0], rope=RopeSpec(), check_device=False,
                                               config=FwdConfig(128, 64, 8, 2, "tma+ws")))
    for needle in ("RoPE", "warp-specialized"):
        assert needle in r, (needle, r)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="varlen TMA forward path does not apply.*RoPE"):
        flash_attention_forward(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), rope=RopeSpec(),
                                cu_seqlens_q=cu, cu_seqlens_k=cu, config=TMA_CFG)


@pytest.mark.parametrize("mods", [dict(causal=False), dict(causal=True), dict(causal=True, window=(5, 0)),
                                  dict(window=(4, 6)), dict(causal=True, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 1.0])),
                                  dict(softcap=3.0)],
                         ids=["full", "causal", "window", "window2", "alibi", "softcap"])
def test_tma_varlen_kernel_logic(mods):
    """The varlen TMA kernel (descriptors emulated by the interpreter): per-sequence alignment, empty
    sequences, tiles running into the next sequence -- whose V holds a NaN that must not leak."""
    lq, lk = [5, 1, 0, 19, 3, 20], [7, 1, 4, 19, 0, 33]
    q, k, v, cq, ck = _varlen_inputs(lq, lk, 4, 2, 32, torch.float16)
    v[int(ck[4]) + 30] = float("nan")  # inside the last sequence only
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(4, q.shape[0], device=q.device))
    flash_attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, config=TMA_CFG, out=out, lse=lse, **mods)
    last = int(cq[5])
    ro, rl = attention_reference_varlen(q.cpu(), k.cpu(), v.cpu(), cq.cpu(), ck.cpu(), **mods)
    to, _ = attention_reference_varlen(q.cpu(), k.cpu(), v.cpu(), cq.cpu(), ck.cpu(), compute_dtype=torch.float16, **mods)
    assert not torch.isnan(out[:last]).any() and not torch.isnan(lse[:, :last]).any()
    assert_close_rule(out[:last], to[:last], ro[:last], torch.float16)
    assert torch.equal(torch.isinf(lse.cpu()[:, :last]), torch.isinf(rl[:, :last]))
    live = torch.isfinite(rl[:, :last])
    assert_close_rule(lse.cpu()[:, :last][live], rl[:, :last].float()[live], rl[:, :last][live], torch.float16,
                      what="lse")


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------

def test_pick_config_interpreter_and_candidates():
    if interpreter_mode():
        assert pick_forward_config(64, torch.float16, True, 128) == FwdConfig(16, 16, 4, 1, "portable")
    cands = forward_candidates(128, torch.bfloat16)
    assert cands and {c.path for c in cands} == {"portable", "tma", "tma+ws"}
    assert all(c.BLOCK_M in (64, 128) and c.BLOCK_N in (32, 64, 128) for c in cands)
    assert len(forward_candidates(256, torch.bfloat16)) < len(cands)  # shared memory prunes D=256


def test_config_table_lookup(tmp_path, monkeypatch):
    import json

    table = {"version": 1, "entries": [
        {"D": 64, "dtype": "bfloat16", "causal": True, "N": 1024, "path": "tma", "BLOCK_M": 128, "BLOCK_N": 64,
         "num_warps": 4, "num_stages": 3, "tflops": 300.0},
        {"D": 64, "dtype": "bfloat16", "causal": True, "N": 1024, "path": "portable", "BLOCK_M": 64, "BLOCK_N": 64,
         "num_warps": 4, "num_stages": 2, "tflops": 200.0},
        {"D": 64, "dtype": "bfloat16", "causal": True, "N": 8192, "path": "tma", "BLOCK_M": 128, "BLOCK_N": 128,
         "num_warps": 8, "num_stages": 2, "tflops": 400.0},
    ]}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(table))
    monkeypatch.setattr(cfgmod, "TABLE_PATH", p)
    cfgmod.reload_table()
    try:
        c = cfgmod._from_table(64, torch.bfloat16, True, 2048, cfgmod.PATHS)
        assert c == FwdConfig(128, 64, 4, 3, "tma")
        c = cfgmod._from_table(48, torch.bfloat16, True, 6000, ("portable", "tma"))
        assert c == FwdConfig(128, 128, 8, 2, "tma")
        c = cfgmod._from_table(64, torch.bfloat16, True, 1024, ("portable",))
        assert c == FwdConfig(64, 64, 4, 2, "portable")
        assert cfgmod._from_table(128, torch.bfloat16, True, 1024, cfgmod.PATHS) is None
        assert cfgmod._from_table(64, torch.float16, True, 1024, cfgmod.PATHS) is None
    finally:
        monkeypatch.undo()
        cfgmod.reload_table()


def test_auto_pick_of_a_portable_entry_is_shrunk_for_rope(tmp_path, monkeypatch):
    """GPU fuzz (session 7, dense_bwd): "auto" took the table's portable 64x64 w4 s3 tile at D128 for a
    RoPE call without the RoPE shrink; the kernel needed 278528 bytes of shared memory (H100: 232448)."""
    import json

    table = {"version": 1, "entries": [
        {"D": 128, "dtype": "bfloat16", "causal": True, "N": 512, "path": "portable", "BLOCK_M": 64, "BLOCK_N": 64,
         "num_warps": 4, "num_stages": 3, "tflops": 300.0},
        {"D": 128, "dtype": "bfloat16", "causal": True, "N": 512, "path": "tma", "BLOCK_M": 64, "BLOCK_N": 64,
         "num_warps": 4, "num_stages": 3, "tflops": 200.0}]}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(table))
    monkeypatch.setattr(cfgmod, "TABLE_PATH", p)
    monkeypatch.setattr(cfgmod, "interpreter_mode", lambda: False)
    cfgmod.reload_table()
    from attention_proto.ops.dense import forward as F

    monkeypatch.setattr(F, "_tma_path_usable", lambda *a, **kw: True)  # as on Hopper: the plan asks for "auto"
    try:
        plain = cfgmod.pick_forward_config(128, torch.bfloat16, True, 512, "auto", False)
        assert plain == FwdConfig(64, 64, 4, 3, "portable")
        q = torch.empty(1, 16, 600, 128, dtype=torch.bfloat16)  # past SMALL_PROBLEM_SCORES: the TMA-capable plan
        # the in-kernel rotation ("tile") needs the shrink; rotating q and k first ("rotate", what "auto"
        # does at this size) runs the plain kernel on the plain tile
        for mode, rope_mode, fused in (("tile", 0, False), ("tile", 1, True), ("auto", 1, False)):
            monkeypatch.setattr(F, "PORTABLE_ROPE", mode)
            plan = F._make_plan(q, q, q, q, None, B=1, H=16, Hkv=16, Nq=600, Nk=600, D=128, varlen=False, causal=True,
                                left=-1, right=-1, has_softcap=False, has_alibi=False, rope_mode=rope_mode,
                                rope_args=(64, 1024, 0, 1, 0), score_mod=None, mask_mod=None, config=None,
                                aligned=True, positive_scale=True)
            c = plan.consts
            cfg = FwdConfig(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"], "portable")
            assert plan.kernel is F._fwd_kernel
            assert cfgmod.fits(cfg, 128, torch.bfloat16, rope=fused), (rope_mode, cfg)
            assert (cfg == plain) == (not fused)
            assert c["ROPE"] == (1 if fused else 0) and (plan.rotate is not None) == (mode == "auto")
    finally:
        monkeypatch.undo()
        cfgmod.reload_table()


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

def _good():
    return rand(1, 4, 8, 32), rand(1, 2, 8, 32), rand(1, 2, 8, 32)


@pytest.mark.parametrize("make,exc,pattern", [
    (lambda q, k, v: attention(q[0], k, v), ValueError, r"q must have 4 dimensions.*shape=\(4, 8, 32\)"),
    (lambda q, k, v: attention(q, k.half(), v), TypeError, r"share one dtype.*k=torch.float16"),
    (lambda q, k, v: attention(q.double(), k.double(), v.double()), TypeError, r"q has dtype torch.float64; supported"),
    (lambda q, k, v: attention(q, k, v, layout="bnhd"), ValueError, r"layout must be one of 'bhsd', 'bshd'; got 'bnhd'"),
    (lambda q, k, v: attention(q[:, :3], k, v), ValueError, r"multiple of k/v heads \(2\)"),
    (lambda q, k, v: attention(q, k[..., :16], v), ValueError, r"k head dim \(16\) must equal q head dim \(32\)"),
    (lambda q, k, v: attention(q, k, v[..., :16]), ValueError, r"Dv != D is not supported"),
    (lambda q, k, v: attention(q, k[:, :1], v), ValueError, r"k and v must have the same number of heads"),
    (lambda q, k, v: attention(q, k[:, :, :5], v), ValueError, r"same sequence length"),
    (lambda q, k, v: attention(rand(1, 2, 3, 300), rand(1, 2, 3, 300), rand(1, 2, 3, 300)), ValueError, r"D must be in \[1, 256\]; got D=300"),
    (lambda q, k, v: attention(q, k, v, softcap=0.0), ValueError, r"softcap must be None or a finite real number > 0; got float\(0.0\)"),
    (lambda q, k, v: attention(q, k, v, window=(1, 2, 3)), ValueError, r"window must be None, an int"),
    (lambda q, k, v: attention(q, k, v, window="left"), ValueError, r"window must be None"),
    (lambda q, k, v: attention(q, k, v, alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must be a float tensor of shape \[H\] = \[4\]"),
    (lambda q, k, v: attention(q, k, v, alibi_slopes=[0.5] * 4), TypeError, r"alibi_slopes must be None, True"),
    (lambda q, k, v: attention(q, k, v, rope="half"), TypeError, r"rope must be None or a RopeSpec; got str"),
    (lambda q, k, v: attention(q[..., :31], k[..., :31], v[..., :31], rope=RopeSpec()), ValueError, r"rope needs an even head dim"),
    (lambda q, k, v: attention(q, k, v, rope=RopeSpec(cos=torch.ones(4, 16), sin=torch.ones(4, 16))), ValueError, r"tables have 4 positions"),
    (lambda q, k, v: attention(q, k, v, score_mod=lambda s, b, h, i, j: s), TypeError, r"score_mod must be None or a @triton.jit function"),
    (lambda q, k, v: attention(q, k, v, scale="x"), TypeError, r"scale must be None or a finite real number"),
    (lambda q, k, v: attention(q, k, v, causal=1), TypeError, r"causal must be a bool"),
    (lambda q, k, v: attention("q", k, v), TypeError, r"q must be a torch.Tensor; got str"),
])
def test_validation_errors(make, exc, pattern):
    q, k, v = _good()
    with pytest.raises(exc, match=pattern):
        make(q, k, v)


def test_validation_device_and_bf16():
    q, k, v = _good()
    if interpreter_mode():
        with pytest.raises(TypeError, match="bfloat16.*interpreter"):
            attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    else:
        with pytest.raises(ValueError, match="kernels run on cuda"):
            attention(q.cpu(), k.cpu(), v.cpu())


def test_validation_varlen():
    q, k, v, cq, ck = _varlen_inputs([3, 4], [2, 5], 2, 2, 16, torch.float32)
    with pytest.raises(TypeError, match=r"cu_seqlens_q must have dtype int32"):
        attention_varlen(q, k, v, cq.long(), ck)
    with pytest.raises(ValueError, match=r"cu_seqlens_k must start at 0"):
        attention_varlen(q, k, v, cq, ck + 1)
    with pytest.raises(ValueError, match=r"non-decreasing"):
        attention_varlen(q, k, v, torch.tensor([0, 5, 3, 7], dtype=torch.int32, device=DEV), ck)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] must equal the number of tokens of q \(7\); got 6"):
        attention_varlen(q, k, v, torch.tensor([0, 3, 6], dtype=torch.int32, device=DEV), ck)
    with pytest.raises(ValueError, match=r"same length B \+ 1"):
        attention_varlen(q, k, v, torch.tensor([0, 7], dtype=torch.int32, device=DEV), ck)
    with pytest.raises(ValueError, match=r"max_seqlen_q must be None or an int >= the longest sequence \(4\)"):
        attention_varlen(q, k, v, cq, ck, 3, 5)
    with pytest.raises(ValueError, match=r"q must have 3 dimensions"):
        attention_varlen(q[None], k, v, cq, ck)


def test_grad_path_reports_missing_backward_or_runs():
    q, k, v = _good()
    q.requires_grad_(True)
    try:
        from attention_proto.ops.dense.autograd import DenseAttentionFn  # noqa: F401
    except ImportError:
        with pytest.raises(NotImplementedError, match="dense backward"):
            attention(q, k, v)
        return
    out = attention(q, k, v, causal=True)
    assert out.requires_grad
    with pytest.raises(NotImplementedError, match="score_mod/mask_mod have no backward"):
        attention(q, k, v, mask_mod=causal_mask_mod)


# ----------------------------------------------------------------------------------------------
# GPU (bf16, larger sizes, both paths)
# ----------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_check(B, H, Hkv, N, D, causal, path, Nk=None, layout="bhsd", **mods):
    from attention_proto.ops.dense.forward_tma import supports

    Nk = N if Nk is None else Nk
    dtype = torch.bfloat16
    q, k, v = qkv(B, H, Hkv, N, Nk, D, dtype)
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    if path != "portable":
        reasons = supports(q, k, v, **{kk: vv for kk, vv in mods.items() if kk in ("rope", "score_mod", "mask_mod")})
        assert not reasons, reasons
    # per-tile RoPE on the portable kernel needs the shrunk tile (partner-column loads)
    cfg = pick_forward_config(D, dtype, causal, N, path, path == "portable" and mods.get("rope") is not None)
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(B, H, N, device=q.device, dtype=torch.float32))
    flash_attention_forward(q, k, v, causal=causal, config=cfg, out=out, lse=lse, **mods)
    ro, rl = attention_reference(q, k, v, causal=causal, device="cuda", **mods)
    to, _ = attention_reference(q, k, v, causal=causal, compute_dtype=dtype, device="cuda", **mods)
    assert_close_rule(out, to, ro, dtype)
    live = torch.isfinite(rl)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    assert_close_rule(lse[live], rl.float()[live], rl[live], dtype, what="lse")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path", ["portable", "tma"])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("N", [1024, 4096])
def test_gpu_bf16(N, causal, D, path):
    _gpu_check(1, 4, 2, N, D, causal, path)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path", ["portable", "tma", "tma+ws"])
@pytest.mark.parametrize("case", [
    dict(N=1000, Nk=1000, D=64), dict(N=333, Nk=1777, D=128), dict(N=1777, Nk=333, D=128),
    dict(N=2048, D=128, layout="bshd"), dict(N=1031, D=64, window=(256, 0)), dict(N=1024, D=128, softcap=30.0),
    dict(N=1024, D=64, alibi_slopes=True), dict(N=1000, Nk=1500, D=128, rope=RopeSpec("half")),
    dict(N=777, D=64, rope=RopeSpec("interleaved", q_offset=3, k_offset=11), softcap=20.0),
], ids=["ragged", "nq<nk", "nq>nk", "bshd", "window", "softcap", "alibi", "rope_half", "rope_interleaved_softcap"])
def test_gpu_bf16_cases(case, path):
    case = dict(case)
    if case.get("alibi_slopes") is True:
        from attention_proto.ops.dense.reference import alibi_slopes

        case["alibi_slopes"] = alibi_slopes(8).cuda()
    N = case.pop("N")
    D = case.pop("D")
    _gpu_check(2, 8, 2, N, D, True, path, **case)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mods", [dict(causal=True), dict(), dict(causal=True, window=(300, 0)), dict(softcap=30.0),
                                  dict(causal=True, alibi_slopes=True)], ids=["causal", "full", "window", "softcap", "alibi"])
def test_gpu_varlen_tma_bf16(mods):
    from attention_proto.ops.dense.configs import pick_forward_config
    from attention_proto.ops.dense.reference import alibi_slopes

    mods = dict(mods)
    if mods.get("alibi_slopes") is True:
        mods["alibi_slopes"] = alibi_slopes(8).cuda()
    lq, lk = [1000, 1, 0, 777, 130], [1000, 5, 9, 2049, 0]
    dtype = torch.bfloat16
    q, k, v, cq, ck = _varlen_inputs(lq, lk, 8, 2, 128, dtype)
    cfg = pick_forward_config(128, dtype, bool(mods.get("causal")), 2048, "tma")
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(8, q.shape[0], device=q.device))
    flash_attention_forward(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, config=cfg, out=out, lse=lse, **mods)
    ro, rl = attention_reference_varlen(q, k, v, cq, ck, **mods)
    to, _ = attention_reference_varlen(q, k, v, cq, ck, compute_dtype=dtype, **mods)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close_rule(out, to, ro, dtype)
    lse, rl = lse.cpu(), rl.cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    live = torch.isfinite(rl)
    assert_close_rule(lse[live], rl.float()[live], rl[live], dtype, what="lse")


@pytest.mark.gpu
@gpu
def test_gpu_varlen_and_rope_bf16():
    lq, lk = [1000, 1, 0, 777], [1000, 5, 9, 2049]
    dtype = torch.bfloat16
    q, k, v, cq, ck = _varlen_inputs(lq, lk, 8, 2, 128, dtype)
    for mods in (dict(causal=True), dict(causal=True, rope=RopeSpec("interleaved"))):
        out, lse = attention_varlen(q, k, v, cq, ck, return_lse=True, **mods)
        assert not torch.isnan(out).any()
        check_varlen_per_sequence(out, q, k, v, cq, ck, dtype, **mods)


def check_varlen_per_sequence(out, q, k, v, cq, ck, dtype, what="", **mods):
    """The error rule on each packed sequence of a varlen ``out`` [T, H, D] against the dense reference."""
    for b in range(len(cq) - 1):
        qs, ks, vs = (x[c[b]:c[b + 1]].transpose(0, 1)[None].cpu() for x, c in ((q, cq), (k, ck), (v, ck)))
        if qs.shape[2] == 0:
            continue
        ro, _ = attention_reference(qs, ks, vs, **mods)
        to, _ = attention_reference(qs, ks, vs, compute_dtype=dtype, **mods)
        ours = out[cq[b]:cq[b + 1]].transpose(0, 1)[None].cpu()
        assert_close_rule(ours, to, ro, dtype, what=f"out of sequence {b}{what}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_gpu_rope_default_configs_fit(D, layout):
    """Fused RoPE holds more shared memory per stage: the default portable configs must still launch."""
    dtype = torch.bfloat16
    q, k, v = qkv(1, 4, 2, 1000, 1000, D, dtype)
    spec = RopeSpec(layout)
    out = attention(q, k, v, causal=True, rope=spec)
    ro, _ = attention_reference(q, k, v, causal=True, rope=spec, device="cuda")
    to, _ = attention_reference(q, k, v, causal=True, rope=spec, compute_dtype=dtype, device="cuda")
    assert_close_rule(out, to, ro, dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_fp32_row_with_one_visible_key_returns_the_value_exactly(causal):
    _fp32_one_visible_key(causal)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_fp32_row_with_one_visible_key_returns_the_value_exactly(causal):
    _fp32_one_visible_key(causal)  # the GPU is where an FMA could fuse the product (the interpreter never does)


def _fp32_one_visible_key(causal):
    # float32: the row max's probability is exp2(0) = 1 exactly (on the GPU the product is rounded on its
    # own, common.mul_rn, not fused into the exponent's FMA), so a row that sees one key returns that
    # value bit for bit, as PyTorch does; the backward's exact cancellation there rests on it
    # (backward.DELTA_DOT_FP32). Causal: row 0 sees key 0 only; otherwise Nk = 1.
    Nk = 70 if causal else 1
    q = torch.randn(1, 3, 70, 40, generator=GEN).to(DEV) * 3
    k = torch.randn(1, 3, Nk, 40, generator=GEN).to(DEV) * 3
    v = torch.randn(1, 3, Nk, 40, generator=GEN).to(DEV)
    out = attention(q, k, v, causal=causal, scale=0.37)
    rows = out[:, :, :1] if causal else out
    assert torch.equal(rows, v[:, :, :1].expand_as(rows))


@pytest.mark.parametrize("chunk", [None, 3, 8])
def test_tma_lpt_schedule_computes_the_same_tiles(monkeypatch, chunk):
    # forward.CAUSAL_SCHEDULE = "lpt" only reorders which program takes which (query block, head): every
    # output element is computed by the same tile arithmetic, so the result is bitwise the default's;
    # 12 (batch x head) programs a query block: chunks of 3 divide them, chunks of 8 leave a last one of 4
    from attention_proto.ops.dense import forward as fwd

    B, H, Hkv, Nq, Nk = 2, 6, 3, 45, 45
    q, k, v = qkv(B, H, Hkv, Nq, Nk, 32, torch.float16)
    if chunk is not None:
        monkeypatch.setattr(fwd, "lpt_heads", lambda *a: chunk)
    outs = []
    for schedule in ("head", "lpt"):
        monkeypatch.setattr(fwd, "CAUSAL_SCHEDULE", schedule)
        fwd.clear_launch_plans()
        out = poison_(torch.empty_like(q))
        lse = poison_(torch.empty(B, H, Nq, device=q.device))
        flash_attention_forward(q, k, v, causal=True, config=TMA_CFG, out=out, lse=lse)
        (plan,) = fwd._PLANS.values()
        assert plan.consts.get("LPT", False) == (schedule == "lpt")
        assert plan.ints_b[-1] == (0 if schedule == "head" else chunk or B * H)
        outs.append((out, lse))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.isnan(outs[1][0]).any()
    check(q, k, v, torch.float16, config=TMA_CFG, causal=True)


def test_auto_schedule_takes_lpt_only_for_few_waves(monkeypatch):
    # "auto" (the default): LPT where the launch is at most LPT_MAX_WAVES programs per SM (the H100's
    # 1.16x at the integration layer, 3.9 a SM), the heads-first order beyond (0.92-0.97x there)
    from attention_proto.ops.dense import forward as fwd

    assert fwd.CAUSAL_SCHEDULE == "auto"
    assert fwd.use_lpt("auto", 512, 132) and not fwd.use_lpt("auto", 2048, 132)
    assert fwd.use_lpt("lpt", 10**6, 132) and not fwd.use_lpt("head", 1, 132)
    B, H, Hkv, Nq = 1, 4, 2, 45
    q, k, v = qkv(B, H, Hkv, Nq, Nq, 32, torch.float16)
    for sms, lpt in ((132, True), (1, False)):  # 12 programs: 12 a SM on one SM, under 4 waves on 132
        monkeypatch.setattr(fwd, "sm_count_of", lambda device=None, n=sms: n)
        fwd.clear_launch_plans()
        flash_attention_forward(q, k, v, causal=True, config=TMA_CFG)
        (plan,) = fwd._PLANS.values()
        assert plan.consts.get("LPT", False) == lpt
    fwd.clear_launch_plans()


def test_causal_schedule_sets_and_restores_the_order():
    from attention_proto.ops.dense import forward as fwd

    before = fwd.CAUSAL_SCHEDULE
    with fwd.causal_schedule("lpt"):
        assert fwd.CAUSAL_SCHEDULE == "lpt"
        with pytest.raises(RuntimeError):
            with fwd.causal_schedule("head"):
                assert fwd.CAUSAL_SCHEDULE == "head"
                raise RuntimeError("restored on the way out")
        assert fwd.CAUSAL_SCHEDULE == "lpt"
    assert fwd.CAUSAL_SCHEDULE == before
    with pytest.raises(ValueError, match="order must be one of"):
        with fwd.causal_schedule("fastest"):
            pass


def test_lpt_heads_fit_half_the_l2(monkeypatch):
    from attention_proto.ops.dense import forward as fwd

    monkeypatch.setattr(fwd, "l2_bytes", lambda device=None: 50 * 2**20)
    # the integration study's layer: B1 H16:4 N4k D128 bf16, K/V 8 MB in all: every head in one chunk
    assert fwd.lpt_heads(1, 16, 4, 4096, 128, 2) == 16
    assert fwd.lpt_heads(1, 16, 4, 4096, 128, 2, l2=4 * 2**20) == 4  # a given L2 size wins
    # B4 H16 MHA N16k: 8 MB of K/V per head, 25 MB of L2: 3 heads a chunk
    assert fwd.lpt_heads(4, 16, 16, 16384, 128, 2) == 3
    assert fwd.lpt_heads(1, 1, 1, 10**7, 256, 4) == 1


_SM90_XCOMPILE = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton.language as tl
import attention_proto.ops.dense.common as CM
CM._INTERPRETED = tl.constexpr(False)  # no GPU here: the kernels are compiled for sm_90, not run
from attention_proto.codegen.cross import compile_for, compile_launches
import attention_proto.codegen.cross as X
from attention_proto.ops.dense import forward_tma as FT
from attention_proto.ops.dense.configs import FwdConfig
from attention_proto.ops.dense.forward import flash_attention_forward
res = {}
q = torch.randn(1, 16, 4096, 128, dtype=torch.bfloat16)
k, v = torch.randn(1, 4, 4096, 128, dtype=torch.bfloat16), torch.randn(1, 4, 4096, 128, dtype=torch.bfloat16)
for lpt in (0, 16):
    grid, specs, ints_a, ints_b, consts = FT.tma_launch_parts(
        q, k, v, torch.empty_like(q), torch.empty(1, 16, 4096), causal=True, window=(-1, -1), has_softcap=False,
        has_alibi=False, score_mod=None, mask_mod=None, config=FwdConfig(128, 128, 8, 3, "tma"), lpt_heads=lpt)
    descs = tuple(FT.make_descriptor(t, *s) for t, s in zip((q, k, v, q), specs))
    ck = compile_for(FT._fwd_tma_kernel, descs + (torch.empty(1, 16, 4096), None, None, None, None) + ints_a
                     + (0.088, 0.127, 0.0) + ints_b, consts, 90)
    res[f"tma_lpt{lpt}"] = "%nctaid" in ck.asm["ptx"]
ptx = {}
orig = X.compile_for
X.compile_for = lambda kern, a, kw, arch=90: ptx.setdefault("p", orig(kern, a, kw, arch))
q32 = torch.randn(1, 2, 97, 80)
with compile_launches(90):
    flash_attention_forward(q32, q32, q32, causal=False, config=FwdConfig(64, 64, 4, 2, "portable"))
lines = ptx["p"].asm["ptx"].splitlines()
ex2 = [i for i, l in enumerate(lines) if "ex2.approx" in l]
res["fp32_mul_rn"] = sum("mul.rn.f32" in l for l in lines)
res["fp32_ex2_after_sub"] = any("sub.f32" in l for l in lines[ex2[0] - 6:ex2[0]]) if ex2 else False
print(sorted(res.items()))
"""


def test_sm90_compiles_lpt_order_and_fp32_exact_max():
    # the two GPU-only forms that the interpreter cannot show: the TMA kernel's LPT program order (reads the
    # grid size) and the float32 exponent's product rounded on its own (mul.rn, then a plain subtraction)
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("Triton's bundled ptxas not found")
    out = subprocess.run([sys.executable, "-c", _SM90_XCOMPILE], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    res = dict(eval(out.stdout.strip().splitlines()[-1]))
    assert res["tma_lpt0"] is False and res["tma_lpt16"] is True
    assert res["fp32_mul_rn"] > 0 and res["fp32_ex2_after_sub"]
