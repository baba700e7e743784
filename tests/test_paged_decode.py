"""Paged decode attention under Triton's interpreter (fp16/fp32, tiny shapes), dispatch, and bad inputs.

Every pool is built with pages handed out in a shuffled order, NaN in every slot
no sequence owns and -1 in unused block-table entries (see
``attention_proto.ops.paged.testing.make_paged``): a read past a sequence shows.
"""
import pytest
import torch

import attention_proto  # noqa: F401  (interpreter switch before the jit helper below)
import triton
import triton.language as tl

from attention_proto.ops.dense.common import tanh_f32
from attention_proto.ops.paged import PagedConfig, paged_attention, plan
from attention_proto.ops.paged.decode import kv_buffers
from attention_proto.ops.paged.dispatch import MAX_PARTITIONS, ctas_per_sm, gpu_config, smem_bytes
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
# plans for an H100 (132 SMs) with the GPU tile, whatever machine runs the tests

def _plan(B, N, total=None, **kw):
    kw.setdefault("config", gpu_config(4, 128))
    return plan(batch=B, num_q_heads=32, num_kv_heads=8, q_len=1, head_dim=128, max_seq_len=N, total_tokens=total,
                sms=132, **kw)


def test_plan_v1_when_batch_fills_the_gpu():
    p = _plan(128, 4096)
    assert p.version == "v1" and p.num_partitions == 1 and p.programs == 1024
    assert "1024 programs without a split" in p.reason and "not more than 5% faster" in p.reason
    assert _plan(32, 32768).version == "v1"  # 256 programs already saturate HBM in the model


def test_plan_v2_for_one_long_sequence():
    p = _plan(1, 65536)
    assert p.version == "v2" and p.reason.startswith("V2:") and "modelled" not in p.reason
    # enough programs to saturate HBM (1.5 per SM) without a second wave (396 slots)
    assert 1.5 * 132 <= p.programs <= 3 * 132
    assert p.tokens_per_partition % p.config.BLOCK_N == 0
    assert p.tokens_per_partition * p.num_partitions >= 65536


def test_plan_small_batches_split():
    p = _plan(8, 4096)
    assert p.version == "v2" and p.num_partitions >= 3 and p.programs <= 3 * 132
    p = _plan(8, 32768)
    assert p.version == "v2" and p.programs <= 3 * 132


def test_plan_mixed_lengths_split_by_total_work():
    # 32 sequences, the longest 32k, ~9k on average: V1 waits for the longest; V2 splits by the total
    uniform = _plan(32, 32768)
    mixed = _plan(32, 32768, total=292523)
    assert uniform.version == "v1"
    assert mixed.version == "v2" and mixed.tokens_per_partition <= 4096, mixed.reason
    assert "292523 tokens in all, longest 32768" in mixed.reason
    # a total at the uniform bound is the uniform plan
    assert _plan(32, 32768, total=32 * 32768).version == "v1"


def test_plan_short_sequences_stay_v1_and_window_limits_span():
    cfg = gpu_config(1, 64)
    p = plan(batch=1, num_q_heads=8, num_kv_heads=8, q_len=1, head_dim=64, max_seq_len=200, sms=132, config=cfg)
    assert p.version == "v1" and "too short to split" in p.reason
    p = plan(batch=2, num_q_heads=8, num_kv_heads=2, q_len=1, head_dim=64, max_seq_len=1 << 17, window=1024, sms=132,
             config=gpu_config(4, 64))
    assert "window 1024" in p.reason and p.tokens_per_partition * p.num_partitions < (1 << 17)


def test_plan_forced_versions_and_row_blocks():
    p = plan(batch=4, num_q_heads=16, num_kv_heads=1, q_len=16, head_dim=128, max_seq_len=8192, version="v2",
             num_partitions=7, sms=132)
    assert p.version == "v2" and p.num_partitions == 7 and p.row_blocks == 4 and "as requested" in p.reason
    p = plan(batch=1, num_q_heads=8, num_kv_heads=8, q_len=1, head_dim=128, max_seq_len=1 << 16, version="v1")
    assert p.version == "v1" and "forced" in p.reason
    p = plan(batch=1, num_q_heads=8, num_kv_heads=8, q_len=1, head_dim=128, max_seq_len=100, version="v2")
    assert p.version == "v2" and p.num_partitions == 1  # forced V2 on a short sequence: one partition
    with pytest.raises(ValueError, match="version must be one of"):
        plan(batch=1, num_q_heads=1, num_kv_heads=1, q_len=1, head_dim=16, max_seq_len=8, version="fast")
    with pytest.raises(ValueError, match="config.reduce must be one of 'fused', 'kernel'"):
        plan(batch=1, num_q_heads=1, num_kv_heads=1, q_len=1, head_dim=16, max_seq_len=8,
             config=PagedConfig(16, 16, 16, 4, 1, "atomic"))


