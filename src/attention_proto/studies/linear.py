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

Time budget on an H100: full <= 200 s, quick <= 60 s; measure() logs each part's seconds.
Estimates, quick / full (kernel times from ~700 TFLOPS bf16 and ~3 TB/s; compile times
cross-compiled for sm_90 on a 2-core CPU):
- prewarm ~30 / ~34 s. Compiles dominate the run. fla-core autotunes once per kernel key (its
  keys: BT, K, V, the gates and the argument dtypes, never N), 48 configs for each of chunk_h
  (ungated, gated, fp32 states in its backward) and chunk_dh: ~214 compiles of 0.4-1.2 s. Its
  gated backward is refused up front (Triton < 3.7.1 on Hopper, #640): we ask fla's own check
  (_fla_gated_bwd_refusal) instead of tuning two more keys (96 compiles) just to see it raise.
  Ours ~35-40 kernels, the dense peers ~10-30. Triton compiles hold the GIL (threads do not
  overlap them), so worker processes make every compile once at toy sizes and fill Triton's
  disk cache: ~8 s to start, then ~20 fla candidates and 1-3 jobs per worker (12 workers);
- first calls of ours (disk-cache loads) ~2 s; gradient checks (3 / 5, float64 references on
  the GPU, ~4 GFLOP a case) ~2 / ~3 s;
- fla-core autotune at B*N = 32k, N = FLA_TUNE_N, FLA_TUNE_BENCH per candidate: 214 x ~50 ms = ~11 s;
- N parts: 7 linear benches (0.4-1.5 ms kernels, ~55 ms each at BENCH), 4 dense benches (causal
  forward 0.3 ms at N 1k to 18 ms at 64k, fwd+bwd ~4.5x that; 10 runs each past 30 ms) and
  cuDNN plan builds: ~6 s for 1k/4k/16k, ~17 s for 512..64k;
- chunk sweep (6 / 16 benches) ~0.5 / ~1.2 s; decode (2 benches) ~0.2 s.
Total ~52 s quick, ~69 s full (before: 282 s quick, measured; ~250 s of it fla's in-process
autotune of 6 keys at Triton's 25/100 ms benchmark). Without the prewarm (ATTENTION_PROTO_PREWARM=0,
or failing workers) the compiles run in-process: ~+150 s.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..runtime.timing import attention_flops
from . import linear_varlen, peers
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
BENCH = dict(warmup_ms=5.0, rep_ms=30.0)   # ~20-75 samples of the 0.3-1.5 ms kernels timed here
FLA_TUNE_N = 4096          # fla-core autotunes on its first call per key: at a bar length
FLA_TUNE_BENCH = dict(warmup=5, rep=20)    # ms per fla autotune candidate (Triton's default: 25/100)
PREWARM_ENV = "ATTENTION_PROTO_PREWARM"    # "0": no worker processes, compile in-process
PREWARM_WORKERS = 12
PREWARM_TIMEOUT_S = 60.0      # a killed worker keeps what it compiled (disk cache)


def linear_flops(B: int, N: int, Hh: int, K: int, V: int, C: int, mode: str) -> float:
    per = 4 * K * V + 2 * C * (K + V) if mode == "fwd" else 12 * K * V + 2 * C * (4 * K + 3 * V)
    return float(B * N * Hh * per)


def _gates(g: bool) -> str:
    return "gated" if g else "ungated"


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


# ---- correctness (both modes) ---------------------------------------------------------------

def _ours(C: int, mode: str = "chunk", cu_t=None):
    """Ours as fn(q, k, v, g, s0) -> (o, final state)."""
    from ..ops.linear import linear_attention

    return lambda q, k, v, g, s0: linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True,
                                                   chunk_size=C, cu_seqlens=cu_t, mode=mode)


