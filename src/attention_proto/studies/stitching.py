"""Study 2 (`stitching`): four ways to compose attention modifiers into one kernel, same math, same shape.

(a) ``constexpr``: a kernel specialized per combination (``forward._fwd_kernel``, every modifier a
    constexpr; portable tile, and ``constexpr_default``: what dispatch runs today, the TMA path on
    Hopper);
(b) ``runtime``: one kernel, modifiers as run-time arguments (``forward_runtime``);
(c) ``hooks``: user ``@triton.jit`` score_mod / mask_mod passed as constexprs (``mods_library``
    generates them), causal left built in;
(d) ``flex``: compiled FlexAttention with the same score_mod and block mask.

GPU: bf16, B2 H16 N4096 D128, causal, combinations {causal, softcap 50, ALiBi, window 1024 +
softcap 50} (quick: the first and last). Every way's run time (CUDA events) and its compile time:
all compiles happen in fresh Triton/Inductor disk caches with our in-process caches cleared, so
each first call is a cold compile. Interpreter: correctness of (a), (b), (c) against the float64
reference on tiny shapes.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..runtime.timing import attention_flops
from .base import Finding, RunData, Study, StudyContext, correctness_finding, fmt, median
from . import peers

B, H, N, D = 2, 16, 4096, 128
SOFTCAP = 50.0
WINDOW = 1024
COMBOS: Dict[str, Dict[str, Any]] = {
    "causal": {},
    "softcap": {"softcap": SOFTCAP},
    "alibi": {"alibi_slopes": True},
    "window+softcap": {"window": WINDOW, "softcap": SOFTCAP},
}
QUICK_COMBOS = ("causal", "window+softcap")
WAYS = ("constexpr", "constexpr_default", "runtime", "hooks", "flex")


def mod_labels(mods: Dict[str, Any]) -> List[str]:
    """Row ``mods`` for a modifier dict, e.g. ["window:1024", "softcap:50"]."""
    out = []
    if mods.get("window") is not None:
        w = mods["window"]
        out.append(f"window:{w if isinstance(w, int) else w[0]}")
    if mods.get("softcap"):
        out.append(f"softcap:{mods['softcap']:g}")
    if mods.get("alibi_slopes") is not None:
        out.append("alibi")
    if mods.get("rope") is not None:
        out.append("rope" if mods["rope"].layout == "half" else "rope:interleaved")
    return out


def record_check(ctx: StudyContext, out: torch.Tensor, q, k, v, ref_mods: Dict[str, Any], *, op: str, impl: str,
                 variant: str, mods: List[str], causal: bool, extra: Optional[Dict[str, Any]] = None) -> None:
    """A correctness row: ``out`` against the float64 reference under the error rule (shared by studies 2, 4, 7)."""
    from ..ops.dense.reference import attention_reference
    from ..testing import check_error

    dtype = q.dtype
    rm = dict(ref_mods)
    if rm.get("alibi_slopes") is True:
        from ..ops.dense.reference import alibi_slopes

        rm["alibi_slopes"] = alibi_slopes(q.shape[1])
    ref, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), causal=causal, **rm)
    low, _ = attention_reference(q.cpu(), k.cpu(), v.cpu(), causal=causal, compute_dtype=dtype, **rm)
    chk = check_error(out, low, ref, dtype)
    ctx.record(op=op, impl=impl, variant=variant, mods=mods, B=q.shape[0], H=q.shape[1], Hkv=k.shape[1],
               N=q.shape[2], Nk=k.shape[2], D=q.shape[3], dtype=str(dtype).replace("torch.", ""), causal=causal,
               extra=dict(extra or {}, ok=chk.ok, max_err=chk.ours, bound=chk.bound,
                          err_ratio=chk.ours / chk.bound if chk.bound else None, check="correctness"))


def _flex_mods(mods: Dict[str, Any], heads: int, device) -> Tuple[Any, Any]:
    """FlexAttention score_mod / mask_mod with the same semantics (Nq == Nk, causal)."""
    cap = mods.get("softcap")
    slopes = None
    if mods.get("alibi_slopes") is not None:
        from ..ops.dense.reference import alibi_slopes

        slopes = alibi_slopes(heads).to(device)
    def modded(score, b, h, q_idx, kv_idx):
        if cap:
            score = cap * torch.tanh(score / cap)
        if slopes is not None:
            score = score - slopes[h] * (q_idx - kv_idx).abs()
        return score

    score_mod = modded if (cap or slopes is not None) else None
    w = mods.get("window")
    if w is not None:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (kv_idx >= q_idx - w)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx
    return score_mod, mask_mod


def _hooks(mods: Dict[str, Any], heads: int, q_offset: int = 0) -> Tuple[Any, Any]:
    from ..ops.dense import mods_library as ML

    sm = None
    if mods.get("softcap") or mods.get("alibi_slopes") is not None:
        sm = ML.score_mod(softcap=mods.get("softcap"), alibi_heads=heads if mods.get("alibi_slopes") is not None else None,
                          q_offset=q_offset)
    mm = ML.mask_mod(window=mods["window"], q_offset=q_offset) if mods.get("window") is not None else None
    return sm, mm


def build(way: str, q, k, v, mods: Dict[str, Any], cfg) -> Optional[Callable[[], Any]]:
    """A zero-argument call of ``way`` on (q, k, v) with ``mods`` (causal always on); None if not applicable."""
    from ..ops.dense.forward import flash_attention_forward
    from ..ops.dense.forward_runtime import flash_attention_forward_runtime

    if way == "constexpr":
        return lambda: flash_attention_forward(q, k, v, causal=True, config=cfg, **mods)
    if way == "constexpr_default":
        return lambda: flash_attention_forward(q, k, v, causal=True, **mods)
    if way == "runtime":
        return lambda: flash_attention_forward_runtime(q, k, v, causal=True, config=cfg, **mods)
    if way == "hooks":
        sm, mm = _hooks(mods, q.shape[1], k.shape[2] - q.shape[2])
        if sm is None and mm is None:
            return None  # nothing to express as a hook: identical to (a)
        return lambda: flash_attention_forward(q, k, v, causal=True, config=cfg, score_mod=sm, mask_mod=mm)
    raise ValueError(f"unknown way {way!r}")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class StitchingStudy(Study):
    name = "stitching"
    title = "Composing modifiers: constexpr variants, run-time flags, user hooks, FlexAttention"
    #: the GPU run's shape, dtype, device and ways (a CPU test shrinks them to dry-run the GPU path)
    shape = (B, H, N, D)
    dtype = torch.bfloat16
    device = "cuda"
    ways = WAYS

    def measure(self, ctx: StudyContext) -> None:
        if not ctx.timing:
            self._interpreter(ctx)
            return
        self._gpu(ctx)

    # ------------------------------------------------------------------ interpreter: correctness
    def _interpreter(self, ctx: StudyContext) -> None:
        from ..ops.dense.configs import FwdConfig

        cfg = FwdConfig(16, 16, 4, 1, "portable")
        g = torch.Generator().manual_seed(2)
        Nq = Nk = 29
        q = (torch.randn(1, 4, Nq, 32, generator=g) * 2).half()
        k = (torch.randn(1, 2, Nk, 32, generator=g) * 2).half()
        v = torch.randn(1, 2, Nk, 32, generator=g).half()
        small = {name: dict(m, window=7) if "window" in m else dict(m) for name, m in COMBOS.items()}
        for combo, mods in small.items():
            for way in ("constexpr", "runtime", "hooks"):
                with ctx.guard(f"correctness {way} {combo}"):
                    fn = build(way, q, k, v, mods, cfg)
                    if fn is None:
                        continue
                    out, _ = fn()
                    record_check(ctx, out, q, k, v, mods, op="attn_fwd", impl="attention_proto",
                                 variant=f"{way} {combo}", mods=mod_labels(mods), causal=True,
                                 extra={"way": way, "combo": combo})

    # ------------------------------------------------------------------ GPU
    def _gpu(self, ctx: StudyContext) -> None:
        from ..codegen.collect import fresh_compile_caches
        from ..ops.dense.configs import pick_forward_config
        from ..runtime.cache import KERNEL_CACHE
        from ..warmup import reset_compiled_kernels

        combos = QUICK_COMBOS if ctx.quick else tuple(COMBOS)
        b, h, n, d = self.shape
        cfg = pick_forward_config(d, self.dtype, True, n, "portable")
        q, k, v = peers.bhsd(b, h, n, d, dtype=self.dtype, device=self.device, seed=2)
        flops = attention_flops(b, h, n, n, d, True)
        bar = ctx.progress(len(combos) * len(self.ways), "stitching")
        with fresh_compile_caches() as cap:
            reset_compiled_kernels()
            for way in self.ways:
                for combo in combos:
                    mods = COMBOS[combo]
                    with ctx.guard(f"{way} {combo}"):
                        self._one(ctx, way, combo, mods, q, k, v, cfg, flops, KERNEL_CACHE)
                    bar.update(1, f"{way} {combo}")
            ctx.log(f"compiled into fresh caches under {cap.folder}")

    def _one(self, ctx, way, combo, mods, q, k, v, cfg, flops, cache) -> None:
        extra: Dict[str, Any] = {"way": way, "combo": combo, "config": cfg.as_dict()}
        c0, m0 = cache.stats.compile_seconds, cache.stats.misses
        t0 = time.perf_counter()
        if way == "flex":
            score_mod, mask_mod = _flex_mods(mods, q.shape[1], q.device)
            fn, why = peers.make_flex(q, k, v, True, score_mod=score_mod, mask_mod=mask_mod)
            if fn is None:
                extra["unsupported"] = why
        else:
            fn = build(way, q, k, v, mods, cfg)
            if fn is None:
                return
            fn()
        _sync(q.device)
        first = time.perf_counter() - t0
        t = ctx.bench(fn) if fn else None
        extra["first_call_s"] = first
        if way == "flex":
            # block-mask creation + dynamo trace + Inductor codegen + Triton compile + one run
            extra["compile_s"] = max(0.0, first - (t.ms_median / 1e3 if t else 0.0))
            extra["compiled"] = True
        else:
            extra["compile_s"] = cache.stats.compile_seconds - c0
            extra["compiled"] = cache.stats.misses > m0
        b, h, n, d = q.shape
        ctx.record(op="attn_fwd", impl="flex" if way == "flex" else "attention_proto", variant=f"{way} {combo}",
                   mods=mod_labels(mods), B=b, H=h, N=n, D=d, dtype=str(q.dtype).replace("torch.", ""), causal=True,
                   timing=t, flops=flops, extra=extra)

    # ------------------------------------------------------------------ analysis
    def analyze(self, data: RunData) -> List[Finding]:
        if data.mode != "gpu":
            f = correctness_finding(self.name, data, "attn_fwd")
            return [f] if f else []
        rows = [r for r in data.rows(op="attn_fwd", study=self.name) if r["extra"].get("way")]
        cell: Dict[Tuple[str, str], Dict[str, Any]] = {(r["extra"]["way"], r["extra"]["combo"]): r for r in rows}
        combos = [c for c in COMBOS if ("constexpr", c) in cell and cell[("constexpr", c)]["ms_median"]]
        if not combos:
            return []

        def ratio(way: str, combo: str) -> Optional[float]:
            r, base = cell.get((way, combo)), cell[("constexpr", combo)]
            if not r or not r["ms_median"]:
                return None
            return r["ms_median"] / base["ms_median"]

        def comp(way: str) -> Tuple[float, int, List[Dict[str, Any]]]:
            rs = [cell[(way, c)] for c in combos if (way, c) in cell]
            return sum(r["extra"].get("compile_s") or 0.0 for r in rs), sum(bool(r["extra"].get("compiled")) for r in rs), rs

        out: List[Finding] = []
        base_ev = [cell[("constexpr", c)]["id"] for c in combos]
        r0 = cell[("constexpr", combos[0])]
        shape = f"B{r0['B']} H{r0['H']} N{r0['N']} D{r0['D']} {r0['dtype']} causal"

        def per_combo(way: str) -> str:
            return ", ".join(f"{c} {fmt(ratio(way, c))}x" for c in combos if ratio(way, c) is not None)

        # (b) run-time flags
        rts = [ratio("runtime", c) for c in combos if ratio("runtime", c) is not None]
        if rts:
            cs_b, n_b, rows_b = comp("runtime")
            cs_a, n_a, _ = comp("constexpr")
            out.append(Finding(
                id="stitching-runtime-flags",
                title="One kernel with run-time modifier flags vs a constexpr variant per combination",
                claim=(f"The run-time-flag kernel takes {fmt(min(rts))}x to {fmt(max(rts))}x the time of the "
                       f"constexpr-specialized "
                       f"kernel on the same tile ({per_combo('runtime')}; {shape}). It compiled "
                       f"{n_b} time(s) ({fmt(cs_b, 1)} s) for all {len(combos)} combinations, where the constexpr "
                       f"kernel compiled "
                       f"{n_a} variants ({fmt(cs_a, 1)} s). Block sizes cannot become run-time arguments at all: tl.arange, "
                       f"tl.zeros and tl.dot need compile-time shapes."),
                verdict="observation",
                metrics={"ratio_min": min(rts), "ratio_max": max(rts), "ratio_median": median(rts),
                         "compile_s_runtime": cs_b, "compiles_runtime": n_b, "compile_s_constexpr": cs_a,
                         "compiles_constexpr": n_a},
                evidence=base_ev + [r["id"] for r in rows_b]))
        # (c) hooks
        hk = [(c, ratio("hooks", c)) for c in combos if ratio("hooks", c) is not None]
        if hk:
            cs_c, n_c, rows_c = comp("hooks")
            win = [(c, x) for c, x in hk if "window" in c]
            win_txt = ""
            if win:
                c, x = win[0]
                win_txt = (f" The sliding window as a mask_mod costs {fmt(x)}x the built-in window ({c}): a mask_mod "
                           f"masks scores but cannot skip key blocks, so every causal block is still visited.")
            out.append(Finding(
                id="stitching-hooks", title="User score_mod / mask_mod hooks vs built-in modifiers",
                claim=(f"Modifiers written as @triton.jit score_mod/mask_mod hooks take, relative to the built-in "
                       f"constexpr kernel: {per_combo('hooks')}; each new hook set is a new compiled variant ({n_c} compiles, "
                       f"{fmt(cs_c / max(n_c, 1), 1)} s each on average).{win_txt}"),
                verdict="observation",
                metrics={"ratios": {c: x for c, x in hk}, "compile_s_mean": cs_c / max(n_c, 1)},
                evidence=base_ev + [r["id"] for r in rows_c]))
        # (d) flex
        fx = [(c, ratio("flex", c)) for c in combos if ratio("flex", c) is not None]
        if fx:
            cs_d, n_d, rows_d = comp("flex")
            out.append(Finding(
                id="stitching-flex", title="FlexAttention with the same modifiers",
                claim=(f"Compiled FlexAttention with the same score_mod and block mask takes, relative to the constexpr "
                       f"kernel: {per_combo('flex')}; its first call with a new score_mod/mask costs "
                       f"{fmt(cs_d / max(n_d, 1), 1)} s "
                       f"on average (trace, Inductor codegen, Triton compile), against "
                       f"{fmt(comp('constexpr')[0] / max(comp('constexpr')[1], 1), 1)} s per constexpr variant of ours."),
                verdict="observation",
                metrics={"ratios": {c: x for c, x in fx}, "first_compile_s_mean": cs_d / max(n_d, 1)},
                evidence=base_ev + [r["id"] for r in rows_d]))
        # compile cost table and the dispatch recommendation
        geo: Dict[str, float] = {}
        for way in WAYS:
            rs = [ratio(way, c) for c in combos]
            if way == "hooks":
                rs = [x if x is not None else 1.0 for x in rs]  # no hook needed: (a) itself
            if rs and all(x is not None for x in rs):
                geo[way] = math.exp(sum(math.log(x) for x in rs) / len(rs))
        if len(geo) >= 2:
            best = min(geo, key=geo.get)
            comp_txt = "; ".join(f"{w} {fmt(comp(w)[0] / max(len(combos), 1), 1)} s" for w in geo)
            rt_near = "runtime" in geo and geo["runtime"] <= 1.02 * geo.get("constexpr", float("inf"))
            choice = "run-time flags" if rt_near else ("the constexpr-specialized kernels" if best.startswith("constexpr")
                                                       else best)
            why = ("run-time flags cost at most 2% and compile once" if rt_near else
                   f"the run-time-flag kernel is {fmt(geo.get('runtime'))}x and hooks {fmt(geo.get('hooks'))}x the "
                   f"constexpr time (geometric means), while constexpr variants are compiled once each and cached on disk "
                   f"(attention-proto warmup precompiles them)")
            out.append(Finding(
                id="stitching-dispatch", title="Which way dispatch should use",
                claim=(f"Geometric-mean time relative to the constexpr kernel over {len(combos)} combinations: "
                       + ", ".join(f"{w} {fmt(x)}x" for w, x in geo.items())
                       + f"; compile seconds per combination: {comp_txt}. Dispatch should use {choice}: {why}. "
                       f"Hooks stay the extension point for modifiers we do not build in."),
                verdict="observation", metrics={"geomean_ratio": geo, "best": best, "choice": choice},
                evidence=[r["id"] for r in rows]))
        return out


STUDY = StitchingStudy()
