"""Linear attention (RetNet / simple-GLA style scalar decay): chunked kernels that train,
a fused recurrent kernel for decoding, packed sequences via ``cu_seqlens``.

Public: :func:`linear_attention`, :func:`linear_attention_step`; the float64 references
live in :mod:`.reference`.
"""
from .interface import linear_attention, linear_attention_step

__all__ = ["linear_attention", "linear_attention_step"]