def _loss_run(fn, ins, do, dht, backward: bool) -> List[torch.Tensor]:
    """[o, final] of fn(*ins), then the inputs' gradients of sum(o * do) + sum(final * dht) when ``backward``."""
    ins = [None if x is None else x.detach().clone().requires_grad_(backward) for x in ins]
    with torch.set_grad_enabled(backward):
        o, ht = fn(*ins)
        if backward:
            ((o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()).backward()
    outs = [o.detach(), ht.detach()]
    if backward:
        outs += [x.grad for x in ins if x is not None]
    return outs


def _check_inputs(dtype, B, N, Hh, K, V, gated, dev, cu=None):
    from ..ops.linear.reference import random_inputs

    gen = torch.Generator(device=dev).manual_seed(N * 31 + K)
    ns = B if cu is None else len(cu) - 1
    inputs = list(random_inputs(B, N, Hh, K, V, dtype, dev, gated=gated, h0=True, generator=gen, num_seqs=ns))
    do = torch.randn(B, N, Hh, V, generator=gen, device=dev).to(dtype)
    dht = torch.randn(ns, Hh, K, V, generator=gen, device=dev)
    return inputs, do, dht


def _check(ctx: StudyContext, *, dtype, B, N, Hh, K, V, gated, C, mode="chunk", cu=None, backward=False,
           op="linear_fwd", variant="", dst=None):
    """One check of ours against float64 (error rule; factor 3 for gradients); records a row."""
    from ..ops.linear.reference import linear_attention_parallel
    from ..testing import check_error

    inputs, do, dht = _check_inputs(dtype, B, N, Hh, K, V, gated, ctx.device, cu)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=ctx.device)

    def ref(cd):
        return lambda q, k, v, g, s0: linear_attention_parallel(q, k, v, g, None, s0, True, cu_t, compute_dtype=cd)

    a = _loss_run(_ours(C, mode, cu_t), inputs, do, dht, backward)
    r = _loss_run(ref(torch.float64), [None if x is None else x.double() for x in inputs], do, dht, backward)
    lo = _loss_run(ref(dtype), inputs, do, dht, backward)
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
        plan = _plan(ctx.quick)
        clock = _Clock(ctx)
        bar = ctx.progress(len(plan.ns) + len(plan.sweep_ns) + 5, "linear")
        fla, fla_why = _fla()
        refusal = _fla_gated_bwd_refusal() if fla is not None else None
        with ctx.guard("prewarm"):
            _prewarm(ctx, plan, fla is not None, refusal is None)
        clock.part("prewarm")
        bar.update(1, "prewarm")
        with ctx.guard("compile"):
            for job in _our_jobs(plan):
                _run_job(job)
        clock.part(f"first calls of ours ({len(plan.variants)} timed variants)")
        bar.update(1, "compile")
        self._gpu_checks(ctx, plan.checks)
        clock.part(f"gradient checks ({len(plan.checks)})")
        bar.update(1, "gradient checks")
        fla_info: Dict = {}
        with ctx.guard("fla autotune"):
            fla_info = self._fla_tune(ctx, fla, refusal)
        clock.part("fla-core autotune")
        bar.update(1, "fla autotune")
        for N in plan.ns:
            with ctx.guard(f"N{N}"):
                self._one_length(ctx, N, fla, fla_why, refusal, fla_info)
            clock.part(f"N{N}: linear, fla, dense")
            bar.update(1, f"N{N}")
            _empty_cache()
        for N in plan.sweep_ns:
            with ctx.guard(f"chunk sweep N{N}"):
                self._chunk_sweep(ctx, N, plan.sweep_chunks, quick=ctx.quick)
            clock.part(f"chunk sweep N{N}")
            bar.update(1, f"sweep N{N}")
        with ctx.guard("decode"):
            self._decode(ctx)
        clock.part("decode")
        bar.update(1, "decode")
        linear_varlen.measure(ctx, fla)
        clock.part("packed sequences")

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

    def _gpu_checks(self, ctx: StudyContext, cases: Sequence[Tuple[bool, int, int]]) -> None:
        """bf16 fwd+bwd against float64 at the sweep's head shape (H16, K = V = 128: the kernels compiled for
        the sweep, H and K being constexprs; the dq/dk kernel runs 64-wide K tiles, the width fla #640
        miscompiles). The references run on the GPU (float64 there: ~4 GFLOP a case). K = 64 heads and
        other shapes are in tests/test_linear_gpu.py."""
        for gated, C, dst in cases:
            with ctx.guard(f"gradient check {_gates(gated)} C{C} DST{dst}"), _dqk_form(dst):
                _check(ctx, dtype=DTYPE, B=1, N=CHECK_N, Hh=H, K=D, V=D, gated=gated, C=C, backward=True,
                       op="linear_grad_check", variant=f"bf16 K{D} {_gates(gated)} C{C} DST{dst}", dst=dst)

    def _fla_tune(self, ctx: StudyContext, fla, refusal: Optional[str]) -> Dict:
        """fla-core's first calls, where it autotunes (once per kernel key: its keys are BT, K, V, the gates
        and the argument dtypes, never N), at B*N = TOKENS, N = FLA_TUNE_N, with a shorter benchmark per
        candidate; returns what its rows record about that (configs chosen, seconds)."""
        if fla is None:
            return {}
        from triton.testing import do_bench

        tuners = _fla_autotuners()
        mine = [at for at in tuners if "do_bench" not in vars(at)]
        for at in mine:   # Autotuner.do_bench is a cached_property: an instance attribute overrides it
            vars(at)["do_bench"] = functools.partial(do_bench, **FLA_TUNE_BENCH)
        t0 = time.perf_counter()
        B, N = max(1, TOKENS // FLA_TUNE_N), FLA_TUNE_N
        try:
            for gated in (False, True):
                q, k, v, g = _inputs(B, N, gated)
                for backward in (False, True):
                    if not (backward and gated and refusal):
                        _linear_peer(lambda q, k, v, g: fla(q, k, v, g=g)[0], q, k, v, g, backward)
                del q, k, v, g
            _sync()
        finally:
            for at in mine:
                vars(at).pop("do_bench", None)
        chosen: Dict[str, Dict[str, str]] = {}   # kernel -> autotune key -> config
        for at in tuners:
            for key, cfg in getattr(at, "cache", {}).items():
                chosen.setdefault(getattr(getattr(at, "base_fn", None), "__name__", "?"), {})[str(key)] = str(cfg)
        info = {"fla_tune_s": round(time.perf_counter() - t0, 2), "fla_tuned_at": f"B{B} N{N}",
                "fla_tune_bench_ms": [FLA_TUNE_BENCH["warmup"], FLA_TUNE_BENCH["rep"]], "fla_configs": chosen}
        ctx.log(f"fla-core tuned {sum(map(len, chosen.values()))} kernel keys at B{B} N{N}: "
                + "; ".join(f"{k} {list(v.values())}" for k, v in chosen.items())[:600])
        return info

    def _one_length(self, ctx: StudyContext, N: int, fla, fla_why: Optional[str], refusal: Optional[str] = None,
                    fla_info: Optional[Dict] = None) -> None:
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
                    if fla is not None and backward and gated and refusal:
                        why = refusal   # fla's own up-front refusal (#640), asked without running its kernels
                    elif fla is not None:
                        t0 = time.perf_counter()
                        fn, why = _linear_peer(lambda q, k, v, g: fla(q, k, v, g=g)[0], q, k, v, g, backward)
                        first = time.perf_counter() - t0
                        t = ctx.bench(fn, **BENCH) if fn else None
                    ctx.record(op=op, impl="fla", variant=f"chunk_simple_gla {_gates(gated)}", mods=mods, B=B, H=H,
                               N=N, D=D, dtype="bfloat16", causal=True, timing=t, flops=flops,
                               extra={"chunk_size": 64, "gated": gated, "K": D, "V": D, "first_call_s": first,
                                      "fla_version": _fla_version(), **(fla_info or {}),
                                      **({"unsupported": why} if why else {})})
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
                for backward in _sweep_modes(quick, gated):
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
        q, k, v, g, state = _decode_inputs()
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
        for fn in (self._gated_bwd_finding, self._crossovers, self._vs_fla, self._chunk_finding, self._decode_finding,
                   linear_varlen.analyze):
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


class _Plan(NamedTuple):
    ns: Tuple[int, ...]                       # lengths of the main sweep
    sweep_ns: Tuple[int, ...]                 # lengths of the chunk sweep
    sweep_chunks: Tuple[int, ...]
    checks: List[Tuple[bool, int, int]]       # gradient checks: (gated, chunk, DST form of dk)
    variants: List[Tuple[int, bool, bool]]    # every (chunk, gated, backward) of ours that is timed


def _sweep_modes(quick: bool, gated: bool) -> Tuple[bool, ...]:
    return (False,) if quick and gated else (False, True)


def _plan(quick: bool) -> _Plan:
    sweep_chunks = tuple(c for c in CHUNKS if c != DEFAULT_CHUNK)
    checks = [(False, 64, 0), (True, 64, 0), (True, 64, 1)]   # DST 1: the fallback form of dk
    if not quick:
        checks += [(True, 32, 0), (True, 128, 0)]
    variants = [(DEFAULT_CHUNK, gt, bw) for gt in (False, True) for bw in (False, True)]
    variants += [(C, gt, bw) for C in sweep_chunks for gt in (False, True) for bw in _sweep_modes(quick, gt)]
    return _Plan(NS_QUICK if quick else NS_FULL, BAR_NS[:1] if quick else BAR_NS, sweep_chunks, checks, variants)


class _Clock:
    """Logs the seconds of each part of measure() and the running total (the study has a time budget)."""

    def __init__(self, ctx: StudyContext) -> None:
        self.ctx, self.t0 = ctx, time.perf_counter()
        self.t = self.t0

    def part(self, label: str) -> None:
        now = time.perf_counter()
        self.ctx.log(f"{label}: {now - self.t:.1f} s (total {now - self.t0:.1f} s)")
        self.t = now


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _inputs(B: int, N: int, gated: bool, grad: bool = False):
    q, k, v = (torch.randn(B, N, H, D, device=DEVICE, dtype=DTYPE, requires_grad=grad) for _ in range(3))
    g = None
    if gated:
        g = torch.nn.functional.logsigmoid(torch.randn(B, N, H, device=DEVICE) + 3.0)
        g.requires_grad_(grad)
    return q, k, v, g


def _decode_inputs():
    B, K, V = DECODE_B, D, D
    q, k = (torch.randn(B, H, K, device=DEVICE, dtype=DTYPE) for _ in range(2))
    v = torch.randn(B, H, V, device=DEVICE, dtype=DTYPE)
    g = torch.nn.functional.logsigmoid(torch.randn(B, H, device=DEVICE) + 3.0)
    state = torch.randn(B, H, K, V, device=DEVICE, dtype=torch.float32)
    return q, k, v, g, state


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


def _fla_gated_bwd_refusal() -> Optional[str]:
    """fla-core's own refusal of its gated backward (#640: Hopper with Triton 3.4 to 3.7.0), or None.

    fla checks this first thing in chunk_bwd_dqkwg, after its backward has already autotuned two
    state kernels (96 compiles) for nothing; asking the check directly costs no kernel: the probe's
    1-element inputs fail on their shapes wherever fla lets them through.
    """
    try:
        from fla.ops.common.chunk_o import chunk_bwd_dqkwg
    except Exception:  # noqa: BLE001 - no fla, or another layout of it: no up-front answer
        return None
    x = torch.ones(1, device=DEVICE)
    try:
        chunk_bwd_dqkwg(q=x, k=x, v=x, do=x, h=x, dh=x, g=x)
    except RuntimeError as e:
        if "640" in str(e):
            return _why(e)
    except Exception:  # noqa: BLE001 - the shapes: fla did not refuse
        pass
    return None


def _fla_autotuners() -> list:
    """Every Triton Autotuner in fla-core's loaded op modules (also behind triton.heuristics wrappers)."""
    import sys

    from triton.runtime.autotuner import Autotuner

    found = {}
    for name, mod in list(sys.modules.items()):
        if not name.startswith("fla.ops") or mod is None:
            continue
        for obj in list(vars(mod).values()):
            for _ in range(4):
                if isinstance(obj, Autotuner):
                    found[id(obj)] = obj
                try:
                    obj = getattr(obj, "fn", None)
                except Exception:  # noqa: BLE001 - odd module attributes
                    obj = None
                if obj is None:
                    break
    return list(found.values())


# ---- compile prewarm in worker processes --------------------------------------------------------
# Triton compiles hold the GIL (two threads compile 48 fla configs no faster than one), and this
# study compiles ~250 kernels, most of them fla-core's autotune candidates. Worker processes make
# every compile once at toy sizes, with the constexprs and dtypes of the real calls (N is not
# specialized: T is do_not_specialize in every linear kernel, ours and fla's; the dense peers run
# at the study's shapes), which fills Triton's disk cache; the study's own first calls and fla's
# autotune in this process then load binaries. Nothing is timed in a worker; a worker that fails
# or runs late costs only the in-process compile it would have saved.

def _our_jobs(plan: _Plan) -> List[list]:
    """First calls of every timed variant of ours (a backward call covers the forward's kernels)."""
    return [["ours", C, gt, bw] for C, gt, bw in plan.variants if bw or (C, gt, True) not in plan.variants]


def _jobs(plan: _Plan) -> List[list]:
    return (_our_jobs(plan) + [["check", C, gt, dst] for gt, C, dst in plan.checks]
            + [["dense", N, bw] for N in plan.ns for bw in (False, True)] + [["decode"]])


def _worker_count() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(PREWARM_WORKERS, cpus - 2))


