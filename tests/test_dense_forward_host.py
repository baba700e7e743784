"""Dense forward, host side: launch plans, direct launches, config rules and defaults.

The host work of a call (path/config choice, TMA checks, integer arguments) is cached per call
signature and repeated calls launch the compiled kernel directly (``runtime.cache.DirectLaunch``);
these tests check what keys a plan, the direct-launch contract (with a fake compiled kernel on the
CPU, for real on a GPU: repeated calls, launch hooks, CUDA graphs) and the config rules (warp
specialization needs 8 warps, the shared-memory model with fused RoPE, the smoke-run defaults).
"""
from __future__ import annotations

import pytest
import torch

import attention_proto  # noqa: F401
from attention_proto.ops.dense import configs as cfgmod
from attention_proto.ops.dense.configs import FwdConfig, forward_candidates, pick_forward_config
from attention_proto.ops.dense.forward import flash_attention_forward
from attention_proto.ops.dense.interface import attention, attention_varlen
from attention_proto.ops.dense.reference import attention_reference
from attention_proto.testing import assert_close_rule, poison_
from test_dense_forward import DEV, _varlen_inputs, check, qkv, rand

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")



@pytest.mark.parametrize("scale", [-0.2, 0.0], ids=["negative", "zero"])
def test_nonpositive_scale(scale):
    """Plain scores fold the scale into exp2's FMA only for scale > 0; other scales still work."""
    q, k, v = qkv(1, 2, 2, 19, 23, 16, torch.float32)
    check(q, k, v, torch.float32, scale=scale, causal=True)
    check(q, k, v, torch.float32, scale=scale)


@pytest.mark.parametrize("path", ["portable", "tma"])
def test_no_lse_when_not_wanted(path):
    """return_lse=False: no LSE is allocated or written (inference); out is unchanged."""
    q, k, v = qkv(1, 4, 2, 21, 30, 32, torch.float16)
    cfg = FwdConfig(16, 16, 4, 1, path)
    o1, l1 = flash_attention_forward(q, k, v, causal=True, config=cfg)
    out = poison_(torch.empty_like(q))
    o2, l2 = flash_attention_forward(q, k, v, causal=True, config=cfg, out=out, return_lse=False)
    assert l2 is None and o2 is out and torch.equal(o1, o2) and l1 is not None
    lq, lk = [5, 0, 9], [7, 3, 9]
    qv, kv_, vv, cq, ck = _varlen_inputs(lq, lk, 2, 1, 16, torch.float16)
    ov = attention_varlen(qv, kv_, vv, cq, ck, causal=True)
    ov2, lv = attention_varlen(qv, kv_, vv, cq, ck, causal=True, return_lse=True)
    assert torch.equal(ov, ov2) and lv.shape == (2, qv.shape[0])


def test_launch_plans_reused_per_signature():
    from attention_proto.ops.dense import forward as fwd

    fwd.clear_launch_plans()
    for _ in range(2):  # same signature, new data: one plan
        q, k, v = qkv(1, 4, 2, 20, 27, 16, torch.float16)
        check(q, k, v, torch.float16, causal=True)
    assert len(fwd._PLANS) == 1
    q, k, v = qkv(1, 4, 2, 21, 27, 16, torch.float16)
    check(q, k, v, torch.float16, causal=True)
    assert len(fwd._PLANS) == 2
    # a pointer off 16-byte alignment (Triton specializes on it): its own plan, no direct launch
    buf = rand(1 * 4 * 20 * 16 + 1, dtype=torch.float16)
    qm = buf[1:].view(1, 4, 20, 16)
    assert qm.data_ptr() % 16
    k, v = qkv(1, 4, 2, 20, 27, 16, torch.float16)[1:]
    check(qm, k, v, torch.float16, causal=True)
    plans = list(fwd._PLANS.items())
    assert len(plans) == 3 and [p.aligned for _, p in plans] == [True, True, False]
    check(q, k, v, torch.float16, causal=True, window=(5, 0))  # integer modifier values key plans too
    check(q, k, v, torch.float16, causal=True, window=(6, 0))
    assert len(fwd._PLANS) == 5
    cfgmod.reload_table()  # a new table may pick other configs: plans are dropped
    assert len(fwd._PLANS) == 0


