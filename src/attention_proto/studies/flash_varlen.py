"""Packed (varlen) sequences in study 1: what packing saves against padding.

A batch of mixed lengths (drawn log-uniformly from 128..8192, about 64k tokens; before
2026-11-26T20:00 uniformly, see the row's ``extra.lengths``) run four ways:
packed through ``attention_varlen`` (cu_seqlens), padded to the longest sequence
(ours and SDPA cuDNN), FlexAttention with a document mask over the packed
tokens, and each sequence alone (sum of times).
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..runtime.timing import attention_flops
from . import peers
from .base import Finding, RunData, StudyContext, fmt

H, D = 16, 128


def _lengths(total: int, lo: int, hi: int, seed: int = 0) -> List[int]:
    """Lengths drawn log-uniformly from [lo, hi] until ``total`` tokens: many short sequences and a
    few long ones, as in real packed batches, so the mean is well under half the longest (the case
    where the issue asks packing to beat padding by 1.5x)."""
    import math

    g = torch.Generator().manual_seed(seed)
    lens: List[int] = [hi]  # one sequence at the longest length: padding pays for it
    while sum(lens) < total:
        u = float(torch.rand((), generator=g))
        lens.append(int(round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))))
    lens[-1] -= sum(lens) - total
    if lens[-1] < lo:
        lens.pop()
    return lens


def measure(ctx: StudyContext) -> None:
    if not ctx.timing:
        _check(ctx)
        return
    _check(ctx)
    lens = _lengths(16384 if ctx.quick else 65536, 128, 8192, seed=1)
    total, longest = sum(lens), max(lens)
    causal = True
    dev = "cuda"
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q = torch.randn(total, H, D, device=dev, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    flops = sum(attention_flops(1, H, n, n, D, causal) for n in lens)
    extra = {"lengths": lens, "total_tokens": total, "longest": longest, "mean": total / len(lens)}
    from ..ops.dense.interface import attention, attention_varlen

    with ctx.guard("varlen packed"):
        t = ctx.bench(lambda: attention_varlen(q, k, v, cu, cu, longest, longest, causal=causal))
        ctx.record(op="attn_fwd_varlen", impl="attention_proto", variant="packed", B=len(lens), H=H, N=longest, D=D,
                   dtype="bfloat16", causal=causal, timing=t, flops=flops, extra=extra)
    with ctx.guard("varlen padded"):
        qp = torch.zeros(len(lens), H, longest, D, device=dev, dtype=torch.bfloat16)
        kp, vp = torch.zeros_like(qp), torch.zeros_like(qp)
        for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lens)):
            qp[i, :, :n] = q[s:s + n].transpose(0, 1)
            kp[i, :, :n] = k[s:s + n].transpose(0, 1)
            vp[i, :, :n] = v[s:s + n].transpose(0, 1)
        # padding at the end, causal top-left == bottom-right for equal lengths: valid rows match the packed run
        t = ctx.bench(lambda: attention(qp, kp, vp, causal=causal))
        ctx.record(op="attn_fwd_varlen", impl="attention_proto", variant="padded", B=len(lens), H=H, N=longest, D=D,
                   dtype="bfloat16", causal=causal, timing=t, flops=flops, extra=extra)
        fn, why = peers.make_sdpa("sdpa_cudnn", qp, kp, vp, causal)
        t = ctx.bench(fn) if fn else None
        ctx.record(op="attn_fwd_varlen", impl="sdpa_cudnn", variant="padded", B=len(lens), H=H, N=longest, D=D,
                   dtype="bfloat16", causal=causal, timing=t, flops=flops,
                   extra=dict(extra, unsupported=why) if why else extra)
        del qp, kp, vp
    with ctx.guard("varlen alone"):
        total_ms = 0.0
        for s, n in zip(cu[:-1].tolist(), lens):
            qs, ks, vs = (x[s:s + n].transpose(0, 1)[None] for x in (q, k, v))
            t = ctx.bench(lambda: attention(qs, ks, vs, causal=causal), warmup_ms=5, rep_ms=20)
            total_ms += t.ms_median
        from ..runtime.timing import Timing

        ctx.record(op="attn_fwd_varlen", impl="attention_proto", variant="each alone (sum)", B=len(lens), H=H,
                   N=longest, D=D, dtype="bfloat16", causal=causal, timing=Timing(total_ms, total_ms, total_ms),
                   flops=flops, extra=extra)
    with ctx.guard("varlen flex document mask"):
        from torch.nn.attention.flex_attention import create_block_mask

        doc = torch.repeat_interleave(torch.arange(len(lens), device=dev), torch.tensor(lens, device=dev))

        def doc_causal(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (ki <= qi)

        bm = create_block_mask(doc_causal, None, None, total, total, device=dev)
        flex = peers.compiled_flex()
        qf, kf, vf = (x.transpose(0, 1)[None] for x in (q, k, v))
        t = ctx.bench(lambda: flex(qf, kf, vf, block_mask=bm))
        ctx.record(op="attn_fwd_varlen", impl="flex", variant="document mask", B=len(lens), H=H, N=longest, D=D,
                   dtype="bfloat16", causal=causal, timing=t, flops=flops, extra=extra)


def _check(ctx: StudyContext) -> None:
    from ..ops.dense.interface import attention_varlen
    from ..ops.dense.reference import attention_reference_varlen
    from ..testing import check_error

    dtype = torch.bfloat16 if ctx.timing else torch.float16
    lens_q, lens_k = ([5, 1, 0, 13], [5, 9, 3, 13]) if not ctx.timing else ([300, 1, 0, 1025], [300, 700, 5, 1025])
    with ctx.guard("varlen correctness"):
        cq = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=ctx.device)
        ck = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=ctx.device)
        hq, hk, d = 4, 2, 64
        q = torch.randn(sum(lens_q), hq, d, dtype=dtype, device=ctx.device)
        k = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=ctx.device)
        v = torch.randn_like(k)
        out = attention_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=True)
        ref, _ = attention_reference_varlen(q, k, v, cq.cpu(), ck.cpu(), causal=True)
        low_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        low, _ = attention_reference_varlen(q.cpu(), k.cpu(), v.cpu(), cq.cpu(), ck.cpu(), causal=True,
                                            compute_dtype=low_dtype)
        chk = check_error(out, low.to(dtype), ref, dtype)
        ctx.record(op="attn_fwd_varlen", impl="attention_proto", variant="correctness", B=len(lens_q), H=hq, Hkv=hk,
                   N=max(lens_q), Nk=max(lens_k), D=d, dtype=str(dtype).replace("torch.", ""), causal=True,
                   extra={"ok": chk.ok, "max_err": chk.ours, "bound": chk.bound,
                          "err_ratio": chk.ours / chk.bound if chk.bound else None, "check": "correctness",
                          "lengths_q": lens_q, "lengths_k": lens_k})


def packing_bars(packed, padded, alone) -> Tuple[float, float, bool]:
    """(padded / packed time, one-by-one / packed time, whether issue #11's bars hold): >= 0.9x the
    one-by-one throughput, and >= 1.5x faster than padding when the mean length is under half the longest."""
    e = packed["extra"]
    vs_pad = padded["ms_median"] / packed["ms_median"]
    vs_alone = alone["ms_median"] / packed["ms_median"]
    return vs_pad, vs_alone, vs_alone >= 0.9 and (vs_pad >= 1.5 or e["mean"] >= e["longest"] / 2)


#: the bars of :func:`packing_bars`, as the findings quote them
PACKING_BARS_TEXT = "(bars: >= 1.5x vs padding when mean < longest/2, >= 0.9x vs separate)"


def packed_batch_text(packed) -> str:
    """'packed batch of N sequences (T tokens, mean length M, longest L)' from a packed row's extra."""
    e = packed["extra"]
    return (f"packed batch of {len(e['lengths'])} sequences ({e['total_tokens']} tokens, mean length "
            f"{fmt(e['mean'], 0)}, longest {e['longest']})")


def analyze(data: RunData) -> List[Finding]:
    if data.mode != "gpu":
        return []
    rows = {(r["impl"], r["variant"]): r for r in data.rows(op="attn_fwd_varlen") if r["ms_median"]}
    packed = rows.get(("attention_proto", "packed"))
    padded = rows.get(("attention_proto", "padded"))
    alone = rows.get(("attention_proto", "each alone (sum)"))
    out: List[Finding] = []
    if packed and padded and alone:
        vs_pad, vs_alone, ok = packing_bars(packed, padded, alone)
        cud = rows.get(("sdpa_cudnn", "padded"))
        flex = rows.get(("flex", "document mask"))
        out.append(Finding(
            id="flash-varlen-packing", title="Packed sequences against padding and separate runs",
            claim=(f"A {packed_batch_text(packed)} runs {fmt(vs_pad)}x faster packed than padded to the "
                   f"longest (SDPA cuDNN padded: {fmt(cud['ms_median'] / packed['ms_median']) if cud else 'n/a'}x our "
                   f"packed time; FlexAttention document mask: {fmt(flex['ms_median'] / packed['ms_median']) if flex else 'n/a'}x), "
                   f"and at {fmt(vs_alone)}x the throughput of the sequences run one by one {PACKING_BARS_TEXT}."),
            verdict="supported" if ok else "refuted",
            metrics={"vs_padded": vs_pad, "vs_alone": vs_alone,
                     "cudnn_padded_over_packed": cud["ms_median"] / packed["ms_median"] if cud else None,
                     "flex_over_packed": flex["ms_median"] / packed["ms_median"] if flex else None},
            evidence=[r["id"] for r in (packed, padded, alone, cud, flex) if r]))
    return out
