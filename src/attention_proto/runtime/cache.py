"""Compiled-kernel cache: kernel name + constexpr values -> compiled kernel.

The counterpart of the research plan's PSO cache. Triton keeps its own
in-process cache (and a disk cache); this one sits in front of it so that we
can count hits, misses and compile seconds per variant (study 4 reads them)
and hand the compiled object (registers, spills, shared memory, cubin) to the
codegen study. It is thread-safe: compiles of one key happen once, under a
per-key lock, and other keys compile concurrently.

Direct launches (GPU only): Triton's ``kernel[grid](*args)`` binds and specializes every
argument on every call (tens of microseconds for a kernel with ~45 arguments). A caller that
launches one variant over and over with the *same* integer arguments (it keys its own launch
plan on every shape, stride and flag that produces them) can ask :meth:`KernelCache.direct` for
a :class:`DirectLaunch` after a first ordinary launch, and call the compiled kernel's launcher
itself. Triton specializes integers (== 1, divisible by 16, 32/64-bit) and pointers (16-byte
aligned); the caller guarantees the integers are unchanged, and must only take the direct path
when every pointer is 16-byte aligned, as it was at the first launch (else: :meth:`launch`).
"""
from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Tuple

from .device import interpreter_mode

_EMPTY = inspect.Parameter.empty


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
        if dtype is None:  # a host TensorDescriptor: its tensor's dtype
            dtype = getattr(getattr(a, "base", None), "dtype", None)
        if dtype is not None:
            return dtype
    return None


#: Triton's interpreter patches triton.language globally for the duration of each interpreted
#: launch, so two launches interpreted at once in two threads fail (InterpreterError); compiled
#: GPU launches are thread-safe and take no lock
_INTERPRETER_LOCK = threading.Lock()


def _run(kernel: Any, grid: Any, args: Sequence[Any], constexprs: Dict[str, Any]) -> Any:
    if interpreter_mode():
        with _INTERPRETER_LOCK:
            return kernel[grid](*args, **constexprs)
    return kernel[grid](*args, **constexprs)


class KernelCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key_locks: Dict[Hashable, threading.Lock] = {}
        self._entries: Dict[Hashable, CacheEntry] = {}
        self.stats = CacheStats()
        #: bumped by :meth:`clear`; a :class:`DirectLaunch` of an older generation steps aside
        self.generation = 0

    def key(self, kernel: Any, args: Tuple[Any, ...], constexprs: Dict[str, Any]) -> Hashable:
        """Kernel + constexpr values + input dtype: one entry per variant we compile on purpose.

        Triton may further specialize one entry on argument alignment (ints divisible by 16,
        pointers aligned to 16); those recompiles happen inside Triton's own cache and are not
        counted separately. The key is kept cheap because it is computed on every launch.
        """
        return (kernel, tuple((k, _freeze(v)) for k, v in constexprs.items()), _dtype_of_first_tensor(args))

    def launch(self, kernel: Any, grid: Tuple[int, ...] | Callable, *args: Any, **constexprs: Any) -> Any:
        """Launch ``kernel[grid](*args, **constexprs)``, compiling (and timing it) on first use of the key.

        Returns what Triton's launch returns: the ``CompiledKernel`` that ran (None under the
        interpreter), which :meth:`direct` turns into a direct launcher.
        """
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
                    return _run(kernel, grid, args, constexprs)
        with self._lock:
            entry.hits += 1
            self.stats.hits += 1
        return _run(kernel, grid, args, constexprs)

    def direct(self, kernel: Any, compiled: Any, args: Sequence[Any], constexprs: Dict[str, Any]) -> Optional["DirectLaunch"]:
        """A :class:`DirectLaunch` of ``compiled`` (what :meth:`launch` just returned for these
        ``args``/``constexprs``), or None where direct launches do not apply: the interpreter, no
        compiled kernel, a kernel whose parameters after the positional ones are not all constexpr,
        or a key this cache has not seen."""
        if compiled is None or interpreter_mode() or getattr(compiled, "function", None) is None:
            return None
        params = getattr(kernel, "params", None)
        if params is None or len(params) < len(args):
            return None
        tail = []
        for p in params[len(args):]:
            if not p.is_constexpr:
                return None
            if p.name in constexprs:
                tail.append(constexprs[p.name])
            elif p.default is not _EMPTY:
                tail.append(p.default)
            else:
                return None
        entry = self._entries.get(self.key(kernel, tuple(args), constexprs))
        if entry is None:
            return None
        get_device, get_stream = _device_fns()
        return DirectLaunch(self, entry, compiled, tuple(tail), get_device(), get_device, get_stream)

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
            self.generation += 1


