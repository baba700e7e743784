"""The knowledge base: runs, measurements and findings in SQLite (stdlib sqlite3).

One file, default ``kb/attention_proto.sqlite`` under the output folder
(``--out`` changes it). The schema version is checked on open: a KB written by
another schema is refused with a clear error rather than misread.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

SCHEMA_VERSION = 1
DEFAULT_OUT = Path("out")
KB_FILENAME = "attention_proto.sqlite"

#: fixed measurement fields, in export order (other tooling reads them)
MEASUREMENT_FIELDS = (
    "run_id", "study", "op", "impl", "variant", "mods", "B", "H", "Hkv", "N", "Nk", "D", "dtype",
    "causal", "extra", "ms_median", "ms_p20", "ms_p80", "tflops", "gbps", "gpu", "mode",
)
FINDING_FIELDS = ("id", "study", "title", "claim", "verdict", "metrics", "evidence", "run_id", "mode")
VERDICTS = ("supported", "refuted", "inconclusive", "observation")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT, mode TEXT NOT NULL,
    gpu TEXT NOT NULL, gpu_slug TEXT NOT NULL, studies TEXT NOT NULL, env TEXT NOT NULL,
    ceilings TEXT NOT NULL, quick INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS measurements (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL REFERENCES runs(run_id),
    study TEXT NOT NULL, op TEXT NOT NULL, impl TEXT NOT NULL, variant TEXT NOT NULL DEFAULT '',
    mods TEXT NOT NULL DEFAULT '[]', B INTEGER, H INTEGER, Hkv INTEGER, N INTEGER, Nk INTEGER,
    D INTEGER, dtype TEXT, causal INTEGER, extra TEXT NOT NULL DEFAULT '{}',
    ms_median REAL, ms_p20 REAL, ms_p80 REAL, tflops REAL, gbps REAL, gpu TEXT NOT NULL,
    mode TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS measurements_run_study ON measurements(run_id, study, op);
CREATE TABLE IF NOT EXISTS findings (
    run_id TEXT NOT NULL REFERENCES runs(run_id), id TEXT NOT NULL, study TEXT NOT NULL,
    title TEXT NOT NULL, claim TEXT NOT NULL, verdict TEXT NOT NULL, metrics TEXT NOT NULL,
    evidence TEXT NOT NULL, mode TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (run_id, id)
);
"""


class SchemaMismatch(RuntimeError):
    pass


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _clean(v: Any) -> Any:
    """JSON-safe: floats that are inf/nan become strings, tuples lists."""
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        return _clean(v.item())
    return v


def dumps(v: Any) -> str:
    return json.dumps(_clean(v), sort_keys=True)


