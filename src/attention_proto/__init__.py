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
