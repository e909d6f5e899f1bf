"""The two cards side by side for the chapter "When the KV cache leaves the GPU" (issue 16).

The H200 is the H100's chip with faster memory behind the same PCIe link. A step with a share
*f* of its blocks on the host takes about (1 - f) of its all-GPU time for the rest, plus the
host part, which the link sets. So the host part's time should not move between the cards while
the all-GPU step gets shorter on the H200, and every slowdown (time / all-GPU time) should grow.

**Break-even fraction** (:func:`break_even`): the host share at which a step takes twice its
all-GPU time, i.e. the host part costs as much as the whole of the GPU's work; past it, offload
more than doubles the step. Two readings of it, both from measured times: the *model* value
from the all-on-host slowdown s1 (exact at f = 1): (1 - f) + f s1 = 2 gives f = 1 / (s1 - 1);
and the *measured* bracket, the largest measured fraction below 2 and the smallest at or above.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lib.book import frame
from lib.chapters.kv_offload import figures as F

#: Glue tag -> slug of the compared cards (lib.book.frame.CARDS).
CARD_TAGS = {frame.card_label(slug).lower(): slug for slug in frame.CARDS}
#: The variants the card comparison shows: one per way of reaching host blocks (the whole-pool
#: cudaHostAlloc row exists at f = 1 only, the resident pool moves nothing).
COMPARED = ("explicit_copy", "remote", "zero_copy", "prefetch_serial", "overlap", "migrate_first")
THRESHOLD = 2.0


def fraction_text(f: float) -> str:
    """A small fraction as the chapter writes it: ``1/57`` (a dash when not finite)."""
    return f"1/{1 / f:.0f}" if isinstance(f, float) and math.isfinite(f) and f > 0 else "—"


def break_even(d: pd.DataFrame, *, threshold: float = THRESHOLD, **where) -> dict[str, object]:
    """Where one variant's slowdown reaches ``threshold`` (see the module docstring): ``model``
    (1 / (s1 - 1) for threshold 2; NaN when s1 does not exceed it), ``below`` and ``at_or_above``
    (labels of the measured fractions around the crossing; "—" where none), and ``s1``."""
    s = d
    for k, v in where.items():
        s = s[s[k] == v]
    s = s.sort_values("fraction")
    one = s.loc[np.isclose(s["fraction"].astype(float), 1.0), "slowdown"]
    s1 = float(one.iloc[0]) if len(one) else float("nan")
    model = (threshold - 1) / (s1 - 1) if math.isfinite(s1) and s1 > threshold else float("nan")
    under = s[(s["slowdown"] < threshold) & (s["fraction"] > 0)]
    over = s[s["slowdown"] >= threshold]
    below_f = float(under["fraction"].iloc[-1]) if len(under) else float("nan")
    at_f = float(over["fraction"].iloc[0]) if len(over) else float("nan")
    return {"s1": s1, "model": model, "below_f": below_f, "at_f": at_f,
            "below": F.K.fraction_label(below_f) if len(under) else "—",
            "at_or_above": F.K.fraction_label(at_f) if len(over) else "—",
            "check": model_check(model, below_f, at_f)}


def model_check(model: float, below_f: float, at_f: float) -> str:
    """Does the additive model's break-even agree with the measured steps around it? Words for
    the chapter: the model is *pessimistic* where the step was still under 2 at a share beyond it
    (the kernel hid part of its host reads), optimistic where 2 was reached before it."""
    if not math.isfinite(model):
        return "—"
    if math.isfinite(below_f) and model < below_f:
        return "pessimistic: the measured step was still below 2 at a larger share"
    if math.isfinite(at_f) and model > at_f:
        return "optimistic: the measured step reached 2 at a smaller share"
    return "consistent with the measured shares around it"


def card_table(d: pd.DataFrame, *, backend: str, read_gbps: dict[str, float],
               link_gbps: dict[str, float]) -> pd.DataFrame:
    """One row per card, layout and compared variant: all-GPU step (µs), the host part's time
    at f = 1 (ms: the whole step, nothing is on the GPU), the all-on-host slowdown and the
    break-even fraction, model and measured; with the card's N = read ceiling / link rate (a
    host byte costs N device bytes) and the serial-model break-even 1 / (N - 1) it predicts."""
    F._need(d, ["gpu_slug", "backend", "heads", "variant", "fraction", "slowdown", "device_us", "median_us"],
            "card_table")
    out = []
    for card in frame.card_slugs(d):
        read, link = read_gbps.get(card), link_gbps.get(card)  # None: not in the provenance
        n = (float(read) / float(link)) if read is not None and link is not None and link > 0 else float("nan")
        for heads in F._layouts(d[d["gpu_slug"] == card]):
            s = d[(d["gpu_slug"] == card) & (d["backend"] == backend) & (d["heads"] == heads)]
            for v in COMPARED:
                k = s[s["variant"] == v]
                if k.empty:
                    continue
                b = break_even(k)
                out.append({"gpu_slug": card, "card": frame.card_label(card), "heads": heads, "variant": v,
                            "device_us": float(k["device_us"].iloc[0]),
                            "host_ms": F.pick(k, "median_us", fraction=1.0) / 1e3,
                            "s1": b["s1"], "break_even": b["model"], "below": b["below"],
                            "at_or_above": b["at_or_above"], "check": b["check"], "n_ratio": n,
                            "predicted": 1 / (n - 1) if math.isfinite(n) and n > 1 else float("nan")})
    return pd.DataFrame(out)


def growth(table: pd.DataFrame, slow: str = CARD_TAGS["h100"], fast: str = CARD_TAGS["h200"]) -> pd.DataFrame:
    """Per layout and variant, H200 against H100: how much faster the all-GPU step got
    (``device_speedup``), how the host part's time moved (``host_ratio``: 1 = the link's, same on
    both) and how the all-on-host slowdown grew (``slowdown_ratio``). If the host part is the
    link's, slowdown_ratio = device_speedup x host_ratio ~ device_speedup."""
    a = table[table["gpu_slug"] == slow].set_index(["heads", "variant"])
    b = table[table["gpu_slug"] == fast].set_index(["heads", "variant"])
    both = a.index.intersection(b.index)
    if not len(both):
        return pd.DataFrame(columns=["heads", "variant", "device_speedup", "host_ratio", "slowdown_ratio",
                                     "break_even_ratio"])
    g = pd.DataFrame({"device_speedup": a.loc[both, "device_us"] / b.loc[both, "device_us"],
                      "host_ratio": b.loc[both, "host_ms"] / a.loc[both, "host_ms"],
                      "slowdown_ratio": b.loc[both, "s1"] / a.loc[both, "s1"],
                      "break_even_ratio": b.loc[both, "break_even"] / a.loc[both, "break_even"]})
    return g.reset_index()


