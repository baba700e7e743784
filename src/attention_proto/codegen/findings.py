"""The codegen study's findings, computed from its measurement rows (never typed numbers).

- :func:`bar_finding`: the issue's bar -- our fastest dense forward uses HGMMA in its main loop and
  spills nothing; if not, why (no wgmma, spills) and what it costs (against the fastest variant
  that meets the bar);
- :func:`path_finding`: per implementation and variant, "does this path use the Hopper matrix
  units, and what does its code cost?";
- :func:`inductor_finding`: what ``torch.compile`` makes of the written-out attention (library
  calls, a fused-SDPA rewrite, generated Triton kernels);
- :func:`same_code_finding`: our forward variants that compile to identical code;
- :func:`parser_finding`: the SASS parser against its stored samples.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..studies.base import Finding, fmt, pct, ratio


def _shape(r: Dict[str, Any]) -> str:
    return f"B{r.get('B')} H{r.get('H')} N{r.get('N')} D{r.get('D')} {r.get('dtype')}"


def _cz(r: Dict[str, Any]) -> str:
    return "causal" if r.get("causal") else "non-causal"


def _uses(ex: Dict[str, Any]) -> str:
    """What matrix instructions the main kernel's main loop uses, in words."""
    if not ex.get("main_kernel"):
        return "no readable kernel"
    if ex.get("hgmma_main_loop"):
        shapes = ", ".join(sorted(ex.get("hgmma_shapes") or {}))
        return f"HGMMA (wgmma) x{ex['hgmma_main_loop']} in its main loop{' (' + shapes + ')' if shapes else ''}"
    if ex.get("hmma_main_loop"):
        return f"no HGMMA; mma.sync (HMMA) x{ex['hmma_main_loop']} in its main loop"
    if ex.get("hgmma_total") or ex.get("hmma_total"):
        return (f"MMAs only outside its main loop (HGMMA {ex.get('hgmma_total')}, HMMA {ex.get('hmma_total')} "
                f"in total)")
    return f"no matrix instructions (FFMA x{ex.get('ffma_main_loop', 0)} in its main loop)"


def _cost(ex: Dict[str, Any]) -> str:
    parts = []
    sp = ex.get("max_spill_bytes")
    if sp is not None:
        parts.append("no spills" if sp == 0 else f"{sp} B/thread of local memory (spills)")
    if ex.get("registers") is not None:
        parts.append(f"{ex['registers']} registers/thread")
    if ex.get("warps_per_sm") is not None:
        parts.append(f"{ex['warps_per_sm']} warps/SM (occupancy limited by {ex.get('occupancy_limiter')})")
    if ex.get("tma_in_loops"):
        parts.append(f"TMA loads in loops ({ex['tma_in_loops']})")
    elif ex.get("ldgsts_in_loops"):
        parts.append(f"cp.async loads in loops ({ex['ldgsts_in_loops']})")
    elif ex.get("ldg_in_loops"):
        parts.append(f"plain global loads in loops ({ex['ldg_in_loops']})")
    return ", ".join(parts)


def _rate(r: Dict[str, Any]) -> str:
    if r.get("tflops"):
        return f"{fmt(r['tflops'], 0)} TFLOPS"
    if r.get("gbps"):
        return f"{fmt(r['gbps'], 0)} GB/s"
    return "no timing"


def path_finding(impl: str, op: str, variant: str, rows: List[Dict[str, Any]], mm: Optional[float]) -> Finding:
    parts, metrics = [], {}
    hg_any = False
    for r in sorted(rows, key=lambda r: bool(r.get("causal"))):
        ex = r["extra"]
        key = _cz(r)
        if ex.get("unavailable"):
            parts.append(f"{key}: not run ({ex['unavailable'][:160]})")
            continue
        if not ex.get("main_kernel"):
            parts.append(f"{key}: {_rate(r)}, SASS not read ({ex.get('sass') or 'no Triton kernel compiled'})")
            metrics[key] = {"tflops": r.get("tflops"), "gbps": r.get("gbps")}
            continue
        hg_any = hg_any or bool(ex.get("hgmma_main_loop"))
        frac = ratio(r.get("tflops"), mm)
        parts.append(f"{key}: main kernel {ex['main_kernel']} uses {_uses(ex)}; {_cost(ex)}; {_rate(r)}"
                     + (f" ({pct(frac)} of the matmul ceiling)" if frac else ""))
        metrics[key] = {k: ex.get(k) for k in ("main_kernel", "hgmma_main_loop", "hmma_main_loop", "ffma_main_loop",
                                               "max_spill_bytes", "registers", "warps_per_sm", "tma_in_loops")}
        metrics[key].update(tflops=r.get("tflops"), gbps=r.get("gbps"))
    name = f"{impl} {op}" + (f" ({variant})" if variant else "")
    slug = "-".join(x for x in (impl, op, variant.replace(" ", "-").replace("+", "-")) if x)
    return Finding(id=f"codegen-{slug}", title=f"{name}: matrix units and code cost",
                   claim=f"{name}: " + "; ".join(parts) + ".",
                   verdict="observation" if metrics else "inconclusive", metrics=metrics | {"uses_hgmma": hg_any},
                   evidence=[r["id"] for r in rows])


