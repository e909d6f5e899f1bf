"""Analysis frames and figures of the chapter "When the KV cache leaves the GPU".

Input: the ``kv_offload`` rows (:func:`load_rows`, ``extra`` expanded). Derived columns
(:func:`with_baselines`), per card, head layout and backend:

* ``device_us``: the all-GPU step, the ``explicit_copy`` variant at f = 0 (plain device memory,
  nothing to copy); ``slowdown`` = time / device_us.
* ``bus_gbps``: host bytes / *extra* time, where extra = time - (1 - f) x device_us: the step's
  time beyond what its GPU-resident share would take, charged to the bytes that crossed the bus.
  A model (the two parts do not simply add inside one kernel), exact at f = 1; left empty where
  nothing crosses the bus per call (f = 0, ``migrate_resident``).
* ``above_link_limit`` (:func:`with_link_flag`, through :mod:`lib.harness.guards`): a ``bus_gbps``
  above the link's measured limit (the pinned host->device copy of the same run). Such a value is
  no bandwidth (the extra time is shorter than the copy takes: overlap or noise); the figure draws
  it apart and :func:`headline` never quotes it.
"""

from __future__ import annotations

import math
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from lib.chapters.kv_offload import measure as K
from lib.harness import guards
from lib.harness import results as R
from lib.book import frame
from lib.book.plots import diagram_canvas, set_house_style
from lib.book.plots import require_columns as _need

EXPERIMENT = K.EXPERIMENT
#: Plot and table order: the all-GPU references first, the slowest last.
VARIANT_ORDER = ("explicit_copy", "migrate_resident", "remote", "zero_copy", "zero_copy_hostalloc",
                 "prefetch_serial", "overlap", "migrate_first")
VARIANT_LABELS = {
    "explicit_copy": "explicit cudaMemcpy, then kernel",
    "migrate_resident": "managed, after migration (resident)",
    "remote": "managed + AccessedBy (remote reads)",
    "zero_copy": "pinned VMM chunks (zero-copy)",
    "zero_copy_hostalloc": "whole pool cudaHostAlloc (zero-copy)",
    "prefetch_serial": "prefetch, then kernel",
    "overlap": "prefetch ‖ kernel (2 streams)",
    "migrate_first": "managed, first call (faults)",
}
#: Short names for table columns.
SHORT_LABELS = {"explicit_copy": "copy, kernel", "migrate_resident": "resident", "remote": "remote reads",
                "zero_copy": "zero-copy (VMM)", "zero_copy_hostalloc": "zero-copy (HostAlloc)",
                "prefetch_serial": "prefetch, kernel", "overlap": "prefetch ‖ kernel",
                "migrate_first": "faults"}
#: Variants whose host blocks cross the bus on every timed call.
BUS_VARIANTS = tuple(v for v in VARIANT_ORDER if v != "migrate_resident")
HEAD_LABELS = {(32, 32): "MHA 32:32", (32, 8): "GQA 32:8"}

_CB = sns.color_palette("colorblind")
VARIANT_STYLE = {
    "explicit_copy": dict(color="black", marker="o", linestyle="-"),
    "migrate_resident": dict(color=_CB[5], marker=".", linestyle=":"),
    "remote": dict(color=_CB[0], marker="s", linestyle="-"),
    "zero_copy": dict(color=_CB[2], marker="D", linestyle="--"),
    "zero_copy_hostalloc": dict(color=_CB[2], marker="*", linestyle="none", ms=10),
    "prefetch_serial": dict(color=_CB[4], marker="^", linestyle="-."),
    "overlap": dict(color=_CB[1], marker="v", linestyle="-"),
    "migrate_first": dict(color=_CB[3], marker="X", linestyle="-"),
}


# ----------------------------------------------------------------------------- frames

def load_rows(gpu=None, root=None) -> pd.DataFrame:
    """Every kv_offload row (errors included), ``extra`` expanded; a clear error when none exist."""
    try:
        rows = R.load(EXPERIMENT, gpu, root=root, include_errors=True, expand_extra=True)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{exc}. The kv_offload measurements come from a GPU: run this chapter with "
            "mode = 'run' there (or `python -m lib sweep kv_offload`) and commit "
            "data/results/kv_offload/ before building the book.") from None
    if rows.empty:
        raise FileNotFoundError(f"data/results/{EXPERIMENT} holds no rows")
    return _with_pool(rows)


