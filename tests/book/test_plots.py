"""The figure and table helpers draw what they are given, and refuse what they cannot draw."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from lib.chapters.seed import figures as P
from lib.chapters.seed import tables as S


@pytest.fixture(scope="module")
def seed():
    return S.load_seed()


def test_seed_times_figure_panels_and_gaps(seed):
    fig = P.seed_times_figure(seed)
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert len(axes) == 6
    assert axes[0].get_title().startswith("Table 1")
    # Closed from pyplot: a notebook shows it only where it is glued.
    assert fig.number not in plt.get_fignums()
    # Table 2's seq-1024 series was measured at block 1 and 8 only: the line keeps NaN gaps.
    ydata = [np.asarray(line.get_ydata(), dtype=float) for line in axes[1].lines]
    assert any(np.isnan(y).sum() == 4 and np.isfinite(y).sum() == 2 for y in ydata)


def test_seed_times_figure_subset(seed):
    fig = P.seed_times_figure(S.select_tables(seed, "1,6"))
    assert len([ax for ax in fig.axes if ax.get_title()]) == 2


def test_ratio_figure(seed):
    fig = P.ratio_figure(S.no_lookup_over_original(seed), title="t", ylabel="r")
    (ax,) = fig.axes
    assert ax.get_ylabel() == "r"
    lo, hi = ax.get_ylim()
    assert lo < 0.43 and hi > 1.84
    assert ax.get_legend() is not None
    one = P.ratio_figure(S.no_offset_over_original(seed), title="t", ylabel="r")
    assert one.axes[0].get_legend() is None


def test_figures_refuse_bad_input():
    with pytest.raises(ValueError, match="needs columns"):
        P.ratio_figure(pd.DataFrame({"x": [1]}), title="t", ylabel="r")
    with pytest.raises(ValueError, match="no rows"):
        P.seed_times_figure(S.load_seed().iloc[0:0])
    with pytest.raises(ValueError, match="empty"):
        P.style_seed_table(pd.DataFrame())


def test_style_seed_table_html(seed):
    html = P.style_seed_table(S.wide_table(seed), caption="cap").to_html()
    assert "163.369" in html and "1028.550" in html
    assert "—" in html  # the cells the post left empty
    assert "cap" in html


def test_style_likely_cache_table():
    html = P.style_likely_cache_table(S.likely_cache_table()).to_html()
    assert "K + V cache (MiB)" in html and "128" in html


def test_panel_grid_hides_the_cells_it_does_not_need():
    from lib.book.plots import panel_grid

    fig, axes = panel_grid(3, 2, 4.0, 3.0)
    assert axes.shape == (2, 2)
    assert [ax.get_visible() for ax in axes.flat] == [True, True, True, False]
    assert tuple(fig.get_size_inches()) == (8.0, 6.0)
    fig, axes = panel_grid(1, 2, 4.0, 3.0)
    assert axes.shape == (1, 1)
    with pytest.raises(ValueError, match="n >= 1"):
        panel_grid(0, 2, 4.0, 3.0)
