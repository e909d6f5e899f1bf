"""Named experiment grids: what a sweep measures, point by point.

An :class:`Experiment` names a grid and the function that measures one point; each chapter package
declares its own (``lib/chapters/<chapter>/experiment.py``) and :mod:`lib.catalog` lists them.
``grid`` is a dict ``param -> values`` (a Cartesian product, first key slowest) or a list of such
dicts (their union: the seed's tables are not one product). Every parameter a measure function
reads belongs in the grid, fixed ones as one-value lists, so a user can change any of them
(``-p seq_len=1024,2048``); ``where`` drops points.

The measure contract: ``measure(point)`` returns a dict (or a list of dicts, one per thing timed)
keyed by results-schema columns (:mod:`lib.harness.results`). The sweep fills identity, time,
status, wall time, read ceiling and derived bandwidth; point parameters that are schema columns
fill those columns, the others go into ``extra``. An exception becomes an ``error`` row, retried
by the next run. Shards are **0-based** (as Kubernetes' ``JOB_COMPLETION_INDEX`` and Slurm's
``--array=0-<n-1>``); shard ``i`` takes points ``i, i+n, ...`` so expensive points spread evenly.
"""

from __future__ import annotations

import difflib
import importlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

_SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    measure: str  # "package.module:function", imported when a sweep runs
    grid: Mapping[str, Sequence] | Sequence[Mapping[str, Sequence]]
    chapter: str | None = None
    gpu: bool = True  # False: runs anywhere, rows are filed under gpu_slug "cpu"
    where: Callable[[dict], bool] | None = field(default=None, compare=False)
    # "pkg.module:function" called with the points about to be measured, before the first one
    # (e.g. compile every kernel they need in parallel); its time is reported apart (prepare_s).
    prepare: str | None = None
    # True for experiments that time nothing: several processes may share one GPU.
    concurrent_ok: bool = False
    # Parameters that name a sub-grid (uvm's `measurement`): an override of one selects the
    # sub-grids whose values it names, instead of relabelling every sub-grid with them.
    selectors: tuple[str, ...] = ()

    @property
    def subgrids(self) -> list[dict[str, list]]:
        grids = [self.grid] if isinstance(self.grid, Mapping) else list(self.grid)
        return [{k: list(v) for k, v in g.items()} for g in grids]

    def param_types(self) -> dict[str, type]:
        """Each parameter with the type its values are coerced to, in grid order."""
        values: dict[str, list] = {}
        for g in self.subgrids:
            for k, v in g.items():
                values.setdefault(k, []).extend(v)
        return {k: _value_type(self.name, k, v) for k, v in values.items()}

    def size(self) -> int:
        return len(expand(self))

    def resolve_measure(self) -> Callable[[dict], Any]:
        """Import the measure function (lazily: it may need a GPU stack)."""
        return self._resolve(self.measure, "measure")

    def resolve_prepare(self) -> Callable[[list], Any] | None:
        return self._resolve(self.prepare, "prepare") if self.prepare else None

    def _resolve(self, path: str, what: str) -> Callable:
        mod, sep, fn = path.partition(":")
        if not sep or not mod or not fn:
            raise ValueError(f"{what} of {self.name!r} must look like 'pkg.module:function', got {path!r}")
        try:
            return getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ImportError(f"cannot load {what} {path!r} of experiment {self.name!r}: {e}") from e


def check(exp: Experiment) -> Experiment:
    """``exp`` itself, once its grid holds only named, scalar, non-empty parameter lists."""
    if not exp.subgrids:
        raise ValueError(f"experiment {exp.name!r} has an empty grid")
    for g in exp.subgrids:
        for k, vals in g.items():
            if not k.isidentifier():
                raise ValueError(f"{exp.name}: parameter name {k!r} is not an identifier")
            if not vals:
                raise ValueError(f"{exp.name}: parameter {k!r} has no values")
            for v in vals:
                if not isinstance(v, _SCALARS):
                    raise ValueError(f"{exp.name}: {k}={v!r} is not a scalar (bool/int/float/str/None)")
                if isinstance(v, str) and any(c in v for c in ";=,\n"):
                    raise ValueError(f"{exp.name}: {k}={v!r} may not contain ';', '=', ',' or newlines")
    exp.param_types()  # raises on mixed types
    return exp


