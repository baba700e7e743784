"""Findings of study 3 (`paged`), computed from the rows that ``studies/paged.py`` records.

Every number in a claim comes from a row; bars from the issue carry supported/refuted
verdicts (:func:`attention_proto.studies.base.speedup_verdict`).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from ..ops.paged.dispatch import CTAS_PER_SM, MIN_TOKENS_PER_PARTITION
from .base import Finding, RunData, correctness_finding, fmt, median, pct, ratio, speedup_verdict

OP = "paged_decode"
OURS = "attention_proto"


#: the copy-ceiling bar of issue #5 (B >= 8, N in {4k, 32k})
BAR_COPY = 0.85


def analyze(data: RunData) -> List[Finding]:
    out: List[Finding] = []
    f = correctness_finding("paged", data, OP)
    if f:
        out.append(f)
    if data.mode != "gpu":
        return out
    copy = (data.ceilings or {}).get("copy_gbps")
    for fn in (_bars, _bars_clean_l2, _breakdown, _v1_v2, _partitions, _pages, _smem, _mixed, _others, _host,
               _configs):
        try:
            out.extend(fn(data, copy))
        except Exception as e:  # noqa: BLE001 - one broken finding must not hide the others
            out.append(Finding(id=f"paged-analysis-{fn.__name__.strip('_')}", title="analysis failed",
                               claim=f"{fn.__name__} failed: {type(e).__name__}: {e}", verdict="inconclusive"))
    return out


def _grid(data: RunData, variant: str, B: int, N: int, impl: str = OURS, sweep: str = "grid"):
    rows = [r for r in data.rows(op=OP, impl=impl, variant=variant, B=B, Nk=N, extra__sweep=sweep) if r["gbps"]]
    return rows[-1] if rows else None


def _bars(data: RunData, copy) -> List[Finding]:
    out = []
    pts = [(r, _grid(data, "contiguous", r["B"], r["Nk"], impl="sdpa_cudnn"))
           for r in data.rows(op=OP, impl=OURS, variant="auto", extra__sweep="grid")
           if r["gbps"] and r["B"] >= 8 and r["Nk"] in (4096, 32768) and (r["H"], r["Hkv"], r["D"]) == (32, 8, 128)]
    if pts:
        fr = [(ratio(r["gbps"], copy), r) for r, _ in pts]
        worst = min((x for x, _ in fr if x is not None), default=None)
        desc = ", ".join(f"{fmt(r['gbps'], 0)} GB/s ({_pt(r)}, {r['extra']['version']})" for _, r in fr)
        streams = [(r, _stream(data, r["B"], r["Nk"])) for _, r in fr]
        stream_desc = _stream_claim(streams, copy)
        out.append(Finding(
            id="paged-bar-copy",
            title=f"Paged decode (page 16, GQA 32:8, D128) reaches {pct(BAR_COPY)} of the copy ceiling",
            claim=(f"At B >= 8 and N in {{4k, 32k}}, auto paged decode reads KV at {desc}; the worst is "
                   f"{pct(worst)} of the {fmt(copy, 0)} GB/s copy ceiling (bar {pct(BAR_COPY)})." + stream_desc),
            verdict=speedup_verdict(worst, BAR_COPY),
            metrics={"worst_fraction": worst, "copy_gbps": copy,
                     "points": [{"B": r["B"], "N": r["Nk"], "gbps": r["gbps"], "fraction": x,
                                 "stream_gbps": st["gbps"] if st else None,
                                 "fraction_of_stream": ratio(r["gbps"], st["gbps"]) if st else None}
                                for (x, r), (_, st) in zip(fr, streams)]},
            evidence=[r["id"] for _, r in fr] + [st["id"] for _, st in streams if st]))
        cr = [(ratio(r["gbps"], c["gbps"]) if c else None, r) for r, c in pts]
        worst = min((x for x, _ in cr if x is not None), default=None)
        desc = ", ".join(f"{fmt(x)}x ({_pt(r)})" for x, r in cr)
        out.append(Finding(
            id="paged-bar-cudnn", title="Paged decode against SDPA cuDNN on contiguous K/V (bar 0.9x)",
            claim=(f"Auto paged decode runs at {desc} of SDPA cuDNN's bandwidth over the same K/V stored "
                   f"contiguously; worst {fmt(worst)}x (bar 0.9x; n/a where cuDNN did not run)."),
            verdict=speedup_verdict(worst, 0.9),
            metrics={"worst_ratio": worst, "points": [{"B": r["B"], "N": r["Nk"], "ratio": x} for x, r in cr]},
            evidence=[r["id"] for r, _ in pts] + [c["id"] for _, c in pts if c]))
    v2, v1 = _grid(data, "v2", 1, 65536), _grid(data, "v1", 1, 65536)
    if v2:
        f_copy = ratio(v2["gbps"], copy)
        sp = ratio(v1["ms_median"], v2["ms_median"]) if v1 else None
        best = max([r for r in data.rows(op=OP, impl=OURS, B=1, Nk=65536, extra__sweep="grid")
                    if r["gbps"] and r["extra"].get("version") == "v2"], key=lambda r: r["gbps"])
        a, b = speedup_verdict(f_copy, 0.80), speedup_verdict(sp, 4.0)
        out.append(Finding(
            id="paged-bar-v2-long", title="One long sequence (B1, N64k): V2 >= 80% of copy and >= 4x V1",
            claim=(f"At B1 N64k, V2 with the dispatch's {v2['extra']['num_partitions']} partitions reads "
                   f"{fmt(v2['gbps'], 0)} GB/s, {pct(f_copy)} of the copy ceiling (bar 80%), and is {fmt(sp)}x "
                   f"faster than V1 ({fmt(v1['gbps'] if v1 else None, 0)} GB/s; bar 4x); the best partition count "
                   f"measured ({best['extra']['num_partitions']}) reaches {fmt(best['gbps'], 0)} GB/s."
                   + _stream_claim([(v2, _stream(data, 1, 65536))], copy)),
            verdict=("refuted" if "refuted" in (a, b) else "supported" if a == b == "supported" else "inconclusive"),
            metrics={"v2_gbps": v2["gbps"], "fraction_of_copy": f_copy, "speedup_vs_v1": sp,
                     "best_partitions": best["extra"]["num_partitions"], "best_gbps": best["gbps"]},
            evidence=[v2["id"], best["id"]] + ([v1["id"]] if v1 else [])))
    return out


#: the sweep name of the rows timed with L2 emptied by a read (the bar shapes only; studies.paged)
CLEAN_SWEEP = "grid_clean_l2"


def _bars_clean_l2(data: RunData, copy) -> List[Finding]:
    """The two copy-ceiling bars again, from the bar shapes timed with L2 emptied by a read."""
    pts = [r for r in data.rows(op=OP, impl=OURS, variant="auto", extra__sweep=CLEAN_SWEEP)
           if r["gbps"] and r["B"] >= 8 and r["Nk"] in (4096, 32768) and (r["H"], r["Hkv"], r["D"]) == (32, 8, 128)]
    v2, v1 = _grid(data, "v2", 1, 65536, sweep=CLEAN_SWEEP), _grid(data, "v1", 1, 65536, sweep=CLEAN_SWEEP)
    if not pts and not v2:
        return []
    old = {(r["B"], r["Nk"]): r for r in data.rows(op=OP, impl=OURS, variant="auto", extra__sweep="grid") if r["gbps"]}
    old_v2 = _grid(data, "v2", 1, 65536)

    def one(r, base):
        st, cu = _stream(data, r["B"], r["Nk"], sweep=CLEAN_SWEEP), _grid(data, "contiguous", r["B"], r["Nk"],
                                                                        impl="sdpa_cudnn", sweep=CLEAN_SWEEP)
        txt = (f"{_pt(r)} {r['extra']['version']} {fmt(r['gbps'], 0)} GB/s = {pct(ratio(r['gbps'], copy))} of copy "
               f"(do_bench protocol: {pct(ratio(base['gbps'], copy)) if base else 'n/a'}); the trivial read "
               f"{pct(ratio(st['gbps'], copy)) if st else 'n/a'}, SDPA cuDNN {pct(ratio(cu['gbps'], copy)) if cu else 'n/a'}")
        m = {"B": r["B"], "N": r["Nk"], "version": r["extra"]["version"], "gbps": r["gbps"],
             "fraction": ratio(r["gbps"], copy), "do_bench_fraction": ratio(base["gbps"], copy) if base else None,
             "stream_fraction": ratio(st["gbps"], copy) if st else None,
             "cudnn_fraction": ratio(cu["gbps"], copy) if cu else None}
        return txt, m, [x["id"] for x in (r, base, st, cu) if x]

    parts, metrics, evidence, verdicts = [], {"copy_gbps": copy}, [], []
    if pts:
        rows = [one(r, old.get((r["B"], r["Nk"]))) for r in pts]
        worst = min((m["fraction"] for _, m, _ in rows if m["fraction"] is not None), default=None)
        parts.append("B >= 8, N in {4k, 32k}: " + "; ".join(t for t, _, _ in rows)
                     + f"; worst {pct(worst)} (bar {pct(BAR_COPY)})")
        metrics.update(worst_fraction=worst, points=[m for _, m, _ in rows])
        evidence += [i for _, _, ids in rows for i in ids]
        verdicts.append(speedup_verdict(worst, BAR_COPY))
    if v2:
        txt, m, ids = one(v2, old_v2)
        sp = ratio(v1["ms_median"], v2["ms_median"]) if v1 else None
        parts.append(f"B1 N64k: {txt}; {fmt(sp)}x V1 (bars 80%, 4x)")
        metrics.update(long=m, long_speedup_vs_v1=sp)
        evidence += ids + ([v1["id"]] if v1 else [])
        verdicts += [speedup_verdict(m["fraction"], 0.80), speedup_verdict(sp, 4.0)]
    verdict = ("refuted" if "refuted" in verdicts else
               "supported" if verdicts and all(v == "supported" for v in verdicts) else "inconclusive")
    return [Finding(
        id="paged-bars-clean-l2",
        title="The copy-ceiling bars with L2 emptied by a read before each timed call",
        claim=("The bar shapes timed again with L2 emptied by reading 256 MB instead of do_bench's 256 MB "
               "write (whose dirty lines the timed kernel must write back while it reads): "
               + " | ".join(parts) + f". Copy ceiling {fmt(copy, 0)} GB/s (2 GiB, where neither flush matters)."),
        verdict=verdict, metrics=metrics, evidence=evidence)]


def _breakdown(data: RunData, copy) -> List[Finding]:
    """Where the worst bar shape's time goes: each kernel's GPU time against a read of the same bytes."""
    rows = data.rows(op="paged_kernel_times", impl=OURS)
    if not rows or not copy:
        return []
    r = rows[-1]
    ex = r["extra"]
    ks, rk = ex.get("kernels_us") or {}, ex.get("read_kernels_us") or {}
    if not ks or not rk:
        return []
    decode = sum(t for n, t in ks.items() if "decode" in n)
    merge = sum(t for n, t in ks.items() if "reduce" in n)
    other = sum(ks.values()) - decode - merge
    read = sum(rk.values())
    wall, rwall = ex["wall_us"], ex["read_wall_us"]
    replay, rreplay = wall - sum(ks.values()), rwall - read
    need = ex["kv_bytes"] / (BAR_COPY * copy * 1e3)  # us at the bar (copy in GB/s = 1e3 bytes per us)
    slack = need - rreplay - read  # the kernels' room over the read, if ours replayed as cheaply as the read
    over = sum(ks.values()) - read
    plan = f"{ex.get('version')} with {ex.get('num_partitions')} partitions"
    claim = (f"At B{r['B']} N{_n(r['Nk'])} (GQA {r['H']}:{r['Hkv']}, D{r['D']}, {fmt(ex['kv_bytes'] / 1e6, 0)} MB of "
             f"K/V), L2 emptied by a read before each call: our decode kernel takes {fmt(decode)} us and the merge "
             f"kernel {fmt(merge)} us ({plan}{f'; other kernels {fmt(other)} us' if other > 0.05 else ''}), "
             f"against {fmt(read)} us for a trivial read of the same bytes. Launch and CUDA-graph replay add "
             f"{fmt(replay)} us to our wall time ({fmt(wall)} us) and {fmt(rreplay)} us to the read's "
             f"({fmt(rwall)} us). The {pct(BAR_COPY)} bar needs a wall time of at most {fmt(need)} us, so the "
             f"kernels may spend {fmt(slack)} us more than the read; they spend {fmt(over)} us more.")
    return [Finding(
        id="paged-time-breakdown", title="Where the worst bar shape's time goes (GPU kernel durations)",
        claim=claim, verdict="observation",
        metrics={"decode_us": decode, "merge_us": merge, "other_us": other, "read_us": read, "wall_us": wall,
                 "read_wall_us": rwall, "replay_us": replay, "read_replay_us": rreplay, "bar_wall_us": need,
                 "slack_us": slack, "over_read_us": over},
        evidence=[r["id"]])]


def _stream(data: RunData, B: int, N: int, sweep: str = "grid"):
    """The trivial read of the same bytes at (B, N), timed under the same protocol (None if not measured)."""
    rows = [r for r in data.rows(op="read_stream", B=B, Nk=N, extra__sweep=sweep) if r["gbps"]]
    return rows[-1] if rows else None


def _stream_claim(pairs, copy) -> str:
    """' A trivial read of the same bytes ...' for the (ours row, stream row) pairs that have a stream."""
    have = [(r, st) for r, st in pairs if st]
    if not have:
        return ""
    parts = ", ".join(f"{_pt(r)} {fmt(st['gbps'], 0)} GB/s ({pct(ratio(st['gbps'], copy))} of copy; ours "
                      f"{pct(ratio(r['gbps'], st['gbps']))} of it)" for r, st in have)
    return (f" A trivial Triton kernel reading the same bytes once, timed the same way (the size-matched "
            f"ceiling: the copy ceiling is measured on 2 GiB, where fixed costs vanish): {parts}.")


def _grid_points(data: RunData) -> Dict[Tuple[int, int], Dict]:
    """{(B, N): {"v1": row, "v2best": row, "auto": row}} over the grid."""
    pts: Dict[Tuple[int, int], Dict] = {}
    for r in data.rows(op=OP, impl=OURS, extra__sweep="grid"):
        if not r["gbps"]:
            continue
        d = pts.setdefault((r["B"], r["Nk"]), {})
        if r["variant"] in ("v1", "auto"):
            d[r["variant"]] = r
        if r["extra"].get("version") == "v2" and r["variant"] != "auto":
            if "v2best" not in d or r["gbps"] > d["v2best"]["gbps"]:
                d["v2best"] = r
    return {k: d for k, d in pts.items() if "v1" in d and "v2best" in d}


def _v1_v2(data: RunData, copy) -> List[Finding]:
    pts = _grid_points(data)
    if not pts:
        return []
    any_row = next(iter(pts.values()))["v1"]
    sms, hkv = any_row["extra"].get("sm_count"), any_row["Hkv"]
    wins, loses = [], []
    for (B, N), d in sorted(pts.items()):
        sp = d["v1"]["ms_median"] / d["v2best"]["ms_median"]
        (wins if sp > 1.05 else loses).append((B, N, sp))
    desc = lambda xs: ", ".join(f"B{B} N{_n(N)} {fmt(sp)}x" for B, N, sp in xs) or "none"  # noqa: E731
    top_win = max((B * hkv for B, _, _ in wins), default=None)
    out = [Finding(
        id="paged-v2-overtakes-v1", title="Where split-KV (V2) overtakes V1",
        claim=(f"V2 at its best measured partition count is more than 5% faster than V1 at {len(wins)} of "
               f"{len(pts)} grid points ({desc(wins)}); it ties or loses at {desc(loses)}. V1 runs B x {hkv} "
               f"programs on {sms} SMs; "
               + (f"V2 wins up to {top_win} V1 programs." if top_win else "V2 never wins by more than 5%.")),
        verdict="observation", metrics={"wins": wins, "ties_or_losses": loses, "sm_count": sms},
        evidence=[r["id"] for d in pts.values() for r in (d["v1"], d["v2best"])])]
    good = []
    for (B, N), d in sorted(pts.items()):
        if "auto" in d:
            best = d["v2best"] if d["v2best"]["gbps"] >= d["v1"]["gbps"] else d["v1"]
            good.append((B, N, d["auto"]["gbps"] / best["gbps"], d["auto"], best))
    if good:
        bad = [g for g in good if g[2] < 0.95]
        worst = min(g[2] for g in good)
        miss = ", ".join(f"B{B} N{_n(N)} (auto {a['extra']['version']}/{a['extra']['num_partitions']}, best "
                         f"{b['extra']['version']}/{b['extra']['num_partitions']})" for B, N, _, a, b in bad)
        out.append(Finding(
            id="paged-dispatch-choice", title="The automatic V1/V2 choice against the best measured",
            claim=(f"Auto reaches >= 95% of the best of V1 and every measured V2 at {len(good) - len(bad)} of "
                   f"{len(good)} grid points (worst {fmt(worst)}x{'; below at ' + miss if bad else ''})."),
            verdict="supported" if not bad else "refuted",
            metrics={"points": len(good), "below_95": len(bad), "worst": worst},
            evidence=[g[3]["id"] for g in good] + [g[4]["id"] for g in good]))
    return out


def _partitions(data: RunData, copy) -> List[Finding]:
    per: Dict[Tuple[int, int], List[Dict]] = {}
    for r in data.rows(op=OP, impl=OURS, extra__sweep="grid"):
        if r["gbps"] and r["variant"] != "auto":
            per.setdefault((r["B"], r["Nk"]), []).append(r)
    lines, ev, progs, toks = [], [], [], []
    for (B, N), rows in sorted(per.items()):
        if not any(r["variant"].startswith("v2-p") for r in rows):
            continue  # no partition sweep at this shape
        best = max(rows, key=lambda r: r["gbps"])
        sms = best["extra"].get("sm_count") or 132
        progs.append(best["extra"]["programs"] / sms)
        toks.append(best["extra"]["tokens_per_partition"])
        lines.append(f"B{B} N{_n(N)}: P={best['extra']['num_partitions']} "
                     f"({fmt(progs[-1], 1)} programs/SM, {toks[-1]} tokens each)")
        ev += [r["id"] for r in rows]
    if not lines:
        return []
    return [Finding(
        id="paged-partition-scaling", title="How V2's partition count should scale",
        claim=(f"The fastest partition count per shape (P=1 is V1): {'; '.join(lines)}. Median best: "
               f"{fmt(median(progs), 1)} programs per SM and {fmt(median(toks), 0)} tokens per partition "
               f"(the dispatch models {CTAS_PER_SM} resident programs per SM and keeps >= "
               f"{MIN_TOKENS_PER_PARTITION} tokens per partition)."),
        verdict="observation",
        metrics={"median_programs_per_sm": median(progs), "median_tokens_per_partition": median(toks),
                 "per_shape": lines},
        evidence=ev)]


def _pages(data: RunData, copy) -> List[Finding]:
    rows = sorted([r for r in data.rows(op=OP, impl=OURS, extra__sweep="page_size") if r["gbps"]],
                  key=lambda r: r["extra"]["page_size"])
    base = next((r for r in data.rows(op=OP, impl=OURS, extra__sweep="page_size_baseline") if r["gbps"]), None)
    cud = next((r for r in data.rows(op=OP, impl="sdpa_cudnn", extra__sweep="page_size_baseline") if r["gbps"]), None)
    if not rows or not base:
        return []
    within = [r for r in rows if r["gbps"] >= 0.95 * base["gbps"]]
    smallest = within[0]["extra"]["page_size"] if within else None
    desc = ", ".join(f"{fmt(r['gbps'], 0)} GB/s at page {r['extra']['page_size']}" for r in rows)
    tail = (f"The smallest page within 5% of contiguous is {smallest}." if smallest else
            "No page size comes within 5% of contiguous.")
    return [Finding(
        id="paged-page-size", title="Bandwidth against page size (smallest page within 5% of contiguous)",
        claim=(f"At {_pt(base)}, paged decode reads {desc}; on one page per sequence (contiguous) "
               f"{fmt(base['gbps'], 0)} GB/s ({pct(ratio(base['gbps'], copy))} of copy), SDPA cuDNN "
               f"{fmt(cud['gbps'] if cud else None, 0)} GB/s. {tail}"),
        verdict="observation",
        metrics={"smallest_within_5pct": smallest, "contiguous_gbps": base["gbps"],
                 "by_page": {r["extra"]["page_size"]: r["gbps"] for r in rows},
                 "cudnn_gbps": cud["gbps"] if cud else None},
        evidence=[r["id"] for r in rows] + [base["id"]] + ([cud["id"]] if cud else []))]


def _smem(data: RunData, copy) -> List[Finding]:
    facts = {r["extra"]["page_size"]: r for r in data.rows(op="paged_kernel_facts")}
    rows = {r["extra"]["page_size"]: r for r in data.rows(op=OP, impl=OURS, extra__sweep="page_size") if r["gbps"]}
    if not rows:
        return []
    best = max(rows.values(), key=lambda r: r["gbps"])
    frac = ratio(rows[min(rows)]["gbps"], best["gbps"])
    smem = {p: facts[p]["extra"].get("smem_bytes") for p in sorted(facts)}
    opt_in = data.env.get("shared_memory_per_block_optin")
    known = {b for b in smem.values() if b}
    if len(known) == 1 and len(smem) == len(rows):
        smem_txt = f"uses {fmt(known.pop() / 1024, 0)} KB of shared memory at every page size"
    else:
        smem_txt = "uses " + (", ".join(f"{fmt((b or 0) / 1024, 0)} KB at page {p}" for p, b in smem.items())
                              or "an unknown amount of shared memory")
    return [Finding(
        id="paged-shared-memory", title="What shared memory limits: small pages on Hopper",
        claim=(f"The plan feared that small pages would confine the kernel to small tiles (under 32 KB of shared "
               f"memory). This kernel gathers a tile's rows across pages: it {smem_txt} (opt-in limit "
               f"{fmt((opt_in or 0) / 1024, 0)} KB per block); the smallest page ({min(rows)}) reaches {pct(frac)} "
               f"of the best page's bandwidth (page {best['extra']['page_size']}, {fmt(best['gbps'], 0)} GB/s); "
               f"the fear is refuted when the smallest page keeps >= 90% of the best page's bandwidth."),
        verdict=("inconclusive" if frac is None else "refuted" if frac >= 0.9 else "supported"),
        metrics={"smem_by_page": smem, "smallest_page_fraction_of_best": frac, "smem_optin": opt_in,
                 "regs_by_page": {p: facts[p]["extra"].get("regs") for p in sorted(facts)}},
        evidence=[r["id"] for r in rows.values()] + [r["id"] for r in facts.values()])]


def _mixed(data: RunData, copy) -> List[Finding]:
    rows = {r["variant"]: r for r in data.rows(op=OP, impl=OURS, extra__sweep="mixed") if r["gbps"]}
    pad = next((r for r in data.rows(op=OP, impl="sdpa_cudnn", extra__sweep="mixed") if r["gbps"]), None)
    a = rows.get("auto")
    if not a:
        return []
    g = lambda k: fmt(rows[k]["gbps"] if k in rows else None, 0)  # noqa: E731
    sp = ratio(pad["ms_median"], a["ms_median"]) if pad else None
    return [Finding(
        id="paged-mixed-lengths", title="Mixed lengths in one batch",
        claim=(f"B{a['B']} with lengths {a['extra'].get('min_len')} to {a['Nk']} (mean "
               f"{fmt(a['extra']['mean_len'], 0)}): auto ({a['extra']['version']}, {a['extra']['num_partitions']} "
               f"partitions) reads {g('auto')} GB/s of unique KV ({pct(ratio(a['gbps'], copy))} of copy); V1 "
               f"{g('v1')}, V2 {g('v2')} GB/s. SDPA cuDNN over the batch padded to the longest (no mask: a lower "
               f"bound of its cost) takes {fmt(pad['ms_median'] if pad else None, 3)} ms against our "
               f"{fmt(a['ms_median'], 3)} ms ({fmt(sp)}x)."),
        verdict="observation",
        metrics={"auto_gbps": a["gbps"], "fraction_of_copy": ratio(a["gbps"], copy), "speedup_vs_padded_cudnn": sp},
        evidence=[r["id"] for r in rows.values()] + ([pad["id"]] if pad else []))]


def _others(data: RunData, copy) -> List[Finding]:
    out = []
    first = lambda impl, sweep: next((r for r in data.rows(op=OP, impl=impl, extra__sweep=sweep)  # noqa: E731
                                      if r["gbps"]), None)
    for sweep, title in (("mha", "MHA (32:32)"), ("d64", "GQA 32:8 at D=64")):
        a, cud, fl = first(OURS, sweep), first("sdpa_cudnn", sweep), first("sdpa_flash", sweep)
        if not a:
            continue
        out.append(Finding(
            id=f"paged-{sweep}", title=f"Paged decode, {title}",
            claim=(f"{title}, {_pt(a)}: ours ({a['extra']['version']}) {fmt(a['gbps'], 0)} GB/s "
                   f"({pct(ratio(a['gbps'], copy))} of copy); on contiguous K/V SDPA cuDNN "
                   f"{fmt(cud['gbps'] if cud else None, 0)}, SDPA FLASH {fmt(fl['gbps'] if fl else None, 0)} GB/s."),
            verdict="observation",
            metrics={"gbps": a["gbps"], "cudnn_gbps": cud["gbps"] if cud else None,
                     "flash_gbps": fl["gbps"] if fl else None, "fraction_of_copy": ratio(a["gbps"], copy)},
            evidence=[r["id"] for r in (a, cud, fl) if r]))
    flex = data.rows(op=OP, impl="flex", extra__sweep="grid")
    if flex:
        parts = []
        for r in flex:
            a = _grid(data, "auto", r["B"], r["Nk"])
            parts.append(f"{_pt(r)}: {fmt(r['gbps'], 0)} GB/s (ours {fmt(a['gbps'] if a else None, 0)})"
                         if r["gbps"] else f"{_pt(r)}: did not run ({r['extra'].get('unsupported')})")
        out.append(Finding(id="paged-flex", title="FlexAttention decoding on contiguous K/V",
                           claim="FlexAttention decoding, " + "; ".join(parts) + ".", verdict="observation",
                           metrics={"points": parts}, evidence=[r["id"] for r in flex]))
    return out


def _host(data: RunData, copy) -> List[Finding]:
    rows = {(r["impl"], r["variant"]): r for r in data.rows(op="paged_host")}
    off, on = rows.get((OURS, "checks off")), rows.get((OURS, "checks on"))
    if not off:
        return []
    cud = rows.get(("sdpa_cudnn", "contiguous"))
    us = lambda r: fmt(r["extra"]["us_per_call"] if r else None, 1)  # noqa: E731
    return [Finding(
        id="paged-host-overhead", title="Host time per decode call (eager, tiny shape)",
        claim=(f"At {_pt(off)} (GPU time negligible), one eager call costs {us(off)} us of host time with "
               f"check_inputs=False, {us(on)} us with the checks on (one device -> host sync), SDPA cuDNN "
               f"{us(cud)} us; the timed sweep replays CUDA graphs, so none of this is in its numbers."),
        verdict="observation",
        metrics={k[1] if k[0] == OURS else k[0]: r["extra"]["us_per_call"] for k, r in rows.items()},
        evidence=[r["id"] for r in rows.values()])]


def _configs(data: RunData, copy) -> List[Finding]:
    rows = [r for r in data.rows(op=OP, impl=OURS, extra__sweep="config") if r["gbps"]]
    default = next((r for r in rows if r["variant"] == "auto"), None)
    if len(rows) < 2 or not default:
        return []
    best = max(rows, key=lambda r: r["gbps"])
    cfg = lambda r: f"BLOCK_N {r['extra']['BLOCK_N']}, {r['extra']['num_warps']} warps, {r['extra']['num_stages']} stages"  # noqa: E731
    return [Finding(
        id="paged-tile-config", title="Decode tile configuration",
        claim=(f"At {_pt(best)}, the fastest tile measured is {cfg(best)} at {fmt(best['gbps'], 0)} GB/s; the "
               f"default ({cfg(default)}) reaches {fmt(default['gbps'], 0)} GB/s "
               f"({fmt(ratio(default['gbps'], best['gbps']))}x of the best)."),
        verdict="observation",
        metrics={"best": {k: best["extra"][k] for k in ("BLOCK_N", "num_warps", "num_stages")},
                 "best_gbps": best["gbps"], "default_gbps": default["gbps"]},
        evidence=[r["id"] for r in rows])]


def _n(n: int) -> str:
    """32768 -> '32k', 100 -> '100'."""
    return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)


def _pt(r: Dict) -> str:
    """'B8 N32k' for a row."""
    return f"B{r['B']} N{_n(r['Nk'])}"