class _P:
    """Stand-in for triton's KernelParam."""

    def __init__(self, name, is_constexpr, default=None):
        import inspect

        self.name, self.is_constexpr = name, is_constexpr
        self.default = inspect.Parameter.empty if default is None else default


class _FakeCompiled:
    function, packed_metadata = "fn", "pm"

    def __init__(self):
        self.calls = []
        self.run = lambda *a: self.calls.append(a)

    def launch_metadata(self, grid, stream, *args):
        return ("md", grid, stream, len(args))


class _FakeKernel:
    __name__ = "fake"

    def __init__(self, params):
        self.params, self.compiled, self.launches = params, _FakeCompiled(), 0

    def warmup(self, *a, grid=None, **k):
        return self.compiled

    def __getitem__(self, grid):
        def run(*a, **k):
            self.launches += 1
            return self.compiled
        return run


def test_direct_launch_contract(monkeypatch):
    from triton import knobs

    from attention_proto.runtime import cache as rc

    dev = [0]
    monkeypatch.setattr(rc, "interpreter_mode", lambda: False)
    monkeypatch.setattr(rc, "_device_fns", lambda: (lambda: dev[0], lambda d: 100 + d))
    cache = rc.KernelCache()
    kern = _FakeKernel([_P("X", False), _P("n", False), _P("BLOCK", True), _P("FLAG", True, default=7)])
    x = torch.zeros(4)
    compiled = cache.launch(kern, (2, 3), x, 5, BLOCK=16)
    assert compiled is kern.compiled and kern.launches == 1 and cache.stats.misses == 1
    dl = cache.direct(kern, compiled, (x, 5), {"BLOCK": 16})
    assert dl is not None
    assert dl((2, 3), (x, 6)) is True and kern.launches == 1
    # grid padded to 3-D, current stream, empty hook chains passed as None, constexprs in signature order
    assert compiled.calls[-1] == (2, 3, 1, 100, "fn", "pm", None, None, None, x, 6, 16, 7)
    assert cache.stats.hits == 1 and cache.entries()[0].hits == 1
    seen = []
    hook = lambda md: seen.append(md)  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert dl((4, 1, 1), (x, 6))
        assert compiled.calls[-1][6] == ("md", (4, 1, 1), 100, 4) and compiled.calls[-1][7] is knobs.runtime.launch_enter_hook
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    dev[0] = 1  # another current device: the compiled function belongs to device 0
    assert dl((2, 3), (x, 6)) is False
    dev[0] = 0
    cache.launch = lambda *a, **k: None  # a launch wrapper (codegen.record_launches) sees every launch
    assert dl((2, 3), (x, 6)) is False
    del cache.launch
    cache.clear()
    assert dl((2, 3), (x, 6)) is False
    # kernels whose tail is not all constexpr, and the interpreter, get no direct launcher
    k2 = _FakeKernel([_P("X", False), _P("n", False), _P("m", False)])
    c2 = cache.launch(k2, (1,), x, 5, m=3)
    assert cache.direct(k2, c2, (x, 5), {"m": 3}) is None
    monkeypatch.setattr(rc, "interpreter_mode", lambda: True)
    assert cache.direct(kern, compiled, (x, 5), {"BLOCK": 16}) is None


