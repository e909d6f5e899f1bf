"""The chapter frame: what every experiment chapter does before it explains anything.

:func:`open_chapter` checks the chapter's parameters, measures first when ``mode = "run"``, loads
the rows (refusing any that failed its correctness check), picks the card and reads its
provenance. The rest are the tools a chapter's prose quotes numbers through (:func:`one`,
:func:`value_range`, :class:`Plain`) and the model-shape labels every chapter uses.
"""

from __future__ import annotations

import ast

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pandas as pd

from lib.harness import results as R
from lib.harness.experiments import Experiment

MODES = ("replay", "run")

#: (query heads, KV heads) -> (layout, the model it stands for): every chapter's shape labels.
SHAPES = {(32, 32): ("MHA 32:32", "Llama-2-7B-like"), (32, 8): ("GQA 32:8", "Llama-3-8B-like"),
          (64, 8): ("GQA 64:8", "the seed's shape")}


def shape_label(num_heads: int, num_kv_heads: int, *, model: bool = True) -> str:
    """``"MHA 32:32 (Llama-2-7B-like)"``; without ``model`` the layout alone; unknown: ``"h:k"``."""
    layout, like = SHAPES.get((int(num_heads), int(num_kv_heads)), (f"{int(num_heads)}:{int(num_kv_heads)}", ""))
    return f"{layout} ({like})" if model and like else layout


def with_shape(rows: pd.DataFrame, *, model: bool = True) -> pd.DataFrame:
    """``rows`` with a ``shape`` column (its label) where the head counts are known."""
    out = rows.copy()
    known = out["num_heads"].notna() & out["num_kv_heads"].notna()
    out["shape"] = None
    out.loc[known, "shape"] = [shape_label(h, k, model=model) for h, k in
                               zip(out.loc[known, "num_heads"], out.loc[known, "num_kv_heads"])]
    return out


#: The cards of the committed data, in the order the book shows them, and their short names.
CARDS = {"h100-80gb-hbm3": "H100", "h200": "H200"}


def card_label(slug: str) -> str:
    """``"H100"`` for ``"h100-80gb-hbm3"``; an unknown card's slug as it is."""
    return CARDS.get(slug, slug)


def card_slugs(rows: pd.DataFrame) -> list[str]:
    """The cards in ``rows`` (a loader's output over every card), known ones in :data:`CARDS`
    order first: what a chapter draws side by side."""
    have = set(rows["gpu_slug"].dropna().unique())
    return [c for c in CARDS if c in have] + sorted(have - set(CARDS))


def physical_cards(experiment: str, root=None) -> dict[str, str]:
    """run id -> the physical card that ran it (``gpu.uuid_sha16`` in its provenance; "" where
    not recorded): the unit of the between-card spread, since every lent machine is a new card."""
    return {run: (p.get("gpu") or {}).get("uuid_sha16") or ""
            for run, p in R.load_provenance(experiment, root=root).items()}


def with_physical_card(rows: pd.DataFrame, experiment: str, root=None) -> pd.DataFrame:
    """``rows`` with a ``card_id`` column: the physical card of each row's run."""
    ids = physical_cards(experiment, root=root)
    out = rows.copy()
    out["card_id"] = [ids.get(r, "") for r in out["run_id"]]
    return out


class NoData(FileNotFoundError):
    """A chapter has no committed rows to draw from (say how to measure them)."""


def rerun_hint(experiment: str) -> str:
    return (f'run this chapter with mode = "run" on a GPU (or `python -m lib sweep {experiment}`) '
            f"and commit data/results/{experiment}/")


def refuse_failed(rows: pd.DataFrame, experiment: str, show=("backend", "point_key"),
                  what: str = "correctness check") -> pd.DataFrame:
    """``rows`` unchanged, or ValueError naming the first ok rows whose check failed: a chapter
    never quotes a number from a wrong kernel."""
    ok = rows["status"] == "ok" if "status" in rows.columns else True
    bad = rows[ok & ~rows["check_passed"].fillna(False).astype(bool)]
    if len(bad):
        cols = [c for c in show if c in bad.columns]
        raise ValueError(f"{len(bad)} {experiment} rows failed their {what}: {bad[cols].head().to_dict('records')}")
    return rows


def load_checked(experiment: str, gpu=None, root=None, *, expand_extra: bool = False,
                 include_errors: bool = False, show=("backend", "point_key"),
                 what: str = "correctness check", dedupe: bool = True) -> pd.DataFrame:
    """The experiment's rows (ok ones unless ``include_errors``) through :func:`refuse_failed`;
    :class:`NoData`, saying how to measure them, where there are none."""
    try:
        rows = R.load(experiment, gpu, root=root, expand_extra=expand_extra, include_errors=include_errors,
                      dedupe=dedupe)  # dedupe=False: every run's rows (repeats, for their spread)
    except FileNotFoundError as exc:
        raise NoData(f"No {experiment} measurements in {R.results_root(root)}: "
                     f"{rerun_hint(experiment)} ({exc})") from None
    if rows.empty:
        raise NoData(f"The {experiment} results in {R.results_root(root)} hold no rows: {rerun_hint(experiment)}")
    return refuse_failed(rows, experiment, show, what)


