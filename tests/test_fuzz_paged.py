"""Shape fuzzing of paged decode attention and of the paged KV cache (append kernel) vs float64.

Decode cases draw B, Hq, Hkv (a divisor), Nq (1-16), D, the page size, mixed sequence lengths,
the pool layout (NHD, or HND seen through ``transpose(1, 2)``), a NaN-padded q, V1/V2/auto with a
partition count, ``max_seq_len`` bounds, ``check_inputs`` on/off and the modifiers (softcap,
ALiBi, window, scale). Pools come from ``ops.paged.testing.make_paged``: pages handed out in a
shuffled order, NaN in every slot and page no sequence owns, -1 in unused block-table entries,
so a read past a sequence or into a foreign page shows up as NaN. Outputs come from
NaN-filled ``torch.empty``.

Cache cases drive :class:`PagedKVCache` through random appends (mixed counts, shuffled free
lists, both layouts, frees and reuse), then check every sequence's tokens, that pages no
sequence owns still hold their sentinel (no stray write), and one decode step.

GPU cases (``gpu`` mark) take their kernel-shaping part from a fixed pool per operation
(``fuzz_pools.py``: D, dtype, page size, version, GQA group, query-length bucket, modifier flags,
padded q, index dtype; compiles dominate otherwise) and draw the rest freely (batch, KV heads,
lengths, partition counts, window sizes, pool layout, ``max_seq_len`` bounds, seeds).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attention_proto  # noqa: F401
from attention_proto.ops.paged.cache import PagedKVCache
from attention_proto.ops.paged.interface import paged_attention
from attention_proto.ops.paged.reference import gather_kv
from attention_proto.ops.paged.testing import compare_paged, make_paged
from fuzz_pools import PAGED_Q_LENS, POOLS
from test_fuzz_common import CPU_DTYPES, DEV, fuzz_settings, gen, gpu, nan_empty, nan_padded, randn, run_case

__all__ = ["nan_empty"]

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


@st.composite
def paged_cases(draw):
    """A CPU decode case: tiny shapes, every dimension drawn freely."""
    Hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    B = draw(st.integers(1, 3))
    Nq = draw(st.integers(1, 4))
    page = draw(st.sampled_from([2, 4, 8, 16, 32]))
    lens = draw(st.lists(st.integers(Nq, max(Nq, 50)), min_size=B, max_size=B))
    version = draw(st.sampled_from(["auto", "v1", "v2"]))
    parts = draw(st.one_of(st.none(), st.integers(1, 8))) if version != "v1" else None
    case = dict(
        B=B, Hq=Hkv * group, Hkv=Hkv, Nq=Nq, page=page, lens=lens, version=version, num_partitions=parts,
        D=draw(st.sampled_from([8, 16, 24, 32])),
        dtype=draw(st.sampled_from(CPU_DTYPES)),
        pool_layout=draw(st.sampled_from(["nhd", "hnd"])),
        q_padded=draw(st.booleans()),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),  # block_table / seq_lens
        index_strided=draw(st.booleans()),  # column-major block_table, seq_lens with stride 2
        extra_pages=draw(st.integers(0, 3)),  # block-table columns beyond the longest sequence
        bound=draw(st.sampled_from(["none", "exact", "loose"])),
        check_inputs=draw(st.booleans()),
        softcap=draw(st.one_of(st.none(), st.sampled_from([1.0, 20.0]))),
        alibi=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.integers(0, 40), st.tuples(st.integers(0, 40), st.just(0)))),
        scale=draw(st.one_of(st.none(), st.sampled_from([0.1, 0.5]))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return case


@st.composite
def paged_gpu_cases(draw):
    """A GPU decode case: a pool variant plus free shapes and values (``fuzz_pools.paged_kinds`` reads it back).

    Free: the window's form (an int and ``(left, 0)`` give the same kernel), the pool layout (its
    strides stay multiples of 16) and strided index tensors (the interface copies them)."""
    variant = POOLS["paged_decode"].draw(draw)
    Hkv = draw(st.integers(1, 4))
    B = draw(st.integers(1, 6))
    Nq = draw(st.integers(*PAGED_Q_LENS[variant["q_len"]]))
    top = draw(st.sampled_from([64, 600, 4000]))
    lens = draw(st.lists(st.integers(Nq, max(Nq, top)), min_size=B, max_size=B))
    window = None
    if variant["window"]:
        window = draw(st.one_of(st.integers(0, 40), st.tuples(st.integers(0, 40), st.just(0))))
    return dict(
        B=B, Hq=Hkv * variant["group"], Hkv=Hkv, Nq=Nq, page=variant["page"], lens=lens, version=variant["version"],
        num_partitions=draw(st.integers(1, 8)) if variant["parts"] else None,
        D=variant["D"], dtype=variant["dtype"], pool_layout=draw(st.sampled_from(["nhd", "hnd"])),
        q_padded=variant["q_padded"], index_dtype=variant["index_dtype"], index_strided=draw(st.booleans()),
        extra_pages=draw(st.integers(0, 3)), bound=draw(st.sampled_from(["none", "exact", "loose"])),
        check_inputs=draw(st.booleans()),
        softcap=draw(st.sampled_from([1.0, 20.0])) if variant["softcap"] else None,
        alibi=variant["alibi"], window=window,
        scale=draw(st.one_of(st.none(), st.sampled_from([0.1, 0.5]))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_paged_case(case):
    g = gen(case["seed"])
    dt = case["dtype"]
    max_pages = max(-(-n // case["page"]) for n in case["lens"]) + case["extra_pages"]
    q, kc, vc, bt, sl = make_paged(case["B"], case["Hq"], case["Hkv"], case["Nq"], case["D"], case["page"],
                                   case["lens"], dt, DEV, g, max_pages=max(max_pages, 1))
    if case["pool_layout"] == "hnd":  # head-major storage, read through the NHD view
        kc, vc = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (kc, vc))
    qv = nan_padded(q, (0, 1, 0, 0), (1, 0, 2, 3)) if case["q_padded"] else q
    bt, sl = bt.to(case["index_dtype"]), sl.to(case["index_dtype"])
    if case["index_strided"]:
        bt = bt.t().contiguous().t()
        sl = torch.stack([sl, torch.zeros_like(sl)], 1)[:, 0]
    mods = dict(scale=case["scale"], softcap=case["softcap"], window=case["window"])
    if case["alibi"]:
        mods["alibi_slopes"] = torch.linspace(0.02, 0.6, case["Hq"], dtype=torch.float32).to(DEV)
    kw = dict(version=case["version"], num_partitions=case["num_partitions"], check_inputs=case["check_inputs"])
    longest = max(case["lens"])
    if case["bound"] == "exact":
        kw["max_seq_len"] = longest
    elif case["bound"] == "loose":
        kw["max_seq_len"] = longest + 37
    out, lse = paged_attention(qv, kc, vc, bt, sl, return_lse=True, **kw, **mods)
    assert out.shape == q.shape and out.dtype == dt and lse.shape == q.shape[:3]
    assert not torch.isnan(out).any(), "NaN in the output (unwritten rows or a read of a foreign slot)"
    res = compare_paged(out, lse, q, kc, vc, bt, sl, dt, **mods)
    assert res.ok, str(res)


@st.composite
def cache_cases(draw):
    """A CPU cache case: tiny shapes, every dimension drawn freely."""
    steps = draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 12)), min_size=1, max_size=6))
    return dict(
        page=draw(st.sampled_from([1, 2, 4, 8, 16])),
        Hkv=draw(st.integers(1, 3)),
        D=draw(st.sampled_from([8, 16, 24])),
        dtype=draw(st.sampled_from(CPU_DTYPES)),
        layout=draw(st.sampled_from(["nhd", "hnd"])),
        shuffle=draw(st.one_of(st.none(), st.integers(0, 1000))),
        steps=steps,  # (sequence slot, tokens appended); a count of 0 frees and re-adds the slot
        group=draw(st.sampled_from([1, 2])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def cache_gpu_cases(draw):
    """A GPU cache case: page size, D, dtype and the decode step's GQA group from the pool; the rest free
    (the pool layout's strides stay multiples of 16: the same kernels)."""
    variant = POOLS["paged_append"].draw(draw)
    steps = draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40)), min_size=1, max_size=6))
    return dict(page=variant["page"], Hkv=draw(st.integers(1, 3)), D=variant["D"], dtype=variant["dtype"],
                layout=draw(st.sampled_from(["nhd", "hnd"])), shuffle=draw(st.one_of(st.none(), st.integers(0, 1000))),
                steps=steps, group=variant["group"], seed=draw(st.integers(0, 2**31 - 1)))


