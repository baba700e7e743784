"""Study 4 (`constants`): what specialization costs -- compile time, launch overhead, run-time arguments, warmup.

GPU parts:

1. compile time per variant (forward portable, forward as dispatched (TMA on Hopper), the
   run-time-flag forward, the backward): cold (fresh ``TRITON_CACHE_DIR`` and no compiled kernel in
   the process), from Triton's disk cache (same folder, in-process caches cleared), and an
   in-process hit (a second call);
2. launch overhead of a cache hit at a tiny shape: Triton's own launcher, ``KERNEL_CACHE.launch``,
   ``flash_attention_forward`` and the public ``attention()`` (host wall time per call);
3. the run-time price of run-time arguments: the constexpr forward against the run-time-flag
   forward (IS_CAUSAL, window, softcap, ALiBi as arguments), then with HEAD_DIM a run-time
   argument too (tile width fixed at 128, or 256 for every head dim); D 128 and 64, N 4096, causal;
4. how many variants a model needs (dry runs of ``warmup`` for the Llama-3-8B, Mistral-7B and
   Gemma-2-9B presets, inference and training) and how long warming Llama takes cold and from a
   disk cache, then whether real-traffic lengths after the warmup still compile anything.

Interpreter: correctness of the run-time-flag forward (constexpr and run-time head dim), the variant
counts of the presets (interpreter tile picks), and a tiny warmup.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..runtime.timing import attention_flops, wall_time_per_call
from .base import Finding, RunData, Study, StudyContext, correctness_finding, fmt, median, ratio
from . import peers
from .stitching import _sync, record_check

PRESET_NAMES = ("llama", "mistral", "gemma2")


def _timed(fn: Callable[[], Any], device) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


class ConstantsStudy(Study):
    name = "constants"
    title = "Function constants: compile time, launch overhead, run-time arguments, warmup"
    #: GPU shapes (a CPU test shrinks them to dry-run the GPU path)
    compile_shape = (1, 16, 4096, 128)   # B, H, N, D
    runtime_n = 4096
    runtime_tokens = 16384
    runtime_hd = 2048                   # H * D
    overhead_shape = (1, 8, 128, 64)
    overhead_calls = 2000
    traffic_lens = (1000, 3000, 5000)
    warm_model: Any = "llama"           # a preset name or a ModelAttentionConfig
    warm_options: Dict[str, Any] = {}   # WarmupOptions overrides for the timed warmup
    plan_max_seq_len: Optional[int] = None
    dtype = torch.bfloat16
    device = "cuda"

    def measure(self, ctx: StudyContext) -> None:
        if not ctx.timing:
            self._interpreter(ctx)
            return
        parts = [("compile times", self._compile_times), ("launch overhead", self._launch_overhead),
                 ("run-time arguments", self._runtime_args),
                 ("model variants", lambda c: self._model_variants(c, self.plan_max_seq_len)),
                 ("warmup", self._warmup)]
        bar = ctx.progress(len(parts), "constants")
        for what, part in parts:
            with ctx.guard(what):
                part(ctx)
            bar.update(1, what)

    # ------------------------------------------------------------------ interpreter
    def _interpreter(self, ctx: StudyContext) -> None:
        from ..ops.dense.configs import FwdConfig
        from ..ops.dense.forward import flash_attention_forward
        from ..ops.dense.forward_runtime import flash_attention_forward_runtime
        from ..warmup import ModelAttentionConfig, warmup

        cfg = FwdConfig(16, 16, 4, 1, "portable")
        g = torch.Generator().manual_seed(4)
        q = torch.randn(1, 2, 19, 40, generator=g).half()
        k = torch.randn(1, 1, 27, 40, generator=g).half()
        v = torch.randn(1, 1, 27, 40, generator=g).half()
        for causal in (False, True):
            for kind, fn in (("constexpr", lambda: flash_attention_forward(q, k, v, causal=causal, config=cfg)),
                             ("runtime_flags", lambda: flash_attention_forward_runtime(q, k, v, causal=causal, config=cfg)),
                             ("runtime_flags+D", lambda: flash_attention_forward_runtime(
                                 q, k, v, causal=causal, config=cfg, runtime_head_dim=True, max_block_d=64))):
                with ctx.guard(f"correctness {kind} causal={causal}"):
                    out, _ = fn()
                    record_check(ctx, out, q, k, v, {}, op="attn_fwd", impl="attention_proto",
                                 variant=f"{kind} D40", mods=[], causal=causal, extra={"kind": kind})
        self._model_variants(ctx, max_seq_len=1024)
        with ctx.guard("tiny warmup"):
            tiny = ModelAttentionConfig("tiny", head_dim=32, num_heads=4, num_kv_heads=2, window=8, softcap=20.0)
            rep = warmup(tiny, seq_lens=(17,))
            ctx.record(op="warmup", impl="attention_proto", variant="tiny interpreter", H=4, Hkv=2, D=32,
                       dtype=rep.dtype, extra={"ok": not rep.errors, "errors": rep.errors, "variants": rep.num_variants,
                                               "seconds": rep.seconds, "mode": rep.mode, "check": "warmup runs"})

    # ------------------------------------------------------------------ 1. compile times
    def _variants(self, ctx) -> List[Tuple[str, Callable[[], Any]]]:
        from ..ops.dense.backward import flash_attention_backward
        from ..ops.dense.configs import pick_forward_config
        from ..ops.dense.forward import flash_attention_forward
        from ..ops.dense.forward_runtime import flash_attention_forward_runtime

        b, h, n, d = self.compile_shape
        q, k, v = peers.bhsd(b, h, n, d, dtype=self.dtype, device=self.device, seed=4)
        cfg = pick_forward_config(d, self.dtype, True, n, "portable")
        o, lse = flash_attention_forward(q, k, v, causal=True, config=cfg)
        do = torch.randn_like(o)
        return [
            ("fwd portable", lambda: flash_attention_forward(q, k, v, causal=True, config=cfg)),
            ("fwd dispatched", lambda: flash_attention_forward(q, k, v, causal=True)),
            ("fwd runtime flags", lambda: flash_attention_forward_runtime(q, k, v, causal=True, config=cfg)),
            ("bwd", lambda: flash_attention_backward(do, q, k, v, o, lse, causal=True, deterministic=False)),
        ]

    def _compile_times(self, ctx: StudyContext) -> None:
        from ..runtime.cache import KERNEL_CACHE
        from ..warmup import reset_compiled_kernels, triton_binaries, triton_cache_dir

        variants = self._variants(ctx)
        b, h, n, d = self.compile_shape
        res: Dict[str, Dict[str, Any]] = {label: {} for label, _ in variants}
        with triton_cache_dir(tempfile.mkdtemp(prefix="ap-constants-")):
            for phase in ("cold", "disk"):
                reset_compiled_kernels()
                for label, fn in variants:
                    c0, b0 = KERNEL_CACHE.stats.compile_seconds, triton_binaries()
                    res[label][f"{phase}_s"] = _timed(fn, self.device)
                    res[label][f"{phase}_kernel_cache_s"] = KERNEL_CACHE.stats.compile_seconds - c0
                    res[label]["binaries"] = triton_binaries() - b0
            for label, fn in variants:
                res[label]["hit_s"] = statistics.median(_timed(fn, self.device) for _ in range(5))
        for label, _ in variants:
            ctx.record(op="compile", impl="attention_proto", variant=label, B=b, H=h, N=n, D=d,
                       dtype=str(self.dtype).replace("torch.", ""), causal=True, extra=res[label])

    # ------------------------------------------------------------------ 2. launch overhead
    def _launch_overhead(self, ctx: StudyContext) -> None:
        from ..ops.dense.forward import flash_attention_forward
        from ..ops.dense.interface import attention
        from ..runtime.cache import KERNEL_CACHE

        b, h, n, d = self.overhead_shape
        q, k, v = peers.bhsd(b, h, n, d, dtype=self.dtype, device=self.device, seed=5)
        flash_attention_forward(q, k, v, causal=True)
        captured: List[Tuple[Any, Any, tuple, dict]] = []
        orig = KERNEL_CACHE.launch

        def grab(kernel, grid, *args, **kw):
            captured.append((kernel, grid, args, kw))
            return orig(kernel, grid, *args, **kw)

        KERNEL_CACHE.launch = grab
        try:
            flash_attention_forward(q, k, v, causal=True)
        finally:
            KERNEL_CACHE.__dict__.pop("launch", None)
        kernel, grid, args, kw = captured[-1]
        sync = (lambda: _sync(self.device))
        layers = [
            ("triton launcher", lambda: kernel[grid](*args, **kw)),
            ("KERNEL_CACHE.launch", lambda: KERNEL_CACHE.launch(kernel, grid, *args, **kw)),
            ("flash_attention_forward", lambda: flash_attention_forward(q, k, v, causal=True)),
            ("attention()", lambda: attention(q, k, v, causal=True)),
        ]
        if hasattr(KERNEL_CACHE, "direct"):  # the compiled kernel's own launcher, without Triton's binding
            dl = KERNEL_CACHE.direct(kernel, KERNEL_CACHE.launch(kernel, grid, *args, **kw), args, kw)
            if dl is not None:
                layers.insert(0, ("direct launch", lambda: dl(grid, args)))
        for label, fn in layers:
            with ctx.guard(f"launch overhead {label}"):
                us = wall_time_per_call(fn, calls=self.overhead_calls, sync=sync)
                ctx.record(op="launch_overhead", impl="attention_proto", variant=label, B=b, H=h, N=n, D=d,
                           dtype=str(self.dtype).replace("torch.", ""), causal=True,
                           extra={"us_per_call": us, "kernel": getattr(kernel, "__name__", "?")})

    # ------------------------------------------------------------------ 3. run-time arguments
    def _runtime_args(self, ctx: StudyContext) -> None:
        from ..ops.dense.configs import pick_forward_config
        from ..ops.dense.forward import flash_attention_forward
        from ..ops.dense.forward_runtime import flash_attention_forward_runtime

        n = self.runtime_n
        bsz = max(1, self.runtime_tokens // n)
        plan: List[Tuple[int, bool, str]] = []
        for d in (128, 64):
            for kind in ("constexpr", "runtime_flags", "runtime_flags+D"):
                plan.append((d, True, kind))
        if not ctx.quick:
            plan += [(128, True, "runtime_flags+D256"), (128, False, "constexpr"), (128, False, "runtime_flags")]
        for d, causal, kind in plan:
            with ctx.guard(f"runtime args {kind} D{d} causal={causal}"):
                h = max(1, self.runtime_hd // d)
                q, k, v = peers.bhsd(bsz, h, n, d, dtype=self.dtype, device=self.device, seed=6)
                bd = {"runtime_flags+D": 128, "runtime_flags+D256": 256}.get(kind, d)
                cfg = pick_forward_config(bd, self.dtype, causal, n, "portable")
                if kind == "constexpr":
                    fn = lambda: flash_attention_forward(q, k, v, causal=causal, config=cfg)  # noqa: E731
                elif kind == "runtime_flags":
                    fn = lambda: flash_attention_forward_runtime(q, k, v, causal=causal, config=cfg)  # noqa: E731
                else:
                    fn = lambda: flash_attention_forward_runtime(q, k, v, causal=causal, config=cfg,  # noqa: E731
                                                                 runtime_head_dim=True, max_block_d=bd)
                fn()
                t = ctx.bench(fn)
                ctx.record(op="attn_fwd", impl="attention_proto", variant=f"{kind} D{d}", B=bsz, H=h, N=n, D=d,
                           dtype=str(self.dtype).replace("torch.", ""), causal=causal, timing=t,
                           flops=attention_flops(bsz, h, n, n, d, causal),
                           extra={"kind": kind, "block_d": bd, "config": cfg.as_dict()})

    # ------------------------------------------------------------------ 4. variants per model, warmup
    def _model_variants(self, ctx: StudyContext, max_seq_len: Optional[int] = None) -> None:
        from ..warmup import PRESETS, warmup

        for m in PRESET_NAMES:
            for train in (False, True):
                with ctx.guard(f"variant plan {m} train={train}"):
                    rep = warmup(m, dry_run=True, train=train, max_seq_len=max_seq_len, dtype=self.dtype)
                    cfg = PRESETS[m]
                    ctx.record(op="warmup_plan", impl="attention_proto", variant=f"{m} {'train' if train else 'inference'}",
                               H=cfg.num_heads, Hkv=cfg.num_kv_heads, D=cfg.head_dim, dtype=rep.dtype,
                               extra={"model": cfg.name, "train": train, "variants": rep.num_variants,
                                      "by_kernel": rep.by_kernel(), "calls": len(rep.calls), "errors": rep.errors,
                                      "max_seq_len": max_seq_len})

    def _warmup(self, ctx: StudyContext) -> None:
        from ..ops.dense.interface import attention
        from ..runtime.cache import KERNEL_CACHE
        from ..warmup import PRESETS, reset_compiled_kernels, triton_binaries, triton_cache_dir, warmup

        cfg = PRESETS[self.warm_model] if isinstance(self.warm_model, str) else self.warm_model
        name = self.warm_model if isinstance(self.warm_model, str) else cfg.name
        kw: Dict[str, Any] = dict(dtype=self.dtype, threads=8)  # as the CLI runs it: compiles overlap
        if ctx.quick:
            kw.update(max_seq_len=1024, ragged=False, varlen=False)
        kw.update(self.warm_options)
        with triton_cache_dir(tempfile.mkdtemp(prefix="ap-warmup-")):
            reports = {}
            for phase in ("cold", "disk"):
                reset_compiled_kernels()
                rep = warmup(cfg, **kw)
                reports[phase] = rep
                ctx.record(op="warmup", impl="attention_proto", variant=f"{name} inference {phase}",
                           H=cfg.num_heads, Hkv=cfg.num_kv_heads, D=cfg.head_dim, dtype=rep.dtype,
                           extra={"phase": phase, "model": cfg.name, "seconds": rep.seconds,
                                  "compile_seconds": rep.compile_seconds, "variants": rep.num_variants,
                                  "binaries": rep.binaries, "calls": len(rep.calls), "errors": rep.errors,
                                  "by_kernel": rep.by_kernel(),
                                  "slowest_calls": sorted(([c.label, c.seconds] for c in rep.calls),
                                                          key=lambda x: -x[1])[:5]})
            # real-traffic lengths (not the warmup's buckets) after the warmup
            lens = self.traffic_lens[:2] if ctx.quick else self.traffic_lens
            for n in lens:
                for label, nq in ((f"prefill N{n}", n), (f"dense decode Nk{n + 1}", 1)):
                    with ctx.guard(f"traffic {label}"):
                        nk = n if nq == n else n + 1
                        q = torch.randn(1, cfg.num_heads, nq, cfg.head_dim, device=self.device, dtype=self.dtype)
                        k = torch.randn(1, cfg.num_kv_heads, nk, cfg.head_dim, device=self.device, dtype=self.dtype)
                        v = torch.randn_like(k)
                        m0, b0 = KERNEL_CACHE.stats.misses, triton_binaries()
                        s = _timed(lambda: attention(q, k, v, causal=True), self.device)
                        ctx.record(op="traffic_after_warmup", impl="attention_proto", variant=label, B=1,
                                   H=cfg.num_heads, Hkv=cfg.num_kv_heads, N=nq, Nk=nk, D=cfg.head_dim,
                                   dtype=str(self.dtype).replace("torch.", ""), causal=True,
                                   extra={"seconds": s, "new_variants": KERNEL_CACHE.stats.misses - m0,
                                          "new_binaries": triton_binaries() - b0, "model": cfg.name})

    # ------------------------------------------------------------------ analysis
    def analyze(self, data: RunData) -> List[Finding]:
        out: List[Finding] = []
        if data.mode != "gpu":
            f = correctness_finding(self.name, data, "attn_fwd")
            if f:
                out.append(f)
            for fn in (self._f_model_variants, self._f_tiny_warmup):
                f = fn(data)
                if f:
                    out.append(f)
            return out
        for fn in (self._f_compile, self._f_overhead, self._f_runtime_args, self._f_block_sizes,
                   self._f_model_variants, self._f_warmup):
            f = fn(data)
            if f:
                out.append(f)
        return out

    def _f_compile(self, data: RunData) -> Optional[Finding]:
        rows = [r for r in data.rows(op="compile", study=self.name) if r["extra"].get("cold_s") is not None]
        if not rows:
            return None
        cold = [r["extra"]["cold_s"] for r in rows]
        disk = [r["extra"].get("disk_s") for r in rows if r["extra"].get("disk_s")]
        hit = [r["extra"].get("hit_s") for r in rows if r["extra"].get("hit_s")]
        per = "; ".join(f"{r['variant']}: {fmt(r['extra']['cold_s'], 1)} s cold, "
                        f"{fmt(r['extra'].get('disk_s'), 2)} s from disk, "
                        f"{fmt((r['extra'].get('hit_s') or 0) * 1e3, 2)} ms in process" for r in rows)
        speed = [r["extra"]["cold_s"] / r["extra"]["disk_s"] for r in rows if r["extra"].get("disk_s")]
        return Finding(
            id="constants-compile-time", title="Compile time per variant: cold, Triton disk cache, in-process cache",
            claim=(f"A cold compile of one variant takes {fmt(min(cold), 1)} to {fmt(max(cold), 1)} s; loading it from "
                   f"Triton's disk cache {fmt(min(disk) if disk else None, 2)} to {fmt(max(disk) if disk else None, 2)} s "
                   f"({fmt(min(speed) if speed else None, 0)}x to {fmt(max(speed) if speed else None, 0)}x faster); an "
                   f"in-process hit is a plain launch ({fmt(median(hit) * 1e3 if hit else None, 2)} ms median, kernel "
                   f"time included). Per variant: {per}."),
            verdict="observation",
            metrics={"cold_s": {r["variant"]: r["extra"]["cold_s"] for r in rows},
                     "disk_s": {r["variant"]: r["extra"].get("disk_s") for r in rows},
                     "hit_s": {r["variant"]: r["extra"].get("hit_s") for r in rows}},
            evidence=[r["id"] for r in rows])

    def _f_overhead(self, data: RunData) -> Optional[Finding]:
        rows = {r["variant"]: r for r in data.rows(op="launch_overhead", study=self.name)}
        if "triton launcher" not in rows:
            return None
        us = {k: r["extra"]["us_per_call"] for k, r in rows.items()}
        kc = us.get("KERNEL_CACHE.launch")
        r0 = rows["triton launcher"]
        return Finding(
            id="constants-launch-overhead", title="Launch overhead of a cache hit",
            claim=(f"At B{r0['B']} H{r0['H']} N{r0['N']} D{r0['D']}, a cache-hit call costs "
                   + ", ".join(f"{k} {fmt(v, 1)} us" for k, v in us.items())
                   + f" of host time; our kernel cache adds {fmt(kc - us['triton launcher'] if kc else None, 1)} us to "
                     f"Triton's own launcher."),
            verdict="observation", metrics={"us_per_call": us},
            evidence=[r["id"] for r in rows.values()])

    def _rt(self, data: RunData) -> Dict[Tuple[str, int, bool], Dict[str, Any]]:
        return {(r["extra"]["kind"], r["D"], bool(r["causal"])): r
                for r in data.rows(op="attn_fwd", study=self.name) if r["extra"].get("kind") and r["ms_median"]}

    def _f_runtime_args(self, data: RunData) -> Optional[Finding]:
        rt = self._rt(data)
        parts, metrics, ev = [], {}, []
        for (kind, d, causal), r in sorted(rt.items(), key=lambda x: (-x[0][1], not x[0][2], x[0][0])):
            base = rt.get(("constexpr", d, causal))
            if kind == "constexpr" or not base:
                continue
            x = r["ms_median"] / base["ms_median"]
            key = f"{kind} D{d}{'' if causal else ' non-causal'}"
            metrics[key] = x
            parts.append(f"{key} {fmt(x)}x")
            ev += [r["id"], base["id"]]
        if not parts:
            return None
        flags = [v for k, v in metrics.items() if k.startswith("runtime_flags D")]
        return Finding(
            id="constants-runtime-arguments", title="Run-time price of run-time arguments instead of constexprs",
            claim=(f"Time relative to the constexpr kernel on the same tile (N{next(iter(rt.values()))['N']}): "
                   + ", ".join(parts) + ". Modifier flags and IS_CAUSAL as run-time arguments cost "
                   + f"{fmt(min(flags) if flags else None)}x to {fmt(max(flags) if flags else None)}x; a run-time HEAD_DIM "
                     "also masks every column and pads D to the fixed tile width."),
            verdict="observation", metrics=metrics, evidence=ev)

    def _f_block_sizes(self, data: RunData) -> Optional[Finding]:
        rt = self._rt(data)
        pad, base = rt.get(("runtime_flags+D", 64, True)), rt.get(("constexpr", 64, True))
        big, b128 = rt.get(("runtime_flags+D256", 128, True)), rt.get(("constexpr", 128, True))
        if not (pad and base):
            return None
        x = pad["ms_median"] / base["ms_median"]
        y = big["ms_median"] / b128["ms_median"] if (big and b128) else None
        return Finding(
            id="constants-block-sizes", title="Block sizes cannot be run-time arguments",
            claim=(f"Tile sizes (BLOCK_M, BLOCK_N, BLOCK_D) must be constexpr in Triton: tl.arange, tl.zeros and "
                   f"tl.dot take compile-time shapes, and num_warps/num_stages are compile options. The nearest "
                   f"run-time form is one fixed maximal tile with masks: D64 run through a 128-wide tile takes "
                   f"{fmt(x)}x the time of the D64 kernel"
                   + (f", and D128 through a 256-wide tile {fmt(y)}x the D128 kernel" if y else "") + "."),
            verdict="observation", metrics={"d64_in_128": x, "d128_in_256": y},
            evidence=[r["id"] for r in (pad, base, big, b128) if r])

    def _f_model_variants(self, data: RunData) -> Optional[Finding]:
        rows = data.rows(op="warmup_plan", study=self.name)
        if not rows:
            return None
        txt = ", ".join(f"{r['extra']['model']} {r['variant'].split()[-1]} {r['extra']['variants']}" for r in rows)
        mx = max(rows, key=lambda r: r["extra"]["variants"])
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(mx["extra"]["by_kernel"].items()))
        return Finding(
            id="constants-model-variants", title="Kernel variants a model configuration needs",
            claim=(f"Compiled variants (kernel x constexprs x dtype) that the calls of a model need, prefill lengths "
                   f"bucketed by powers of two, ragged and packed prefill, dense and paged decode ({data.mode} tile "
                   f"picks): {txt}. The largest is {mx['extra']['model']} {mx['variant'].split()[-1]} with "
                   f"{mx['extra']['variants']} ({kinds})."),
            verdict="observation", metrics={r["variant"]: r["extra"]["variants"] for r in rows},
            evidence=[r["id"] for r in rows])

    def _f_tiny_warmup(self, data: RunData) -> Optional[Finding]:
        rows = [r for r in data.rows(op="warmup", study=self.name) if "ok" in r["extra"]]
        if not rows:
            return None
        r = rows[-1]
        e = r["extra"]
        return Finding(
            id="constants-warmup-runs", title="warmup() runs every planned call",
            claim=(f"A warmup of a tiny configuration ({r['H']}:{r['Hkv']} heads, D{r['D']}, window and softcap) "
                   f"exercised {e['variants']} kernel variants in {fmt(e['seconds'], 1)} s ({e['mode']}) with "
                   f"{len(e['errors'])} failing calls."),
            verdict="supported" if e["ok"] else "refuted", metrics={"variants": e["variants"], "errors": e["errors"]},
            evidence=[r["id"]])

    def _f_warmup(self, data: RunData) -> Optional[Finding]:
        ph = {r["extra"].get("phase"): r for r in data.rows(op="warmup", study=self.name)}
        cold, disk = ph.get("cold"), ph.get("disk")
        if not cold:
            return None
        tr = data.rows(op="traffic_after_warmup", study=self.name)
        new_b = sum(r["extra"]["new_binaries"] for r in tr)
        new_v = sum(r["extra"]["new_variants"] for r in tr)
        hit = [r for r in tr if r["extra"]["new_binaries"] or r["extra"]["new_variants"]]
        ce = cold["extra"]
        claim = (f"Warming {ce['model']} for inference ({ce['calls']} calls) compiled {ce['variants']} kernel variants "
                 f"into {ce['binaries']} Triton binaries in {fmt(ce['seconds'], 1)} s cold"
                 + (f", {fmt(disk['extra']['seconds'], 1)} s from a warmed disk cache (the shipped-cache case, "
                    f"{fmt(ratio(ce['seconds'], disk['extra']['seconds']), 0)}x faster)" if disk else "") + ". ")
        if tr:
            claim += (f"Afterwards, {len(tr)} real-traffic calls at other lengths compiled {new_b} more binaries "
                      f"({new_v} new variants of ours)"
                      + (f": Triton specializes integer arguments by value (equal to 1, divisible by 16), so "
                         f"lengths and block counts outside the warmed classes recompile "
                         f"({', '.join(r['variant'] for r in hit[:4])}); do_not_specialize on the length and "
                         f"block-count arguments would close the gap." if new_b else ": the warmup covered them."))
        verdict = "observation" if not tr else ("supported" if new_b == 0 else "refuted")
        return Finding(
            id="constants-warmup", title="Warmup: the ahead-of-time compile step",
            claim=claim, verdict=verdict,
            metrics={"cold_s": ce["seconds"], "disk_s": disk["extra"]["seconds"] if disk else None,
                     "variants": ce["variants"], "binaries": ce["binaries"], "traffic_new_binaries": new_b,
                     "traffic_calls": len(tr)},
            evidence=[cold["id"]] + ([disk["id"]] if disk else []) + [r["id"] for r in tr])


STUDY = ConstantsStudy()
