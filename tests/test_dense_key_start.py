"""Per-row first keys (``key_start``) in the dense forward: packed causal documents in one row.

Row i of batch b sees only keys j >= key_start[b, i] besides its causal/window masks. The float64
reference takes the same argument; outputs are poisoned with NaN; CPU runs the interpreter (fp16,
fp32; the TMA kernel's descriptors are emulated there), GPU tests (marked gpu) bf16 at scale.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attention_proto  # noqa: F401
from attention_proto.integrations import torch_ops
from attention_proto.ops.dense.configs import FwdConfig, pick_forward_config
from attention_proto.ops.dense.forward import flash_attention_forward
from attention_proto.ops.dense.reference import attention_reference
from attention_proto.runtime.device import interpreter_mode, kernel_device
from attention_proto.testing import assert_close_rule, poison_
from test_fuzz_common import fuzz_settings

DEV = kernel_device()
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))  # fresh inputs every run


def key_starts(B: int, N: int, docs: int, g: torch.Generator) -> torch.Tensor:
    """int32 [B, N]: each row's document start, ``docs`` documents of random lengths per batch row."""
    rows = []
    for _ in range(B):
        cuts = sorted(set(torch.randint(1, max(N, 2), (docs - 1,), generator=g).tolist())) if N > 1 else []
        ks = torch.zeros(N, dtype=torch.int32)
        for c in cuts:
            ks[c:] = c
        rows.append(ks)
    return torch.stack(rows).contiguous()


def run_check(B, H, Hkv, N, D, dtype, ks, config=None, dev=DEV, **mods):
    g = _gen()
    q, k, v = (torch.randn(B, h, N, D, generator=g).to(dev, dtype) for h in (H, Hkv, Hkv))
    ks = ks.to(dev)
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(B, H, N, device=q.device, dtype=torch.float32))
    flash_attention_forward(q, k, v, causal=True, key_start=ks, out=out, lse=lse, config=config, **mods)
    ro, rl = attention_reference(q, k, v, causal=True, key_start=ks, device=dev, **mods)
    to, _ = attention_reference(q, k, v, causal=True, key_start=ks, compute_dtype=dtype, device=dev, **mods)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close_rule(out, to, ro, dtype, what="out")
    dead = torch.isinf(rl)
    assert torch.equal(torch.isinf(lse), dead), "LSE -inf pattern differs from the reference"
    assert (out[dead] == 0).all(), "fully masked rows must give output 0"
    assert_close_rule(lse[~dead], rl.float()[~dead], rl[~dead], dtype, what="lse")


SMALL = dict(portable=FwdConfig(16, 16, 4, 1, "portable"), tma=FwdConfig(16, 16, 4, 1, "tma"))


@pytest.mark.parametrize("path", ["portable", "tma"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("B,H,Hkv,N,D,docs", [(1, 2, 1, 1, 16, 1), (1, 4, 2, 97, 16, 4), (2, 2, 2, 45, 40, 3),
                                              (1, 3, 1, 64, 32, 64)], ids=["n1", "gqa_97", "b2_d40", "every_row"])
def test_key_start_matches_reference(B, H, Hkv, N, D, docs, dtype, path):
    if path == "tma" and (dtype == torch.float32 or D & (D - 1)):
        pytest.skip("the TMA kernel takes fp16/bf16 and power-of-two D")
    run_check(B, H, Hkv, N, D, dtype, key_starts(B, N, docs, _gen()), config=SMALL[path])


@pytest.mark.parametrize("path", ["portable", "tma"])
@pytest.mark.parametrize("mods", [dict(window=(5, -1)), dict(softcap=20.0), dict(alibi_slopes=True)],
                         ids=["window", "softcap", "alibi"])
def test_key_start_with_modifiers(mods, path):
    from attention_proto.ops.dense.reference import alibi_slopes

    mods = dict(mods)
    if mods.get("alibi_slopes") is True:
        mods["alibi_slopes"] = alibi_slopes(4).to(DEV)
    run_check(2, 4, 2, 50, 16, torch.float16, key_starts(2, 50, 3, _gen()), config=SMALL[path], **mods)


@pytest.mark.parametrize("path", ["portable", "tma"])
@pytest.mark.parametrize("nq,nk", [(20, 20), (12, 30), (30, 12)])
def test_key_start_int32_limits(nq, nk, path):
    """First keys at the int32 limits (review, session 7: ks + BLOCK_N - 1 and pos - ks wrapped around)."""
    g = _gen()
    q = torch.randn(1, 2, nq, 16, generator=g).to(DEV, torch.float16)
    k, v = (torch.randn(1, 1, nk, 16, generator=g).to(DEV, torch.float16) for _ in range(2))
    ks = torch.zeros(1, nq, dtype=torch.int32)
    ks[0, 3:9] = 2**31 - 1
    ks[0, 9:12] = -2**31
    for window in (None, (5, -1)):
        out = poison_(torch.empty_like(q))
        lse = poison_(torch.empty(1, 2, nq, device=DEV, dtype=torch.float32))
        flash_attention_forward(q, k, v, causal=True, window=window, key_start=ks.to(DEV), out=out, lse=lse,
                                config=SMALL[path])
        ro, rl = attention_reference(q, k, v, causal=True, window=window, key_start=ks, device=DEV)
        dead = torch.isinf(rl)
        assert torch.equal(torch.isinf(lse), dead) and (out[dead] == 0).all()
        to, _ = attention_reference(q, k, v, causal=True, window=window, key_start=ks, device=DEV,
                                    compute_dtype=torch.float16)
        assert_close_rule(out, to, ro, torch.float16, what="out")


@pytest.mark.parametrize("path", ["portable", "tma"])
def test_key_start_past_the_row_masks_it_fully(path):
    """A first key past the row's own position (or past Nk) leaves no key: output 0, LSE -inf."""
    ks = key_starts(1, 40, 2, _gen())
    ks[0, 3] = 10
    ks[0, 17] = 1000
    ks[0, 30:] = -5  # below 0: nothing extra masked
    run_check(1, 2, 1, 40, 16, torch.float16, ks, config=SMALL[path])


def test_key_start_all_zero_equals_plain_causal():
    g = _gen()
    q, k, v = (torch.randn(1, 2, 33, 16, generator=g).to(DEV, torch.float16) for _ in range(3))
    plain, lp = flash_attention_forward(q, k, v, causal=True, config=SMALL["portable"])
    ks = torch.zeros(1, 33, dtype=torch.int32, device=DEV)
    ours, lo = flash_attention_forward(q, k, v, causal=True, key_start=ks, config=SMALL["portable"])
    assert torch.equal(plain, ours) and torch.equal(lp, lo)


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.zeros(1, 7, dtype=torch.int64), "int32"),
    (lambda: torch.zeros(2, 8, dtype=torch.int32), r"\[1, 8\]"),
    (lambda: torch.zeros(8, 2, dtype=torch.int32).t(), "contiguous"),
])
def test_key_start_bad_input(bad, match):
    q = torch.zeros(1, 2, 8, 16, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match=match):
        flash_attention_forward(q, q, q, causal=True, key_start=bad().to(DEV))