def _prewarm(ctx: StudyContext, plan: _Plan, with_fla: bool, fla_gated_bwd: bool) -> None:
    from ..runtime.device import interpreter_mode

    n = _worker_count()
    if interpreter_mode() or not torch.cuda.is_available() or os.environ.get(PREWARM_ENV, "1") in ("0", "") or n < 2:
        ctx.log(f"prewarm skipped (interpreter, no CUDA, {PREWARM_ENV}=0 or {n} usable cores): compiles in-process")
        return
    jobs = _jobs(plan)
    specs = [{"index": i, "workers": n, "fla": with_fla, "fla_gated_bwd": fla_gated_bwd, "jobs": jobs[i::n]}
             for i in range(n)]
    results = spawn_workers(specs, PREWARM_TIMEOUT_S)
    failed = [f"worker {i}: {r['error']}" for i, r in enumerate(results) if r.get("error")]
    failed += [f"{j[0]}: {j[2]}" for r in results for j in r.get("jobs", []) if j[2]]
    busiest = max((sum(j[1] for j in r.get("jobs", [])) for r in results), default=0.0)
    ctx.log(f"prewarm: {n} worker processes, {len(jobs)} jobs" + (f" + 1/{n} of fla's autotune candidates each"
            if with_fla else "") + f"; busiest worker {busiest:.1f} s of compiles"
            + (f"; {len(failed)} failed: {'; '.join(failed)[:400]}" if failed else ""))


