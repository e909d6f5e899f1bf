"""The cost ladder from small synthetic frames (CPU): rungs, ratios, order, and the figure."""

import pandas as pd
import pytest

from lib.chapters.conclusions import figures as F
from lib.chapters.conclusions import ladder as L


def synthetic(slugs=("card-a",)):
    parts = []
    for i, slug in enumerate(slugs):
        w = pd.DataFrame({"gpu_slug": slug, "managed_vs_device": [1.0, 1.02],
                          "managed_prefetched_vs_device": [1.01, 1.03], "managed_cold_vs_device": [50.0, 150.0 + i]})
        parts.append(L.uvm_decode_samples(w))
        parts.append(L.vmm_samples(pd.DataFrame({"gpu_slug": slug, "vmm_over_device": [0.99, 1.0]})))
        rows = []
        for v in L.OFFLOAD_VARIANTS + ("migrate_resident",):
            for f in (0.0, L.PART, 1.0):
                if v == "zero_copy_hostalloc" and f < 1:
                    continue
                slow = 1.0 if f == 0 or v == "migrate_resident" else (300 if v == "migrate_first" else 50) * f + 1
                rows.append({"gpu_slug": slug, "variant": v, "fraction": f, "slowdown": slow})
        parts.append(L.kv_offload_samples(pd.DataFrame(rows)))
    s = pd.concat(parts, ignore_index=True)
    device = pd.DataFrame({"gpu_slug": list(slugs), "rung": "device", "ratio": 1.0})
    return pd.concat([device, s], ignore_index=True)


def test_every_rung_is_filled_and_ordered_by_group_then_median():
    t = L.summarize(synthetic())
    assert set(t["rung"]) == set(L.RUNGS)
    assert list(dict.fromkeys(t["group"])) == list(L.GROUPS)
    for g, d in t.groupby("group", sort=False):
        assert list(d["median"]) == sorted(d["median"]) or g == L.GPU  # the baseline leads its group
    assert t.iloc[0]["rung"] == "device"
    cold = t.set_index("rung").loc["managed_cold"]
    assert (cold["min"], cold["median"], cold["max"], cold["n"]) == (50.0, 100.0, 150.0, 2)
    # the offload share shown in the middle group is PART, not 1
    assert t.set_index("rung").loc["remote@part", "median"] == pytest.approx(50 * L.PART + 1)


def test_unknown_rungs_are_refused():
    with pytest.raises(ValueError, match="unknown rungs"):
        L.summarize(pd.DataFrame({"gpu_slug": ["a"], "rung": ["nowhere"], "ratio": [1.0]}))


def test_ladder_figure_has_a_row_per_rung_and_a_legend_entry_per_card():
    t = L.summarize(synthetic(("card-a", "card-b")))
    fig = F.ladder_figure(t, names={"card-a": "Card A", "card-b": "Card B"})
    ax = fig.axes[0]
    assert len(ax.get_yticklabels()) == len(L.RUNGS)
    assert [x.get_text() for x in ax.get_legend().get_texts()] == ["Card A", "Card B"]
    assert ax.get_xscale() == "log" and "device memory" in ax.get_xlabel()
    with pytest.raises(ValueError, match="needs columns"):
        F.ladder_figure(t.drop(columns="median"))
    assert F.times(1.004) == "1.00\u00d7" and F.times(7.45) == "7.5\u00d7" and F.times(313.2) == "313\u00d7"
