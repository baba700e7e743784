"""The forms of the chunked linear forward (issue #6) on the CPU: the gate's chunk-local cumulative sum,
every form of :data:`attention_proto.ops.linear.chunk.FORWARD_OPTIONS` against float64, and the
config rules (chunk_h_long, chunk_o's tile) a GPU run takes.
"""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import attention_proto  # noqa: F401  - interpreter switch before the kernels import
from attention_proto.ops.linear import chunk, common, linear_attention
from attention_proto.ops.linear.common import SeqInfo
from attention_proto.ops.linear.reference import linear_attention_parallel, random_inputs
from attention_proto.runtime.device import kernel_device
from attention_proto.testing import assert_close_rule

DEV = kernel_device()


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


@pytest.fixture
def forms():
    """Set FORWARD_OPTIONS for one test, restored afterwards."""
    saved = dict(chunk.FORWARD_OPTIONS)
    yield chunk.FORWARD_OPTIONS
    chunk.FORWARD_OPTIONS.clear()
    chunk.FORWARD_OPTIONS.update(saved)


@pytest.fixture
def tiles(monkeypatch):
    """Set ATTENTION_PROTO_LINEAR_CONFIG (a dict) for one test."""
    def set_(cfg):
        monkeypatch.setenv("ATTENTION_PROTO_LINEAR_CONFIG", json.dumps(cfg))
        common._overrides.cache_clear()
        common._CHOSEN.clear()
    yield set_
    monkeypatch.delenv("ATTENTION_PROTO_LINEAR_CONFIG", raising=False)
    common._overrides.cache_clear()
    common._CHOSEN.clear()


def _chunked_cumsum_ref(g, BT, head_first=False, cu=None):
    """Chunk-local inclusive cumsum (log2 units) per sequence, float64, g's layout."""
    x = g.double().transpose(1, 2) if head_first else g.double()      # [B, N, H]
    out = torch.zeros_like(x)
    B, N = x.shape[:2]
    bounds = [(b, 0, N) for b in range(B)] if cu is None else [(0, int(cu[i]), int(cu[i + 1]))
                                                                 for i in range(len(cu) - 1)]
    for b, s, e in bounds:
        for c in range(s, e, BT):
            out[b, c:min(c + BT, e)] = x[b, c:min(c + BT, e)].cumsum(0)
    out = out / math.log(2.0)
    return out.transpose(1, 2) if head_first else out


@pytest.mark.parametrize("layout,cu,H,BT", [("bshd", None, 3, 32), ("bhsd", None, 5, 64),
                                             ("bshd", [0, 1, 34, 34, 50], 2, 32), ("bhsd", [0, 17, 50], 2, 16)])
def test_chunk_cumsum(layout, cu, H, BT):
    B, N = (2, 45) if cu is None else (1, cu[-1])
    g = torch.nn.functional.logsigmoid(torch.randn(B, N, H, generator=gen(1), device=DEV) + 2.0)
    hf = layout == "bhsd"
    if hf:
        g = g.transpose(1, 2).contiguous()
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    info = SeqInfo(B=B, T=N, H=H, K=16, V=16, head_first=hf, cu_seqlens=cu_t,
                   lengths=[] if cu is None else [cu[i + 1] - cu[i] for i in range(len(cu) - 1)])
    gc = chunk.chunk_cumsum(g, info, BT)
    assert gc.dtype == torch.float32 and gc.shape == g.shape
    ref = _chunked_cumsum_ref(g, BT, hf, cu)
    assert (gc.double() - ref).abs().max() < 1e-4


FORMS = list(itertools.product(chunk.GATE_FORMS, chunk.DECAY_OPERANDS, (False, True)))


@pytest.mark.parametrize("gate,decay_on,early", FORMS)
def test_forward_forms_multi_tile(gate, decay_on, early, forms, tiles):
    """Every form, gated, in 16-wide tiles (K = 24, V = 40: several K and V tiles, a 2-step K loop in
    chunk_o), initial and final state, a partial last chunk; float32 against float64."""
    forms.update(gate=gate, decay_on=decay_on, early_loads=early)
    tiles({"chunk_h": {"BK": 16, "BV": 16}, "chunk_o": {"BK": 16, "BV": 16}})
    q, k, v, g, s0 = random_inputs(2, 45, 2, 24, 40, torch.float32, gated=True, h0=True, device=DEV,
                                   generator=gen(2))
    o, ht = linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True, chunk_size=32)
    ref = linear_attention_parallel(q.double(), k.double(), v.double(), g.double(), None, s0.double(), True)
    low = linear_attention_parallel(q, k, v, g, None, s0, True, compute_dtype=torch.float32)
    assert_close_rule(o, low[0], ref[0], torch.float32, what="o")
    assert_close_rule(ht, low[1], ref[1], torch.float32, what="final state")