def test_forward_launches_directly_after_first_call(monkeypatch):
    """The direct launcher of a plan gets exactly what the plan's first launch got."""
    from attention_proto.ops.dense import forward as fwd
    from attention_proto.runtime.cache import KERNEL_CACHE

    class Recorder:
        generation = KERNEL_CACHE.generation

        def __init__(self, args):
            self.first, self.calls = args, []

        def __call__(self, grid, args):
            self.calls.append((grid, args))
            return True

    made = []

    def direct(kernel, compiled, args, consts):
        made.append(Recorder(args))
        return made[-1]

    monkeypatch.setattr(KERNEL_CACHE, "direct", direct)
    fwd.clear_launch_plans()
    alibi = torch.tensor([0.5, 0.25, 0.1, 0.3], device=DEV)
    q, k, v = qkv(1, 4, 2, 9, 12, 16, torch.float16)
    flash_attention_forward(q, k, v, causal=True, softcap=5.0, alibi_slopes=alibi)
    assert len(made) == 1
    q2, k2, v2 = qkv(1, 4, 2, 9, 12, 16, torch.float16)
    out = torch.empty_like(q2)
    flash_attention_forward(q2, k2, v2, causal=True, softcap=7.0, alibi_slopes=alibi, scale=0.3, out=out)
    assert len(made) == 2  # a caller's out is part of the signature: a second plan
    flash_attention_forward(q2, k2, v2, causal=True, softcap=7.0, alibi_slopes=alibi, scale=0.3)
    rec = made[0]
    assert len(rec.calls) == 1
    grid, args = rec.calls[0]
    assert len(args) == len(rec.first) and args[:3] == (q2, k2, v2) and args[5] is alibi
    assert [type(a) for a in args] == [type(a) for a in rec.first]
    floats = [i for i, a in enumerate(args) if isinstance(a, float)]
    assert [args[i] for i in floats] == [0.3, 0.3 * 1.4426950408889634, 7.0]
    ints = [i for i, a in enumerate(args) if isinstance(a, int)]
    assert [args[i] for i in ints] == [rec.first[i] for i in ints]
    fwd.clear_launch_plans()


def test_small_problems_skip_the_tma_path(monkeypatch):
    from attention_proto.ops.dense import forward as fwd

    asked, picked = [], []
    monkeypatch.setattr(fwd, "_tma_path_usable", lambda *a: asked.append(1) or True)

    def pick(D, dtype, causal, N, path="auto", rope=False, split=False):
        picked.append(path)
        return FwdConfig(16, 16, 4, 1)

    monkeypatch.setattr(fwd, "pick_forward_config", pick)
    fwd.clear_launch_plans()
    q, k, v = qkv(1, 2, 2, 20, 20, 16, torch.float16)
    flash_attention_forward(q, k, v)
    assert picked == ["portable"] and not asked  # 800 scores
    monkeypatch.setattr(fwd, "SMALL_PROBLEM_SCORES", 100)
    fwd.clear_launch_plans()
    check(q, k, v, torch.float16)
    assert picked[-1] == "auto" and asked
    fwd.clear_launch_plans()


@pytest.fixture
def gpu_picks(monkeypatch):
    """The config picker as on a GPU without a tuned table."""
    monkeypatch.setattr(cfgmod, "interpreter_mode", lambda: False)
    monkeypatch.setattr(cfgmod, "TABLE_PATH", cfgmod.TABLE_PATH.with_name("no_such_table.json"))
    cfgmod.reload_table()
    yield
    monkeypatch.undo()
    cfgmod.reload_table()


def test_default_configs_follow_the_smoke_run(gpu_picks):
    bf = torch.bfloat16
    for D in (16, 32, 64):
        for causal in (False, True):
            assert pick_forward_config(D, bf, causal, 4096, "auto") == FwdConfig(64, 64, 4, 3, "tma")
    assert pick_forward_config(128, bf, True, 4096, "auto") == FwdConfig(64, 64, 4, 3, "tma")
    assert pick_forward_config(128, bf, False, 16384, "auto") == FwdConfig(128, 64, 8, 3, "tma")
    assert pick_forward_config(256, bf, False, 4096, "auto") == FwdConfig(128, 64, 8, 2, "tma")
    for D in (64, 128, 256):
        ws = pick_forward_config(D, bf, True, 1024, "tma+ws")
        assert ws.num_warps == 8 and ws.BLOCK_M == 128 and not cfgmod.config_problems(ws)
        for path in ("auto", "portable", "tma"):
            cfg = pick_forward_config(D, bf, True, 1024, path)
            assert cfgmod.fits(cfg, D, bf) and not cfgmod.config_problems(cfg)


