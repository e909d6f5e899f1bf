"""The results store: one tidy row schema, crash-safe appends, resume keys, validated loading.

Every measured number in the book is one row of one CSV file,
``data/results/<experiment>/<gpu-slug>.csv``, with the run's provenance beside it in
``<gpu-slug>.json`` (a JSON object keyed by run_id). Each process of a multi-process sweep writes
``<gpu-slug>.part-<tag>.csv`` / ``.json`` instead, since appends to one file from several NFS
clients are not atomic; :func:`merge_parts` folds them into the main file, and until then every
reader here reads the main file and its parts together.

:data:`SCHEMA` is the row schema: one fixed column set (so every file has the same header, merging
is concatenation and one validator covers all) plus a JSON column ``extra`` for experiment-specific
values. Units are fixed: times in microseconds, bandwidth in GB/s = 10^9 bytes/s, sizes in bytes
or tokens, percentages 0-100. The file stores one more, last column, ``crc``: the CRC-32 (8 hex
digits) of the line up to it; readers skip a line whose CRC does not match (a torn write). The
column table (name, dtype as :func:`load` returns it, unit, meaning; a cell may be empty unless
its column is required) is appended below from :data:`SCHEMA`. :func:`load` adds one derived
column, ``memory_state``: the state a managed allocation was put in before each call (``cold``,
``prefetched``), which rows keep in ``extra`` beside ``memory_kind = managed`` (older rows wrote
both as one label, ``managed_cold``; loading splits it). It adds ``provenance_issues`` too: what
is wrong or missing in the provenance of the row's run (:func:`lib.harness.provenance.run_issues`,
what the run wrote itself, and :mod:`lib.harness.known_issues` for committed runs), the notes
joined by :data:`ISSUE_SEPARATOR`, empty where nothing is known to be wrong.

Crash safety: :func:`append_rows` writes all rows of one point with a single ``os.write`` on an
``O_APPEND`` descriptor, then ``fsync``: a killed sweep loses at most the point in flight, and a
rerun skips every point with an ``ok`` row (:func:`done_keys`); errored points are retried. Rows
are never rewritten; a forced rerun appends, and :func:`load` keeps the latest run of each point.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # str | int | float | bool | datetime | json
    unit: str
    meaning: str
    required: bool = False


SCHEMA: tuple[Column, ...] = (
    Column("experiment", "str", "-", "registry name (lib.catalog)", True),
    Column("point_key", "str", "-", "the point's parameters, k=v;k=v sorted by key; the resume key", True),
    Column("run_id", "str", "-", "one sweep process; keys the provenance JSON", True),
    Column("time_utc", "datetime", "UTC", "when the row was written", True),
    Column("gpu_slug", "str", "-", "GPU model slug (e.g. h100-80gb-hbm3), or 'cpu'", True),
    Column("status", "str", "-", "ok | error (measure raised)", True),
    Column("backend", "str", "-", "what was timed (an own kernel, vllm-triton, sdpa, memcpy, ...)"),
    Column("version", "str", "-", "kernel version (v1/v2) or backend version"),
    Column("addressing", "str", "-", "paged | contiguous | no_offset"),
    Column("placement", "str", "-", "physical block placement (shuffled, identity, contiguous, seed_random)"),
    Column("memory_kind", "str", "-", "where the KV cache lives (device, managed, ...)"),
    Column("block_size", "int", "tokens", "KV-cache block size"),
    Column("seq_len", "int", "tokens", "context length per sequence"),
    Column("batch_size", "int", "sequences", "sequences decoded together"),
    Column("num_heads", "int", "heads", "query heads"),
    Column("num_kv_heads", "int", "heads", "key/value heads"),
    Column("head_size", "int", "elements", "per head"),
    Column("dtype", "str", "-", "element type of K/V/Q"),
    Column("protocol", "str", "-", "rigorous (CUDA graph, L2 flushed) | hot (graph, no flush) | seed (the "
           "2024 post's host-clock loop) | eager / eager-hot (events around eager calls, with / without "
           "flush) | direct (events around one API call)"),
    Column("median_us", "float", "us", "median time of one call"),
    Column("p10_us", "float", "us", "10th percentile"),
    Column("p90_us", "float", "us", "90th percentile"),
    Column("samples", "int", "count", "timed samples"),
    Column("bytes_moved", "int", "bytes", "bytes that must move (K, V, Q, output)"),
    Column("bandwidth_gbps", "float", "GB/s", "bytes_moved / median (filled in if absent)"),
    Column("read_ceiling_gbps", "float", "GB/s", "read ceiling measured in the same run"),
    Column("pct_of_read_ceiling", "float", "%", "100 * bandwidth / read ceiling (filled in if absent)"),
    Column("rel_error", "float", "1", "error against the float64 reference (lib.engine.validation)"),
    Column("check_passed", "bool", "-", "did the correctness check pass"),
    Column("wall_s", "float", "s", "host wall time of the point's measure call (shared by its rows)"),
    Column("error", "str", "-", "exception text for status == error"),
    Column("extra", "json", "-", "experiment-specific values (JSON object): point parameters that are "
           "not columns, anything else measure reports"),
)
if __doc__:  # None under python -OO
    __doc__ += "\n" + "\n".join(f"{c.name:<21}  {c.dtype:<8}  {c.unit:<10}  {c.meaning}"
                                + (" (required)" if c.required else "") for c in SCHEMA) + "\n"
COLUMNS: tuple[str, ...] = tuple(c.name for c in SCHEMA)
BY_NAME: dict[str, Column] = {c.name: c for c in SCHEMA}
HEADER = ",".join(COLUMNS) + ",crc"
PROTOCOLS = ("rigorous", "hot", "seed", "eager", "eager-hot", "direct")
STATUSES = ("ok", "error")
#: relative tolerance for the derived columns (bandwidth, percent of ceiling)
_DERIVED_RTOL = 0.005
#: between two notes of the ``provenance_issues`` column :func:`load` adds
ISSUE_SEPARATOR = " | "


# ----------------------------------------------------------------------------- names and paths

def gpu_slug(name: str) -> str:
    """A file-name-safe GPU model name: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    s = re.sub(r"^\s*nvidia\s+", "", str(name), flags=re.IGNORECASE).lower()
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    if not s:
        raise ValueError(f"cannot make a GPU slug from {name!r}")
    return s


