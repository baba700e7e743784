"""Parse ``cuobjdump -sass`` (and ``-res-usage``) text: instruction counts by class, loops, resources.

What the codegen study wants to know about a compiled kernel, from its SASS:

- which matrix instructions it uses: ``HGMMA`` (Hopper's asynchronous warpgroup MMA, wgmma) or
  ``HMMA`` (the warp-synchronous mma.sync of Ampere) or none (``FFMA`` scalar math);
- how it moves data: TMA (``UTMALDG``/``UTMASTG``/``UBLKCP``), cp.async (``LDGSTS``) or plain
  ``LDG``/``STG``, shared memory (``LDS``/``STS``/``LDSM``), and local memory (``LDL``/``STL``:
  register spills or a stack);
- where it loops: counts inside loops, and inside the *main loop*, matter more than totals,
  because a kernel spends its time there.

Loops are found on the control-flow graph, not by address ranges: basic blocks, dominators, and
the natural loop of every back edge (an edge to a block that dominates its source). Address
ranges would be wrong for Triton code, which places the slow paths of a loop (e.g. an mbarrier
wait retry) after the kernel's ``EXIT`` and branches back into the loop from there. Loops that
share a header are merged. The main loop is the loop with the most MMA instructions (without
MMAs: the most floating-point math), the smallest such loop when they tie (so nested loops give
the inner one that holds the work).

Both cuobjdump's format (``/*0a90*/ @!P0 BRA 0x400 ;`` with absolute hex targets) and nvdisasm's
(labels ``.L_x_3:`` and targets like ``BRA `(.L_x_3)``) are read; the encoding comments that
follow each instruction are optional (the stored test samples drop them).

Occupancy (:func:`occupancy`) follows the CUDA occupancy calculator with Hopper's limits
(65536 registers, 228 KB shared memory, 2048 threads, 32 blocks, 64 warps per SM; registers
allocated per warp in units of 256 and split over 4 SM sub-partitions; 1 KB of shared memory
reserved per block).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# ---------------------------------------------------------------------------- instruction classes

#: the counts every report shows, in this order (a kernel's ``classes`` dict always has these keys)
CLASSES = (
    "HGMMA", "HMMA", "QGMMA", "IMMA", "FFMA", "FMUL", "FADD", "HFMA2", "MUFU", "MUFU.EX2",
    "UTMALDG", "UTMASTG", "UBLKCP", "LDGSTS", "LDG", "STG", "LDS", "STS", "LDSM", "STSM",
    "LDL", "STL", "ATOM", "BAR", "SYNCS", "WARPGROUP.DEPBAR", "BRA", "total",
)
#: opcodes folded into one class
_ALIASES = {
    "ATOMG": "ATOM", "RED": "ATOM", "REDG": "ATOM", "ATOMS": "ATOM",
    "UBLKRED": "UBLKCP", "UTMAREDG": "UTMASTG",
}
WGMMA_OPS = ("HGMMA", "QGMMA", "IGMMA", "BGMMA")
MMA_SYNC_OPS = ("HMMA", "IMMA", "DMMA", "BMMA")
TMA_OPS = ("UTMALDG", "UTMASTG", "UBLKCP")
FP_MATH_OPS = ("FFMA", "FMUL", "FADD", "HFMA2", "MUFU")

_CONTROL = {"BRA", "JMP", "BRX", "JMX", "EXIT", "RET", "CALL", "KILL", "BPT"}


@dataclass
class Instr:
    addr: int
    opcode: str           # full mnemonic, e.g. "HGMMA.64x128x16.F32.BF16"
    operands: str = ""
    pred: str = ""        # "@P0", "@!UP1", "" when unpredicated
    target: Optional[int] = None  # branch / call target address

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def conditional(self) -> bool:
        return bool(self.pred) and self.pred not in ("@PT", "@UPT")


def classify(opcode: str) -> str:
    """The class an opcode counts under: its base mnemonic, with a few aliases folded."""
    base = opcode.split(".", 1)[0]
    return _ALIASES.get(base, base)


def count_instrs(instrs: Iterable[Instr]) -> Counter:
    """Counts by class (see :data:`CLASSES`), plus ``MUFU.EX2``, ``WARPGROUP.DEPBAR`` and ``total``."""
    c: Counter = Counter()
    for ins in instrs:
        cls = classify(ins.opcode)
        c[cls] += 1
        if ins.opcode.startswith("MUFU.EX2"):
            c["MUFU.EX2"] += 1
        elif ins.opcode.startswith("WARPGROUP.DEPBAR"):
            c["WARPGROUP.DEPBAR"] += 1
        c["total"] += 1
    return c


def class_counts(c: Counter) -> Dict[str, int]:
    """The fixed report classes (zeros included) plus every other opcode seen, for JSON."""
    out = {k: int(c.get(k, 0)) for k in CLASSES}
    out.update({k: int(v) for k, v in sorted(c.items()) if k not in out})
    return out


def summary_counts(c: Dict[str, int] | Counter) -> Dict[str, int]:
    """Families: wgmma (HGMMA & co), mma_sync (HMMA & co), tma, fp_math, spill_ldst (LDL + STL)."""
    g = lambda names: int(sum(c.get(n, 0) for n in names))  # noqa: E731
    return {"wgmma": g(WGMMA_OPS), "mma_sync": g(MMA_SYNC_OPS), "tma": g(TMA_OPS), "fp_math": g(FP_MATH_OPS),
            "cp_async": g(("LDGSTS",)), "global_ld": g(("LDG",)), "local_ldst": g(("LDL", "STL"))}


# ---------------------------------------------------------------------------- resources

@dataclass
class ResUsage:
    """``cuobjdump -res-usage``: per-thread registers, stack and local bytes, static shared bytes."""

    registers: int
    stack: int = 0
    shared: int = 0
    local: int = 0

    @property
    def local_bytes(self) -> int:
        """Per-thread local memory (stack frame + local arrays): where spilled registers live."""
        return self.stack + self.local


_RES_RE = re.compile(r"Function\s+([^\s:]+)\s*:\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_res_usage(text: str) -> Dict[str, ResUsage]:
    return {m.group(1): ResUsage(*(int(m.group(i)) for i in range(2, 6))) for m in _RES_RE.finditer(text)}


# ---------------------------------------------------------------------------- parsing

_FUNC_RE = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
_NVDIS_FUNC_RE = re.compile(r"^\s*\.text\.([^:\s]+):\s*$")
_ARCH_RE = re.compile(r"code for (sm_\w+)")
_LABEL_RE = re.compile(r"^\s*(\.L[\w.$]+):\s*$")
_INSTR_RE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s*(.*?)\s*;")
_PRED_RE = re.compile(r"^(@!?U?P(?:T|\d+))\s+")
_HEX_TARGET_RE = re.compile(r"(?:^|[\s,])(0x[0-9a-fA-F]+)\s*$")
_LABEL_TARGET_RE = re.compile(r"`\((\.L[\w.$]+)\)")


@dataclass
class Loop:
    header: int                      # address of the header block's first instruction
    addrs: frozenset                 # addresses of every instruction in the loop
    counts: Counter = field(default_factory=Counter)
    depth: int = 1                   # 1 = outermost
    span: Tuple[int, int] = (0, 0)   # lowest and highest address (the body need not be contiguous)

    @property
    def size(self) -> int:
        return len(self.addrs)

    @property
    def mma(self) -> int:
        return sum(self.counts.get(k, 0) for k in WGMMA_OPS + MMA_SYNC_OPS)

    @property
    def fp(self) -> int:
        return sum(self.counts.get(k, 0) for k in FP_MATH_OPS)


@dataclass
class SassFunction:
    name: str
    arch: str = ""
    instrs: List[Instr] = field(default_factory=list)
    res: Optional[ResUsage] = None
    _loops: Optional[List[Loop]] = None

    @property
    def counts(self) -> Counter:
        return count_instrs(self.instrs)

    @property
    def loops(self) -> List[Loop]:
        if self._loops is None:
            self._loops = find_loops(self.instrs)
        return self._loops

    @property
    def loop_counts(self) -> Counter:
        """Counts over the union of all loops (each instruction once)."""
        inside = frozenset().union(*(lp.addrs for lp in self.loops)) if self.loops else frozenset()
        return count_instrs(i for i in self.instrs if i.addr in inside)

    @property
    def main_loop(self) -> Optional[Loop]:
        return pick_main_loop(self.loops)

    def hgmma_shapes(self, only: Optional[frozenset] = None) -> Dict[str, int]:
        """wgmma shapes (``64x128x16.F32.BF16``) and how often each occurs (optionally in ``only``)."""
        c = Counter(i.opcode.split(".", 1)[1] for i in self.instrs
                    if i.base in WGMMA_OPS and "." in i.opcode and (only is None or i.addr in only))
        return dict(c)

    def summary(self) -> Dict[str, object]:
        """A JSON-ready digest: counts in total, in loops and in the main loop, loops, resources."""
        main = self.main_loop
        out: Dict[str, object] = {
            "name": self.name, "arch": self.arch,
            "total": class_counts(self.counts), "in_loops": class_counts(self.loop_counts),
            "main_loop": class_counts(main.counts) if main else None,
            "main_loop_span": [hex(main.span[0]), hex(main.span[1])] if main else None,
            "main_loop_depth": main.depth if main else None,
            "n_loops": len(self.loops),
            "loops": [{"header": hex(lp.header), "size": lp.size, "depth": lp.depth, "mma": lp.mma}
                      for lp in self.loops],
            "hgmma_shapes": self.hgmma_shapes(main.addrs if main else None) if main else self.hgmma_shapes(),
        }
        if self.res is not None:
            out.update(registers=self.res.registers, static_shared=self.res.shared, stack_bytes=self.res.stack,
                       local_bytes=self.res.local_bytes)
        return out


def _parse_instr(addr: int, body: str) -> Instr:
    pred = ""
    m = _PRED_RE.match(body)
    if m:
        pred, body = m.group(1), body[m.end():]
    parts = body.split(None, 1)
    opcode = parts[0] if parts else ""
    operands = parts[1].strip() if len(parts) > 1 else ""
    ins = Instr(addr, opcode, operands, pred)
    if ins.base in ("BRA", "JMP", "CALL"):
        t = _HEX_TARGET_RE.search(operands)
        if t:
            ins.target = int(t.group(1), 16)
    return ins


def parse_sass(text: str) -> Dict[str, SassFunction]:
    """Functions of a ``cuobjdump -sass`` / ``nvdisasm`` listing, by name, in listing order.

    Resource usage printed in the same text (``cuobjdump -res-usage -sass``) is attached to
    each function as ``.res``.
    """
    res = parse_res_usage(text)
    funcs: Dict[str, SassFunction] = {}
    cur: Optional[SassFunction] = None
    arch = ""
    labels: Dict[str, int] = {}
    pending_labels: List[str] = []
    label_refs: List[Tuple[Instr, str]] = []
    for line in text.splitlines():
        m = _ARCH_RE.search(line)
        if m:
            arch = m.group(1)
            continue
        m = _FUNC_RE.match(line) or _NVDIS_FUNC_RE.match(line)
        if m:
            cur = SassFunction(m.group(1), arch, res=res.get(m.group(1)))
            funcs[cur.name] = cur  # a later section (another arch) of the same name replaces it
            continue
        m = _LABEL_RE.match(line)
        if m:
            pending_labels.append(m.group(1))
            continue
        m = _INSTR_RE.match(line)
        if not m or cur is None:
            continue
        ins = _parse_instr(int(m.group(1), 16), m.group(2))
        for lab in pending_labels:
            labels[lab] = ins.addr
        pending_labels.clear()
        if ins.base in ("BRA", "JMP", "CALL") and ins.target is None:
            t = _LABEL_TARGET_RE.search(ins.operands)
            if t:
                label_refs.append((ins, t.group(1)))
        cur.instrs.append(ins)
    for ins, lab in label_refs:
        ins.target = labels.get(lab)
    return funcs


# ---------------------------------------------------------------------------- control flow and loops

def _blocks(instrs: Sequence[Instr]) -> Tuple[List[Tuple[int, int]], Dict[int, List[int]], List[int]]:
    """Basic blocks as (first, last) instruction indices, successors by block index, and roots."""
    n = len(instrs)
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    leaders = {0}
    call_targets = set()
    for i, ins in enumerate(instrs):
        if ins.base in _CONTROL:
            if i + 1 < n:
                leaders.add(i + 1)
            if ins.target is not None and ins.target in index:
                leaders.add(index[ins.target])
                if ins.base == "CALL":
                    call_targets.add(index[ins.target])
    starts = sorted(leaders)
    blocks = [(s, (starts[k + 1] - 1) if k + 1 < len(starts) else n - 1) for k, s in enumerate(starts)]
    block_of = {s: b for b, (s, _) in enumerate(blocks)}
    succ: Dict[int, List[int]] = {}
    for b, (s, e) in enumerate(blocks):
        last = instrs[e]
        nxt = [b + 1] if b + 1 < len(blocks) else []
        out: List[int] = []
        base = last.base
        if base in ("BRA", "JMP"):
            if last.target is not None and last.target in index:
                out.append(block_of[index[last.target]])
            conditional = last.conditional or "," in last.operands  # e.g. BRA.DIV UR4, 0x... is conditional
            if conditional or last.target is None:
                out += nxt
        elif base in ("EXIT", "RET", "BRX", "JMX", "KILL", "BPT"):
            if last.conditional:
                out += nxt
        else:  # CALL and straight-line code fall through
            out += nxt
        succ[b] = sorted(set(out))
    roots = [0] + sorted(block_of[i] for i in call_targets)
    return blocks, succ, roots


def _dominators(nblocks: int, succ: Dict[int, List[int]], roots: List[int]) -> Dict[int, int]:
    """Dominator sets as bitmasks (bit j set: block j dominates), for blocks reachable from roots."""
    reach, stack = set(), list(roots)
    while stack:
        b = stack.pop()
        if b in reach:
            continue
        reach.add(b)
        stack.extend(succ.get(b, ()))
    pred: Dict[int, List[int]] = {b: [] for b in reach}
    for b in reach:
        for s in succ.get(b, ()):
            if s in reach:
                pred[s].append(b)
    order = sorted(reach)
    full = (1 << nblocks) - 1
    dom = {b: (1 << b) if b in roots else full for b in reach}
    changed = True
    while changed:
        changed = False
        for b in order:
            if b in roots:
                continue
            new = full
            for p in pred[b]:
                new &= dom[p]
            new |= 1 << b
            if new != dom[b]:
                dom[b], changed = new, True
    return dom


def find_loops(instrs: Sequence[Instr]) -> List[Loop]:
    """Natural loops (merged per header), with counts, nesting depth and address span."""
    if not instrs:
        return []
    blocks, succ, roots = _blocks(instrs)
    dom = _dominators(len(blocks), succ, roots)
    pred: Dict[int, List[int]] = {}
    for b, ss in succ.items():
        for s in ss:
            pred.setdefault(s, []).append(b)
    bodies: Dict[int, set] = {}
    for u in dom:
        for h in succ.get(u, ()):
            if h in dom and dom[u] >> h & 1:  # back edge u -> h: h dominates u
                body = bodies.setdefault(h, {h})
                stack = [u]
                while stack:
                    x = stack.pop()
                    if x in body:
                        continue
                    body.add(x)
                    stack.extend(p for p in pred.get(x, ()) if p in dom)
    loops = []
    for h, body in bodies.items():
        idx = [i for b in body for i in range(blocks[b][0], blocks[b][1] + 1)]
        addrs = frozenset(instrs[i].addr for i in idx)
        loops.append(Loop(instrs[blocks[h][0]].addr, addrs, count_instrs(instrs[i] for i in idx),
                          span=(min(addrs), max(addrs))))
    for lp in loops:
        lp.depth = sum(1 for o in loops if o is not lp and lp.addrs < o.addrs) + 1
    loops.sort(key=lambda lp: lp.header)
    return loops


def pick_main_loop(loops: Sequence[Loop]) -> Optional[Loop]:
    """The loop holding the most MMAs (else the most fp math); the smallest one on ties."""
    if not loops:
        return None
    return max(loops, key=lambda lp: (lp.mma, lp.fp if lp.mma == 0 else 0, -lp.size))


# ---------------------------------------------------------------------------- PTX

#: PTX instruction prefix -> key (checked in order: first match wins)
_PTX_CLASSES = (
    ("wgmma.mma_async", "wgmma"), ("mma.sync", "mma.sync"),
    ("cp.async.bulk.tensor", "tma"), ("cp.async.bulk", "bulk_copy"), ("cp.async.", "cp.async"),
    ("ld.global", "ld.global"), ("st.global", "st.global"), ("ldmatrix", "ldmatrix"),
    ("ld.shared", "ld.shared"), ("st.shared", "st.shared"), ("ld.local", "ld.local"), ("st.local", "st.local"),
    ("fma.rn.f32", "fma.f32"), ("fma.rn.ftz.f32", "fma.f32"), ("ex2.approx", "ex2"),
    ("mbarrier.try_wait", "mbarrier.wait"),
)
_PTX_INSTR_RE = re.compile(r"^\s*(?:@!?%?\w+\s+)?([a-z][\w.:]*)", re.M)


def ptx_counts(ptx: str) -> Dict[str, int]:
    """Static counts of the PTX instructions that matter here (wgmma, mma.sync, TMA ``cp.async.bulk.tensor``
    split into loads and stores, cp.async, global/shared/local memory, fp32 FMA, ex2).

    PTX is what Triton hands to ptxas: a cross-check of the SASS (ptxas unrolls and schedules it,
    so counts differ; presence does not) and a fallback where no cuobjdump is available.
    """
    out: Counter = Counter()
    for m in _PTX_INSTR_RE.finditer(ptx):
        op = m.group(1)
        if op.startswith("cp.async") and any(w in op for w in ("commit_group", "wait_group", "wait_all")):
            out["async_group_sync"] += 1  # commit/wait of async copies: no data moved
            continue
        for prefix, key in _PTX_CLASSES:
            if op.startswith(prefix):
                if key == "tma":
                    key = "tma_store" if ".global.shared" in op else "tma_load"
                out[key] += 1
                break
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------- expectations (tests, study)

_COND_RE = re.compile(r"^\s*(==|!=|>=|<=|>|<)\s*(\S+)\s*$")
_OPS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


def _num(x: object) -> object:
    if isinstance(x, str):
        try:
            return int(x, 0)
        except ValueError:
            return x
    return x


def lookup(summary: Dict[str, object], path: str) -> object:
    """``"main_loop/HGMMA"``, ``"loops/0/size"``: a value of :meth:`SassFunction.summary` (missing counts: 0)."""
    cur: object = summary
    for part in path.split("/"):
        if isinstance(cur, list):
            cur = cur[int(part)] if part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur) else None
        elif isinstance(cur, dict):
            if part in cur:
                cur = cur[part]
            elif path.split("/")[0] in ("total", "in_loops", "main_loop", "ptx") and cur is not summary:
                cur = 0  # an opcode that does not occur
            else:
                return None
        else:
            return None
    return cur


def check_expectations(funcs: Dict[str, SassFunction], expect: Dict[str, Dict[str, str]],
                       ptx: Optional[Dict[str, int]] = None) -> Tuple[int, List[str]]:
    """Count the conditions in ``expect`` (function name, or ``"*"`` for the first function, ->
    {path: ``">0"``, ``"==3"``, ``"==0x40"``, ``"ptx/wgmma"``...}) and list the ones that fail.
    ``ptx``: :func:`ptx_counts` of the sample's PTX, reachable as ``ptx/<key>`` (absent keys: 0)."""
    n, failed = 0, []
    for fname, conds in expect.items():
        fn = funcs.get(fname) if fname != "*" else next(iter(funcs.values()), None)
        if fn is None:
            n += 1
            failed.append(f"{fname}: function not found (have {', '.join(funcs) or 'none'})")
            continue
        summ = fn.summary()
        if ptx is not None:
            summ["ptx"] = ptx
        for path, cond in conds.items():
            n += 1
            m = _COND_RE.match(str(cond))
            if not m:
                failed.append(f"{fname}:{path}: bad condition {cond!r}")
                continue
            val = _num(lookup(summ, path))
            want = _num(m.group(2))
            try:
                ok = val is not None and _OPS[m.group(1)](val, want)
            except TypeError:
                ok = False
            if not ok:
                failed.append(f"{fname}:{path} = {val!r}, expected {cond}")
    return n, failed