# shared memory of cross-compiled sm_90 portable kernels (triton 3.6): (D, rope, dtype, BM, BN, stages, bytes)
_SMEM_SAMPLES = [
    (128, None, torch.bfloat16, 128, 64, 3, 131072), (128, "interleaved", torch.bfloat16, 128, 64, 3, 262144),
    (128, "half", torch.bfloat16, 128, 64, 3, 294912), (128, "interleaved", torch.bfloat16, 128, 64, 2, 163840),
    (128, "interleaved", torch.bfloat16, 128, 32, 3, 147456), (128, "interleaved", torch.bfloat16, 128, 64, 1, 65536),
    (64, "half", torch.bfloat16, 128, 64, 3, 147456), (64, "half", torch.bfloat16, 128, 128, 3, 278528),
    (64, "half", torch.bfloat16, 128, 128, 2, 163840), (256, "half", torch.bfloat16, 64, 64, 2, 327680),
    (256, "half", torch.bfloat16, 64, 32, 2, 180224), (256, None, torch.bfloat16, 64, 64, 2, 163840),
    (256, None, torch.bfloat16, 64, 64, 3, 229376), (128, "half", torch.float32, 128, 32, 2, 164352),
    (128, "half", torch.float32, 128, 32, 1, 98816),
]


def test_shared_memory_model_covers_compiled_kernels():
    for D, rope, dt, bm, bn, st, measured in _SMEM_SAMPLES:
        est = cfgmod.shared_memory_bytes(FwdConfig(bm, bn, 4, st), D, dt, rope=rope is not None)
        assert measured <= est <= 1.25 * measured + 2048, (D, rope, dt, bm, bn, st, measured, est)
    # the failing GPU test's config (varlen + interleaved RoPE, D=128): rejected, and shrunk to fit
    bad = FwdConfig(128, 64, 8, 3)
    assert cfgmod.fits(bad, 128, torch.bfloat16) and not cfgmod.fits(bad, 128, torch.bfloat16, rope=True)
    fixed = cfgmod.shrink_to_fit(bad, 128, torch.bfloat16, rope=True)
    assert cfgmod.fits(fixed, 128, torch.bfloat16, rope=True) and fixed.num_stages == 2 and fixed.BLOCK_N == 64


# the forward's split scores (RoPE + softcap, bf16, 2 stages), cross-compiled for sm_90 (session 9):
# (D, rope in the kernel, BM, BN, bytes with the split, bytes without)
_SPLIT_SMEM_SAMPLES = [
    (128, True, 64, 64, 196608, 163840), (128, False, 64, 64, 131072, 81920),
    (128, True, 128, 64, 229376, 180224), (128, False, 128, 64, 163840, 98304),
    (256, True, 64, 32, 229376, 180224), (256, False, 64, 32, 163840, 98304),
    (256, True, 64, 64, 393216, 327680), (256, False, 64, 64, 262144, 163840),
]


def test_shared_memory_model_covers_split_scores():
    bf = torch.bfloat16
    for D, rope, bm, bn, with_split, without in _SPLIT_SMEM_SAMPLES:
        cfg = FwdConfig(bm, bn, 4, 2)
        for split, measured in ((True, with_split), (False, without)):
            est = cfgmod.shared_memory_bytes(cfg, D, bf, rope=rope, split=split)
            assert measured <= est <= measured + 2048, (D, rope, bm, bn, split, measured, est)
    # a split config the shrink must cut: 128x64 at D128 with 3 stages and RoPE in the kernel
    cfg = FwdConfig(128, 64, 8, 3)
    fixed = cfgmod.shrink_to_fit(cfg, 128, bf, rope=True, split=True)
    assert cfgmod.fits(fixed, 128, bf, rope=True, split=True) and fixed != cfg


def test_rope_configs_fit(gpu_picks):
    for D in (32, 64, 96, 128, 256):
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            for N in (64, 1024, 16384):
                cfg = pick_forward_config(D, dt, True, N, "portable", True)
                assert cfg.path == "portable" and cfgmod.fits(cfg, D, dt, rope=True), (D, dt, N, cfg)


