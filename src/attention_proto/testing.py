"""The error rule every kernel test uses.

Our error against the float64 reference must be at most ``factor`` times
PyTorch's own error in the same dtype (the same math run eagerly in that
dtype), plus a small floor. factor is 2 for forward outputs, 3 for gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: floor added to the bound, per dtype (about one unit of rounding near 1.0)
ERROR_FLOOR = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


@dataclass
class ErrorCheck:
    ours: float
    torch_err: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.ours <= self.bound

    def __str__(self) -> str:
        return f"ours={self.ours:.3e} torch={self.torch_err:.3e} bound={self.bound:.3e}"


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |x - ref| over finite reference entries; NaN/inf in x where ref is finite counts as inf.

    Computed in float64 on the GPU when either tensor is there (IEEE float64 arithmetic, so the
    same number as on the CPU), with one device-to-host read: the GPU fuzz runs thousands of
    these, and a copy to the host plus CPU reductions per check made them CPU- and sync-bound."""
    dev = x.device if x.device.type != "cpu" else ref.device
    x = x.detach().to(dev, torch.float64)
    ref = ref.detach().to(dev, torch.float64)
    if x.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {tuple(x.shape)} vs reference {tuple(ref.shape)}")
    if x.numel() == 0:
        return 0.0
    both_inf = torch.isinf(ref) & (x == ref)
    diff = (x - ref).abs()
    diff = torch.where(both_inf, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max())


def check_error(ours: torch.Tensor, torch_lowp: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, factor: float = 2.0) -> ErrorCheck:
    e_ours = max_abs_err(ours, ref64)
    e_torch = max_abs_err(torch_lowp, ref64)
    r = ref64.detach()
    # the largest finite |reference| (0 when there is none), read once
    top = float(torch.where(torch.isfinite(r), r.abs(), torch.zeros((), dtype=r.dtype, device=r.device)).max()) \
        if r.numel() else 0.0
    scale = max(1.0, top)
    bound = factor * e_torch + ERROR_FLOOR.get(dtype, 1e-5) * scale
    return ErrorCheck(e_ours, e_torch, bound)


def assert_close_rule(ours, torch_lowp, ref64, dtype, factor: float = 2.0, what: str = "output") -> ErrorCheck:
    chk = check_error(ours, torch_lowp, ref64, dtype, factor)
    if not chk.ok:
        raise AssertionError(f"{what}: error above the rule ({chk})")
    return chk


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that unwritten outputs show up."""
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    return t