def check_sample(path) -> Dict[str, object]:
    """Parse a stored ``.sass`` sample and check it against the ``expect`` of its ``.json`` sidecar."""
    import json
    from pathlib import Path

    path = Path(path)
    funcs = parse_sass(path.read_text())
    side = path.with_suffix(".json")
    expect = json.loads(side.read_text()).get("expect", {}) if side.exists() else {}
    ptx_file = path.with_suffix(".ptx")
    ptx = ptx_counts(ptx_file.read_text()) if ptx_file.exists() else None
    n, failed = check_expectations(funcs, expect, ptx)
    if not expect:
        failed = failed + [f"{path.name}: no expectations (missing {side.name} or its 'expect')"]
    summary = {name: summary_counts(fn.main_loop.counts) if fn.main_loop else None for name, fn in funcs.items()}
    return {"checks": n, "failed": failed, "summary": summary}


# ---------------------------------------------------------------------------- occupancy

@dataclass(frozen=True)
class SmLimits:
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    smem_per_block_max: int = 227 * 1024
    smem_reserved_per_block: int = 1024
    smem_alloc_unit: int = 128
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    max_warps_per_sm: int = 64
    reg_alloc_unit: int = 256  # registers per warp are allocated in units of 256
    sub_partitions: int = 4    # the register file is split over 4 SM sub-partitions (one per scheduler)