@pytest.mark.parametrize("gate,early", [("inline", True), ("cumsum", True), ("inline", False)])
def test_forward_forms_fp16_varlen(gate, early, forms):
    """The non-default forms on packed sequences (an empty one, a 1-token one), float16."""
    forms.update(gate=gate, early_loads=early)
    cu_l = [0, 1, 34, 34, 50]
    cu = torch.tensor(cu_l, dtype=torch.int32, device=DEV)
    q, k, v, g, s0 = random_inputs(1, cu_l[-1], 2, 16, 24, torch.float16, gated=True, h0=True, num_seqs=4,
                                   device=DEV, generator=gen(3))
    o, ht = linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk_size=32)
    ref = linear_attention_parallel(q.double(), k.double(), v.double(), g.double(), None, s0.double(), True, cu)
    low = linear_attention_parallel(q, k, v, g, None, s0, True, cu, compute_dtype=torch.float16)
    assert_close_rule(o, low[0], ref[0], torch.float16, what="o")
    assert_close_rule(ht, low[1], ref[1], torch.float16, what="final state")


def test_forms_agree_and_bad_form():
    """The cumsum and inline gates compute the same thing (float32, to rounding); unknown forms are refused."""
    q, k, v, g, _ = random_inputs(1, 70, 2, 16, 16, torch.float32, gated=True, device=DEV, generator=gen(4))
    info = SeqInfo(B=1, T=70, H=2, K=16, V=16, head_first=False)
    a = chunk.chunk_forward(q, k, v, g, 0.25, None, True, info, 64, gate="cumsum")
    b = chunk.chunk_forward(q, k, v, g, 0.25, None, True, info, 64, gate="inline", decay_on="k", early_loads=True)
    for x, y in zip(a, b):
        assert (x - y).abs().max() <= 1e-5 * max(1.0, y.abs().max().item())
    with pytest.raises(ValueError, match="gate must be one of"):
        chunk.chunk_forward(q, k, v, g, 0.25, None, False, info, 64, gate="scan")
    with pytest.raises(ValueError, match="decay_on must be one of"):
        chunk.chunk_fwd_h(k, v, g, None, False, info, 64, decay_on="q")


def test_gpu_config_rules(monkeypatch, tiles):
    """What a GPU run picks (the interpreter's configs replaced): chunk_h_long, chunk_o's tile, overrides."""
    monkeypatch.setattr(common, "interpreter_mode", lambda: False)
    # off: the session-1 tiles (kept as the measured "old" variant of scripts/bench_linear.py)
    monkeypatch.setattr(common, "NEW_FORWARD_TILES", False)
    assert common.kernel_config("chunk_h_long", 64, 128, 128)["num_stages"] == 2
    o = common.kernel_config("chunk_o", 64, 128, 128)
    assert (o["BK"], o["num_warps"], o["num_stages"]) == (128, 8, 2)
    monkeypatch.setattr(common, "NEW_FORWARD_TILES", True)  # the default since the session-3 H100 bench
    assert common.kernel_config("chunk_h", 64, 128, 128)["num_stages"] == 2
    assert common.kernel_config("chunk_h_long", 64, 128, 128)["num_stages"] == 4
    assert common.kernel_config("chunk_h_long", 128, 128, 128)["num_stages"] == 3
    o = common.kernel_config("chunk_o", 64, 128, 128)
    assert (o["BK"], o["BV"], o["num_warps"], o["num_stages"]) == (64, 64, 4, 3)
    # narrow heads keep the 8-warp tile (the 4-warp one reads shared memory out of bounds there, session 4)
    for K, V in ((64, 16), (64, 32), (32, 64), (16, 16)):
        assert common.kernel_config("chunk_o", 64, K, V)["num_warps"] == 8, (K, V)
    assert common.kernel_config("chunk_o", 64, 64, 64)["num_warps"] == 4
    assert common.kernel_config("chunk_o", 128, 128, 128)["BK"] == 128      # other chunks keep their tile
    assert common.kernel_config("chunk_dv", 64, 128, 128)["BV"] == 128      # the backward's is unchanged
    # chunk_h_long: which launches take it (programs of 64 x 64 state tiles against 2 per SM)
    monkeypatch.setattr(chunk, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert chunk._h_config_name(2 * 16, 64, 128, 128, cuda) == "chunk_h_long"      # B2 H16: 128 programs
    assert chunk._h_config_name(8 * 16, 64, 128, 128, cuda) == "chunk_h"           # B8 H16: 512
    assert chunk._h_config_name(2 * 16, 64, 128, 128, torch.device("cpu")) == "chunk_h"
    # chunk_h's overrides reach chunk_h_long, its own come last
    tiles({"chunk_h": {"num_stages": 2, "BV": 32}})
    c = common.kernel_config("chunk_h_long", 64, 128, 128)
    assert (c["num_stages"], c["BV"]) == (2, 32)
    tiles({"chunk_h": {"num_stages": 2}, "chunk_h_long@64": {"num_stages": 3}})
    assert common.kernel_config("chunk_h_long", 64, 128, 128)["num_stages"] == 3
    assert common.kernel_config("chunk_h", 64, 128, 128)["num_stages"] == 2
