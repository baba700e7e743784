"""Shape fuzzing of linear attention (chunked, recurrent, gradients, decode step) vs float64.

Cases draw B, N (0 and partial chunks included), H, K and V (independent, powers of two or
not), the dtype, the layout (BSHD / BHSD, contiguous or NaN-padded strided views), the gate,
an initial state, the final state, the chunk size, the mode and packed sequences
(``cu_seqlens`` with empty and length-1 sequences). Outputs are held to the error rule against
the float64 parallel form (``ops/linear/reference.py``); gradients (q, k, v, g, h0, through the
final state too) with factor 3. Outputs come from NaN-filled ``torch.empty``.

GPU cases (``gpu`` mark) take their kernel-shaping part from a fixed pool per operation
(``fuzz_pools.py``: K, V, H, dtype, layout, packed or not, gate, initial/final state, chunk size,
mode; compiles dominate otherwise) and draw the rest freely (B, N, packed lengths, padded views,
scale, seeds).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attention_proto  # noqa: F401
from attention_proto.ops.linear.interface import linear_attention, linear_attention_step
from attention_proto.ops.linear.reference import linear_attention_parallel, step_reference
from attention_proto.testing import assert_close_rule
from fuzz_pools import POOLS
from test_fuzz_common import CPU_DTYPES, DEV, fuzz_settings, gen, gpu, nan_empty, nan_padded, randn, run_case

__all__ = ["nan_empty"]

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


@st.composite
def linear_cases(draw):
    """A CPU case: tiny shapes, every dimension drawn freely."""
    dims = [8, 16, 24]
    packed = draw(st.booleans())
    if packed:
        lens = draw(st.lists(st.integers(0, 40), min_size=1, max_size=3))
        B, N = 1, sum(lens)
    else:
        lens = None
        B = draw(st.integers(1, 2))
        N = draw(st.integers(0, 45))
    return dict(
        B=B, N=N, lens=lens, H=draw(st.integers(1, 2)),
        K=draw(st.sampled_from(dims)), V=draw(st.sampled_from(dims)),
        dtype=draw(st.sampled_from(CPU_DTYPES)),
        layout=draw(st.sampled_from(["bshd", "bhsd"])), padded=draw(st.booleans()),
        gated=draw(st.booleans()), h0=draw(st.booleans()), final=draw(st.booleans()),
        chunk=draw(st.sampled_from([32, 64])),
        mode=draw(st.sampled_from(["chunk", "recurrent"])),
        scale=draw(st.one_of(st.none(), st.sampled_from([0.1, 1.0]))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def linear_gpu_cases(draw, op: str):
    """A GPU case of ``op``: a pool variant plus free lengths and values. Dimensions the op's pool
    leaves out (the chunk size of the recurrent forward, the final state of the backward) are
    drawn freely: they do not select a kernel there. Padded inputs are copied to contiguous ones."""
    variant = POOLS[op].draw(draw)
    if variant["packed"]:
        lens = draw(st.lists(st.integers(0, 300), min_size=1, max_size=5))
        B, N = 1, sum(lens)
    else:
        lens = None
        B = draw(st.integers(1, 3))
        N = draw(st.one_of(st.integers(0, 70), st.integers(71, 2000)))
    return dict(
        B=B, N=N, lens=lens, H=variant["H"], K=variant["K"], V=variant["V"], dtype=variant["dtype"],
        layout=variant["layout"], padded=draw(st.booleans()), gated=variant["gated"], h0=variant["h0"],
        final=variant["final"] if "final" in variant else draw(st.booleans()),
        chunk=variant["chunk"] if "chunk" in variant else draw(st.sampled_from([32, 64, 128])),
        mode=variant["mode"], scale=draw(st.one_of(st.none(), st.sampled_from([0.1, 1.0]))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _inputs(case):
    """(q, k, v, g, h0, cu) in BSHD, float values drawn on the CPU."""
    g_ = gen(case["seed"])
    B, N, H, K, V, dt = (case[x] for x in ("B", "N", "H", "K", "V", "dtype"))
    q, k = randn((B, N, H, K), g_, dt), randn((B, N, H, K), g_, dt)
    v = randn((B, N, H, V), g_, dt)
    g = (torch.nn.functional.logsigmoid(torch.randn(B, N, H, generator=g_) + 2.0).to(DEV)
         if case["gated"] else None)
    ns = len(case["lens"]) if case["lens"] is not None else B
    h0 = randn((ns, H, K, V), g_, torch.float32) if case["h0"] else None
    cu = None
    if case["lens"] is not None:
        cu = torch.tensor([0] + list(torch.tensor(case["lens"]).cumsum(0)), dtype=torch.int32).to(DEV)
    return q, k, v, g, h0, cu


def _to_layout(x, case, gate=False):
    """A BSHD tensor in the case's layout (a transposed view for BHSD), NaN-padded if asked."""
    if x is None:
        return None
    y = x.transpose(1, 2) if case["layout"] == "bhsd" else x
    if case["padded"]:
        front = (0, 1, 2) if gate else (0, 1, 2, 0)
        back = (1, 0, 1) if gate else (1, 0, 1, 3)
        y = nan_padded(y, front, back)
    return y


