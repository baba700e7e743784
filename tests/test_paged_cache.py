"""The paged KV cache manager and its append kernel; the decode-loop test (append + attend, 64 steps)."""
import pytest
import torch

from attention_proto.ops.paged import CacheFullError, PagedKVCache, gather_kv, paged_kv_append
from attention_proto.ops.paged.testing import compare_paged

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(torch.seed() % (2**31))
    return g


def _rand(gen, *shape, dtype=torch.float16, device="cpu"):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


@pytest.mark.parametrize("layout", ["nhd", "hnd"])
def test_append_writes_each_token_where_the_block_table_says(layout, gen, device):
    Hkv, D, page = 2, 24, 8
    cache = PagedKVCache(16, page, Hkv, D, max_seqs=3, max_pages_per_seq=6, layout=layout, seed=1, device=device)
    ids = [cache.add_sequence() for _ in range(3)]
    prompt = [5, 0, 19]
    T = max(prompt)
    k0, v0 = _rand(gen, 3, Hkv, T, D, device=device), _rand(gen, 3, Hkv, T, D, device=device)
    cache.append(ids, k0, v0, counts=prompt)
    k1, v1 = _rand(gen, 3, Hkv, 4, D, device=device), _rand(gen, 3, Hkv, 4, D, device=device)
    cache.append(ids, k1, v1)
    bt, lens = cache.batch(ids)
    assert lens.tolist() == [9, 4, 23]
    pages = [p for s in ids for p in cache.pages(s)]
    assert len(set(pages)) == len(pages) and pages != sorted(pages)  # distinct and shuffled
    for cached, first, second in ((cache.k_cache, k0, k1), (cache.v_cache, v0, v1)):
        got = gather_kv(cached, bt, lens)
        for b in range(3):
            want = torch.cat([first[b, :, : prompt[b]], second[b]], dim=1)
            assert torch.equal(got[b].cpu(), want.cpu()), f"sequence {b}"


def test_functional_append_with_counts(gen, device):
    kc = torch.zeros(4, 8, 1, 16, dtype=torch.float32, device=device)
    vc = torch.zeros_like(kc)
    bt = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32, device=device)
    start = torch.tensor([6, 0], dtype=torch.int32, device=device)
    counts = torch.tensor([3, 1], dtype=torch.int32, device=device)
    kn = _rand(gen, 2, 1, 3, 16, dtype=torch.float32, device=device)
    paged_kv_append(kn, kn * 2, kc, vc, bt, start, counts)
    assert torch.equal(kc[2, 6:8, 0], kn[0, 0, :2]) and torch.equal(kc[0, 0, 0], kn[0, 0, 2])
    assert torch.equal(kc[1, 0, 0], kn[1, 0, 0]) and torch.equal(vc[1, 0, 0], 2 * kn[1, 0, 0])
    assert int((kc != 0).any(-1).sum()) == 4  # nothing else written
    # a page id outside the pool and a position past the table drop their tokens, nothing else moves
    before = kc.clone()
    bad = torch.tensor([[7, -1], [1, 3]], dtype=torch.int32, device=device)
    paged_kv_append(kn, kn, kc, vc, bad, torch.tensor([0, 16], dtype=torch.int32, device=device), counts)
    assert torch.equal(kc, before)


def test_allocation_free_and_exhaustion(device):
    cache = PagedKVCache(4, 8, 1, 16, max_seqs=2, max_pages_per_seq=3, device=device)
    a, b = cache.add_sequence(), cache.add_sequence()
    with pytest.raises(CacheFullError, match="all 2 sequence slots are in use"):
        cache.add_sequence()
    cache.reserve(a, 17)
    assert cache.free_pages == 1 and len(cache.pages(a)) == 3
    with pytest.raises(CacheFullError, match="would need 4 pages; the block table holds 3"):
        cache.reserve(a, 25)
    with pytest.raises(CacheFullError, match="needs 2 more pages; 1 of 4 are free"):
        cache.reserve(b, 9)
    cache.free(a)
    assert cache.free_pages == 4
    with pytest.raises(ValueError, match="seq_id 0 is not a live sequence"):
        cache.seq_len(a)
    assert cache.add_sequence() == a and cache.seq_len(a) == 0


def test_append_bad_inputs(device):
    cache = PagedKVCache(4, 8, 2, 16, max_seqs=2, device=device)
    s = cache.add_sequence()
    k = torch.zeros(1, 2, 1, 16, dtype=torch.float16, device=device)
    with pytest.raises(TypeError, match="k_new has dtype torch.float32; supported: float16"):
        cache.append([s], k.float(), k.float())
    with pytest.raises(ValueError, match=r"k_new must be \[B=1, Hkv=2, T, D=16\]"):
        cache.append([s], k[:, :1], k[:, :1])
    with pytest.raises(ValueError, match=r"counts must hold 1 values in \[0, T=1\]"):
        cache.append([s], k, k, counts=[2])
    with pytest.raises(ValueError, match="not a live sequence"):
        cache.append([1], k, k)
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        PagedKVCache(4, 12, 1, 16, max_seqs=1, device=device)


def test_decode_loop_64_steps_matches_reference(gen, device):
    """Mixed-length batch: prefill, then 64 steps of append + attend; every step against float64.

    Halfway through, one sequence finishes and a new one takes its slot (pages are recycled,
    so block tables become scattered), and the batch goes on.
    """
    dtype, Hq, Hkv, D, page = torch.float16, 4, 2, 16, 8
    cache = PagedKVCache(64, page, Hkv, D, max_seqs=4, max_pages_per_seq=16, dtype=dtype, seed=3, device=device)
    ids = [cache.add_sequence() for _ in range(3)]
    prompt = [1, 13, 30]
    T = max(prompt)
    cache.append(ids, _rand(gen, 3, Hkv, T, D, device=device), _rand(gen, 3, Hkv, T, D, device=device), counts=prompt)
    for step in range(64):
        if step == 32:
            cache.free(ids[0])
            ids[0] = cache.add_sequence()
            cache.append(ids[:1], _rand(gen, 1, Hkv, 5, D, device=device), _rand(gen, 1, Hkv, 5, D, device=device))
        cache.append(ids, _rand(gen, 3, Hkv, 1, D, device=device), _rand(gen, 3, Hkv, 1, D, device=device))
        q = _rand(gen, 3, Hq, 1, D, device=device)
        # the auto plan alternates with an explicit V2 so that both kernels run through the loop
        kw = dict(version="v2", num_partitions=3) if step % 2 else {}
        out, lse = cache.attend(ids, q, return_lse=True, **kw)
        bt, lens = cache.batch(ids)
        res = compare_paged(out, lse, q, cache.k_cache, cache.v_cache, bt, lens, dtype)
        assert res.ok, f"step {step}: {res}"
    assert [cache.seq_len(s) for s in ids] == [5 + 32, 13 + 64, 30 + 64]