class Plain(str):
    """Text for myst-nb's ``{glue:text}``, which prints a value's repr: here the text itself.

    The role passes that repr through ``ast.literal_eval`` and ``str``, so "1.000" would print as
    "1.0" and "1,024" as a tuple: text that would not survive the round trip gets an invisible
    word joiner (U+2060), which keeps it a plain string."""

    def __repr__(self) -> str:
        text = str(self)
        try:
            survives = str(ast.literal_eval(text)) == text
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            return text
        return text if survives else text + "\u2060"


def card_facts(gpu: str, root=None, experiment: str = "seed_tables") -> dict:
    """What the provenance of this card's runs of ``experiment`` says about the machine (the
    latest run's values): name, driver, CUDA, SMs, L2 size, clocks, the read ceiling measured and
    the datasheet's peaks beside it, and what is wrong in that provenance.

    ``sm_clock_mhz`` is the median clock under load where the run sampled it, else the idle
    snapshot taken before the run (older runs); ``sm_clock_label`` says which.
    ``provenance_issues``: the run's notes (:func:`lib.harness.results.load`), "" where none.
    """
    from lib.harness import known_issues
    from lib.harness import provenance

    runs = R.load_provenance(experiment, gpu, root=root)
    if not runs:
        raise ValueError(f"no provenance for {experiment!r} on {gpu!r}")
    run_id = max(runs)  # run ids start with a UTC timestamp
    p = runs[run_id]
    g, c, snap = p.get("gpu", {}), p.get("ceilings", {}), p.get("snapshot_before", {})
    load = (p.get("clocks_under_load") or {}).get("sm_clock_mhz")
    sheet = p.get("datasheet") or provenance.datasheet(g.get("name"), g.get("pcie"))
    libs = {**(p.get("libraries") or {}), **{k: v for k, v in ((p.get("end") or {}).get("libraries") or {}).items() if v}}
    issues = [*known_issues.known_issues(experiment, run_id), *(p.get("provenance_issues") or []),
              *provenance.run_issues(p)]
    return {
        "run_id": run_id, "runs": len(runs), "name": g.get("name", gpu),
        "driver": g.get("driver_version"), "cuda_driver": g.get("cuda_driver_version"),
        "sm_count": g.get("sm_count"), "l2_mib": (g.get("l2_cache_bytes") or 0) / 2**20,
        "sm_clock_mhz": load["median"] if load else snap.get("sm_clock_mhz"),
        "sm_clock_label": "under load" if load else "idle, before the run",
        "sm_clock_max_mhz": snap.get("sm_clock_max_mhz"),
        "read_gbps": c.get("read_gbps"), "read_nbytes": c.get("nbytes"),
        "datasheet_hbm_gbps": sheet.get("hbm_gbps"), "datasheet_pcie_gbps": sheet.get("pcie_gbps_per_direction"),
        "graph_floor_us": (p.get("graph_floor") or {}).get("median_us"),
        "commit": (p.get("git") or {}).get("commit"),
        "wall_s": (p.get("end") or {}).get("wall_s"), "torch": libs.get("torch"), "vllm": libs.get("vllm"),
        "flashinfer": libs.get("flashinfer"),
        "provenance_issues": R.ISSUE_SEPARATOR.join(dict.fromkeys(issues)),
    }


@dataclass
class Frame:
    """A chapter's data, opened: its rows on one card and what that card's provenance says."""

    experiment: str
    root: str | None
    card: str
    rows: pd.DataFrame
    facts: dict

    def __iter__(self):
        """``root, card, rows, facts = open_chapter(...)``: one line in every chapter."""
        return iter((self.root, self.card, self.rows, self.facts))

    def glue_basics(self, prefix: str, **values) -> None:
        """Glue what every experiment chapter's "What was measured" quotes, as ``<prefix>_<name>``:
        card, wall_s, rows, points, max_err (``values`` override or add)."""
        from lib.book import glue as G

        wall = self.facts["wall_s"]
        base = {"card": Plain(self.facts["name"]), "wall_s": float("nan") if wall is None else wall,
                "rows": len(self.rows), "points": self.rows["point_key"].nunique(),
                "max_err": float(self.rows["rel_error"].max()),
                "provenance_note": Plain(provenance_note(self.rows))}
        for name, value in {**base, **values}.items():
            G.glue(f"{prefix}_{name}", value, display=False)


