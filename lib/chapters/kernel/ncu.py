"""Read the metrics of a committed Nsight Compute text report (``data/profiles/*.txt``)."""

from __future__ import annotations

import re
from pathlib import Path

from lib import DATA

PROFILES = DATA / "profiles"
_ROW = re.compile(r"^\s{4}(\S.*?)\s{2,}(\S+(?:/\S+)?)?\s+([-\d.,]+)\s*$")


def metrics(path: str | Path) -> dict[str, float]:
    """{metric name: value} of the first kernel in the report (units dropped, as ncu prints)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = PROFILES / path
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        m = _ROW.match(line)
        if m and m.group(1) not in out:
            try:
                out[m.group(1).strip()] = float(m.group(3).replace(",", ""))
            except ValueError:
                continue
    if not out:
        raise ValueError(f"{path}: no ncu metric rows found")
    return out


#: What the chapter quotes of one report: its name -> (ncu metric, how it is rounded).
HEADLINE = {"dram_pct": ("DRAM Throughput", round), "occupancy_pct": ("Theoretical Occupancy", round),
            "registers": ("Registers Per Thread", int), "blocks_per_sm": ("Block Limit Registers", int),
            "issue_cycles": ("Warp Cycles Per Issued Instruction", round),
            "sm_pct": ("Compute (SM) Throughput", round)}


def headline(path: str | Path) -> dict[str, int]:
    """The :data:`HEADLINE` numbers of one report."""
    m = metrics(path)
    return {key: how(m[name]) for key, (name, how) in HEADLINE.items()}