def _with_pool(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows written before ``extra["pool"]`` existed named the pool in ``memory_kind``
    (``vmm_host_split``, ``device+pinned``): give them the memory kind and pool of their variant."""
    if "pool" not in rows:
        rows["pool"] = None
    old = rows["variant"].isin(list(K.POOL)) & rows["pool"].isna()
    rows.loc[old, "memory_kind"] = [K.POOL[v][0] for v in rows.loc[old, "variant"]]
    rows.loc[old, "pool"] = [K.POOL[v][1] for v in rows.loc[old, "variant"]]
    return rows


def decode_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """The ok decode rows, labelled; every one must have passed its correctness check."""
    _need(rows, ["measurement", "status", "gpu_slug", "backend", "variant", "fraction",
                 "host_fraction", "host_kv_bytes", "num_heads", "num_kv_heads", "median_us",
                 "p10_us", "p90_us", "check_passed"], "decode_frame")
    d = rows[(rows["measurement"] == "decode") & (rows["status"] == "ok")].copy()
    if d.empty:
        raise ValueError("no ok decode rows")
    frame.refuse_failed(d, EXPERIMENT, show=("backend", "variant", "fraction"))
    unknown = sorted(set(d["variant"]) - set(VARIANT_ORDER))
    if unknown:
        raise ValueError(f"unknown variants {unknown} (known: {VARIANT_ORDER})")
    d["heads"] = [frame.shape_label(h, k, model=False) for h, k in zip(d["num_heads"], d["num_kv_heads"])]
    d["fraction"] = d["fraction"].astype(float)
    d["host_fraction"] = d["host_fraction"].astype(float)
    d["host_kv_bytes"] = d["host_kv_bytes"].astype(float)
    d["f_label"] = [K.fraction_label(f) for f in d["fraction"]]
    d["time_ms"] = d["median_us"] / 1e3
    d["order"] = [VARIANT_ORDER.index(v) for v in d["variant"]]
    return d.sort_values(["gpu_slug", "heads", "backend", "order", "fraction"]).reset_index(drop=True)


def with_baselines(d: pd.DataFrame) -> pd.DataFrame:
    """Add device_us, slowdown, excess_us, bus_gbps and step_gbps (see the module docstring)."""
    _need(d, ["gpu_slug", "heads", "backend", "variant", "fraction", "host_fraction",
              "host_kv_bytes", "median_us"], "with_baselines")
    key = ["gpu_slug", "heads", "backend"]
    zero = d[d["fraction"] == 0]
    copy0 = zero[zero["variant"] == "explicit_copy"].groupby(key)["median_us"].min()
    any0 = zero.groupby(key)["median_us"].min()  # fallback: the fastest all-GPU row
    base = copy0.combine_first(any0).rename("device_us")
    out = d.drop(columns=["device_us"], errors="ignore").join(base, on=key)
    out["slowdown"] = out["median_us"] / out["device_us"]
    out["excess_us"] = out["median_us"] - (1 - out["host_fraction"]) * out["device_us"]
    moves = out["variant"].isin(BUS_VARIANTS) & (out["host_kv_bytes"] > 0)
    out["bus_gbps"] = np.where(moves & (out["excess_us"] > 0),
                               out["host_kv_bytes"] / (out["excess_us"] * 1e3), np.nan)
    out["step_gbps"] = np.where(moves, out["host_kv_bytes"] / (out["median_us"] * 1e3), np.nan)
    return out


def yardsticks(rows: pd.DataFrame) -> dict[str, float]:
    """The bus yardstick in GB/s: pinned memcpy and managed prefetch, each direction (NaN if absent)."""
    _need(rows, ["measurement", "status"], "yardsticks")
    y = rows[(rows["measurement"] == "yardstick") & (rows["status"] == "ok")]
    out = {}
    for key, backend in (("pinned", "memcpy"), ("prefetch", "prefetch")):
        for direction in ("h2d", "d2h"):
            s = y[(y["backend"] == backend) & (y["direction"] == direction)] if len(y) else y
            out[f"{key}_{direction}"] = float((s["bytes_moved"] / (s["median_us"] * 1e3)).median()) \
                if len(s) else float("nan")
    return out


#: Where a raw CUDA/PyTorch error message stops saying what went wrong and starts giving advice.
_ADVICE = re.compile(r"\s*(Search for |CUDA kernel errors might|For debugging consider|Compile with )")
_URL = re.compile(r"\s*\(?https?://\S+\)?")


def short_reason(error: str, limit: int = 160) -> str:
    """An error row's message as the chapter shows it: what went wrong, without the raw
    message's links and debugging advice (issue 17: no CUDA error with a URL in the book), cut at
    ``limit`` characters."""
    text = _ADVICE.split(str(error), maxsplit=1)[0]
    text = _URL.sub("", text).strip()
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def unavailable(rows: pd.DataFrame) -> pd.DataFrame:
    """Decode rows that errored: one line per (variant, backend, reason) with their fractions."""
    _need(rows, ["measurement", "status"], "unavailable")
    cols = ["variant", "backend", "head layouts", "fractions", "reason"]
    e = rows[(rows["measurement"] == "decode") & (rows["status"] == "error")]
    if e.empty:
        return pd.DataFrame(columns=cols)
    e = e.copy()
    e["reason"] = [short_reason(x) for x in e["error"].fillna("")]
    e["heads"] = [frame.shape_label(h, k, model=False) for h, k in zip(e["num_heads"], e["num_kv_heads"])]
    out = []
    for (v, b, why), g in e.groupby(["variant", "backend", "reason"], sort=True):
        fr = sorted(set(g["fraction"].astype(float)))
        out.append({"variant": v, "backend": b, "head layouts": ", ".join(sorted(set(g["heads"]))),
                    "fractions": ", ".join(K.fraction_label(f) for f in fr), "reason": why})
    return pd.DataFrame(out, columns=cols)


def time_table(d: pd.DataFrame, *, backend: str, heads: str) -> pd.DataFrame:
    """Decode time (ms) by host fraction (rows) and variant (columns) for one backend and layout."""
    _need(d, ["backend", "heads", "variant", "fraction", "f_label", "time_ms"], "time_table")
    s = d[(d["backend"] == backend) & (d["heads"] == heads)]
    if s.empty:
        raise ValueError(f"no rows for backend {backend!r} and {heads!r}")
    t = s.pivot_table(index=["fraction", "f_label"], columns="variant", values="time_ms", aggfunc="first")
    t = t.reindex(columns=[v for v in VARIANT_ORDER if v in t.columns])
    t = t.reset_index(level=0, drop=True)
    t.index.name = "f"
    t.columns = [SHORT_LABELS[c] for c in t.columns]
    return t


def pick(d: pd.DataFrame, col: str, **where) -> float:
    """The one value of ``col`` where every ``column == value`` holds (fractions compared as
    floats); NaN when no row matches."""
    s = d
    for k, v in where.items():
        s = s[np.isclose(s[k].astype(float), float(v))] if k in ("fraction", "host_fraction") else s[s[k] == v]
    if s.empty:
        return float("nan")
    if len(s) > 1:
        raise ValueError(f"{len(s)} rows match {where}; expected one")
    return float(s[col].iloc[0])


def first_fraction(d: pd.DataFrame, *, threshold: float, **where) -> str:
    """The smallest host fraction whose slowdown reaches ``threshold`` ('not reached' if none)."""
    s = d
    for k, v in where.items():
        s = s[s[k] == v]
    s = s[s["slowdown"] >= threshold].sort_values("fraction")
    return K.fraction_label(float(s["fraction"].iloc[0])) if len(s) else "not reached"


# ----------------------------------------------------------------------------- headline numbers

#: (glue tag, fraction) at which the chapter quotes slowdowns.
QUOTED_FRACTIONS = (("64", 1 / 64), ("8", 1 / 8), ("2", 1 / 2), ("1", 1.0))
#: Short glue tags of the variants.
TAGS = {"explicit_copy": "copy", "migrate_resident": "resident", "remote": "remote",
        "zero_copy": "zc", "zero_copy_hostalloc": "hostalloc", "prefetch_serial": "serial",
        "overlap": "overlap", "migrate_first": "first"}


def headline(d: pd.DataFrame, ys: dict[str, float], *, backend: str) -> dict[str, float]:
    """The numbers the chapter quotes (NaN where a row is missing), for one backend.

    ``{layout}_dev_us``; ``{layout}_{tag}_s{q}``: slowdown of a variant at f = 1/q (q = 1: all on
    the host); ``{layout}_{tag}_bus``: bus GB/s at f = 1 (NaN where above the link's limit: not
    a bandwidth); ``{tag}_bus_pct``: that as a percent of pinned memcpy host->device (MHA); ratios
    between variants at f = 1 (MHA).
    """
    out: dict[str, float] = {}
    s = with_link_flag(d[d["backend"] == backend], ys)
    s = s.assign(bus_gbps=s["bus_gbps"].where(~s[guards.FLAG]))
    for lay, heads in (("mha", HEAD_LABELS[(32, 32)]), ("gqa", HEAD_LABELS[(32, 8)])):
        h = s[s["heads"] == heads]
        out[f"{lay}_dev_us"] = float(h["device_us"].iloc[0]) if len(h) else float("nan")
        for v, tag in TAGS.items():
            for q, f in QUOTED_FRACTIONS:
                out[f"{lay}_{tag}_s{q}"] = pick(h, "slowdown", variant=v, fraction=f)
            out[f"{lay}_{tag}_bus"] = pick(h, "bus_gbps", variant=v, fraction=1.0)
        res = h[h["variant"] == "migrate_resident"]
        out[f"{lay}_resident_worst_pct"] = float(100 * (res["slowdown"] - 1).abs().max()) if len(res) \
            else float("nan")
    for k, v in ys.items():
        out[f"ys_{k}"] = v
    for tag in ("remote", "zc", "hostalloc", "first", "serial", "overlap", "copy"):
        out[f"{tag}_bus_pct"] = 100 * out[f"mha_{tag}_bus"] / ys.get("pinned_h2d", float("nan"))
    mha = lambda tag, q="1": out[f"mha_{tag}_s{q}"]  # noqa: E731
    out["first_over_serial"] = mha("first") / mha("serial")
    out["serial_over_overlap"] = mha("serial") / mha("overlap")
    out["best_read_over_copy"] = min(mha("remote"), mha("zc")) / mha("copy")
    out["best_read_over_copy_8"] = min(mha("remote", "8"), mha("zc", "8")) / mha("copy", "8")
    out["hostalloc_over_zc"] = mha("hostalloc") / mha("zc")
    out["remote_over_zc"] = mha("remote") / mha("zc")
    return out


def _ok(*xs: float) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in xs)


def _times(r: float) -> str:
    return f"{r:.2f} times" if r < 10 else f"{r:.0f} times"


def verdicts(h: dict[str, float]) -> dict[str, str]:
    """The chapter's comparisons in words, decided by the numbers (a dash where data is missing)."""
    out = {k: "—" for k in ("read_vs_copy", "overlap", "faults", "resident", "remote_vs_zc",
                            "choose", "move_with")}
    ha = h.get("hostalloc_over_zc", math.nan)
    out["hostalloc"] = (f"took {ha:.2f} times the VMM pool's time (1 would mean that the split range "
                        "reads its host part exactly like a classic pinned buffer)" if _ok(ha) else
                        "was not measured here (see the errors below)")
    r, r8 = h.get("best_read_over_copy", math.nan), h.get("best_read_over_copy_8", math.nan)
    if _ok(r, r8):
        def side(x: float) -> str:
            if abs(x - 1) <= 0.05:
                return "about as fast as"
            return f"{_times(1 / x)} as fast as" if x < 1 else f"{_times(x)} as slow as"
        out["read_vs_copy"] = (f"with the whole cache on the host, reading the host blocks in place "
                               f"was {side(r)} copying them first with cudaMemcpy, and with one block "
                               f"in eight there, {side(r8)} the copy")
        if r < 0.95:
            out["choose"] = ("reading in place beat copy-then-compute even with everything on the "
                             "host, so explicit copies win only where the copy can be hidden behind "
                             "other work or the copied blocks serve several steps")
        elif r > 1.05:
            out["choose"] = ("copy-then-compute beat reading in place with everything on the host, so "
                             "explicit copies win once a large share must cross the bus on every "
                             "step and a GPU buffer for it is affordable")
        else:
            out["choose"] = ("reading in place and copy-then-compute were within 5 % of each other "
                             "with everything on the host, so GPU memory (reading in place needs "
                             "none) and whether the copy can be hidden decide")
    o = h.get("serial_over_overlap", math.nan)
    if _ok(o):
        if o > 1.05:
            out["overlap"] = (f"launching the kernel while the prefetch runs made the step {_times(o)} "
                              "as fast as prefetching first")
        elif o < 0.95:
            out["overlap"] = (f"launching the kernel while the prefetch runs made the step slower "
                              f"({_times(1 / o)} the time of prefetching first): the kernel's faults "
                              "compete with the prefetch for the same pages")
        else:
            out["overlap"] = ("launching the kernel while the prefetch runs gained nothing over "
                              "prefetching first (within 5 %)")
    fs = h.get("first_over_serial", math.nan)
    if _ok(fs):
        out["move_with"] = ("an explicit prefetch, not the kernel's faults" if fs > 1.05 else
                            "a prefetch or the kernel's own faults alike")
        out["faults"] = (f"letting the kernel fault the host blocks over took {_times(fs)} as long "
                         "as prefetching them explicitly and then running it" if fs > 1.05 else
                         "letting the kernel fault the host blocks over was no slower than an "
                         "explicit prefetch followed by the kernel")
    w = h.get("mha_resident_worst_pct", math.nan)
    if isinstance(w, float) and math.isfinite(w):
        out["resident"] = (f"within {w:.1f} % of device memory at every fraction" if w <= 5 else
                           f"up to {w:.0f} % off device memory")
    rz = h.get("remote_over_zc", math.nan)
    if _ok(rz):
        out["remote_vs_zc"] = ("about the same as" if abs(rz - 1) <= 0.05 else
                               f"{_times(rz)} as slow as" if rz > 1 else f"{_times(1 / rz)} as fast as")
    return out


def backend_table(d: pd.DataFrame, *, heads: str, fractions=(1 / 8, 1.0)) -> pd.DataFrame:
    """Slowdown against the all-GPU step per variant (rows) and backend x fraction (columns)."""
    _need(d, ["heads", "backend", "variant", "fraction", "slowdown"], "backend_table")
    s = d[(d["heads"] == heads) & d["fraction"].apply(lambda f: any(np.isclose(f, x) for x in fractions))]
    if s.empty:
        raise ValueError(f"no rows for {heads!r} at fractions {fractions}")
    s = s.sort_values(["backend", "fraction"])
    cols = [f"{b}, f = {K.fraction_label(f)}" for b, f in zip(s["backend"], s["fraction"])]
    s = s.assign(col=cols)
    t = s.pivot_table(index="variant", columns="col", values="slowdown", aggfunc="first")
    t = t.reindex(index=[v for v in VARIANT_ORDER if v in t.index], columns=list(dict.fromkeys(cols)))
    t.index = [SHORT_LABELS[v] for v in t.index]
    t.index.name = "variant"
    t.columns.name = None
    return t


# ----------------------------------------------------------------------------- figures

def _fraction_axis(ax, fractions) -> dict[float, int]:
    """Equally spaced categorical positions for the host fractions, labelled 0, 1/64, ..., 1."""
    fs = sorted(set(float(f) for f in fractions))
    pos = {f: i for i, f in enumerate(fs)}
    ax.set_xticks(range(len(fs)))
    ax.set_xticklabels([K.fraction_label(f) for f in fs])
    ax.set_xlabel("share of each sequence's KV blocks in host memory (oldest first)")
    return pos


def _layouts(s: pd.DataFrame) -> list[str]:
    """The head layouts present, the known ones first in their usual order."""
    have = set(s["heads"])
    return [h for h in HEAD_LABELS.values() if h in have] + sorted(have - set(HEAD_LABELS.values()))


#: The x axis of the variant panels, said once under both panels (per panel it ran into the next).
FRACTION_LABEL = "share of each sequence's KV blocks in host memory (oldest first)"


def _variant_panels(s: pd.DataFrame, backend: str, *, draw, finish, ylabel: str, bottom: float,
                    ncol: int = 3, height: float = 3.8) -> Figure:
    """One panel per card (rows, labelled H100/H200 when there are several) and head layout
    (columns), the host fraction across; ``draw(ax, x, k, variant, style)`` draws one variant's
    rows ``k``, ``finish(ax, g)`` adds a panel's references (``g``: that card's and layout's rows).
    The fraction axis is labelled once, below the panels, and the legend below that."""
    set_house_style()
    layouts = _layouts(s)
    cards = frame.card_slugs(s)
    fig, axes = plt.subplots(len(cards), len(layouts), figsize=(4.4 * len(layouts), height * len(cards)),
                             squeeze=False, sharey=False)
    for r, card in enumerate(cards):
        for ax, heads in zip(axes[r], layouts):
            g = s[(s["heads"] == heads) & (s["gpu_slug"] == card)]
            pos = _fraction_axis(ax, g["fraction"])
            ax.set_xlabel("")
            for v in VARIANT_ORDER:
                k = g[g["variant"] == v].sort_values("fraction")
                if len(k):
                    draw(ax, [pos[f] for f in k["fraction"]], k, v, {"lw": 1.5, "ms": 5, **VARIANT_STYLE[v]})
            finish(ax, g)
            ax.set_ylabel(ylabel)
            who = f"{frame.card_label(card)}: " if len(cards) > 1 else ""
            ax.set_title(f"{who}{heads}, {backend}", fontsize=10)
    seen: dict[str, object] = {}
    for ax in axes.flat:  # every panel's entries, once each, in the order first drawn
        for hd, lb in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lb, hd)
    legend = fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=ncol,
                        bbox_to_anchor=(0.5, 0.0))
    # room below the panels for the legend and, above it, the shared x label; measured, not guessed
    renderer = fig._get_renderer()
    legend_h = legend.get_window_extent(renderer).height / fig.bbox.height
    label = fig.text(0.5, legend_h + 0.025 / len(cards), FRACTION_LABEL, ha="left", va="bottom",
                     fontsize=plt.rcParams["axes.labelsize"])
    label_h = label.get_window_extent(renderer).height / fig.bbox.height
    label.set_horizontalalignment("center")
    fig.tight_layout(rect=(0, max(bottom / len(cards), legend_h + label_h + 0.035 / len(cards)), 1, 1))
    plt.close(fig)
    return fig


