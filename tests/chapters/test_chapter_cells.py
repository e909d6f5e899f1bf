"""The page_table and uvm_decode chapters' code, run end to end on small synthetic results (CPU):
every name their prose glues is glued, and a failed check refuses to replay."""

import math
import shutil

import pytest

from lib import DATA
from lib.chapters.page_table import analysis as P
from lib.harness import experiments as E
from lib.harness import results as R

SLUG = "fake-card"
SHAPES = ((32, 32), (64, 8))
PROV = {"gpu": {"name": "NVIDIA Fake"}, "ceilings": {"read_gbps": 3000.0}, "end": {"wall_s": 12.0}}


def _row(experiment, point, backend, us, **cols):
    return {"experiment": experiment, "point_key": E.point_key(point), "run_id": "run1", "gpu_slug": SLUG,
            "status": "ok", "backend": backend, "median_us": us, "p10_us": us, "p90_us": us, "samples": 10,
            "rel_error": 1e-4, "check_passed": True, "read_ceiling_gbps": 3000.0, **cols}


def _write(root, experiment, rows):
    csv = R.csv_path(experiment, SLUG, root=root)
    R.append_rows(csv, rows)
    R.write_provenance(csv, "run1", PROV)


def page_table_rows(failed=False):
    rows = []
    cost = {P.PAGED: 1.0, P.CONTIGUOUS: 0.98, P.NO_OFFSET: 0.4, "vllm": 1.3, "sdpa_dense": 0.95}
    for h, k in SHAPES:
        for n in (512, 4096):
            for b in (1, 8):
                point = {"backends": "grid", "num_heads": h, "num_kv_heads": k, "seq_len": n, "batch_size": b}
                nbytes = 2 * b * n * k * 128 * 2
                for backend, place, f in ((P.PAGED, "identity", 1.0), (P.CONTIGUOUS, "identity", 0.98),
                                          (P.PAGED, "shuffled", 1.02), ("vllm", "identity", 1.3),
                                          ("sdpa_dense", "identity", 0.95)):
                    rows.append(_row(P.EXPERIMENT, {**point, "placement": place}, backend, 10 + nbytes / 2e6 * f,
                                     placement=place, num_heads=h, num_kv_heads=k, seq_len=n, batch_size=b,
                                     block_size=16, bytes_moved=nbytes))
        for b in (1, 16):
            for bs in (1, 8, 16, 32):
                point = {"backends": P.NO_OFFSET, "num_heads": h, "num_kv_heads": k, "batch_size": b, "block_size": bs}
                for backend, f in cost.items():
                    if backend != "sdpa_dense":
                        rows.append(_row(P.EXPERIMENT, point, backend, (20 + 5 * b) * f * (1 + 2 / bs),
                                         placement="identity", num_heads=h, num_kv_heads=k, seq_len=1024,
                                         batch_size=b, block_size=bs))
    rows.append({**_row(P.EXPERIMENT, {"backends": "broken"}, "flex_paged", 1.0), "status": "error",
                 "error": "out of memory", "median_us": None, "p10_us": None, "p90_us": None})
    if failed:
        rows[0]["check_passed"] = False
    return rows


def uvm_decode_rows():
    rows = []
    slow = {"device": 1.0, "managed": 1.01, "managed_cold": 40.0, "managed_prefetched": 1.005}
    for h, k in SHAPES:
        for n, b in ((4096, 1), (1024, 16)):
            for bs in (1, 16, 32):
                for kind, f in slow.items():
                    point = {"num_heads": h, "num_kv_heads": k, "seq_len": n, "batch_size": b, "block_size": bs,
                             "memory_kind": kind}
                    for backend in ("own-v1-paged", "own-v2-paged", "vllm"):
                        rows.append(_row("uvm_decode", point, backend, 30 * f * (1 + 1 / bs), memory_kind=kind,
                                         num_heads=h, num_kv_heads=k, seq_len=n, batch_size=b, block_size=bs,
                                         bytes_moved=2 * b * n * k * 128 * 2))
    return rows


def test_page_table_chapter_runs_on_synthetic_rows(tmp_path, run_chapter_cells):
    _write(tmp_path, P.EXPERIMENT, page_table_rows())
    glued = run_chapter_cells("chapters/page_table.md", tmp_path, {"shape": "seed"})
    refs = run_chapter_cells.refs("chapters/page_table.md")
    assert refs and refs <= set(glued), sorted(refs - set(glued))
    assert glued["pt_card"] == "NVIDIA Fake" and glued["pt_err_rows"] == 1 and glued["pt_err_backends"] == "flex_paged"
    assert glued["pt_pc_llama_max"] == pytest.approx(0.98 ** -1 * (10 + 0) / 10, rel=0.05)
    assert glued["pt_pen_seed_ours_lo"] > 1 and math.isfinite(glued["pt_share_llama_b1"])


def test_page_table_chapter_refuses_a_failed_check(tmp_path, run_chapter_cells):
    _write(tmp_path, P.EXPERIMENT, page_table_rows(failed=True))
    with pytest.raises(ValueError, match="failed their correctness check"):
        run_chapter_cells("chapters/page_table.md", tmp_path)


def test_uvm_decode_chapter_runs_on_synthetic_rows(tmp_path, run_chapter_cells):
    _write(tmp_path, "uvm_decode", uvm_decode_rows())
    shutil.copytree(DATA / "results" / "uvm", tmp_path / "uvm")  # the transfer rates it quotes
    glued = run_chapter_cells("chapters/uvm_decode.md", tmp_path, {"backend": "vllm"})
    refs = run_chapter_cells.refs("chapters/uvm_decode.md")
    assert refs and refs <= set(glued), sorted(refs - set(glued))
    assert glued["ud_card"] == "NVIDIA Fake" and glued["ud_backend"] == "vllm" and glued["ud_wall_s"] == 12.0
    assert glued["ud_res_worst"] == pytest.approx(1.0) and glued["ud_cold_med"] == pytest.approx(40.0)