def test_occupancy_model_matches_the_compiled_kernel():
    # shared memory of the decode kernel compiled for sm_90 by Triton 3.6 (codegen.cross), GQA 4, D128 bf16
    for (bn, stages), smem in {(64, 3): 39168, (64, 5): 72192, (32, 7): 54656, (64, 7): 105216,
                               (128, 5): 140288}.items():
        assert smem_bytes(PagedConfig(16, bn, 128, 4, stages)) == smem, (bn, stages)
    assert [kv_buffers(s) for s in (1, 3, 4, 5, 6, 7)] == [1, 1, 1, 2, 2, 3]
    assert ctas_per_sm(PagedConfig(16, 64, 128, 4, 5)) == 3
    assert ctas_per_sm(PagedConfig(16, 128, 128, 4, 5)) == 1
    assert gpu_config(4, 128).num_stages >= 5  # two K/V buffers by default


# ---- fused merge ----------------------------------------------------------------------------

@pytest.mark.parametrize("reduce", ["fused", "kernel", "kernel_pdl"])
def test_mixed_lengths_both_merges(reduce, gen, device):
    # sequences needing 1, 2, 3 and all 4 partitions of 16 tokens (interpreter tile 16), one of length Nq;
    # with a window the first partitions start at the window, not at token 0
    Hq, Hkv, Nq, D, page = 4, 2, 2, 16, 8
    lens = [2, 20, 40, 64, 9]
    q, kc, vc, bt, sl = make_paged(len(lens), Hq, Hkv, Nq, D, page, lens, torch.float32, device, gen)
    cfg = PagedConfig(16, 16, 16, 4, 1, reduce)
    for kw in ({}, {"window": 21}, {"softcap": 3.0}):
        assert_paged(q, kc, vc, bt, sl, torch.float32, what=f"{reduce} {kw}", version="v2", num_partitions=4,
                     config=cfg, **kw)


def test_fused_merges_many_partitions_and_resets_its_counters(gen, device, monkeypatch):
    # 20 partitions: more than one merge step (MERGE_P = 16 here); counters must be back at 0 after the call
    from attention_proto.ops.paged import decode

    lens = [320, 1, 150]
    q, kc, vc, bt, sl = make_paged(3, 2, 1, 1, 32, 16, lens, torch.float16, device, gen)
    held = torch.zeros(3, dtype=torch.int32, device=device)
    monkeypatch.setattr(decode, "merge_counters", lambda n, dev: held[:n])
    assert decode.merge_tile(2, 16, 32) == (2, 16)
    outs = []
    for _ in range(2):  # the second call reuses the same counters
        assert_paged(q, kc, vc, bt, sl, torch.float16, what="20 partitions", version="v2", num_partitions=20)
        assert int(held.abs().sum()) == 0, held
        outs.append(paged_attention(q, kc, vc, bt, sl, version="v2", num_partitions=20))
    assert torch.equal(outs[0], outs[1])


def test_fused_equals_kernel_merge_within_rounding(gen, device):
    lens = [7, 45, 33]
    q, kc, vc, bt, sl = make_paged(3, 4, 2, 1, 32, 8, lens, torch.float32, device, gen)
    a, la = paged_attention(q, kc, vc, bt, sl, version="v2", num_partitions=3, return_lse=True,
                            config=PagedConfig(16, 16, 32, 4, 1, "fused"))
    b, lb = paged_attention(q, kc, vc, bt, sl, version="v2", num_partitions=3, return_lse=True,
                            config=PagedConfig(16, 16, 32, 4, 1, "kernel"))
    assert torch.allclose(a, b, atol=1e-5, rtol=0) and torch.allclose(la, lb, atol=1e-5, rtol=0)


def test_total_tokens_argument(gen, device):
    lens = [5, 40]
    q, kc, vc, bt, sl = make_paged(2, 4, 2, 1, 16, 8, lens, torch.float16, device, gen)
    # any total gives correct results (it only sizes partitions)
    for total in (0, 45, 10**6):
        assert_paged(q, kc, vc, bt, sl, torch.float16, what=f"total {total}", total_tokens=total,
                     check_inputs=False, max_seq_len=40)
    with pytest.raises(ValueError, match="total_tokens must be a non-negative int or None"):
        paged_attention(q, kc, vc, bt, sl, total_tokens=-1)
    with pytest.raises(ValueError, match="config.reduce must be one of"):
        paged_attention(q, kc, vc, bt, sl, config=PagedConfig(16, 16, 16, 4, 1, "x"))
    p = explain(q, kc, bt, max_seq_len=40, total_tokens=45)
    assert p.version in ("v1", "v2")


