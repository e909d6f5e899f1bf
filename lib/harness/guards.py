"""Physical guards on derived bandwidths: a rate is data only where bytes crossed the link.

A bandwidth is bytes that crossed a link divided by the time they took. Two things break that:
bytes that never crossed (GPU memory the driver *reserved*, a driver call that maps memory and
copies nothing), and a time that is not the transfer's (a model's "extra time" that overlap or
noise makes shorter than the copy could be). The first has no bandwidth at all; the second shows
up as a rate above what the link can carry. :func:`flag_above_link_limit` marks such values in one
column, ``above_link_limit``, so that a figure draws them apart (never as data on a curve) and a
table or the prose does not quote them; :func:`link_limit_gbps` is that limit, as measured in the
same run (the fastest pinned-memory ``cudaMemcpy``).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

#: The column :func:`flag_above_link_limit` adds.
FLAG = "above_link_limit"
#: Default relative tolerance: floating-point rounding, not measurement noise. The limit is
#: recomputed from bytes and time, so the very row that sets it can exceed it by a rounding
#: (7e-15 GB/s on an H200's fastest pinned copy), which is no finding.
ROUNDING_RTOL = 1e-9


def above_limit(values, limit: float, *, rtol: float = ROUNDING_RTOL) -> np.ndarray:
    """Where ``values`` exceed ``limit * (1 + rtol)`` (all False when the limit is unknown, NaN
    values never flagged)."""
    v = np.asarray(values, dtype=float)
    if limit is None or not math.isfinite(float(limit)):
        return np.zeros(v.shape, dtype=bool)
    return np.isfinite(v) & (v > float(limit) * (1.0 + rtol))


def flag_above_link_limit(df, value_col: str, limit: float, *, crosses=None, rtol: float = ROUNDING_RTOL,
                          mask_col: str | None = None):
    """``df`` with :data:`FLAG` set where ``value_col`` (GB/s) exceeds the link's measured ``limit``
    on rows whose bytes cross the link (``crosses``: a boolean mask, default every row).

    ``mask_col``: a column to blank (NaN) where flagged, e.g. ``bandwidth_gbps``, so the value is
    not used as data downstream; the flag keeps the row visible as what it is.
    """
    out = df.copy()
    over = above_limit(out[value_col], limit, rtol=rtol)
    if crosses is not None:
        over &= np.asarray(crosses, dtype=bool)
    out[FLAG] = over
    if mask_col is not None and over.any():
        out[mask_col] = out[mask_col].astype(float).where(~over)
    return out


def link_limit_gbps(rows, *, backend: str = "memcpy", memory_kind: str = "pinned",
                    directions: Iterable[str] | None = None) -> float:
    """The link's measured limit in GB/s: the fastest pinned ``cudaMemcpy`` among ``rows``
    (bytes_moved / median_us; optional ``direction`` filter); NaN without such rows."""
    need = {"backend", "memory_kind", "bytes_moved", "median_us"}
    if rows is None or not need <= set(rows.columns):
        return math.nan
    r = rows[(rows["backend"] == backend) & (rows["memory_kind"] == memory_kind)]
    if directions is not None and "direction" in r.columns:
        r = r[r["direction"].isin(list(directions))]
    if "status" in r.columns:
        r = r[r["status"] == "ok"]
    if r.empty:
        return math.nan
    return float((r["bytes_moved"].astype(float) / (r["median_us"].astype(float) * 1e3)).max())


def drop_bandwidth(df, mask, cols=("bandwidth_gbps", "pct_of_read_ceiling")):
    """``df`` with the bandwidth columns blanked (NaN) on rows ``mask``: rows that moved no bytes
    over any link (driver calls) carry no bandwidth and no percent of the read ceiling."""
    out = df.copy()
    m = np.asarray(mask, dtype=bool)
    for c in cols:
        if c in out.columns:
            out[c] = out[c].where(~m)  # NaN (or <NA> in integer columns)
    return out
