"""Shape fuzzing of dense attention (forward, backward, varlen) against the float64 reference.

Every case draws B, H, Hkv (a divisor of H), Nq, Nk, D (powers of two or not), the dtype, the
layout (BHSD, BSHD, NaN-padded views with odd strides, a non-unit D stride) and the modifiers
(causal, window, softcap, ALiBi, RoPE, scale, score_mod/mask_mod hooks), runs the public
:func:`attention` (or the low-level forward into a canary-guarded output) and holds the result to
the error rule (``attention_proto.testing``; factor 2 forward, 3 gradients).

Out-of-bounds checks built in: outputs come from NaN-filled ``torch.empty`` (``nan_empty``), the
padded layouts put NaN around every input (a read outside the tensor shows up as NaN), and the
low-level entry writes into a view of a NaN buffer whose outside must stay NaN.

CPU: tiny shapes, fp16/fp32, ``ATTENTION_PROTO_FUZZ_EXAMPLES`` (default small) examples per test.
GPU (``gpu`` mark): larger shapes, bf16 too; ``scripts/fuzz_gpu.py`` runs them at >= 1000 each. A
GPU case takes its kernel-shaping part (D, dtype, modifier kinds, layout, entry, GQA or not,
deterministic) from a fixed pool per operation (``fuzz_pools.py``: compiles dominate otherwise)
and draws the rest (B, heads, lengths, window sizes, softcap values, scales, RoPE offsets, seed).
"""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given
from hypothesis import strategies as st

import attention_proto
from attention_proto.ops.dense import backward as dense_backward
from attention_proto.ops.dense.forward import flash_attention_forward
from attention_proto.ops.dense.interface import attention, attention_varlen
from attention_proto.ops.dense.reference import (alibi_slopes, attention_reference, attention_reference_varlen,
                                                 dense_mask)
from attention_proto.ops.dense.rope import RopeSpec, apply_rope_reference
from attention_proto.testing import assert_close_rule
from fuzz_pools import DENSE_HEADS, DENSE_LAYOUTS, POOLS, VARLEN_HEADS
from test_fuzz_common import (CPU_DTYPES, DEV, assert_canary, canary_view, fuzz_settings, gen, gpu, layout_view,
                              nan_empty, nan_padded, randn, run_case)

__all__ = ["nan_empty"]  # the fixture, imported for the tests of this module

#: "bcast": every batch row is row 0 through an expand (stride 0 on B: overlapping reads)
LAYOUTS = DENSE_LAYOUTS


# ------------------------------------------------------------------------------------------------
# hooks and their float64 twin
# ------------------------------------------------------------------------------------------------

@triton.jit
def _head_scaled_rel_bias(score, b, h, q_idx, kv_idx):
    return score * (1.0 + 0.25 * h) + 0.03 * (q_idx - kv_idx).to(tl.float32)


@triton.jit
def _sparse_mask(b, h, q_idx, kv_idx):
    return ((q_idx + kv_idx + b) % 3) != 1


def hooked_reference(q, k, v, *, score_hook, mask_hook, causal, scale, window, softcap, alibi_slopes, rope,
                     compute_dtype=torch.float64, device="cpu"):
    """The dense reference with the two hooks above (same order: softcap, ALiBi, score_mod, masks)."""
    if not score_hook and not mask_hook:
        return attention_reference(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                                   alibi_slopes=alibi_slopes, rope=rope, compute_dtype=compute_dtype, device=device)
    cd = compute_dtype
    q, k, v = (t.to(device=device, dtype=cd) for t in (q, k, v))
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if rope is not None:
        q, k = apply_rope_reference(q, k, rope)
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * ((1.0 / math.sqrt(D)) if scale is None else scale)
    i = torch.arange(Nq, device=device, dtype=cd)[:, None]
    j = torch.arange(Nk, device=device, dtype=cd)[None, :]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(device=device, dtype=cd).reshape(1, H, 1, 1) * (i + (Nk - Nq) - j).abs()
    if score_hook:
        hs = 1.0 + 0.25 * torch.arange(H, device=device, dtype=cd).reshape(1, H, 1, 1)
        s = s * hs + 0.03 * (i - j)
    allowed = dense_mask(Nq, Nk, causal=causal, window=window, device=device)[None, None]
    if mask_hook:
        bidx = torch.arange(B, device=device).reshape(B, 1, 1, 1)
        ii = torch.arange(Nq, device=device)[:, None]
        jj = torch.arange(Nk, device=device)[None, :]
        allowed = allowed & (((ii + jj + bidx) % 3) != 1)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    fin = torch.isfinite(lse)
    p = torch.exp(s - torch.where(fin, lse, torch.zeros_like(lse))[..., None])
    p = torch.where(fin[..., None], p, torch.zeros_like(p))
    return p @ v, lse


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------

