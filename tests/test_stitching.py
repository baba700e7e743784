"""Ways to stitch modifiers into one kernel (study 2), checked against the float64 reference on CPU.

- the run-time-flag forward (``forward_runtime``): every modifier combination through one kernel,
  with HEAD_DIM constexpr or run-time (odd D, fixed BLOCK_D);
- the user-hook path: generated ``score_mod``/``mask_mod`` hooks (``mods_library``) through the
  constexpr forward reproduce the built-in modifiers.
Outputs are NaN-poisoned before each run; tiny odd shapes (Nq != Nk both ways, GQA).
"""
from __future__ import annotations

import pytest
import torch

import attention_proto  # noqa: F401
from attention_proto.ops.dense import mods_library as ML
from attention_proto.ops.dense.configs import FwdConfig
from attention_proto.ops.dense.forward import flash_attention_forward
from attention_proto.ops.dense.forward_runtime import _fwd_runtime_kernel, flash_attention_forward_runtime
from attention_proto.ops.dense.reference import alibi_slopes, attention_reference
from attention_proto.runtime.cache import KERNEL_CACHE
from attention_proto.runtime.device import kernel_device
from attention_proto.testing import assert_close_rule, poison_

DEV = kernel_device()
GEN = torch.Generator().manual_seed(20261127)


def qkv(B, H, Hkv, Nq, Nk, D, dtype, scale=1.0):
    def r(*s):
        return (torch.randn(*s, generator=GEN) * scale).to(dtype).to(DEV)

    return r(B, H, Nq, D), r(B, Hkv, Nk, D), r(B, Hkv, Nk, D)


def ref_mods(mods, H):
    m = dict(mods)
    if m.get("alibi_slopes") is True:
        m["alibi_slopes"] = alibi_slopes(H)
    return m


def check(out, lse, q, k, v, dtype, **mods):
    rm = ref_mods(mods, q.shape[1])
    ro, rl = attention_reference(q.cpu(), k.cpu(), v.cpu(), **rm)
    to, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), compute_dtype=dtype, **rm)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN left in the outputs"
    assert_close_rule(out, to, ro, dtype, what="out")
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(rl)), "LSE -inf pattern differs from the reference"
    fin = torch.isfinite(rl)
    assert_close_rule(lse.cpu()[fin], rl.float()[fin], rl[fin], torch.float32, what="lse")
    if (~fin).any():
        assert float(out.cpu()[~fin].abs().max()) == 0.0, "fully masked rows must give 0"


def run_rt(q, k, v, **kw):
    B, H, Nq, D = q.shape
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(B, H, Nq, device=q.device, dtype=torch.float32))
    o, l = flash_attention_forward_runtime(q, k, v, out=out, lse=lse, **kw)
    assert o.data_ptr() == out.data_ptr() and l.data_ptr() == lse.data_ptr()
    return o, l


MOD_CASES = [
    dict(),
    dict(causal=True),
    dict(window=(5, 2)),
    dict(causal=True, window=7),
    dict(softcap=2.0),
    dict(alibi_slopes=True),
    dict(causal=True, softcap=3.0, alibi_slopes=True),
    dict(causal=True, window=(6, -1), softcap=2.5, alibi_slopes=True),
]
MOD_IDS = ["plain", "causal", "window", "causal-window", "softcap", "alibi", "causal-softcap-alibi", "all"]


@pytest.mark.parametrize("mods", MOD_CASES, ids=MOD_IDS)
@pytest.mark.parametrize("runtime_head_dim", [False, True], ids=["D-constexpr", "D-runtime"])
def test_runtime_kernel_matches_reference(mods, runtime_head_dim):
    dtype = torch.float16
    q, k, v = qkv(1, 4, 2, 21, 37, 40, dtype, scale=2.0)
    o, l = run_rt(q, k, v, runtime_head_dim=runtime_head_dim, **mods)
    check(o, l, q, k, v, dtype, **mods)


@pytest.mark.parametrize("Nq,Nk", [(33, 17), (1, 29), (16, 16)])
def test_runtime_kernel_shapes_fp32(Nq, Nk):
    """fp32 (ieee dots), Nq > Nk causal (fully masked rows: 0 and -inf), decode row, aligned tiles."""
    dtype = torch.float32
    q, k, v = qkv(2, 2, 1, Nq, Nk, 24, dtype)
    for mods in (dict(causal=True), dict(causal=True, window=(3, 1), softcap=1.5)):
        o, l = run_rt(q, k, v, runtime_head_dim=True, max_block_d=64, **mods)
        check(o, l, q, k, v, dtype, **mods)


def test_runtime_kernel_one_compile_for_all_combinations():
    """Every modifier combination (and the run-time head dim) reuses one KERNEL_CACHE entry."""
    dtype = torch.float16
    cfg = FwdConfig(16, 16, 4, 1, "portable")
    before = len(KERNEL_CACHE.find("_fwd_runtime_kernel"))
    keys = set()
    for D in (24, 40):
        q, k, v = qkv(1, 2, 2, 9, 9, D, dtype)
        for mods in MOD_CASES[:4]:
            run_rt(q, k, v, runtime_head_dim=True, max_block_d=64, config=cfg, **mods)
            keys.add(KERNEL_CACHE.key(_fwd_runtime_kernel, (q,), dict(HEAD_DIM=0, BLOCK_D=64, BLOCK_M=16, BLOCK_N=16,
                                                                     DOT_PREC="tf32", num_warps=4, num_stages=1)))
    assert len(keys) == 1
    assert len(KERNEL_CACHE.find("_fwd_runtime_kernel")) <= before + 1


