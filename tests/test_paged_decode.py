"""Paged decode attention under Triton's interpreter (fp16/fp32, tiny shapes), dispatch, and bad inputs.

Every pool is built with pages handed out in a shuffled order, NaN in every slot
no sequence owns and -1 in unused block-table entries (see
``attention_proto.ops.paged.testing.make_paged``): a read past a sequence shows.
"""
import pytest
import torch

from attention_proto.ops.paged import paged_attention, plan
from attention_proto.ops.paged.dispatch import MAX_PARTITIONS
from attention_proto.ops.paged.interface import explain
from attention_proto.ops.paged.testing import assert_paged, make_paged

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(torch.seed() % (2**31))
    return g


# (Hq, Hkv, Nq, D, page, lens): GQA gather path (page < tile), MHA with odd D and a page >= tile,
# a 16-row group with an in-page scalar lookup
CASES = [
    (4, 2, 1, 32, 8, [1, 9, 40]),
    (2, 2, 3, 24, 16, [3, 16, 33]),
    (8, 1, 2, 16, 32, [2, 70]),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("version,parts", [("v1", None), ("v2", 3)])
@pytest.mark.parametrize("case", CASES, ids=["gqa-p8", "mha-d24-p16", "g8-p32"])
def test_matches_reference(dtype, version, parts, case, gen, device):
    Hq, Hkv, Nq, D, page, lens = case
    q, kc, vc, bt, sl = make_paged(len(lens), Hq, Hkv, Nq, D, page, lens, dtype, device, gen)
    assert_paged(q, kc, vc, bt, sl, dtype, what=f"{version} {case}", version=version, num_partitions=parts)


MODS = {
    "softcap": dict(softcap=1.5),
    "alibi": "alibi",
    "window": dict(window=5),
    "window-pair": dict(window=(12, 0)),
    "all+scale": "all",
}


@pytest.mark.parametrize("version,parts", [("v1", None), ("v2", 4)])
@pytest.mark.parametrize("mod", list(MODS))
def test_modifiers(mod, version, parts, gen, device):
    Hq, Hkv, Nq, D, page, lens = 4, 2, 2, 32, 8, [2, 23, 45]
    kw = MODS[mod]
    if kw == "alibi":
        kw = dict(alibi_slopes=torch.rand(Hq, generator=gen).to(device))
    elif kw == "all":
        kw = dict(softcap=2.0, alibi_slopes=torch.rand(Hq, generator=gen).to(device), window=9, scale=0.3)
    q, kc, vc, bt, sl = make_paged(len(lens), Hq, Hkv, Nq, D, page, lens, torch.float16, device, gen)
    assert_paged(q, kc, vc, bt, sl, torch.float16, what=mod, version=version, num_partitions=parts, **kw)


@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (16, 2)], ids=["rows64", "rows128-two-row-blocks"])
def test_chunked_prefill_16_queries(Hq, Hkv, gen, device):
    # G * Nq rows: 64 fit one tile; 128 exceed MAX_BLOCK_M and split into row blocks
    lens = [16, 29]
    q, kc, vc, bt, sl = make_paged(2, Hq, Hkv, 16, 16, 8, lens, torch.float32, device, gen)
    for version, parts in (("v1", None), ("v2", 2)):
        assert_paged(q, kc, vc, bt, sl, torch.float32, what=f"Nq16 {version}", version=version, num_partitions=parts)


def test_edges_and_v1_equals_v2(gen, device):
    # seq_len == Nq, window 0 (only the token itself), more partitions than tokens (empty ones)
    lens = [2, 2, 17]
    q, kc, vc, bt, sl = make_paged(3, 2, 1, 2, 16, 8, lens, torch.float32, device, gen)
    assert_paged(q, kc, vc, bt, sl, torch.float32, what="window 0", window=0, version="v2", num_partitions=8)
    o1 = paged_attention(q, kc, vc, bt, sl, version="v1")
    o2 = paged_attention(q, kc, vc, bt, sl, version="v2", num_partitions=5)
    assert torch.allclose(o1, o2, atol=1e-6, rtol=0)
    assert not o1.isnan().any()


def test_hnd_layout_and_int64_tables(gen, device):
    lens = [7, 30]
    q, kc, vc, bt, sl = make_paged(2, 4, 2, 1, 32, 8, lens, torch.float16, device, gen)
    # a head-major pool [num_pages, Hkv, page, D] is accepted as its transpose(1, 2) view
    k_hnd = kc.transpose(1, 2).contiguous().transpose(1, 2)
    v_hnd = vc.transpose(1, 2).contiguous().transpose(1, 2)
    assert k_hnd.stride(1) == 32 and k_hnd.stride(2) == 8 * 32
    assert_paged(q, k_hnd, v_hnd, bt.long(), sl.long(), torch.float16, what="hnd", version="v2", num_partitions=2)


