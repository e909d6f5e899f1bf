"""The physical guards: a rate above the link's measured limit is flagged, driver calls carry no
bandwidth (one place, used by the uvm, kv_offload and vmm chapters)."""

import math

import numpy as np
import pandas as pd

from lib.harness import guards as G


def test_above_limit_flags_only_finite_values_over_a_known_limit():
    v = [10.0, 55.0, 56.0, float("nan"), 99.7]
    assert G.above_limit(v, 55.0).tolist() == [False, False, True, False, True]
    assert G.above_limit(v, 55.0, rtol=0.05).tolist() == [False, False, False, False, True]
    assert not G.above_limit(v, float("nan")).any() and not G.above_limit(v, None).any()


def test_flag_and_blank_only_rows_that_cross_the_link():
    df = pd.DataFrame({"bandwidth_gbps": [50.0, 84.8, 3000.0]})
    out = G.flag_above_link_limit(df, "bandwidth_gbps", 55.0, crosses=[True, True, False],
                                  mask_col="bandwidth_gbps")
    assert out[G.FLAG].tolist() == [False, True, False]  # the HBM-speed read is no link rate
    assert math.isnan(out.loc[1, "bandwidth_gbps"]) and out.loc[2, "bandwidth_gbps"] == 3000.0
    assert df["bandwidth_gbps"].tolist() == [50.0, 84.8, 3000.0]  # the input is left as it was


def test_the_link_limit_is_the_fastest_pinned_memcpy():
    rows = pd.DataFrame({"backend": ["memcpy", "memcpy", "memcpy", "prefetch"],
                         "memory_kind": ["pinned", "pinned", "pageable", "managed"],
                         "direction": ["h2d", "d2h", "h2d", "h2d"], "status": "ok",
                         "bytes_moved": [55e9, 54e9, 20e9, 60e9], "median_us": [1e6] * 4})
    assert G.link_limit_gbps(rows) == 55.0
    assert G.link_limit_gbps(rows, directions=["d2h"]) == 54.0
    assert math.isnan(G.link_limit_gbps(rows.iloc[2:])) and math.isnan(G.link_limit_gbps(None))


def test_driver_calls_lose_their_bandwidth_and_keep_their_dtype():
    df = pd.DataFrame({"bytes_moved": pd.array([2 << 20, 1 << 30], dtype="Int64"),
                       "bandwidth_gbps": [73.3, 3000.0], "pct_of_read_ceiling": [2.3, 97.0]})
    out = G.drop_bandwidth(df, np.array([True, False]), cols=("bytes_moved", "bandwidth_gbps", "pct_of_read_ceiling"))
    assert out["bytes_moved"].isna().tolist() == [True, False] and str(out["bytes_moved"].dtype) == "Int64"
    assert math.isnan(out.loc[0, "pct_of_read_ceiling"]) and out.loc[1, "bandwidth_gbps"] == 3000.0


def test_the_row_that_sets_the_limit_is_not_flagged_for_a_rounding():
    import pandas as pd

    from lib.harness import guards

    limit = 55.346810390563185
    df = pd.DataFrame({"bw": [limit * (1 + 1e-15), limit * 1.01]})
    assert guards.flag_above_link_limit(df, "bw", limit)[guards.FLAG].tolist() == [False, True]
    assert guards.flag_above_link_limit(df, "bw", limit, rtol=0.0)[guards.FLAG].tolist() == [True, True]
