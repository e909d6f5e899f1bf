"""The KV-offload chapter's two-card comparison (issue 16) and its honesty guards (issues 14, 17):
break-even fractions, the link-bound host part against the HBM-bound step, bus values above the
link's limit never drawn as rates, error reasons without raw CUDA advice or URLs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lib.chapters.kv_offload import analysis as KA
from lib.chapters.kv_offload import figures as F
from tests.chapters.kv_offload import test_kv_offload as T

H100, H200 = KA.CARD_TAGS["h100"], KA.CARD_TAGS["h200"]
HBM = 1.43  # the synthetic H200's all-GPU step is this much faster; its host rates are the H100's


def _card_rows(slug: str, hbm: float) -> pd.DataFrame:
    saved = dict(T.T0)
    try:
        T.T0.update({k: v / hbm for k, v in saved.items()})
        return T.as_frame(T.fake_rows()).assign(gpu_slug=slug)
    finally:
        T.T0.clear()
        T.T0.update(saved)


@pytest.fixture(scope="module")
def two():
    rows = pd.concat([_card_rows(H100, 1.0), _card_rows(H200, HBM)], ignore_index=True)
    d = F.with_baselines(F.decode_frame(rows))
    ys = {c: F.yardsticks(rows[rows["gpu_slug"] == c]) for c in (H100, H200)}
    table = KA.card_table(d, backend="own-auto-paged", read_gbps={H100: 3000.0, H200: 3000.0 * HBM},
                          link_gbps={c: ys[c]["pinned_h2d"] for c in ys})
    return rows, d, ys, table


def test_short_reason_drops_the_url_and_the_debugging_advice():
    raw = ("AcceleratorError: CUDA error: operation not permitted when stream is capturing Search for "
           "`cudaErrorStreamCaptureUnsupported' in https://docs.nvidia.com/cuda/cuda-runtime-api/group__"
           "CUDART__TYPES.html for more information. CUDA kernel errors might be asynchronously reported "
           "at some other API call. Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.")
    assert F.short_reason(raw) == "AcceleratorError: CUDA error: operation not permitted when stream is capturing"
    assert F.short_reason("RuntimeError: see (https://x.org/a) now") == "RuntimeError: see now"
    long = F.short_reason("x" * 500, limit=50)
    assert len(long) == 50 and long.endswith("…")


def test_unavailable_shows_the_short_reason():
    df = T.as_frame(T.fake_rows(error_variant="zero_copy"))
    df = df.assign(status=np.where(df["variant"] == "zero_copy", "error", "ok"))
    df.loc[df["status"] == "error", "error"] = "AcceleratorError: it broke Search for `x' in https://a.b/c"
    u = F.unavailable(df)
    assert set(u["reason"]) == {"AcceleratorError: it broke"} and not u["reason"].str.contains("http").any()


def test_break_even_of_an_additive_step():
    # slowdown = (1 - f) + f s1, exactly, for the synthetic explicit copy: it crosses 2 at 1/(s1 - 1)
    d = F.with_baselines(F.decode_frame(T.as_frame(T.fake_rows())))
    k = d[(d["backend"] == "own-auto-paged") & (d["heads"] == "MHA 32:32") & (d["variant"] == "explicit_copy")]
    b = KA.break_even(k)
    assert b["model"] == pytest.approx(1 / (b["s1"] - 1))
    slow = dict(zip(k["fraction"], k["slowdown"]))
    f = b["model"]
    assert (1 - f) + f * b["s1"] == pytest.approx(2.0)
    lo = [x for x in slow if 0 < x < f]
    hi = [x for x in slow if x >= f]
    assert b["below"] == T.K.fraction_label(max(lo)) and slow[max(lo)] < 2
    assert b["at_or_above"] == T.K.fraction_label(min(hi)) and slow[min(hi)] >= 2
    never = KA.break_even(d[(d["backend"] == "own-auto-paged") & (d["variant"] == "migrate_resident")
                            & (d["heads"] == "MHA 32:32")])
    assert math.isnan(never["model"]) and never["at_or_above"] == "—"
    assert KA.fraction_text(1 / 57.4) == "1/57" and KA.fraction_text(float("nan")) == "—"
    assert b["check"].startswith("consistent")  # an additive step: the model is exact


def test_model_check_says_which_way_the_model_is_off():
    # the H200's MHA zero-copy: model 1/88, yet still below 2 at 1/64 (the kernel hid host reads)
    assert KA.model_check(1 / 88, 1 / 64, 1 / 32).startswith("pessimistic")
    assert KA.model_check(1 / 60, 1 / 64, 1 / 32).startswith("consistent")
    assert KA.model_check(1 / 20, 1 / 64, 1 / 32).startswith("optimistic")
    assert KA.model_check(float("nan"), 1 / 64, 1 / 32) == "—"
    assert KA.model_check(1 / 83, float("nan"), 1 / 64).startswith("consistent")  # nothing measured below


def test_faster_memory_same_link_makes_offload_relatively_dearer(two):
    _, _, _, table = two
    assert set(table["card"]) == {"H100", "H200"}
    g = KA.growth(table)
    copy = g[(g["heads"] == "MHA 32:32") & (g["variant"] == "explicit_copy")].iloc[0]
    assert copy["device_speedup"] == pytest.approx(HBM)
    assert copy["host_ratio"] == pytest.approx(1.0)  # the link's part does not move
    assert copy["slowdown_ratio"] == pytest.approx(HBM)  # so the slowdown grows by the HBM's ratio
    assert copy["break_even_ratio"] < 1 / HBM * 1.02  # and the break-even share falls
    t = table.set_index(["card", "heads", "variant"])
    assert t.loc[("H200", "MHA 32:32", "explicit_copy"), "n_ratio"] == pytest.approx(
        HBM * t.loc[("H100", "MHA 32:32", "explicit_copy"), "n_ratio"])
    shown = KA.card_display(table)
    assert "break-even f (model), H100" in shown.columns and "break-even f (model), H200" in shown.columns
    assert shown.index.get_level_values(0)[0] == "MHA 32:32"


def test_card_numbers_name_both_cards_even_when_one_is_missing(two):
    _, d, ys, table = two
    n = KA.card_numbers(table, d, ys, backend="own-auto-paged")
    assert n["mha_dev_us_h100"] == pytest.approx(700.0) and n["mha_dev_us_h200"] == pytest.approx(700.0 / HBM)
    assert n["gr_host_ratio_mha_copy"] == pytest.approx(1.0) and n["over_n_h100"] == 0
    one = d[d["gpu_slug"] == H100]
    n1 = KA.card_numbers(table[table["gpu_slug"] == H100], one, {H100: ys[H100]}, backend="own-auto-paged")
    assert set(k.removesuffix("_h200") for k in n1 if k.endswith("_h200")) == \
        set(k.removesuffix("_h100") for k in n1 if k.endswith("_h100"))  # the same names for both
    assert math.isnan(n1["mha_dev_us_h200"]) and math.isnan(n1["mha_copy_s1_h200"])
    assert n1["be_mha_copy_h200"] == "—" and math.isnan(n1["gr_host_ratio_mha_copy"])
    assert n1["v_choose_h200"] == "—"


def test_values_above_the_link_are_counted_and_never_drawn_as_rates(two):
    _, d, ys, _ = two
    d = d.copy()
    hit = d.index[(d["gpu_slug"] == H200) & (d["backend"] == "own-auto-paged") & (d["variant"] == "remote")
                  & np.isclose(d["fraction"], 1 / 64) & (d["heads"] == "MHA 32:32")]
    d.loc[hit, "bus_gbps"] = 100.0  # 1.82 x the synthetic 55 GB/s link: impossible
    s = KA.above_limit_summary(d, ys, backend="own-auto-paged")
    assert s["over_n_h200"] == 1 and s["over_x_h200"] == pytest.approx(100 / 55)
    assert s["over_fractions_h200"] == "1/64" and s["over_n_h100"] == 0 and s["over_fractions_h100"] == "none"
    assert s["over_variants_h200"] == F.VARIANT_LABELS["remote"]
    fig = F.bus_figure(d, ys, backend="own-auto-paged")
    assert len(fig.axes) == 4 and [ax.get_title().split(":")[0] for ax in fig.axes] == ["H100"] * 2 + ["H200"] * 2
    ax = fig.axes[2]  # H200, MHA
    assert ax.get_ylim()[1] < 100.0  # the axis does not stretch to the impossible value
    ys_drawn = np.concatenate([np.asarray(ln.get_ydata(), float) for ln in ax.get_lines() if len(ln.get_ydata())])
    assert not np.any(np.isclose(ys_drawn, 100.0))  # nowhere drawn at its value
    tri = [ln for ln in ax.get_lines() if ln.get_marker() == "^" and len(ln.get_ydata())]
    assert tri and np.allclose(tri[0].get_ydata(), ys[H200]["pinned_h2d"])  # on the limit line instead


def test_card_figure_draws_both_cards_on_one_scale(two):
    _, d, _, _ = two
    fig = F.card_figure(d, backend="own-auto-paged")
    assert len(fig.axes) == 4
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert sum(x.startswith("H100:") for x in labels) == len(F.CARD_VARIANTS)
    assert sum(x.startswith("H200:") for x in labels) == len(F.CARD_VARIANTS)
    colors = {ln.get_label().split(":")[0]: ln.get_color() for ln in fig.axes[0].get_lines() if ":" in ln.get_label()}
    assert colors["H100"] != colors["H200"]
    # bottom row: the host part's time; for the synthetic copy it is the same on both cards
    lines = [ln for ln in fig.axes[2].get_lines()]
    copy = [ln for ln in lines if ln.get_linestyle() == "-" and ln.get_marker() == "o"]
    assert len(copy) == 2 and np.allclose(copy[0].get_ydata(), copy[1].get_ydata())
    with pytest.raises(ValueError, match="no rows"):
        F.card_figure(d, backend="nope")