def test_auto_and_explain(gen, device):
    lens = [5, 40]
    q, kc, vc, bt, sl = make_paged(2, 4, 2, 1, 16, 8, lens, torch.float16, device, gen)
    assert_paged(q, kc, vc, bt, sl, torch.float16, what="auto")
    p = explain(q, kc, bt, max_seq_len=40)
    assert p.version in ("v1", "v2") and p.reason


def test_unchecked_never_reads_outside_the_pool(gen, device):
    lens = [9, 20]
    q, kc, vc, bt, sl = make_paged(2, 2, 1, 1, 16, 8, lens, torch.float32, device, gen, spare_pages=0)
    bad = bt.clone()
    bad[0, 0] = 10**6
    bad[1, 1] = -(10**6)
    out = paged_attention(q, kc, vc, bad, sl, check_inputs=False)
    assert out.shape == q.shape
    # a length past the block table: tokens beyond its pages are masked, not read
    long = torch.tensor([9, 10**5], dtype=torch.int32, device=device)
    out = paged_attention(q, kc, vc, bt, long, check_inputs=False, version="v2", num_partitions=2)
    assert out.shape == q.shape


# ---- bad inputs ---------------------------------------------------------------------------

def _good(device):
    g = torch.Generator().manual_seed(0)
    return make_paged(2, 4, 2, 1, 16, 8, [5, 12], torch.float16, device, g)


