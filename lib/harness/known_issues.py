"""Committed runs whose provenance is known to be wrong, in ways the record itself cannot show.

The data files stay as they were written (no measured number and no provenance JSON is edited);
:func:`lib.harness.results.load` adds these notes, with what :func:`lib.harness.provenance.
run_issues` finds in the record itself, to every row of the run as the ``provenance_issues``
column. A run leaves this list when it is re-measured (its rows are then superseded), never by
editing its note away. Sources: ``data/results/RUNS.md`` (the operator's record of each run) and
issue 14's audit of the committed data.
"""

from __future__ import annotations

_STALE_GIT = ("git: records commit 64affe0 (dirty), the stale .git HEAD of the GPU node's copy, "
              "which cannot have produced these rows (64affe0 has no uvm_decode experiment); the "
              "tree was {commit} by the operator's record (data/results/RUNS.md), not verifiable "
              "(no lib/ hash was recorded)")
_IDLE_CLOCK = ("clocks: only idle snapshots were recorded (SM {mhz} MHz before the run, taken "
               "while nothing ran); the clocks under load are unknown")

#: experiment -> run_id -> notes. Every note starts with what it concerns ("git:", "clocks:", ...).
KNOWN_ISSUES: dict[str, dict[str, tuple[str, ...]]] = {
    "seed_tables": {"20261128T054925Z-9a1597": (_STALE_GIT.format(commit="4928ddc"),
                                                _IDLE_CLOCK.format(mhz=345))},
    "uvm_decode": {"20261128T055046Z-8748c7": (_STALE_GIT.format(commit="4928ddc"),
                                               _IDLE_CLOCK.format(mhz=345))},
    "page_table": {"20261128T055409Z-b5205a": (_STALE_GIT.format(commit="15ef247"),
                                               _IDLE_CLOCK.format(mhz=345))},
    "uvm": {"20261128T043049Z-8ef6ed": (
        "git: records no commit; the tree was dfe56cc with uncommitted edits by the operator's "
        "record (data/results/RUNS.md), not verifiable (no lib/ hash was recorded)",)},
}


def known_issues(experiment: str, run_id: str) -> tuple[str, ...]:
    """The committed notes on one run (empty when none)."""
    return KNOWN_ISSUES.get(experiment, {}).get(run_id, ())
