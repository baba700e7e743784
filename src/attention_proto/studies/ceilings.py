"""Study `ceilings`: the hardware's two ceilings and the peers' forward speed, before our kernels.

On a GPU: the bf16 matmul and copy ceilings (taken by the runner, recorded here
as rows), SDPA cuDNN / FLASH / EFFICIENT and compiled FlexAttention forward at
bf16, D in {64, 128}, N from 2k to 16k with B*N = 16k tokens and H*D = 2048,
causal and not, and a GQA decode shape (B32, 32 query / 8 KV heads, N 8192,
D 128) whose rate is KV bytes over time. Under the interpreter: the float64
reference against PyTorch's math SDPA on tiny shapes (correctness only).
"""
from __future__ import annotations

from typing import List

import torch

from ..runtime.timing import attention_flops
from .base import Finding, RunData, Study, StudyContext, correctness_finding, fmt, pct, ratio
from . import peers

PEERS = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex")
TOKENS = 16384
HD = 2048


class CeilingsStudy(Study):
    name = "ceilings"
    title = "Hardware ceilings and peer baselines"

    def shapes(self, quick: bool):
        ns = (2048, 8192) if quick else (2048, 4096, 8192, 16384)
        for D in (64, 128):
            for N in ns:
                for causal in (False, True):
                    yield D, N, causal

    def measure(self, ctx: StudyContext) -> None:
        if not ctx.timing:
            self._measure_interpreter(ctx)
            return
        c = ctx.ceilings
        ctx.record(op="matmul", impl="cublas", variant="bf16 8192^3", dtype="bfloat16", N=8192, D=8192, B=1, H=1,
                   extra={"tflops": c.get("matmul_tflops")}, timing=_t(c.get("matmul_ms")), flops=2.0 * 8192**3)
        ctx.record(op="copy", impl="torch", variant="device copy 2 GiB", dtype="bfloat16",
                   extra={"bytes": c.get("copy_bytes")}, timing=_t(c.get("copy_ms")), nbytes=2.0 * c.get("copy_bytes", 0))
        shapes = list(self.shapes(ctx.quick))
        bar = ctx.progress(len(shapes) * len(PEERS) + 2, "ceilings")
        for D, N, causal in shapes:
            H = HD // D
            B = TOKENS // N
            q, k, v = peers.bhsd(B, H, N, D)
            flops = attention_flops(B, H, N, N, D, causal)
            for impl in PEERS:
                with ctx.guard(f"{impl} D{D} N{N} causal={causal}"):
                    fn, why = (peers.make_flex(q, k, v, causal) if impl == "flex"
                               else peers.make_sdpa(impl, q, k, v, causal))
                    t = ctx.bench(fn) if fn else None
                    ctx.record(op="attn_fwd", impl=impl, B=B, H=H, N=N, D=D, dtype="bfloat16", causal=causal,
                               timing=t, flops=flops, extra={"unsupported": why} if why else {})
                bar.update(1, f"{impl} D{D} N{N}")
            del q, k, v
        self._decode(ctx)
        bar.update(2, "decode")

    def _decode(self, ctx: StudyContext) -> None:
        B, Hq, Hkv, N, D = 32, 32, 8, 8192, 128
        q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        kv_bytes = 2.0 * k.numel() * k.element_size()
        for impl in ("sdpa_cudnn", "sdpa_flash"):
            with ctx.guard(f"decode {impl}"):
                fn, why = peers.make_sdpa(impl, q, k, v, causal=False)
                t = ctx.bench(fn) if fn else None
                ctx.record(op="decode", impl=impl, variant="gqa 32:8", B=B, H=Hq, Hkv=Hkv, N=1, Nk=N, D=D,
                           dtype="bfloat16", causal=False, timing=t, nbytes=kv_bytes,
                           extra={"unsupported": why} if why else {"kv_bytes": kv_bytes})

    def _measure_interpreter(self, ctx: StudyContext) -> None:
        """Correctness only: the float64 reference against PyTorch's math SDPA in fp32."""
        from ..ops.dense.reference import attention_reference
        from ..testing import check_error

        for causal in (False, True):
            for (N, Nk) in ((17, 17), (5, 23)):
                q, k, v = (torch.randn(2, 4, n, 32) for n in (N, Nk, Nk))
                ref, _ = attention_reference(q, k, v, causal=causal)
                low, _ = attention_reference(q, k, v, causal=causal, compute_dtype=torch.float32)
                mask = torch.ones(N, Nk, dtype=torch.bool).tril(Nk - N) if causal else None
                sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                chk = check_error(sdpa, low, ref, torch.float32)
                ctx.record(op="attn_fwd", impl="sdpa_math", variant=f"N{N} Nk{Nk}", B=2, H=4, N=N, Nk=Nk, D=32,
                           dtype="float32", causal=causal,
                           extra={"ok": chk.ok, "max_err": chk.ours, "bound": chk.bound,
                                  "err_ratio": chk.ours / chk.bound if chk.bound else None})

    def analyze(self, data: RunData) -> List[Finding]:
        out: List[Finding] = []
        if data.mode != "gpu":
            f = correctness_finding(self.name, data, "attn_fwd")
            return [f] if f else []
        mm = data.one(op="matmul")
        cp = data.one(op="copy")
        mm_t = mm["tflops"] if mm else None
        cp_g = cp["gbps"] if cp else None
        if mm and cp:
            out.append(Finding(
                id="ceilings-hardware", title="Measured matmul and copy ceilings",
                claim=(f"On {data.env['gpu']}, a bf16 8192^3 matmul reaches {fmt(mm_t, 0)} TFLOPS and a 2 GiB device "
                       f"copy {fmt(cp_g, 0)} GB/s (read + write); these are the ceilings every ratio in this run uses."),
                verdict="observation", metrics={"matmul_tflops": mm_t, "copy_gbps": cp_g},
                evidence=[mm["id"], cp["id"]]))
        for impl in PEERS:
            rows = [r for r in data.rows(op="attn_fwd", impl=impl) if r["tflops"]]
            if not rows or not mm_t:
                continue
            best = max(rows, key=lambda r: r["tflops"])
            out.append(Finding(
                id=f"ceilings-{impl}-vs-matmul", title=f"{impl} forward against the matmul ceiling",
                claim=(f"{impl} forward peaks at {fmt(best['tflops'], 0)} TFLOPS (D{best['D']} N{best['N']} "
                       f"{'causal' if best['causal'] else 'non-causal'}), {pct(ratio(best['tflops'], mm_t))} of the "
                       f"measured bf16 matmul ceiling of {fmt(mm_t, 0)} TFLOPS."),
                verdict="observation",
                metrics={"best_tflops": best["tflops"], "fraction_of_matmul": ratio(best["tflops"], mm_t),
                         "D": best["D"], "N": best["N"], "causal": best["causal"]},
                evidence=[r["id"] for r in rows] + ([mm["id"]] if mm else [])))
        # flex vs cudnn, the two strongest peers, at D128
        pairs = []
        for r in data.rows(op="attn_fwd", impl="flex", D=128):
            c = data.one(op="attn_fwd", impl="sdpa_cudnn", D=128, N=r["N"], causal=r["causal"])
            if c and c["tflops"] and r["tflops"]:
                pairs.append((r, c, r["tflops"] / c["tflops"]))
        if pairs:
            lo = min(pairs, key=lambda p: p[2])
            hi = max(pairs, key=lambda p: p[2])
            out.append(Finding(
                id="ceilings-flex-vs-cudnn", title="FlexAttention against cuDNN at D128",
                claim=(f"Compiled FlexAttention runs at {fmt(lo[2])}x to {fmt(hi[2])}x of SDPA cuDNN's forward "
                       f"throughput at D128 (lowest at N{lo[0]['N']} {'causal' if lo[0]['causal'] else 'non-causal'})."),
                verdict="observation", metrics={"min_ratio": lo[2], "max_ratio": hi[2]},
                evidence=[i for p in pairs for i in (p[0]["id"], p[1]["id"])]))
        for impl in ("sdpa_cudnn", "sdpa_flash"):
            d = data.one(op="decode", impl=impl)
            if d and d["gbps"] and cp_g:
                out.append(Finding(
                    id=f"ceilings-decode-{impl}", title=f"{impl} GQA decode against the copy ceiling",
                    claim=(f"{impl} decoding one token for B{d['B']}, {d['H']}:{d['Hkv']} GQA heads, N{d['Nk']}, D{d['D']} "
                           f"reads KV at {fmt(d['gbps'], 0)} GB/s, {pct(ratio(d['gbps'], cp_g))} of the measured copy "
                           f"ceiling ({fmt(cp_g, 0)} GB/s)."),
                    verdict="observation", metrics={"gbps": d["gbps"], "fraction_of_copy": ratio(d["gbps"], cp_g)},
                    evidence=[d["id"], cp["id"]]))
        return out


def _t(ms: dict | None):
    from ..runtime.timing import Timing

    if not ms:
        return None
    return Timing(ms["ms_median"], ms["ms_p20"], ms["ms_p80"])


STUDY = CeilingsStudy()
