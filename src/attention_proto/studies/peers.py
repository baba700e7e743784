"""The peers we measure against, as zero-argument callables over given inputs.

Each ``make_*`` returns ``(fn, None)`` or ``(None, reason)`` when the peer
cannot run here (no GPU, backend refuses the shape, missing package). Inputs
are BHSD tensors; GQA is passed natively where the peer supports it.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

Peer = Tuple[Optional[Callable[[], torch.Tensor]], Optional[str]]

SDPA_BACKENDS = {
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}


def make_sdpa(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              backward: bool = False) -> Peer:
    """SDPA pinned to one backend (no silent fallback: sdpa_kernel with a single backend raises)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[impl])
    gqa = q.shape[1] != k.shape[1]

    def fwd() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return _maybe_backward(fwd, (q, k, v), backward)


def _maybe_backward(fwd: Callable[[], torch.Tensor], inputs, backward: bool) -> Peer:
    if backward:
        for t in inputs:
            t.requires_grad_(True)
        out = fwd()
        do = torch.randn_like(out)

        def step() -> torch.Tensor:
            for t in inputs:
                t.grad = None
            o = fwd()
            o.backward(do)
            return o

        fn = step
    else:
        fn = fwd
    try:
        with torch.no_grad() if not backward else contextlib.nullcontext():
            fn()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - a peer refusing a shape is a recorded fact
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if not backward:
        def nograd() -> torch.Tensor:
            with torch.no_grad():
                return fwd()

        return nograd, None
    return fn, None


@functools.lru_cache(maxsize=1)
def compiled_flex():
    import torch._dynamo

    from torch.nn.attention.flex_attention import flex_attention

    # every shape and mask in a sweep is a new specialization; past dynamo's default
    # limit of 8, flex_attention silently falls back to an unfused eager path
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 1024)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 4096)
    return torch.compile(flex_attention, dynamic=False)


def make_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, score_mod=None, mask_mod=None,
              backward: bool = False) -> Peer:
    """Compiled FlexAttention with the same mask (bottom-right causal) and optional score_mod."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:  # pragma: no cover
        return None, f"FlexAttention unavailable: {e}"
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    off = Nk - Nq
    if causal and mask_mod is None:
        def mask_mod(b, h, q_idx, kv_idx):  # noqa: F811 - bottom-right causal
            return kv_idx <= q_idx + off
    block_mask = None
    if mask_mod is not None:
        try:
            block_mask = create_block_mask(mask_mod, None, None, Nq, Nk, device=q.device)
        except Exception as e:  # noqa: BLE001
            return None, f"create_block_mask failed: {type(e).__name__}: {e}"
    flex = compiled_flex()
    gqa = q.shape[1] != k.shape[1]

    def fwd() -> torch.Tensor:
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)

    return _maybe_backward(fwd, (q, k, v), backward)


def make_ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, backward: bool = False, **mods) -> Peer:
    from ..ops.dense.interface import attention

    def fwd() -> torch.Tensor:
        return attention(q, k, v, causal=causal, **mods)

    return _maybe_backward(fwd, (q, k, v), backward)


def bhsd(B: int, H: int, N: int, D: int, Hkv: int | None = None, Nk: int | None = None, dtype=torch.bfloat16,
         device: str = "cuda", seed: int | None = None):
    """Random q, k, v (never zeros), BHSD contiguous."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else torch.seed() % (2**31))
    Hkv = H if Hkv is None else Hkv
    Nk = N if Nk is None else Nk
    q = torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype, generator=g)
    return q, k, v