def check_cache_case(case):
    g = gen(case["seed"])
    dt, page, Hkv, D = case["dtype"], case["page"], case["Hkv"], case["D"]
    total = sum(n for _, n in case["steps"])
    num_pages = 3 * (total // page + 3) + 2
    cache = PagedKVCache(num_pages, page, Hkv, D, max_seqs=3, dtype=dt, device=DEV, layout=case["layout"],
                         seed=case["shuffle"])
    sentinel = 7.0  # pages nobody owns must keep it: any other value there is a stray write
    cache.k_cache.fill_(sentinel)
    cache.v_cache.fill_(sentinel)
    ids = [cache.add_sequence() for _ in range(3)]
    truth = {s: ([], []) for s in ids}
    ever = set()  # pages some sequence has owned (a freed page keeps its old tokens)
    for slot, n in case["steps"]:
        s = ids[slot]
        if n == 0:
            cache.free(s)
            ids[slot] = s = cache.add_sequence()
            truth[s] = ([], [])
            continue
        # a batch append of all three sequences: `slot` gets n tokens, the others 0 or 1
        counts = [n if i == slot else (i + n) % 2 for i in range(3)]
        T = max(counts)
        kn, vn = randn((3, Hkv, T, D), g, dt), randn((3, Hkv, T, D), g, dt)
        cache.append(ids, kn, vn, counts=counts)
        for i, (sid, c) in enumerate(zip(ids, counts)):
            truth[sid][0].append(kn[i, :, :c].cpu())
            truth[sid][1].append(vn[i, :, :c].cpu())
        ever.update(p for sid in ids for p in cache.pages(sid))
    bt, lens = cache.batch(ids)
    for pool, which in ((cache.k_cache, 0), (cache.v_cache, 1)):
        got = gather_kv(pool.cpu(), bt.cpu(), lens.cpu())
        for i, sid in enumerate(ids):
            want = torch.cat(truth[sid][which], 1) if truth[sid][which] else torch.zeros(Hkv, 0, D, dtype=dt)
            assert cache.seq_len(sid) == want.shape[1]
            assert torch.equal(got[i], want), f"sequence {sid}: pool {'kv'[which]} differs from what was appended"
        never = [p for p in range(num_pages) if p not in ever]
        if never:
            assert (pool.cpu()[never] == sentinel).all(), "a page no sequence ever owned was written"
    # one decode step over whatever the sequences hold (every sequence needs >= 1 token)
    live = [sid for sid in ids if cache.seq_len(sid) >= 1]
    if live:
        Hq = Hkv * case["group"]
        q = randn((len(live), Hq, 1, D), g, dt)
        out, lse = cache.attend(live, q, return_lse=True)
        bt, lens = cache.batch(live)
        res = compare_paged(out, lse, q, cache.k_cache, cache.v_cache, bt, lens, dt)
        assert res.ok, str(res)


# ------------------------------------------------------------------------------------------------
# CPU (interpreter)
# ------------------------------------------------------------------------------------------------

@fuzz_settings(30)
@given(case=paged_cases())
def test_fuzz_paged_decode(nan_empty, case):
    run_case("paged_decode", case, lambda: check_paged_case(case))


@fuzz_settings(10)
@given(case=cache_cases())
def test_fuzz_paged_cache_append(nan_empty, case):
    run_case("paged_append", case, lambda: check_cache_case(case))


# ------------------------------------------------------------------------------------------------
# GPU: larger shapes, bf16, kernel-shaping parts from fuzz_pools.POOLS; >= 1000 examples in scripts/fuzz_gpu.py
# ------------------------------------------------------------------------------------------------

@gpu
@fuzz_settings(big=True)
@given(case=paged_gpu_cases())
def test_fuzz_paged_decode_gpu(nan_empty, case):
    run_case("paged_decode", case, lambda: check_paged_case(case))


@gpu
@fuzz_settings(big=True)
@given(case=cache_gpu_cases())
def test_fuzz_paged_cache_append_gpu(nan_empty, case):
    run_case("paged_append", case, lambda: check_cache_case(case))