def spawn_workers(specs: List[Dict], timeout_s: float, argv: Optional[List[str]] = None) -> List:
    """Run one new Python process per spec, ``argv + [json(spec)]`` (default: this study's
    ``_prewarm_worker(spec)``; not multiprocessing: a spawned child would re-run ``python -m
    attention_proto``); each prints one ``PREWARM <json>`` line. Returns each one's JSON or
    {"error": ...} (a failed or late process: killed at ``timeout_s``)."""
    import subprocess
    import sys
    import tempfile

    if argv is None:
        code = "import sys; from attention_proto.studies.linear import _prewarm_worker; _prewarm_worker(sys.argv[1])"
        argv = [sys.executable, "-c", code]
    procs, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i, spec in enumerate(specs):
                out, err = (open(os.path.join(tmp, f"{i}.{x}"), "w+") for x in ("out", "err"))
                procs.append((subprocess.Popen(argv + [json.dumps(spec)], stdout=out, stderr=err,
                                               stdin=subprocess.DEVNULL), out, err))
            deadline = time.monotonic() + timeout_s
            for p, out, err in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                out.seek(0)
                err.seek(0)
                line = next((ln for ln in reversed(out.read().splitlines()) if ln.startswith("PREWARM ")), None)
                if p.returncode == 0 and line:
                    results.append(json.loads(line[len("PREWARM "):]))
                else:
                    tail = [ln for ln in err.read().splitlines() if ln.strip()][-1:] or [""]
                    results.append({"error": f"exit {p.returncode}{' (timed out)' if p.returncode == -9 else ''}: "
                                             f"{tail[0][:200]}"})
        finally:
            for p, out, err in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                out.close()
                err.close()
    return results


