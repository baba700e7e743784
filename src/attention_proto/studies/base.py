"""What a study is, and what it gets to work with.

A study has two halves:

- ``measure(ctx)`` runs kernels and peers and records measurement rows through
  ``ctx.record(...)`` (on a GPU: timings; under the interpreter: correctness
  only, every row marked ``mode: interpreter``);
- ``analyze(data)`` turns the rows of one run into findings. Findings are
  computed from rows, never typed: ``analyze`` reads numbers from ``data`` and
  fills the claim's sentence with them. It can be re-run on a stored KB.

Writing a study: subclass :class:`Study`, set ``name``/``title``, implement
both halves, and add the module to ``STUDY_MODULES`` in ``studies/__init__.py``.
``studies/ceilings.py`` is the worked example.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

from ..kb.store import KB
from ..runtime import timing as _timing
from ..runtime.device import device_facts, interpreter_mode, kernel_device


@dataclass
class Finding:
    """One finding. ``claim`` must be a sentence filled from measured numbers."""

    id: str
    title: str
    claim: str
    verdict: str  # supported | refuted | inconclusive | observation
    metrics: Dict[str, Any] = field(default_factory=dict)
    evidence: List[int] = field(default_factory=list)  # measurement ids


class Progress:
    """A small text progress bar on stderr (no dependency); silent when not a TTY unless forced."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.total, self.label, self.n = max(total, 1), label, 0
        self.enabled = enabled

    def update(self, k: int = 1, note: str = "") -> None:
        self.n += k
        if not self.enabled:
            return
        frac = min(1.0, self.n / self.total)
        bar = "#" * int(frac * 24)
        sys.stderr.write(f"\r  {self.label:<12} [{bar:<24}] {self.n}/{self.total} {note[:40]:<40}")
        if self.n >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