def _lengths(big: bool):
    if big:
        return st.one_of(st.integers(1, 80), st.integers(81, 700))
    return st.integers(1, 23)


@st.composite
def modifiers(draw, nk: int, D: int, hooks: bool):
    """Modifier arguments of one case (scalars and flags only: tensors are built from them)."""
    m = dict(
        causal=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.tuples(st.integers(-1, nk + 2), st.integers(-1, nk + 2)),
                              st.integers(0, nk + 2))),
        softcap=draw(st.one_of(st.none(), st.sampled_from([0.5, 5.0, 30.0]))),
        alibi=draw(st.sampled_from([None, "standard", "custom"])),
        rope=None,
        # scale <= 0 takes the kernels' natural-units path (a positive scale is folded into exp2)
        scale=draw(st.one_of(st.none(), st.sampled_from([0.05, 0.3, 1.0, 0.0, -0.4]))),
        score_hook=False,
        mask_hook=False,
    )
    if D % 2 == 0 and draw(st.booleans()):
        m["rope"] = (draw(st.sampled_from(["half", "interleaved"])),
                     draw(st.one_of(st.none(), st.integers(0, 6))), draw(st.integers(0, 4)))
        # how the forward applies it off the TMA kernel (forward.PORTABLE_ROPE; "auto" is "tile" at these
        # sizes) and whether its scores are split (forward.SPLIT_ROPE_SOFTCAP_SCORES, opt-in): see in_modes
        m["rope_mode"] = draw(st.sampled_from(["auto", "tile", "rotate"]))
        m["split_fwd"] = draw(st.booleans())
    if hooks:
        m["score_hook"] = draw(st.booleans())
        m["mask_hook"] = draw(st.booleans())
    return m


