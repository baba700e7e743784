"""The codegen study's outputs beside the KB: ``codegen.json`` and the report's table.

Both are built from measurement rows (``study == "codegen"``) only, so they can be rebuilt from
any stored run. The export (``kb/export.py``) calls :func:`write_codegen_json` when this module
exists; the report includes :func:`codegen_table`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

#: what a row's kernel line shows, in order: (header, key in a kernel digest / row extra)
_COLUMNS = ("HGMMA loop/total", "HMMA loop/total", "FFMA loop/total", "EX2 loop", "TMA in loops",
            "LDGSTS in loops", "LDG in loops", "LDL+STL", "spill B/thread", "regs", "smem KB", "warps",
            "occupancy (warps/SM)")

SCHEMA_VERSION = 1


def codegen_rows(measurements: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in measurements if r.get("study") == "codegen"]


def _rate(r: Dict[str, Any]) -> Optional[str]:
    if r.get("tflops"):
        return f"{r['tflops']:.0f} TFLOPS"
    if r.get("gbps"):
        return f"{r['gbps']:.0f} GB/s"
    if r.get("ms_median"):
        return f"{r['ms_median']:.3f} ms"
    return None


def _pair(d: Optional[Dict[str, int]], tot: Optional[Dict[str, int]], key: str) -> str:
    a = (d or {}).get(key)
    b = (tot or {}).get(key)
    if a is None and b is None:
        return "–"
    return f"{a if a is not None else '–'}/{b if b is not None else '–'}"


def _kernel_cells(k: Dict[str, Any]) -> List[str]:
    ml, tot, il = k.get("main_loop"), k.get("total"), k.get("in_loops") or {}
    occ = k.get("occupancy") or {}
    smem = k.get("shared_bytes")
    local = (tot or {}).get("LDL", 0) + (tot or {}).get("STL", 0) if tot else None
    return [
        _pair(ml, tot, "HGMMA"), _pair(ml, tot, "HMMA"), _pair(ml, tot, "FFMA"),
        str((ml or {}).get("MUFU.EX2", "–")) if ml else "–",
        str(il.get("UTMALDG", 0) + il.get("UBLKCP", 0)) if tot else "–",
        str(il.get("LDGSTS", 0)) if tot else "–", str(il.get("LDG", 0)) if tot else "–",
        "–" if local is None else str(local),
        "–" if k.get("spill_bytes") is None else str(k["spill_bytes"]),
        "–" if k.get("registers") is None else str(k["registers"]),
        "–" if smem is None else f"{smem / 1024:.0f}",
        "–" if k.get("num_warps") is None else str(k["num_warps"]),
        f"{occ['warps_per_sm']} ({occ['limiter']})" if occ else "–",
    ]


def _label(r: Dict[str, Any]) -> str:
    c = r.get("causal")
    return f"{r['op']} {r['variant'] or ''}{' causal' if c else (' non-causal' if c is False else '')}".strip()


def codegen_table(measurements: Iterable[Dict[str, Any]]) -> List[str]:
    """Markdown lines: one line per (implementation, variant, kernel) with counts, spills, rate.

    Counts are static instruction counts in the SASS: "loop" is the kernel's main loop (the loop
    with the most MMAs), "total" the whole kernel. Rows without a readable kernel (library kernels
    such as cuDNN's, or a path that failed) show their rate and the reason.
    """
    rows = [r for r in codegen_rows(measurements) if r.get("op") not in ("sass_parse", "sass_toolchain", "toolchain")]
    if not rows:
        return []
    out = ["", "**Codegen: SASS of each implementation** (static counts; loop = main loop; "
                "spill = per-thread local memory)", "",
           "| impl | what | kernel | rate | " + " | ".join(_COLUMNS) + " |",
           "|---|---|---|---|" + "---|" * len(_COLUMNS)]
    for r in rows:
        ex = r.get("extra") or {}
        rate = _rate(r) or "–"
        kernels = [k for k in ex.get("kernels") or [] if k.get("used") is not False]
        if not kernels:
            why = ex.get("unavailable") or ex.get("sass") or ex.get("note") or "no kernel read"
            dashes = " | ".join("–" for _ in _COLUMNS)
            out.append(f"| {r['impl']} | {_label(r)} | _{str(why)[:80]}_ | {rate} | {dashes} |")
            continue
        main = ex.get("main_kernel")
        kernels.sort(key=lambda k: k.get("name") != main)
        for i, k in enumerate(kernels):
            name = k.get("name", "?") + (" (main)" if k.get("name") == main and len(kernels) > 1 else "")
            if k.get("error"):
                name += f" [{k['error'][:40]}]"
            out.append(f"| {r['impl'] if i == 0 else ''} | {_label(r) if i == 0 else ''} | {name} | "
                       f"{rate if i == 0 else ''} | " + " | ".join(_kernel_cells(k)) + " |")
        calls = ex.get("inductor_calls")
        if calls and (calls.get("extern") or ex.get("sdpa_rewrite")):
            libs = ", ".join(f"{k} x{v}" for k, v in sorted(calls.get("extern", {}).items()))
            sd = ", ".join(ex.get("sdpa_rewrite") or [])
            out.append(f"| | | _library calls: {libs or 'none'}{'; fused attention op: ' + sd if sd else ''}_ | | "
                       + " | ".join("" for _ in _COLUMNS) + " |")
    return out


def codegen_document(measurements: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """The content of ``codegen.json``: per implementation row, its rate and every kernel's counts."""
    rows = codegen_rows(measurements)
    impls = []
    checks = []
    for r in rows:
        ex = dict(r.get("extra") or {})
        if r.get("op") in ("sass_parse", "sass_toolchain"):
            checks.append({"sample": r.get("variant"), "op": r["op"], "ok": ex.get("ok"), "failed": ex.get("failed")})
            continue
        kernels = ex.pop("kernels", [])
        impls.append({
            "id": r.get("id"), "impl": r["impl"], "op": r["op"], "variant": r.get("variant"),
            "causal": r.get("causal"), "dtype": r.get("dtype"),
            "shape": {k: r.get(k) for k in ("B", "H", "Hkv", "N", "Nk", "D")},
            "ms_median": r.get("ms_median"), "tflops": r.get("tflops"), "gbps": r.get("gbps"),
            "summary": ex, "kernels": kernels,
        })
    first = rows[0] if rows else {}
    return {"version": SCHEMA_VERSION, "gpu": first.get("gpu"), "mode": first.get("mode"),
            "run_id": first.get("run_id"), "implementations": impls, "parser_checks": checks}


def write_codegen_json(measurements: Iterable[Dict[str, Any]], folder: Path) -> Optional[Path]:
    """Write ``folder/codegen.json`` from the run's codegen rows; None (nothing written) without any."""
    measurements = list(measurements)
    if not codegen_rows(measurements):
        return None
    from ..kb.store import _clean

    path = Path(folder) / "codegen.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(codegen_document(measurements)), indent=1) + "\n")
    return path
