#!/usr/bin/env python3
"""Compare the glued values of two book builds: what a reader of the prose would see change.

    python scripts/glue_diff.py OLD_BUILD NEW_BUILD     # each a _build/ folder (or a copy of its
                                                        # jupyter_execute/chapters/*.glue.json)

myst-nb writes every chapter's glued values to ``<chapter>.glue.json``; text values compare as
text, figures by their presence only (their pixels change with any matplotlib detail).
Exit status 0 when every value matches, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def glue_files(build: Path) -> dict[str, Path]:
    found = list(build.rglob("*.glue.json"))
    return {p.name.removesuffix(".glue.json"): p for p in found}


def values(path: Path) -> dict[str, str]:
    out = {}
    for key, item in json.loads(path.read_text()).items():
        data = item.get("data", item) if isinstance(item, dict) else item
        if isinstance(data, dict) and "text/plain" in data and not any(k.startswith("image/") for k in data):
            out[key] = data["text/plain"]
        else:
            out[key] = "<figure or rich output>"
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    old, new = (glue_files(Path(a)) for a in argv)
    changed = 0
    for chapter in sorted(set(old) | set(new)):
        a = values(old[chapter]) if chapter in old else {}
        b = values(new[chapter]) if chapter in new else {}
        diffs = [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
                 if a.get(k) != b.get(k)]
        print(f"{chapter}: {len(a)} -> {len(b)} glued values, {len(diffs)} differ")
        for k, x, y in diffs:
            print(f"    {k}: {x[:100]!s}  ->  {y[:100]!s}")
        changed += len(diffs)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