@st.composite
def dense_cases(draw, hooks: bool = True):
    """A CPU case: tiny shapes, every dimension drawn freely."""
    Hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    nq, nk = draw(_lengths(False)), draw(_lengths(False))
    D = draw(st.sampled_from([8, 16, 24, 40]))
    case = dict(
        B=draw(st.integers(1, 2)), H=Hkv * group, Hkv=Hkv, Nq=nq, Nk=nk, D=D,
        dtype=draw(st.sampled_from(CPU_DTYPES)),
        layout=draw(st.sampled_from(LAYOUTS)),
        # public: ops.dense.interface; api: the dispatching attention_proto.attention (custom ops);
        # lowlevel: flash_attention_forward into canary-guarded outputs
        entry=draw(st.sampled_from(["public", "api", "lowlevel"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    case.update(draw(modifiers(nk, D, hooks)))
    # default RoPE query positions (Nk - Nq + i) go negative when Nq > Nk: fuzzed as they come
    return case


def _of_length_class(length_class: str, hi: int, other):
    """A length up to ``hi`` of the given specialization class (``fuzz_pools.LENGTH_CLASSES``): 1, a
    multiple of 16, or one drawn from ``other`` that is neither."""
    if length_class == "1":
        return st.just(1)
    if length_class == "x16":
        return st.integers(1, hi // 16).map(lambda n: 16 * n)
    return other.filter(lambda n: n != 1 and n % 16 != 0)


def _gpu_length(length_class: str):
    """A GPU sequence length (1-700) of the given specialization class."""
    return _of_length_class(length_class, 700, _lengths(True))


def _mod_int(int_class: str, hi: int):
    """A window size or RoPE offset in 0..hi of the given class ("0", "1", "other": 2..hi, not a multiple of 16)."""
    if int_class in ("0", "1"):
        return st.just(int(int_class))
    return st.integers(2, max(hi, 2)).filter(lambda n: n % 16 != 0)


def _gpu_modifiers(draw, variant: dict, nk: int) -> dict:
    """Modifier values of a GPU case of the given kinds (``fuzz_pools.dense_kinds`` reads them back)."""
    size = _mod_int(variant["mod_ints"], nk + 2)
    side = st.one_of(st.just(-1), size)  # -1: unbounded; (-1, -1) is the "none" kernel, left to the CPU fuzz
    window = {"none": st.none(), "left": size,
              "pair": st.tuples(side, side).filter(lambda w: w != (-1, -1))}[variant["window"]]
    scale = {"default": st.none(), "positive": st.sampled_from([0.05, 0.3, 1.0]),
             "natural": st.sampled_from([0.0, -0.4])}[variant["scale"]]
    rope = None
    if variant["rope"] is not None:
        q_offset = draw(_mod_int(variant["mod_ints"], 6)) if variant["rope_q"] == "given" else None
        rope = (variant["rope"], q_offset, draw(_mod_int(variant["mod_ints"], 4)))
    return dict(causal=variant["causal"], window=draw(window),
                softcap=draw(st.sampled_from([0.5, 5.0, 30.0])) if variant["softcap"] else None,
                alibi=variant["alibi"], rope=rope, scale=draw(scale),
                score_hook=variant.get("score_hook", False), mask_hook=variant.get("mask_hook", False))


@st.composite
def dense_gpu_cases(draw, op: str):
    """A GPU case of ``op`` ("dense_fwd" or "dense_bwd"): a pool variant plus free shapes and values."""
    variant = POOLS[op].draw(draw)
    Hkv, group = draw(st.sampled_from(DENSE_HEADS[variant["heads"]]))
    nq, nk = draw(_gpu_length(variant["nq"])), draw(_gpu_length(variant["nk"]))
    case = dict(B=draw(st.integers(1, 3)), H=Hkv * group, Hkv=Hkv, Nq=nq, Nk=nk, D=variant["D"],
                dtype=variant["dtype"], layout=variant["layout"], entry=variant["entry"],
                seed=draw(st.integers(0, 2**31 - 1)))
    case.update(_gpu_modifiers(draw, variant, nk))
    if "deterministic" in variant:
        case["deterministic"] = variant["deterministic"]
    return case


def _rope(spec):
    if spec is None:
        return None
    layout, q_off, k_off = spec
    return RopeSpec(layout, q_offset=q_off, k_offset=k_off)


def _slopes(case):
    if case["alibi"] is None:
        return None, None
    if case["alibi"] == "standard":
        return True, alibi_slopes(case["H"])
    s = torch.linspace(0.05, 1.0, case["H"], dtype=torch.float32)
    return s.to(DEV), s


def _inputs(case, with_do: bool = False):
    g = gen(case["seed"])
    B, H, Hkv, Nq, Nk, D, dt = (case[k] for k in ("B", "H", "Hkv", "Nq", "Nk", "D", "dtype"))
    q = randn((B, H, Nq, D), g, dt)
    k = randn((B, Hkv, Nk, D), g, dt)
    v = randn((B, Hkv, Nk, D), g, dt)
    do = randn((B, H, Nq, D), g, dt) if with_do else None
    if case["layout"] == "bcast":
        q, k, v = (t[:1].expand_as(t) for t in (q, k, v))
    return q, k, v, do


def _views(case, q, k, v):
    """Kernel inputs in the case's layout and the ``layout=`` argument that reads them."""
    lay = case["layout"]
    if lay == "bcast":
        return [q, k, v], "bhsd"
    base, pad = lay.replace("_pad", ""), lay.endswith("_pad")
    views = [layout_view(t, base, pad) for t in (q, k, v)]
    return views, ("bshd" if base == "bshd" else "bhsd")


def _ref_mods(case):
    _, slopes_ref = _slopes(case)
    return dict(causal=case["causal"], scale=case["scale"], window=case["window"], softcap=case["softcap"],
                alibi_slopes=slopes_ref, rope=_rope(case["rope"]))


def _check_out_lse(out, lse, ro, rl, to, tl_, dtype, varlen=False):
    assert out.shape == ro.shape, (out.shape, ro.shape)
    assert not torch.isnan(out).any(), "NaN in the output (unwritten entries or an out-of-bounds read)"
    assert not torch.isnan(lse).any(), "NaN in the LSE"
    assert_close_rule(out, to, ro, dtype, what="out")
    dead = torch.isinf(rl.cpu())
    assert torch.equal(torch.isinf(lse.cpu()) & (lse.cpu() < 0), dead), "LSE -inf pattern differs from the reference"
    if dead.any():
        rows = dead.transpose(0, 1) if varlen else dead  # varlen: lse [H, T], out [T, H, D]
        assert (out.cpu()[rows] == 0).all(), "fully masked rows must give output 0"
    live = ~dead
    if live.any():
        assert_close_rule(lse.cpu()[live], tl_.cpu().float()[live], rl.cpu()[live], dtype, what="lse")


def check_dense_forward(case):
    dt = case["dtype"]
    q, k, v, _ = _inputs(case)
    slopes_arg, _ = _slopes(case)
    hooks = dict(score_mod=_head_scaled_rel_bias if case["score_hook"] else None,
                 mask_mod=_sparse_mask if case["mask_hook"] else None)
    mods = dict(causal=case["causal"], scale=case["scale"], window=case["window"], softcap=case["softcap"],
                alibi_slopes=slopes_arg, rope=_rope(case["rope"]), **hooks)
    if case["entry"] == "lowlevel":
        # BHSD views in, canary-guarded BHSD output views
        (qv, kv, vv), layout = _views(case, q, k, v)
        if layout == "bshd":
            qv, kv, vv = (t.transpose(1, 2) for t in (qv, kv, vv))
        out, obuf, oidx = canary_view(q.shape, dt, DEV)
        lse, lbuf, lidx = canary_view(q.shape[:3], torch.float32, DEV)
        mods["window"] = (-1, -1) if mods["window"] is None else mods["window"]
        if isinstance(mods["window"], int):
            mods["window"] = (mods["window"], -1)
        o, l = flash_attention_forward(qv, kv, vv, out=out, lse=lse, **mods)
        assert o.data_ptr() == out.data_ptr() and l.data_ptr() == lse.data_ptr()
        assert_canary(obuf, oidx)
        assert_canary(lbuf, lidx)
    else:
        (qv, kv, vv), layout = _views(case, q, k, v)
        fn = attention_proto.attention if case["entry"] == "api" else attention
        o, l = fn(qv, kv, vv, layout=layout, return_lse=True, **mods)
        if layout == "bshd":
            o = o.transpose(1, 2)
    rd = "cpu" if DEV == "cpu" else DEV
    rm = dict(_ref_mods(case), score_hook=case["score_hook"], mask_hook=case["mask_hook"])
    ro, rl = hooked_reference(q, k, v, device=rd, **rm)
    to, tl_ = hooked_reference(q, k, v, device=rd, compute_dtype=dt, **rm)
    _check_out_lse(o, l, ro, rl, to, tl_, dt)


def _ref_grads(q, k, v, do, cd, varlen=None, **mods):
    # the references run where the kernels ran (on a GPU: the float64 and low-precision references in
    # seconds less per case than on the CPU, and PyTorch's own low-precision error is the GPU's); the
    # inputs and the upstream gradient go there too (a cuda `do` against CPU outputs once made every
    # varlen backward case fail with "invalid gradient ... expected device cpu")
    dev = "cpu" if DEV == "cpu" else DEV
    ins = [t.detach().to(device=dev, dtype=cd).requires_grad_() for t in (q, k, v)]
    if varlen is None:
        out, _ = attention_reference(*ins, compute_dtype=cd, device=dev, **mods)
    else:
        out, _ = attention_reference_varlen(*ins, *[c.cpu() for c in varlen], compute_dtype=cd, device=dev,
                                            **mods)
    if not out.requires_grad:  # every sequence empty: the reference output is a constant
        return [torch.zeros_like(t) for t in ins]
    return torch.autograd.grad(out, ins, do.to(device=dev, dtype=cd), allow_unused=True)


def check_dense_backward(case):
    dt = case["dtype"]
    q, k, v, do = _inputs(case, with_do=True)
    slopes_arg, _ = _slopes(case)
    (qv, kv, vv), layout = _views(case, q, k, v)
    leaves = [t.detach().requires_grad_() for t in (qv, kv, vv)]
    fn = attention_proto.attention if case["entry"] == "api" else attention
    out = fn(*leaves, layout=layout, causal=case["causal"], scale=case["scale"], window=case["window"],
                    softcap=case["softcap"], alibi_slopes=slopes_arg, rope=_rope(case["rope"]),
                    deterministic=case["deterministic"])
    dov = do.transpose(1, 2) if layout == "bshd" else do
    out.backward(dov)
    grads = [t.grad.transpose(1, 2) if layout == "bshd" else t.grad for t in leaves]
    ref = _ref_grads(q, k, v, do, torch.float64, **_ref_mods(case))
    low = _ref_grads(q, k, v, do, dt, **_ref_mods(case))
    for name, a, lo, hi, src in zip(("dq", "dk", "dv"), grads, low, ref, (q, k, v)):
        assert a.shape == src.shape and a.dtype == src.dtype, (name, a.shape, a.dtype)
        assert torch.isfinite(a).all(), f"{name} has non-finite entries"
        assert_close_rule(a, lo, hi, dt, factor=3, what=name)


@st.composite
def varlen_cases(draw):
    """A CPU varlen case: tiny shapes, every dimension drawn freely."""
    Hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    nseq = draw(st.integers(1, 4))
    lq = draw(st.lists(st.integers(0, 13), min_size=nseq, max_size=nseq))
    lk = draw(st.lists(st.integers(0, 13), min_size=nseq, max_size=nseq))
    D = draw(st.sampled_from([8, 16, 24]))
    case = dict(lq=lq, lk=lk, H=Hkv * group, Hkv=Hkv, D=D, entry=draw(st.sampled_from(["public", "api"])),
                dtype=draw(st.sampled_from(CPU_DTYPES)),
                seed=draw(st.integers(0, 2**31 - 1)), slack=draw(st.integers(0, 3)),
                deterministic=draw(st.booleans()))
    case.update(draw(modifiers(max(lk), D, hooks=False)))
    return case


@st.composite
def varlen_gpu_cases(draw):
    """A GPU varlen case (forward and backward): a pool variant plus free lengths and values.

    The kernels take ``max_seqlen`` (the longest sequence plus ``slack``) as an int: the variant
    picks its class, one sequence is that long (less the slack) and the others are drawn below it."""
    variant = POOLS["dense_varlen"].draw(draw)
    Hkv, group = draw(st.sampled_from(VARLEN_HEADS[variant["heads"]]))
    nseq = draw(st.integers(1, 5))
    mq, mk = draw(_varlen_max(variant["nq"])), draw(_varlen_max(variant["nk"]))
    slack = draw(st.integers(0, min(3, mq, mk)))
    lq, lk = (draw(_varlen_lengths(nseq, m - slack)) for m in (mq, mk))
    case = dict(lq=lq, lk=lk, H=Hkv * group, Hkv=Hkv, D=variant["D"], entry=variant["entry"],
                dtype=variant["dtype"], seed=draw(st.integers(0, 2**31 - 1)), slack=slack,
                deterministic=variant["deterministic"])
    case.update(_gpu_modifiers(draw, variant, max(lk)))
    return case


def _varlen_max(length_class: str):
    """A max_seqlen (1-303) of the given specialization class."""
    return _of_length_class(length_class, 303, st.integers(2, 303))


@st.composite
def _varlen_lengths(draw, nseq: int, longest: int):
    """``nseq`` lengths in 0..longest, one of them ``longest``."""
    lengths = draw(st.lists(st.integers(0, longest), min_size=nseq, max_size=nseq))
    lengths[draw(st.integers(0, nseq - 1))] = longest
    return lengths


def _varlen_inputs(case, with_do=False):
    g = gen(case["seed"])
    dt, H, Hkv, D = case["dtype"], case["H"], case["Hkv"], case["D"]
    cq = torch.tensor([0] + list(torch.tensor(case["lq"]).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(case["lk"]).cumsum(0)), dtype=torch.int32)
    q = randn((int(cq[-1]), H, D), g, dt)
    k = randn((int(ck[-1]), Hkv, D), g, dt)
    v = randn((int(ck[-1]), Hkv, D), g, dt)
    do = randn((int(cq[-1]), H, D), g, dt) if with_do else None
    return q, k, v, do, cq.to(DEV), ck.to(DEV)


def check_varlen(case, backward: bool):
    dt = case["dtype"]
    q, k, v, do, cq, ck = _varlen_inputs(case, with_do=backward)
    slopes_arg, _ = _slopes(case)
    # NaN around every packed tensor: tokens before/after, another head, D padding
    qv, kv, vv = (nan_padded(t, (2, 1, 0), (3, 0, 3)) for t in (q, k, v))
    mq, mk = max(case["lq"]) + case["slack"], max(case["lk"]) + case["slack"]
    mods = dict(causal=case["causal"], scale=case["scale"], window=case["window"], softcap=case["softcap"],
                alibi_slopes=slopes_arg, rope=_rope(case["rope"]))
    rmods = _ref_mods(case)
    fn = attention_proto.attention_varlen if case["entry"] == "api" else attention_varlen
    if not backward:
        o, l = fn(qv, kv, vv, cq, ck, mq, mk, return_lse=True, **mods)
        rd = "cpu" if DEV == "cpu" else DEV  # as the dense forward's check: the reference where the kernel ran
        ro, rl = attention_reference_varlen(q, k, v, cq.cpu(), ck.cpu(), device=rd, **rmods)
        to, tl_ = attention_reference_varlen(q, k, v, cq.cpu(), ck.cpu(), compute_dtype=dt, device=rd, **rmods)
        _check_out_lse(o, l, ro, rl, to, tl_, dt, varlen=True)
        return
    leaves = [t.detach().requires_grad_() for t in (qv, kv, vv)]
    out = fn(*leaves, cq, ck, mq, mk, deterministic=case["deterministic"], **mods)
    out.backward(do)
    ref = _ref_grads(q, k, v, do, torch.float64, varlen=(cq, ck), **rmods)
    low = _ref_grads(q, k, v, do, dt, varlen=(cq, ck), **rmods)
    for name, t, lo, hi in zip(("dq", "dk", "dv"), leaves, low, ref):
        assert torch.isfinite(t.grad).all(), f"{name} has non-finite entries"
        assert_close_rule(t.grad, lo, hi, dt, factor=3, what=name)


def in_modes(case, check):
    """Run ``check(case)`` with the forward's RoPE mode and split scores the case drew (defaults otherwise)."""
    from attention_proto.ops.dense import forward as F

    prev = F.SPLIT_ROPE_SOFTCAP_SCORES
    F.SPLIT_ROPE_SOFTCAP_SCORES = bool(case.get("split_fwd"))
    try:
        with F.portable_rope(case.get("rope_mode") or F.PORTABLE_ROPE):
            return check(case)
    finally:
        F.SPLIT_ROPE_SOFTCAP_SCORES = prev


@pytest.fixture
def poison_backward(monkeypatch):
    monkeypatch.setattr(dense_backward, "POISON_OUTPUTS", True)


# ------------------------------------------------------------------------------------------------
# CPU (interpreter) fuzz: tiny shapes
# ------------------------------------------------------------------------------------------------

@fuzz_settings(40)
@given(case=dense_cases())
def test_fuzz_dense_forward(nan_empty, case):
    run_case("dense_fwd", case, lambda: in_modes(case, check_dense_forward))


@fuzz_settings(14)
@given(case=dense_cases(hooks=False), deterministic=st.booleans(), api=st.booleans())
def test_fuzz_dense_backward(nan_empty, poison_backward, case, deterministic, api):
    case = dict(case, deterministic=deterministic, entry="api" if api else "public")
    run_case("dense_bwd", case, lambda: in_modes(case, check_dense_backward))


@fuzz_settings(10)
@given(case=varlen_cases())
def test_fuzz_dense_varlen_forward(nan_empty, case):
    run_case("dense_varlen_fwd", case, lambda: in_modes(case, lambda c: check_varlen(c, backward=False)))


@fuzz_settings(6)
@given(case=varlen_cases())
def test_fuzz_dense_varlen_backward(nan_empty, poison_backward, case):
    run_case("dense_varlen_bwd", case, lambda: in_modes(case, lambda c: check_varlen(c, backward=True)))


# ------------------------------------------------------------------------------------------------
# GPU fuzz: larger shapes, bf16, kernel-shaping parts from fuzz_pools.POOLS; scripts/fuzz_gpu.py runs
# these at >= 1000 examples
# ------------------------------------------------------------------------------------------------

@gpu
@fuzz_settings(big=True)
@given(case=dense_gpu_cases("dense_fwd"))
def test_fuzz_dense_forward_gpu(nan_empty, case):
    run_case("dense_fwd", case, lambda: check_dense_forward(case))


@gpu
@fuzz_settings(big=True)
@given(case=dense_gpu_cases("dense_bwd"))
def test_fuzz_dense_backward_gpu(nan_empty, poison_backward, case):
    run_case("dense_bwd", case, lambda: check_dense_backward(case))


@gpu
@fuzz_settings(big=True)
@given(case=varlen_gpu_cases())
def test_fuzz_dense_varlen_forward_gpu(nan_empty, case):
    run_case("dense_varlen_fwd", case, lambda: check_varlen(case, backward=False))


@gpu
@fuzz_settings(big=True)
@given(case=varlen_gpu_cases())
def test_fuzz_dense_varlen_backward_gpu(nan_empty, poison_backward, case):
    run_case("dense_varlen_bwd", case, lambda: check_varlen(case, backward=True))


# ------------------------------------------------------------------------------------------------
# bugs the fuzzer found: minimal repros (xfail strict until fixed; remove the mark then)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_rope_default_positions_with_nq_gt_nk(varlen):
    g = gen(5)
    q, k, v = (randn(s, g, torch.float32) for s in ((1, 1, 12, 16), (1, 1, 4, 16), (1, 1, 4, 16)))
    rope = RopeSpec("half")
    ro, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), rope=rope)
    if varlen:
        cq = torch.tensor([0, 12], dtype=torch.int32, device=DEV)
        ck = torch.tensor([0, 4], dtype=torch.int32, device=DEV)
        o = attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cq, ck, rope=rope)
        o = o.transpose(0, 1)[None]
    else:
        o = attention(q, k, v, rope=rope)
    assert_close_rule(o, ro.float(), ro, torch.float32)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_rope_given_tables_with_negative_default_positions_is_an_error(varlen):
    """Given cos/sin tables have no rows for negative positions: a clear error, never a read before the table."""
    from attention_proto.ops.dense.rope import rope_cos_sin

    g = gen(6)
    q, k, v = (randn(s, g, torch.float32) for s in ((1, 1, 12, 16), (1, 1, 4, 16), (1, 1, 4, 16)))
    cos, sin = rope_cos_sin(torch.arange(64), 16)
    rope = RopeSpec("half", cos=cos.float(), sin=sin.float())
    with pytest.raises(ValueError, match="q_offset"):
        if varlen:
            cq = torch.tensor([0, 12], dtype=torch.int32, device=DEV)
            ck = torch.tensor([0, 4], dtype=torch.int32, device=DEV)
            attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cq, ck, rope=rope)
        else:
            attention(q, k, v, rope=rope)


def _varlen_run(lq, lk, H=2, Hkv=1, D=16):
    g = gen(11)
    cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    q = randn((int(cq[-1]), H, D), g, torch.float32)
    k = randn((int(ck[-1]), Hkv, D), g, torch.float32)
    v = randn((int(ck[-1]), Hkv, D), g, torch.float32)
    o = attention_varlen(q, k, v, cq.to(DEV), ck.to(DEV))
    ro, _ = attention_reference_varlen(q.cpu(), k.cpu(), v.cpu(), cq, ck)
    return o, ro


def test_varlen_number_of_sequences_changes_with_same_shapes(nan_empty):
    """Two varlen calls with the same tensor shapes, strides and max lengths but a different number
    of sequences: the second must compute every one of its sequences (a launch cache keyed
    without B would reuse a grid of the wrong size: sequences left unwritten, or cu_seqlens read
    past its end)."""
    for lq, lk in (([6, 6], [4, 3]), ([6, 3, 3], [4, 2, 1]), ([6, 6], [4, 3])):
        o, ro = _varlen_run(lq, lk)
        assert not torch.isnan(o).any(), f"unwritten rows for lq={lq}, lk={lk}"
        assert_close_rule(o, ro.float(), ro, torch.float32)


def test_varlen_backward_interleaved_rope_natural_scale_single_key(nan_empty):
    """Found by a pooled GPU fuzz case under the interpreter: with the default query positions the
    forward rotated q and k at positions shifted by Nq (RoPE scores depend only on differences) but
    the backward at the true ones; the two roundings differ, so the backward's P = exp(s - lse) was
    not 1 for a row with one visible key and dv came out 1 fp16 ulp off. The forward now reads a
    table shifted by the same amount (rotation at the true positions in both passes)."""
    case = dict(lq=[16], lk=[1], H=2, Hkv=2, D=64, entry="public", dtype=torch.float16, seed=653439, slack=0,
                deterministic=True, causal=True, window=0, softcap=None, alibi=None, rope=("interleaved", None, 0),
                scale=-0.4, score_hook=False, mask_hook=False)
    check_varlen(case, backward=True)
