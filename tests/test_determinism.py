"""Determinism: the same inputs give bitwise the same outputs, run after run.

Guarantees checked here (docs/reliability.md lists them per op):

- dense forward (portable and, on Hopper, TMA paths; varlen): bitwise identical across runs,
  across a cleared kernel cache (recompiled variants) and across CUDA streams;
- dense backward with ``deterministic=True``: bitwise identical (fixed tile summation order);
  ``deterministic=False`` (fp32 atomics for dQ) is *not* bitwise reproducible on a GPU: both runs
  satisfy the error rule and differ only in dQ (the GPU test measures the spread);
- paged decode (V1 and V2 with a fixed partition count) and the cache append: bitwise identical;
- linear attention (chunk and recurrent forward, backward, decode step): bitwise identical.

The CPU tests run tiny shapes in the interpreter (sequential programs: everything is
deterministic there, so they mostly guard against host-side randomness such as config choice
or plan caches); the ``gpu`` tests repeat them at sizes with hundreds of programs in flight.
"""
from __future__ import annotations

import pytest
import torch

import attention_proto  # noqa: F401
from attention_proto.ops.dense.interface import attention, attention_varlen
from attention_proto.ops.dense.rope import RopeSpec
from attention_proto.ops.linear.interface import linear_attention, linear_attention_step
from attention_proto.ops.paged.cache import PagedKVCache
from attention_proto.ops.paged.interface import paged_attention
from attention_proto.ops.paged.testing import make_paged
from attention_proto.runtime.cache import KERNEL_CACHE
from attention_proto.testing import assert_close_rule
from test_fuzz_common import DEV, gen, gpu, randn

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")

RUNS = 3


def same(results, what):
    first = results[0]
    for r in results[1:]:
        for a, b in zip(first if isinstance(first, (tuple, list)) else [first],
                        r if isinstance(r, (tuple, list)) else [r]):
            if a is None:
                continue
            assert not torch.isnan(a).any(), f"{what}: NaN in the result"
            assert torch.equal(a, b), f"{what}: results differ between runs (max diff {(a.double() - b.double()).abs().max():.3e})"


def dense_inputs(B, H, Hkv, Nq, Nk, D, dtype, seed=0):
    g = gen(seed)
    return (randn((B, H, Nq, D), g, dtype), randn((B, Hkv, Nk, D), g, dtype), randn((B, Hkv, Nk, D), g, dtype),
            randn((B, H, Nq, D), g, dtype))


MODS = {
    "plain": {},
    "causal": dict(causal=True),
    "window+softcap+alibi": dict(causal=True, window=(5, 0), softcap=10.0, alibi_slopes=True),
    "rope": dict(causal=True, rope=RopeSpec("interleaved")),
}


def _fwd_runs(q, k, v, mods, runs=RUNS):
    return [attention(q, k, v, return_lse=True, **mods) for _ in range(runs)]


def _bwd_runs(q, k, v, do, mods, deterministic, runs=RUNS):
    res = []
    for _ in range(runs):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, deterministic=deterministic, **mods).backward(do)
        res.append([t.grad for t in leaves])
    return res


# ------------------------------------------------------------------------------------------------
# CPU (and GPU, tiny shapes)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mods", list(MODS.values()), ids=list(MODS))
def test_dense_forward_bitwise(mods):
    q, k, v, _ = dense_inputs(2, 4, 2, 19, 23, 24, torch.float16, seed=1)
    same(_fwd_runs(q, k, v, mods), "dense forward")


def test_dense_forward_bitwise_after_recompile():
    q, k, v, _ = dense_inputs(1, 2, 1, 9, 9, 16, torch.float32, seed=2)
    a = attention(q, k, v, causal=True, return_lse=True)
    KERNEL_CACHE.clear()
    b = attention(q, k, v, causal=True, return_lse=True)
    same([a, b], "dense forward after a cache clear")


@pytest.mark.parametrize("mods", [MODS["causal"], MODS["rope"]], ids=["causal", "rope"])
def test_dense_backward_deterministic_bitwise(mods):
    # GQA 3:1: dK/dV sum over the group's query heads, the order must be fixed
    q, k, v, do = dense_inputs(1, 3, 1, 21, 21, 16, torch.float32, seed=3)
    same(_bwd_runs(q, k, v, do, mods, deterministic=True), "dense backward (deterministic)")


def test_dense_varlen_forward_backward_bitwise():
    cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32, device=DEV)
    g = gen(4)
    q, k, v, do = (randn((20, 2, 16), g, torch.float16) for _ in range(4))
    same([attention_varlen(q, k, v, cu, cu, causal=True, return_lse=True) for _ in range(RUNS)], "varlen forward")
    res = []
    for _ in range(RUNS):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        attention_varlen(*leaves, cu, cu, causal=True, deterministic=True).backward(do)
        res.append([t.grad for t in leaves])
    same(res, "varlen backward (deterministic)")


@pytest.mark.parametrize("version,parts", [("v1", None), ("v2", 3)])
def test_paged_bitwise(version, parts):
    q, kc, vc, bt, sl = make_paged(3, 4, 2, 2, 16, 8, [5, 30, 17], torch.float16, DEV, gen(5))
    same([paged_attention(q, kc, vc, bt, sl, version=version, num_partitions=parts, return_lse=True)
          for _ in range(RUNS)], f"paged {version}")