HOPPER = SmLimits()


def _ceil_to(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(registers: int, shared_bytes: int, threads: int, limits: SmLimits = HOPPER) -> Dict[str, object]:
    """Blocks and warps per SM for a kernel, and what limits them.

    ``registers``: per thread; ``shared_bytes``: per block, static + dynamic, *without* the
    1 KB the system reserves per block (added here; pass the static part reported by
    ``-res-usage`` minus that reserve, or just Triton's dynamic ``metadata.shared`` plus any user
    static shared memory); ``threads``: per block.
    """
    warps = max(1, -(-threads // 32))
    by: Dict[str, int] = {
        "threads": limits.max_threads_per_sm // max(threads, 1),
        "blocks": limits.max_blocks_per_sm,
        "warps": limits.max_warps_per_sm // warps,
    }
    if registers > 0:
        per_warp = _ceil_to(registers * 32, limits.reg_alloc_unit)
        warps_by_regs = limits.sub_partitions * ((limits.regs_per_sm // limits.sub_partitions) // per_warp)
        by["registers"] = warps_by_regs // warps
    smem = _ceil_to(shared_bytes + limits.smem_reserved_per_block, limits.smem_alloc_unit)
    by["shared_memory"] = 0 if shared_bytes > limits.smem_per_block_max else limits.smem_per_sm // smem
    blocks = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "registers", k != "shared_memory"))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy": blocks * warps / limits.max_warps_per_sm, "limiter": limiter, "limits_by": by}


def limits_from_device(facts: Dict[str, object] | None = None) -> SmLimits:
    """Hopper limits, with registers and shared memory per SM read from the device where known."""
    if facts is None:
        from ..runtime.device import device_facts

        facts = device_facts()
    regs = facts.get("registers_per_sm") or HOPPER.regs_per_sm
    smem = facts.get("shared_memory_per_sm") or HOPPER.smem_per_sm
    smem_blk = facts.get("shared_memory_per_block_optin") or HOPPER.smem_per_block_max
    return SmLimits(regs_per_sm=int(regs), smem_per_sm=int(smem), smem_per_block_max=int(smem_blk))
