#!/usr/bin/env python3
"""Summarize an ncu --csv --page details file: a line per profiled kernel with its key metrics.

    python scripts/ncu_summary.py ncu.csv
"""
import csv, sys, collections
lines = open(sys.argv[1]).read().splitlines()
start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))  # ncu's and the program's own lines first
rows = list(csv.reader(lines[start:]))
hdr = rows[0]
ix = {h: i for i, h in enumerate(hdr)}
want = ("Duration", "Memory Throughput", "DRAM Throughput", "L2 Hit Rate", "L1/TEX Hit Rate", "Achieved Occupancy",
        "Theoretical Occupancy", "Registers Per Thread", "Grid Size", "Block Size", "Waves Per SM",
        "Dynamic Shared Memory Per Block", "Static Shared Memory Per Block", "Mem Busy", "Max Bandwidth",
        "Warp Cycles Per Issued Instruction", "Compute (SM) Throughput")
seen = collections.OrderedDict()
for r in rows[1:]:
    if len(r) <= ix["Metric Value"]:
        continue
    key = (r[ix["ID"]], r[ix["Kernel Name"]][:40])
    name = r[ix["Metric Name"]]
    if name in want:
        seen.setdefault(key, []).append(f"{name}={r[ix['Metric Value']]}{r[ix['Metric Unit']]}")
for k, v in seen.items():
    print(k[0], k[1], "; ".join(v))
