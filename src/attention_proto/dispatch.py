"""The backend registry: which implementation runs an attention call, and why.

Every backend declares what it supports (:class:`Capabilities`: kinds of call, devices,
dtypes, head dims, modifiers, layouts, gradients). A call is described by a
:class:`Request` (built from the tensors and arguments, no kernel involved), and
:func:`select` walks the backends in priority order and takes the first that fits
(first-fit). :func:`explain` returns the whole decision -- the chosen backend and the
reasons every other one was passed over -- as a structured, printable :class:`Decision`;
when nothing fits, :class:`NoBackendError` lists every candidate's reasons.

Built-in backends, in priority order:

- ``triton``: our kernels (dense, varlen, padded batches, paged decode, linear);
- ``sdpa``: PyTorch's ``scaled_dot_product_attention`` (masks built from the modifiers);
- ``reference``: the float64 references; never chosen automatically (slow), only by name.

Thread safety: the registry is an immutable tuple replaced under a lock (copy-on-write),
decisions are memoised in a dict guarded by the same lock and keyed on the registry
version, and a backend's availability is probed once under its own lock. Readers never
block each other for long and never see a half-registered backend.
"""
from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .runtime.validation import describe

#: kinds of attention call
KINDS = ("dense", "varlen", "paged", "linear")

#: modifier names a Request may carry (``Request.modifiers``)
MODIFIERS = (
    "causal",        # causal mask (bottom-right aligned)
    "window",        # sliding window (left, right)
    "softcap",       # c * tanh(s / c)
    "alibi",         # ALiBi slopes
    "rope",          # rotary embedding applied inside the op (RopeSpec)
    "score_mod",     # @triton.jit score hook
    "mask_mod",      # @triton.jit mask hook
    "key_padding",   # per-sequence key (and query) padding mask [B, N]
    "bool_mask",     # an arbitrary boolean [.., Nq, Nk] mask
    "float_mask",    # an arbitrary additive float mask
    "dropout",       # attention dropout
    "lse",           # the log-sum-exp is returned
    "gate",          # linear attention: log-decay gate
    "initial_state",  # linear attention: initial state
)

_DT = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}


def _dtname(d: torch.dtype) -> str:
    return _DT.get(d, str(d).replace("torch.", ""))


class NoBackendError(ValueError):
    """No registered backend can run the request; the message lists every candidate's reasons.

    ``decision`` is the :class:`Decision` (None when raised from a compiled region, where only
    the printed decision travels).
    """

    def __init__(self, decision: "Decision | str") -> None:
        self.decision = decision if isinstance(decision, Decision) else None
        super().__init__(str(decision))


