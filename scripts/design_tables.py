#!/usr/bin/env python3
"""Write docs/dispatch-tables.md: the dispatch tables as the code and the generated config table see them.

    python scripts/design_tables.py        # rewrites docs/dispatch-tables.md (no GPU needed)

The dense table is src/attention_proto/data/dense_fwd_configs.json (written by `--study flash` on the
GPU); the paged plans are what ops.paged.dispatch.plan() decides for an H100 (132 SMs).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    from attention_proto.ops.dense.configs import TABLE_PATH
    from attention_proto.ops.paged.dispatch import plan

    data = json.loads(TABLE_PATH.read_text())
    lines = ["# Dispatch tables (generated)", "",
             "Written by `python scripts/design_tables.py`; do not edit by hand.", "",
             f"## Dense forward: tuned configurations ({data.get('gpu')}, {data.get('generated_by')})", "",
             "| D | causal | N | path | BLOCK_M x BLOCK_N | warps | stages | TFLOPS |", "|---|---|---|---|---|---|---|---|"]
    for e in data["entries"]:
        if e["dtype"] != "bfloat16":
            continue
        lines.append(f"| {e['D']} | {e['causal']} | {e['N']} | {e['path']} | {e['BLOCK_M']}x{e['BLOCK_N']} | "
                     f"{e['num_warps']} | {e['num_stages']} | {e['tflops']:.0f} |")
    lines += ["", "fp16 uses the bf16 entries. Shapes outside the table fall back to the heuristic in "
              "`ops/dense/configs.py` (nearest N in log2, smallest tabulated D >= D).", "",
              "## Paged decode: V1 or V2, and how many partitions (H100, 132 SMs, GQA 32:8, D128)", "",
              "| batch | max seq len | version | partitions | reason |", "|---|---|---|---|---|"]
    for b, n in ((1, 4096), (1, 65536), (8, 4096), (8, 32768), (32, 4096), (128, 4096)):
        p = plan(batch=b, num_q_heads=32, num_kv_heads=8, q_len=1, head_dim=128, max_seq_len=n, sms=132)
        lines.append(f"| {b} | {n} | {p.version} | {p.num_partitions} | {p.reason} |")
    out = ROOT / "docs" / "dispatch-tables.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