class StudyContext:
    """Handed to ``Study.measure``: where to record, how to time, what mode we are in."""

    def __init__(self, kb: KB, run_id: str, study: str, quick: bool, ceilings: Dict[str, Any],
                 progress: bool = True, log: Callable[[str], None] | None = None) -> None:
        self.kb, self.run_id, self.study, self.quick = kb, run_id, study, quick
        self.ceilings = ceilings
        self.facts = device_facts()
        self.mode = "interpreter" if interpreter_mode() else "gpu"
        self.device = kernel_device()
        self.gpu = self.facts["gpu"]
        self._progress_enabled = progress
        self._log = log or (lambda m: print(m, file=sys.stderr))
        self.errors: List[str] = []

    @property
    def timing(self) -> bool:
        """True when timings mean something (a real GPU)."""
        return self.mode == "gpu"

    def log(self, msg: str) -> None:
        self._log(f"[{self.study}] {msg}")

    def progress(self, total: int, label: str | None = None) -> Progress:
        return Progress(total, label or self.study, self._progress_enabled)

    def bench(self, fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Optional[_timing.Timing]:
        """CUDA-event timing (median, p20, p80); None under the interpreter."""
        if not self.timing:
            return None
        return _timing.bench(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)

    def bench_clean_l2(self, fn: Callable[[], object], warmup_ms: float = 25.0,
                       rep_ms: float = 100.0) -> Optional[_timing.Timing]:
        """:meth:`bench` with L2 emptied by a read instead of a write (see timing.bench_clean_l2)."""
        if not self.timing:
            return None
        return _timing.bench_clean_l2(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)

    def record(self, *, op: str, impl: str, variant: str = "", mods: Sequence[str] = (), B: int | None = None,
               H: int | None = None, Hkv: int | None = None, N: int | None = None, Nk: int | None = None,
               D: int | None = None, dtype: str | None = None, causal: bool | None = None,
               timing: Optional[_timing.Timing] = None, flops: float | None = None, nbytes: float | None = None,
               extra: Dict[str, Any] | None = None, study: str | None = None) -> int:
        """Append one measurement row; tflops/gbps are derived from flops/nbytes and the median."""
        extra = dict(extra or {})
        ms = timing.ms_median if timing else None
        if timing and timing.warnings:
            extra.setdefault("warnings", list(timing.warnings))
        row = dict(
            run_id=self.run_id, study=study or self.study, op=op, impl=impl, variant=variant, mods=list(mods),
            B=B, H=H, Hkv=Hkv if Hkv is not None else H, N=N, Nk=Nk if Nk is not None else N, D=D,
            dtype=dtype, causal=causal, extra=extra,
            ms_median=ms, ms_p20=timing.ms_p20 if timing else None, ms_p80=timing.ms_p80 if timing else None,
            tflops=_timing.tflops(flops, ms) if (ms and flops) else None,
            gbps=_timing.gbps(nbytes, ms) if (ms and nbytes) else None,
            gpu=self.gpu, mode=self.mode,
        )
        return self.kb.add_measurement(row)

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run a piece of a study; a failure is logged and remembered, not fatal to the run."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - a study records failures rather than dying
            msg = f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.errors.append(msg)
            self.log("FAILED " + msg)
            if self.mode == "interpreter":
                # on CPU a failure is a bug worth seeing in full
                traceback.print_exc()


class RunData:
    """Read access to one run's rows, for ``Study.analyze``."""

    def __init__(self, kb: KB, run_id: str, scope: Optional[str] = None) -> None:
        self.kb, self.run_id, self.scope = kb, run_id, scope
        self.run = kb.run(run_id)
        self.mode = self.run["mode"]
        self.ceilings = self.run["ceilings"]
        self.env = self.run["env"]

    def rows(self, **where: Any) -> List[Dict[str, Any]]:
        """Rows of this run matching every field given; ``extra__key=value`` filters on extra.

        Scoped to one study (``scope``) unless ``study`` is given: op names repeat across studies
        (the linear study times dense ``attn_fwd`` rows too), and a finding must read its own rows.
        """
        if self.scope is not None and "study" not in where:
            where = dict(where, study=self.scope)
        extra_filters = {k[7:]: v for k, v in where.items() if k.startswith("extra__")}
        plain = {k: v for k, v in where.items() if not k.startswith("extra__")}
        mods = plain.pop("mods", None)
        rows = self.kb.measurements(self.run_id, **plain)
        if mods is not None:
            rows = [r for r in rows if list(r["mods"]) == list(mods)]
        for k, v in extra_filters.items():
            rows = [r for r in rows if r["extra"].get(k) == v]
        return rows

    def scoped(self, study: str) -> "RunData":
        return RunData(self.kb, self.run_id, scope=study)

    def one(self, **where: Any) -> Optional[Dict[str, Any]]:
        rows = [r for r in self.rows(**where) if r.get("ms_median") is not None or self.mode != "gpu"]
        return rows[-1] if rows else None


class Study:
    name: str = ""
    title: str = ""

    def measure(self, ctx: StudyContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def analyze(self, data: RunData) -> List[Finding]:  # pragma: no cover - abstract
        raise NotImplementedError


# ---- small helpers the studies share ------------------------------------------------------

def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def speedup_verdict(value: Optional[float], bar: float) -> str:
    """'supported' when value >= bar, 'refuted' when below, 'inconclusive' without data."""
    if value is None:
        return "inconclusive"
    return "supported" if value >= bar else "refuted"


def correctness_finding(study: str, data: RunData, op: str | None = None) -> Optional[Finding]:
    """A finding summarising correctness rows (extra.ok / extra.max_err) of a study: used in every mode."""
    rows = [r for r in data.rows(study=study) if "ok" in r["extra"] and (op is None or r["op"] == op)]
    if not rows:
        return None
    bad = [r for r in rows if not r["extra"]["ok"]]
    worst = max(rows, key=lambda r: r["extra"].get("err_ratio") or 0.0)
    verdict = "supported" if not bad else "refuted"
    claim = (f"{len(rows) - len(bad)} of {len(rows)} correctness checks of {op or study} passed the error rule "
             f"against the float64 reference (worst error / bound = {fmt(worst['extra'].get('err_ratio'))}"
             f"{', failing: ' + ', '.join(r['variant'] or r['impl'] for r in bad[:5]) if bad else ''}).")
    return Finding(
        id=f"{study}-{op or 'all'}-correct", title=f"{op or study} matches the float64 reference",
        claim=claim, verdict=verdict,
        metrics={"checks": len(rows), "failed": len(bad), "worst_err_ratio": worst["extra"].get("err_ratio")},
        evidence=[r["id"] for r in rows],
    )


def median(xs: Iterable[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
