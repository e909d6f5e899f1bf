"""The rerun guide: per experiment, the commands that rerun it, its grid, what the committed run
took, what it writes and what it needs. Everything comes from the experiments themselves (their
grids and ``chapter`` field), the chapters' ``parameters`` cells and the committed provenance.

The catalog sits above this layer, so the experiments are passed in (``lib.catalog.EXPERIMENTS``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Mapping

import pandas as pd

from lib.harness import results as R
from lib.harness.experiments import Experiment, expand

#: Chapter parameters that choose where data goes or which card is shown, not the grid.
NOT_GRID = ("mode", "results_root", "gpu")

_PARAM_CELL = re.compile(r"```\{code-cell\}[^\n]*\n:tags: \[parameters\]\n(.*?)\n```", re.S)


def chapter_of(exp: Experiment, chapters_pkg: str | Path | None = None) -> str | None:
    """The chapter an experiment belongs to (``uvm`` for ``chapters/uvm.md``): its ``chapter``
    field, else the chapter package whose ``experiment.py`` declares it (``name="..."``)."""
    if exp.chapter:
        return Path(exp.chapter).stem
    pkg = Path(chapters_pkg) if chapters_pkg else Path(__file__).resolve().parents[1]
    declared = re.compile(rf"""name\s*=\s*["']{re.escape(exp.name)}["']""")
    for f in sorted(pkg.glob("*/experiment.py")):
        if declared.search(f.read_text()):
            return f.parent.name
    return None


def chapter_parameters(md: str | Path) -> dict:
    """Names and literal defaults of a MyST chapter's ``parameters`` cell ({} if it has none)."""
    m = _PARAM_CELL.search(Path(md).read_text())
    out: dict = {}
    if m:
        for node in ast.parse(m.group(1)).body:
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        out[t.id] = ast.literal_eval(node.value)
    return out


def backends_of(exp: Experiment) -> set[str]:
    """Every backend the experiment's points time: the ``backends`` parameter ("a+b"), or, for the
    correctness matrix's points without one, the backends its placement rules choose."""
    names: set[str] = set()
    for p in expand(exp):
        if p.get("backends"):
            names.update(str(p["backends"]).split("+"))
        elif exp.name == "correctness":
            from lib.chapters.kernel import correctness as C

            names.update(C.IDENTITY_BACKENDS + C.SHUFFLED_BACKENDS + C.SINGLE_BACKENDS + C.LONG_BACKENDS)
    return names


def needs(exp: Experiment) -> str:
    """The packages a rerun needs beyond the repository itself, shortly: ``gpu extra`` (CuPy,
    nvidia-ml-py, cuda-bindings), ``torch``, ``triton``, ``vLLM kernel-only``."""
    if not exp.gpu:
        return "nothing (CPU)"
    b = backends_of(exp)
    out = ["gpu extra"]
    if b & {"vllm", "sdpa_dense", "flex_paged"}:
        out.append("torch")
    if b & {"vllm", "flex_paged"}:
        out.append("triton")
    if "vllm" in b:
        out.append("vLLM kernel-only")
    if b & {"vllm2024-v1", "vllm2024-v2"}:
        out.append("vLLM 2024 build")
    return ", ".join(out)


def run_groups(experiment: str, slug: str, root=None) -> pd.DataFrame:
    """Every run of ``experiment`` on card ``slug``, oldest first. Run ids start with a UTC
    timestamp, and the workers of one run (``...-d0w3``) share it; their wall times overlap, so a
    run's wall time is its longest worker's, and its points are the workers' sum."""
    groups: dict[str, list[dict]] = {}
    for run_id, p in R.load_provenance(experiment, slug, root=root).items():
        groups.setdefault(run_id.split("-")[0], []).append(p)
    rows = []
    for stamp in sorted(groups):
        g = groups[stamp]
        walls = [w for w in ((p.get("end") or {}).get("wall_s") for p in g) if w is not None]
        rows.append({"stamp": stamp, "card": (g[0].get("gpu") or {}).get("name", slug),
                     "time_utc": min(str(p.get("time_utc")) for p in g),
                     "wall_s": max(walls) if walls else float("nan"), "workers": len(g),
                     "points": sum(int((p.get("end") or {}).get("points") or 0) for p in g)})
    return pd.DataFrame(rows, columns=["stamp", "card", "time_utc", "wall_s", "workers", "points"])


def latest_run(experiment: str, slug: str, root=None) -> dict:
    """The latest of :func:`run_groups` as a dict ({} where the card has no run)."""
    runs = run_groups(experiment, slug, root)
    return runs.iloc[-1].to_dict() if len(runs) else {}


def cards(experiment: str, root=None) -> list[str]:
    """GPU slugs with a main results file for ``experiment``."""
    d = R.results_root(root) / experiment
    return sorted(p.stem for p in d.glob("*.csv") if ".part-" not in p.name) if d.is_dir() else []


def guide(experiments: Mapping[str, Experiment], chapters_dir: str | Path, root=None) -> pd.DataFrame:
    """One row per (experiment, card) of every experiment that belongs to a chapter, in the order
    given; an experiment with no committed run yet gets one row without a card."""
    chapters_dir = Path(chapters_dir)
    rows = []
    for name, exp in experiments.items():
        chapter = chapter_of(exp)
        if chapter is None:
            continue
        md = chapters_dir / f"{chapter}.md"
        params = chapter_parameters(md) if md.exists() else {}
        runs_chapter = exp.chapter is not None and "mode" in params
        grid_params = [k for k in params if k not in NOT_GRID]
        base = {
            "chapter": chapter, "experiment": name, "points": len(expand(exp)),
            "sweep": f"python -m lib sweep {name}",
            "reproduce": f"python -m lib reproduce {chapter}" if runs_chapter else None,
            "chapter parameters": ", ".join(grid_params) if runs_chapter and grid_params else None,
            "needs": needs(exp),
        }
        slugs = cards(name, root)
        for slug in slugs or [None]:
            last = latest_run(name, slug, root) if slug else {}
            rows.append({**base, "card": last.get("card"), "minutes": last.get("wall_s", float("nan")) / 60,
                         "points in that run": last.get("points"), "workers": last.get("workers"),
                         "outputs": f"data/results/{name}/{slug or '<gpu-slug>'}.csv + .json"})
    return pd.DataFrame(rows)


_STYLE = [
    {"selector": "th", "props": [("text-align", "left"), ("font-size", "0.8em"), ("padding", "3px 8px"),
                                 ("vertical-align", "bottom"), ("border-bottom", "1px solid #999")]},
    {"selector": "td", "props": [("text-align", "left"), ("font-size", "0.8em"), ("padding", "3px 8px"),
                                 ("vertical-align", "top"), ("border-bottom", "1px solid #e4e4e4")]},
    {"selector": "td code", "props": [("white-space", "nowrap"), ("font-size", "0.95em")]},
    {"selector": "caption", "props": [("caption-side", "top"), ("font-size", "0.9em"), ("text-align", "left")]},
]


def _code(text) -> str:
    import html

    return f"<code>{html.escape(str(text))}</code>" if isinstance(text, str) and text else "—"


def commands_table(table: pd.DataFrame) -> pd.DataFrame:
    """The guide's commands and grids, one row per experiment, as HTML cells."""
    t = table.drop_duplicates("experiment")
    return pd.DataFrame({
        "chapter": t["chapter"], "experiment": t["experiment"].map(_code), "points": t["points"],
        "commands": [f"{_code(s)}<br>{_code(r)}" if isinstance(r, str) else f"{_code(s)}<br>(no reproduce: replay-only chapter)"
                     for s, r in zip(t["sweep"], t["reproduce"])],
        "chapter parameters (-p name value)": [", ".join(_code(p) for p in c.split(", ")) if isinstance(c, str) else "—"
                                               for c in t["chapter parameters"]],
    })


def runs_table(table: pd.DataFrame) -> pd.DataFrame:
    """The guide's committed runs, files (in ``data/results/<experiment>/``) and packages, one row
    per (experiment, card); the card column only where there are several cards."""
    files = [o.replace(f"data/results/{e}/", "") for e, o in zip(table["experiment"], table["outputs"])]
    out = pd.DataFrame({
        "experiment": table["experiment"].map(_code), "card": table["card"].fillna("—"),
        "minutes": table["minutes"], "points measured": table["points in that run"],
        "processes": table["workers"], "files": [_code(f) for f in files], "needs": table["needs"],
    })
    # one card (named in the prose): no column for it
    return out.drop(columns="card") if table["card"].nunique(dropna=False) <= 1 else out


def style(display: pd.DataFrame, caption: str | None = None):
    """A table from :func:`commands_table` or :func:`runs_table`, without its index."""
    fmt = {c: "{:.1f}" for c in ("minutes",) if c in display.columns}
    fmt.update({c: "{:.0f}" for c in ("points measured", "processes") if c in display.columns})
    s = display.style.format(fmt, na_rep="—").hide(axis="index").set_table_styles(_STYLE)
    numbers = [c for c in ("points", "minutes", "points measured", "processes") if c in display.columns]
    s = s.set_properties(subset=numbers, **{"text-align": "right"})
    return s.set_caption(caption) if caption else s
