"""The FA3 speed table: one run's FA3 sub-grid, pivoted by shape, ratios per peer."""

import pandas as pd
import pytest

from lib.chapters.kernel import fa3


def rows(run="r1", fa3_us=10.0, extra_backend=None):
    out = []
    for b, kv in ((8, 8), (32, 32)):
        key = f"backends=vllm-fa3+flashinfer+sdpa_dense+own-auto-paged;batch_size={b};num_kv_heads={kv}"
        for backend, us in (("vllm-fa3", fa3_us), ("flashinfer", 8.0), ("sdpa_dense", 5.0), ("own-auto-paged", 20.0)):
            out.append(dict(point_key=key, run_id=run, backend=backend, batch_size=b, seq_len=4096,
                            num_heads=64 if kv == 8 else 32, num_kv_heads=kv, median_us=us * b,
                            pct_of_read_ceiling=50.0 + b))
        if extra_backend:  # another sub-grid's point at the same shape
            out.append(dict(point_key="backends=other;" + key, run_id=run, backend=extra_backend,
                            batch_size=b, seq_len=4096, num_heads=64 if kv == 8 else 32,
                            num_kv_heads=kv, median_us=1.0, pct_of_read_ceiling=1.0))
    return pd.DataFrame(out)


def test_table_has_one_row_per_shape_and_the_ratios():
    t = fa3.speed_table(rows(extra_backend="sdpa_dense"))  # the other sub-grid's SDPA is ignored
    assert list(t.index) == ["32 × 4096, 32:32", "8 × 4096, 64:8"]  # MHA first (group 1)
    assert t["FA3 / SDPA"].tolist() == [2.0, 2.0]
    assert t["FA3 / FlashInfer"].tolist() == [1.25, 1.25]
    assert t["FA3 % of ceiling"].tolist() == [82.0, 58.0]
    c = fa3.claims(t)
    assert c["n"] == 2 and c["faster_than_fi"] == 0 and c["pct_max"] == 82.0
    assert c["own_lo"] == 0.5


def test_rows_of_two_runs_or_none_are_refused():
    with pytest.raises(ValueError, match="2 runs"):
        fa3.speed_table(pd.concat([rows("r1"), rows("r2")]))
    with pytest.raises(ValueError, match="no vllm-fa3 rows"):
        fa3.speed_table(rows()[lambda d: d["backend"] != "vllm-fa3"])