def time_figure(d: pd.DataFrame, *, backend: str) -> Figure:
    """Decode time against the host fraction, one panel per head layout, one line per variant."""
    _need(d, ["backend", "heads", "variant", "fraction", "median_us", "p10_us", "p90_us",
              "device_us"], "time_figure")
    s = d[d["backend"] == backend]
    if s.empty:
        raise ValueError(f"no rows for backend {backend!r} (have {sorted(set(d['backend']))})")

    def draw(ax, x, k, v, style):
        ax.plot(x, k["median_us"] / 1e3, label=VARIANT_LABELS[v], **style)
        ax.fill_between(x, k["p10_us"] / 1e3, k["p90_us"] / 1e3, color=style["color"], alpha=0.15, lw=0)

    def finish(ax, g):
        ax.axhline(float(g["device_us"].iloc[0]) / 1e3, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")

    return _variant_panels(s, backend, draw=draw, finish=finish, ylabel="decode step (ms, log)", bottom=0.16)


#: The yardstick whose rate is the link's measured limit in :func:`bus_figure`.
BUS_LIMIT = "pinned_h2d"
LIMIT_LABEL = "pinned cudaMemcpy H→D: the link's measured limit"
#: Legend entry of the points above that limit (hollow triangles on the limit line, never at their value).
ABOVE_LIMIT_LABEL = ("above the limit: not a bandwidth, drawn on the limit line\n"
                     "(the extra time is shorter than the copy: overlap or noise)")
ABOVE_LIMIT_STYLE = dict(linestyle="none", marker="^", markersize=8, markerfacecolor="none", markeredgewidth=1.4,
                         zorder=6)


def above_limit(values, limit: float) -> np.ndarray:
    """Where a host-bytes / extra-time value exceeds the link's measured limit (none if the limit is
    unknown): such a value is no bandwidth, the extra time being shorter than the transfer takes."""
    return guards.above_limit(values, limit)


def with_link_flag(d: pd.DataFrame, ys: dict[str, float]) -> pd.DataFrame:
    """``d`` with ``above_link_limit``: ``bus_gbps`` above the link's measured limit
    (:data:`BUS_LIMIT` of ``ys``), computed by the harness's one guard. ``ys`` is one card's
    yardsticks, or ``{slug: yardsticks}`` to flag each card's rows against its own run's link."""
    _need(d, ["bus_gbps"], "with_link_flag")
    if not _per_card(ys):
        return guards.flag_above_link_limit(d, "bus_gbps", ys.get(BUS_LIMIT, float("nan")))
    _need(d, ["gpu_slug"], "with_link_flag")
    parts = [guards.flag_above_link_limit(g, "bus_gbps", ys.get(card, {}).get(BUS_LIMIT, float("nan")))
             for card, g in d.groupby("gpu_slug", sort=False)]
    return pd.concat(parts).loc[d.index] if parts else guards.flag_above_link_limit(d, "bus_gbps", float("nan"))


def _per_card(ys) -> bool:
    """Is ``ys`` ``{slug: yardsticks}`` rather than one card's yardsticks?"""
    return bool(ys) and all(isinstance(v, dict) for v in ys.values())


def _card_ys(ys, card: str) -> dict[str, float]:
    return ys.get(card, {}) if _per_card(ys) else ys


def bus_figure(d: pd.DataFrame, ys: dict, *, backend: str) -> Figure:
    """Bytes over the bus per second of extra time, per variant, against the yardstick lines; one
    row of panels per card in ``d`` (``ys``: one card's yardsticks, or ``{slug: yardsticks}``).
    Values above the pinned host->device rate (the link's measured limit, :data:`BUS_LIMIT`;
    flagged ``above_link_limit`` by :func:`with_link_flag`) are not rates: they are not joined to
    the curve and not drawn at their value, but as hollow triangles on the limit line (a grey band
    above it marks what no transfer over that link can reach)."""
    _need(d, ["backend", "heads", "variant", "fraction", "bus_gbps"], "bus_figure")
    s = d[(d["backend"] == backend) & (d["fraction"] > 0) & d["bus_gbps"].notna()]
    if s.empty:
        raise ValueError(f"no bus rates for backend {backend!r}")
    if "gpu_slug" not in s:
        s = s.assign(gpu_slug="")
    s = with_link_flag(s, ys)

    def draw(ax, x, k, v, style):
        y = k["bus_gbps"].to_numpy(float)
        over = k[guards.FLAG].to_numpy(dtype=bool)
        ax.plot(x, np.where(over, np.nan, y), label=VARIANT_LABELS[v], **style)
        if over.any():
            limit = _card_ys(ys, k["gpu_slug"].iloc[0]).get(BUS_LIMIT, float("nan"))
            ax.plot(np.asarray(x)[over], np.full(int(over.sum()), limit), color=style["color"],
                    markeredgecolor=style["color"], label="_nolegend_", **ABOVE_LIMIT_STYLE)

    def finish(ax, g):
        cy = _card_ys(ys, g["gpu_slug"].iloc[0]) if len(g) else {}
        limit = cy.get(BUS_LIMIT, float("nan"))
        for key, label, ls in ((BUS_LIMIT, LIMIT_LABEL, "--"),
                               ("prefetch_h2d", "cudaMemPrefetchAsync H→D (yardstick)", ":")):
            val = cy.get(key, float("nan"))
            if math.isfinite(val):
                ax.axhline(val, color="black", lw=1.0, ls=ls, label=label)
        rates = g.loc[~g[guards.FLAG], "bus_gbps"]
        top = float(rates.max()) * 1.08 if len(rates) else 1.0
        if math.isfinite(limit):
            top = max(top, limit * 1.15)
            ax.axhspan(limit, top, color="0.9", zorder=0, lw=0)
            if g[guards.FLAG].any():
                ax.plot([], [], color="0.3", markeredgecolor="0.3", label=ABOVE_LIMIT_LABEL, **ABOVE_LIMIT_STYLE)
        ax.set_ylim(0, top)

    return _variant_panels(s, backend, draw=draw, finish=finish, ylabel="host bytes / extra time (GB/s)",
                           bottom=0.2, ncol=2, height=4.8)


#: What the diagram says about each mode: (title, what crosses the bus, when).
DIAGRAM = (
    ("managed_remote", "managed + PreferredLocation CPU + AccessedBy GPU",
     "the kernel's loads, every call (no migration)"),
    ("pinned_zero_copy", "one VMM range: pinned host chunks | device chunks",
     "the kernel's loads, every call (zero-copy)"),
    ("managed_migrate", "managed, no advice; sent to the host before each call",
     "pages, on the kernel's faults; then resident"),
    ("prefetch_overlap", "managed; cudaMemPrefetchAsync on a 2nd stream",
     "pages, by the prefetch while the kernel runs"),
    ("explicit_copy", "device pool + pinned copy of the host blocks",
     "cudaMemcpyAsync before the kernel"),
)


def modes_diagram() -> Figure:
    """Where the host blocks sit and what crosses the bus, mode by mode (a schematic)."""
    rows = len(DIAGRAM)
    fig, ax = diagram_canvas(10.0, 1.25 * rows + 0.2, (8.0, 1.0 * rows + 0.2))
    host_c, gpu_c = _CB[0], _CB[2]
    for i, (mode, how, what) in enumerate(DIAGRAM):
        y = 1.25 * (rows - 1 - i) + 0.25  # bottom of this row's boxes
        ax.text(0.0, y + 0.85, mode, fontsize=10, fontweight="bold", va="center")
        ax.text(0.0, y + 0.45, how, fontsize=8.5, va="center", color="#333333")
        ax.text(0.0, y + 0.08, "over the bus: " + what, fontsize=8.5, va="center", color=_CB[3],
                style="italic")
        ax.add_patch(FancyBboxPatch((5.9, y + 0.05), 1.2, 0.8, boxstyle="round,pad=0.02",
                                    fc=host_c, alpha=0.25, ec=host_c))
        ax.text(6.5, y + 0.45, "host\nblocks", ha="center", va="center", fontsize=8.5)
        ax.add_patch(FancyBboxPatch((8.2, y + 0.05), 1.75, 0.8, boxstyle="round,pad=0.02",
                                    fc=gpu_c, alpha=0.25, ec=gpu_c))
        ax.text(9.075, y + 0.45, "GPU: kernel +\ndevice blocks", ha="center", va="center", fontsize=8.5)
        ax.add_patch(FancyArrowPatch((7.15, y + 0.45), (8.15, y + 0.45), arrowstyle="-|>",
                                     mutation_scale=12, lw=1.4, color="#444444"))
        ax.text(7.65, y + 0.6, "PCIe", ha="center", fontsize=8, color="#444444")
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- the cards side by side

#: One colour per card in :func:`card_figure` (the variant is the line style and marker).
CARD_COLORS = {"h100-80gb-hbm3": _CB[0], "h200": _CB[1]}
#: The variants :func:`card_figure` draws: a copy, reading in place, faults.
CARD_VARIANTS = ("explicit_copy", "zero_copy", "migrate_first")


def card_figure(d: pd.DataFrame, *, backend: str, variants=CARD_VARIANTS) -> Figure:
    """Both cards on one scale, one column per head layout. Top: slowdown (time / that card's
    all-GPU step) against the host fraction, a line at 2 (the break-even: the host part costs as
    much as the whole GPU step). Bottom: the host part's own time, time - (1 - f) x all-GPU time
    (ms): the link's share, which should not move between the cards. Colour: card; line style
    and marker: variant."""
    _need(d, ["gpu_slug", "backend", "heads", "variant", "fraction", "slowdown", "excess_us"], "card_figure")
    s = d[(d["backend"] == backend) & d["variant"].isin(list(variants))]
    if s.empty:
        raise ValueError(f"card_figure: no rows for backend {backend!r} and variants {list(variants)}")
    set_house_style()
    layouts, cards = _layouts(s), frame.card_slugs(s)
    fig, axes = plt.subplots(2, len(layouts), figsize=(4.6 * len(layouts), 7.0), squeeze=False, sharex="col")
    for c, heads in enumerate(layouts):
        top, bottom = axes[0, c], axes[1, c]
        g = s[s["heads"] == heads]
        pos = _fraction_axis(bottom, g["fraction"])
        for card in cards:
            color = CARD_COLORS.get(card, "0.4")
            for v in variants:
                k = g[(g["gpu_slug"] == card) & (g["variant"] == v)].sort_values("fraction")
                if k.empty:
                    continue
                st = VARIANT_STYLE[v]
                style = dict(color=color, marker=st["marker"], linestyle=st["linestyle"], lw=1.5, ms=5)
                label = f"{frame.card_label(card)}: {VARIANT_LABELS[v]}"
                top.plot([pos[f] for f in k["fraction"]], k["slowdown"], label=label, **style)
                h = k[k["fraction"] > 0]
                bottom.plot([pos[f] for f in h["fraction"]], h["excess_us"] / 1e3, **style)
        top.axhline(2.0, color="0.3", lw=0.9, ls="--", label="slowdown 2: break-even")
        top.set_yscale("log")
        top.set_ylabel("time / all-GPU time (log)")
        top.set_title(f"{heads}, {backend}", fontsize=10)
        bottom.set_yscale("log")
        bottom.set_ylabel("host part: time − (1 − f) × all-GPU (ms, log)")
        bottom.set_xlabel("share of each sequence's KV blocks on the host")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.03 + 0.022 * (-(-len(labels) // 2)), 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0.0), fontsize=8)
    plt.close(fig)
    return fig
