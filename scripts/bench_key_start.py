#!/usr/bin/env python3
"""Per-row first keys (``key_start``) against the plain causal forward at one layer (GPU).

    PYTHONPATH=src python scripts/bench_key_start.py [--n 4096] [--heads 16:4] [--repeats 2]

Times, through the library's ops (the transformers path's calls): the plain causal forward
(``torch_ops.flash_attention``), the key-start forward over one document (every first key 0: what
every inference forward with position_ids now runs), over 8 equal documents, and the computation of
the first keys from position_ids. Session 7 on an H100: one document 0.97x the plain forward.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--heads", default="16:4", help="H:Hkv")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    import torch
    import triton.testing

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from attention_proto.integrations import torch_ops

    H, Hkv = (int(x) for x in a.heads.split(":"))
    q = torch.randn(1, H, a.n, a.d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, Hkv, a.n, a.d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    one = torch.zeros(1, a.n, dtype=torch.int32, device="cuda")
    pos = torch.cat([torch.arange(a.n // a.docs)] * a.docs)[None].cuda()
    many = torch_ops.key_starts_from_positions(pos)
    for _ in range(a.repeats):
        t = {name: triton.testing.do_bench(fn, warmup=50, rep=300) for name, fn in (
            ("plain", lambda: torch_ops.flash_attention(q, k, v, causal=True)),
            ("one", lambda: torch_ops.key_start_attention(q, k, v, one)),
            ("many", lambda: torch_ops.key_start_attention(q, k, v, many)),
            ("starts", lambda: torch_ops.key_starts_from_positions(pos)))}
        print(f"B1 H{H}:{Hkv} N{a.n} D{a.d} bf16 causal, ms: plain {t['plain']:.4f}  key_start one document "
              f"{t['one']:.4f} ({t['plain'] / t['one']:.3f}x)  {a.docs} documents {t['many']:.4f}  "
              f"first keys from position_ids {t['starts']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
