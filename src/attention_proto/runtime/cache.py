"""Compiled-kernel cache: kernel name + constexpr values -> compiled kernel.

The counterpart of the research plan's PSO cache. Triton keeps its own
in-process cache (and a disk cache); this one sits in front of it so that we
can count hits, misses and compile seconds per variant (study 4 reads them)
and hand the compiled object (registers, spills, shared memory, cubin) to the
codegen study. It is thread-safe: compiles of one key happen once, under a
per-key lock, and other keys compile concurrently.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Tuple

from .device import interpreter_mode


@dataclass
class CacheEntry:
    kernel_name: str
    constexprs: Tuple[Tuple[str, Any], ...]
    compile_seconds: float
    compiled: Any = None  # triton CompiledKernel (None under the interpreter)
    hits: int = 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    compile_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "compile_seconds": self.compile_seconds}


def _dtype_of_first_tensor(args: Tuple[Any, ...]) -> Hashable:
    for a in args:
        dtype = getattr(a, "dtype", None)
        if dtype is not None:
            return dtype
    return None


class KernelCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key_locks: Dict[Hashable, threading.Lock] = {}
        self._entries: Dict[Hashable, CacheEntry] = {}
        self.stats = CacheStats()

    def key(self, kernel: Any, args: Tuple[Any, ...], constexprs: Dict[str, Any]) -> Hashable:
        """Kernel + constexpr values + input dtype: one entry per variant we compile on purpose.

        Triton may further specialize one entry on argument alignment (ints divisible by 16,
        pointers aligned to 16); those recompiles happen inside Triton's own cache and are not
        counted separately. The key is kept cheap because it is computed on every launch.
        """
        return (kernel, tuple((k, _freeze(v)) for k, v in constexprs.items()), _dtype_of_first_tensor(args))

    def launch(self, kernel: Any, grid: Tuple[int, ...] | Callable, *args: Any, **constexprs: Any) -> None:
        """Launch ``kernel[grid](*args, **constexprs)``, compiling (and timing it) on first use of the key."""
        key = self.key(kernel, args, constexprs)
        entry = self._entries.get(key)
        if entry is None:
            with self._lock:
                klock = self._key_locks.setdefault(key, threading.Lock())
            with klock:
                entry = self._entries.get(key)
                if entry is None:
                    t0 = time.perf_counter()
                    compiled = None
                    if not interpreter_mode():
                        compiled = kernel.warmup(*args, grid=grid, **constexprs)
                    dt = time.perf_counter() - t0
                    entry = CacheEntry(_kernel_name(kernel), key[1], dt, compiled)
                    with self._lock:
                        self._entries[key] = entry
                        self.stats.misses += 1
                        self.stats.compile_seconds += dt
                    kernel[grid](*args, **constexprs)
                    return
        with self._lock:
            entry.hits += 1
            self.stats.hits += 1
        kernel[grid](*args, **constexprs)

    def entries(self) -> list[CacheEntry]:
        with self._lock:
            return list(self._entries.values())

    def find(self, kernel_name: str) -> list[CacheEntry]:
        return [e for e in self.entries() if e.kernel_name == kernel_name]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._key_locks.clear()
            self.stats = CacheStats()


def _kernel_name(kernel: Any) -> str:
    return getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", None) or repr(kernel)


def _freeze(v: Any) -> Hashable:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v  # jit functions (score_mod hooks) hash by identity: two hooks never share an entry


#: the process-wide cache every op launches through
KERNEL_CACHE = KernelCache()