def _call(case, q, k, v, g, h0, cu):
    return linear_attention(_to_layout(q, case), _to_layout(k, case), _to_layout(v, case),
                            g=_to_layout(g, case, gate=True), scale=case["scale"], initial_state=h0,
                            output_final_state=case["final"], chunk_size=case["chunk"], cu_seqlens=cu,
                            mode=case["mode"], layout=case["layout"])


def _from_layout(o, case):
    return o.transpose(1, 2) if case["layout"] == "bhsd" else o


def check_linear_forward(case):
    dt = case["dtype"]
    q, k, v, g, h0, cu = _inputs(case)
    o, ht = _call(case, q, k, v, g, h0, cu)
    o = _from_layout(o, case)
    assert o.shape == v.shape and o.dtype == dt
    assert (ht is None) == (not case["final"])
    ref = linear_attention_parallel(q, k, v, g, case["scale"], h0, True, cu)
    low = linear_attention_parallel(q, k, v, g, case["scale"], h0, True, cu, compute_dtype=dt)
    assert not torch.isnan(o).any(), "NaN in the output"
    assert_close_rule(o, low[0], ref[0], dt, what="o")
    if ht is not None:
        assert ht.dtype == torch.float32 and ht.shape == ref[1].shape
        assert_close_rule(ht, low[1], ref[1], dt, what="final state")


def check_linear_backward(case):
    dt = case["dtype"]
    q, k, v, g, h0, cu = _inputs(case)
    g_ = gen(case["seed"] + 1)
    do = randn(tuple(v.shape), g_, dt)
    ns = h0.shape[0] if h0 is not None else (len(case["lens"]) if case["lens"] is not None else case["B"])
    dht = randn((ns, case["H"], case["K"], case["V"]), g_, torch.float32)
    case = dict(case, final=True)
    names = ("dq", "dk", "dv", "dg", "dh0")

    def grads(fn, ins):
        leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in ins]
        o, ht = fn(*leaves)
        loss = (o.to(torch.float64) * do.to(o.device, torch.float64)).sum()
        loss = loss + (ht.to(torch.float64) * dht.to(ht.device, torch.float64)).sum()
        if not loss.requires_grad:  # N = 0 and no h0: nothing to differentiate
            return [None if x is None else torch.zeros_like(x) for x in leaves]
        loss.backward()
        return [None if x is None else (x.grad if x.grad is not None else torch.zeros_like(x)) for x in leaves]

    ours = grads(lambda q_, k_, v_, g2, h: _from_layout_pair(_call(case, q_, k_, v_, g2, h, cu), case),
                 (q, k, v, g, h0))
    ref = grads(lambda *a: linear_attention_parallel(*a[:4], case["scale"], a[4], True, cu),
                [None if x is None else x.double() for x in (q, k, v, g, h0)])
    low = grads(lambda *a: linear_attention_parallel(*a[:4], case["scale"], a[4], True, cu, compute_dtype=dt),
                (q, k, v, g, h0))
    for name, a, r, lo, src in zip(names, ours, ref, low, (q, k, v, g, h0)):
        if src is None:
            continue
        assert a.shape == src.shape and a.dtype == src.dtype, (name, a.shape, a.dtype)
        assert torch.isfinite(a).all(), f"{name} has non-finite entries"
        assert_close_rule(a, lo, r, dt, factor=3, what=name)


def _from_layout_pair(res, case):
    o, ht = res
    return _from_layout(o, case), ht


