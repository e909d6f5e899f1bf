"""Shared test set-up: the `gpu` marker skips itself where no CUDA GPU is visible; one helper runs a
chapter's code cells on synthetic results (CPU) and returns what they glued."""

from pathlib import Path

import pytest

from lib.engine.gpu import gpu_available

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_capture_left_open(request):
    """A GPU test must end every CUDA-graph capture it begins: a stream left capturing makes every
    later allocation fail ("operation not permitted when stream is capturing") in some other test.
    This fails the test that left it, where the cause is."""
    yield
    if "gpu" not in request.keywords or not gpu_available():
        return
    import sys

    import cupy

    try:
        cupy.cuda.runtime.free(cupy.cuda.runtime.malloc(256))
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            # a kernel launch makes torch read the runtime's pending error, if one was left
            (torch.ones(1, device="cuda") + 1).item()
    except Exception as exc:  # pragma: no cover - only on a GPU
        pytest.fail(f"{request.node.nodeid} left a CUDA stream capturing or an error pending: {exc}")


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible (GPU tests run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def run_chapter_cells(monkeypatch):
    """``run(chapter_md, results_root, params)`` -> {glued name: value}: the chapter's code cells
    in order (magics skipped), ``params`` and ``results_root`` set after its parameters cell, as
    papermill would; ``display`` renders Stylers so their formats run."""
    jupytext = pytest.importorskip("jupytext")
    pytest.importorskip("IPython")
    import IPython.display
    import matplotlib.pyplot as plt

    import lib.book.glue

    def run(chapter_md, results_root, params=None) -> dict:
        glued: dict = {}
        monkeypatch.setattr(lib.book.glue, "glue", lambda name, value, display=True: glued.__setitem__(name, value))
        monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: [
            o.to_html() if hasattr(o, "to_html") else o for o in objs])
        ns: dict = {"display": IPython.display.display}  # a kernel's builtin; some chapters use it bare
        path = Path(chapter_md) if Path(chapter_md).is_absolute() else ROOT / chapter_md
        for i, cell in enumerate(c for c in jupytext.read(path).cells if c.cell_type == "code"):
            body = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith("%"))
            exec(compile(body, f"{path.name} cell {i}", "exec"), ns)
            if "parameters" in cell.metadata.get("tags", []):
                ns.update(params or {}, results_root=str(results_root))
        plt.close("all")
        return glued

    run.refs = glue_refs
    return run


def glue_refs(chapter_md) -> set[str]:
    """Every glued name a chapter's prose or figures refer to."""
    import re

    text = (ROOT / chapter_md).read_text()
    return (set(re.findall(r"\{glue:(?:text|figure)\}`([A-Za-z0-9_]+)", text))
            | set(re.findall(r"```\{glue:figure\} ([A-Za-z0-9_]+)", text)))
