"""Paged decode on the GPU: bf16 at scale, every page size, modifiers, the decode loop, int64 offsets.

All marked ``gpu`` (skipped without CUDA). The float64 reference runs on the CPU.
"""
import dataclasses

import pytest
import torch

from attention_proto.ops.paged import PagedConfig, PagedKVCache, paged_attention
from attention_proto.ops.paged.dispatch import gpu_config
from attention_proto.ops.paged.testing import assert_paged, compare_paged, make_paged

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(torch.seed() % (2**31))
    return g


def _lens(gen, B, lo, hi):
    return torch.randint(lo, hi + 1, (B,), generator=gen).tolist()


@pytest.mark.parametrize("reduce", ["fused", "kernel"])
@pytest.mark.parametrize("version,parts", [("auto", None), ("v1", None), ("v2", None), ("v2", 37), ("v2", 256)])
def test_bf16_gqa_at_scale(version, parts, reduce, gen):
    lens = _lens(gen, 8, 1, 6000) + [8192]
    q, kc, vc, bt, sl = make_paged(9, 32, 8, 1, 128, 16, lens, torch.bfloat16, "cuda", gen)
    cfg = dataclasses.replace(gpu_config(4, 128), reduce=reduce)
    assert_paged(q, kc, vc, bt, sl, torch.bfloat16, what=f"{version}/{parts}/{reduce}", version=version,
                 num_partitions=parts, config=cfg)


@pytest.mark.parametrize("bn,warps,stages", [(64, 4, 3), (32, 4, 7), (64, 4, 7), (128, 8, 5)])
def test_bench_tile_candidates(bn, warps, stages, gen):
    # every tile scripts/bench_paged.py times, with both merges, mixed lengths and a window
    lens = _lens(gen, 5, 1, 5000) + [9000]
    q, kc, vc, bt, sl = make_paged(6, 32, 8, 1, 128, 16, lens, torch.bfloat16, "cuda", gen)
    for reduce in ("fused", "kernel"):
        cfg = PagedConfig(16, bn, 128, warps, stages, reduce)
        for kw in ({}, {"window": 1000}):
            assert_paged(q, kc, vc, bt, sl, torch.bfloat16, what=f"{bn}/{warps}/{stages} {reduce} {kw}",
                         version="v2", config=cfg, **kw)