@st.composite
def step_cases(draw):
    """A CPU decode-step case: tiny shapes, every dimension drawn freely."""
    dims = [8, 16, 24]
    return dict(B=draw(st.integers(1, 3)), H=draw(st.integers(1, 4)),
                K=draw(st.sampled_from(dims)), V=draw(st.sampled_from(dims)),
                dtype=draw(st.sampled_from(CPU_DTYPES)),
                four_d=draw(st.booleans()), gated=draw(st.booleans()), inplace=draw(st.booleans()),
                scale=draw(st.one_of(st.none(), st.just(0.5))), seed=draw(st.integers(0, 2**31 - 1)))


@st.composite
def step_gpu_cases(draw):
    """A GPU decode-step case: K, V, H, dtype and gate from the pool; the rest free (the 4-D form and
    ``inplace`` reshape or alias the same tensors: the same kernel)."""
    variant = POOLS["linear_step"].draw(draw)
    return dict(B=draw(st.integers(1, 8)), H=variant["H"], K=variant["K"], V=variant["V"], dtype=variant["dtype"],
                four_d=draw(st.booleans()), gated=variant["gated"], inplace=draw(st.booleans()),
                scale=draw(st.one_of(st.none(), st.just(0.5))), seed=draw(st.integers(0, 2**31 - 1)))


def check_linear_step(case):
    g_ = gen(case["seed"])
    B, H, K, V, dt = (case[x] for x in ("B", "H", "K", "V", "dtype"))
    q, k = randn((B, H, K), g_, dt), randn((B, H, K), g_, dt)
    v = randn((B, H, V), g_, dt)
    g = torch.nn.functional.logsigmoid(torch.randn(B, H, generator=g_) + 2.0).to(DEV) if case["gated"] else None
    s0 = randn((B, H, K, V), g_, torch.float32)
    state = s0.clone()
    args = (q, k, v) if not case["four_d"] else (q[:, None], k[:, None], v[:, None])
    gg = g if (g is None or not case["four_d"]) else g[:, None]
    o, s1 = linear_attention_step(*args, state, g=gg, scale=case["scale"], inplace=case["inplace"])
    assert o.shape == args[2].shape and o.dtype == dt and s1.dtype == torch.float32
    if case["inplace"]:
        assert s1.data_ptr() == state.data_ptr()
    else:
        assert torch.equal(state, s0), "the input state changed without inplace=True"
    ro, rs = step_reference(q, k, v, s0, g, case["scale"])
    lo, ls = step_reference(q, k, v, s0, g, case["scale"], compute_dtype=dt)
    assert_close_rule(o.reshape(ro.shape), lo, ro, dt, what="o")
    assert_close_rule(s1, ls, rs, dt, what="state")


# ------------------------------------------------------------------------------------------------
# CPU (interpreter)
# ------------------------------------------------------------------------------------------------

@fuzz_settings(24)
@given(case=linear_cases())
def test_fuzz_linear_forward(nan_empty, case):
    run_case(f"linear_{case['mode']}_fwd", case, lambda: check_linear_forward(case))


@fuzz_settings(8)
@given(case=linear_cases())
def test_fuzz_linear_backward(nan_empty, case):
    run_case("linear_bwd", case, lambda: check_linear_backward(case))


@fuzz_settings(12)
@given(case=step_cases())
def test_fuzz_linear_step(nan_empty, case):
    run_case("linear_step", case, lambda: check_linear_step(case))


# ------------------------------------------------------------------------------------------------
# GPU: larger shapes, bf16, kernel-shaping parts from fuzz_pools.POOLS; >= 1000 examples in scripts/fuzz_gpu.py
# ------------------------------------------------------------------------------------------------

@gpu
@fuzz_settings(big=True)
@given(case=linear_gpu_cases("linear_chunk_fwd"))
def test_fuzz_linear_chunk_forward_gpu(nan_empty, case):
    run_case("linear_chunk_fwd", case, lambda: check_linear_forward(case))


@gpu
@fuzz_settings(big=True)
@given(case=linear_gpu_cases("linear_recurrent_fwd"))
def test_fuzz_linear_recurrent_forward_gpu(nan_empty, case):
    run_case("linear_recurrent_fwd", case, lambda: check_linear_forward(case))


@gpu
@fuzz_settings(big=True)
@given(case=linear_gpu_cases("linear_bwd"))
def test_fuzz_linear_backward_gpu(nan_empty, case):
    run_case("linear_bwd", case, lambda: check_linear_backward(case))


@gpu
@fuzz_settings(big=True)
@given(case=step_gpu_cases())
def test_fuzz_linear_step_gpu(nan_empty, case):
    run_case("linear_step", case, lambda: check_linear_step(case))
