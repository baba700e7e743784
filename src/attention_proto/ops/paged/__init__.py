"""Paged KV cache and decode attention (study 3).

- :func:`paged_attention` -- decode over a paged KV cache (V1 / V2 split-KV with a fused merge,
  automatic choice).
- :class:`PagedKVCache` -- pool, block table, lengths, page allocation and the append kernel.
- :func:`paged_kv_append` -- the append kernel on its own.
- :func:`plan` / :func:`explain` -- which kernel and partition count, and why.
- :func:`paged_attention_reference` -- the float64 ground truth.
"""
from .cache import CacheFullError, PagedKVCache, paged_kv_append
from .dispatch import PagedConfig, PagedPlan, plan
from .interface import explain, paged_attention
from .reference import gather_kv, paged_attention_reference

__all__ = [
    "CacheFullError", "PagedConfig", "PagedKVCache", "PagedPlan", "explain", "gather_kv", "paged_attention",
    "paged_attention_reference", "paged_kv_append", "plan",
]