# ---- softcap accuracy (issue #10) -----------------------------------------------------------
# The H100 fuzz run failed 30 of 215 paged cases: the kernel's softcap took a tanh that was
# tanh.approx.f32 on the GPU (~2^-11 relative error; the interpreter runs the exact form). That
# error breaks fp32 outputs and the fp32 LSE bound in every dtype. The kernel now uses the exact tanh_f32.
SOFTCAP_CASE = dict(B=3, Hq=10, Hkv=2, Nq=2, D=80, page=16, lens=[29, 4, 61])


def _softcap_inputs(dtype, device):
    c = SOFTCAP_CASE
    g = torch.Generator().manual_seed(10)
    return make_paged(c["B"], c["Hq"], c["Hkv"], c["Nq"], c["D"], c["page"], c["lens"], dtype, device, g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("version,parts", [("v1", None), ("v2", 3)])
@pytest.mark.parametrize("softcap", [1.0, 20.0])
def test_softcap_is_exact_regression(softcap, version, parts, dtype, device):
    q, kc, vc, bt, sl = _softcap_inputs(dtype, device)
    assert_paged(q, kc, vc, bt, sl, dtype, what=f"softcap {softcap} {version} {dtype}", version=version,
                 num_partitions=parts, softcap=softcap, scale=0.5)


@triton.jit
def _tanh_11bit(x):
    # tanh rounded to fp16's 11 significant bits: a stand-in for tanh.approx.f32's error
    return tanh_f32(x).to(tl.float16).to(tl.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="swaps a jit helper of the kernel: interpreter only")
def test_softcap_case_catches_an_approximate_tanh(monkeypatch):
    # the regression case above is sensitive: with tanh.approx's error the fp32 check fails
    from attention_proto.ops.paged import decode
    from attention_proto.ops.paged.testing import check_paged

    monkeypatch.setattr(decode, "tanh_f32", _tanh_11bit)
    q, kc, vc, bt, sl = _softcap_inputs(torch.float32, "cpu")
    assert not check_paged(q, kc, vc, bt, sl, torch.float32, version="v1", softcap=1.0, scale=0.5).ok


_PDL_XCOMPILE = r"""
import os
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton.language as tl
import attention_proto.codegen.cross as X
import attention_proto.ops.paged.decode as DEC
DEC._INTERPRETED = tl.constexpr(False)  # this machine has no GPU; the kernels are compiled, not run
from attention_proto.ops.paged.dispatch import PagedConfig, plan
seen = {}
orig = X.compile_for
def cf(kernel, args, kw, arch=90):
    ck = orig(kernel, args, kw, arch)
    seen[ck.metadata.name] = (ck.metadata.launch_pdl, ck.asm["ptx"].count("griddepcontrol.wait"),
                              ck.asm["ptx"].count("griddepcontrol.launch_dependents"))
    return ck
X.compile_for = cf
q = torch.randn(2, 8, 1, 128, dtype=torch.bfloat16)
kc = torch.randn(64, 16, 2, 128, dtype=torch.bfloat16)
bt = torch.arange(64, dtype=torch.int32).reshape(2, 32)
sl = torch.tensor([500, 300], dtype=torch.int32)
p = plan(batch=2, num_q_heads=8, num_kv_heads=2, q_len=1, head_dim=128, max_seq_len=512, version="v2",
         num_partitions=4, config=PagedConfig(16, 64, 128, 4, 5, "kernel_pdl"))
with X.compile_launches(90):
    DEC.paged_decode(q, kc, torch.randn_like(kc), bt, sl, p, scale=0.1)
print(sorted(seen.items()))
"""


def test_kernel_pdl_merge_compiles_for_hopper():
    # the GPU form of "kernel_pdl" (interpreted runs take the plain second launch): the decode kernel lets its
    # dependent launch early, the reduce waits on griddepcontrol.wait and is launched as a programmatic dependent
    import subprocess
    import sys
    from pathlib import Path

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("Triton's bundled ptxas not found")
    out = subprocess.run([sys.executable, "-c", _PDL_XCOMPILE], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = dict(eval(out.stdout.strip().splitlines()[-1]))
    assert seen["_paged_decode_kernel"] == (False, 0, 1)
    assert seen["_paged_reduce_kernel"] == (True, 1, 0)
