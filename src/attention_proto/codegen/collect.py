"""Get the compiled code of each Python path to the GPU, disassembled and digested.

Sources of cubins:

- **ours**: every kernel launches through ``runtime.cache.KERNEL_CACHE``, whose entries hold the
  Triton ``CompiledKernel`` (``.asm["cubin"]``, registers and spills from the driver, shared
  memory and warps from its metadata). :class:`record_launches` notes which entries a call of a
  public function launched (hits included, so kernels compiled earlier by another study count).
- **Triton-based compilers** (FlexAttention and ``torch.compile``/Inductor, Helion): they compile
  through Triton's on-disk cache. :func:`fresh_compile_caches` points ``TRITON_CACHE_DIR`` (and
  Inductor's cache, through ``torch._inductor.utils.fresh_cache``) at a new temporary folder
  and resets dynamo, so that everything compiled inside lands there;
  :func:`triton_cache_kernels` reads the ``*.cubin`` files back with their ``*.json`` metadata.
- Inductor's generated wrapper code (``torch._inductor.utils.run_and_get_code``) tells which of
  those kernels the compiled graph calls and what it hands to libraries instead (``extern_kernels.bmm``
  is cuBLAS; ``aten._scaled_dot_product_*`` is a fused attention kernel from PyTorch's library):
  :func:`inductor_calls`.

Triton 3.6 keeps no SASS of its own: cubins are disassembled with the ``cuobjdump`` that the
Triton wheel ships (``triton.knobs.nvidia.cuobjdump``), as ``cuobjdump -res-usage -sass``.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .sass import HOPPER, SassFunction, SmLimits, class_counts, occupancy, parse_sass, ptx_counts, summary_counts

# ---------------------------------------------------------------------------- disassembly


def cuobjdump_path() -> Optional[str]:
    """Triton's bundled cuobjdump, else one on PATH; None when there is none."""
    try:
        import triton

        p = triton.knobs.nvidia.cuobjdump.path
        if p and os.path.exists(p):
            return p
    except Exception:  # noqa: BLE001 - older triton, or no nvidia backend
        pass
    return shutil.which("cuobjdump")


