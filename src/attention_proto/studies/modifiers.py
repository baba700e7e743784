"""Study 7 (`modifiers`): what each modifier costs against plain causal attention (bf16, D128).

GPU, N in {4k, 16k} (B = 16k / N, H16), causal, times by CUDA events:

- plain attention on the portable tile and as dispatched (the TMA path on Hopper);
- RoPE as dispatched (on Hopper the TMA kernel rotates the query tile in registers and the keys
  are rotated once per call by the RoPE kernel) against plain attention on the same path; RoPE
  fused into every tile load of the portable kernel (``rope_tile``: queries and each key tile
  rotated as loaded) against the plain kernel on that tile; RoPE on the portable kernel as dispatched
  (``forward.PORTABLE_ROPE`` "auto": q and k rotated by the RoPE kernel first at these sizes); and the
  separate RoPE kernel (``rope_kernel.apply_rope`` on q and k) + attention, both paths (half layout;
  interleaved too at 16k in full mode);
- ALiBi and softcap 50 on both paths; softcap against FlexAttention's softcap and plain causal at
  16k, plus what bounds it: MUFU (special-function unit) instructions per score from the compiled
  kernels' PTX against the unit's peak rate, and tensor-core use against the measured matmul
  ceiling;
- sliding window 1024 against full causal;
- GQA 4:1 native against equal heads, and against ``repeat_interleave`` of K/V + attention; the
  peak extra memory of a call shows whether K/V are copied.

The bar pairs (plain, RoPE, separate RoPE + attention, ALiBi and softcap on the default path at
N16k) run last, in :data:`BAR_ROUNDS` alternating rounds; each overhead is the median of its
per-round ratios.

Interpreter: each modifier (and separate RoPE + attention) against the float64 reference.
"""
from __future__ import annotations

import re
import subprocess
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..runtime.timing import attention_flops
from .base import Finding, RunData, Study, StudyContext, correctness_finding, fmt, pct, speedup_verdict
from . import peers
from .stitching import mod_labels, record_check

NS = (4096, 16384)
TOKENS = 16384
H, D, HKV_GQA = 16, 128, 4
WINDOW = 1024
SOFTCAP = 50.0
BAR_N = 16384
#: the bar pairs (BAR_WHATS on the default path at BAR_N) are timed in this many
#: alternating rounds: one sitting's clocks drift enough (plain attention on one input set took
#: 1.89-2.29 ms over three rounds of one process, session 9) to move an overhead by more than a bar's
#: margin when the two timings are minutes apart; each round times the pair seconds apart
BAR_ROUNDS = 3
BAR_WHATS = ("plain", "rope", "rope_separate", "alibi", "softcap")
#: special-function-unit throughput of compute capability 9.0: 16 results per clock per SM for
#: ex2/rcp/lg2/sin/cos (CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table)
MUFU_PER_CLK_PER_SM = 16
#: the causal kernel without a window computes scores in two loops (mask-free middle, diagonal band)
SCORE_LOOPS_CAUSAL = 2
MUFU_PTX = {"ex2": r"\bex2\.approx", "rcp": r"\brcp\.approx", "div": r"\bdiv\.(?:full|approx)\.f32",
            "lg2": r"\blg2\.approx", "tanh": r"\btanh\.approx", "sin": r"\bsin\.approx", "cos": r"\bcos\.approx"}


def _sm_clock_mhz() -> Optional[float]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0]) if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _launched_entries(fn: Callable[[], Any]) -> List[Any]:
    """The KERNEL_CACHE entries ``fn`` launches (it runs once)."""
    from ..runtime.cache import KERNEL_CACHE

    keys: List[Any] = []
    orig = KERNEL_CACHE.launch

    def launch(kernel, grid, *args, **kw):
        keys.append(KERNEL_CACHE.key(kernel, args, kw))
        return orig(kernel, grid, *args, **kw)

    KERNEL_CACHE.launch = launch
    try:
        fn()
    finally:
        KERNEL_CACHE.__dict__.pop("launch", None)
    table = getattr(KERNEL_CACHE, "_entries", {})
    return [table[k] for k in keys if k in table]