def results_root(root: str | os.PathLike | None = None) -> Path:
    """data/results of this checkout, unless another root is given."""
    if root is not None:
        return Path(root)
    from lib import DATA

    return DATA / "results"


def csv_path(experiment: str, slug: str, *, part: str | None = None, root=None) -> Path:
    """Where rows of one experiment on one GPU model go (``part`` tags one writer process)."""
    if part is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", part):
        raise ValueError(f"part tag {part!r} may hold only letters, digits, '-' and '_'")
    name = f"{slug}.part-{part}.csv" if part else f"{slug}.csv"
    return results_root(root) / experiment / name


def _main_of(path: Path) -> Path:
    """The main CSV a path (main or part) belongs to."""
    m = re.fullmatch(r"(.+)\.part-[A-Za-z0-9_-]+\.csv", path.name)
    return path.with_name(m.group(1) + ".csv") if m else path


def sibling_parts(path: str | os.PathLike) -> list[Path]:
    """Part files of a main CSV, sorted."""
    main = _main_of(Path(path))
    return sorted(main.parent.glob(main.stem + ".part-*.csv"))


def _family(path: str | os.PathLike) -> list[Path]:
    """The main CSV and all its parts that exist."""
    main = _main_of(Path(path))
    return [p for p in [main, *sibling_parts(main)] if p.exists()]


# ----------------------------------------------------------------------------- writing rows

