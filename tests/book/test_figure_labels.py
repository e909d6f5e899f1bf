"""No label of a book figure runs into another: the checker (lib.book.plots.label_overlaps) on
figures made to overlap and on clean ones, then on the figures that had overlapping labels or
legends (issue 17), drawn by their chapters from the committed data as the book draws them."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from lib.book.plots import label_overlaps, set_house_style  # noqa: E402


def test_the_checker_finds_crowded_ticks_a_legend_on_a_label_and_two_touching_axis_labels():
    set_house_style()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_xticks([1.0, 1.02])
    ax.set_xticklabels(["1.00×", "1.02×"])
    ax.set_xlim(0.9, 1.1)
    assert any("x tick '1.00×'" in o and "x tick '1.02×'" in o for o in label_overlaps(fig))

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([1, 2], [1, 2], label="a line with a long legend entry")
    ax.set_xlabel("an x label")
    fig.canvas.draw()
    box = ax.xaxis.label.get_window_extent().transformed(fig.transFigure.inverted())
    fig.legend(loc="center", bbox_to_anchor=((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2))  # on the label
    assert any("x label" in o and "figure legend" in o for o in label_overlaps(fig))

    fig, (a, b) = plt.subplots(1, 2, figsize=(3.5, 2))
    a.set_xlabel("a rather long label on the left panel")
    b.set_xlabel("and one on the right")
    assert any("axes 0 x label" in o and "axes 1 x label" in o for o in label_overlaps(fig))
    plt.close("all")


def test_the_checker_passes_a_clean_figure_and_ignores_hidden_axes():
    set_house_style()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    a.plot([1, 10, 100], [1, 2, 3])
    a.set_xscale("log")
    a.set_xlabel("left")
    b.axis("off")  # a diagram: its (hidden) ticks are not labels on the page
    b.text(0.0, 0.0, "a note at the corner")
    fig.tight_layout()
    assert label_overlaps(fig) == []
    plt.close("all")


#: chapter -> the glued figures that had overlapping labels, legends or ticks (issue 17's list,
#: found again in today's book, and those the checker found beside them).
FIXED = {
    "chapters/kernel.md": ["fig_speed"],
    "chapters/uvm.md": ["fig_read"],
    "chapters/vmm.md": ["vm_fig_map", "vm_fig_kernel"],
    "chapters/kv_offload.md": ["ko_fig_time", "ko_fig_bus"],
    "chapters/uvm_decode.md": ["ud_fig_kinds"],
    "chapters/cards.md": ["cd_fig_ceilings"],
}


@pytest.mark.parametrize("chapter", sorted(FIXED))
def test_fixed_figures_have_no_overlapping_labels_on_the_committed_data(run_chapter_cells, chapter):
    glued = run_chapter_cells(chapter, "")
    for name in FIXED[chapter]:
        assert label_overlaps(glued[name]) == [], f"{chapter}: {name}"