def card_display(table: pd.DataFrame) -> pd.DataFrame:
    """The comparison as the chapter shows it: one row per layout and variant, card columns."""
    t = table.assign(variant=table["variant"].map(F.VARIANT_LABELS))
    cols = {"device_us": "all-GPU step (µs)", "host_ms": "all on host (ms)", "s1": "slowdown, f = 1",
            "break_even_text": "break-even f (model)", "measured": "measured: < 2 at / ≥ 2 from"}
    t["break_even_text"] = [fraction_text(x) for x in t["break_even"]]
    t["measured"] = [f"{a} / {b}" for a, b in zip(t["below"], t["at_or_above"])]
    w = t.pivot_table(index=["heads", "variant"], columns="card", values=list(cols), aggfunc="first", sort=False)
    cards = list(dict.fromkeys(t["card"]))
    w = w.reindex(columns=pd.MultiIndex.from_product([list(cols), cards]))
    w.columns = [f"{cols[c]}, {card}" for c, card in w.columns]
    order = {v: i for i, v in enumerate(F.VARIANT_LABELS[x] for x in COMPARED)}
    w = w.reset_index()
    w["_o"] = w["variant"].map(order)
    return w.sort_values(["heads", "_o"], ascending=[False, True]).drop(columns="_o").set_index(["heads", "variant"])


def above_limit_summary(d: pd.DataFrame, ys_by_card: dict[str, dict], *, backend: str) -> dict[str, object]:
    """Per compared card (``<name>_<tag>``): how many host-bytes / extra-time values of ``backend``
    exceed that card's link limit, the largest as a multiple of the limit, at which host
    fractions and for which variants: the model's failure, quoted as such (never as a rate)."""
    out: dict[str, object] = {}
    for tag, slug in CARD_TAGS.items():
        s = d[(d["gpu_slug"] == slug) & (d["backend"] == backend) & d["bus_gbps"].notna()]
        ys = ys_by_card.get(slug, {})
        limit = ys.get(F.BUS_LIMIT, float("nan"))
        s = F.with_link_flag(s, ys) if len(s) else s.assign(**{F.guards.FLAG: False})
        over = s[s[F.guards.FLAG]] if len(s) else s
        out[f"over_n_{tag}"] = float(len(over)) if len(s) else float("nan")
        out[f"over_x_{tag}"] = float(over["bus_gbps"].max() / limit) if len(over) else float("nan")
        fr = sorted(set(over["fraction"].astype(float))) if len(over) else []
        out[f"over_fractions_{tag}"] = ", ".join(F.K.fraction_label(f) for f in fr) if fr else "none"
        vs = [v for v in F.VARIANT_ORDER if len(over) and v in set(over["variant"])]
        out[f"over_variants_{tag}"] = ", ".join(F.VARIANT_LABELS[v] for v in vs) if vs else "none"
        out[f"limit_{tag}"] = float(limit)
    return out