def _fmt(col: Column, value: Any) -> str:
    """One cell as text; None/NaN become empty. Raises ValueError on a wrong type."""
    if value is None:
        return ""
    name = col.name
    if col.dtype == "json":
        if not isinstance(value, Mapping):
            raise ValueError(f"column 'extra' must be a dict, got {type(value).__name__}")
        return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), default=_json_default)
    if isinstance(value, float) and math.isnan(value):
        return ""
    if col.dtype == "str":
        if not isinstance(value, str):
            raise ValueError(f"column {name!r} wants a string, got {value!r}")
        return value.replace("\r", " ").replace("\n", " ")
    if col.dtype == "datetime":
        if isinstance(value, datetime):
            return value.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
        return str(value)
    if col.dtype == "bool":
        b = _as_bool(value)
        if b is None:
            raise ValueError(f"column {name!r} wants a bool, got {value!r}")
        return "true" if b else "false"
    if col.dtype == "int":
        if isinstance(value, bool) or not _is_integral(value):
            raise ValueError(f"column {name!r} wants an integer, got {value!r}")
        return str(int(value))
    if col.dtype == "float":
        if isinstance(value, bool):
            raise ValueError(f"column {name!r} wants a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"column {name!r} wants a number, got {value!r}") from None
        return "" if math.isnan(f) else repr(f)
    raise AssertionError(col.dtype)


def _json_default(o):
    """numpy scalars and other odd values in ``extra``."""
    return o.item() if hasattr(o, "item") else str(o)


def _is_integral(v) -> bool:
    try:
        return int(v) == v
    except (TypeError, ValueError, OverflowError):
        return False


def _as_bool(v):
    if isinstance(v, bool):
        return v
    if getattr(getattr(v, "dtype", None), "kind", None) == "b":  # numpy bool
        return bool(v)
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    return None


def _present(row: Mapping, key: str) -> bool:
    v = row.get(key)
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def finalize_row(row: Mapping[str, Any]) -> dict:
    """Check a row against the schema and fill the derived columns and ``time_utc``.

    Unknown keys are an error (with a suggestion), so that a typo never silently lands in
    ``extra``. ``bandwidth_gbps`` and ``pct_of_read_ceiling`` are computed when absent and
    checked when given: a value in the wrong unit (ms for us, MB/s for GB/s) fails here.
    """
    unknown = [k for k in row if k not in BY_NAME]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, COLUMNS, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError("unknown result column(s): " + ", ".join(hints)
                         + "; put experiment-specific values in row['extra'] (a dict)")
    r = dict(row)
    if not _present(r, "time_utc"):
        r["time_utc"] = datetime.now(timezone.utc)
    _check_row(r)
    return r


def _check_row(r: dict) -> None:
    """Required columns, categories and, for ok rows, timing order and units (fills derived columns)."""
    for col in SCHEMA:
        if col.required and not _present(r, col.name):
            raise ValueError(f"result row lacks required column {col.name!r}")
    if r["status"] not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {r['status']!r}")
    if _present(r, "protocol") and r["protocol"] not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {r['protocol']!r}")
    if r["status"] == "ok":
        _check_timing(r)
        _derive(r)


def _check_timing(r: dict) -> None:
    if not _present(r, "median_us"):
        return
    med = float(r["median_us"])
    if not med > 0:
        raise ValueError(f"median_us must be > 0, got {med}")
    lo = float(r["p10_us"]) if _present(r, "p10_us") else med
    hi = float(r["p90_us"]) if _present(r, "p90_us") else med
    tol = 1e-9 * med
    if not (lo <= med + tol and med <= hi + tol):
        raise ValueError(f"want p10_us <= median_us <= p90_us, got {lo}, {med}, {hi}")
    if _present(r, "samples") and int(r["samples"]) < 1:
        raise ValueError(f"samples must be >= 1, got {r['samples']}")


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _DERIVED_RTOL * max(abs(a), abs(b))


def _derive(r: dict) -> None:
    if _present(r, "bytes_moved") and int(r["bytes_moved"]) < 0:
        raise ValueError(f"bytes_moved must be >= 0, got {r['bytes_moved']}")
    if _present(r, "bytes_moved") and _present(r, "median_us"):
        bw = int(r["bytes_moved"]) / float(r["median_us"]) / 1e3  # bytes/us -> GB/s
        if not _present(r, "bandwidth_gbps"):
            r["bandwidth_gbps"] = bw
        elif not _close(float(r["bandwidth_gbps"]), bw):
            raise ValueError(f"bandwidth_gbps={r['bandwidth_gbps']} disagrees with bytes_moved/median_us "
                             f"= {bw:.6g} GB/s (units: bytes, microseconds, 1e9 bytes/s)")
    if _present(r, "read_ceiling_gbps") and not float(r["read_ceiling_gbps"]) > 0:
        raise ValueError(f"read_ceiling_gbps must be > 0, got {r['read_ceiling_gbps']}")
    if _present(r, "bandwidth_gbps") and _present(r, "read_ceiling_gbps"):
        pct = 100.0 * float(r["bandwidth_gbps"]) / float(r["read_ceiling_gbps"])
        if not _present(r, "pct_of_read_ceiling"):
            r["pct_of_read_ceiling"] = pct
        elif not _close(float(r["pct_of_read_ceiling"]), pct):
            raise ValueError(f"pct_of_read_ceiling={r['pct_of_read_ceiling']} disagrees with "
                             f"100*bandwidth/ceiling = {pct:.6g} (a percentage, 0-100)")


def format_line(row: Mapping[str, Any]) -> str:
    """One complete CSV line (with CRC and newline) for a finalized row."""
    return _line([_fmt(c, row.get(c.name)) for c in SCHEMA])


def _line(fields: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(fields)
    body = buf.getvalue() + ","
    return f"{body}{zlib.crc32(body.encode()):08x}\n"


def _append_bytes(path: Path, data: bytes) -> None:
    """One os.write with O_APPEND, then fsync; writes the header on creation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        created = True
    except FileExistsError:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        if created:
            data = (HEADER + "\n").encode() + data
        elif not _ends_with_newline(path):
            data = b"\n" + data  # isolate a torn last line; readers skip it (bad CRC)
        n = os.write(fd, data)
        if n != len(data):  # a full disk; never leave half a line unmarked
            raise OSError(f"short write to {path}: {n} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def append_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Validate rows and append them to ``path`` atomically (all or none, one write); the finalized rows."""
    done = [finalize_row(r) for r in rows]
    if done:
        _append_bytes(Path(path), "".join(format_line(r) for r in done).encode())
    return done


def append_row(path: str | os.PathLike, row: Mapping[str, Any]) -> dict:
    """Append one row atomically; see :func:`append_rows`."""
    return append_rows(path, [row])[0]


# ----------------------------------------------------------------------------- reading rows

@dataclass
class _Read:
    rows: list[list[str]]
    skipped: int


def _check_line(line: str) -> str | None:
    """The line's body (without the CRC field) if its CRC matches, else None."""
    body, sep, crc = line.rpartition(",")
    if not sep or len(crc) != 8:
        return None
    body += ","
    try:
        ok = int(crc, 16) == zlib.crc32(body.encode())
    except ValueError:
        return None
    return body[:-1] if ok else None


def read_raw(path: str | os.PathLike) -> _Read:
    """Rows of one CSV file as lists of strings; torn or corrupt lines are skipped and counted."""
    path = Path(path)
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    if not lines or lines[0] != HEADER:
        got = lines[0][:200] if lines else ""
        raise ValueError(f"{path}: header does not match results schema v{SCHEMA_VERSION}.\n"
                         f"  want: {HEADER}\n  got:  {got}")
    rows, skipped = [], 0
    for line in lines[1:]:
        if not line:
            continue
        body = _check_line(line)
        fields = None if body is None else next(csv.reader([body]))
        if fields is None or len(fields) != len(COLUMNS):
            skipped += 1
            continue
        rows.append(fields)
    return _Read(rows, skipped)


def iter_raw(paths: Iterable[Path]) -> Iterator[dict[str, str]]:
    for p in paths:
        for fields in read_raw(p).rows:
            yield dict(zip(COLUMNS, fields))


def done_keys(path: str | os.PathLike) -> set[str]:
    """point_keys with an ``ok`` row in ``path`` or its part files (for resuming a sweep)."""
    return {r["point_key"] for r in iter_raw(_family(path)) if r["status"] == "ok"}


def load(experiment: str, gpu: str | Iterable[str] | None = None, *, root: str | os.PathLike | None = None,
         include_errors: bool = False, dedupe: bool = True, expand_extra: bool = False):
    """Rows of one experiment as a pandas DataFrame with the schema's dtypes.

    ``gpu``: a slug (or several) to restrict to; default all GPUs. ``dedupe`` keeps, for each
    (gpu_slug, point_key), only the rows of its latest run (a forced rerun supersedes older rows)
    and drops exact duplicate lines. ``expand_extra`` turns the keys of ``extra`` into columns.
    Raises ValueError on a schema mismatch or a value that breaks its column's type or unit.
    """
    import pandas as pd

    exp_dir = results_root(root) / experiment
    if not exp_dir.is_dir():
        have = sorted(p.name for p in results_root(root).glob("*") if p.is_dir())
        raise FileNotFoundError(f"no results for experiment {experiment!r} in {exp_dir.parent} (have: {have})")
    slugs = None if gpu is None else ({gpu} if isinstance(gpu, str) else set(gpu))
    mains = sorted({_main_of(p) for p in exp_dir.glob("*.csv")})
    paths = [p for m in mains if slugs is None or m.stem in slugs for p in _family(m)]
    if slugs is not None and not paths:
        have = sorted({m.stem for m in mains})
        raise FileNotFoundError(f"no results for {experiment!r} on {sorted(slugs)} (have: {have})")
    raw = list(iter_raw(paths))
    if dedupe:  # exact duplicate lines (a merge interrupted before it removed its parts)
        raw = list({tuple(r.values()): r for r in raw}.values())
    df = _typed_frame(raw, pd)
    if not include_errors:
        df = df[df["status"] == "ok"]
    if dedupe and len(df):
        df = _dedupe(df)
    df = _with_memory_state(df)
    df = _with_provenance_issues(df, experiment, root)
    if expand_extra and len(df):
        df = _expand_extra(df, pd)
    return df.reset_index(drop=True)


def provenance_issue_list(cell) -> list[str]:
    """The notes of one ``provenance_issues`` cell, as a list."""
    return [x for x in str(cell or "").split(ISSUE_SEPARATOR) if x]


def _with_provenance_issues(df, experiment: str, root):
    """A ``provenance_issues`` column: per run, what its record shows is wrong or missing, what it
    wrote itself (``provenance_issues`` in its JSON) and the committed notes on it."""
    from lib.harness import known_issues
    from lib.harness import provenance

    df = df.copy()
    if not len(df):
        df["provenance_issues"] = []
        return df
    runs = load_provenance(experiment, root=root)
    used = df.groupby("run_id")["backend"].agg(lambda b: {x for x in b if isinstance(x, str)})
    notes = {}
    for run_id in df["run_id"].unique():
        prov = runs.get(run_id)
        items = list(known_issues.known_issues(experiment, run_id))
        if prov is None:
            items.append(f"provenance: run {run_id} has no provenance record beside its rows")
        else:
            items += [*(prov.get("provenance_issues") or []), *provenance.run_issues(prov, used.get(run_id, ()))]
        notes[run_id] = ISSUE_SEPARATOR.join(dict.fromkeys(items))
    df["provenance_issues"] = df["run_id"].map(notes).fillna("")
    return df


def _typed_frame(raw: list[dict[str, str]], pd):
    """The rows as typed columns; each row then passes the checks :func:`finalize_row` made."""
    cols = {}
    for col in SCHEMA:
        try:
            cols[col.name] = _convert(col, [r[col.name] for r in raw], pd)
        except (ValueError, TypeError) as e:
            raise ValueError(f"results column {col.name!r} ({col.dtype}, {col.unit}): {e}") from None
    df = pd.DataFrame(cols)
    for rec in df.astype(object).where(df.notna(), None).to_dict("records"):
        try:
            _check_row(rec)
        except ValueError as e:
            raise ValueError(f"results row {rec['point_key']!r} of run {rec['run_id']!r}: {e}") from None
    return df


def _convert(col: Column, vals: list[str], pd):
    if col.dtype == "str":
        return pd.Series([v if v != "" else None for v in vals], dtype="object")
    if col.dtype == "int":
        return pd.array([int(v) if v != "" else None for v in vals], dtype="Int64")
    if col.dtype == "float":
        return pd.Series([float(v) if v != "" else math.nan for v in vals], dtype="float64")
    if col.dtype == "bool":
        m = {"true": True, "false": False, "": None}
        bad = [v for v in vals if v not in m]
        if bad:
            raise ValueError(f"not a bool: {bad[0]!r}")
        return pd.array([m[v] for v in vals], dtype="boolean")
    if col.dtype == "datetime":
        return pd.to_datetime(pd.Series(vals, dtype="object"), utc=True, format="ISO8601")
    if col.dtype == "json":
        out = []
        for v in vals:
            d = json.loads(v) if v else {}
            if not isinstance(d, dict):
                raise ValueError(f"not a JSON object: {v[:80]!r}")
            out.append(d)
        return pd.Series(out, dtype="object")
    raise AssertionError(col.dtype)


def _dedupe(df):
    key = ["gpu_slug", "point_key"]
    last = df.groupby(key + ["run_id"], sort=False)["time_utc"].max().reset_index()
    last = last.sort_values("time_utc").drop_duplicates(key, keep="last")
    keep = set(zip(last["gpu_slug"], last["point_key"], last["run_id"]))
    mask = [k in keep for k in zip(df["gpu_slug"], df["point_key"], df["run_id"])]
    return df[mask]


def _with_memory_state(df):
    """A ``memory_state`` column beside ``memory_kind``: rows name it in ``extra``; rows written
    before the two were split carry both in one label (``managed_cold``), split here."""
    from lib.engine.memory import split_kind

    df = df.copy()
    kinds, states, extras = [], [], []
    for kind, extra in zip(df["memory_kind"], df["extra"]):
        extra = dict(extra) if isinstance(extra, dict) else {}
        base, state = split_kind(kind) if isinstance(kind, str) else (kind, None)
        kinds.append(base)
        states.append(extra.pop("memory_state", None) or state)
        extras.append(extra)
    df["memory_kind"], df["memory_state"], df["extra"] = kinds, states, extras
    return df


def _expand_extra(df, pd):
    ext = pd.json_normalize(list(df["extra"]), max_level=0)
    ext.index = df.index
    clash = sorted(set(ext.columns) & set(df.columns))
    if clash:
        raise ValueError(f"extra keys clash with schema columns: {clash}")
    return pd.concat([df, ext], axis=1)


# ----------------------------------------------------------------------------- provenance files

def provenance_path(csv: str | os.PathLike) -> Path:
    return Path(csv).with_suffix(".json")


@contextlib.contextmanager
def _locked(path: Path):
    """An advisory lock beside ``path`` for read-modify-write of JSON files (one host)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: provenance file must hold a JSON object keyed by run_id")
    return data


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_provenance(csv: str | os.PathLike, run_id: str, prov: Mapping[str, Any]) -> Path:
    """Store (or update) the provenance of one run beside its CSV."""
    path = provenance_path(csv)
    with _locked(path):
        data = _read_json(path)
        data[run_id] = dict(prov)
        _write_json_atomic(path, data)
    return path


def load_provenance(experiment: str, gpu: str | None = None, *, root=None) -> dict[str, dict]:
    """All runs' provenance of one experiment (main and part files), keyed by run_id."""
    exp_dir = results_root(root) / experiment
    out: dict[str, dict] = {}
    pattern = f"{gpu}.*json" if gpu else "*.json"
    for p in sorted(exp_dir.glob(pattern)):
        if gpu and not (p.name == f"{gpu}.json" or p.name.startswith(f"{gpu}.part-")):
            continue
        out.update(_read_json(p))
    return out


def merge_parts(main_csv: str | os.PathLike, parts: Iterable[str | os.PathLike] | None = None) -> int:
    """Concatenate part files into their main CSV (and their provenance), then remove them.

    Only valid lines are carried over. Returns the number of rows moved. Never run it while
    another process still writes one of the parts (cluster shards: merge after the job ends).
    """
    main = Path(main_csv)
    parts = [Path(p) for p in (sibling_parts(main) if parts is None else parts)]
    moved = 0
    with _locked(main):
        for part in parts:
            if not part.exists():
                continue
            if _main_of(part) != main:
                raise ValueError(f"{part} is not a part of {main}")
            lines = [_line(f) for f in read_raw(part).rows]
            if lines:
                _append_bytes(main, "".join(lines).encode())
            pj = provenance_path(part)
            if pj.exists():
                mj = provenance_path(main)
                data = _read_json(mj)
                data.update(_read_json(pj))
                _write_json_atomic(mj, data)
                pj.unlink()
            part.unlink()
            moved += len(lines)
    return moved


def schema_markdown() -> str:
    """The schema as a Markdown table."""
    lines = ["| column | dtype | unit | meaning |", "| --- | --- | --- | --- |"]
    for c in SCHEMA:
        lines.append(f"| `{c.name}` | {c.dtype} | {c.unit} | {c.meaning}{' (required)' if c.required else ''} |")
    return "\n".join(lines)
