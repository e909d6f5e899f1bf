#!/usr/bin/env python3
"""Check the recorded code of every committed run against this repository.

    python scripts/verify_provenance.py [RESULTS_ROOT]     # default data/results

For each run's provenance (``<experiment>/<gpu>.json``): does its commit's lib/ hash to the
``lib_sha256`` it recorded (a declared commit on a GPU node is only checked there when the node
had the commit's objects or ``UVM_STUDY_LIB_SHA``)? A run with a hash but no commit gets the
commits whose lib/ has that hash. Then the notes :func:`lib.harness.results.load` attaches to the
run's rows. Exit status 1 when a recorded commit does not match its hash, else 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.harness import known_issues, provenance  # noqa: E402
from lib.harness import results as R  # noqa: E402


def main(argv: list[str]) -> int:
    root = R.results_root(argv[0] if argv else None)
    bad = 0
    for exp_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for run_id, prov in sorted(R.load_provenance(exp_dir.name, root=root).items()):
            git = prov.get("git") or {}
            v = provenance.verify_git(git)
            line = f"{exp_dir.name:<14} {run_id:<32} {str(git.get('commit'))[:12]:<12} {v['status']}"
            if v["status"] == "no_commit" and git.get("lib_sha256"):
                found = provenance.commits_with_lib_hash(git["lib_sha256"])
                line += f" (lib/ matches {', '.join(c[:12] for c in found) or 'no commit of HEAD history'})"
            bad += v["status"] == "mismatch"
            print(line)
            notes = [*known_issues.known_issues(exp_dir.name, run_id), *(prov.get("provenance_issues") or []),
                     *provenance.run_issues(prov)]
            for note in dict.fromkeys(notes):
                print(f"    {note}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
