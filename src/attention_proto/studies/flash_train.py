"""The training half of study 1: forward+backward rows, determinism, backward tiles, memory.

Rows: ``op: attn_fwd_bwd`` for ours (default and deterministic) and SDPA cuDNN,
SDPA FLASH, FlexAttention at bf16, D in {64, 128}, N in {1k..16k}, B*N = 16k,
causal and not; ``op: attn_bwd`` for a small backward tile sweep; ``op:
attn_memory`` for the peak memory of one training step against O(B*H*N*D).
"""
from __future__ import annotations

from typing import List

import torch

from ..runtime.timing import attention_flops
from . import peers
from .base import Finding, RunData, StudyContext, fmt, pct, speedup_verdict

TOKENS = 16384
HD = 2048
NS = (1024, 2048, 4096, 8192, 16384)


def measure(ctx: StudyContext) -> None:
    if not ctx.timing:
        _check_grads(ctx)
        return
    _fwd_bwd(ctx)
    _bwd_sweep(ctx)
    _memory(ctx)
    _check_grads(ctx)


def _check_grads(ctx: StudyContext) -> None:
    """Gradient correctness against float64 (factor 3), and bitwise determinism of the deterministic mode."""
    from ..ops.dense.interface import attention
    from ..ops.dense.reference import attention_reference
    from ..testing import check_error

    dtype = torch.bfloat16 if ctx.timing else torch.float16
    shapes = [(1, 4, 1, 37, 37, 64, True), (1, 2, 2, 17, 29, 40, False)] if not ctx.timing else \
             [(2, 8, 2, 1000, 1000, 128, True), (1, 4, 4, 513, 777, 64, False)]
    for B, H, Hkv, Nq, Nk, D, causal in shapes:
        with ctx.guard(f"grad check D{D} Nq{Nq} Nk{Nk}"):
            q, k, v = peers.bhsd(B, H, Nq, D, Hkv=Hkv, Nk=Nk, dtype=dtype, device=ctx.device)
            do = torch.randn(B, H, Nq, D, dtype=dtype, device=ctx.device)
            grads = []
            for _ in range(2):
                qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
                o = attention(qq, kk, vv, causal=causal, deterministic=True)
                o.backward(do)
                grads.append((qq.grad, kk.grad, vv.grad))
            bitwise = all(torch.equal(a, b) for a, b in zip(*grads))
            ref_in = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v)]
            ro, _ = attention_reference(*ref_in, causal=causal)
            ro.backward(do.cpu().double())
            low_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
            low_in = [t.detach().cpu().to(low_dtype).requires_grad_(True) for t in (q, k, v)]
            lo, _ = attention_reference(*low_in, causal=causal, compute_dtype=low_dtype)
            lo.backward(do.cpu().to(low_dtype))
            worst, ok = 0.0, True
            for name, g, r, l in zip("qkv", grads[0], ref_in, low_in):
                lg = l.grad.to(dtype) if dtype == torch.bfloat16 else l.grad
                chk = check_error(g, lg, r.grad, dtype, factor=3.0)
                ok &= chk.ok
                worst = max(worst, chk.ours / chk.bound if chk.bound else 0.0)
            ctx.record(op="attn_fwd_bwd", impl="attention_proto", variant="deterministic", B=B, H=H, Hkv=Hkv, N=Nq,
                       Nk=Nk, D=D, dtype=str(dtype).replace("torch.", ""), causal=causal,
                       extra={"ok": bool(ok), "err_ratio": worst, "bitwise_deterministic": bitwise,
                              "check": "correctness"})


