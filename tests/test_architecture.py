"""The layers of lib/ and the absence of import circles, checked from the source (no imports run).

Every import counts, function-local ones included: a circle hidden inside a function is still a
circle. Layers: engine < harness < book < chapters; tools sits on the engine; the package root
(``lib/__init__``, ``__main__``, ``catalog``) may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib"  # tests/ sits beside lib/

#: What each layer may import (besides itself).
ALLOWED = {
    "engine": set(),
    "harness": {"engine"},
    "tools": {"engine"},
    "book": {"engine", "harness"},
    "chapters": {"engine", "harness", "book"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in LIB.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """lib modules that ``path`` imports anywhere in its body."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import submodule` runs pkg/__init__ too: charge the package as well
            names = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
        else:
            continue
        for n in names:
            while n and n not in known:  # an attribute of a module: charge the module
                n = n.rpartition(".")[0]
            if n and n != this:
                found.add(n)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, known) for m, p in mods.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle_and_a_layer_breach():
    g = {"lib.engine.a": {"lib.engine.b"}, "lib.engine.b": {"lib.engine.a"}, "lib.harness.c": set()}
    assert cycles(g) == [["lib.engine.a", "lib.engine.b"]]
    assert layer("lib.chapters.uvm.measure") == "chapters" and layer("lib.catalog") is None
    tree = ast.parse("def f():\n    from lib.chapters.uvm import measure\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))  # function-local imports are seen


def test_no_import_circle_in_lib():
    g = graph()
    assert cycles(g) == []


def test_each_layer_imports_only_the_layers_below_it():
    g = graph()
    breaches = []
    for mod, deps in g.items():
        own = layer(mod)
        if own is None:
            continue
        for d in deps:
            other = layer(d)
            if other is None:
                if d not in ("lib",):
                    breaches.append(f"{mod} -> {d} (the package root)")
            elif other != own and other not in ALLOWED[own]:
                breaches.append(f"{mod} -> {d}")
    assert breaches == []


def test_lib_has_its_layers_and_one_package_per_chapter():
    book_chapters = {p.stem for p in (LIB.parent / "chapters").glob("*.md")} - {"about"}
    packages = {p.name for p in (LIB / "chapters").iterdir() if (p / "__init__.py").exists()}
    assert {"engine", "harness", "book", "chapters", "tools"} <= {p.name for p in LIB.iterdir() if p.is_dir()}
    assert packages <= book_chapters, packages - book_chapters


def test_tests_mirror_the_tree():
    """Each test folder names a folder of lib/ (tests/engine for lib/engine, ...)."""
    tests = LIB.parent / "tests"
    folders = [p.relative_to(tests) for p in tests.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    assert folders and all((LIB / f).is_dir() for f in folders), [str(f) for f in folders if not (LIB / f).is_dir()]
