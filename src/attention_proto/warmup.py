"""Precompile every kernel variant a model configuration needs: the ahead-of-time build step.

Every modifier, head dim, dtype and tile is a compile-time constant of our kernels (study 4), so a
model needs a fixed set of compiled variants, and the first call of each pays its compile (1-5 s
on the GPU host). :func:`warmup` runs each variant once, through the public entry points and
``KERNEL_CACHE`` (as a model would call them), so that later calls only launch. Triton also writes
the binaries to its disk cache (``TRITON_CACHE_DIR``): warming in a build step and shipping that
folder turns a fresh process's cold compiles into disk loads.

What is warmed, for each modifier set of the model (Gemma 2 alternates sliding-window and global
layers: two sets), at B = 1 with the model's real head counts (Triton also specializes integer
arguments on their value: == 1 and multiples of 16 compile separately, so shapes are real, not
shrunk):

- prefill (causal): one call per power-of-two length bucket from ``min_seq_len`` to
  ``max_seq_len`` (the dense config picker buckets N so), aligned (N) and ragged (N - 1: the
  row-masked variant); with ``train`` through autograd (forward + backward kernels);
- packed prefill (``varlen``): two sequences per bucket through :func:`attention_varlen`;
- decode (``decode``): the paged KV cache (page append, V1 and V2 + reduce) at one query token,
  and the dense kernel at Nq = 1 (transformers without a paged cache).

``dry_run=True`` records which variants the calls would launch without compiling or running
any kernel (host code only): the variant count of a configuration in milliseconds.
``threads > 1`` runs the calls concurrently so that their compiles overlap (the CLI's default).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .runtime.cache import KERNEL_CACHE
from .runtime.device import interpreter_mode, kernel_device


@dataclass(frozen=True)
class ModelAttentionConfig:
    """The attention facts of a model (from its public config.json), nothing measured.

    ``window``: the sliding window in transformers' convention (keys j > i - window are kept, i.e.
    our left window ``window - 1``); ``window_layers``: "all" or "alternate" (local and global
    layers alternate, as in Gemma 2). ``scale``: None = 1/sqrt(head_dim).
    """

    name: str
    head_dim: int
    num_heads: int
    num_kv_heads: int
    window: Optional[int] = None
    window_layers: str = "all"
    softcap: Optional[float] = None
    alibi: bool = False
    rope: Optional[str] = "half"
    rope_theta: float = 10000.0
    scale: Optional[float] = None
    max_position_embeddings: int = 8192
    source: str = ""

    def modifier_sets(self) -> List[Dict[str, Any]]:
        """Keyword arguments of :func:`attention` for each kind of layer (without causal)."""
        base: Dict[str, Any] = {}
        if self.softcap:
            base["softcap"] = float(self.softcap)
        if self.scale is not None:
            base["scale"] = float(self.scale)
        if self.alibi:
            base["alibi_slopes"] = True
        sets = []
        if self.window:
            sets.append(dict(base, window=(int(self.window) - 1, -1)))
        if not self.window or self.window_layers == "alternate":
            sets.append(dict(base))
        return sets


#: presets typed from the models' public configs (config.json on the Hugging Face hub)
PRESETS: Dict[str, ModelAttentionConfig] = {
    "llama": ModelAttentionConfig(
        "Llama-3-8B", head_dim=128, num_heads=32, num_kv_heads=8, rope="half", rope_theta=500000.0,
        max_position_embeddings=8192, source="meta-llama/Meta-Llama-3-8B config.json"),
    "mistral": ModelAttentionConfig(
        "Mistral-7B-v0.1", head_dim=128, num_heads=32, num_kv_heads=8, window=4096, rope="half",
        rope_theta=10000.0, max_position_embeddings=32768, source="mistralai/Mistral-7B-v0.1 config.json"),
    "gemma2": ModelAttentionConfig(
        "Gemma-2-9B", head_dim=256, num_heads=16, num_kv_heads=8, window=4096, window_layers="alternate",
        softcap=50.0, rope="half", rope_theta=10000.0, scale=256 ** -0.5, max_position_embeddings=8192,
        source="google/gemma-2-9b config.json (query_pre_attn_scalar 256, attn_logit_softcapping 50)"),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class WarmupOptions:
    dtype: torch.dtype = torch.bfloat16
    train: bool = False
    fused_rope: bool = False       # RoPE inside our kernel (else the model applies it before attention)
    decode: bool = True
    varlen: bool = True
    ragged: bool = True
    min_seq_len: int = 128
    max_seq_len: Optional[int] = None  # default: the model's max_position_embeddings, capped at 16k
    page_size: int = 16
    seq_lens: Optional[Sequence[int]] = None  # explicit prefill lengths instead of the buckets
    threads: int = 1               # > 1: run the calls (their compiles) concurrently

    def lengths(self, cfg: ModelAttentionConfig) -> List[int]:
        if self.seq_lens is not None:
            return sorted({int(n) for n in self.seq_lens if int(n) > 0})
        top = self.max_seq_len or min(cfg.max_position_embeddings, 16384)
        out, n = [], max(16, int(self.min_seq_len))
        while n <= top:
            out.append(n)
            n *= 2
        return out


@dataclass
class CallRecord:
    label: str
    seconds: float
    new_variants: int
    new_binaries: int


@dataclass
class WarmupReport:
    model: str
    mode: str                      # "gpu" | "interpreter" | "dry-run"
    dtype: str
    variants: List[Dict[str, Any]] = field(default_factory=list)  # one per KERNEL_CACHE key launched
    calls: List[CallRecord] = field(default_factory=list)
    seconds: float = 0.0           # wall time of the whole warmup
    compile_seconds: float = 0.0   # KERNEL_CACHE's timed first compiles (not Triton's later re-specializations)
    binaries: int = 0              # Triton binaries added in this process (variants x value specializations)
    errors: List[str] = field(default_factory=list)

    @property
    def num_variants(self) -> int:
        return len(self.variants)

    def by_kernel(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for v in self.variants:
            out[v["kernel"]] = out.get(v["kernel"], 0) + 1
        return out

    def summary(self) -> str:
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(self.by_kernel().items()))
        what = {"dry-run": "planned (nothing compiled)", "interpreter": "exercised under the interpreter (nothing compiled)"}
        extra = (f"; {self.binaries} Triton binaries, {self.compile_seconds:.1f} s in first compiles"
                 if self.mode == "gpu" else "")
        return (f"{self.model} ({self.dtype}): {self.num_variants} kernel variants {what.get(self.mode, 'warmed')} "
                f"in {len(self.calls)} calls, {self.seconds:.1f} s{extra} [{kinds}]"
                + (f"; {len(self.errors)} calls failed" if self.errors else ""))

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["num_variants"] = self.num_variants
        d["by_kernel"] = self.by_kernel()
        return d


# ---------------------------------------------------------------------------------------------- caches

def our_kernels() -> List[Any]:
    """The library's top-level Triton kernels (those with compiled-binary caches of their own)."""
    import importlib

    names = {
        "attention_proto.ops.dense.forward": ["_fwd_kernel"],
        "attention_proto.ops.dense.forward_tma": ["_fwd_tma_kernel"],
        "attention_proto.ops.dense.forward_runtime": ["_fwd_runtime_kernel"],
        "attention_proto.ops.dense.rope_kernel": ["_rope_kernel", "_rope_rows_kernel", "_rope_pass"],
        "attention_proto.ops.dense.backward": ["_bwd_preprocess", "_bwd_dkdv", "_bwd_dq"],
        "attention_proto.ops.paged.decode": ["_paged_decode_kernel", "_paged_reduce_kernel"],
        "attention_proto.ops.paged.cache": ["_paged_append_kernel"],
    }
    out: List[Any] = []
    for mod, attrs in names.items():
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        out += [getattr(m, a) for a in attrs if hasattr(m, a)]
    for key in list(getattr(KERNEL_CACHE, "_entries", {})):
        k = key[0] if isinstance(key, tuple) and key else None
        if k is not None and all(k is not o for o in out):
            out.append(k)
    return out