def _fwd_bwd(ctx: StudyContext) -> None:
    shapes = [(D, N, c) for D in (64, 128) for N in ((1024, 4096, 16384) if ctx.quick else NS) for c in (False, True)]
    impls = ("attention_proto", "attention_proto_det", "sdpa_cudnn", "sdpa_flash", "flex")  # ours: atomic, deterministic
    bar = ctx.progress(len(shapes) * len(impls), "flash train")
    for D, N, causal in shapes:
        H, B = HD // D, TOKENS // N
        flops = attention_flops(B, H, N, N, D, causal, mode="fwd_bwd")
        for impl in impls:
            if impl == "flex" and not (N in (4096, 8192) and D == 128) and not (N == 4096 and D == 64):
                # every FlexAttention shape compiles a forward and a backward kernel (~5-10 s): only
                # the bar shapes get one
                bar.update(1)
                continue
            with ctx.guard(f"fwd_bwd {impl} D{D} N{N} causal={causal}"):
                q, k, v = peers.bhsd(B, H, N, D)
                if impl.startswith("attention_proto"):
                    det = impl.endswith("_det")
                    fn, why = peers.make_ours(q, k, v, causal, backward=True, deterministic=det)
                elif impl == "flex":
                    fn, why = peers.make_flex(q, k, v, causal, backward=True)
                else:
                    fn, why = peers.make_sdpa(impl, q, k, v, causal, backward=True)
                t = ctx.bench(fn) if fn else None
                name = "attention_proto" if impl.startswith("attention_proto") else impl
                variant = ("deterministic" if impl.endswith("_det") else "atomic") if name == "attention_proto" else ""
                ctx.record(op="attn_fwd_bwd", impl=name, variant=variant, B=B, H=H, N=N, D=D, dtype="bfloat16",
                           causal=causal, timing=t, flops=flops, extra={"unsupported": why} if why else {})
            bar.update(1, f"{impl} D{D} N{N}")
    # forward alone at the same shapes for the bwd/fwd ratio is in the forward rows (variant default)