@dataclass(frozen=True)
class Request:
    """What an attention call needs, independent of any tensor data (hashable).

    ``q_len`` is the number of query tokens per sequence where it matters (paged decode).
    ``device_type`` is ``"cuda"`` or ``"cpu"`` (the tensors' device).
    """

    kind: str
    device_type: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    num_heads: int
    num_kv_heads: int
    layout: str = "bhsd"
    modifiers: FrozenSet[str] = frozenset()
    needs_grad: bool = False
    q_len: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Request.kind must be one of {KINDS}; got {self.kind!r}")
        unknown = set(self.modifiers) - set(MODIFIERS)
        if unknown:
            raise ValueError(f"unknown modifiers {sorted(unknown)}; known: {', '.join(MODIFIERS)}")
        object.__setattr__(self, "modifiers", frozenset(self.modifiers))

    def describe(self) -> str:
        mods = ",".join(sorted(self.modifiers)) or "none"
        grad = " +grad" if self.needs_grad else ""
        ql = f" q_len={self.q_len}" if self.q_len is not None else ""
        return (f"{self.kind} {self.layout} on {self.device_type}, {_dtname(self.dtype)}, D={self.head_dim}"
                f"{'/' + str(self.head_dim_v) if self.head_dim_v != self.head_dim else ''}, "
                f"heads {self.num_heads}:{self.num_kv_heads}{ql}, modifiers={mods}{grad}")


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports. Empty ``kinds`` means none."""

    kinds: FrozenSet[str]
    device_types: FrozenSet[str]
    dtypes: FrozenSet[torch.dtype]
    max_head_dim: int = 1 << 30
    head_dim_v_differs: bool = True        # may Dv != D?
    modifiers: FrozenSet[str] = frozenset()
    layouts: FrozenSet[str] = frozenset({"bhsd", "bshd", "thd", "paged"})
    grad: bool = False
    grad_unsupported: FrozenSet[str] = frozenset()  # modifiers that have no backward here
    gqa: bool = True
    max_q_len: Optional[int] = None        # paged decode: queries per sequence
    auto: bool = True                      # chosen automatically (False: only when asked by name)

    def reasons(self, req: Request) -> List[str]:
        """Why this backend cannot run ``req`` (empty list: it can)."""
        why: List[str] = []
        if req.kind not in self.kinds:
            why.append(f"no {req.kind} attention (supports: {', '.join(sorted(self.kinds)) or 'nothing'})")
            return why
        if req.device_type not in self.device_types:
            why.append(f"device {req.device_type} not supported (supports: {', '.join(sorted(self.device_types))})")
        if req.dtype not in self.dtypes:
            names = ", ".join(sorted(_dtname(d) for d in self.dtypes))
            why.append(f"dtype {_dtname(req.dtype)} not supported on {req.device_type} (supports: {names})")
        if req.head_dim > self.max_head_dim or req.head_dim_v > self.max_head_dim:
            why.append(f"head dim {max(req.head_dim, req.head_dim_v)} above the maximum {self.max_head_dim}")
        if req.head_dim_v != req.head_dim and not self.head_dim_v_differs and req.kind != "linear":
            why.append(f"value head dim {req.head_dim_v} differs from the query/key head dim {req.head_dim}")
        if req.layout not in self.layouts:
            why.append(f"layout {req.layout} not supported (supports: {', '.join(sorted(self.layouts))})")
        if req.num_heads != req.num_kv_heads and not self.gqa:
            why.append(f"GQA/MQA ({req.num_heads} query heads, {req.num_kv_heads} KV heads) not supported")
        missing = sorted(req.modifiers - self.modifiers)
        if missing:
            why.append(f"modifier{'s' if len(missing) > 1 else ''} {', '.join(missing)} not supported")
        if req.needs_grad:
            if not self.grad:
                why.append("no backward (gradients requested)")
            else:
                nograd = sorted(req.modifiers & self.grad_unsupported)
                if nograd:
                    why.append(f"no backward with {', '.join(nograd)} (gradients requested)")
        if self.max_q_len is not None and req.q_len is not None and req.q_len > self.max_q_len:
            why.append(f"{req.q_len} query tokens per sequence, above the maximum {self.max_q_len}")
        return why


@dataclass
class Backend:
    """A named implementation with its declared capabilities.

    ``capabilities`` is a callable so that a backend may depend on the environment (under
    Triton's interpreter ours runs on the CPU without bfloat16). ``probe`` returns None when
    the backend is usable here, else the reason (a missing module, no GPU). ``runners`` maps
    a kind to ``"module:function"`` (imported on first use) or a callable.
    """

    name: str
    priority: int
    description: str
    capabilities: Callable[[], Capabilities]
    probe: Callable[[], Optional[str]] = lambda: None
    runners: Mapping[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _availability: Optional[Tuple[Optional[str]]] = field(default=None, repr=False, compare=False)
    _caps: Optional[Capabilities] = field(default=None, repr=False, compare=False)
    _resolved: Dict[str, Callable] = field(default_factory=dict, repr=False, compare=False)

    def unavailable(self) -> Optional[str]:
        """None if usable here, else why not (probed once)."""
        if self._availability is None:
            with self._lock:
                if self._availability is None:
                    try:
                        reason = self.probe()
                    except Exception as e:  # noqa: BLE001 - a failing probe is a reason, not a crash
                        reason = f"probe failed: {type(e).__name__}: {e}"
                    self._availability = (reason,)
        return self._availability[0]

    def caps(self) -> Capabilities:
        if self._caps is None:
            with self._lock:
                if self._caps is None:
                    self._caps = self.capabilities()
        return self._caps

    def reasons(self, req: Request) -> List[str]:
        why = self.unavailable()
        if why:
            return [f"unavailable: {why}"]
        return self.caps().reasons(req)

    def runner(self, kind: str) -> Callable:
        fn = self._resolved.get(kind)
        if fn is not None:
            return fn
        target = self.runners.get(kind)
        if target is None:
            raise NotImplementedError(f"backend {self.name!r} has no runner for {kind} attention")
        if isinstance(target, str):
            mod, _, attr = target.partition(":")
            fn = getattr(importlib.import_module(mod), attr)
        else:
            fn = target
        with self._lock:
            self._resolved[kind] = fn
        return fn

    def reset(self) -> None:
        """Forget the probed availability and capabilities (tests, environment changes)."""
        with self._lock:
            self._availability = None
            self._caps = None


@dataclass(frozen=True)
class Rejection:
    backend: str
    reasons: Tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    """The outcome of a selection: the chosen backend (or None) and why the others were not."""

    request: Request
    backend: Optional[str]
    rejected: Tuple[Rejection, ...]
    considered: Tuple[str, ...]
    requested: Optional[Tuple[str, ...]] = None

    @property
    def ok(self) -> bool:
        return self.backend is not None

    def reasons_for(self, name: str) -> Tuple[str, ...]:
        for r in self.rejected:
            if r.backend == name:
                return r.reasons
        return ()

    def as_dict(self) -> Dict[str, Any]:
        req = self.request
        return {
            "request": {"kind": req.kind, "device_type": req.device_type, "dtype": _dtname(req.dtype),
                        "head_dim": req.head_dim, "head_dim_v": req.head_dim_v, "num_heads": req.num_heads,
                        "num_kv_heads": req.num_kv_heads, "layout": req.layout,
                        "modifiers": sorted(req.modifiers), "needs_grad": req.needs_grad, "q_len": req.q_len},
            "backend": self.backend,
            "considered": list(self.considered),
            "requested": list(self.requested) if self.requested else None,
            "rejected": {r.backend: list(r.reasons) for r in self.rejected},
        }

    def __str__(self) -> str:
        lines = [f"attention call: {self.request.describe()}"]
        if self.requested:
            lines.append(f"backends asked for: {', '.join(self.requested)}")
        if self.backend:
            lines.append(f"-> uses backend {self.backend!r}")
        else:
            lines.append("-> no backend can run it")
        for r in self.rejected:
            lines.append(f"   {r.backend}: rejected: " + "; ".join(r.reasons))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_REGISTRY: Tuple[Backend, ...] = ()
_VERSION = [0]
_DECISIONS: Dict[Tuple[Any, ...], Decision] = {}
#: choose()'s plain results, keyed with the registry version like _DECISIONS
_CHOICES: Dict[Tuple[Any, ...], Tuple[Any, ...]] = {}
_MAX_DECISIONS = 4096


def register_backend(backend: Backend, *, replace_existing: bool = False) -> None:
    """Add a backend (kept sorted by priority, lowest number first)."""
    global _REGISTRY
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a dispatch.Backend; got {describe(backend)}")
    with _LOCK:
        names = [b.name for b in _REGISTRY]
        if backend.name in names and not replace_existing:
            raise ValueError(f"a backend named {backend.name!r} is already registered (pass replace_existing=True)")
        regs = [b for b in _REGISTRY if b.name != backend.name] + [backend]
        _REGISTRY = tuple(sorted(regs, key=lambda b: (b.priority, b.name)))
        _VERSION[0] += 1
        _DECISIONS.clear()
        _CHOICES.clear()


def unregister_backend(name: str) -> None:
    global _REGISTRY
    with _LOCK:
        if name not in [b.name for b in _REGISTRY]:
            raise ValueError(f"no backend named {name!r}; registered: {', '.join(b.name for b in _REGISTRY)}")
        _REGISTRY = tuple(b for b in _REGISTRY if b.name != name)
        _VERSION[0] += 1
        _DECISIONS.clear()
        _CHOICES.clear()


def backends() -> Tuple[Backend, ...]:
    """The registered backends in priority order (a snapshot)."""
    return _REGISTRY


def get_backend(name: str) -> Backend:
    for b in _REGISTRY:
        if b.name == name:
            return b
    raise ValueError(f"unknown backend {name!r}; registered: {', '.join(b.name for b in _REGISTRY)}")


def _normalize_prefer(prefer: Optional[Sequence[str] | str]) -> Optional[Tuple[str, ...]]:
    if prefer is None or prefer == "auto":
        return None
    if isinstance(prefer, str):
        prefer = (prefer,)
    names = tuple(prefer)
    known = {b.name for b in _REGISTRY}
    for n in names:
        if n not in known:
            raise ValueError(f"unknown backend {n!r}; registered: {', '.join(sorted(known))} (or 'auto')")
    return names


def _decide(req: Request, prefer: Optional[Tuple[str, ...]], exclude: FrozenSet[str]) -> Decision:
    regs = _REGISTRY
    if prefer is not None:
        order = [b for n in prefer for b in regs if b.name == n]
    else:
        order = list(regs)
    chosen: Optional[str] = None
    rejected: List[Rejection] = []
    for b in order:
        if b.name in exclude:
            rejected.append(Rejection(b.name, ("excluded by the caller",)))
            continue
        why = b.reasons(req)
        if not why and prefer is None and not b.caps().auto:
            why = [f"not chosen automatically ({b.description}); ask for backend={b.name!r}"]
        if why:
            rejected.append(Rejection(b.name, tuple(why)))
            continue
        chosen = b.name
        break
    considered = tuple(b.name for b in order)
    return Decision(req, chosen, tuple(rejected), considered, prefer)


def explain_request(req: Request, *, prefer: Optional[Sequence[str] | str] = None,
                    exclude: Iterable[str] = ()) -> Decision:
    """The decision for ``req`` (never raises for an unsupported request)."""
    pref = _normalize_prefer(prefer)
    excl = frozenset(exclude)
    key = (req, pref, excl, _VERSION[0])
    d = _DECISIONS.get(key)
    if d is not None:
        return d
    d = _decide(req, pref, excl)
    with _LOCK:
        if key[-1] == _VERSION[0]:
            if len(_DECISIONS) >= _MAX_DECISIONS:
                _DECISIONS.clear()
            _DECISIONS[key] = d
    return d


def select(req: Request, *, prefer: Optional[Sequence[str] | str] = None, exclude: Iterable[str] = ()) -> Backend:
    """The first backend (in priority order, or in ``prefer``'s order) that supports ``req``.

    Raises :class:`NoBackendError` listing every candidate's reasons when none fits.
    """
    d = explain_request(req, prefer=prefer, exclude=exclude)
    if d.backend is None:
        raise NoBackendError(d)
    return get_backend(d.backend)


def _constant_under_dynamo(fn):
    """Let torch.compile run ``fn`` at trace time and keep its result as a constant.

    Decisions depend only on hashable metadata (shapes, dtypes, flags), never on tensor data, and
    the registry's locks and caches are not traceable: without this a call inside a compiled
    model would break the graph.
    """
    try:
        from torch._dynamo import assume_constant_result
    except ImportError:  # pragma: no cover - very old torch
        return fn
    return assume_constant_result(fn)


@_constant_under_dynamo
def choose(kind: str, device_type: str, dtype: torch.dtype, head_dim: int, head_dim_v: int, num_heads: int,
           num_kv_heads: int, layout: str = "bhsd", modifiers: Tuple[str, ...] = (), needs_grad: bool = False,
           q_len: Optional[int] = None, prefer: Optional[Tuple[str, ...]] = None
           ) -> Tuple[Optional[str], Tuple[Tuple[str, Tuple[str, ...]], ...], str]:
    """:func:`explain_request` with plain arguments and a plain result, safe inside torch.compile.

    Returns ``(backend name or None, ((rejected name, reasons), ...), printable decision)``; the
    chosen backend's runner for ``kind`` is resolved (imported) here, outside any traced code.
    """
    # the model integrations ask once per layer and call: building the request and its printable
    # decision cost ~6 us of host time, so the plain result is kept per (arguments, registry version)
    version = _VERSION[0]
    modifiers = tuple(modifiers)  # once: an iterator would be used up by the key
    if prefer is not None and not isinstance(prefer, (str, tuple)):
        prefer = tuple(prefer)
    key = (kind, device_type, dtype, head_dim, head_dim_v, num_heads, num_kv_heads, layout, modifiers,
           needs_grad, q_len, prefer, version)
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit
    req = Request(kind=kind, device_type=device_type, dtype=dtype, head_dim=head_dim, head_dim_v=head_dim_v,
                  num_heads=num_heads, num_kv_heads=num_kv_heads, layout=layout, modifiers=frozenset(modifiers),
                  needs_grad=needs_grad, q_len=q_len)
    d = explain_request(req, prefer=prefer)
    if d.backend is not None:
        get_backend(d.backend).runner(kind)
    res = (d.backend, tuple((r.backend, r.reasons) for r in d.rejected), str(d))
    with _LOCK:
        if version == _VERSION[0]:
            if len(_CHOICES) >= _MAX_DECISIONS:
                _CHOICES.clear()
            _CHOICES[key] = res
    return res


def reasons_from(rejected: Tuple[Tuple[str, Tuple[str, ...]], ...], name: str) -> Tuple[str, ...]:
    """The reasons ``name`` was rejected for, from :func:`choose`'s second result."""
    for n, why in rejected:
        if n == name:
            return why
    return ()


def clear_decisions() -> None:
    with _LOCK:
        _DECISIONS.clear()
        _CHOICES.clear()


# ---------------------------------------------------------------------------------------------
# built-in backends
# ---------------------------------------------------------------------------------------------

def _interpreter() -> bool:
    from .runtime.device import interpreter_mode

    return interpreter_mode()


def _probe_triton() -> Optional[str]:
    try:
        import triton  # noqa: F401  (availability probe)
    except ImportError as e:
        return f"triton is not importable ({e})"
    if not _interpreter() and not torch.cuda.is_available():
        return "no CUDA GPU and Triton's interpreter is off"
    return None


def _triton_caps() -> Capabilities:
    interp = _interpreter()
    kinds = {"dense", "varlen", "paged"}
    if _module_exists("attention_proto.ops.linear.interface"):
        kinds.add("linear")
    return Capabilities(
        kinds=frozenset(kinds),
        device_types=frozenset({"cpu"} if interp else {"cuda"}),
        # the interpreter computes with numpy, which has no bfloat16
        dtypes=frozenset({torch.float16, torch.float32} if interp else {torch.float16, torch.bfloat16, torch.float32}),
        max_head_dim=256,
        head_dim_v_differs=False,
        modifiers=frozenset({"causal", "window", "softcap", "alibi", "rope", "score_mod", "mask_mod",
                             "key_padding", "lse", "gate", "initial_state"}),
        layouts=frozenset({"bhsd", "bshd", "thd", "paged"}),
        grad=True,
        grad_unsupported=frozenset({"score_mod", "mask_mod"}),
        gqa=True,
        max_q_len=16,
    )


def _module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _sdpa_caps() -> Capabilities:
    return Capabilities(
        kinds=frozenset({"dense"}),
        device_types=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        head_dim_v_differs=True,
        # window/alibi/key padding become an explicit mask; rope is applied before the call
        modifiers=frozenset({"causal", "window", "alibi", "rope", "key_padding", "bool_mask", "float_mask",
                             "dropout"}),
        layouts=frozenset({"bhsd", "bshd"}),
        grad=True,
        gqa=True,
    )


def _reference_caps() -> Capabilities:
    return Capabilities(
        kinds=frozenset({"dense", "varlen", "paged"}),
        device_types=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        head_dim_v_differs=True,
        modifiers=frozenset({"causal", "window", "softcap", "alibi", "rope", "key_padding", "bool_mask",
                             "float_mask", "lse"}),
        layouts=frozenset({"bhsd", "bshd", "thd", "paged"}),
        grad=True,
        gqa=True,
        auto=False,
    )


TRITON = Backend(
    name="triton", priority=10, description="attention-proto's Triton kernels",
    capabilities=_triton_caps, probe=_probe_triton,
    runners={"dense": "attention_proto.integrations.runners:_run_triton_dense", "varlen": "attention_proto.integrations.runners:_run_triton_varlen",
             "paged": "attention_proto.integrations.runners:_run_triton_paged", "linear": "attention_proto.integrations.runners:_run_triton_linear"},
)
SDPA = Backend(
    name="sdpa", priority=20, description="torch.nn.functional.scaled_dot_product_attention",
    capabilities=_sdpa_caps,
    runners={"dense": "attention_proto.integrations.runners:_run_sdpa_dense"},
)
REFERENCE = Backend(
    name="reference", priority=90, description="the float64 reference, slow",
    capabilities=_reference_caps,
    runners={"dense": "attention_proto.integrations.runners:_run_reference_dense",
             "varlen": "attention_proto.integrations.runners:_run_reference_varlen",
             "paged": "attention_proto.integrations.runners:_run_reference_paged"},
)

for _b in (TRITON, SDPA, REFERENCE):
    register_backend(_b)


def with_capabilities(backend: Backend, **changes: Any) -> Backend:
    """A copy of ``backend`` whose capabilities differ by ``changes`` (for tests and experiments)."""
    base = backend.caps()
    new_caps = replace(base, **changes)
    return Backend(name=backend.name, priority=backend.priority, description=backend.description,
                   capabilities=lambda: new_caps, probe=backend.probe, runners=dict(backend.runners))
