"""The rerun guide's table, from a fake experiment, chapter and provenance (CPU)."""

import math

from lib.catalog import EXPERIMENTS
from lib.chapters.rerun import guide as G
from lib.harness import results as R
from lib.harness.experiments import Experiment

CHAPTER = """```{code-cell} ipython3
:tags: [parameters]

mode = "replay"
gpu = ""
shape = "llama"
results_root = ""
```
"""


def _exp(**kw):
    base = dict(name="fake", description="", measure="lib.engine.measure:measure_decode",
                grid={"seq_len": [1, 2, 3], "backends": ["own-v1-paged+vllm"]}, chapter="chapters/fake.md")
    return Experiment(**{**base, **kw})


def _prov(root, slug, run_id, wall, points):
    csv = R.csv_path("fake", slug, root=root)
    R.write_provenance(csv, run_id, {"gpu": {"name": "NVIDIA Fake"}, "time_utc": run_id[:16],
                                     "end": {"wall_s": wall, "points": points}})
    csv.write_text("")


def test_guide_rows_commands_grid_and_latest_run(tmp_path):
    (tmp_path / "fake.md").write_text(CHAPTER)
    root = tmp_path / "results"
    _prov(root, "fake-card", "20260101T000000Z-aaaaaa", 600.0, 3)
    _prov(root, "fake-card", "20260102T000000Z-bbbbbb-d0w0", 60.0, 1)  # the latest run: two workers
    _prov(root, "fake-card", "20260102T000000Z-cccccc-d0w1", 90.0, 2)
    t = G.guide({"fake": _exp()}, tmp_path, root=root)
    assert len(t) == 1
    r = t.iloc[0]
    assert r["chapter"] == "fake" and r["points"] == 3
    assert r["sweep"] == "python -m lib sweep fake" and r["reproduce"] == "python -m lib reproduce fake"
    assert r["chapter parameters"] == "shape"
    assert math.isclose(r["minutes"], 1.5) and r["workers"] == 2 and r["points in that run"] == 3
    assert r["card"] == "NVIDIA Fake" and r["outputs"] == "data/results/fake/fake-card.csv + .json"
    assert r["needs"] == "gpu extra, torch, triton, vLLM kernel-only"
    shown = G.runs_table(t)
    assert shown.iloc[0]["files"] == "<code>fake-card.csv + .json</code>" and "card" not in shown
    assert "<br>" in G.commands_table(t).iloc[0]["commands"]
    assert "<table" in G.style(shown).to_html()


def test_an_experiment_without_runs_or_chapter_field(tmp_path):
    t = G.guide({"fake": _exp(chapter=None, grid={"n": [1]})}, tmp_path, root=tmp_path)
    assert t.empty  # no chapter package declares it: not in the guide
    t = G.guide({"fake": _exp(grid={"n": [1, 2]})}, tmp_path, root=tmp_path)
    assert t.iloc[0]["card"] is None and math.isnan(t.iloc[0]["minutes"])
    assert t.iloc[0]["reproduce"] is None  # no chapter file, so no parameters cell with a mode
    assert t.iloc[0]["needs"] == "gpu extra"
    both = G.guide({"fake": _exp(grid={"n": [1, 2]}), "other": _exp(name="other", chapter=None)}, tmp_path, root=tmp_path)
    shown = G.commands_table(both)  # a missing reproduce command or parameter list reads as a dash
    assert shown.iloc[0]["commands"].endswith("replay-only chapter)") and shown.iloc[0]["chapter parameters (-p name value)"] == "—"


def test_the_catalog_maps_to_chapters_and_packages():
    assert G.chapter_of(EXPERIMENTS["correctness"]) == "kernel"
    assert G.chapter_of(EXPERIMENTS["kernel_speed"]) == "kernel"
    assert G.chapter_of(EXPERIMENTS["uvm"]) == "uvm"
    assert G.chapter_of(EXPERIMENTS["selftest"]) is None
    assert "vllm" in G.backends_of(EXPERIMENTS["correctness"])  # chosen by placement, not the grid
    assert G.needs(EXPERIMENTS["uvm"]) == "gpu extra"
    assert "flex_paged" in G.backends_of(EXPERIMENTS["kernel_speed"])