def _bwd_sweep(ctx: StudyContext) -> None:
    from ..ops.dense.backward import bwd_config_candidates, flash_attention_backward, tma_bwd_config_candidates
    from ..ops.dense.backward_tma import supports as tma_bwd_supports
    from ..ops.dense.forward import flash_attention_forward

    N, D = 4096, 128
    H, B = HD // D, TOKENS // N
    for causal in (False, True):
        q, k, v = peers.bhsd(B, H, N, D)
        o, lse = flash_attention_forward(q, k, v, causal=causal)
        do = torch.randn_like(o)
        flops = attention_flops(B, H, N, N, D, causal, mode="bwd")
        cands = bwd_config_candidates(D)
        if ctx.quick:
            cands = cands[:4]
        if not tma_bwd_supports(q, k, v):  # Hopper: the TMA backward's candidates too (opt-in path)
            cands = cands + tma_bwd_config_candidates(D)[: 2 if ctx.quick else None]
        for cfg in cands:
            extra = {"sweep": "bwd_tiles", "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N,
                     "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "path": cfg.path}
            t = None
            try:
                t = ctx.bench(lambda: flash_attention_backward(do, q, k, v, o, lse, causal=causal, config=cfg),
                              warmup_ms=10, rep_ms=40)
            except Exception as e:  # noqa: BLE001 - failures are data
                extra["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            ctx.record(op="attn_bwd", impl="attention_proto",
                       variant=(f"{cfg.BLOCK_M}x{cfg.BLOCK_N} w{cfg.num_warps} s{cfg.num_stages}" if cfg.path == "portable"
                                else cfg.label),
                       B=B, H=H, N=N, D=D, dtype="bfloat16", causal=causal, timing=t, flops=flops, extra=extra)


def _memory(ctx: StudyContext) -> None:
    """Peak extra memory of one training step, against the O(B*H*N*D) formula, at growing N."""
    from ..ops.dense.interface import attention

    B, H, D = 1, 8, 128
    for N in (4096, 16384, 32768):
        with ctx.guard(f"memory N{N}"):
            q, k, v = (t.requires_grad_(True) for t in peers.bhsd(B, H, N, D))
            do = torch.randn_like(q)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            o = attention(q, k, v, causal=True)
            o.backward(do)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            elt = 2
            # O + dQ/dK/dV + LSE + delta, all O(B*H*N*D) or O(B*H*N)
            formula = (4 * B * H * N * D) * elt + 2 * B * H * N * 4
            nxn = B * H * N * N * elt
            ctx.record(op="attn_memory", impl="attention_proto", variant="peak extra bytes", B=B, H=H, N=N, D=D,
                       dtype="bfloat16", causal=True,
                       extra={"peak_extra_bytes": peak, "formula_bytes": formula, "nxn_bytes": nxn,
                              "ratio_to_formula": peak / formula})
            del q, k, v, o, do


def analyze(data: RunData) -> List[Finding]:
    out: List[Finding] = []
    chk = [r for r in data.rows(op="attn_fwd_bwd", extra__check="correctness")]
    if chk:
        det = all(r["extra"].get("bitwise_deterministic") for r in chk)
        out.append(Finding(
            id="flash-deterministic-bitwise", title="The deterministic backward is bitwise reproducible",
            claim=(f"Over {len(chk)} shapes, two runs of the deterministic backward gave "
                   f"{'bitwise-identical' if det else 'different'} dQ, dK, dV."),
            verdict="supported" if det else "refuted", metrics={"shapes": len(chk)}, evidence=[r["id"] for r in chk]))
    if data.mode != "gpu":
        return out

    def get(op, impl, D, N, causal, variant=None):
        # the atomic backward was labelled "default" in runs made while it was the default
        names = {variant, "default"} if variant == "atomic" else {variant}
        rows = [r for r in data.rows(op=op, impl=impl, D=D, N=N, causal=causal) if r["ms_median"]
                and not r["extra"].get("sweep") and r["extra"].get("check") != "correctness"
                and (variant is None or r["variant"] in names)]
        return rows[-1] if rows else None

    # bwd / fwd time ratio against the 2.5x FLOP ratio
    ratios = []
    for D in (64, 128):
        for N in NS:
            for causal in (False, True):
                fb = get("attn_fwd_bwd", "attention_proto", D, N, causal, "deterministic")  # the default mode
                f = get("attn_fwd", "attention_proto", D, N, causal, "default")
                if fb and f:
                    ratios.append(((fb["ms_median"] - f["ms_median"]) / f["ms_median"], fb, f))
    if ratios:
        lo, hi = min(r[0] for r in ratios), max(r[0] for r in ratios)
        med = sorted(r[0] for r in ratios)[len(ratios) // 2]
        out.append(Finding(
            id="flash-bwd-fwd-ratio", title="Backward over forward time against the 2.5x FLOP ratio",
            claim=(f"Our backward takes {fmt(lo)}x to {fmt(hi)}x (median {fmt(med)}x) the forward's time across "
                   f"{len(ratios)} shapes, against the 2.5x ratio of their FLOPs: "
                   f"{'the backward is less efficient per FLOP than the forward' if med > 2.5 else 'the backward keeps the forward efficiency per FLOP'}."),
            verdict="observation", metrics={"min": lo, "max": hi, "median": med},
            evidence=[i for r in ratios for i in (r[1]["id"], r[2]["id"])]))
    # price of determinism
    prices = []
    for D in (64, 128):
        for N in NS:
            for causal in (False, True):
                a = get("attn_fwd_bwd", "attention_proto", D, N, causal, "atomic")
                b = get("attn_fwd_bwd", "attention_proto", D, N, causal, "deterministic")
                if a and b:
                    prices.append((b["ms_median"] / a["ms_median"], a, b))
    if prices:
        worst = max(prices, key=lambda p: p[0])
        med = sorted(p[0] for p in prices)[len(prices) // 2]
        out.append(Finding(
            id="flash-determinism-price", title="What the deterministic backward costs",
            claim=(f"A training step in deterministic mode takes {fmt(med)}x the fp32-atomic mode's time (median over "
                   f"{len(prices)} shapes; worst {fmt(worst[0])}x at D{worst[1]['D']} N{worst[1]['N']})."),
            verdict="observation", metrics={"median": med, "worst": worst[0]},
            evidence=[i for p in prices for i in (p[1]["id"], p[2]["id"])]))
    # bars
    bars = []
    for N in (4096, 8192):
        for causal in (False, True):
            o = get("attn_fwd_bwd", "attention_proto", 128, N, causal, "deterministic")  # the default mode
            fa, fl, cu = (get("attn_fwd_bwd", i, 128, N, causal) for i in ("sdpa_flash", "flex", "sdpa_cudnn"))
            if o and fa and fl:
                bars.append((N, causal, o, fa, fl, cu))
    if bars:
        vs_fa = min(fa["ms_median"] / o["ms_median"] for _, _, o, fa, _, _ in bars)
        vs_fl = min(fl["ms_median"] / o["ms_median"] for _, _, o, _, fl, _ in bars)
        cus = [cu["ms_median"] / o["ms_median"] for _, _, o, _, _, cu in bars if cu]
        vs_cu = min(cus) if cus else None
        ok = vs_fa >= 1.0 and vs_fl >= 0.9
        out.append(Finding(
            id="flash-bar-fwd-bwd", title="Training-step bar at D128: >= 1.0x SDPA FLASH, >= 0.9x FlexAttention",
            claim=(f"At bf16 H16 D128, N in {{4k, 8k}}, causal and not, our forward+backward runs at worst {fmt(vs_fa)}x "
                   f"SDPA FLASH and {fmt(vs_fl)}x FlexAttention (bars 1.0x and 0.9x), and {fmt(vs_cu)}x SDPA cuDNN "
                   f"(moonshot 0.8x)."),
            verdict="supported" if ok else "refuted", metrics={"min_vs_flash": vs_fa, "min_vs_flex": vs_fl,
                                                               "min_vs_cudnn": vs_cu},
            evidence=[r["id"] for b in bars for r in b[2:] if r]))
    sweep = [r for r in data.rows(op="attn_bwd", extra__sweep="bwd_tiles") if r["tflops"]]
    for causal in (False, True):
        rows = sorted([r for r in sweep if r["causal"] == causal], key=lambda r: -r["tflops"])
        if rows:
            b, w = rows[0], rows[-1]
            out.append(Finding(
                id=f"flash-best-bwd-tile-{'causal' if causal else 'full'}",
                title=f"Best backward tile, D128 {'causal' if causal else 'non-causal'}",
                claim=(f"Of {len(rows)} backward tiles at D128 N4096 {'causal' if causal else 'non-causal'}, {b['variant']} "
                       f"is fastest at {fmt(b['tflops'], 0)} TFLOPS; the slowest ({w['variant']}) reaches "
                       f"{fmt(w['tflops'], 0)} TFLOPS, {pct(1 - w['tflops'] / b['tflops'])} less."),
                verdict="observation", metrics={"best": b["variant"], "best_tflops": b["tflops"],
                                                "worst": w["variant"], "worst_tflops": w["tflops"]},
                evidence=[r["id"] for r in rows]))
    mem = data.rows(op="attn_memory")
    if mem:
        worst = max(mem, key=lambda r: r["extra"]["ratio_to_formula"])
        linear = all(r["extra"]["peak_extra_bytes"] < 0.5 * r["extra"]["nxn_bytes"] for r in mem)
        out.append(Finding(
            id="flash-memory-linear", title="Peak memory of a training step grows as O(B*H*N*D)",
            claim=(f"Peak extra memory of forward+backward stays within {fmt(worst['extra']['ratio_to_formula'])}x of the "
                   f"O(B*H*N*D) formula up to N{max(r['N'] for r in mem)} (there {fmt(worst['extra']['peak_extra_bytes'] / 2**20, 0)} "
                   f"MiB against {fmt(worst['extra']['nxn_bytes'] / 2**20, 0)} MiB for one N x N matrix)."),
            verdict=speedup_verdict(1.0 if linear else 0.0, 1.0),
            metrics={"max_ratio_to_formula": worst["extra"]["ratio_to_formula"]}, evidence=[r["id"] for r in mem]))
    return out