def bar_finding(rows: List[Dict[str, Any]]) -> Optional[Finding]:
    """The issue's bar: our fastest dense forward uses HGMMA in its main loop and spills nothing."""
    ours = [r for r in rows if r["impl"] == "attention_proto" and r["op"] == "attn_fwd" and r.get("tflops")
            and r["extra"].get("main_kernel")]
    if not ours:
        return None
    parts, ok_all, metrics = [], True, {}
    for causal in (False, True):
        rs = [r for r in ours if bool(r.get("causal")) == causal]
        if not rs:
            continue
        best = max(rs, key=lambda r: r["tflops"])
        ex = best["extra"]
        hg, sp = ex.get("hgmma_main_loop", 0), ex.get("max_spill_bytes") or 0
        ok = bool(hg) and sp == 0
        ok_all = ok_all and ok
        key = "causal" if causal else "non-causal"
        s = (f"{key}: the fastest forward is '{best['variant']}' at {fmt(best['tflops'], 0)} TFLOPS, main kernel "
             f"{ex['main_kernel']} with {_uses(ex)} and {'no spills' if sp == 0 else f'{sp} B/thread of spills'}")
        if not ok:
            why = []
            if not hg:
                nw = ex.get("num_warps")
                why.append("no HGMMA in its main loop" + (f" (num_warps {nw} is not a multiple of 4: no warpgroup)"
                                                          if nw and nw % 4 else ""))
            if sp:
                why.append(f"its {ex.get('registers')} registers/thread do not hold its tiles: {sp} B/thread spill "
                           f"to local memory ({ex.get('local_ldst_total')} LDL/STL instructions)")
            good = [r for r in rs if r["extra"].get("hgmma_main_loop") and not (r["extra"].get("max_spill_bytes") or 0)]
            if good:
                g = max(good, key=lambda r: r["tflops"])
                why.append(f"the fastest variant that meets the bar, '{g['variant']}', reaches {fmt(g['tflops'], 0)} "
                           f"TFLOPS (the fastest runs at {fmt(ratio(best['tflops'], g['tflops']))}x of it)")
            else:
                why.append("no variant of ours meets the bar in this run")
            s += " -- why: " + "; ".join(why)
        parts.append(s)
        metrics[key] = {"variant": best["variant"], "tflops": best["tflops"], "hgmma_main_loop": hg,
                        "spill_bytes": sp, "registers": ex.get("registers"), "meets_bar": ok}
    return Finding(id="codegen-ours-fastest-fwd-hgmma", title="Our fastest dense forward uses HGMMA and spills nothing",
                   claim="Bar (HGMMA in the main loop, no spills) for our fastest dense forward at "
                         f"{_shape(ours[0])}: " + "; ".join(parts) + ".",
                   verdict="supported" if ok_all else "refuted", metrics=metrics,
                   evidence=[r["id"] for r in ours])


