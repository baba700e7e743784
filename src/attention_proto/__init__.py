"""attention-proto: fast Triton attention kernels behind one typed API.

Without a CUDA GPU the Triton kernels run in Triton's interpreter. Triton
decides at decoration time whether a kernel is interpreted, so the switch is
made here, before any kernel module is imported.
"""
from __future__ import annotations

import os as _os

if "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"

__version__ = "0.1.0"

# Public names, imported on first use so that `import attention_proto` stays cheap and a CLI
# command that needs no kernel compiles none.
_EXPORTS = {
    "attention": "attention_proto.api",
    "attention_varlen": "attention_proto.api",
    "explain": "attention_proto.api",
    "Attention": "attention_proto.api",
    "DenseAttention": "attention_proto.api",
    "VarlenAttention": "attention_proto.api",
    "PagedDecodeAttention": "attention_proto.api",
    "LinearAttention": "attention_proto.api",
    "DenseTensor": "attention_proto.api",
    "PackedTensor": "attention_proto.api",
    "PagedKV": "attention_proto.api",
    "scaled_dot_product_attention": "attention_proto.sdpa",
    "NoBackendError": "attention_proto.dispatch",
    "paged_attention": "attention_proto.ops.paged.interface",
    "PagedKVCache": "attention_proto.ops.paged.cache",
    "linear_attention": "attention_proto.ops.linear.interface",
    "linear_attention_step": "attention_proto.ops.linear.interface",
    "RopeSpec": "attention_proto.ops.dense.rope",
    "alibi_slopes": "attention_proto.ops.dense.reference",
    "attention_reference": "attention_proto.ops.dense.reference",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attention_proto' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