def card_numbers(table: pd.DataFrame, d: pd.DataFrame, ys_by_card: dict[str, dict], *,
                 backend: str) -> dict[str, object]:
    """``{name_tag: value}`` for both compared cards (NaN or a dash where a card has no rows):
    :func:`lib.chapters.kv_offload.figures.headline` and its verdicts per card, the link rate
    and N, the break-even fractions (``be_<layout>_<variant tag>``), :func:`growth`'s ratios
    (``gr_<ratio>_<layout>_<variant tag>``, no card tag) and :func:`above_limit_summary`."""
    out: dict[str, object] = {}
    any_card = next(iter(frame.card_slugs(d)), None)  # the names a card without rows still gets (NaN)
    names = list(F.headline(d[d["gpu_slug"] == any_card], ys_by_card.get(any_card, {}), backend=backend)) \
        if any_card is not None else []
    for tag, slug in CARD_TAGS.items():
        sub = d[d["gpu_slug"] == slug]
        ys = ys_by_card.get(slug, {})
        h = F.headline(sub, ys, backend=backend) if len(sub) else dict.fromkeys(names, float("nan"))
        for k, v in h.items():
            out[f"{k}_{tag}"] = v
        for k, v in F.verdicts(h).items():
            out[f"v_{k}_{tag}"] = v
        t = table[table["gpu_slug"] == slug]
        out[f"n_ratio_{tag}"] = float(t["n_ratio"].iloc[0]) if len(t) else float("nan")
        out[f"predicted_{tag}"] = fraction_text(float(t["predicted"].iloc[0])) if len(t) else "—"
        for lay, heads in (("mha", F.HEAD_LABELS[(32, 32)]), ("gqa", F.HEAD_LABELS[(32, 8)])):
            for v in COMPARED:
                r = t[(t["heads"] == heads) & (t["variant"] == v)]
                be = float(r["break_even"].iloc[0]) if len(r) else float("nan")
                out[f"be_{lay}_{F.TAGS[v]}_{tag}"] = fraction_text(be)
                out[f"be_{lay}_{F.TAGS[v]}_at_{tag}"] = r["at_or_above"].iloc[0] if len(r) else "—"
                out[f"be_{lay}_{F.TAGS[v]}_below_{tag}"] = r["below"].iloc[0] if len(r) else "—"
                out[f"be_{lay}_{F.TAGS[v]}_check_{tag}"] = r["check"].iloc[0] if len(r) else "—"
    g = growth(table)
    for lay, heads in (("mha", F.HEAD_LABELS[(32, 32)]), ("gqa", F.HEAD_LABELS[(32, 8)])):
        for v in COMPARED:
            r = g[(g["heads"] == heads) & (g["variant"] == v)]
            for col in ("device_speedup", "host_ratio", "slowdown_ratio", "break_even_ratio"):
                out[f"gr_{col}_{lay}_{F.TAGS[v]}"] = float(r[col].iloc[0]) if len(r) else float("nan")
    out.update(above_limit_summary(d, ys_by_card, backend=backend))
    return out


def datasheet_ratios(facts_by_card: dict[str, dict]) -> dict[str, float]:
    """The datasheet's H200 / H100 HBM bandwidth ratio and the PCIe rate per direction (the first
    card that records one): what the prose compares the measurements with, from the provenance."""
    h100, h200 = (facts_by_card.get(CARD_TAGS[t], {}) for t in ("h100", "h200"))
    a, b = h100.get("datasheet_hbm_gbps"), h200.get("datasheet_hbm_gbps")
    pcie = next((f.get("datasheet_pcie_gbps") for f in facts_by_card.values() if f.get("datasheet_pcie_gbps")), None)
    return {"hbm_sheet_ratio": float(b) / float(a) if a and b else float("nan"),
            "pcie_sheet_gbps": float(pcie) if pcie else float("nan")}
