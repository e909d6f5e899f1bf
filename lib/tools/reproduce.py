"""``python -m lib reproduce``: run chapters through papermill (``mode = "run"``), then rebuild.

Chapter parameters are given as ``-p name=value``, the syntax of ``python -m lib sweep``
(:func:`parse_params`; the older ``-p NAME VALUE`` stays an alias). ``-p force=1`` is understood
by every chapter, declared or not: ``mode = "run"`` then measures every point afresh into a new
run instead of replaying points that already have rows (it sets ``UVM_STUDY_FORCE`` for the
chapters' kernels, :func:`lib.book.frame.measure_if_asked`).

Usage errors raise ValueError (the CLI prints one line and exits with 2).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable

from lib import ROOT


def _literal(text: str):
    """A -p value: int, float, bool or None when it reads as one, else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


#: The chapters' frame reads this variable (``lib.book.frame.FORCE_ENV``; tools cannot import book).
FORCE_ENV = "UVM_STUDY_FORCE"


def parse_params(items) -> list[tuple[str, str]]:
    """``-p`` values as (name, text) pairs: each item ``"name=value"`` or, the older form, a
    (name, value) pair; a clear ValueError otherwise."""
    out = []
    for item in items or []:
        if isinstance(item, (list, tuple)):
            if len(item) == 1:
                item = item[0]
            elif len(item) == 2:
                name, value = item
                if "=" in str(name):
                    raise ValueError(f"parameter {name!r}: give name=value or NAME VALUE, not both")
                out.append((str(name).strip(), str(value)))
                continue
            else:
                raise ValueError(f"parameter {list(item)!r} must look like name=value")
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip():
            raise ValueError(f"parameter {item!r} must look like name=value (as for `sweep -p`)")
        out.append((name.strip(), value))
    return out


def coerce_param(text: str, default):
    """A -p value as the type of the chapter's default (a string default keeps "1,2" a string)."""
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        low = text.strip().lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{text!r} is not a bool")
        return low in ("true", "1", "yes")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a {type(default).__name__}") from None
    return _literal(text)


def declared_parameters(nb) -> dict:
    """Names assigned in the notebook's ``parameters`` cell, with their literal defaults."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            out = {}
            for node in ast.parse(cell.source).body:
                if isinstance(node, (ast.Assign, ast.AnnAssign)):
                    for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                        if isinstance(t, ast.Name):
                            try:
                                out[t.id] = ast.literal_eval(node.value)
                            except Exception:
                                out[t.id] = None
            return out
    return {}


def in_book_order(chapters: Iterable[str]) -> list[Path]:
    """Existing chapter files (``chapters/x`` or ``chapters/x.md``), in ``_toc.yml`` order."""
    named = {Path(c).with_suffix(".md").as_posix() for c in chapters}
    toc = ROOT / "_toc.yml"
    order = re.findall(r"file:\s*(\S+)", toc.read_text()) if toc.exists() else []
    rank = {Path(f).with_suffix(".md").as_posix(): i for i, f in enumerate(order)}
    ordered = sorted(named, key=lambda c: (rank.get(c, len(rank)), c))
    return [ROOT / c for c in ordered if (ROOT / c).exists()]


def chapter_path(text: str) -> Path:
    p = Path(text)
    for c in (p, ROOT / p, ROOT / "chapters" / p, ROOT / "chapters" / f"{p}.md", (ROOT / p).with_suffix(".md")):
        if c.is_file():
            return c.resolve()
    raise ValueError(f"no chapter {text!r} (looked in {ROOT / 'chapters'})")


def reproduce(chapters: list[Path], params, *, mode: str, out: str | None, build: bool,
              kernel: str = "python3", progress: bool = True, timeout: int | None = None) -> int:
    """Execute `chapters` with `params` ((name, text) pairs); an exit code."""
    import jupytext
    import nbformat
    import papermill

    if not chapters:
        raise ValueError("no experiment chapters registered yet; name chapters explicitly")
    notebooks = [(c, jupytext.read(c)) for c in chapters]
    declared = {c: declared_parameters(nb) for c, nb in notebooks}
    user = {}
    for name, value in parse_params(params):
        if name == "force" and not any("force" in d for d in declared.values()):
            if coerce_param(value, False):
                os.environ[FORCE_ENV] = "1"  # the kernels inherit it: every point measured afresh
                print(f"force: every point is measured afresh ({FORCE_ENV}=1)", file=sys.stderr)
            else:
                os.environ.pop(FORCE_ENV, None)
            continue
        if not name.isidentifier():
            raise ValueError(f"parameter name {name!r} is not an identifier")
        defaults = [d[name] for d in declared.values() if name in d]
        if not defaults:
            known = sorted({k for d in declared.values() for k in d})
            raise ValueError(f"parameter {name!r} is declared by none of {[c.name for c in chapters]} (they declare {known})")
        user[name] = coerce_param(value, defaults[0])
    out_dir = Path(out) if out else ROOT / "_executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    # the kernel imports `lib` from this checkout, whatever is installed
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + env_path if env_path else "")
    failed = []
    for chapter, nb in notebooks:
        run_params = {k: v for k, v in {"mode": mode, **user}.items() if k in declared[chapter]}
        if "mode" not in declared[chapter]:
            print(f"{chapter.name}: declares no 'mode' parameter; running it as it is", file=sys.stderr)
        src, dst = out_dir / f"{chapter.stem}.source.ipynb", out_dir / f"{chapter.stem}.ipynb"
        nbformat.write(nb, src)
        print(f"{chapter.relative_to(ROOT) if chapter.is_relative_to(ROOT) else chapter}: "
              f"papermill {run_params} -> {dst}", file=sys.stderr)
        try:
            papermill.execute_notebook(str(src), str(dst), parameters=run_params, cwd=str(chapter.parent),
                                       kernel_name=kernel, progress_bar=progress, execution_timeout=timeout)
        except papermill.PapermillExecutionError as e:
            failed.append(f"{chapter.name}: {e.ename}: {e.evalue}")
        finally:
            src.unlink(missing_ok=True)
    if failed:
        print("failed chapters (executed notebooks kept for inspection):\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return build_book() if build else 0


def build_book() -> int:
    exe = Path(sys.executable).with_name("jupyter-book")
    exe = str(exe) if exe.exists() else shutil.which("jupyter-book")
    if not exe:
        raise ValueError("jupyter-book is not installed (pip install '.[book]'); rerun with --no-build")
    return subprocess.run([exe, "build", str(ROOT), "-W", "--keep-going"]).returncode
