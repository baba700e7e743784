"""Device facts: what GPU (if any) we run on and the software around it."""
from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def interpreter_mode() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (no GPU, or forced)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False") or not cuda_available()


def kernel_device() -> str:
    """Where kernel inputs must live: 'cuda' on a GPU, 'cpu' under the interpreter."""
    return "cpu" if interpreter_mode() else "cuda"


def slugify(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


def gpu_name() -> str:
    if not cuda_available():
        return "cpu-interpreter"
    import torch

    return torch.cuda.get_device_name(0)


def gpu_slug() -> str:
    """Folder name under results/ for this GPU, e.g. 'nvidia-h100-80gb-hbm3'."""
    return slugify(gpu_name())


def git_commit(repo: Path | None = None) -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes); ``ATTENTION_PROTO_COMMIT`` wins
    when set: a copied tree (the GPU machine's) may carry a stale ``.git`` of another commit."""
    given = os.environ.get("ATTENTION_PROTO_COMMIT")
    if given:
        return given
    repo = repo or Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        # outside a repository some git versions echo the argument back: accept only a hash
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def device_facts() -> Dict[str, Any]:
    """GPU name, compute capability, SM count, shared memory, L2, driver and versions."""
    import torch
    import triton

    facts: Dict[str, Any] = {
        "gpu": gpu_name(),
        "gpu_slug": gpu_slug(),
        "mode": "interpreter" if interpreter_mode() else "gpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import numpy

        facts["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    if cuda_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            total_memory_gb=round(props.total_memory / 2**30, 1),
            l2_bytes=getattr(props, "L2_cache_size", None),
            shared_memory_per_block_optin=getattr(props, "shared_memory_per_block_optin", None),
            shared_memory_per_sm=getattr(props, "shared_memory_per_multiprocessor", None),
            registers_per_sm=getattr(props, "regs_per_multiprocessor", None),
            driver=_driver_version(),
            cudnn=str(torch.backends.cudnn.version()),
        )
    else:
        facts.update(compute_capability=None, sm_count=None, driver="none")
    return facts


def sm_count() -> int:
    facts = device_facts()
    return int(facts.get("sm_count") or 132)


def _device_property(device: Any, name: str, default: int) -> int:
    """An integer property of ``device`` (default: the current CUDA device) from torch's cached device
    properties (not :func:`device_facts`); ``default`` without a GPU or where it reads 0."""
    import torch

    if device is not None and torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return default
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return int(getattr(props, name, 0)) or default


def sm_count_of(device: Any = None) -> int:
    """Streaming multiprocessors of ``device``; 132, an H100's, without a GPU."""
    return _device_property(device, "multi_processor_count", 132)


def l2_bytes(device: Any = None) -> int:
    """The L2 cache of ``device`` in bytes; 50 MB, an H100's, without a GPU."""
    return _device_property(device, "L2_cache_size", 50 * 2**20)


def is_hopper() -> bool:
    cc = device_facts().get("compute_capability")
    return bool(cc) and cc.startswith("9.")