def test_paged_cache_append_bitwise():
    pools = []
    g = gen(6)
    kn, vn = randn((2, 1, 9, 16), g, torch.float16), randn((2, 1, 9, 16), g, torch.float16)
    for _ in range(2):
        cache = PagedKVCache(12, 4, 1, 16, max_seqs=2, dtype=torch.float16, device=DEV, seed=3)
        ids = [cache.add_sequence(), cache.add_sequence()]
        cache.append(ids, kn, vn, counts=[9, 4])
        cache.append(ids, kn[:, :, :1], vn[:, :, :1])
        pools.append((cache.k_cache.clone(), cache.v_cache.clone(), cache.block_table.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*pools))


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_linear_forward_backward_bitwise(mode):
    g = gen(7)
    q, k = randn((1, 45, 2, 16), g, torch.float32), randn((1, 45, 2, 16), g, torch.float32)
    v = randn((1, 45, 2, 24), g, torch.float32)
    gate = torch.nn.functional.logsigmoid(torch.randn(1, 45, 2, generator=g) + 2).to(DEV)
    h0 = randn((1, 2, 16, 24), g, torch.float32)
    do = randn((1, 45, 2, 24), g, torch.float32)
    same([linear_attention(q, k, v, g=gate, initial_state=h0, output_final_state=True, mode=mode, chunk_size=32)
          for _ in range(RUNS)], f"linear {mode} forward")
    res = []
    for _ in range(RUNS):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, gate, h0)]
        o, ht = linear_attention(*leaves[:3], g=leaves[3], initial_state=leaves[4], output_final_state=True,
                                 mode=mode, chunk_size=32)
        ((o * do).sum() + ht.sum()).backward()
        res.append([t.grad for t in leaves])
    same(res, f"linear {mode} backward")


def test_linear_step_bitwise():
    g = gen(8)
    q, k, v = randn((3, 2, 16), g, torch.float16), randn((3, 2, 16), g, torch.float16), randn((3, 2, 8), g, torch.float16)
    s = randn((3, 2, 16, 8), g, torch.float32)
    same([linear_attention_step(q, k, v, s) for _ in range(RUNS)], "linear step")


# ------------------------------------------------------------------------------------------------
# GPU: many programs in flight, bf16
# ------------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("mods", list(MODS.values()), ids=list(MODS))
@pytest.mark.parametrize("N", [1000, 4096])
def test_dense_forward_bitwise_gpu(mods, N):
    q, k, v, _ = dense_inputs(2, 16, 4, N, N, 128, torch.bfloat16, seed=10)
    same(_fwd_runs(q, k, v, mods, runs=5), f"dense forward N={N}")


@gpu
def test_dense_forward_bitwise_across_streams_gpu():
    q, k, v, _ = dense_inputs(2, 16, 4, 2048, 2048, 128, torch.bfloat16, seed=11)
    base = attention(q, k, v, causal=True)
    streams = [torch.cuda.Stream() for _ in range(4)]
    outs = []
    torch.cuda.synchronize()
    for s in streams:
        with torch.cuda.stream(s):
            outs.append(attention(q, k, v, causal=True))
    torch.cuda.synchronize()
    same([base] + outs, "dense forward on 4 streams")


@gpu
@pytest.mark.parametrize("mods", [MODS["causal"], MODS["window+softcap+alibi"], MODS["rope"]],
                         ids=["causal", "mods", "rope"])
def test_dense_backward_deterministic_bitwise_gpu(mods):
    q, k, v, do = dense_inputs(2, 16, 4, 2048, 2048, 128, torch.bfloat16, seed=12)
    same(_bwd_runs(q, k, v, do, mods, deterministic=True, runs=4), "dense backward (deterministic)")


@gpu
def test_dense_backward_atomic_mode_spread_gpu():
    """deterministic=False: not bitwise, but every run within the error rule; dK/dV (no atomics)
    stay bitwise identical. Prints the dQ spread between runs (for docs/reliability.md)."""
    from attention_proto.ops.dense.reference import attention_reference

    q, k, v, do = dense_inputs(1, 8, 2, 1024, 1024, 64, torch.bfloat16, seed=13)
    runs = _bwd_runs(q, k, v, do, MODS["causal"], deterministic=False, runs=4)
    same([r[1:] for r in runs], "dense backward dk/dv (atomic mode)")
    spread = max(float((r[0].float() - runs[0][0].float()).abs().max()) for r in runs[1:])
    ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, _ = attention_reference(*ins, causal=True, device=DEV)
    ref = torch.autograd.grad(out, ins, do.double())[0]
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, _ = attention_reference(*ins, causal=True, compute_dtype=torch.bfloat16, device=DEV)
    low = torch.autograd.grad(out, ins, do)[0]
    for r in runs:
        assert_close_rule(r[0], low, ref, torch.bfloat16, factor=3, what="dq (atomic mode)")
    print(f"dq spread across runs with deterministic=False: {spread:.3e}")


@gpu
def test_paged_bitwise_gpu():
    q, kc, vc, bt, sl = make_paged(16, 32, 8, 1, 128, 16, [1, 700, 4000, 33] * 4, torch.bfloat16, DEV, gen(14))
    for version, parts in (("v1", None), ("v2", 8), ("auto", None)):
        same([paged_attention(q, kc, vc, bt, sl, version=version, num_partitions=parts, return_lse=True)
              for _ in range(4)], f"paged {version}")


@gpu
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_linear_bitwise_gpu(mode):
    g = gen(15)
    q, k, v = (randn((2, 4096, 8, 128), g, torch.bfloat16) for _ in range(3))
    gate = torch.nn.functional.logsigmoid(torch.randn(2, 4096, 8, generator=g) + 2).to(DEV)
    same([linear_attention(q, k, v, g=gate, output_final_state=True, mode=mode) for _ in range(4)],
         f"linear {mode} forward")
    do = randn((2, 4096, 8, 128), g, torch.bfloat16)
    res = []
    for _ in range(3):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, gate)]
        o, _ = linear_attention(*leaves[:3], g=leaves[3], mode=mode)
        o.backward(do)
        res.append([t.grad for t in leaves])
    same(res, f"linear {mode} backward")