def suggest(word: str, known) -> str:
    close = difflib.get_close_matches(word, list(known), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{hint} (known: {', '.join(sorted(known))})"


# ----------------------------------------------------------------------------- parameter values

def _value_type(exp: str, key: str, values: list) -> type:
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return type(None)
    if len(kinds) == 1:
        return kinds.pop()
    if kinds == {int, float}:
        return float
    raise ValueError(f"{exp}: parameter {key!r} mixes value types {sorted(k.__name__ for k in kinds)}")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(exp: Experiment, key: str, raw: Any) -> Any:
    """One value for parameter ``key`` as the grid's type (strings from the CLI included)."""
    types = exp.param_types()
    if key not in types:
        raise ValueError(f"unknown parameter {key!r} for experiment {exp.name!r}{suggest(key, types)}")
    t = types[key]
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null") and t is not str):
        return None
    try:
        if t is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in _TRUE | _FALSE:
                return str(raw).lower() in _TRUE
        elif t in (int, float) and not isinstance(raw, bool):  # a bool is no number here
            if t is float:
                return float(raw)
            if not (isinstance(raw, float) and not raw.is_integer()):
                return int(raw)
        elif t is str:
            if not any(c in str(raw) for c in ";=\n"):
                return str(raw)
        elif t is type(None):
            return raw  # parameter whose only value is None: anything goes
        raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{exp.name}: {key}={raw!r} is not a valid {t.__name__}") from None


def parse_params(exp: Experiment, items: Sequence[str]) -> dict[str, list]:
    """CLI ``k=v`` / ``k=v1,v2`` strings into typed overrides for :func:`expand`."""
    out: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"parameter {item!r} must look like name=value or name=v1,v2")
        if key in out:
            raise ValueError(f"parameter {key!r} given twice; give a list instead: {key}=a,b")
        vals = [v.strip() for v in raw.split(",")]
        if any(v == "" for v in vals):
            raise ValueError(f"parameter {item!r} has an empty value")
        out[key] = [coerce(exp, key, v) for v in vals]
    return out


def normalize_overrides(exp: Experiment, overrides: Mapping[str, Any] | None) -> dict[str, list]:
    """Overrides as ``param -> list of typed values`` (what :func:`expand` applies)."""
    out = {}
    for k, v in (overrides or {}).items():
        if isinstance(v, str) and "," in v:
            v = v.split(",")
        vals = list(v) if isinstance(v, (list, tuple)) else [v]
        if not vals:
            raise ValueError(f"{exp.name}: parameter {k!r} overridden with no values")
        out[k] = [coerce(exp, k, x) for x in vals]
    return out


# ----------------------------------------------------------------------------- points

def point_key(point: Mapping[str, Any]) -> str:
    """Stable identity of a point: ``k=v;k=v`` with keys sorted."""
    return ";".join(f"{k}={_fmt(point[k])}" for k in sorted(point))


def _fmt(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def expand(exp: Experiment, overrides: Mapping[str, Any] | None = None) -> list[dict]:
    """All points of an experiment, in a deterministic order, without duplicates.

    ``overrides`` replaces a parameter's values (a value, a list, or a "a,b" string) in every
    sub-grid that has that parameter.
    """
    over = normalize_overrides(exp, overrides)
    seen: dict[str, dict] = {}
    for g in exp.subgrids:
        chosen = {k: [x for x in g[k] if coerce(exp, k, x) in over[k]]
                  for k in exp.selectors if k in over and k in g}
        if any(not v for v in chosen.values()):
            continue  # a selector names none of this sub-grid's values
        g = {k: chosen.get(k, over.get(k, v) if k not in exp.selectors else v) for k, v in g.items()}
        g = {k: [coerce(exp, k, x) for x in v] for k, v in g.items()}
        for combo in itertools.product(*g.values()):
            p = dict(zip(g.keys(), combo))
            if exp.where is not None and not exp.where(p):
                continue
            seen.setdefault(point_key(p), p)
    return list(seen.values())


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' (0-based i) -> (i, n), with a clear error."""
    i_s, sep, n_s = str(text).partition("/")
    try:
        i, n = int(i_s), int(n_s)
    except ValueError:
        sep = ""
    if not sep:
        raise ValueError(f"shard must look like i/n with 0 <= i < n (0-based), got {text!r}")
    check_shard(i, n)
    return i, n


def check_shard(i: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"shard count must be >= 1, got {n}")
    if not 0 <= i < n:
        raise ValueError(f"shard index must be in 0..{n - 1} (0-based), got {i}")


def shard(points: Sequence[dict], i: int, n: int) -> list[dict]:
    """Shard ``i`` of ``n`` (0-based): points i, i+n, i+2n, ...; every point in exactly one shard."""
    check_shard(i, n)
    return list(points[i::n])


# ----------------------------------------------------------------------------- the registry

def _selftest_measure(point: dict) -> dict:
    """CPU stand-in for a measure function: deterministic numbers after a short sleep."""
    n, variant = point["n"], point["variant"]
    time.sleep(point["sleep_s"])
    if point["fail_n"] == n:
        raise RuntimeError(f"selftest: planned failure at n={n}")
    median = 10.0 * n + (0.5 if variant == "b" else 0.0)
    return {"backend": f"selftest-{variant}", "protocol": "rigorous", "median_us": median,
            "p10_us": 0.95 * median, "p90_us": 1.05 * median, "samples": 10, "bytes_moved": 1000 * n,
            "rel_error": 0.0, "check_passed": True, "extra": {"square": n * n}}


SELFTEST = check(Experiment(
    name="selftest",
    description="CPU-only stand-in for tests: deterministic rows, a short sleep per point",
    measure="lib.harness.experiments:_selftest_measure",
    grid={"n": [1, 2, 3, 4, 5, 6, 7, 8], "variant": ["a", "b"], "sleep_s": [0.05], "fail_n": [0]},
    gpu=False,
))
