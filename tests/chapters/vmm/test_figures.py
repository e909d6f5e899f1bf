"""The VMM chapter's kernel figure: a few percent drawn as ratios to a baseline, not as tall bars."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.chapters.vmm import analysis as A
from lib.chapters.vmm import figures as F


def fake_ktab() -> pd.DataFrame:
    """Two panels of two points, ~700 us each: paged 3 % slower than the cudaMalloc pool, VMM 0.5 % faster."""
    rows = []
    for b, n in ((32, 4096), (8, 16384)):
        for shape, block in (("MHA 32:32", 16), ("MHA 32:32", 64)):
            r = {"gpu_slug": "h100", "batch_size": b, "seq_len": n, "shape": shape, "block_size": block}
            for s, t in (("device_contiguous", 700.0), ("paged", 721.0), ("vmm", 696.5)):
                r.update({f"{s}_us": t, f"{s}_p10_us": 0.99 * t, f"{s}_p90_us": 1.01 * t})
            rows.append(r)
    return pd.DataFrame(rows)


def _dots(ax):
    """{series label: y values} of the errorbar markers of one panel."""
    out = {}
    for c in ax.containers:
        line = c.lines[0]
        out[c.get_label()] = np.asarray(line.get_ydata(), dtype=float)
    return out


def test_kernel_figure_draws_ratios_to_the_device_contiguous_pool():
    assert set(A.SERIES.values()) == {"paged", "device_contiguous", "vmm"} and F.BASELINE == "device_contiguous"
    fig = F.kernel_figure(fake_ktab())
    assert len(fig.axes) == 2
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert 0.9 < lo < 1.0 < hi < 1.1  # a 3 % difference fills the panel; no 0-700 us bars
        assert not [p for p in ax.patches if p.get_height() > 2]
        assert any(np.allclose(ln.get_ydata(), 1.0) for ln in ax.get_lines()), "the line at 1.0"
        dots = _dots(ax)
        assert dots[A.SERIES_LABELS["paged"]] == pytest.approx([721 / 700] * 2)
        assert dots[A.SERIES_LABELS["vmm"]] == pytest.approx([696.5 / 700] * 2)
        base, = [v for k, v in dots.items() if k.startswith(A.SERIES_LABELS["device_contiguous"])]
        assert base == pytest.approx([1.0, 1.0])
        assert "1.030" in [t.get_text() for t in ax.texts]
    assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])  # one scale for both panels
    assert "contiguous" in fig.axes[0].get_ylabel()


def test_kernel_figure_refuses_bad_input():
    with pytest.raises(ValueError, match="needs columns"):
        F.kernel_figure(pd.DataFrame({"gpu_slug": ["x"]}))
    with pytest.raises(ValueError, match="no rows for gpu"):
        F.kernel_figure(fake_ktab(), gpu="another")
