"""The committed ptxas resource table (``data/kernels/resources.csv``, made by
``scripts/kernel_resources.py``), read the one way the kernel and page-table chapters quote it."""

from __future__ import annotations

import json

import pandas as pd

from lib import DATA
from lib.book import frame

CSV = DATA / "kernels" / "resources.csv"


def load() -> tuple[pd.DataFrame, dict]:
    """(the table, its provenance: nvcc version, kernels per arch)."""
    return pd.read_csv(CSV), json.loads(CSV.with_suffix(".json").read_text())


def decode(res: pd.DataFrame, arch: str, block_size: int, tile: int, col: str = "registers", *,
           dtype: str = "float16", head_size: int = 128, addressing: str = "paged") -> int:
    """One decode instantiation's ``col``: exactly one row must match, or the build fails."""
    return int(frame.one(res, col, kernel="decode", arch=arch, block_size=block_size, tile=tile,
                         dtype=dtype, head_size=head_size, addressing=addressing))


def spilling(res: pd.DataFrame) -> pd.DataFrame:
    """The decode instantiations ptxas reports spill stores or loads for."""
    dec = res[res["kernel"] == "decode"]
    return dec[(dec["spill_stores"] > 0) | (dec["spill_loads"] > 0)]