def mufu_counts(fn: Callable[[], Any]) -> Optional[Dict[str, Any]]:
    """MUFU-class PTX instruction counts of the attention kernel ``fn`` launches, with its tile facts."""
    for e in _launched_entries(fn):
        ptx = getattr(getattr(e, "compiled", None), "asm", {}).get("ptx") if e.compiled is not None else None
        if not ptx or "fwd" not in e.kernel_name:
            continue
        cx = dict(e.constexprs)
        counts = {k: len(re.findall(p, ptx)) for k, p in MUFU_PTX.items()}
        bm, bn = cx.get("BLOCK_M"), cx.get("BLOCK_N")
        warps = getattr(getattr(e.compiled, "metadata", None), "num_warps", None)
        return {"kernel": e.kernel_name, "counts": counts, "total": sum(counts.values()), "BLOCK_M": bm,
                "BLOCK_N": bn, "num_warps": warps,
                "scores_per_thread": (bm * bn) // (32 * warps) if (bm and bn and warps) else None}
    return None


class ModifiersStudy(Study):
    name = "modifiers"
    title = "Modifier costs: RoPE, ALiBi, softcap, sliding window, GQA"
    ns = NS
    tokens = TOKENS
    heads, head_dim, kv_heads_gqa = H, D, HKV_GQA
    window = WINDOW
    bar_n = BAR_N
    dtype = torch.bfloat16
    device = "cuda"
    flex = True

    def measure(self, ctx: StudyContext) -> None:
        if not ctx.timing:
            self._interpreter(ctx)
            return
        ns = self.ns
        bar = ctx.progress(len(ns), "modifiers")
        for n in ns:
            self._at(ctx, n)
            bar.update(1, f"N{n}")

    # ------------------------------------------------------------------ interpreter
    def _interpreter(self, ctx: StudyContext) -> None:
        from ..ops.dense.forward import flash_attention_forward
        from ..ops.dense.rope import RopeSpec
        from ..ops.dense.rope_kernel import apply_rope

        g = torch.Generator().manual_seed(7)
        Nq = Nk = 23

        def t(*s, scale=1.0):
            return (torch.randn(*s, generator=g) * scale).half()

        q, k, v = t(1, 4, Nq, 32, scale=2.0), t(1, 4, Nk, 32, scale=2.0), t(1, 4, Nk, 32)
        kg, vg = k[:, :1].contiguous(), v[:, :1].contiguous()
        cases = [("plain", {}, q, k, v), ("rope", {"rope": RopeSpec("half")}, q, k, v),
                 ("rope_interleaved", {"rope": RopeSpec("interleaved")}, q, k, v),
                 ("alibi", {"alibi_slopes": True}, q, k, v), ("softcap", {"softcap": 3.0}, q, k, v),
                 ("window", {"window": 6}, q, k, v), ("gqa", {}, q, kg, vg)]
        for what, mods, q_, k_, v_ in cases:
            with ctx.guard(f"correctness {what}"):
                out, _ = flash_attention_forward(q_, k_, v_, causal=True, **mods)
                record_check(ctx, out, q_, k_, v_, mods, op="attn_fwd", impl="attention_proto", variant=what,
                             mods=mod_labels(mods), causal=True, extra={"what": what})
        with ctx.guard("correctness rope_separate"):
            spec = RopeSpec("half")
            qr, kr = apply_rope(q, k, spec)
            out, _ = flash_attention_forward(qr, kr, v, causal=True)
            record_check(ctx, out, q, k, v, {"rope": spec}, op="attn_fwd", impl="attention_proto",
                         variant="rope_separate", mods=["rope"], causal=True, extra={"what": "rope_separate"})

    # ------------------------------------------------------------------ GPU
    def _at(self, ctx: StudyContext, n: int) -> None:
        from ..ops.dense.configs import pick_forward_config
        from ..ops.dense.forward import flash_attention_forward, portable_rope
        from ..ops.dense.rope import RopeSpec
        from ..ops.dense.rope_kernel import apply_rope

        h, d, dt, dev = self.heads, self.head_dim, self.dtype, self.device
        b = max(1, self.tokens // n)
        q, k, v = peers.bhsd(b, h, n, d, dtype=dt, device=dev, seed=n)
        port = pick_forward_config(d, dt, True, n, "portable")
        flops = attention_flops(b, h, n, n, d, True)
        half, inter = RopeSpec("half"), RopeSpec("interleaved")

        def fa(qq, kk, vv, path, **mods):
            return (lambda: flash_attention_forward(qq, kk, vv, causal=True, config=port, **mods)) if path == "portable" \
                else (lambda: flash_attention_forward(qq, kk, vv, causal=True, **mods))

        def sep(spec, path):
            def run():
                qr, kr = apply_rope(q, k, spec)
                return fa(qr, kr, v, path)()
            return run

        jobs: List[Tuple[str, str, Dict[str, Any], Callable[[], Any]]] = []
        for path in ("portable", "default"):
            jobs.append(("plain", path, {}, fa(q, k, v, path)))
        jobs.append(("rope", "default", {"rope": half}, fa(q, k, v, "default", rope=half)))
        # per-tile RoPE needs more shared memory (partner-column loads): the forward picks a portable
        # tile that fits; "the same kernel without it" is the plain kernel on that very tile
        rope_cfg = pick_forward_config(d, dt, True, n, "portable", True)
        def rope_fn():
            with portable_rope("tile"):  # the in-kernel rotation even where "auto" rotates q and k first
                return flash_attention_forward(q, k, v, causal=True, rope=half, config=rope_cfg)

        jobs.append(("plain", "rope_tile", {}, lambda: flash_attention_forward(q, k, v, causal=True, config=rope_cfg)))
        jobs.append(("rope", "rope_tile", {"rope": half}, rope_fn))
        # the portable kernel with RoPE as dispatched (PORTABLE_ROPE "auto": q and k rotated first here)
        jobs.append(("rope", "portable", {"rope": half}, fa(q, k, v, "portable", rope=half)))
        for path in ("default", "portable"):
            jobs.append(("rope_separate", path, {"rope": half}, sep(half, path)))
        jobs.append(("rope_kernel_only", "rope_kernel", {"rope": half}, lambda: apply_rope(q, k, half)))
        if n == self.bar_n and not ctx.quick:
            jobs.append(("rope_interleaved", "default", {"rope": inter}, fa(q, k, v, "default", rope=inter)))
            jobs.append(("rope_interleaved_separate", "default", {"rope": inter}, sep(inter, "default")))
        for path in ("default", "portable"):
            jobs.append(("alibi", path, {"alibi_slopes": True}, fa(q, k, v, path, alibi_slopes=True)))
            jobs.append(("softcap", path, {"softcap": SOFTCAP}, fa(q, k, v, path, softcap=SOFTCAP)))
        jobs.append(("window", "default", {"window": self.window}, fa(q, k, v, "default", window=self.window)))
        rounds = BAR_ROUNDS if n == self.bar_n and not ctx.quick else 1
        paired = [j for j in jobs if j[1] == "default" and j[0] in BAR_WHATS] if rounds > 1 else []
        times: Dict[Tuple[str, str], List[Any]] = {}
        # the rest once, in order; then the bar pairs one after the other, round after round
        schedule = [j for j in jobs if j not in paired] + paired * (rounds if paired else 0)
        for what, path, mods, fn in schedule:
            with ctx.guard(f"{what} {path} N{n}" + (f" round {len(times.get((what, path), []))}" if paired else "")):
                fn()
                times.setdefault((what, path), []).append(ctx.bench(fn))
        for what, path, mods, fn in jobs:
            with ctx.guard(f"{what} {path} N{n}"):
                ts = [x for x in times.get((what, path), []) if x is not None]
                if not ts:
                    continue
                # the round whose median is the median of the rounds; every round's in extra
                t = sorted(ts, key=lambda x: x.ms_median)[(len(ts) - 1) // 2]
                extra: Dict[str, Any] = {"what": what, "path": path}
                if len(ts) > 1:
                    extra["round_ms"] = [round(x.ms_median, 4) for x in ts]
                if path == "rope_tile":
                    extra["config"] = rope_cfg.as_dict()
                if what in ("plain", "softcap") and path == "default" and n == self.bar_n:
                    extra["mufu_ptx"] = mufu_counts(fn)
                    extra["sm_clock_mhz"] = _sm_clock_mhz()
                    extra["sm_count"] = ctx.facts.get("sm_count")
                    extra["mufu_per_clk_per_sm"] = MUFU_PER_CLK_PER_SM
                ctx.record(op="rope" if what == "rope_kernel_only" else "attn_fwd", impl="attention_proto",
                           variant=f"{path} {what}", mods=mod_labels(mods), B=b, H=h, N=n, D=d,
                           dtype=str(dt).replace("torch.", ""), causal=True, timing=t,
                           flops=None if what == "rope_kernel_only" else flops,
                           nbytes=(2.0 * (q.numel() + k.numel()) * q.element_size()) if what == "rope_kernel_only" else None,
                           extra=extra)
        self._gqa(ctx, n, b, q)
        if self.flex and n == self.bar_n:
            self._flex(ctx, n, b, q, k, v, flops)

    def _gqa(self, ctx: StudyContext, n: int, b: int, q: torch.Tensor) -> None:
        from ..ops.dense.forward import flash_attention_forward

        h, d, hk = self.heads, self.head_dim, self.kv_heads_gqa
        _, kg, vg = peers.bhsd(b, h, n, d, Hkv=hk, dtype=self.dtype, device=self.device, seed=n + 1)
        flops = attention_flops(b, h, n, n, d, True)
        group = h // hk
        native = lambda: flash_attention_forward(q, kg, vg, causal=True)  # noqa: E731

        def repeated():
            return flash_attention_forward(q, kg.repeat_interleave(group, 1), vg.repeat_interleave(group, 1), causal=True)

        out_lse = q.numel() * q.element_size() + b * h * n * 4
        kv_copy = 2 * b * h * n * d * q.element_size()
        for what, fn in (("gqa", native), ("gqa_repeat", repeated)):
            with ctx.guard(f"{what} N{n}"):
                fn()
                peak = self._peak_extra(fn)
                t = ctx.bench(fn)
                ctx.record(op="attn_fwd", impl="attention_proto", variant=f"default {what}", mods=[f"gqa:{group}"],
                           B=b, H=h, Hkv=hk, N=n, D=d, dtype=str(self.dtype).replace("torch.", ""), causal=True,
                           timing=t, flops=flops,
                           extra={"what": what, "path": "default", "peak_extra_bytes": peak, "out_lse_bytes": out_lse,
                                  "kv_copy_bytes": kv_copy})

    def _peak_extra(self, fn: Callable[[], Any]) -> Optional[int]:
        if torch.device(self.device).type != "cuda":
            return None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)

    def _flex(self, ctx: StudyContext, n: int, b: int, q, k, v, flops: float) -> None:
        def softcap_mod(score, bb, hh, qi, ki):
            return SOFTCAP * torch.tanh(score / SOFTCAP)

        for what, sm in (("plain", None), ("softcap", softcap_mod)):
            with ctx.guard(f"flex {what} N{n}"):
                fn, why = peers.make_flex(q, k, v, True, score_mod=sm)
                t = ctx.bench(fn) if fn else None
                ctx.record(op="attn_fwd", impl="flex", variant=f"flex {what}",
                           mods=["softcap:50"] if sm else [], B=b, H=self.heads, N=n, D=self.head_dim,
                           dtype=str(self.dtype).replace("torch.", ""), causal=True, timing=t, flops=flops,
                           extra={"what": what, "path": "flex", **({"unsupported": why} if why else {})})

    # ------------------------------------------------------------------ analysis
    def analyze(self, data: RunData) -> List[Finding]:
        if data.mode != "gpu":
            f = correctness_finding(self.name, data, "attn_fwd")
            return [f] if f else []
        out: List[Finding] = []
        for fn in (self._f_rope, self._f_rope_vs_separate, self._f_alibi, self._f_softcap, self._f_softcap_bound,
                   self._f_window, self._f_gqa, self._f_table):
            try:
                f = fn(data)
            except (KeyError, TypeError, ZeroDivisionError) as e:  # a missing row must not hide the others
                f = Finding(id=f"modifiers-analysis-{fn.__name__[3:]}", title="analysis failed",
                            claim=f"{fn.__name__} failed: {type(e).__name__}: {e}", verdict="inconclusive")
            if f:
                out.append(f)
        return out

    def _get(self, data: RunData, what: str, path: str, n: int, impl: str = "attention_proto") -> Optional[Dict[str, Any]]:
        rows = [r for r in data.rows(op="attn_fwd", impl=impl, N=n, study=self.name)
                if r["extra"].get("what") == what and r["extra"].get("path") == path and r["ms_median"]]
        return rows[-1] if rows else None

    def _ns(self, data: RunData) -> List[int]:
        return sorted({r["N"] for r in data.rows(op="attn_fwd", study=self.name) if r["ms_median"]})

    def _bar_n(self, data: RunData) -> Optional[int]:
        ns = self._ns(data)
        return self.bar_n if self.bar_n in ns else (max(ns) if ns else None)

    def _overhead(self, data, what, path, n, base_what="plain", base_path=None):
        """(overhead, row, base row): the median over alternating rounds when both rows have them
        (:data:`BAR_ROUNDS`), else the ratio of the two timings."""
        r, b = self._get(data, what, path, n), self._get(data, base_what, base_path or path, n)
        if not (r and b):
            return None, r, b
        per_round = _round_overheads(r, b)
        if per_round:
            return _median(per_round), r, b
        return r["ms_median"] / b["ms_median"] - 1.0, r, b

    def _bar_finding(self, data: RunData, fid: str, title: str, what: str, path: str, limit: float,
                     label: str, note: str = "") -> Optional[Finding]:
        n = self._bar_n(data)
        if n is None:
            return None
        x, r, b = self._overhead(data, what, path, n)
        if x is None:
            return None
        others = [(m, self._overhead(data, what, path, m)[0]) for m in self._ns(data) if m != n]
        other_txt = "".join(f"; at N{m}: {pct(y)}" for m, y in others if y is not None)
        ok = x <= limit
        return Finding(
            id=fid, title=title,
            claim=(f"{label} costs {pct(x)} over the same kernel without it ({path} path, N{n}, D{r['D']} bf16 causal: "
                   f"{fmt(r['ms_median'], 3)} ms vs {fmt(b['ms_median'], 3)} ms{other_txt}); the bar is at most "
                   f"{pct(limit)}: {'met' if ok else 'missed'}.{_rounds_text(r, b)}{note}"),
            verdict="supported" if ok else "refuted",
            metrics={"overhead": x, "limit": limit, "N": n, "path": path, "others": dict(others),
                     "round_overheads": _round_overheads(r, b)},
            evidence=[r["id"], b["id"]])

    def _f_rope(self, data):
        f = self._bar_finding(data, "modifiers-rope-fused-overhead", "RoPE inside the attention call against the same kernel without it",
                              "rope", "default", 0.05, "RoPE (half layout) as dispatched",
                              " On this path the query tile is rotated in registers after its TMA load and the keys "
                              "are rotated once per call by the RoPE kernel into a scratch tensor (K is read by "
                              "N / BLOCK_M query blocks: rotating it once beats rotating every tile load).")
        n = self._bar_n(data)
        if f and n:
            y, r, _ = self._overhead(data, "rope", "rope_tile", n)
            if y is not None:
                f.claim += (f" Rotating q and every key tile as it is loaded (the portable kernel, its own tile "
                            f"{r['extra'].get('config', {}).get('BLOCK_M', '?')}x{r['extra'].get('config', {}).get('BLOCK_N', '?')}) "
                            f"costs {pct(y)} over that kernel without RoPE.")
                f.metrics["per_tile_overhead"] = y
            y2 = self._overhead(data, "rope", "portable", n)[0]
            if y2 is not None:
                f.claim += (f" The portable kernel as dispatched (q and k rotated by the RoPE kernel first, the plain "
                            f"tile) costs {pct(y2)} over the portable kernel without RoPE.")
                f.metrics["portable_overhead"] = y2
        return f

    def _f_alibi(self, data):
        f = self._bar_finding(data, "modifiers-alibi-overhead", "ALiBi against the same kernel without it",
                              "alibi", "default", 0.05, "ALiBi")
        n = self._bar_n(data)
        if f and n:
            y = self._overhead(data, "alibi", "portable", n)[0]
            if y is not None:
                f.claim += f" On the portable kernel ALiBi costs {pct(y)}."
                f.metrics["portable_overhead"] = y
        return f

    def _f_rope_vs_separate(self, data) -> Optional[Finding]:
        n = self._bar_n(data)
        if n is None:
            return None
        fused = self._get(data, "rope", "default", n)
        sep_d, sep_p = self._get(data, "rope_separate", "default", n), self._get(data, "rope_separate", "portable", n)
        if not (fused and (sep_d or sep_p)):
            return None
        # separate / fused per path: the median of the alternating rounds where both have them
        ratios = {}
        for r in (sep_d, sep_p):
            if r:
                per_round = _round_overheads(r, fused)
                ratios[r["extra"]["path"]] = (1.0 + _median(per_round) if per_round
                                              else r["ms_median"] / fused["ms_median"])
        best_path = min(ratios, key=ratios.get)
        sp = ratios[best_path]
        per_d = _round_overheads(sep_d, fused) if sep_d else None
        rounds_txt = (f" The default path's ratio is the median of {len(per_d)} alternating rounds ("
                      + ", ".join(f"{1.0 + y:.2f}x" for y in per_d) + ").") if per_d else ""
        rk = [r for r in data.rows(op="rope", study=self.name, N=n) if r["ms_median"]]
        parts = [f"separate RoPE kernel + {r['extra']['path']} attention {fmt(r['ms_median'], 3)} ms"
                 for r in (sep_d, sep_p) if r]
        other = []
        for m in self._ns(data):
            if m == n:
                continue
            f2 = self._get(data, "rope", "default", m)
            s2 = [self._get(data, "rope_separate", p, m) for p in ("default", "portable")]
            s2 = [r for r in s2 if r]
            if f2 and s2:
                other.append((m, min(r["ms_median"] for r in s2) / f2["ms_median"]))
        return Finding(
            id="modifiers-rope-fused-vs-separate", title="Fused RoPE against a separate RoPE kernel + attention",
            claim=(f"At N{n}, RoPE inside the attention call (dispatched) takes {fmt(fused['ms_median'], 3)} ms against {', '.join(parts)}"
                   + (f" (the RoPE kernel alone {fmt(rk[-1]['ms_median'], 3)} ms)" if rk else "")
                   + f": the fastest separate pipeline takes {fmt(sp)}x the fused time"
                   + "".join(f"; at N{m}: {fmt(x)}x" for m, x in other)
                   + f". The bar (fused faster than separate) is {'met' if sp > 1.0 else 'missed'}." + rounds_txt),
            verdict=speedup_verdict(sp, 1.0 + 1e-9),
            metrics={"separate_over_fused": sp, "best_separate_path": best_path, "others": dict(other),
                     "round_ratios": [round(1.0 + y, 4) for y in per_d] if per_d else None},
            evidence=[fused["id"]] + [r["id"] for r in (sep_d, sep_p) if r] + [r["id"] for r in rk])

    def _f_softcap(self, data) -> Optional[Finding]:
        n = self._bar_n(data)
        if n is None:
            return None
        x, r, b = self._overhead(data, "softcap", "default", n)
        if x is None:
            return None
        fs, fp = self._get(data, "softcap", "flex", n, "flex"), self._get(data, "plain", "flex", n, "flex")
        vs_flex = fs["ms_median"] / r["ms_median"] if fs else None
        flex_ratio = fs["ms_median"] / fp["ms_median"] if (fs and fp) else None
        ok = x <= 0.20 and vs_flex is not None and vs_flex >= 1.5
        claim = (f"Softcap 50 costs {pct(x)} over plain causal (default path, N{n}: {fmt(r['ms_median'], 3)} vs "
                 f"{fmt(b['ms_median'], 3)} ms; bar at most 20%: {'met' if x <= 0.20 else 'missed'}).{_rounds_text(r, b)} ")
        if vs_flex is not None:
            claim += (f"FlexAttention's softcap takes {fmt(fs['ms_median'], 3)} ms, {fmt(vs_flex)}x ours (bar at least 1.5x: "
                      f"{'met' if vs_flex >= 1.5 else 'missed'})"
                      + (f"; in this run Flex's softcap is {fmt(flex_ratio)}x its plain causal kernel (the issue "
                         f"quoted 2.1x)." if flex_ratio else "."))
        else:
            claim += "FlexAttention's softcap did not run, so its bar is undecided."
        return Finding(
            id="modifiers-softcap-cost", title="Softcap against plain attention and FlexAttention's softcap",
            claim=claim, verdict="supported" if ok else ("inconclusive" if vs_flex is None and x <= 0.20 else "refuted"),
            metrics={"overhead": x, "flex_over_ours": vs_flex, "flex_softcap_over_plain": flex_ratio, "N": n,
                     "round_overheads": _round_overheads(r, b)},
            evidence=[r["id"], b["id"]] + [z["id"] for z in (fs, fp) if z])

    def _f_softcap_bound(self, data) -> Optional[Finding]:
        n = self._bar_n(data)
        if n is None:
            return None
        r, b = self._get(data, "softcap", "default", n), self._get(data, "plain", "default", n)
        if not (r and b) or not r["extra"].get("mufu_ptx") or not b["extra"].get("mufu_ptx"):
            return None
        mr, mb = r["extra"]["mufu_ptx"], b["extra"]["mufu_ptx"]
        per_thread = mb.get("scores_per_thread")
        if not per_thread:
            return None
        extra_per_score = (mr["total"] - mb["total"]) / (per_thread * SCORE_LOOPS_CAUSAL)
        ops = {"plain": 1.0, "softcap": 1.0 + extra_per_score}  # one exp2 per score in the plain softmax
        d = r["D"]
        clock, sms = r["extra"].get("sm_clock_mhz"), r["extra"].get("sm_count")
        mm = (data.ceilings or {}).get("matmul_tflops")
        util: Dict[str, Dict[str, Optional[float]]] = {}
        for name, row in (("plain", b), ("softcap", r)):
            scores = row["tflops"] * 1e12 / (4.0 * d)  # 4*D flops per (query, key) pair
            cap = sms * MUFU_PER_CLK_PER_SM * clock * 1e6 if (clock and sms) else None
            util[name] = {"mufu": scores * ops[name] / cap if cap else None,
                          "tensor": row["tflops"] / mm if mm else None}
        u = util["softcap"]
        if u["mufu"] is not None and u["tensor"] is not None:
            bound = ("the special-function unit (MUFU)" if u["mufu"] >= max(0.7, u["tensor"]) else
                     "the tensor cores" if u["tensor"] >= 0.7 else
                     "neither unit's peak: the extra MUFU work and its dependent FMAs sit on the softmax's critical "
                     "path between the two matmuls, so issue latency, not a unit's throughput, limits it")
        else:
            bound = "undetermined (no SM clock or matmul ceiling in this run)"
        return Finding(
            id="modifiers-softcap-bound", title="What bounds softcap",
            claim=(f"The compiled kernels hold {mb['total']} (plain) and {mr['total']} (softcap) MUFU-class PTX "
                   f"instructions ({', '.join(f'{k} {v}' for k, v in mr['counts'].items() if v)} with softcap): "
                   f"softcap adds {fmt(extra_per_score, 1)} special-function ops per score to the softmax's one exp2. "
                   f"At the measured rates the MUFU unit runs at {pct(u['mufu'])} of its peak "
                   f"({MUFU_PER_CLK_PER_SM}/clk/SM x {sms} SMs at {fmt(clock, 0)} MHz) with softcap and "
                   f"{pct(util['plain']['mufu'])} without, the tensor cores at {pct(u['tensor'])} of the measured matmul "
                   f"ceiling: softcap is bound by {bound}. Computing s / c as s * (1 / c) and tanh with one "
                   f"tanh.approx instruction would cut the MUFU ops per score."),
            verdict="observation",
            metrics={"mufu_ops_per_score": ops, "utilization": util, "ptx_plain": mb, "ptx_softcap": mr},
            evidence=[r["id"], b["id"]])

    def _f_window(self, data) -> Optional[Finding]:
        n = self._bar_n(data)
        if n is None:
            return None
        w, c = self._get(data, "window", "default", n), self._get(data, "plain", "default", n)
        if not (w and c):
            return None
        sp = c["ms_median"] / w["ms_median"]
        win = next((int(m.split(":")[1]) for m in w["mods"] if m.startswith("window:")), self.window)
        frac = min(1.0, (win + 1) / (n / 2))  # keys per row under the window vs causal's n/2 on average
        return Finding(
            id="modifiers-window-speedup", title="Sliding window against full causal",
            claim=(f"At N{n}, sliding window {win} runs {fmt(sp)}x faster than full causal "
                   f"({fmt(w['ms_median'], 3)} vs {fmt(c['ms_median'], 3)} ms; the window keeps about {pct(frac)} of "
                   f"causal's scores, so skipping masked blocks allows up to {fmt(1 / frac, 1)}x); the bar is at least "
                   f"4x: {'met' if sp >= 4 else 'missed'}."),
            verdict=speedup_verdict(sp, 4.0), metrics={"speedup": sp, "ideal": 1 / frac, "N": n},
            evidence=[w["id"], c["id"]])

    def _f_gqa(self, data) -> Optional[Finding]:
        n = self._bar_n(data)
        if n is None:
            return None
        g, e = self._get(data, "gqa", "default", n), self._get(data, "plain", "default", n)
        rep = self._get(data, "gqa_repeat", "default", n)
        if not (g and e):
            return None
        x = g["tflops"] / e["tflops"]
        peak, allowed = g["extra"].get("peak_extra_bytes"), g["extra"].get("out_lse_bytes")
        # a K/V copy adds at least one expanded K or V (a quarter of kv_copy_bytes covers allocator rounding)
        no_copy = None if peak is None else peak <= allowed + g["extra"]["kv_copy_bytes"] / 4
        ok = x >= 0.95 and no_copy is not False
        claim = (f"GQA {g['H']}:{g['Hkv']} native reaches {fmt(g['tflops'], 0)} TFLOPS, {fmt(x)}x the equal-heads kernel "
                 f"({fmt(e['tflops'], 0)} TFLOPS) at N{n} (bar at least 0.95x: {'met' if x >= 0.95 else 'missed'})")
        if peak is not None:
            claim += (f"; a call allocates {fmt(peak / 2**20, 1)} MiB beyond its inputs against {fmt(allowed / 2**20, 1)} MiB "
                      f"of output and LSE ({'no' if no_copy else 'a'} K/V copy; repeat_interleave would copy "
                      f"{fmt(g['extra']['kv_copy_bytes'] / 2**20, 0)} MiB)")
        if rep:
            claim += f"; repeat_interleave of K/V + attention takes {fmt(rep['ms_median'] / g['ms_median'])}x the native time"
        return Finding(
            id="modifiers-gqa-native", title="GQA native against equal heads and repeat_interleave",
            claim=claim + ".", verdict="supported" if ok else "refuted",
            metrics={"tflops_ratio": x, "peak_extra_bytes": peak, "no_kv_copy": no_copy,
                     "repeat_over_native": rep["ms_median"] / g["ms_median"] if rep else None},
            evidence=[g["id"], e["id"]] + ([rep["id"]] if rep else []))

    def _f_table(self, data) -> Optional[Finding]:
        rows = []
        for n in self._ns(data):
            for what, path in (("rope", "default"), ("rope", "rope_tile"), ("rope", "portable"), ("alibi", "default"), ("alibi", "portable"), ("softcap", "default"),
                               ("softcap", "portable"), ("window", "default"), ("rope_interleaved", "default")):
                x, r, b = self._overhead(data, what, path, n)
                if x is not None:
                    rows.append((n, what, path, x, r, b))
        if not rows:
            return None
        return Finding(
            id="modifiers-overheads", title="Every modifier's time against plain causal on the same path",
            claim="Time over plain causal (D128 bf16): " + "; ".join(
                f"N{n} {w} ({p}) {'+' if x >= 0 else ''}{pct(x)}" for n, w, p, x, _, _ in rows) + ".",
            verdict="observation", metrics={f"N{n} {w} {p}": x for n, w, p, x, _, _ in rows},
            evidence=sorted({i for *_, r, b in rows for i in (r["id"], b["id"])}))


STUDY = ModifiersStudy()


def _median(xs: List[float]) -> float:
    """The lower median (an odd number of rounds: the middle one)."""
    return sorted(xs)[(len(xs) - 1) // 2]


def _round_overheads(row: Dict[str, Any], base: Dict[str, Any]) -> Optional[List[float]]:
    """row / base - 1 per alternating round (:data:`BAR_ROUNDS`); None for rows timed once."""
    a, b = (row.get("extra") or {}).get("round_ms") or [], (base.get("extra") or {}).get("round_ms") or []
    if len(a) < 2 or len(a) != len(b):
        return None
    return [round(x / y - 1.0, 4) for x, y in zip(a, b) if y]


def _rounds_text(row: Dict[str, Any], base: Dict[str, Any]) -> str:
    per_round = _round_overheads(row, base)
    if not per_round:
        return ""
    return (f" The overhead is the median of {len(per_round)} alternating rounds, each timing the two seconds "
            f"apart (the times quoted are each one's median round); the rounds gave "
            + ", ".join(pct(y) for y in per_round) + ".")

