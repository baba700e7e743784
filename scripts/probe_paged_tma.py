#!/usr/bin/env python3
"""Does a TMA decode kernel stream pages faster than the pointer-gather one? (GPU, issue #5, ~2 min)

At B8 N4k (GQA 32:8, D128, page 16, bf16, 134 MB of K/V) our decode kernel takes ~49.7 us and the
merge 2.6 us against ~46.1 us for a contiguous read of the same bytes; the bar needs both within
~2.4 us of the read (finding ``paged-time-breakdown``). Every earlier variant loaded K/V with pointer
gathers (cp.async through the block table). Untried: Hopper's TMA. A 4-D tensor descriptor over the
pool ``[num_pages, page_size, Hkv, D]`` loads one page's rows of one KV head (``[1, BLOCK_N, 1, D]``,
16 rows of 256 B at page 16) straight into shared memory: no address registers, no per-row gather,
and Triton pipelines descriptor loads with mbarriers (``tl.range(..., num_stages)``).

Timed (CUPTI kernel durations and graph-replay wall, L2 emptied by a read before each call):
our decode (auto: V2 P4, pointer gathers) + its merge kernel; the TMA decode at several partition
counts, pipeline depths and pages per loop step, merged by the same reduce kernel or by the last
program of each (sequence, KV head) (``fused``: no second launch); the same kernel with pointer
loads of each page's rows (``ptr``) and with two independent softmax chains; the contiguous read.
Every variant of the probe's kernel is first checked against our decode's output (bf16, max |diff|).
The probe's kernel keeps the name ``_tma_decode_kernel`` in both load modes (the committed outputs'
kernel times are keyed by it).

    PYTHONPATH=src python scripts/probe_paged_tma.py     # writes $OUT/probe_paged_tma.json
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_proto.ops.paged.decode import _merge_partials, _paged_reduce_kernel  # noqa: E402

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tma_softmax_step(acc, l_i, m_i, q, k, v, offs_n, end, qk_scale):
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(offs_n[None, :] < end, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _load_page_rows(desc, Base, page, slot, kvh, s_p, s_t, s_h,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    if USE_TMA:
        t = desc.load([page, slot, kvh, 0]).reshape([BLOCK_N, HEAD_DIM])
    else:
        rows = slot + tl.arange(0, BLOCK_N)
        t = tl.load(Base + page.to(tl.int64) * s_p + rows[:, None] * s_t + kvh * s_h + tl.arange(0, HEAD_DIM)[None, :])
    return t


@triton.jit
def _tma_decode_kernel(
    desc_k, desc_v, K, V, Q, BT, SL, Out, Lse, PO, PL, Ctr,
    qk_scale, tokens_per_part, num_parts, num_pages, max_pages, Hkv, G,
    s_qb, s_qh, s_btb, s_p, s_t, s_h,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGES_PER_STEP: tl.constexpr, CHAINS: tl.constexpr, USE_TMA: tl.constexpr, NUM_STAGES: tl.constexpr,
    FUSED: tl.constexpr,
):
    # one program per (sequence, KV head, partition); Nq = 1, no modifiers (the probe's shape).
    # CHAINS 2: even and odd pages feed two independent online softmaxes (merged at the end), so two
    # dependent dot -> max -> exp -> dot chains are in flight at once
    pid = tl.program_id(0)
    part = tl.program_id(1)
    kvh = pid % Hkv
    b = (pid // Hkv).to(tl.int64)
    seq_len = tl.load(SL + b)
    kv_end = tl.minimum(seq_len, max_pages * PAGE_SIZE)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < G
    head = kvh * G + offs_m
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * s_qb + head[:, None] * s_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    start = part * tokens_per_part
    end = tl.minimum(start + tokens_per_part, kv_end)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    m_b = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_b = tl.zeros([BLOCK_M], tl.float32)
    acc_b = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = BT + b * s_btb
    STEP: tl.constexpr = BLOCK_N * PAGES_PER_STEP
    for n0 in tl.range(start, end, STEP, num_stages=NUM_STAGES):
        # BLOCK_N <= PAGE_SIZE: one load per page (and per pages-per-step)
        page = tl.load(bt_row + n0 // PAGE_SIZE)
        page = tl.minimum(tl.maximum(page, 0), num_pages - 1)
        slot = n0 % PAGE_SIZE
        k = _load_page_rows(desc_k, K, page, slot, kvh, s_p, s_t, s_h, BLOCK_N, HEAD_DIM, USE_TMA)
        v = _load_page_rows(desc_v, V, page, slot, kvh, s_p, s_t, s_h, BLOCK_N, HEAD_DIM, USE_TMA)
        if PAGES_PER_STEP == 2:
            n1 = n0 + BLOCK_N
            page1 = tl.load(bt_row + n1 // PAGE_SIZE, mask=n1 < end, other=0)
            page1 = tl.minimum(tl.maximum(page1, 0), num_pages - 1)
            k1 = _load_page_rows(desc_k, K, page1, n1 % PAGE_SIZE, kvh, s_p, s_t, s_h, BLOCK_N, HEAD_DIM, USE_TMA)
            v1 = _load_page_rows(desc_v, V, page1, n1 % PAGE_SIZE, kvh, s_p, s_t, s_h, BLOCK_N, HEAD_DIM, USE_TMA)
            acc, l_i, m_i = _tma_softmax_step(acc, l_i, m_i, q, k, v, n0 + tl.arange(0, BLOCK_N), end, qk_scale)
            if CHAINS == 2:
                acc_b, l_b, m_b = _tma_softmax_step(acc_b, l_b, m_b, q, k1, v1, n1 + tl.arange(0, BLOCK_N), end,
                                                    qk_scale)
            else:
                acc, l_i, m_i = _tma_softmax_step(acc, l_i, m_i, q, k1, v1, n1 + tl.arange(0, BLOCK_N), end, qk_scale)
        else:
            acc, l_i, m_i = _tma_softmax_step(acc, l_i, m_i, q, k, v, n0 + tl.arange(0, BLOCK_N), end, qk_scale)
    if CHAINS == 2:
        m_new = tl.maximum(m_i, m_b)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        wa = tl.math.exp2(m_i - m_use)
        wb = tl.math.exp2(m_b - m_use)
        acc = acc * wa[:, None] + acc_b * wb[:, None]
        l_i = l_i * wa + l_b * wb
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    prow = (b * Hkv + kvh) * G + offs_m  # = b * Hq + head: the [B, Hq, 1, P, D] partial order
    tl.store(PO + (prow[:, None] * num_parts + part) * HEAD_DIM + offs_d[None, :], o, mask=row_ok[:, None])
    tl.store(PL + prow * num_parts + part, lse, mask=row_ok)
    if FUSED:
        tl.debug_barrier()
        ticket = tl.atomic_add(Ctr + pid, 1, sem="acq_rel", scope="gpu")
        if ticket == num_parts - 1:
            _merge_partials(PO, PL, Out, Lse, b, kvh, 0, num_parts, num_parts, G, Hkv, 1, G,
                            Hkv * G * HEAD_DIM, HEAD_DIM, HEAD_DIM, Hkv * G, 1, 1,
                            HEAD_DIM, BLOCK_M, HEAD_DIM, BLOCK_M, 2)
            tl.atomic_xchg(Ctr + pid, 0, sem="relaxed", scope="gpu")


def tma_decode(q, kc, vc, bt, sl, P, stages, warps, pages_per_step=1, fused=False, block_n=16, chains=1,
               use_tma=True):
    """A launcher for the probe's shapes (q [B, Hq, 1, D] contiguous, NHD pools); returns a closure."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, Hq, _, D = q.shape
    num_pages, page, Hkv, _ = kc.shape
    G = Hq // Hkv
    N = bt.shape[1] * page
    tpp = N // P
    if N % P or tpp % (block_n * pages_per_step) or block_n > page:
        # a partition must start on a page (and a step) boundary: a [1, BLOCK_N] box from a mid-page slot
        # would run past the page (TMA fills zeros there: a fast, wrong result)
        raise ValueError(f"P={P} cuts N={N} into {N / P:g}-token partitions; they must be multiples of "
                         f"{block_n * pages_per_step} tokens (BLOCK_N {block_n} <= page {page})")
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, 1, device=q.device, dtype=torch.float32)
    po = torch.empty(B, Hq, 1, P, D, device=q.device, dtype=torch.float32)
    pl = torch.empty(B, Hq, 1, P, device=q.device, dtype=torch.float32)
    ctr = torch.zeros(B * Hkv, device=q.device, dtype=torch.int32)
    if use_tma:
        dk = TensorDescriptor(kc, list(kc.shape), list(kc.stride()), [1, block_n, 1, D])
        dv = TensorDescriptor(vc, list(vc.shape), list(vc.stride()), [1, block_n, 1, D])
    else:
        dk = dv = None
    scale = D ** -0.5 * 1.4426950408889634

    def run():
        _tma_decode_kernel[(B * Hkv, P)](
            dk, dv, kc, vc, q, bt, sl, out, lse, po, pl, ctr, scale, tpp, P, num_pages, bt.shape[1], Hkv, G,
            q.stride(0), q.stride(1), bt.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
            PAGE_SIZE=page, HEAD_DIM=D, BLOCK_M=16, BLOCK_N=block_n, PAGES_PER_STEP=pages_per_step,
            CHAINS=chains, USE_TMA=use_tma, NUM_STAGES=stages, FUSED=fused, num_warps=warps, num_stages=stages)
        if not fused:
            _paged_reduce_kernel[(B * Hq,)](po, pl, out, lse, P, HEAD_DIM=D, BLOCK_P=16, BLOCK_D=D, num_warps=4)
        return out

    return run