def test_key_start_op_matches_segments_and_refuses_gradients():
    """The custom op over position_ids that restart equals each document computed alone."""
    g = _gen()
    q, k, v = (torch.randn(1, 2, 18, 16, generator=g).to(DEV, torch.float16) for _ in range(3))
    pos = torch.cat([torch.arange(7), torch.arange(11)])[None].to(DEV)
    out = torch_ops.key_start_attention(q, k, v, torch_ops.key_starts_from_positions(pos))
    a = torch_ops.flash_attention(q[:, :, :7], k[:, :, :7], v[:, :, :7], causal=True)
    b = torch_ops.flash_attention(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], causal=True)
    assert (out - torch.cat([a, b], 2)).abs().max() < 2e-3
    with pytest.raises(NotImplementedError, match="no backward"):
        torch_ops.key_start_attention(q.requires_grad_(), k, v, torch_ops.key_starts_from_positions(pos))


def test_key_start_op_opcheck():
    g = _gen()
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g).to(DEV, torch.float16) for _ in range(3))
    ks = torch_ops.key_starts_from_positions(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1]], device=DEV))
    torch.library.opcheck(torch.ops.attention_proto.key_start_fwd.default, (q, k, v, ks, 0.25, -1, 0.0),
                          test_utils=("test_schema", "test_faketensor"))


@st.composite
def key_start_cases(draw):
    """Free shapes and first keys, any values (also decreasing, negative, past the row or at the int32
    limits: the kernel clamps them to [0, Nk], takes the block's smallest and largest and masks per
    row, so every value is well defined)."""
    Hkv = draw(st.integers(1, 2))
    N = draw(st.integers(1, 40))
    mode = draw(st.sampled_from(["documents", "free"]))
    if mode == "documents":
        ks = key_starts(2, N, draw(st.integers(1, 6)), torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    else:
        value = st.one_of(st.integers(-3, N + 3), st.sampled_from([-2**31, 2**31 - 1, 2**31 - 16]))
        vals = draw(st.lists(value, min_size=2 * N, max_size=2 * N))
        ks = torch.tensor(vals, dtype=torch.int32).reshape(2, N)
    return dict(B=2, H=Hkv * draw(st.sampled_from([1, 2])), Hkv=Hkv, N=N, D=draw(st.sampled_from([16, 24, 32])),
                dtype=draw(st.sampled_from([torch.float16, torch.float32])), ks=ks,
                path=draw(st.sampled_from(["portable", "tma"])),
                window=draw(st.sampled_from([None, (3, -1), (0, -1)])), softcap=draw(st.sampled_from([None, 15.0])))


@fuzz_settings(25)
@given(case=key_start_cases())
def test_fuzz_key_start(case):
    path = case["path"]
    if path == "tma" and (case["dtype"] == torch.float32 or case["D"] == 24):
        path = "portable"  # the TMA kernel takes fp16/bf16 and power-of-two D
    run_check(case["B"], case["H"], case["Hkv"], case["N"], case["D"], case["dtype"], case["ks"],
              config=SMALL[path], window=case["window"], softcap=case["softcap"])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path", ["auto", "portable"])
@pytest.mark.parametrize("N,docs", [(4096, 1), (4096, 7), (1025, 300)])
def test_gpu_key_start_bf16(N, docs, path):
    if interpreter_mode():
        pytest.skip("GPU only")
    cfg = None if path == "auto" else pick_forward_config(128, torch.bfloat16, True, N, "portable")
    run_check(1, 16, 4, N, 128, torch.bfloat16, key_starts(1, N, docs, _gen()), config=cfg, dev="cuda")
