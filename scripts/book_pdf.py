#!/usr/bin/env python3
"""The whole book as one PDF: Chromium prints each built HTML page in table-of-contents order
(headless, no network), and pypdf joins them. Run after `make book`:

    python scripts/book_pdf.py [--html _build/html] [--out _build/book.pdf]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pages(toc: Path) -> list[str]:
    """Page names (e.g. chapters/intro) in reading order, from _toc.yml (root, then chapters)."""
    import yaml

    t = yaml.safe_load(toc.read_text())
    return [t["root"]] + [c["file"] for c in t.get("chapters", [])]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("no Chromium found: run `bash scripts/ensure-chromium` (Debian's chromium) first")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    ap.add_argument("--out", type=Path, default=ROOT / "_build" / "book.pdf")
    args = ap.parse_args(argv)
    from pypdf import PdfWriter

    names = pages(ROOT / "_toc.yml")
    missing = [n for n in names if not (args.html / f"{n}.html").is_file()]
    if missing:
        sys.exit(f"not built: {', '.join(missing)} (run `make book` first)")
    browser = chromium()
    writer = PdfWriter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            pdf = Path(tmp, f"{i:02d}.pdf")
            cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
                   f"--print-to-pdf={pdf}", (args.html / f"{name}.html").resolve().as_uri()]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if r.returncode or not pdf.is_file():
                sys.exit(f"Chromium could not print {name}: {r.stderr[-500:]}")
            writer.append(str(pdf), outline_item=name.split("/")[-1])
            print(f"[{i + 1}/{len(names)}] {name}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "wb") as f:
            writer.write(f)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB, {len(names)} pages of the book)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