def disassemble(cubin: bytes, tool: Optional[str] = None, timeout: float = 120.0) -> str:
    """``cuobjdump -res-usage -sass`` of a cubin, as text."""
    tool = tool or cuobjdump_path()
    if not tool:
        raise RuntimeError("no cuobjdump: neither triton's bundled one nor one on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([tool, "-res-usage", "-sass", str(path)], capture_output=True, text=True,
                             timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed ({res.returncode}): {res.stderr.strip()[:300]}")
    return res.stdout


# ---------------------------------------------------------------------------- one kernel's digest


@dataclass
class KernelCode:
    """One compiled kernel: its SASS digest and resources."""

    name: str
    source: str                              # "kernel_cache" | "triton_cache"
    sass: Optional[SassFunction] = None
    registers: Optional[int] = None          # per thread
    spill_bytes: Optional[int] = None        # per-thread local memory (stack + local): spills in Triton code
    shared_bytes: Optional[int] = None       # per block, dynamic + user static (without the 1 KB reserve)
    num_warps: Optional[int] = None          # all warps of a block (warp-specialized partitions included)
    num_stages: Optional[int] = None
    config: Dict[str, Any] = field(default_factory=dict)
    used: Optional[bool] = None              # called by the compiled graph (Inductor), where known
    error: Optional[str] = None
    ptx: Optional[Dict[str, int]] = None     # sass.ptx_counts of the kernel's PTX, where it was at hand

    def digest(self, limits: SmLimits = HOPPER) -> Dict[str, Any]:
        """A JSON-ready dict for a measurement row's ``extra``."""
        d: Dict[str, Any] = {"name": self.name, "source": self.source, "registers": self.registers,
                             "spill_bytes": self.spill_bytes, "shared_bytes": self.shared_bytes,
                             "num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.config:
            d["config"] = self.config
        if self.used is not None:
            d["used"] = self.used
        if self.error:
            d["error"] = self.error
        if self.ptx is not None:
            d["ptx"] = self.ptx
        if self.sass is not None:
            s = self.sass.summary()
            d.update(arch=s["arch"], total=s["total"], in_loops=s["in_loops"], main_loop=s["main_loop"],
                     main_loop_span=s["main_loop_span"], n_loops=s["n_loops"], hgmma_shapes=s["hgmma_shapes"],
                     families_total=summary_counts(s["total"]),
                     families_main_loop=summary_counts(s["main_loop"]) if s["main_loop"] else None)
            for k in ("total", "in_loops", "main_loop"):
                if d.get(k):
                    d[k] = _compact(d[k])
        if self.registers and self.num_warps:
            occ = occupancy(self.registers, self.shared_bytes or 0, self.num_warps * 32, limits)
            d["occupancy"] = {k: occ[k] for k in ("blocks_per_sm", "warps_per_sm", "occupancy", "limiter")}
        return d


def _compact(counts: Dict[str, int]) -> Dict[str, int]:
    """The report classes (zeros kept) and other opcodes only where non-zero."""
    from .sass import CLASSES

    return {k: v for k, v in counts.items() if k in CLASSES or v}


def analyze_cubin(name: str, cubin: bytes, source: str, *, meta: Optional[Dict[str, Any]] = None,
                  registers: Optional[int] = None, spill_bytes: Optional[int] = None,
                  tool: Optional[str] = None, ptx: Optional[str] = None) -> KernelCode:
    """Disassemble and digest one cubin; ``meta`` is Triton's metadata (``shared``, ``num_warps``, ...)."""
    meta = meta or {}
    kc = KernelCode(name=name, source=source, num_warps=meta.get("num_warps"), num_stages=meta.get("num_stages"))
    if ptx:
        kc.ptx = ptx_counts(ptx)
    try:
        fns = parse_sass(disassemble(cubin, tool))
    except Exception as e:  # noqa: BLE001 - one bad cubin is a recorded fact, not a failed study
        kc.error = f"{type(e).__name__}: {str(e)[:200]}"
        return kc
    fn = fns.get(name) or (max(fns.values(), key=lambda f: len(f.instrs)) if fns else None)
    kc.sass = fn
    res = fn.res if fn is not None else None
    kc.registers = registers if registers else (res.registers if res else None)
    kc.spill_bytes = res.local_bytes if res is not None else spill_bytes
    static_user = max(0, res.shared - HOPPER.smem_reserved_per_block) if res is not None else 0
    dyn = meta.get("shared")
    kc.shared_bytes = (int(dyn) if dyn is not None else 0) + static_user
    return kc


def from_compiled(compiled: Any, name: Optional[str] = None, config: Optional[Dict[str, Any]] = None,
                  tool: Optional[str] = None) -> KernelCode:
    """Digest a Triton ``CompiledKernel`` (registers and spills from the driver where it loaded)."""
    md = getattr(compiled, "metadata", None)
    kname = getattr(md, "name", None) or name or "kernel"
    meta = {"shared": getattr(md, "shared", None), "num_warps": getattr(md, "num_warps", None),
            "num_stages": getattr(md, "num_stages", None)}
    regs = spills = None
    try:  # loads the module on first access: only works on the GPU
        regs, spills = int(compiled.n_regs), int(compiled.n_spills) * 4
    except Exception:  # noqa: BLE001
        pass
    try:
        cubin = compiled.asm["cubin"]
    except Exception as e:  # noqa: BLE001
        return KernelCode(kname, "kernel_cache", config=dict(config or {}), error=f"no cubin: {type(e).__name__}: {e}")
    try:
        ptx = compiled.asm.get("ptx")
    except Exception:  # noqa: BLE001
        ptx = None
    kc = analyze_cubin(kname, cubin, "kernel_cache", meta=meta, registers=regs, spill_bytes=spills, tool=tool,
                       ptx=ptx if isinstance(ptx, str) else None)
    kc.config = dict(config or {})
    return kc


# ---------------------------------------------------------------------------- ours: the kernel cache


class record_launches:
    """Context manager: which ``KERNEL_CACHE`` entries did the calls inside launch (in order, once each)?

    It wraps the cache's ``launch`` on the instance for the duration (single-threaded use) and
    notes each launch's cache key, kernel name and constexprs.
    """

    def __init__(self) -> None:
        from ..runtime.cache import KERNEL_CACHE

        self.cache = KERNEL_CACHE
        self.launches: List[Tuple[Any, str, Dict[str, Any]]] = []

    def __enter__(self) -> "record_launches":
        orig = self.cache.launch
        launches, cache, seen = self.launches, self.cache, set()

        def launch(kernel, grid, *args, **constexprs):
            key = cache.key(kernel, args, constexprs)
            try:
                new = key not in seen
                seen.add(key)
            except TypeError:  # an unhashable key: keep every launch
                new = True
            if new:
                launches.append((key, _kernel_name(kernel), dict(constexprs)))
            return orig(kernel, grid, *args, **constexprs)

        self.cache.launch = launch  # instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> bool:
        self.cache.__dict__.pop("launch", None)
        return False

    def entries(self) -> list:
        """The cache entries launched: by exact key where the cache exposes it, else by name + constexprs."""
        table = getattr(self.cache, "_entries", None)
        all_entries = self.cache.entries()
        out = []
        for key, name, cx in self.launches:
            e = None
            if isinstance(table, dict):
                try:
                    e = table.get(key)
                except TypeError:
                    e = None
            if e is None:
                e = next((x for x in reversed(all_entries) if x.kernel_name == name and dict(x.constexprs) == cx), None)
            if e is not None and all(e is not o for o in out):
                out.append(e)
        return out

    def kernel_codes(self, tool: Optional[str] = None) -> List[KernelCode]:
        out = []
        for e in self.entries():
            cfg = {k: v for k, v in e.constexprs if isinstance(v, (int, float, str, bool)) or v is None}
            if e.compiled is None:
                out.append(KernelCode(e.kernel_name, "kernel_cache", config=cfg,
                                      error="not compiled (Triton interpreter)"))
            else:
                out.append(from_compiled(e.compiled, e.kernel_name, cfg, tool))
        return out


def _kernel_name(kernel: Any) -> str:
    return getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", None) or repr(kernel)


# ---------------------------------------------------------------------------- Triton's cache (Inductor, Flex, Helion)


@dataclass
class Capture:
    folder: Path
    triton_dir: Path
    notes: List[str] = field(default_factory=list)


@contextlib.contextmanager
def fresh_compile_caches(reset_dynamo: bool = True) -> Iterator[Capture]:
    """Compile into new, empty caches: Triton's (``TRITON_CACHE_DIR``) and Inductor's.

    Uses ``torch._inductor.utils.fresh_cache`` where it exists (it also clears Inductor's
    in-memory kernel caches, so a kernel compiled earlier in the process is compiled again), and
    resets dynamo so that compiled functions re-trace. Read the kernels with
    ``triton_cache_kernels(capture.folder)``. The folder is removed when the process exits, not
    here: a compiled function may still load a cubin from it later.
    """
    root = Path(tempfile.mkdtemp(prefix="ap-codegen-"))
    cap = Capture(root, root / "triton")
    old = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    stack = contextlib.ExitStack()
    try:
        fresh = None
        try:
            from torch._inductor import utils as iu

            fresh = getattr(iu, "fresh_cache", None) or getattr(iu, "fresh_inductor_cache", None)
        except Exception as e:  # noqa: BLE001
            cap.notes.append(f"no inductor fresh_cache: {type(e).__name__}: {e}")
        if fresh is not None:
            try:
                stack.enter_context(fresh(dir=str(root), delete=False))
            except TypeError:  # older signature
                stack.enter_context(fresh())
        # our own folder for Triton, whatever fresh_cache chose (Helion and plain Triton read this too)
        os.environ["TRITON_CACHE_DIR"] = str(cap.triton_dir)
        if reset_dynamo:
            try:
                import torch._dynamo

                torch._dynamo.reset()
            except Exception as e:  # noqa: BLE001
                cap.notes.append(f"dynamo reset failed: {type(e).__name__}: {e}")
        yield cap
    finally:
        stack.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        atexit.register(shutil.rmtree, root, True)


def cubins_in(folder: Path) -> List[Tuple[str, bytes, Dict[str, Any]]]:
    """(kernel name, cubin, metadata) for every ``*.cubin`` under ``folder`` (Triton's cache layout:
    ``<hash>/<name>.cubin`` beside ``<name>.json`` and ``<name>.ptx``; the PTX text, when there, is
    handed on as ``meta["_ptx"]``)."""
    out = []
    for cubin in sorted(Path(folder).rglob("*.cubin")):
        meta: Dict[str, Any] = {}
        js = cubin.with_suffix(".json")
        if js.exists():
            try:
                meta = json.loads(js.read_text())
            except (OSError, ValueError):
                meta = {}
        ptx = cubin.with_suffix(".ptx")
        if ptx.exists():
            try:
                meta["_ptx"] = ptx.read_text()
            except OSError:
                pass
        out.append((meta.get("name") or cubin.stem, cubin.read_bytes(), meta))
    return out


def triton_cache_kernels(folder: Path, used_names: Optional[Sequence[str]] = None,
                         tool: Optional[str] = None) -> List[KernelCode]:
    """Digest every kernel compiled into a Triton cache folder (one per name, the last one found)."""
    seen: Dict[str, KernelCode] = {}
    for name, cubin, meta in cubins_in(folder):
        kc = analyze_cubin(name, cubin, "triton_cache", meta=meta, tool=tool, ptx=meta.get("_ptx"))
        if used_names is not None:
            kc.used = name in set(used_names)
        kc.config = {k: meta[k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in meta}
        seen[name] = kc
    return list(seen.values())


_TRITON_KERNEL_RE = re.compile(r"async_compile\.triton\(\s*['\"](\w+)['\"]")
_EXTERN_RE = re.compile(r"extern_kernels\.(\w+)\(")
_ATEN_RE = re.compile(r"(?:torch\.ops\.)?aten\.(\w+)(?:\.default)?\(")
_CALL_RE = re.compile(r"\b(triton_\w+)\.run\(")


def inductor_calls(codes: Sequence[str]) -> Dict[str, Any]:
    """What Inductor's generated wrapper code runs: Triton kernels, library (extern) calls, aten ops."""
    triton_defs, runs, extern, aten = [], Counter(), Counter(), Counter()
    for code in codes:
        triton_defs += _TRITON_KERNEL_RE.findall(code)
        runs.update(_CALL_RE.findall(code))
        for line in code.splitlines():
            s = line.strip()
            if s.startswith("#"):
                continue
            extern.update(_EXTERN_RE.findall(s))
            aten.update(m for m in _ATEN_RE.findall(s) if not m.startswith("_foreach"))
    return {"triton_kernels": sorted(set(triton_defs)), "triton_runs": dict(runs), "extern": dict(extern),
            "aten": dict(aten)}


def sdpa_rewrites(calls: Dict[str, Any]) -> List[str]:
    """The fused attention ops Inductor put in place of the written-out softmax(QK^T)V, if any."""
    return sorted(k for k in calls.get("aten", {}) if "scaled_dot_product" in k or "flash_attention" in k
                  or "efficient_attention" in k or "cudnn_attention" in k)


# ---------------------------------------------------------------------------- choosing and summarising


def main_kernel(kernels: Sequence[KernelCode]) -> Optional[KernelCode]:
    """The kernel that does the work: most MMAs in its main loop, else most instructions (used ones first)."""
    cands = [k for k in kernels if k.sass is not None and k.used is not False] or \
        [k for k in kernels if k.sass is not None]
    if not cands:
        return None

    def key(k: KernelCode):
        ml = k.sass.main_loop
        return (ml.mma if ml else 0, sum(k.sass.counts.get(c, 0) for c in ("HGMMA", "HMMA", "QGMMA")),
                len(k.sass.instrs))

    return max(cands, key=key)


def row_extra(kernels: Sequence[KernelCode], limits: SmLimits = HOPPER, **more: Any) -> Dict[str, Any]:
    """A measurement row's ``extra``: the main kernel's headline counts, then every kernel's digest."""
    mk = main_kernel(kernels)
    extra: Dict[str, Any] = {}
    if mk is not None:
        s = mk.sass
        ml = s.main_loop
        tot = class_counts(s.counts)
        mlc = class_counts(ml.counts) if ml else {}
        lc = class_counts(s.loop_counts)
        extra.update({
            "main_kernel": mk.name,
            "hgmma_main_loop": mlc.get("HGMMA", 0), "hgmma_total": tot["HGMMA"],
            "hmma_main_loop": mlc.get("HMMA", 0), "hmma_total": tot["HMMA"],
            "ffma_main_loop": mlc.get("FFMA", 0), "ffma_total": tot["FFMA"],
            "ex2_main_loop": mlc.get("MUFU.EX2", 0),
            "tma_in_loops": sum(lc.get(k, 0) for k in ("UTMALDG", "UBLKCP")),
            "tma_total": sum(tot.get(k, 0) for k in ("UTMALDG", "UTMASTG", "UBLKCP")),
            "ldgsts_in_loops": lc.get("LDGSTS", 0), "ldg_in_loops": lc.get("LDG", 0),
            "local_ldst_total": tot["LDL"] + tot["STL"],
            "registers": mk.registers, "spill_bytes": mk.spill_bytes, "shared_bytes": mk.shared_bytes,
            "num_warps": mk.num_warps, "main_loop_instrs": ml.size if ml else None,
            "hgmma_shapes": s.hgmma_shapes(ml.addrs) if ml else {},
        })
        if mk.registers and mk.num_warps:
            occ = occupancy(mk.registers, mk.shared_bytes or 0, mk.num_warps * 32, limits)
            extra.update(occupancy=occ["occupancy"], warps_per_sm=occ["warps_per_sm"],
                         occupancy_limiter=occ["limiter"])
    spills = [k.spill_bytes for k in kernels if k.spill_bytes is not None]
    extra["max_spill_bytes"] = max(spills) if spills else None
    extra["kernels"] = [k.digest(limits) for k in kernels]
    extra.update(more)
    return extra
