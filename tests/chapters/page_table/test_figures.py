"""The page-table chapter's heat maps: one colour scale for every panel, and a colour bar that says so."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import QuadMesh

from lib.chapters.page_table import analysis as P
from lib.chapters.page_table import figures as F

SHAPE = P.shape_of("llama")


def fake_ratios() -> pd.DataFrame:
    """Four ratios over a 3 x 3 grid: the first within 1 %, the third reaching 1.5, the fourth 0.8."""
    level = {"paged / contiguous": (0.99, 1.01), "shuffled / identity": (1.0, 1.03),
             "vLLM / ours": (1.1, 1.5), "SDPA dense / ours": (0.8, 1.0)}
    rows = []
    for name, *_ in P.GRID_RATIOS:
        lo, hi = level[name]
        for (i, n), (j, b) in itertools.product(enumerate((512, 1024, 2048)), enumerate((1, 4, 16))):
            rows.append({"gpu_slug": "h100", "shape": SHAPE, "seq_len": n, "batch_size": b,
                         "ratio_name": name, "ratio": lo + (hi - lo) * (3 * i + j) / 8})
    return pd.DataFrame(rows)


def test_heat_norm_is_centred_and_symmetric_in_log():
    n = F.heat_norm([0.8, 1.0, 1.5])
    assert n.vcenter == 1.0 and n.vmax == pytest.approx(1.5) and n.vmin == pytest.approx(1 / 1.5)
    n = F.heat_norm([0.5, 1.1])
    assert n.vmin == pytest.approx(0.5) and n.vmax == pytest.approx(2.0)
    flat = F.heat_norm([1.0, 1.0, np.nan])
    assert flat.vmin < 1.0 < flat.vmax  # an all-1 grid still has a scale, white at 1


def test_heatmap_panels_share_one_scale_and_a_colour_bar():
    fig = F.ratio_heatmaps(fake_ratios(), SHAPE)
    meshes = [c for ax in fig.axes for c in ax.collections if isinstance(c, QuadMesh)]
    panels = [ax for ax in fig.axes if any(isinstance(c, QuadMesh) for c in ax.collections)
              and ax.get_title() in {n for n, *_ in P.GRID_RATIOS}]
    assert len(panels) == 4
    limits = {(round(m.norm.vmin, 9), round(m.norm.vmax, 9)) for m in meshes}
    # one scale, wide enough for the most extreme ratio of any panel (1.5), not each panel's own
    assert len(limits) == 1
    (vmin, vmax), = limits
    assert vmax == pytest.approx(1.5) and vmin == pytest.approx(1 / 1.5)
    assert all(float(m.norm(1.0)) == pytest.approx(0.5) for m in meshes)
    bars = [ax for ax in fig.axes if ax not in panels]
    assert len(bars) == 1, "one colour bar for the figure"
    label = bars[0].get_ylabel() or bars[0].get_xlabel()
    assert label == F.HEAT_CBAR_LABEL and "numerator" in label
    ticks = list(bars[0].get_yticks())
    assert 1.0 in ticks and min(ticks) >= vmin - 1e-9 and max(ticks) <= vmax + 1e-9


def test_heat_ticks_keep_apart():
    n = F.heat_norm([0.7, 1.44])
    ticks = F.heat_ticks(n)
    pos = sorted(float(n(t)) for t in ticks)
    assert 1.0 in ticks and all(b - a >= 0.07 - 1e-9 for a, b in zip(pos, pos[1:]))
