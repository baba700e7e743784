"""Study 6 (`linear`): chunked linear attention against fla-core and against our dense flash attention.

On a GPU, in one run:
- gradient checks at bf16 against float64 (H16, K = V = 128, N 1000, gated and ungated,
  both forms of the dk product): Triton 3.4-3.7.0 miscompiles fla's gated backward on
  Hopper (fla #640), ours must be right;
- B*N = 32k tokens (B = max(1, 32k / N)), H = 16, D = 128, N from 512 to 64k: our linear attention (chunk 64,
  ungated and with a per-token scalar decay g) forward and forward+backward, fla-core's
  ``chunk_simple_gla`` on the same inputs, our dense causal flash attention and SDPA
  cuDNN causal (BHSD);
- the chunk-size sweep (32, 64, 128) at N in {4k, 16k};
- the decode step (B 64, H 16, 128 x 128 fp32 state): bytes moved against the copy ceiling.
Under the interpreter: small correctness checks of every form against float64.

Linear "flops" are the executed matmul flops of the chunked algorithm at chunk C,
per head and token 4KV + 2C(K+V) forward and 12KV + 2C(4K+3V) forward+backward; they
are context only, comparisons use times.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..runtime.timing import attention_flops
from . import peers
from .base import Finding, RunData, Study, StudyContext, correctness_finding, fmt, pct, ratio, speedup_verdict

TOKENS = 32768
H, D = 16, 128
NS_FULL = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
NS_QUICK = (1024, 4096, 16384)
BAR_NS = (4096, 16384)
CHUNKS = (32, 64, 128)
DEFAULT_CHUNK = 64
FLA_RANGE = (2048, 4096)   # FLA's reported crossover on H100
DECODE_B = 64
CHECK_N = 1000             # gradient checks: one sequence of this length, partial last chunk
DTYPE = torch.bfloat16     # the GPU runs' dtype (a dry run on the CPU swaps in float16)
DEVICE = "cuda"
BENCH = dict(warmup_ms=10.0, rep_ms=60.0)


def linear_flops(B: int, N: int, Hh: int, K: int, V: int, C: int, mode: str) -> float:
    per = 4 * K * V + 2 * C * (K + V) if mode == "fwd" else 12 * K * V + 2 * C * (4 * K + 3 * V)
    return float(B * N * Hh * per)


def _gates(g: bool) -> str:
    return "gated" if g else "ungated"


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


# ---- correctness (both modes) ---------------------------------------------------------------

def _check(ctx: StudyContext, *, dtype, B, N, Hh, K, V, gated, C, mode="chunk", cu=None, backward=False,
           op="linear_fwd", variant="", dst=None):
    """One check of ours against float64 (error rule; factor 3 for gradients); records a row."""
    from ..ops.linear import linear_attention
    from ..ops.linear.reference import linear_attention_parallel, random_inputs
    from ..testing import check_error

    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(N * 31 + K)
    ns = B if cu is None else len(cu) - 1
    inputs = list(random_inputs(B, N, Hh, K, V, dtype, dev, gated=gated, h0=True, generator=gen, num_seqs=ns))
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=dev)
    do = torch.randn(B, N, Hh, V, generator=gen, device=dev).to(dtype)
    dht = torch.randn(ns, Hh, K, V, generator=gen, device=dev)

    def run(fn, ins):
        ins = [None if x is None else x.detach().clone().requires_grad_(backward) for x in ins]
        with torch.set_grad_enabled(backward):
            o, ht = fn(*ins)
            if backward:
                ((o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()).backward()
        outs = [o.detach(), ht.detach()]
        if backward:
            outs += [x.grad for x in ins if x is not None]
        return outs

    def ours(q, k, v, g, s0):
        return linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True, chunk_size=C,
                                cu_seqlens=cu_t, mode=mode)

    def ref(cd):
        return lambda q, k, v, g, s0: linear_attention_parallel(q, k, v, g, None, s0, True, cu_t, compute_dtype=cd)

    a = run(ours, inputs)
    r = run(ref(torch.float64), [None if x is None else x.double() for x in inputs])
    lo = run(ref(dtype), inputs)
    names = ["o", "final"] + (["dq", "dk", "dv"] + (["dg"] if gated else []) + ["dh0"] if backward else [])
    worst, worst_name, ok = None, "", True
    for i, name in enumerate(names):
        chk = check_error(a[i], lo[i], r[i], dtype, factor=3 if i >= 2 else 2)
        ok &= chk.ok
        er = chk.ours / chk.bound if chk.bound else None
        if worst is None or (er or 0) > (worst[3] or 0):
            worst, worst_name = (chk.ours, chk.torch_err, chk.bound, er), name
    ctx.record(op=op, impl="attention_proto", variant=variant, mods=["gated"] if gated else [], B=B, H=Hh, N=N,
               D=K, dtype=str(dtype).replace("torch.", ""), causal=True,
               extra={"ok": bool(ok), "max_err": worst[0], "torch_err": worst[1], "bound": worst[2],
                      "err_ratio": worst[3], "worst": worst_name, "K": K, "V": V, "chunk_size": C, "mode": mode,
                      "gated": gated, "varlen": cu is not None, "check": "correctness",
                      **({"dst": dst} if dst is not None else {})})


def _check_decode(ctx: StudyContext, dtype, gated: bool) -> None:
    """Decode steps token by token against the float64 chunk-free reference."""
    from ..ops.linear import linear_attention_step
    from ..ops.linear.reference import linear_attention_parallel, random_inputs
    from ..testing import check_error

    B, N, Hh, K, V = 2, 9, 2, 24, 40
    gen = torch.Generator(device=ctx.device).manual_seed(5)
    q, k, v, g, s0 = random_inputs(B, N, Hh, K, V, dtype, ctx.device, gated=gated, h0=True, generator=gen)
    state, outs = s0.clone(), []
    for t in range(N):
        o, state = linear_attention_step(q[:, t], k[:, t], v[:, t], state, g=None if g is None else g[:, t])
        outs.append(o)
    o = torch.stack(outs, 1)
    ref, rf = linear_attention_parallel(q, k, v, g, None, s0, True)
    low, lf = linear_attention_parallel(q, k, v, g, None, s0, True, compute_dtype=dtype)
    c1, c2 = check_error(o, low, ref, dtype), check_error(state, lf, rf, dtype)
    worst = max((c1, c2), key=lambda c: c.ours / c.bound)
    ctx.record(op="linear_decode", impl="attention_proto", variant=f"{_short(dtype)} {N} steps {_gates(gated)}",
               mods=["gated"] if gated else [], B=B, H=Hh, N=1, Nk=N, D=K, dtype=str(dtype).replace("torch.", ""),
               causal=True, extra={"ok": c1.ok and c2.ok, "max_err": worst.ours, "bound": worst.bound,
                                   "err_ratio": worst.ours / worst.bound, "K": K, "V": V, "gated": gated,
                                   "check": "correctness"})


class LinearStudy(Study):
    name = "linear"
    title = "Chunked linear attention: crossover with flash attention, fla-core, chunk size, decode"

    # ---- measure ------------------------------------------------------------------------------

    def measure(self, ctx: StudyContext) -> None:
        if not ctx.timing:
            self._interpreter(ctx)
            return
        ns = NS_QUICK if ctx.quick else NS_FULL
        sweep_ns = BAR_NS[:1] if ctx.quick else BAR_NS
        chunks = (DEFAULT_CHUNK,) + tuple(c for c in CHUNKS if c != DEFAULT_CHUNK)
        bar = ctx.progress(len(ns) + len(sweep_ns) + 3, "linear")
        with ctx.guard("compile"):
            self._warm_compile(ctx, chunks)
        bar.update(1, "compile")
        self._gpu_checks(ctx)
        bar.update(1, "gradient checks")
        fla, fla_why = _fla()
        for N in ns:
            with ctx.guard(f"N{N}"):
                self._one_length(ctx, N, fla, fla_why)
            bar.update(1, f"N{N}")
            _empty_cache()
        for N in sweep_ns:
            with ctx.guard(f"chunk sweep N{N}"):
                self._chunk_sweep(ctx, N, [c for c in chunks if c != DEFAULT_CHUNK], quick=ctx.quick)
            bar.update(1, f"sweep N{N}")
        with ctx.guard("decode"):
            self._decode(ctx)
        bar.update(1, "decode")

    def _interpreter(self, ctx: StudyContext) -> None:
        B, N, Hh, K, V = 2, 45, 2, 24, 40
        for dtype in (torch.float32, torch.float16):
            for gated in (False, True):
                with ctx.guard(f"fwd {dtype} {_gates(gated)}"):
                    _check(ctx, dtype=dtype, B=B, N=N, Hh=Hh, K=K, V=V, gated=gated, C=32,
                           variant=f"{_short(dtype)} chunk32 {_gates(gated)} h0")
        with ctx.guard("fwd recurrent"):
            _check(ctx, dtype=torch.float16, B=1, N=23, Hh=Hh, K=16, V=24, gated=True, C=32, mode="recurrent",
                   variant="fp16 recurrent gated h0")
        with ctx.guard("fwd varlen"):
            _check(ctx, dtype=torch.float32, B=1, N=50, Hh=Hh, K=16, V=24, gated=True, C=32, cu=[0, 1, 34, 34, 50],
                   variant="fp32 chunk32 varlen [1, 33, 0, 16]")
        for dtype, gated in ((torch.float32, False), (torch.float32, True), (torch.float16, True)):
            with ctx.guard(f"fwd_bwd {dtype} {_gates(gated)}"):
                _check(ctx, dtype=dtype, B=B, N=N, Hh=Hh, K=K, V=V, gated=gated, C=32, backward=True,
                       op="linear_fwd_bwd", variant=f"{_short(dtype)} chunk32 {_gates(gated)} h0 dht")
        with ctx.guard("fwd_bwd varlen"):
            _check(ctx, dtype=torch.float32, B=1, N=50, Hh=Hh, K=16, V=24, gated=True, C=32, cu=[0, 1, 34, 34, 50],
                   backward=True, op="linear_fwd_bwd", variant="fp32 chunk32 varlen gated")
        for gated in (False, True):
            with ctx.guard(f"decode {_gates(gated)}"):
                _check_decode(ctx, torch.float16, gated)

    def _gpu_checks(self, ctx: StudyContext) -> None:
        """bf16 fwd+bwd against float64 at the sweep's head shape (H16, K = V = 128: the kernels compiled for
        the sweep; the dq/dk kernel runs 64-wide K tiles, the width fla #640 miscompiles). K = 64 heads
        and other shapes are in tests/test_linear_gpu.py."""
        cases = [(False, 64, 0), (True, 64, 0), (True, 64, 1)]   # DST 1: the fallback form of dk
        if not ctx.quick:
            cases += [(True, 32, 0), (True, 128, 0)]
        for gated, C, dst in cases:
            with ctx.guard(f"gradient check {_gates(gated)} C{C} DST{dst}"), _dqk_form(dst):
                _check(ctx, dtype=DTYPE, B=1, N=CHECK_N, Hh=H, K=D, V=D, gated=gated, C=C, backward=True,
                       op="linear_grad_check", variant=f"bf16 K{D} {_gates(gated)} C{C} DST{dst}", dst=dst)

    def _warm_compile(self, ctx: StudyContext, chunks: Sequence[int]) -> None:
        """Compile every variant the sweep times once, several at a time (Triton compiles overlap in threads)."""
        from ..ops.linear import linear_attention

        def one(C: int, gated: bool) -> float:
            t0 = time.perf_counter()
            q, k, v, g = _inputs(1, 512, gated, grad=True)
            o, _ = linear_attention(q, k, v, g=g, chunk_size=C)
            o.backward(torch.randn_like(o))
            linear_attention(q.detach(), k.detach(), v.detach(), g=None if g is None else g.detach(), chunk_size=C)
            _sync()
            return time.perf_counter() - t0

        jobs = [(C, gt) for C in chunks for gt in (False, True)]
        t0 = time.perf_counter()
        from ..runtime.device import interpreter_mode

        # Triton's interpreter keeps its grid in globals: one thread there (the CPU dry run)
        with ThreadPoolExecutor(max_workers=1 if interpreter_mode() else len(jobs)) as ex:
            times = list(ex.map(lambda j: one(*j), jobs))
        ctx.log(f"compiled {len(jobs)} linear variants in {time.perf_counter() - t0:.1f} s "
                f"(slowest {max(times):.1f} s)")

    def _one_length(self, ctx: StudyContext, N: int, fla, fla_why: Optional[str]) -> None:
        from ..ops.linear import linear_attention

        B = max(1, TOKENS // N)
        for gated in (False, True):
            mods = ["gated"] if gated else []
            q, k, v, g = _inputs(B, N, gated)
            for backward in (False, True):
                op = "linear_fwd_bwd" if backward else "linear_fwd"
                flops = linear_flops(B, N, H, D, D, DEFAULT_CHUNK, "fwd_bwd" if backward else "fwd")
                with ctx.guard(f"ours {op} {_gates(gated)} N{N}"):
                    fn, why = _linear_peer(lambda q, k, v, g: linear_attention(q, k, v, g=g, chunk_size=DEFAULT_CHUNK)[0],
                                           q, k, v, g, backward)
                    t = ctx.bench(fn, **BENCH) if fn else None
                    ctx.record(op=op, impl="attention_proto", variant=f"{_gates(gated)} C{DEFAULT_CHUNK}", mods=mods,
                               B=B, H=H, N=N, D=D, dtype="bfloat16", causal=True, timing=t, flops=flops,
                               extra={"chunk_size": DEFAULT_CHUNK, "gated": gated, "K": D, "V": D,
                                      "configs": _configs(DEFAULT_CHUNK), **({"unsupported": why} if why else {})})
                with ctx.guard(f"fla {op} {_gates(gated)} N{N}"):
                    t, why, first = None, fla_why, None
                    if fla is not None:
                        t0 = time.perf_counter()
                        fn, why = _linear_peer(lambda q, k, v, g: fla(q, k, v, g=g)[0], q, k, v, g, backward)
                        first = time.perf_counter() - t0
                        t = ctx.bench(fn, **BENCH) if fn else None
                    ctx.record(op=op, impl="fla", variant=f"chunk_simple_gla {_gates(gated)}", mods=mods, B=B, H=H,
                               N=N, D=D, dtype="bfloat16", causal=True, timing=t, flops=flops,
                               extra={"chunk_size": 64, "gated": gated, "K": D, "V": D, "first_call_s": first,
                                      "fla_version": _fla_version(), **({"unsupported": why} if why else {})})
            del q, k, v, g
        self._dense(ctx, B, N)

    def _dense(self, ctx: StudyContext, B: int, N: int) -> None:
        for backward in (False, True):
            op = "attn_fwd_bwd" if backward else "attn_fwd"
            flops = attention_flops(B, H, N, N, D, True, mode="fwd_bwd" if backward else "fwd")
            for impl in ("attention_proto", "sdpa_cudnn"):
                with ctx.guard(f"dense {impl} {op} N{N}"):
                    q, k, v = peers.bhsd(B, H, N, D, dtype=DTYPE, device=DEVICE)
                    try:
                        fn, why = (peers.make_ours(q, k, v, True, backward=backward) if impl == "attention_proto"
                                   else peers.make_sdpa(impl, q, k, v, True, backward=backward))
                    except Exception as e:  # noqa: BLE001 - the dense op may be missing; that is a recorded fact
                        fn, why = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    t = ctx.bench(fn, **BENCH) if fn else None
                    ctx.record(op=op, impl=impl, variant="dense causal", B=B, H=H, N=N, D=D, dtype="bfloat16",
                               causal=True, timing=t, flops=flops, extra={"unsupported": why} if why else {})
                    del q, k, v

    def _chunk_sweep(self, ctx: StudyContext, N: int, chunks: Sequence[int], quick: bool) -> None:
        from ..ops.linear import linear_attention

        B = max(1, TOKENS // N)
        for gated in (False, True):
            q, k, v, g = _inputs(B, N, gated)
            for C in chunks:
                for backward in ((False,) if quick and gated else (False, True)):
                    op = "linear_fwd_bwd" if backward else "linear_fwd"
                    with ctx.guard(f"sweep {op} {_gates(gated)} C{C} N{N}"):
                        fn, why = _linear_peer(lambda q, k, v, g, C=C: linear_attention(q, k, v, g=g, chunk_size=C)[0],
                                               q, k, v, g, backward)
                        t = ctx.bench(fn, **BENCH) if fn else None
                        ctx.record(op=op, impl="attention_proto", variant=f"{_gates(gated)} C{C}",
                                   mods=["gated"] if gated else [], B=B, H=H, N=N, D=D, dtype="bfloat16", causal=True,
                                   timing=t, flops=linear_flops(B, N, H, D, D, C, "fwd_bwd" if backward else "fwd"),
                                   extra={"chunk_size": C, "gated": gated, "K": D, "V": D, "sweep": True,
                                          "configs": _configs(C), **({"unsupported": why} if why else {})})
            del q, k, v, g

    def _decode(self, ctx: StudyContext) -> None:
        from ..ops.linear import linear_attention_step

        B, K, V = DECODE_B, D, D
        q, k = (torch.randn(B, H, K, device=DEVICE, dtype=DTYPE) for _ in range(2))
        v = torch.randn(B, H, V, device=DEVICE, dtype=DTYPE)
        g = torch.nn.functional.logsigmoid(torch.randn(B, H, device=DEVICE) + 3.0)
        state = torch.randn(B, H, K, V, device=DEVICE, dtype=torch.float32)
        state_bytes = state.numel() * 4
        io_bytes = (q.numel() + k.numel() + 2 * v.numel()) * 2 + g.numel() * 4
        for inplace in (False, True):
            with ctx.guard(f"decode inplace={inplace}"):
                def fn(inplace=inplace):
                    return linear_attention_step(q, k, v, state, g=g, inplace=inplace)

                fn()
                t = ctx.bench(fn, **BENCH)
                ctx.record(op="linear_decode", impl="attention_proto", variant="in place" if inplace else "new state",
                           mods=["gated"], B=B, H=H, N=1, Nk=1, D=K, dtype="bfloat16", causal=True, timing=t,
                           nbytes=2.0 * state_bytes + io_bytes,
                           extra={"state_bytes": state_bytes, "state_dtype": "float32", "K": K, "V": V,
                                  "inplace": inplace})

    # ---- analyze ------------------------------------------------------------------------------

    def analyze(self, data: RunData) -> List[Finding]:
        out: List[Finding] = []
        if data.mode != "gpu":
            for op in ("linear_fwd", "linear_fwd_bwd", "linear_decode"):
                f = correctness_finding(self.name, data, op)
                if f:
                    out.append(f)
            return out
        f = correctness_finding(self.name, data, "linear_grad_check")
        if f:
            out.append(f)
        for fn in (self._gated_bwd_finding, self._crossovers, self._vs_fla, self._chunk_finding, self._decode_finding):
            out.extend(fn(data))
        return out

    def _timed(self, data: RunData, **where) -> Dict[int, Dict]:
        """N -> row (timed rows only; the chunk sweep excluded unless asked for)."""
        rows = [r for r in data.rows(**where) if r.get("ms_median")]
        return {r["N"]: r for r in rows}

    def _linear(self, data: RunData, op: str, impl: str, gated: bool, C: int = DEFAULT_CHUNK) -> Dict[int, Dict]:
        rows = [r for r in data.rows(op=op, impl=impl) if r.get("ms_median") and bool(r["extra"].get("gated")) == gated
                and (impl != "attention_proto" or r["extra"].get("chunk_size") == C)]
        return {r["N"]: r for r in rows}

    def _gated_bwd_finding(self, data: RunData) -> List[Finding]:
        rows = [r for r in data.rows(op="linear_grad_check") if r["extra"].get("gated")]
        if not rows:
            return []
        bad = [r for r in rows if not r["extra"]["ok"]]
        fla_rows = [r for r in data.rows(op="linear_fwd_bwd", impl="fla") if r["extra"].get("gated")]
        fla_why = next((r["extra"].get("unsupported") for r in fla_rows if r["extra"].get("unsupported")), None)
        worst = max(rows, key=lambda r: r["extra"].get("err_ratio") or 0)
        forms = sorted({r["extra"].get("dst", 0) for r in rows})
        bad_forms = sorted({r["extra"].get("dst", 0) for r in bad})
        dtypes = "/".join(sorted({r["dtype"] for r in rows}))
        claim = (f"On {data.env.get('gpu')} with Triton {data.env.get('triton')}, our gated backward passed "
                 f"{len(rows) - len(bad)} of {len(rows)} {dtypes} gradient checks against float64 (dk forms DST "
                 f"{forms}{', failing in DST ' + str(bad_forms) if bad else ''}; head dims K "
                 f"{sorted({r['extra']['K'] for r in rows})}, chunks {sorted({r['extra']['chunk_size'] for r in rows})}; "
                 f"worst error / bound {fmt(worst['extra'].get('err_ratio'))} on {worst['extra'].get('worst')})"
                 + (f"; fla-core's gated backward here: {fla_why}" if fla_why else "") + ".")
        return [Finding(id="linear-gated-backward-hopper", title="Gated backward correct where fla's is miscompiled",
                        claim=claim, verdict="supported" if not bad else "refuted",
                        metrics={"checks": len(rows), "failed": len(bad), "failing_forms": bad_forms,
                                 "failing": [r["variant"] for r in bad],
                                 "worst_err_ratio": worst["extra"].get("err_ratio"), "fla_refusal": fla_why},
                        evidence=[r["id"] for r in rows + fla_rows])]

    def _crossovers(self, data: RunData) -> List[Finding]:
        out: List[Finding] = []
        for op, dense_op, label in (("linear_fwd", "attn_fwd", "forward"),
                                    ("linear_fwd_bwd", "attn_fwd_bwd", "forward+backward")):
            for dense_impl in ("attention_proto", "sdpa_cudnn"):
                dense = self._timed(data, op=dense_op, impl=dense_impl)
                res = {}
                for gated in (False, True):
                    lin = self._linear(data, op, "attention_proto", gated)
                    pts = [(n, lin[n]["ms_median"], dense[n]["ms_median"]) for n in sorted(set(lin) & set(dense))]
                    res[gated] = (crossover(pts), pts, [lin[n]["id"] for n in lin] + [dense[n]["id"] for n in dense])
                x, pts, ev = res[False]
                if not pts:
                    why = next((r["extra"].get("unsupported") for r in data.rows(op=dense_op, impl=dense_impl)
                                if r["extra"].get("unsupported")), "no timed rows")
                    out.append(Finding(id=f"linear-crossover-{'fwd' if op == 'linear_fwd' else 'fwd-bwd'}-{dense_impl}",
                                       title=f"Crossover with {dense_impl} causal ({label})",
                                       claim=f"No crossover could be measured against {dense_impl}: {why}.",
                                       verdict="inconclusive", metrics={}, evidence=[]))
                    continue
                xg = res[True][0]
                speed = {n: d / lin for n, lin, d in pts}
                ours_dense = dense_impl == "attention_proto"
                dense_name = ("our dense causal flash attention" if ours_dense
                              else f"{dense_impl} causal attention")
                verdict = "observation"
                if ours_dense:
                    verdict = ("inconclusive" if x["estimate"] is None and x["status"] == "none" else
                               "supported" if x["estimate"] is not None and FLA_RANGE[0] <= x["estimate"] <= FLA_RANGE[1]
                               else "refuted")
                fla_txt = (f"; FLA reports {FLA_RANGE[0]}-{FLA_RANGE[1]} on H100, "
                           f"{'which this measurement matches' if verdict == 'supported' else 'which this measurement does not match'}"
                           if ours_dense else "")
                r0 = next(iter(self._linear(data, op, "attention_proto", False).values()))
                claim = (f"{label.capitalize()} at B*N = {r0['B'] * r0['N']} tokens, H{r0['H']}, D{r0['D']}, "
                         f"{r0['dtype']}: ungated linear attention "
                         f"(chunk {DEFAULT_CHUNK}) overtakes {dense_name} "
                         f"{_xtxt(x)} (gated: {_xtxt(xg)}); at N{pts[-1][0]} linear is "
                         f"{fmt(speed[pts[-1][0]], 1)}x faster, at N{pts[0][0]} {fmt(speed[pts[0][0]], 2)}x{fla_txt}.")
                out.append(Finding(
                    id=f"linear-crossover-{'fwd' if op == 'linear_fwd' else 'fwd-bwd'}-{dense_impl}",
                    title=f"Sequence length where linear attention overtakes {dense_impl} causal ({label})",
                    claim=claim, verdict=verdict,
                    metrics={"crossover_N": x["estimate"], "bracket": [x["lo"], x["hi"]], "status": x["status"],
                             "crossover_N_gated": xg["estimate"], "dense_over_linear": {str(n): s for n, s in speed.items()}},
                    evidence=ev + res[True][2]))
        return out

    def _vs_fla(self, data: RunData) -> List[Finding]:
        out: List[Finding] = []
        for op, gated, bar, label in (("linear_fwd", False, 0.9, "forward, ungated"),
                                      ("linear_fwd", True, 0.9, "forward, gated"),
                                      ("linear_fwd_bwd", False, 0.8, "forward+backward, ungated"),
                                      ("linear_fwd_bwd", True, None, "forward+backward, gated")):
            ours = self._linear(data, op, "attention_proto", gated)
            fla_rows = [r for r in data.rows(op=op, impl="fla") if bool(r["extra"].get("gated")) == gated]
            fla = {r["N"]: r for r in fla_rows if r.get("ms_median")}
            ratios = {n: fla[n]["ms_median"] / ours[n]["ms_median"] for n in sorted(set(ours) & set(fla))}
            fid = f"linear-vs-fla-{'fwd' if op == 'linear_fwd' else 'fwd-bwd'}-{_gates(gated)}"
            title = f"Our chunked linear attention against fla-core ({label})"
            why = next((r["extra"].get("unsupported") for r in fla_rows if r["extra"].get("unsupported")), None)
            if not ratios:
                claim = (f"fla-core could not be timed ({label}): {why or 'no fla rows'}"
                         + (f"; ours took {fmt(ours[max(ours)]['ms_median'], 3)} ms at N{max(ours)}" if ours else "")
                         + ".")
                out.append(Finding(id=fid, title=title, claim=claim,
                                   verdict="observation" if bar is None else "inconclusive",
                                   metrics={"fla_unavailable": why},
                                   evidence=[r["id"] for r in fla_rows] + [r["id"] for r in ours.values()]))
                continue
            at_bar = {n: ratios[n] for n in BAR_NS if n in ratios}
            worst = min(at_bar.values()) if at_bar else None
            claim = (f"{label.capitalize()}: ours runs at "
                     + ", ".join(f"{fmt(r)}x at N{n}" for n, r in ratios.items())
                     + f" of fla-core's chunk_simple_gla speed (fla time / our time)"
                     + (f"; the bar is >= {bar}x at N {' and '.join(map(str, BAR_NS))}, lowest there {fmt(worst)}x"
                        if bar else "")
                     + ".")
            out.append(Finding(id=fid, title=title, claim=claim,
                               verdict=speedup_verdict(worst, bar) if bar else "observation",
                               metrics={"ratios": {str(n): r for n, r in ratios.items()}, "bar": bar,
                                        "min_at_bar": worst},
                               evidence=[ours[n]["id"] for n in ratios] + [fla[n]["id"] for n in ratios]))
        return out

    def _chunk_finding(self, data: RunData) -> List[Finding]:
        rows = [r for r in data.rows(impl="attention_proto") if r["op"] in ("linear_fwd", "linear_fwd_bwd")
                and r.get("ms_median") and r["N"] in BAR_NS]
        groups: Dict[Tuple, Dict[int, Dict]] = {}
        for r in rows:
            groups.setdefault((r["op"], bool(r["extra"].get("gated")), r["N"]), {})[r["extra"]["chunk_size"]] = r
        groups = {k: g for k, g in groups.items() if len(g) > 1}
        if not groups:
            return []
        wins: Dict[int, int] = {}
        parts = []
        for (op, gated, N), g in sorted(groups.items()):
            best = min(g, key=lambda c: g[c]["ms_median"])
            wins[best] = wins.get(best, 0) + 1
            second = min((g[c]["ms_median"] for c in g if c != best), default=None)
            parts.append(f"{'fwd' if op == 'linear_fwd' else 'fwd+bwd'} {_gates(gated)} N{N}: C{best}"
                         f" ({fmt(ratio(second, g[best]['ms_median']))}x over the next)")
        top = max(wins, key=wins.get)
        claim = (f"Chunk {top} is fastest in {wins[top]} of {len(groups)} settings of the chunk sweep "
                 f"({'; '.join(parts)}).")
        return [Finding(id="linear-chunk-size", title="The chunk size that wins", claim=claim, verdict="observation",
                        metrics={"wins": {str(c): n for c, n in wins.items()}, "winner": top},
                        evidence=[r["id"] for g in groups.values() for r in g.values()])]

    def _decode_finding(self, data: RunData) -> List[Finding]:
        cp = (data.ceilings or {}).get("copy_gbps")
        out = []
        for r in data.rows(op="linear_decode"):
            if not r.get("gbps"):
                continue
            out.append(Finding(
                id=f"linear-decode-{'inplace' if r['extra'].get('inplace') else 'new-state'}",
                title="Decode step bandwidth against the copy ceiling",
                claim=(f"One gated decode step for B{r['B']}, H{r['H']}, a {r['extra']['K']}x{r['extra']['V']} fp32 "
                       f"state ({r['variant']}) takes {fmt(r['ms_median'] * 1000, 1)} us and moves "
                       f"{fmt(r['gbps'], 0)} GB/s, {pct(ratio(r['gbps'], cp))} of the measured copy ceiling "
                       f"({fmt(cp, 0)} GB/s)."),
                verdict="observation", metrics={"gbps": r["gbps"], "fraction_of_copy": ratio(r["gbps"], cp),
                                                "us": r["ms_median"] * 1000},
                evidence=[r["id"]]))
        return out


# ---- helpers --------------------------------------------------------------------------------

def crossover(points: Sequence[Tuple[int, float, float]]) -> Dict:
    """Where dense/linear time crosses 1: first N from which linear stays faster; log-log interpolation.

    ``points``: (N, linear ms, dense ms) sorted by N. status: "between", "below" (linear
    already faster at the smallest N), "above" (never faster), "none" (no data).
    """
    pts = sorted(points)
    if not pts:
        return {"estimate": None, "lo": None, "hi": None, "status": "none"}
    r = [d / lin for _, lin, d in pts]
    i = len(pts)
    while i > 0 and r[i - 1] >= 1.0:
        i -= 1
    if i == len(pts):
        return {"estimate": None, "lo": pts[-1][0], "hi": None, "status": "above"}
    if i == 0:
        return {"estimate": None, "lo": None, "hi": pts[0][0], "status": "below"}
    (na, ra), (nb, rb) = (pts[i - 1][0], r[i - 1]), (pts[i][0], r[i])
    la, lb = math.log(max(ra, 1e-12)), math.log(max(rb, 1e-12))
    t = (0.0 - la) / (lb - la) if lb != la else 1.0
    est = math.exp(math.log(na) + t * (math.log(nb) - math.log(na)))
    return {"estimate": est, "lo": na, "hi": nb, "status": "between"}


def _xtxt(x: Dict) -> str:
    if x["status"] == "between":
        return f"at N ~ {fmt(x['estimate'], 0)} (between N{x['lo']} and N{x['hi']})"
    if x["status"] == "below":
        return f"already at the smallest N measured (N{x['hi']})"
    if x["status"] == "above":
        return f"nowhere up to N{x['lo']}"
    return "n/a"


def _inputs(B: int, N: int, gated: bool, grad: bool = False):
    q, k, v = (torch.randn(B, N, H, D, device=DEVICE, dtype=DTYPE, requires_grad=grad) for _ in range(3))
    g = None
    if gated:
        g = torch.nn.functional.logsigmoid(torch.randn(B, N, H, device=DEVICE) + 3.0)
        g.requires_grad_(grad)
    return q, k, v, g


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _linear_peer(call, q, k, v, g, backward: bool):
    """(fn, None) or (None, reason): ``call(q, k, v, g) -> o`` timed forward or forward+backward."""
    inputs = tuple(t for t in (q, k, v, g) if t is not None)
    return peers._maybe_backward(lambda: call(q, k, v, g), inputs, backward)


@contextlib.contextmanager
def _dqk_form(dst: int):
    """Run with chunk_dqk's DST form set (1: the fallback dk product), then restore the configs."""
    import os

    from ..ops.linear import common

    if not dst:
        yield
        return
    old = os.environ.get("ATTENTION_PROTO_LINEAR_CONFIG")
    cfg = json.loads(old) if old else {}
    cfg.setdefault("chunk_dqk", {})["DST"] = dst
    os.environ["ATTENTION_PROTO_LINEAR_CONFIG"] = json.dumps(cfg)
    common._overrides.cache_clear()
    common._CHOSEN.clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ATTENTION_PROTO_LINEAR_CONFIG", None)
        else:
            os.environ["ATTENTION_PROTO_LINEAR_CONFIG"] = old
        common._overrides.cache_clear()
        common._CHOSEN.clear()


def _configs(C: int) -> Dict:
    """Kernel configs in use at chunk C (defaults, ATTENTION_PROTO_LINEAR_CONFIG, or tuned)."""
    from ..ops.linear.common import config_report, tuning

    rep = {k: v for k, v in config_report().items() if k.endswith(f"@{C}")}
    return {"tuned": tuning(), **rep}


def _fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001 - not installed is a recorded fact
        return None, f"fla-core unavailable: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return chunk_simple_gla, None


def _fla_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("fla-core")
    except Exception:  # noqa: BLE001
        return None


STUDY = LinearStudy()