class DirectLaunch:
    """Launch one compiled variant without Triton's per-call argument binding.

    ``dl(grid, args)`` launches ``args`` (the positional, non-constexpr arguments, in order) and
    returns True, or returns False without launching when the direct path does not apply right
    now: another current device than at creation, :meth:`KernelCache.clear` since, or a wrapper
    installed on the cache's ``launch`` (codegen's ``record_launches`` must see every launch).
    Launch hooks (``triton.knobs.runtime.launch_enter_hook``) are honoured as Triton does.
    Valid only under the contract in the module docstring (same integers, aligned pointers).
    """

    __slots__ = ("cache", "entry", "compiled", "tail", "device", "generation", "_get_device", "_get_stream",
                 "_run", "_function", "_packed", "_knobs")

    def __init__(self, cache: KernelCache, entry: CacheEntry, compiled: Any, tail: Tuple[Any, ...], device: int,
                 get_device: Callable[[], int], get_stream: Callable[[int], Any]) -> None:
        from triton import knobs

        self.cache, self.entry, self.compiled, self.tail, self.device = cache, entry, compiled, tail, device
        self.generation = cache.generation
        self._get_device, self._get_stream = get_device, get_stream
        self._run = compiled.run  # the launcher (loaded by the first ordinary launch)
        self._function, self._packed = compiled.function, compiled.packed_metadata
        self._knobs = knobs.runtime

    def __call__(self, grid: Tuple[int, ...], args: Tuple[Any, ...]) -> bool:
        cache = self.cache
        if cache.generation != self.generation or "launch" in cache.__dict__:
            return False
        dev = self._get_device()
        if dev != self.device:
            return False
        stream = self._get_stream(dev)
        if len(grid) != 3:
            grid = (tuple(grid) + (1, 1))[:3]
        enter, exit_ = self._knobs.launch_enter_hook, self._knobs.launch_exit_hook
        # triton 3.6 hooks are HookChains (empty list ``calls`` when unused); older ones None or callables
        if (enter is not None and getattr(enter, "calls", 1)) or (exit_ is not None and getattr(exit_, "calls", 1)):
            md = self.compiled.launch_metadata(grid, stream, *args, *self.tail)
        else:
            md = enter = exit_ = None  # nothing to call: skip the metadata and two empty Python calls
        self._run(grid[0], grid[1], grid[2], stream, self._function, self._packed, md, enter, exit_,
                  *args, *self.tail)
        with cache._lock:
            self.entry.hits += 1
            cache.stats.hits += 1
        return True


def _device_fns() -> Tuple[Callable[[], int], Callable[[int], Any]]:
    """Triton's current-device and current-stream getters (what ``JITFunction.run`` asks per launch)."""
    from triton.runtime import driver

    active = driver.active
    return active.get_current_device, active.get_current_stream


def _kernel_name(kernel: Any) -> str:
    return getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", None) or repr(kernel)


def _freeze(v: Any) -> Hashable:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v  # jit functions (score_mod hooks) hash by identity: two hooks never share an entry


#: the process-wide cache every op launches through
KERNEL_CACHE = KernelCache()