def _prewarm_worker(spec_json: str) -> None:
    """Worker process: fla's slice of autotune candidates, then the jobs; prints one PREWARM report line."""
    spec = json.loads(spec_json)
    work = ([["fla", spec["index"], spec["workers"], spec["fla_gated_bwd"]]] if spec.get("fla") else []) + spec["jobs"]
    done = []
    for job in work:
        t0, err = time.perf_counter(), None
        try:
            _run_job(job)
        except Exception as e:  # noqa: BLE001 - reported, the study compiles it in-process then
            err = _why(e)
        done.append([" ".join(map(str, job)), round(time.perf_counter() - t0, 2), err])
    print("PREWARM " + json.dumps({"jobs": done}), flush=True)


def _run_job(job: Sequence) -> None:
    """One first call (toy sizes where N is not specialized): compiles what the study will run."""
    from ..ops.linear import linear_attention, linear_attention_step

    kind, args = job[0], list(job[1:])
    if kind == "ours":
        C, gated, backward = args
        q, k, v, g = _inputs(1, 2 * C, gated, grad=backward)
        with torch.set_grad_enabled(backward):
            o, _ = linear_attention(q, k, v, g=g, chunk_size=C)
            if backward:
                o.backward(torch.randn_like(o))
    elif kind == "check":
        C, gated, dst = args
        inputs, do, dht = _check_inputs(DTYPE, 1, 2 * C + 16, H, D, D, gated, DEVICE)
        with _dqk_form(dst):
            _loss_run(_ours(C), inputs, do, dht, True)
    elif kind == "dense":
        N, backward = args
        q, k, v = peers.bhsd(max(1, TOKENS // N), H, N, D, dtype=DTYPE, device=DEVICE)
        fn, why = peers.make_ours(q, k, v, True, backward=backward)
        if fn is None:
            raise RuntimeError(why)
    elif kind == "decode":
        q, k, v, g, state = _decode_inputs()
        for inplace in (False, True):
            linear_attention_step(q, k, v, state, g=g, inplace=inplace)
    elif kind == "fla":
        _fla_compile_slice(*args)
    elif kind != "noop":
        raise ValueError(f"unknown prewarm job {job!r}")
    _sync()


def _compile_only(kernel_call, quantiles=None):
    kernel_call()
    return [1.0, 1.0, 1.0]


def _fla_compile_slice(index: int, workers: int, gated_bwd: bool) -> None:
    """Compile this worker's share of each fla autotuner's candidates (no timing) through fla's own calls."""
    fla, why = _fla()
    if fla is None:
        return
    for at in _fla_autotuners():
        cfgs = list(at.configs)
        # an empty share keeps one config (a duplicate): the call must get through to fla's next kernels
        at.configs = cfgs[index::workers] or cfgs[index % len(cfgs):][:1]
        at.cache_results = False   # its fake timings must not land in Triton's autotune cache
        vars(at)["do_bench"] = _compile_only
    errors = []
    for gated in (False, True):
        for backward in (False, True):
            if backward and gated and not gated_bwd:
                continue
            try:
                q, k, v, g = _inputs(1, 256, gated, grad=backward)
                with torch.set_grad_enabled(backward):
                    o = fla(q, k, v, g=g)[0]
                    if backward:
                        o.backward(torch.randn_like(o))
            except Exception as e:  # noqa: BLE001
                errors.append(f"{_gates(gated)} {'fwd+bwd' if backward else 'fwd'}: {_why(e)}")
    if errors:
        raise RuntimeError("; ".join(errors))


def _fla_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("fla-core")
    except Exception:  # noqa: BLE001
        return None


STUDY = LinearStudy()
