"""Which physical cards produced the committed data: one row per (experiment, card), from the
runs' provenance (GPU name, the hash of its uuid, driver, runs, commits, first and last run)."""

from __future__ import annotations

import pandas as pd

from lib.harness import results as R


def card_table(experiments, root=None) -> pd.DataFrame:
    """Per experiment and physical card (``gpu.uuid_sha16``): runs, commits and dates. The
    processes of one sweep (run ids sharing their start time, ``<time>-<hash>-d0wN``) count once."""
    rows = []
    for exp in experiments:
        try:
            prov = R.load_provenance(exp, root=root)
        except FileNotFoundError:
            continue
        for run_id, p in prov.items():
            gpu = p.get("gpu") or {}
            git = p.get("git") or {}
            rows.append({"experiment": exp, "card": gpu.get("name") or "unknown",
                         "card id (uuid hash)": gpu.get("uuid_sha16") or "not recorded",
                         "driver": gpu.get("driver_version") or "",
                         "run": run_id.split("-")[0], "commit": (git.get("commit") or "none")[:7],
                         "date": str(p.get("time_utc") or run_id)[:10]})
    if not rows:
        raise FileNotFoundError("no provenance of any committed run")
    d = pd.DataFrame(rows)
    return (d.groupby(["experiment", "card", "card id (uuid hash)", "driver"], sort=True)
             .agg(runs=("run", "nunique"), commits=("commit", lambda c: ", ".join(sorted(set(c)))),
                  dates=("date", lambda t: " to ".join(sorted({min(t), max(t)}))))
             .reset_index())
