"""The whole book builds with -W from a clean copy of the tree, and its seed page looks right.

The build runs once per session (module fixture) in a temporary copy, so it neither sees stale
outputs nor leaves any in the working tree. The copy's own `lib` is put first on PYTHONPATH so
that the chapters import the code being tested, not an editable install elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lib import ROOT
from lib.chapters.seed import tables as S

#: Never copied into the clean tree: build outputs, environments, caches, scratch.
SKIP_PARTS = {".git", ".venv", "_build", ".jupyter_cache", "__pycache__", ".pytest_cache",
              ".scratch", "_executed", "wheelhouse", ".ipynb_checkpoints"}

BUILD_TIMEOUT_S = 900
SCREEN_W, SCREEN_H = 1280, 2400


def source_files(root: Path) -> list[Path]:
    """Files a fresh clone would have, plus new files not yet committed (not the ignored ones)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root, check=True, capture_output=True,
        ).stdout.decode()
        rels = [Path(p) for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        rels = [p.relative_to(root) for p in root.rglob("*") if p.is_file()]
    keep = []
    for rel in rels:
        if SKIP_PARTS.intersection(rel.parts) or rel.suffix == ".ipynb" or rel.name.endswith(".egg-info"):
            continue
        if any(part.endswith(".egg-info") or part.startswith(".venv") for part in rel.parts):
            continue
        if (root / rel).is_file():  # deleted but not yet committed: a fresh clone would lack it too
            keep.append(rel)
    return keep


def snapshot(root: Path) -> dict[str, str]:
    """Path -> content hash of every file outside _build/."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] != "_build":
            out[rel.as_posix()] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def jupyter_book_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("jupyter-book")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("jupyter-book")
    if not found:
        pytest.fail("jupyter-book is not installed: pip install -e '.[book,test]' (make test does)")
    return [found]


class _Collect(HTMLParser):
    """Image sources and the text of each <table> on a page."""

    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.tables: list[str] = []
        self._depth = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs).get("src", ""))
        elif tag == "table":
            self._depth += 1

    def handle_endtag(self, tag):
        if tag == "table" and self._depth:
            self._depth -= 1
            if not self._depth:
                self.tables.append(" ".join(self._buf))
                self._buf = []

    def handle_data(self, data):
        if self._depth:
            self._buf.append(data.strip())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Copy the tree, build it once with -W, and return (copy, html dir, before, after)."""
    copy = tmp_path_factory.mktemp("book") / "src"
    for rel in source_files(ROOT):
        dst = copy / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst)
    before = snapshot(copy)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run(
        [*jupyter_book_cmd(), "build", str(copy), "-W", "--keep-going"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"jupyter-book build -W failed:\n{log[-6000:]}"
    assert "build succeeded" in log
    return copy, copy / "_build" / "html", before, snapshot(copy)


def test_build_writes_nothing_into_the_source_tree(built):
    _, _, before, after = built
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not added and not changed, f"build wrote into the source tree: added {added}, changed {changed}"


def test_pages_exist(built):
    _, html, _, _ = built
    for page in ("index.html", "chapters/intro.html", "chapters/seed.html", "chapters/about.html"):
        assert (html / page).is_file(), page
    # The root redirects to the intro page.
    assert "chapters/intro.html" in (html / "index.html").read_text(encoding="utf-8")


def test_seed_page_has_figures_and_table(built):
    from PIL import Image

    _, html, _, _ = built
    page = html / "chapters" / "seed.html"
    text = page.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(text)
    pngs = [s for s in parser.imgs if s.endswith(".png") or s.startswith("data:image/png")]
    assert len(pngs) >= 4, f"expected the seed chapter's 4 figures, found images {parser.imgs}"
    for src in pngs:
        if src.startswith("data:"):
            continue
        f = (page.parent / src).resolve()
        assert f.is_file(), src
        with Image.open(f) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 150, (src, im.size)
    assert text.count('class="caption-number"') >= 4  # each figure has a numbered caption
    seed_tables = [t for t in parser.tables if "163.369" in t and "1028.550" in t]
    assert seed_tables, "the seed numbers table is missing from the seed page"
    assert "—" in seed_tables[0]
    # Glued numbers were substituted (myst-nb leaves no raw roles behind).
    assert "glue:text" not in text and "{glue" not in text
    # Table 1's slowest/fastest block-size ratio, glued from the data with one decimal.
    ratio = S.slowest_over_fastest(S.load_seed(), 1)
    assert f"{ratio:.1f}" in text


def test_about_page_has_exec_table_and_bibliography(built):
    _, html, _, _ = built
    text = (html / "chapters" / "about.html").read_text(encoding="utf-8")
    assert "chapters/seed" in text  # a row of the execution-statistics table
    for title in ("Efficient Memory Management for Large Language Model Serving",
                  "vAttention", "FlashInfer", "Unified Memory Programming", "Profile VLLM Performance"):
        assert title.lower() in text.lower(), title


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Debian chromium is needed for the screenshot test: run scripts/ensure-chromium")


def test_seed_page_screenshot(built, tmp_path):
    from PIL import Image, ImageStat

    _, html, _, _ = built
    png = tmp_path / "seed.png"
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={SCREEN_W},{SCREEN_H}", f"--screenshot={png}",
        (html / "chapters" / "seed.html").as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert png.is_file(), f"chromium wrote no screenshot:\n{proc.stderr[-3000:]}"
    print(f"seed page screenshot: {png}")
    with Image.open(png) as im:
        assert im.size == (SCREEN_W, SCREEN_H)
        rgb = im.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "too few colours: a blank or error page"
    grey = rgb.convert("L")
    assert ImageStat.Stat(grey).stddev[0] > 20, "almost uniform: a blank page"
    hist = grey.histogram()
    non_white = 1 - sum(hist[245:]) / (SCREEN_W * SCREEN_H)
    assert non_white > 0.05, f"only {non_white:.1%} of the page is not white"
    # Colour beyond grey text: the figures' lines and the table's shading made it to the screen.
    saturated = sum(n for n, (r, g, b) in colours if max(r, g, b) - min(r, g, b) > 60)
    assert saturated > 2000, "no coloured figure or table shading visible on the page"


def _chapters_with_code(copy: Path) -> list[str]:
    """The pages of the book whose source has code cells (the executed chapters), as docnames."""
    import jupytext
    import yaml

    toc = yaml.safe_load((copy / "_toc.yml").read_text(encoding="utf-8"))
    pages = [toc["root"]] + [c["file"] for c in toc["chapters"]]
    return [p for p in pages if any(c.cell_type == "code" for c in jupytext.read(copy / f"{p}.md").cells)]


def test_every_executed_chapter_offers_its_notebook_for_download(built):
    """The download menu of each page with code links `_sources/<page>.ipynb`, and that file is the
    chapter's source as a notebook: jupytext's cells, unchanged, after one note, the parameters
    cell kept, no outputs."""
    import jupytext
    import nbformat

    copy, html, _, _ = built
    pages = _chapters_with_code(copy)
    assert len(pages) >= 10 and "chapters/uvm" in pages and "chapters/glossary" not in pages
    for page in pages:
        text = (html / f"{page}.html").read_text(encoding="utf-8")
        href = f"../_sources/{page}.ipynb"
        assert f'href="{href}"' in text and "download-notebook-button" in text, f"{page}: no .ipynb download"
        nb = nbformat.read(html / "_sources" / f"{page}.ipynb", as_version=4)
        nbformat.validate(nb)
        src = jupytext.read(copy / f"{page}.md")
        assert "download-note" in nb.cells[0].metadata.get("tags", []) and f"`{page}.md`" in nb.cells[0].source
        assert [(c.cell_type, c.source, c.metadata.get("tags")) for c in nb.cells[1:]] == \
               [(c.cell_type, c.source, c.metadata.get("tags")) for c in src.cells], page
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
        assert nb.metadata["kernelspec"]["name"] == "python3" and "jupytext" not in nb.metadata
        if any("parameters" in (c.metadata.get("tags") or []) for c in src.cells):
            assert any("parameters" in (c.metadata.get("tags") or []) for c in nb.cells), page
    # a page without code offers no notebook
    assert "download-notebook-button" not in (html / "chapters" / "glossary.html").read_text(encoding="utf-8")


def test_seed_post_appendix_and_its_citation(built):
    """The seed post as received is a page of the book, its bibliography entry names no invented
    author and links to that page, and the seed chapter links to it too."""
    from lib import DATA

    copy, html, _, _ = built
    page = (html / "chapters" / "seed_post.html").read_text(encoding="utf-8")
    post = (DATA / "seed" / "profile-vllm-performance.md").read_text(encoding="utf-8")
    assert "layout: single" in post and "author_profile" in post  # the copy as received, front matter and all
    for cell in ("1028.550", "163.369", "816.158", "184.604"):  # first and last tables' cells
        assert cell in page, cell
    assert hashlib.sha256(post.encode("utf-8")).hexdigest() in page
    about = (html / "chapters" / "about.html").read_text(encoding="utf-8")
    entry = about[about.index("Profile VLLM Performance"):][:1500]
    assert "Anonymous" not in about
    assert "not named in the copy this study received" in entry
    assert 'href="seed_post.html"' in entry and "doc:" not in about
    assert 'href="seed_post.html"' in (html / "chapters" / "seed.html").read_text(encoding="utf-8")
