"""The primer runs on the committed data (CPU): every name its prose glues is glued, its numbers
come from the uvm rows, its figures draw, and it stops with a clear error where there is no data."""

import math

import pytest

from lib import DATA
from lib.book import frame
from lib.chapters.primer import exercises as X
from lib.chapters.primer import figures as F
from lib.chapters.primer import numbers as N
from lib.chapters.uvm import analysis as UA

CHAPTER = "chapters/primer.md"


def test_primer_runs_on_committed_data(run_chapter_cells):
    glued = run_chapter_cells(CHAPTER, DATA / "results")
    refs = run_chapter_cells.refs(CHAPTER)
    assert refs and refs <= set(glued), sorted(refs - set(glued))
    card = N.cards(N.load_uvm())[0]
    h = UA.headline(N.load_uvm(), card)
    assert glued["pr_read_fault_touched"] == h["read_fault_touched"]
    assert glued["pr_card"] == frame.card_facts(card, experiment="uvm")["name"]
    assert 0 < glued["pr_fault_pct_of_link"] < 100  # faults reach a fraction of the link


def test_primer_without_data_says_how_to_measure(tmp_path, run_chapter_cells):
    with pytest.raises(frame.NoData, match="python -m lib sweep uvm"):
        run_chapter_cells(CHAPTER, tmp_path)


def test_numbers_and_solutions_are_consistent():
    n = N.primer_numbers()
    assert n["overhead_us_per_2m"] > 0 and n["host_byte_cost"] > 1
    s = X.primer_solutions(n)
    assert all(isinstance(v, str) and v for v in s.values())
    assert s["lru_miss_pct"] == "100" and s["pages_ratio"] == "512"
    blank = X.primer_solutions({})
    assert blank["gib_fault_ms"] == X.DASH and blank["map_size"] == X.DASH


def test_figures_draw():
    n = N.primer_numbers()
    for fig in (F.page_tables_diagram(), F.fault_buffer_diagram(),
                F.paths_figure(N.paths_table(N.load_uvm()))):
        assert fig.axes and fig.get_figwidth() > 5
    from lib.chapters.primer import concepts as C
    fig = F.thrashing_figure(C.miss_curve([0.5, 1.5], capacity=40), device_gbps=n["read_device"],
                             fault_gbps=n["read_fault_touched"])
    assert len(fig.axes) == 2 and math.isfinite(n["read_device"])
    with pytest.raises(ValueError, match="needs columns"):
        F.paths_figure(N.paths_table(N.load_uvm()).drop(columns="gbps"))


def test_formatted_solutions_survive_the_glue_role():
    """{glue:text} literal-evaluates what it prints: "1.000" must not become "1.0", nor "1,024" a
    tuple (myst_nb.core.variables.format_plain_text)."""
    from myst_nb.core.variables import format_plain_text

    for value, spec, want in ((1.0, ".3f", "1.000"), (20756224, ",.0f", "20\u202f756\u202f224"),
                              (19.5, ".1f", "19.5"), (2, ".0f", "2")):
        shown = format_plain_text(repr(X.fmt(value, spec)), "")
        assert shown.replace("\u2060", "") == want, (value, spec, shown)
    assert X.fmt(float("nan")) == X.DASH and X.fmt(None) == X.DASH
