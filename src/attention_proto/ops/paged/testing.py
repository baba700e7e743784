"""Builders for paged-attention checks (the tests and the study's interpreter mode).

Random pools with shuffled block tables and NaN-poisoned unused slots, and a
check of :func:`paged_attention` against the float64 reference under the error rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ...testing import ErrorCheck, check_error, max_abs_err
from .interface import paged_attention
from .reference import paged_attention_reference

#: LSE is computed in fp32 whatever the input dtype: its bound is this times max(1, |lse|)
LSE_TOL = 2e-5
#: keyword arguments of paged_attention that the reference understands
MOD_ARGS = ("scale", "softcap", "alibi_slopes", "window")


def make_paged(B: int, Hq: int, Hkv: int, Nq: int, D: int, page: int, lens: Sequence[int], dtype, device,
               gen: torch.Generator, spare_pages: int = 3, max_pages: Optional[int] = None, unused_fill: int = -1):
    """``(q, k_cache, v_cache, block_table, seq_lens)`` for one check.

    Pages are handed out in a random order (not in sequence); slots and pages no sequence uses
    hold NaN, and unused block-table entries hold ``unused_fill`` (-1: invalid), so that any
    read past a sequence shows up in the output.
    """
    need = [-(-n // page) for n in lens]
    max_pages = max_pages or max(max(need), 1) + 1
    num_pages = sum(need) + spare_pages
    perm = torch.randperm(num_pages, generator=gen).tolist()
    bt = torch.full((B, max_pages), unused_fill, dtype=torch.int32)
    k = torch.full((num_pages, page, Hkv, D), float("nan"), dtype=torch.float32)
    v = torch.full_like(k, float("nan"))
    it = iter(perm)
    for b, n in enumerate(lens):
        for p in range(need[b]):
            pid = next(it)
            bt[b, p] = pid
            valid = min(page, n - p * page)
            k[pid, :valid] = torch.randn(valid, Hkv, D, generator=gen)
            v[pid, :valid] = torch.randn(valid, Hkv, D, generator=gen)
    q = torch.randn(B, Hq, Nq, D, generator=gen)
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), bt.to(device), torch.tensor(list(lens), dtype=torch.int32, device=device)


@dataclass
class PagedCheck:
    out: ErrorCheck
    lse_err: float
    lse_bound: float

    @property
    def ok(self) -> bool:
        return self.out.ok and self.lse_err <= self.lse_bound

    @property
    def err_ratio(self) -> float:
        return max(self.out.ours / self.out.bound if self.out.bound else 0.0,
                   self.lse_err / self.lse_bound if self.lse_bound else 0.0)

    def __str__(self) -> str:
        return f"out: {self.out}; lse: err={self.lse_err:.3e} bound={self.lse_bound:.3e}"


def _cpu(v):
    return v.cpu() if isinstance(v, torch.Tensor) else v


def compare_paged(out, lse, q, kc, vc, bt, lens, dtype, **mods) -> PagedCheck:
    """Compare a paged-attention result ``(out, lse)`` with the float64 reference.

    The output is held to the error rule (factor 2 against the reference run in ``dtype``);
    the LSE (fp32 in every dtype) to :data:`LSE_TOL` x max(1, |lse|).
    """
    mods = {k: _cpu(v) for k, v in mods.items()}
    args = (q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), lens.cpu())
    ref, ref_lse = paged_attention_reference(*args, **mods)
    low, _ = paged_attention_reference(*args, compute_dtype=dtype, **mods)
    chk = check_error(out, low, ref, dtype)
    err = max_abs_err(lse, ref_lse)
    finite = torch.isfinite(ref_lse)
    scale = max(1.0, float(ref_lse[finite].abs().max())) if finite.any() else 1.0
    return PagedCheck(chk, err, LSE_TOL * scale)


def check_paged(q, kc, vc, bt, lens, dtype, **kw) -> PagedCheck:
    """Run :func:`paged_attention` (with LSE; ``kw`` passes through) and :func:`compare_paged` it."""
    out, lse = paged_attention(q, kc, vc, bt, lens, return_lse=True, **kw)
    mods = {k: v for k, v in kw.items() if k in MOD_ARGS}
    return compare_paged(out, lse, q, kc, vc, bt, lens, dtype, **mods)


def assert_paged(q, kc, vc, bt, lens, dtype, what: str = "", **kw) -> PagedCheck:
    res = check_paged(q, kc, vc, bt, lens, dtype, **kw)
    if not res.ok:
        raise AssertionError(f"{what}: paged attention above the error rule ({res})")
    return res