BAD = [
    ("block table past the pool", lambda a: a.update(bt=_set(a["bt"], (1, 1), 10_000)), ValueError,
     r"block_table\[1, 1\] = 10000 points outside the pool of \d+ pages"),
    ("negative page id", lambda a: a.update(bt=_set(a["bt"], (0, 0), -3)), ValueError,
     r"block_table\[0, 0\] = -3 points outside the pool"),
    ("sequence longer than its pages", lambda a: a.update(sl=_set(a["sl"], (1,), 100)), ValueError,
     r"seq_lens\[1\] = 100 is longer than its pages: block_table has 3 pages of 8 tokens"),
    ("sequence shorter than the queries", lambda a: a.update(sl=_set(a["sl"], (0,), 0)), ValueError,
     r"seq_lens\[0\] = 0 is shorter than the 1 query tokens"),
    ("heads not a multiple", lambda a: a.update(q=a["q"][:, :3]), ValueError,
     r"q's heads \(3\) must be a multiple of the cache's KV heads \(2\)"),
    ("head dims differ", lambda a: a.update(q=a["q"][..., :8]), ValueError, r"q's head dim \(8\) must equal"),
    ("dtypes differ", lambda a: a.update(q=a["q"].float()), TypeError, r"q, k_cache, v_cache must share one dtype"),
    ("unsupported dtype", lambda a: a.update(q=a["q"].double(), kc=a["kc"].double(), vc=a["vc"].double()),
     TypeError, r"q has dtype torch.float64; supported: float16, bfloat16, float32"),
    ("v shape", lambda a: a.update(vc=a["vc"][:-1]), ValueError, r"v_cache must have k_cache's shape"),
    ("too many queries", lambda a: a.update(q=a["q"].expand(-1, -1, 17, -1)), ValueError,
     r"1 to 16 query tokens"),
    ("page size not a power of two", lambda a: a.update(kc=a["kc"][:, :6], vc=a["vc"][:, :6]), ValueError,
     r"page_size \(k_cache dim 1\) must be a power of two"),
    ("float block table", lambda a: a.update(bt=a["bt"].float()), TypeError, r"block_table must be an int32 or int64"),
    ("block table rows", lambda a: a.update(bt=a["bt"][:1]), ValueError, r"block_table must be \[B=2, max_pages\]"),
    ("seq_lens rank", lambda a: a.update(sl=a["sl"][:, None]), ValueError, r"seq_lens must have 1 dimensions"),
    ("q rank", lambda a: a.update(q=a["q"][0]), ValueError, r"q must have 4 dimensions \(\[B, Hq, Nq, D\]\)"),
    ("D not unit stride", lambda a: a.update(kc=a["kc"].transpose(1, 3).contiguous().transpose(1, 3)), ValueError,
     r"k_cache must be contiguous in its last"),
    ("alibi shape", lambda a: a.update(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must be \[Hq=4\]"),
    ("bad version", lambda a: a.update(version="v3"), ValueError, r"version must be one of 'auto', 'v1', 'v2'"),
    ("v1 with partitions", lambda a: a.update(version="v1", num_partitions=4), ValueError,
     r"num_partitions=4 needs version 'v2'"),
    ("too many partitions", lambda a: a.update(num_partitions=MAX_PARTITIONS + 1), ValueError,
     r"num_partitions must be an int in"),
    ("max_seq_len too small", lambda a: a.update(max_seq_len=4), ValueError,
     r"max_seq_len=4 is below the longest sequence \(seq_lens max 12\)"),
    ("bad window", lambda a: a.update(window="x"), ValueError, r"window must be None, an int or"),
]


def _set(t, idx, val):
    t = t.clone()
    t[idx] = val
    return t


@pytest.mark.parametrize("name,mutate,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(name, mutate, exc, msg, device):
    q, kc, vc, bt, sl = _good(device)
    a = dict(q=q, kc=kc, vc=vc, bt=bt, sl=sl)
    mutate(a)
    kw = {k: v for k, v in a.items() if k not in ("q", "kc", "vc", "bt", "sl")}
    with pytest.raises(exc, match=msg):
        paged_attention(a["q"], a["kc"], a["vc"], a["bt"], a["sl"], **kw)


# ---- dispatch -------------------------------------------------------------------------------

def test_plan_v1_when_batch_fills_the_gpu():
    p = plan(batch=128, num_q_heads=32, num_kv_heads=8, q_len=1, head_dim=128, max_seq_len=4096, sms=132)
    assert p.version == "v1" and p.num_partitions == 1 and p.programs == 1024
    assert "1024 programs without a split run 4 wave(s)" in p.reason and "models no faster" in p.reason


def test_plan_v2_for_one_long_sequence():
    p = plan(batch=1, num_q_heads=32, num_kv_heads=8, q_len=1, head_dim=128, max_seq_len=65536, sms=132)
    assert p.version == "v2" and p.num_partitions == 32 and p.programs == 256
    assert p.tokens_per_partition % p.config.BLOCK_N == 0
    assert p.tokens_per_partition * p.num_partitions >= 65536
    assert p.reason.startswith("V2:") and "modelled" in p.reason


def test_plan_small_batches_split_to_fill_the_slots():
    # 8 x 8 = 64 programs leave most of 264 slots idle: 4 partitions fill one wave
    p = plan(batch=8, num_q_heads=32, num_kv_heads=8, q_len=1, head_dim=128, max_seq_len=4096, sms=132)
    assert (p.version, p.num_partitions, p.programs) == ("v2", 4, 256)
    p = plan(batch=32, num_q_heads=32, num_kv_heads=8, q_len=1, head_dim=128, max_seq_len=32768, sms=132)
    assert p.version == "v1"


def test_plan_short_sequences_stay_v1_and_window_limits_span():
    p = plan(batch=1, num_q_heads=8, num_kv_heads=8, q_len=1, head_dim=64, max_seq_len=200, sms=132)
    assert p.version == "v1" and "too short to split" in p.reason
    p = plan(batch=2, num_q_heads=8, num_kv_heads=2, q_len=1, head_dim=64, max_seq_len=1 << 17, window=1024, sms=132)
    assert "window 1024" in p.reason and p.tokens_per_partition * p.num_partitions < (1 << 17)


def test_plan_forced_versions_and_row_blocks():
    p = plan(batch=4, num_q_heads=16, num_kv_heads=1, q_len=16, head_dim=128, max_seq_len=8192, version="v2",
             num_partitions=7, sms=132)
    assert p.version == "v2" and p.num_partitions == 7 and p.row_blocks == 4 and "as requested" in p.reason
    p = plan(batch=1, num_q_heads=8, num_kv_heads=8, q_len=1, head_dim=128, max_seq_len=1 << 16, version="v1")
    assert p.version == "v1" and "forced" in p.reason
    p = plan(batch=1, num_q_heads=8, num_kv_heads=8, q_len=1, head_dim=128, max_seq_len=100, version="v2")
    assert p.version == "v2" and p.num_partitions == 1  # forced V2 on a short sequence: one partition + reduce
    with pytest.raises(ValueError, match="version must be one of"):
        plan(batch=1, num_q_heads=1, num_kv_heads=1, q_len=1, head_dim=16, max_seq_len=8, version="fast")