def provenance_note(rows: pd.DataFrame) -> str:
    """One sentence for a chapter: what is wrong in the provenance of the runs behind ``rows``
    ("" when nothing is known to be wrong)."""
    if "provenance_issues" not in rows.columns:
        return ""
    notes = list(dict.fromkeys(n for cell in rows["provenance_issues"].dropna().unique()
                               for n in R.provenance_issue_list(cell)))
    if not notes:
        return ""
    return ("The provenance of these measurements is incomplete or wrong until they are "
            "re-measured: " + "; ".join(notes) + ".")


#: Set to 1 (e.g. ``python -m lib reproduce <chapter> -p force=1``) to make ``mode = "run"``
#: measure every point afresh, into a new run, even where rows exist.
FORCE_ENV = "UVM_STUDY_FORCE"


def _force_from_env() -> bool:
    import os

    return os.environ.get(FORCE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def measure_if_asked(experiment: Experiment, mode: str, root: str | None,
                     overrides: Mapping[str, Any] | None = None, *, force: bool | None = None):
    """With ``mode = "run"``: measure every point of ``experiment`` not yet in the results, and
    say plainly what happened. Points that already have rows on this card are *not* measured
    again (the chapter replays them) unless ``force`` (default: ``$UVM_STUDY_FORCE``), which
    measures every point again into a new run (loaders keep the newest). Returns the sweep's
    summary (None in replay mode)."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'replay' or 'run', got {mode!r}")
    if mode != "run":
        return None
    from lib.harness import sweep

    force = _force_from_env() if force is None else bool(force)
    summary = sweep.run_sweep(experiment, overrides, out_dir=root, force=force)
    print(summary.line())
    if summary.replayed:
        print(f'mode = "run" measured nothing: every point of {experiment.name} already has rows for '
              f"this card, so this chapter REPLAYS them. To measure afresh (a new run, which then "
              f"supersedes them): set {FORCE_ENV}=1 before running the chapter, or "
              f"`python -m lib reproduce {experiment.chapter or '<chapter>'} -p force=1`, or "
              f"`python -m lib sweep {experiment.name} --force`.")
    return summary


def open_chapter(experiment: Experiment, *, mode: str = "replay", gpu: str = "", results_root: str = "",
                 load: Callable[..., pd.DataFrame] | None = None,
                 overrides: Mapping[str, Any] | None = None, force: bool | None = None) -> Frame:
    """Check the parameters, measure when asked (:func:`measure_if_asked`, ``force`` included),
    load the checked rows of one card (``gpu`` empty: the first card found); ``load(gpu,
    root=...)`` is the chapter's own loader (default :func:`load_checked`)."""
    root = results_root or None
    measure_if_asked(experiment, mode, root, overrides, force=force)
    rows = (load or (lambda g, root: load_checked(experiment.name, g, root=root)))(gpu or None, root=root)
    card = gpu or sorted(rows["gpu_slug"].unique())[0]
    rows = rows[rows["gpu_slug"] == card]
    return Frame(experiment.name, root, card, rows, card_facts(card, root=root, experiment=experiment.name))


def one(df: pd.DataFrame, col: str, **where):
    """The single value of `col` in the row that matches every `column=value` given: a selection
    that matches no row or several fails the build instead of quoting the wrong cell."""
    mask = pd.Series(True, index=df.index)
    for k, v in where.items():
        if k not in df.columns:
            raise ValueError(f"no column {k!r} to select on (have {list(df.columns)})")
        mask &= df[k] == v
    hit = df.loc[mask, col]
    if len(hit) != 1:
        raise ValueError(f"{len(hit)} rows match {where} (want exactly one)")
    v = hit.iloc[0]
    return v.item() if hasattr(v, "item") else v


def single_point(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of one grid point. Where a card measured the same shape as two points of one grid
    (the H200's kernel_speed repeats the H100 grid's shapes with more backends), the one with the
    most rows, so a ratio of two backends is always taken within one point of one run."""
    if df["point_key"].nunique() <= 1:
        return df
    counts = df["point_key"].value_counts()
    return df[df["point_key"] == counts.index[0]]


def kernels_used(df: pd.DataFrame, backend: str = "own-auto-paged") -> str:
    """Which of our kernels ``own-auto`` ran in these rows ("v2", "v3" or "v1, v2"), read from
    each row's launch plan (``extra.plan``): the H100 runs predate v3, so the same backend name
    is another kernel there."""
    import json

    plans = [(e if isinstance(e, dict) else json.loads(e)).get("plan", "")
             for e in df.loc[df["backend"] == backend, "extra"].dropna()]
    return ", ".join(sorted({p.split()[0] for p in plans if p})) or "unknown"


def value_range(df: pd.DataFrame, col: str, **where) -> tuple[float, float]:
    """(min, max) of `col` over the rows that match every `column=value` given (at least one)."""
    mask = pd.Series(True, index=df.index)
    for k, v in where.items():
        mask &= df[k].isin(v) if isinstance(v, (list, tuple, set)) else df[k] == v
    vals = df.loc[mask, col].dropna()
    if vals.empty:
        raise ValueError(f"no rows match {where}")
    return float(vals.min()), float(vals.max())
