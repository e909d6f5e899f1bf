"""The cards chapter's figures on small synthetic frames (CPU): each draws, labels its axes with
units and names both cards; each refuses a frame without the columns it reads."""

import numpy as np
import pandas as pd
import pytest

from lib.chapters.cards import analysis as A
from lib.chapters.cards import figures as F

B, O = A.BASE, A.OTHER


def _texts(fig) -> str:
    out = []
    for ax in fig.axes:
        out += [ax.get_xlabel(), ax.get_ylabel(), ax.get_title()]
        out += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
        if ax.get_legend():
            out += [t.get_text() for t in ax.get_legend().get_texts()]
    out += [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    return " ".join(out)


def test_ceilings_figure_names_cards_and_units():
    ceil = pd.DataFrame([{"gpu_slug": s, "card_id": c, "shared": False, "read_nbytes": 2 << 30, "copy_nbytes": 1 << 30,
                          "read_gbps": r, "read_lo": r - 5, "read_hi": r + 5, "copy_gbps": r * 0.9, "copy_lo": r * 0.89,
                          "copy_hi": r * 0.91, "copy_split": s == O, "datasheet_hbm_gbps": d}
                         for s, c, r, d in ((B, "aaaaaa1", 3100.0, 3350.0), (O, "bbbbbb2", 4600.0, 4800.0))])
    t = _texts(F.ceilings_figure(ceil))
    assert "GB/s" in t and "H100" in t and "H200" in t and "2 GiB" in t
    with pytest.raises(ValueError):
        F.ceilings_figure(ceil.drop(columns="copy_split"))


def test_kernel_pct_figure_marks_a_different_plan():
    rows = []
    for s in (B, O):
        for b, same in (("own-auto-paged", False), ("vllm", True)):
            rows.append({"gpu_slug": s, "shape": "32 × 4096, GQA 32:8", "backend": b, "pct_of_read_ceiling": 80.0,
                         "pct_min": 79.0, "pct_max": 81.0, "same_code": same, "batch_size": 32, "seq_len": 4096,
                         "num_kv_heads": 8})
    t = _texts(F.kernel_pct_figure(pd.DataFrame(rows)))
    assert "% of the run's read ceiling" in t and "plan differs" in t and "H200" in t


def test_scaling_summary_and_spread_figures_label_their_axes():
    sc = pd.DataFrame({"backend": ["own-v1-paged", "vllm", "own-auto-no_offset"],
                       "pct_of_read_ceiling_b": [95.0, 90.0, 300.0],
                       "ratio": [1.45, 1.3, 0.98], "experiment": "page_table"})
    t = _texts(F.scaling_figure(sc, hbm=4.8 / 3.35, read_ratio=1.47))
    assert "% of the read ceiling reached on the H100" in t and "H200 / H100" in t
    s = pd.DataFrame([{"group": "hbm", "quantity": "read", "ratio": 1.47, "lo": 1.44, "hi": 1.5, "values": [1.47],
                       "n": 1},
                      {"group": "link", "quantity": "copy", "ratio": 1.0, "lo": 0.99, "hi": 1.01,
                       "values": list(np.linspace(0.98, 1.02, 5)), "n": 5}])
    t = _texts(F.summary_figure(s, hbm=4.8 / 3.35, band=0.025))
    assert "H200 ÷ H100" in t and "datasheet HBM ratio" in t and "read  [1]" in t
    cases = pd.DataFrame({"gpu_slug": [O] * 4, "case": ["a", "a", "b", "b"], "value": [0.0, 0.01, 0.02, 0.03],
                          "kind": ["within a run"] * 2 + ["between cards"] * 2})
    t = _texts(F.spread_figure(cases))
    assert "relative difference (%" in t and "H200: a" in t
    with pytest.raises(ValueError):
        F.spread_figure(cases.drop(columns="kind"))
