"""The page-table experiment's sub-grids are told apart by their backends, and every point of the
grid lands in exactly one of them."""

import collections

from lib.chapters.page_table import analysis as P
from lib.chapters.page_table.experiment import (EXPERIMENT, FA3_BACKENDS, FA3_BLOCKS, FLASHINFER_BACKENDS,
                                                GRID_BACKENDS, NO_OFFSET_BACKENDS)
from lib.harness.experiments import expand, point_key


def test_subgrid_of_reads_the_backends():
    assert P.subgrid_of(f"backends={GRID_BACKENDS};block_size=16") == "grid"
    assert P.subgrid_of(f"backends={NO_OFFSET_BACKENDS};block_size=1") == "blocks"
    assert P.subgrid_of(f"backends={FLASHINFER_BACKENDS};block_size=1") == "flashinfer"
    assert P.subgrid_of(f"backends={FA3_BACKENDS};block_size=16") == "fa3"


def test_backends_override_picks_the_fa3_subgrid_alone():
    pts = expand(EXPERIMENT, {"backends": FA3_BACKENDS})
    assert len(pts) == 2 * 3 * len(FA3_BLOCKS) * 2  # shapes x batches x blocks x placements
    assert {P.subgrid_of(point_key(p)) for p in pts} == {"fa3"}
    assert {point_key(p) for p in pts} <= {point_key(p) for p in expand(EXPERIMENT)}
    assert {p["block_size"] for p in pts} == set(FA3_BLOCKS)


def test_flashinfer_subgrid_covers_block_sizes_and_both_placements_on_both_shapes():
    pts = [p for p in expand(EXPERIMENT) if P.subgrid_of(point_key(p)) == "flashinfer"]
    by = collections.Counter((p["num_heads"], p["num_kv_heads"], p["placement"]) for p in pts)
    assert set(by) == {(h, kv, pl) for h, kv in [(32, 32), (64, 8)] for pl in ("identity", "shuffled")}
    assert {p["block_size"] for p in pts} == {1, 2, 4, 8, 16, 32, 64, 128, 256}
    counts = collections.Counter(P.subgrid_of(point_key(p)) for p in expand(EXPERIMENT))
    assert sum(counts.values()) == len(expand(EXPERIMENT)) and counts["blocks"] > 0 and counts["grid"] > 0