def test_runtime_kernel_validation():
    q, k, v = qkv(1, 4, 2, 8, 8, 40, torch.float16)
    q72, k72, v72 = qkv(1, 1, 1, 4, 4, 72, torch.float16)
    with pytest.raises(ValueError, match="exceeds max_block_d=64"):
        flash_attention_forward_runtime(q72, k72, v72, runtime_head_dim=True, max_block_d=64)
    with pytest.raises(ValueError, match="max_block_d must be one of"):
        flash_attention_forward_runtime(q, k, v, runtime_head_dim=True, max_block_d=96)
    with pytest.raises(ValueError, match="only with runtime_head_dim"):
        flash_attention_forward_runtime(q, k, v, max_block_d=128)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        flash_attention_forward_runtime(q, k[:, :1].expand(1, 3, 8, 40), v[:, :1].expand(1, 3, 8, 40))
    with pytest.raises(TypeError, match="dtype"):
        flash_attention_forward_runtime(q.to(torch.int32), k, v)
    with pytest.raises(ValueError, match="portable FwdConfig"):
        flash_attention_forward_runtime(q, k, v, config=FwdConfig(64, 64, 4, 2, "tma"))
    with pytest.raises(ValueError, match="4 dimensions"):
        flash_attention_forward_runtime(q[0], k, v)


# ---------------------------------------------------------------------------------------------- hooks

HOOK_CASES = [
    (dict(softcap=2.0), dict(softcap=2.0), {}),
    (dict(alibi_heads=4), dict(alibi_slopes=True), {}),
    (dict(softcap=3.0, alibi_heads=4), dict(softcap=3.0, alibi_slopes=True), dict(causal=True)),
]


@pytest.mark.parametrize("score_kw,ref_kw,builtin", HOOK_CASES, ids=["softcap", "alibi", "softcap-alibi-causal"])
def test_score_mod_hooks_match_builtin_semantics(score_kw, ref_kw, builtin):
    dtype = torch.float16
    q, k, v = qkv(1, 4, 2, 23, 23, 32, dtype, scale=2.5)
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(1, 4, 23, dtype=torch.float32, device=q.device))
    flash_attention_forward(q, k, v, score_mod=ML.score_mod(**score_kw), out=out, lse=lse,
                            config=FwdConfig(16, 16, 4, 1, "portable"), **builtin)
    check(out, lse, q, k, v, dtype, **ref_kw, **builtin)


def test_mask_mod_window_with_offset_matches_builtin():
    """Nq < Nk: the hook needs the bottom-right offset baked in (hooks see in-sequence positions)."""
    dtype = torch.float16
    Nq, Nk = 13, 30
    q, k, v = qkv(1, 2, 1, Nq, Nk, 32, dtype)
    mm = ML.mask_mod(window=(5, -1), causal=True, q_offset=Nk - Nq)
    sm = ML.score_mod(alibi_slopes=[0.3, 0.7], q_offset=Nk - Nq)
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(1, 2, Nq, dtype=torch.float32, device=q.device))
    flash_attention_forward(q, k, v, score_mod=sm, mask_mod=mm, out=out, lse=lse)
    check(out, lse, q, k, v, dtype, causal=True, window=5, alibi_slopes=torch.tensor([0.3, 0.7]))


def test_hook_factory_caches_and_validates():
    assert ML.score_mod(softcap=7.0) is ML.score_mod(softcap=7.0)
    assert ML.score_mod(softcap=7.0) is not ML.score_mod(softcap=8.0)
    assert ML.mask_mod(window=4) is ML.mask_mod(window=(4, -1))
    with pytest.raises(ValueError, match="needs softcap"):
        ML.score_mod()
    with pytest.raises(ValueError, match="softcap must be > 0"):
        ML.score_mod(softcap=0.0)
    with pytest.raises(ValueError, match="not both"):
        ML.score_mod(alibi_heads=4, alibi_slopes=[1.0] * 4)
    with pytest.raises(ValueError, match="needs a window or causal"):
        ML.mask_mod()


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("runtime_head_dim", [False, True], ids=["D-constexpr", "D-runtime"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_runtime_kernel_bf16(D, runtime_head_dim):
    """bf16 with the GPU tiles the studies use (dense picker's portable config), every combination."""
    dtype = torch.bfloat16
    q, k, v = qkv(2, 8, 2, 300, 333, D, dtype, scale=2.0)
    for mods in MOD_CASES:
        o, l = run_rt(q, k, v, runtime_head_dim=runtime_head_dim, **mods)
        check(o, l, q, k, v, dtype, **mods)


@pytest.mark.gpu
def test_gpu_hooks_bf16():
    dtype = torch.bfloat16
    q, k, v = qkv(1, 16, 16, 513, 513, 128, dtype, scale=2.0)
    sm, mm = ML.score_mod(softcap=50.0, alibi_heads=16), ML.mask_mod(window=100)
    for path in ("portable", None):  # portable tile, then what dispatch picks (TMA on Hopper)
        from attention_proto.ops.dense.configs import pick_forward_config

        cfg = pick_forward_config(128, dtype, True, 1024, "portable") if path else None
        out, lse = flash_attention_forward(q, k, v, causal=True, score_mod=sm, mask_mod=mm, config=cfg)
        check(out, lse, q, k, v, dtype, causal=True, softcap=50.0, alibi_slopes=True, window=100)
