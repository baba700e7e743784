"""The standalone RoPE kernel against ``rope.apply_rope_reference`` (both layouts, offsets, tables)."""
from __future__ import annotations

import pytest
import torch

import attention_proto  # noqa: F401
from attention_proto.ops.dense.rope import RopeSpec, apply_rope_reference, rope_cos_sin
from attention_proto.ops.dense.rope_kernel import apply_rope
from attention_proto.runtime.device import kernel_device
from attention_proto.testing import assert_close_rule, poison_

DEV = kernel_device()
GEN = torch.Generator().manual_seed(77)


def rand(*shape, dtype):
    return torch.randn(*shape, generator=GEN).to(dtype).to(DEV)


def check(q, k, spec, qr, kr, dtype):
    rq, rk = apply_rope_reference(q.cpu().double(), k.cpu().double(), spec if spec.cos is None else
                                  RopeSpec(spec.layout, cos=spec.cos.cpu().double(), sin=spec.sin.cpu().double(),
                                           q_offset=spec.q_offset, k_offset=spec.k_offset))
    lq, lk = apply_rope_reference(q.cpu(), k.cpu(), spec if spec.cos is None else
                                  RopeSpec(spec.layout, cos=spec.cos.cpu().to(dtype), sin=spec.sin.cpu().to(dtype),
                                           q_offset=spec.q_offset, k_offset=spec.k_offset))
    assert not torch.isnan(qr).any() and not torch.isnan(kr).any()
    assert_close_rule(qr, lq, rq, dtype, what="q")
    assert_close_rule(kr, lk, rk, dtype, what="k")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("spec", [
    RopeSpec("half"),
    RopeSpec("interleaved"),
    RopeSpec("half", theta=500.0, q_offset=5, k_offset=3),
    RopeSpec("interleaved", theta=1e6, q_offset=0),
], ids=["half", "interleaved", "half-offsets", "inter-q0"])
def test_rope_kernel_matches_reference(spec, dtype):
    q, k = rand(2, 4, 19, 40, dtype=dtype), rand(2, 2, 27, 40, dtype=dtype)
    qr, kr = apply_rope(q, k, spec)
    assert qr.shape == q.shape and kr.shape == k.shape and qr.dtype == dtype
    check(q, k, spec, qr, kr, dtype)


@pytest.mark.parametrize("spec", [RopeSpec("half", q_offset=2, k_offset=1), RopeSpec("interleaved", q_offset=0)], ids=["half", "interleaved"])
def test_rope_kernel_pow2_register_path(spec):
    """Power-of-two D takes the one-load kernel (partners by register shuffle); BSHD views, N not a
    multiple of the row block, fp16."""
    dtype = torch.float16
    q = rand(1, 21, 5, 32, dtype=dtype).transpose(1, 2)  # 5 heads: a partial head group
    k = rand(2, 17, 1, 32, dtype=dtype).transpose(1, 2)
    k = k[:1]
    qr, kr = apply_rope(q, k, spec)
    check(q, k, spec, qr, kr, dtype)


def test_rope_kernel_tables_strided_and_out():
    """Given cos/sin tables, BSHD (strided) inputs, preallocated poisoned outputs, odd D = 2 * 13."""
    dtype = torch.float16
    D = 26
    cos, sin = rope_cos_sin(torch.arange(64), D, 10000.0, torch.float64)
    spec = RopeSpec("half", cos=cos.float().to(DEV), sin=sin.float().to(DEV), k_offset=4)
    q = rand(1, 17, 3, D, dtype=dtype).transpose(1, 2)  # [B, H, N, D] view of BSHD
    k = rand(1, 23, 1, D, dtype=dtype).transpose(1, 2)
    oq, ok = poison_(torch.empty(q.shape, dtype=dtype, device=DEV)), poison_(torch.empty(k.shape, dtype=dtype, device=DEV))
    qr, kr = apply_rope(q, k, spec, out_q=oq, out_k=ok)
    assert qr.data_ptr() == oq.data_ptr() and kr.data_ptr() == ok.data_ptr()
    check(q, k, spec, qr, kr, dtype)


def test_rope_kernel_feeds_attention_like_fused():
    """Separate RoPE + attention equals the fused forward (same fp32 rotation, one rounding)."""
    from attention_proto.ops.dense.forward import flash_attention_forward

    dtype = torch.float32
    q, k, v = rand(1, 2, 21, 32, dtype=dtype), rand(1, 1, 21, 32, dtype=dtype), rand(1, 1, 21, 32, dtype=dtype)
    spec = RopeSpec("interleaved")
    qr, kr = apply_rope(q, k, spec)
    sep, _ = flash_attention_forward(qr, kr, v, causal=True)
    fused, _ = flash_attention_forward(q, k, v, causal=True, rope=spec)
    assert torch.allclose(sep, fused, atol=1e-5, rtol=1e-5)


def test_rope_kernel_validation():
    q, k = rand(1, 2, 8, 16, dtype=torch.float16), rand(1, 2, 8, 16, dtype=torch.float16)
    with pytest.raises(TypeError, match="RopeSpec"):
        apply_rope(q, k, "half")
    with pytest.raises(ValueError, match="even head dim"):
        apply_rope(rand(1, 2, 8, 15, dtype=torch.float16), rand(1, 2, 8, 15, dtype=torch.float16), RopeSpec())
    with pytest.raises(ValueError, match="positions must be >= 0"):
        apply_rope(rand(1, 2, 9, 16, dtype=torch.float16), rand(1, 2, 4, 16, dtype=torch.float16), RopeSpec())
    with pytest.raises(TypeError, match="share one dtype"):
        apply_rope(q, k.float(), RopeSpec())
    with pytest.raises(ValueError, match="out_q"):
        apply_rope(q, k, RopeSpec(), out_q=torch.empty(3, device=DEV))
    cos, sin = rope_cos_sin(torch.arange(4), 16)
    with pytest.raises(ValueError, match="positions up to"):
        apply_rope(q, k, RopeSpec(cos=cos.float().to(DEV), sin=sin.float().to(DEV)))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_rope_kernel_bf16(layout, D):
    dtype = torch.bfloat16
    q, k = rand(2, 8, 1000, D, dtype=dtype), rand(2, 2, 1031, D, dtype=dtype)
    spec = RopeSpec(layout, theta=500000.0)
    qr, kr = apply_rope(q, k, spec)
    check(q, k, spec, qr, kr, dtype)