class KB:
    """A handle on one SQLite knowledge base. Safe to share between threads."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        with self._lock, self._conn:
            self._conn.executescript(_SCHEMA)
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) != SCHEMA_VERSION:
                raise SchemaMismatch(
                    f"KB {self.path} has schema version {row['value']}; this attention-proto reads version "
                    f"{SCHEMA_VERSION}. Export it with the matching version or start a new KB (--out)."
                )

    @classmethod
    def in_dir(cls, out: Path | str) -> "KB":
        return cls(Path(out) / KB_FILENAME)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- runs ---------------------------------------------------------------------------
    def start_run(self, env: Dict[str, Any], studies: Sequence[str], quick: bool = False, run_id: str | None = None) -> str:
        run_id = run_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO runs (run_id, started_at, mode, gpu, gpu_slug, studies, env, ceilings, quick)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (run_id, _now(), env.get("mode", "unknown"), env.get("gpu", "unknown"), env.get("gpu_slug", "unknown"),
                 dumps(list(studies)), dumps(env), dumps({}), int(quick)),
            )
        return run_id

    def set_ceilings(self, run_id: str, ceilings: Dict[str, Any]) -> None:
        with self._lock, self._conn:
            self._conn.execute("UPDATE runs SET ceilings=? WHERE run_id=?", (dumps(ceilings), run_id))

    def add_studies(self, run_id: str, names: Sequence[str]) -> List[str]:
        """Append study names to a run (a run may be measured in several sittings); returns the new list."""
        studies = self.run(run_id)["studies"]
        studies += [n for n in names if n not in studies]
        with self._lock, self._conn:
            self._conn.execute("UPDATE runs SET studies=?, finished_at=NULL WHERE run_id=?", (dumps(studies), run_id))
        return studies

    def add_sitting(self, run_id: str, names: Sequence[str], env: Dict[str, Any],
                    quick: Optional[bool] = None) -> List[Dict[str, Any]]:
        """Record that ``names`` are (re)measured now, in a new sitting of a run, with this sitting's
        environment (git commit, date, driver ...): the run's ``env["sittings"]`` lists which
        studies each sitting measured, and ``env["git_commit"]`` becomes "<commit> (<studies>) + ...".
        A study measured again leaves its earlier sitting. Returns the sittings."""
        r = self.run(run_id)
        e = r["env"]
        sittings = e.get("sittings") or [{"studies": list(r["studies"]), "git_commit": e.get("git_commit"),
                                          "date": e.get("date"), "driver": e.get("driver")}]
        for st in sittings:
            st["studies"] = [n for n in st["studies"] if n not in names]
        sittings = [st for st in sittings if st["studies"]]
        sittings.append({"studies": list(names), "git_commit": env.get("git_commit"), "date": env.get("date"),
                         "driver": env.get("driver"), "quick": quick})
        e["sittings"] = sittings
        e["git_commit"] = " + ".join(f"{st['git_commit']} [{', '.join(st['studies'])}]" for st in sittings)
        with self._lock, self._conn:
            self._conn.execute("UPDATE runs SET env=? WHERE run_id=?", (dumps(e), run_id))
        return sittings

    def delete_measurements(self, run_id: str, study: str) -> int:
        """Drop a study's rows from a run (before it is measured again in a later sitting)."""
        with self._lock, self._conn:
            cur = self._conn.execute("DELETE FROM measurements WHERE run_id=? AND study=?", (run_id, study))
        return cur.rowcount

    def finish_run(self, run_id: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("UPDATE runs SET finished_at=? WHERE run_id=?", (_now(), run_id))

    def runs(self) -> List[Dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM runs ORDER BY started_at").fetchall()
        return [self._run(r) for r in rows]

    def run(self, run_id: str) -> Dict[str, Any]:
        with self._lock:
            r = self._conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if r is None:
            known = ", ".join(x["run_id"] for x in self.runs()) or "none"
            raise KeyError(f"no run {run_id!r} in {self.path}; runs: {known}")
        return self._run(r)

    def latest_run_id(self) -> Optional[str]:
        with self._lock:
            r = self._conn.execute("SELECT run_id FROM runs ORDER BY started_at DESC, rowid DESC LIMIT 1").fetchone()
        return r["run_id"] if r else None

    @staticmethod
    def _run(r: sqlite3.Row) -> Dict[str, Any]:
        d = dict(r)
        for k in ("studies", "env", "ceilings"):
            d[k] = json.loads(d[k])
        d["quick"] = bool(d["quick"])
        return d

    # ---- measurements -------------------------------------------------------------------
    def add_measurement(self, row: Dict[str, Any]) -> int:
        missing = [f for f in ("run_id", "study", "op", "impl", "gpu", "mode") if row.get(f) in (None, "")]
        if missing:
            raise ValueError(f"measurement row is missing {missing}; got keys {sorted(row)}")
        vals = dict(row)
        vals["mods"] = dumps(list(vals.get("mods") or []))
        vals["extra"] = dumps(vals.get("extra") or {})
        vals["causal"] = None if vals.get("causal") is None else int(bool(vals["causal"]))
        vals.setdefault("variant", "")
        cols = [f for f in MEASUREMENT_FIELDS if f in vals or f in ("variant",)]
        with self._lock, self._conn:
            cur = self._conn.execute(
                f"INSERT INTO measurements ({', '.join(cols)}, created_at) VALUES ({', '.join('?' * len(cols))}, ?)",
                [_clean(vals.get(c)) for c in cols] + [_now()],
            )
            return int(cur.lastrowid)

    def measurements(self, run_id: Optional[str] = None, **where: Any) -> List[Dict[str, Any]]:
        clauses, params = [], []
        if run_id is not None:
            clauses.append("run_id=?")
            params.append(run_id)
        for k, v in where.items():
            if k not in MEASUREMENT_FIELDS:
                raise ValueError(f"unknown measurement field {k!r}; fields: {', '.join(MEASUREMENT_FIELDS)}")
            if k == "causal" and v is not None:
                v = int(bool(v))
            clauses.append(f"{k}=?")
            params.append(v)
        sql = "SELECT * FROM measurements" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY id"
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [self._measurement(r) for r in rows]

    @staticmethod
    def _measurement(r: sqlite3.Row) -> Dict[str, Any]:
        d = dict(r)
        d["mods"] = json.loads(d["mods"])
        d["extra"] = json.loads(d["extra"])
        d["causal"] = None if d["causal"] is None else bool(d["causal"])
        return d

    # ---- findings -----------------------------------------------------------------------
    def add_finding(self, finding: Dict[str, Any]) -> None:
        f = dict(finding)
        missing = [k for k in FINDING_FIELDS if k not in f]
        if missing:
            raise ValueError(f"finding is missing {missing}; got keys {sorted(f)}")
        if f["verdict"] not in VERDICTS:
            raise ValueError(f"finding verdict must be one of {VERDICTS}; got {f['verdict']!r} in {f['id']}")
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO findings (run_id, id, study, title, claim, verdict, metrics, evidence, mode,"
                " created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (f["run_id"], f["id"], f["study"], f["title"], f["claim"], f["verdict"], dumps(f["metrics"]),
                 dumps(list(f["evidence"])), f["mode"], _now()),
            )

    def findings(self, run_id: Optional[str] = None, study: Optional[str] = None, verdict: Optional[str] = None,
                 gpu: Optional[str] = None, finding_id: Optional[str] = None) -> List[Dict[str, Any]]:
        clauses, params = [], []
        for col, val in (("f.run_id", run_id), ("f.study", study), ("f.verdict", verdict), ("f.id", finding_id)):
            if val is not None:
                clauses.append(f"{col}=?")
                params.append(val)
        if gpu is not None:
            clauses.append("(r.gpu=? OR r.gpu_slug=?)")
            params += [gpu, gpu]
        sql = ("SELECT f.*, r.gpu AS gpu, r.env AS env FROM findings f JOIN runs r ON r.run_id=f.run_id"
               + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY f.study, f.id")
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["metrics"] = json.loads(d["metrics"])
            d["evidence"] = json.loads(d["evidence"])
            d["env"] = json.loads(d["env"])
            out.append(d)
        return out

    def delete_findings(self, run_id: str, study: Optional[str] = None) -> None:
        with self._lock, self._conn:
            if study is None:
                self._conn.execute("DELETE FROM findings WHERE run_id=?", (run_id,))
            else:
                self._conn.execute("DELETE FROM findings WHERE run_id=? AND study=?", (run_id, study))