def triton_binaries(kernels: Optional[Sequence[Any]] = None) -> int:
    """Compiled binaries held by Triton's in-process caches of ``kernels`` (0 under the interpreter)."""
    n = 0
    for k in kernels if kernels is not None else our_kernels():
        for caches in getattr(k, "device_caches", {}).values():
            n += len(caches[0])
    return n


def reset_compiled_kernels(kernels: Optional[Sequence[Any]] = None) -> None:
    """Forget every compiled kernel of this process: ``KERNEL_CACHE`` and Triton's per-kernel caches.

    The next call of each kernel goes back to Triton's compile (which reads its disk cache first).
    """
    for k in kernels if kernels is not None else our_kernels():
        dc = getattr(k, "device_caches", None)
        if dc is not None:
            dc.clear()
    KERNEL_CACHE.clear()


@contextlib.contextmanager
def triton_cache_dir(path: str) -> Iterator[str]:
    """Point Triton's disk cache at ``path`` for the duration (it is read on each compile)."""
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(path)
    try:
        yield str(path)
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old


class _LaunchRecorder:
    """Wrap ``KERNEL_CACHE.launch`` (single-threaded): note each key launched; ``dry`` skips the launch."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.keys: Dict[Any, Dict[str, Any]] = {}

    def __enter__(self) -> "_LaunchRecorder":
        orig = KERNEL_CACHE.launch

        def launch(kernel, grid, *args, **constexprs):
            key = KERNEL_CACHE.key(kernel, args, constexprs)
            if key not in self.keys:
                name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")
                dt = next((a.dtype for a in args if isinstance(a, torch.Tensor)), None)
                self.keys[key] = dict(kernel=name, dtype=str(dt).replace("torch.", ""),
                                      constexprs={k: (v if isinstance(v, (int, float, str, bool)) or v is None else repr(v))
                                                  for k, v in constexprs.items()})
            if self.dry:
                return None
            return orig(kernel, grid, *args, **constexprs)

        KERNEL_CACHE.launch = launch  # instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> bool:
        KERNEL_CACHE.__dict__.pop("launch", None)
        return False


# ---------------------------------------------------------------------------------------------- plan

def effective_dtype(opts: WarmupOptions, dry_run: bool = False) -> torch.dtype:
    """The dtype the calls use: bf16 becomes fp16 under the interpreter (the public entry points refuse
    bf16 there, even in a dry run); the variant set is the same up to the dtype in each key."""
    if interpreter_mode() and opts.dtype == torch.bfloat16:
        return torch.float16
    return opts.dtype


def plan_calls(cfg: ModelAttentionConfig, opts: WarmupOptions, dry_run: bool = False) -> List[Tuple[str, Callable[[], Any]]]:
    """(label, zero-argument call) for each warmup call; inputs are created inside each call
    (uninitialised with ``dry_run``: no kernel reads them)."""
    from .ops.dense.forward import causal_schedule
    from .ops.dense.interface import attention, attention_varlen
    from .ops.dense.reference import alibi_slopes as standard_slopes
    from .ops.dense.rope import RopeSpec

    dev = kernel_device()
    dtype = effective_dtype(opts, dry_run)
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rope = RopeSpec(cfg.rope, theta=cfg.rope_theta) if (opts.fused_rope and cfg.rope) else None
    calls: List[Tuple[str, Callable[[], Any]]] = []

    def rnd(*shape, grad=False):
        t = (torch.empty if dry_run else torch.randn)(*shape, device=dev, dtype=dtype)
        return t.requires_grad_(grad)

    for mods in cfg.modifier_sets():
        tag = "window" if "window" in mods else "global"

        def dense(nq: int, nk: int, mods=mods, grad: bool = False):
            def call():
                q, k, v = rnd(1, H, nq, D, grad=grad), rnd(1, Hkv, nk, D, grad=grad), rnd(1, Hkv, nk, D, grad=grad)
                # the causal program order is picked per launch from batch and SM count: a serving batch
                # may take the other order than this batch of one, so a prefill compiles both
                for order in (("head", "lpt") if nq > 1 else ("auto",)):
                    with causal_schedule(order):
                        out = attention(q, k, v, causal=True, rope=rope, **mods)
                if grad:
                    out.backward(rnd(*out.shape))
                return out
            return call

        for n in opts.lengths(cfg):
            lens = [n] + ([n - 1] if opts.ragged and n > 1 else [])
            for m in lens:
                calls.append((f"{tag} prefill N{m}" + (" train" if opts.train else ""), dense(m, m, grad=opts.train)))
            if opts.varlen:
                a, b = max(1, n // 2 - 1), n - max(1, n // 2 - 1)

                def packed(a=a, b=b, mods=mods):
                    cu = torch.tensor([0, a, a + b], device=dev, dtype=torch.int32)
                    q = rnd(a + b, H, D, grad=opts.train)
                    k, v = rnd(a + b, Hkv, D, grad=opts.train), rnd(a + b, Hkv, D, grad=opts.train)
                    out = attention_varlen(q, k, v, cu, cu, causal=True, rope=rope, **mods)
                    if opts.train:
                        out.backward(rnd(*out.shape))
                    return out

                calls.append((f"{tag} varlen 2 seqs max N{max(a, b)}" + (" train" if opts.train else ""), packed))
            if opts.decode:
                calls.append((f"{tag} dense decode Nk{n}", dense(1, n)))
        if opts.decode:
            calls += _paged_calls(cfg, opts, dtype, dev, mods, tag, standard_slopes)
    return calls


def _paged_calls(cfg, opts, dtype, dev, mods, tag, standard_slopes) -> List[Tuple[str, Callable[[], Any]]]:
    try:
        from .ops.paged.cache import PagedKVCache
    except ImportError:  # pragma: no cover - the paged module is optional
        return []
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw: Dict[str, Any] = {}
    if "softcap" in mods:
        kw["softcap"] = mods["softcap"]
    if "scale" in mods:
        kw["scale"] = mods["scale"]
    if mods.get("alibi_slopes"):
        kw["alibi_slopes"] = standard_slopes(H).to(dev)
    if "window" in mods:
        kw["window"] = mods["window"]
    prompt = 3 * opts.page_size + 5  # a few pages, ragged last page

    def call(version: str):
        def run():
            cache = PagedKVCache(8, opts.page_size, Hkv, D, max_seqs=1, dtype=dtype, device=dev)
            sid = cache.add_sequence()
            cache.append([sid], torch.randn(1, Hkv, prompt, D, device=dev, dtype=dtype),
                         torch.randn(1, Hkv, prompt, D, device=dev, dtype=dtype))
            cache.append([sid], torch.randn(1, Hkv, 1, D, device=dev, dtype=dtype),
                         torch.randn(1, Hkv, 1, D, device=dev, dtype=dtype))
            q = torch.randn(1, H, 1, D, device=dev, dtype=dtype)
            extra = dict(num_partitions=2) if version == "v2" else {}
            return cache.attend([sid], q, version=version, **extra, **kw)
        return run

    return [(f"{tag} paged decode {v}", call(v)) for v in ("v1", "v2")]


# ---------------------------------------------------------------------------------------------- run

def warmup(config: ModelAttentionConfig | str, options: Optional[WarmupOptions] = None, *, dry_run: bool = False,
           log: Optional[Callable[[str], None]] = None, **overrides: Any) -> WarmupReport:
    """Precompile (or with ``dry_run`` only list) the kernel variants ``config`` needs. Returns a :class:`WarmupReport`.

    ``config``: a :class:`ModelAttentionConfig` or a preset name (``llama``, ``mistral``,
    ``gemma2``); ``options``/``overrides``: :class:`WarmupOptions` fields (dtype, train,
    fused_rope, decode, varlen, ragged, min_seq_len, max_seq_len, page_size, seq_lens, threads).
    Failures of single calls are collected in ``report.errors``, not raised.
    """
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown model preset {config!r}; known: {', '.join(PRESETS)}")
        config = PRESETS[config]
    if not isinstance(config, ModelAttentionConfig):
        raise TypeError(f"config must be a ModelAttentionConfig or a preset name; got {type(config).__name__}")
    opts = replace(options or WarmupOptions(), **overrides)
    mode = "dry-run" if dry_run else ("interpreter" if interpreter_mode() else "gpu")
    report = WarmupReport(config.name, mode, str(effective_dtype(opts, dry_run)).replace("torch.", ""))
    kernels = our_kernels()
    bin0 = triton_binaries(kernels)
    comp0 = KERNEL_CACHE.stats.compile_seconds
    cuda = not interpreter_mode() and torch.cuda.is_available()
    t_all = time.perf_counter()
    def run(label: str, fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        try:
            fn()
            if cuda:
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the others
            report.errors.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return time.perf_counter() - t0

    calls = plan_calls(config, opts, dry_run)
    with _LaunchRecorder(dry_run) as rec:
        if opts.threads > 1 and not dry_run and not interpreter_mode():  # the interpreter is not thread-safe
            # compiles overlap (ptxas runs outside the GIL); per-call variant counts are not attributable
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=opts.threads) as ex:
                secs = list(ex.map(lambda c: run(*c), calls))
            report.calls = [CallRecord(label, dt, 0, 0) for (label, _), dt in zip(calls, secs)]
        else:
            for label, fn in calls:
                n0, b0 = len(rec.keys), triton_binaries(kernels)
                dt = run(label, fn)
                rec_ = CallRecord(label, dt, len(rec.keys) - n0, triton_binaries(kernels) - b0)
                report.calls.append(rec_)
                if log:
                    log(f"  {label:<36} {dt:7.2f} s  +{rec_.new_variants} variants  +{rec_.new_binaries} binaries")
        report.variants = list(rec.keys.values())
    report.seconds = time.perf_counter() - t_all
    report.compile_seconds = max(0.0, KERNEL_CACHE.stats.compile_seconds - comp0)
    report.binaries = triton_binaries(our_kernels()) - bin0
    return report


# ---------------------------------------------------------------------------------------------- CLI

def add_warmup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, choices=sorted(PRESETS), help="model preset")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--train", action="store_true", help="also the backward kernels (through autograd)")
    p.add_argument("--fused-rope", action="store_true", help="RoPE inside the attention kernel")
    p.add_argument("--max-seq-len", type=int, default=None, help="longest prefill bucket (default: min(model, 16k))")
    p.add_argument("--no-decode", action="store_true", help="skip the decode kernels (paged and dense Nq = 1)")
    p.add_argument("--no-varlen", action="store_true", help="skip packed (varlen) prefill")
    p.add_argument("--threads", type=int, default=8, help="calls compiled concurrently (default 8; 1 = one by one)")
    p.add_argument("--cache-dir", default=None, help="Triton disk cache to fill (TRITON_CACHE_DIR); ship it with the model")
    p.add_argument("--dry-run", action="store_true", help="list the variants without compiling anything")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per call")


def cmd_warmup(args: argparse.Namespace) -> int:
    opts = WarmupOptions(dtype=DTYPES[args.dtype], train=args.train, fused_rope=args.fused_rope,
                         decode=not args.no_decode, varlen=not args.no_varlen, max_seq_len=args.max_seq_len,
                         threads=max(1, args.threads) if not args.verbose else 1)
    log = (lambda m: print(m, file=sys.stderr)) if args.verbose else None
    ctx = triton_cache_dir(args.cache_dir) if args.cache_dir else contextlib.nullcontext()
    if args.cache_dir:
        os.makedirs(args.cache_dir, exist_ok=True)
    dry = args.dry_run
    if interpreter_mode() and not dry:
        # real model shapes under the interpreter would take hours and compile nothing
        print("No CUDA GPU: nothing to compile here; listing the variants instead (--dry-run).", file=sys.stderr)
        dry = True
    with ctx:
        rep = warmup(args.model, opts, dry_run=dry, log=log)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=1, default=str))
    else:
        print(rep.summary())
        for e in rep.errors:
            print(f"  failed: {e}", file=sys.stderr)
    return 1 if rep.errors else 0