def main() -> int:
    from bench_paged import Timer, read_only_fn
    from probe_paged_layout import inputs

    from attention_proto.ops.paged import PagedConfig, paged_attention
    from attention_proto.runtime.ceilings import measure_copy
    from attention_proto.runtime.timing import kernel_times_clean_l2
    from attention_proto.studies.paged import _graphed as graphed

    timer = Timer(True, 10.0, 40.0)
    copy = measure_copy()[0]
    B, N = 8, 4096
    q, kc, vc, bt, sl, nbytes = inputs(B, N, "nhd")
    base = dict(check_inputs=False, max_seq_len=N, total_tokens=B * N)
    ref = paged_attention(q, kc, vc, bt, sl, **base)
    variants = [("decode auto (pointer gathers)", lambda: paged_attention(q, kc, vc, bt, sl, **base)),
                ("decode n32 w4 P4 (pointer gathers)", lambda: paged_attention(
                    q, kc, vc, bt, sl, **base, version="v2", num_partitions=4,
                    config=PagedConfig(16, 32, 128, 4, 5, "kernel")))]
    # (P, stages, warps, pages per step, chains, TMA, fused)
    for P, stages, warps, pps, chains, tma, fused in [
        (8, 8, 4, 1, 1, True, False), (8, 8, 2, 1, 1, True, False),
        (4, 8, 4, 2, 2, True, False), (4, 12, 4, 2, 2, True, False), (8, 8, 4, 2, 2, True, False),
        (2, 12, 4, 2, 2, True, False), (4, 8, 2, 2, 2, True, False),
        (4, 5, 4, 1, 1, False, False), (4, 7, 4, 2, 2, False, False), (8, 7, 4, 2, 2, False, False),
        (4, 9, 4, 2, 2, False, False),
        (4, 8, 4, 2, 2, True, True), (8, 8, 4, 2, 2, True, True),
    ]:
        name = (f"{'tma' if tma else 'ptr'} P{P} s{stages} w{warps}" + (f" x{pps}" if pps > 1 else "")
                + (" 2 chains" if chains == 2 else "") + (" fused" if fused else ""))
        variants.append((name, tma_decode(q, kc, vc, bt, sl, P, stages, warps, pps, fused, chains=chains,
                                          use_tma=tma)))
    variants.append(("read (contiguous)", read_only_fn(nbytes, "cuda")))
    res = dict(gpu=torch.cuda.get_device_name(), copy_gbps=copy, kv_bytes=nbytes, rows={})
    for name, fn in variants:
        row = {}
        try:
            if name.startswith(("tma", "ptr")):
                got = fn()
                torch.cuda.synchronize()
                got = fn()  # the fused counters were reset by the first call
                row["max_abs_diff_vs_auto"] = float((got.float() - ref.float()).abs().max())
            replay = graphed(fn)
            wall = timer.clean(replay) * 1e3
            row.update(wall_us=wall, kernels_us=kernel_times_clean_l2(replay, 20),
                       pct_copy=100 * nbytes / (wall * 1e3) / copy)
        except Exception as e:  # a variant that does not compile is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["rows"][name] = row
        print(name, row, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "probe_paged_tma.json").write_text(json.dumps(res, indent=1))
    print(res["gpu"], f"copy {copy:.0f} GB/s; B8 N4k, 134 MB; L2 emptied by a read before each call")
    for name, r in res["rows"].items():
        if "error" in r:
            print(f"  {name:32s} {r['error'][:100]}")
            continue
        print(f"  {name:32s} wall {r['wall_us']:6.2f} us ({r['pct_copy']:3.0f}% of copy)  diff "
              f"{r.get('max_abs_diff_vs_auto', 0):.1e}  kernels "
              + ", ".join(f"{k[:22]} {t:.2f}" for k, t in r["kernels_us"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