def test_warp_specialization_needs_8_warps(tmp_path, monkeypatch):
    import json

    from attention_proto.ops.dense.forward_tma import supports

    w4 = FwdConfig(64, 64, 4, 3, "tma+ws")
    assert "num_warps=8" in " ".join(cfgmod.config_problems(w4))
    assert not cfgmod.config_problems(FwdConfig(128, 64, 8, 3, "tma+ws"))
    assert not cfgmod.config_problems(FwdConfig(64, 64, 4, 3, "tma"))
    cands = forward_candidates(128, torch.bfloat16, paths=["tma+ws"])
    assert cands and all(c.num_warps == 8 for c in cands)
    assert w4 in forward_candidates(128, torch.bfloat16, paths=["tma+ws"], include_known_failures=True)
    q, k, v = qkv(1, 2, 2, 8, 8, 64, torch.float16)
    assert "num_warps=8" in " ".join(supports(q, k, v, check_device=False, config=w4))
    with pytest.raises(ValueError, match="needs num_warps=8"):
        flash_attention_forward(q, k, v, config=w4)
    # a table entry the GPU cannot compile is never picked
    table = {"version": 1, "entries": [
        {"D": 64, "dtype": "bfloat16", "causal": True, "N": 1024, "path": "tma+ws", "BLOCK_M": 64, "BLOCK_N": 64,
         "num_warps": 4, "num_stages": 3, "tflops": 900.0},
        {"D": 64, "dtype": "bfloat16", "causal": True, "N": 1024, "path": "tma", "BLOCK_M": 64, "BLOCK_N": 64,
         "num_warps": 4, "num_stages": 3, "tflops": 400.0},
    ]}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(table))
    monkeypatch.setattr(cfgmod, "TABLE_PATH", p)
    cfgmod.reload_table()
    try:
        assert cfgmod._from_table(64, torch.bfloat16, True, 1024, cfgmod.PATHS) == FwdConfig(64, 64, 4, 3, "tma")
    finally:
        monkeypatch.undo()
        cfgmod.reload_table()


# GPU

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(1, 8, 128, 64), (2, 8, None, 128)], ids=["small-portable", "tma"])
def test_gpu_repeated_calls_launch_directly(shape):
    """Second and later calls of a signature launch the compiled kernel directly: results, hooks, graphs."""
    from triton import knobs

    from attention_proto.ops.dense import forward as fwd
    from attention_proto.ops.dense.configs import SMALL_PROBLEM_SCORES, pick_forward_config

    B, H, N, D = shape
    dtype = torch.bfloat16
    if N is None:
        # the first length whose tuned causal config is a TMA one (the table may rank the portable
        # kernel first at some lengths: it did at N 1024, D 128 on the H100)
        N = next((n for n in (1024, 2048, 4096) if pick_forward_config(D, dtype, True, n, "auto").path != "portable"),
                 None)
        if N is None:
            pytest.skip("the tuned table picks the portable kernel for causal D128 at N 1024-4096")
    tma_expected = (B * H * N * N > SMALL_PROBLEM_SCORES
                    and pick_forward_config(D, dtype, True, N, "auto").path != "portable")

    def ref_check(q, k, v, out):
        ro, _ = attention_reference(q, k, v, causal=True, device="cuda")
        to, _ = attention_reference(q, k, v, causal=True, compute_dtype=dtype, device="cuda")
        assert_close_rule(out, to, ro, dtype)

    fwd.clear_launch_plans()
    for _ in range(3):
        q, k, v = qkv(B, H, H // 2, N, N, D, dtype)
        ref_check(q, k, v, attention(q, k, v, causal=True))
    plans = list(fwd._PLANS.values())
    assert len(plans) == 1 and plans[0].direct is not None
    assert (plans[0].specs is not None) == tma_expected
    seen = []
    hook = lambda md: seen.append(md.get()["name"])  # noqa: E731 - triton passes a LazyDict
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        attention(q, k, v, causal=True)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 1 and "fwd" in seen[0]
    # a CUDA graph captures the direct launch; replays see new data
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        attention(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = attention(q, k, v, causal=True)
    for _ in range(2):
        for x, y in zip((q, k, v), qkv(B, H, H // 2, N, N, D, dtype)):
            x.copy_(y)
        g.replay()
        torch.cuda.synchronize()
        ref_check(q, k, v, out)
