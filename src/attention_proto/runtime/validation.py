"""Input validation with typed errors.

Every public entry point checks its inputs here before any kernel runs. Errors
name the argument, say what was received (shape, dtype, device) and what is
supported. Never a bare ``assert`` on user input.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch


def describe(t: object) -> str:
    """Short description of a tensor (or anything) for error messages."""
    if isinstance(t, torch.Tensor):
        return f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device})"
    return f"{type(t).__name__}({t!r})"


def require_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {describe(t)}")
    return t


def require_rank(name: str, t: torch.Tensor, ranks: int | Sequence[int], what: str = "") -> None:
    ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if t.dim() not in ranks:
        shape_txt = f" ({what})" if what else ""
        raise ValueError(
            f"{name} must have {' or '.join(map(str, ranks))} dimensions{shape_txt}; "
            f"got {describe(t)}"
        )


def require_dtype(name: str, t: torch.Tensor, dtypes: Iterable[torch.dtype]) -> None:
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        supported = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {supported} (got {describe(t)})")


def require_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    first = tensors[0].dtype
    if any(t.dtype != first for t in tensors):
        got = ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors))
        raise TypeError(f"{', '.join(names)} must share one dtype; got {got}")


def require_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    first = tensors[0].device
    if any(t.device != first for t in tensors):
        got = ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors))
        raise ValueError(f"{', '.join(names)} must be on one device; got {got}")


def require_choice(name: str, value: object, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def require_int_tensor(name: str, t: object, rank: int | None = None) -> torch.Tensor:
    t = require_tensor(name, t)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor; got {describe(t)}")
    if rank is not None:
        require_rank(name, t, rank)
    return t