def test_fused_merge_in_cuda_graph_replays(gen):
    # a captured fused call takes counters from the eagerly zeroed slab; every replay leaves them at 0,
    # so replays with new queries match eager calls
    from attention_proto.ops.paged import workspace

    lens = [3000, 17, 700, 4096]
    q, kc, vc, bt, sl = make_paged(4, 32, 8, 1, 128, 16, lens, torch.bfloat16, "cuda", gen)
    # the fused merge is no longer the default (DEFAULT_REDUCE = "kernel"): ask for it
    kw = dict(version="v2", num_partitions=8, check_inputs=False, max_seq_len=4096,
              config=dataclasses.replace(gpu_config(4, 128), reduce="fused"))
    eager = paged_attention(q, kc, vc, bt, sl, **kw)  # creates the slab
    before = workspace.slab_usage(0)
    static_q = q.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        paged_attention(static_q, kc, vc, bt, sl, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = paged_attention(static_q, kc, vc, bt, sl, **kw)
    assert workspace.slab_usage(0) == before + 4 * 8  # B x Hkv counters, from the slab
    for i in range(4):
        static_q.copy_(torch.randn(q.shape, generator=gen).to(q) if i else q)
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_attention(static_q, kc, vc, bt, sl, **kw)
        assert torch.equal(static_out, ref), f"replay {i} differs from the eager call"
    assert torch.equal(eager, paged_attention(q, kc, vc, bt, sl, **kw))


def test_fused_merge_on_concurrent_streams(gen):
    lens = [5000, 300, 4096, 2048]
    q, kc, vc, bt, sl = make_paged(4, 32, 8, 1, 128, 16, lens, torch.bfloat16, "cuda", gen)
    kw = dict(version="v2", num_partitions=16, check_inputs=False, max_seq_len=5000,
              config=dataclasses.replace(gpu_config(4, 128), reduce="fused"))
    ref = paged_attention(q, kc, vc, bt, sl, **kw)
    streams = [torch.cuda.Stream() for _ in range(4)]
    torch.cuda.synchronize()
    outs = []
    for _ in range(5):
        for s in streams:
            with torch.cuda.stream(s):
                outs.append(paged_attention(q, kc, vc, bt, sl, **kw))
    torch.cuda.synchronize()
    assert all(torch.equal(o, ref) for o in outs)


@pytest.mark.parametrize("page", [8, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("D", [64, 128])
def test_page_sizes_and_head_dims(page, D, gen):
    lens = _lens(gen, 4, 1, 1500)
    q, kc, vc, bt, sl = make_paged(4, 16, 4, 1, D, page, lens, torch.bfloat16, "cuda", gen)
    for version in ("v1", "v2"):
        assert_paged(q, kc, vc, bt, sl, torch.bfloat16, what=f"page {page} D{D} {version}", version=version)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("Nq,Hq,Hkv,D", [(1, 8, 8, 80), (4, 32, 8, 128), (16, 8, 1, 64), (16, 32, 2, 256)])
def test_dtypes_shapes_and_spec_decode(dtype, Nq, Hq, Hkv, D, gen):
    lens = [Nq] + _lens(gen, 3, Nq, 3000)
    q, kc, vc, bt, sl = make_paged(4, Hq, Hkv, Nq, D, 16, lens, dtype, "cuda", gen)
    for version in ("v1", "v2"):
        assert_paged(q, kc, vc, bt, sl, dtype, what=f"{dtype} Nq{Nq} {version}", version=version)


@pytest.mark.parametrize("mods", [dict(softcap=30.0), "alibi", dict(window=700), dict(window=(64, 0)), "all"],
                         ids=["softcap", "alibi", "window", "window64", "all"])
def test_modifiers_bf16(mods, gen):
    Hq = 32
    if mods == "alibi":
        from attention_proto.ops.dense.reference import alibi_slopes
        mods = dict(alibi_slopes=alibi_slopes(Hq).cuda())
    elif mods == "all":
        mods = dict(softcap=20.0, alibi_slopes=torch.rand(Hq, generator=gen).cuda() * 0.01, window=333, scale=0.05)
    lens = _lens(gen, 6, 2, 5000)
    q, kc, vc, bt, sl = make_paged(6, Hq, 8, 2, 128, 16, lens, torch.bfloat16, "cuda", gen)
    for version in ("v1", "v2"):
        assert_paged(q, kc, vc, bt, sl, torch.bfloat16, what=f"{list(mods)} {version}", version=version, **mods)


def test_decode_loop_bf16_64_steps(gen):
    dtype, Hq, Hkv, D = torch.bfloat16, 32, 8, 128
    cache = PagedKVCache(4096, 16, Hkv, D, max_seqs=8, max_pages_per_seq=512, dtype=dtype, seed=0, device="cuda")
    ids = [cache.add_sequence() for _ in range(6)]
    prompt = [1, 17, 300, 1000, 2049, 4000]
    T = max(prompt)
    k = torch.randn(6, Hkv, T, D, device="cuda", dtype=dtype)
    cache.append(ids, k, torch.randn_like(k), counts=prompt)
    for step in range(64):
        kn = torch.randn(6, Hkv, 1, D, device="cuda", dtype=dtype)
        cache.append(ids, kn, torch.randn_like(kn))
        q = torch.randn(6, Hq, 1, D, device="cuda", dtype=dtype)
        out, lse = cache.attend(ids, q, return_lse=True, check_inputs=step % 2 == 0)
        bt, lens = cache.batch(ids)
        res = compare_paged(out, lse, q, cache.k_cache, cache.v_cache, bt, lens, dtype)
        assert res.ok, f"step {step}: {res}"


def test_unchecked_bad_table_stays_in_the_pool(gen):
    lens = [100, 3000]
    q, kc, vc, bt, sl = make_paged(2, 8, 2, 1, 128, 16, lens, torch.bfloat16, "cuda", gen, spare_pages=0)
    bad = bt.clone()
    bad[0, 0] = 2**30
    bad[1, 5] = -(2**30)
    for version in ("v1", "v2"):
        paged_attention(q, kc, vc, bad, sl, check_inputs=False, version=version)
        paged_attention(q, kc, vc, bt, torch.tensor([100, 10**6], device="cuda", dtype=torch.int32),
                        check_inputs=False, version=version)
    torch.cuda.synchronize()  # an illegal address would surface here


def test_pool_beyond_int32_offsets(gen):
    # 2^31 / (16 * 8 * 128) = 131072 pages: a pool of 131200 pages needs 64-bit element offsets
    page, Hkv, D = 16, 8, 128
    num_pages = 131200
    kc = torch.randn(num_pages, page, Hkv, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = [40 * page, 33]
    bt = torch.zeros(2, 40, dtype=torch.int32, device="cuda")
    bt[0] = torch.arange(num_pages - 40, num_pages, device="cuda")
    bt[1, :3] = torch.tensor([num_pages - 1, 0, 131071], device="cuda")
    q = torch.randn(2, 32, 1, D, device="cuda", dtype=torch.bfloat16)
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for version in ("v1", "v2"):
        assert_paged(q, kc, vc, bt, sl, torch.bfloat16, what=f"int64 offsets {version}", version=version)