def inductor_finding(rows: List[Dict[str, Any]]) -> Optional[Finding]:
    """What torch.compile does with the written-out softmax(QK^T)V: library calls, SDPA rewrite, Triton kernels."""
    if not rows:
        return None
    parts = []
    for r in sorted(rows, key=lambda r: (r["variant"], bool(r.get("causal")))):
        ex = r["extra"]
        calls = ex.get("inductor_calls") or {}
        ext = calls.get("extern") or {}
        tk = [k["name"] for k in ex.get("kernels", []) if k.get("used") is not False]
        desc = []
        if ex.get("sdpa_rewrite"):
            desc.append(f"rewritten into {', '.join(ex['sdpa_rewrite'])} (a fused attention kernel from PyTorch's "
                        "library, not generated code)")
        if ext:
            libs = ", ".join(f"extern_kernels.{k} x{v}" for k, v in sorted(ext.items()))
            desc.append(f"matmuls sent to cuBLAS ({libs})")
        desc.append(f"{len(tk)} generated Triton kernel(s)" + (f": {', '.join(tk[:4])}" if tk else ""))
        if ex.get("hgmma_main_loop"):
            desc.append(f"HGMMA x{ex['hgmma_main_loop']} in {ex['main_kernel']}'s main loop")
        parts.append(f"{r['variant']} {_cz(r)}: " + "; ".join(desc) + f"; {_rate(r)}")
    return Finding(id="codegen-inductor-lowering", title="What torch.compile makes of softmax(QK^T)V",
                   claim=f"torch.compile of the written-out softmax(QK^T)V at {_shape(rows[0])} -- " + " | ".join(parts)
                         + ".",
                   verdict="observation", metrics={"rows": len(rows)}, evidence=[r["id"] for r in rows])


def _code_signature(r: Dict[str, Any]):
    """What identifies a row's compiled code: every kernel's name, registers, warps and opcode counts."""
    ks = r["extra"].get("kernels") or []
    if not r["extra"].get("main_kernel") or not ks:
        return None
    return tuple(sorted((k.get("name"), k.get("registers"), k.get("num_warps"),
                         tuple(sorted((k.get("total") or {}).items()))) for k in ks))


def same_code_finding(rows: List[Dict[str, Any]], triton_version: Optional[str]) -> Optional[Finding]:
    """Variants of our forward that compile to identical code (e.g. 'tma+ws' = 'tma' when Triton does not
    warp-specialize), and which variant 'auto' runs."""
    parts, pairs = [], []
    for causal in (False, True):
        rs = [r for r in rows if bool(r.get("causal")) == causal and _code_signature(r)]
        named = [r for r in rs if r["variant"] != "auto"]
        for i, a in enumerate(named):
            for b_ in named[i + 1:]:
                if _code_signature(a) == _code_signature(b_):
                    k = next(x for x in a["extra"]["kernels"] if x.get("name") == a["extra"]["main_kernel"])
                    parts.append(f"{_cz(a)}: '{b_['variant']}' compiles to the same code as '{a['variant']}' "
                                 f"({(k.get('total') or {}).get('total')} instructions in {k.get('name')}, "
                                 f"{k.get('registers')} registers, {k.get('num_warps')} warps)")
                    pairs.append((a, b_))
        auto = next((r for r in rs if r["variant"] == "auto"), None)
        if auto is not None:
            same = [r["variant"] for r in named if _code_signature(r) == _code_signature(auto)]
            which = ", ".join(repr(x) for x in same) or "no other variant"
            parts.append(f"{_cz(auto)}: 'auto' runs the code of {which}")
    if not pairs and not parts:
        return None
    ws = [p for p in pairs if {p[0]["variant"], p[1]["variant"]} == {"tma", "tma+ws"}]
    if ws:
        parts.append(f"warp specialization (tl.range warp_specialize) had no effect on this GPU with triton "
                     f"{triton_version or '?'}")
    return Finding(id="codegen-ours-identical-variants", title="Which forward variants compile to the same code",
                   claim="; ".join(parts) + ".", verdict="observation",
                   metrics={"identical_pairs": [[a["variant"], b_["variant"], bool(a.get("causal"))]
                                                for a, b_ in pairs]},
                   evidence=sorted({r["id"] for r in rows}))


def parser_finding(rows: List[Dict[str, Any]]) -> Finding:
    bad = [r for r in rows if not r["extra"].get("ok")]
    stored = [r for r in rows if r["op"] == "sass_parse"]
    fresh = [r for r in rows if r["op"] == "sass_toolchain"]
    claim = (f"{len(rows) - len(bad)} of {len(rows)} SASS samples parse to their expected instruction counts, loops "
             f"and resources ({len(stored)} stored in tests/data/sass, {len(fresh)} compiled for sm_90 in this run)"
             + (f"; failing: {', '.join(r['variant'] for r in bad[:5])}" if bad else "") + ".")
    return Finding(id="codegen-parser-correct", title="The SASS parser reads the samples right", claim=claim,
                   verdict="supported" if not bad else "refuted",
                   metrics={"checks": len(rows), "failed": len(bad)}, evidence=[r["id"] for r in rows])
