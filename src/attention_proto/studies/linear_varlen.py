"""Packed (varlen) sequences in study 6: chunked linear attention over ``cu_seqlens``.

The flash study's batch of mixed lengths (log-uniform 128..8192, about 64k tokens,
:func:`.flash_varlen._lengths`), H16, K = V = 128, bf16, gated (a per-head scalar decay per
token), chunk 64, forward, run four ways:

- packed: ``linear_attention(q [1, T, H, K], ..., cu_seqlens=cu)`` (each sequence's state starts
  from zero: nothing leaks across boundaries);
- padded to the longest sequence (right padding: the real tokens' outputs are the same, the
  padding's work is wasted);
- each sequence alone (sum of the times);
- fla-core's ``chunk_simple_gla`` with ``cu_seqlens`` over the same packed tokens (when installed).

Finding ``linear-varlen-packing`` against issue #11's bars: packed >= 0.9x the one-by-one
throughput, and >= 1.5x faster than padding when the mean length is under half the longest.
"""
from __future__ import annotations

from typing import List

import torch

from .base import Finding, RunData, StudyContext, fmt
from .flash_varlen import PACKING_BARS_TEXT, _lengths, packed_batch_text, packing_bars

H, D, CHUNK = 16, 128, 64
TOKENS, TOKENS_QUICK, LENGTHS = 65536, 16384, (128, 8192)  # the flash study's packed batch
OP = "linear_fwd_varlen"


def measure(ctx: StudyContext, fla=None) -> None:
    """The timed rows (the linear study's GPU half); ``fla`` is fla-core's chunk_simple_gla or None."""
    from ..ops.linear import linear_attention
    from ..runtime.timing import Timing

    lens = _lengths(TOKENS_QUICK if ctx.quick else TOKENS, *LENGTHS, seed=1)
    total, longest = sum(lens), max(lens)
    dev = ctx.device
    dtype = torch.bfloat16 if str(dev).startswith("cuda") else torch.float16  # no bf16 math in the interpreter
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(1, total, H, D, device=dev, dtype=dtype) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, total, H, device=dev) + 3.0)
    extra = {"lengths": lens, "total_tokens": total, "longest": longest, "mean": total / len(lens),
             "chunk_size": CHUNK, "gated": True, "K": D, "V": D}
    fields = dict(B=len(lens), H=H, N=longest, D=D, dtype=str(dtype).replace("torch.", ""), causal=True,
                  mods=["gated"])
    bench = ctx.bench

    def ours(q_, k_, v_, g_, cu_=None):
        return linear_attention(q_, k_, v_, g=g_, chunk_size=CHUNK, cu_seqlens=cu_)[0]

    with ctx.guard("linear varlen packed"):
        t = bench(lambda: ours(q, k, v, g, cu))
        ctx.record(op=OP, impl="attention_proto", variant="packed", timing=t, extra=extra, **fields)
    with ctx.guard("linear varlen padded"):
        qp, kp, vp = (torch.zeros(len(lens), longest, H, D, device=dev, dtype=dtype) for _ in range(3))
        gp = torch.zeros(len(lens), longest, H, device=dev)
        for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lens)):
            for dst, src in ((qp, q), (kp, k), (vp, v), (gp, g)):
                dst[i, :n] = src[0, s:s + n]
        t = bench(lambda: ours(qp, kp, vp, gp))
        ctx.record(op=OP, impl="attention_proto", variant="padded", timing=t,
                   extra=dict(extra, padded_tokens=len(lens) * longest), **fields)
    with ctx.guard("linear varlen alone"):
        total_ms = 0.0
        for s, n in zip(cu[:-1].tolist(), lens):
            qs, ks, vs, gs = (x[:, s:s + n] for x in (q, k, v, g))
            t = bench(lambda: ours(qs, ks, vs, gs), warmup_ms=5, rep_ms=20)
            total_ms += t.ms_median
        ctx.record(op=OP, impl="attention_proto", variant="each alone (sum)",
                   timing=Timing(total_ms, total_ms, total_ms), extra=extra, **fields)
    if fla is not None:
        with ctx.guard("linear varlen fla"):
            cu64 = cu.long()  # fla-core takes int64 offsets
            t = bench(lambda: fla(q, k, v, g=g, cu_seqlens=cu64)[0])
            ctx.record(op=OP, impl="fla", variant="packed", timing=t, extra=extra, **fields)


def analyze(data: RunData) -> List[Finding]:
    if data.mode != "gpu":
        return []
    rows = {(r["impl"], r["variant"]): r for r in data.rows(op=OP) if r["ms_median"]}
    packed = rows.get(("attention_proto", "packed"))
    padded = rows.get(("attention_proto", "padded"))
    alone = rows.get(("attention_proto", "each alone (sum)"))
    if not (packed and padded and alone):
        return []
    vs_pad, vs_alone, ok = packing_bars(packed, padded, alone)
    fla = rows.get(("fla", "packed"))
    return [Finding(
        id="linear-varlen-packing", title="Packed linear attention against padding and separate runs",
        claim=(f"Gated chunked linear attention over a {packed_batch_text(packed)} runs {fmt(vs_pad)}x faster packed than padded to the longest, at {fmt(vs_alone)}x the throughput of the "
               f"sequences run one by one, and fla-core's chunk_simple_gla over the same packed tokens takes "
               f"{fmt(fla['ms_median'] / packed['ms_median']) + 'x our time' if fla else 'n/a (not run)'} "
               f"{PACKING_BARS_TEXT}."),
        verdict="supported" if ok else "refuted",
        metrics={"vs_padded": vs_pad, "vs_alone": vs_alone,
                 "fla_over_packed": fla["ms_median"] / packed["ms_median"] if fla else None},
        evidence=[r["id"] for r in (packed, padded, alone, fla) if r])]
