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


def page_table_rows(failed=False, *, slug=SLUG, run="run1", shapes=SHAPES, pc=0.98, flashinfer=False,
                    t="2026-01-01T00:00:00Z"):
    """Synthetic page_table rows of one run: the block-16 grid and the block-size grid (paged /
    contiguous = 1 / ``pc``), and with ``flashinfer`` the FlashInfer sub-grid (FlashInfer 1.1 x
    SDPA on identity, 1.2 x on shuffled placement; SDPA's shuffled row 1.01 x its identity one)."""
    rows = []
    cost = {P.PAGED: 1.0, P.CONTIGUOUS: pc, P.NO_OFFSET: 0.4, "vllm": 1.3, "sdpa_dense": 0.95}
    row = lambda *a, **kw: _row(*a, **kw, gpu_slug=slug, run_id=run, time_utc=t)  # noqa: E731
    for h, k in shapes:
        for n in (512, 4096):
            for b in (1, 8):
                point = {"backends": "grid", "num_heads": h, "num_kv_heads": k, "seq_len": n, "batch_size": b}
                nbytes = 2 * b * n * k * 128 * 2
                for backend, place, f in ((P.PAGED, "identity", 1.0), (P.CONTIGUOUS, "identity", pc),
                                          (P.PAGED, "shuffled", 1.02), ("vllm", "identity", 1.3),
                                          ("sdpa_dense", "identity", 0.95)):
                    rows.append(row(P.EXPERIMENT, {**point, "placement": place}, backend, 10 + nbytes / 2e6 * f,
                                    placement=place, num_heads=h, num_kv_heads=k, seq_len=n, batch_size=b,
                                    block_size=16, bytes_moved=nbytes))
        for b in (1, 16):
            for bs in (1, 8, 16, 32):
                point = {"backends": P.NO_OFFSET, "num_heads": h, "num_kv_heads": k, "batch_size": b, "block_size": bs}
                for backend, f in cost.items():
                    if backend != "sdpa_dense":
                        rows.append(row(P.EXPERIMENT, point, backend, (20 + 5 * b) * f * (1 + 2 / bs),
                                        placement="identity", num_heads=h, num_kv_heads=k, seq_len=1024,
                                        batch_size=b, block_size=bs))
        if flashinfer:
            for b in (8, 128):
                for bs in (1, 16):
                    for place in ("identity", "shuffled"):
                        point = {"backends": "flashinfer+x", "num_heads": h, "num_kv_heads": k, "batch_size": b,
                                 "block_size": bs, "placement": place}
                        sh = place == "shuffled"
                        for backend, f in (("flashinfer", 1.2 if sh else 1.1), (P.PAGED, 1.3),
                                           ("sdpa_dense", 1.01 if sh else 1.0)):
                            us = 100.0 * b * f
                            rows.append(row(P.EXPERIMENT, point, backend, us, placement=place, num_heads=h,
                                            num_kv_heads=k, seq_len=4096, batch_size=b, block_size=bs,
                                            bytes_moved=int(us * 2e6)))  # 2000 GB/s
    rows.append({**row(P.EXPERIMENT, {"backends": "broken"}, "flex_paged", 1.0), "status": "error",
                 "error": "out of memory", "median_us": None, "p10_us": None, "p90_us": None})
    if failed:
        rows[0]["check_passed"] = False
    return rows


def _write_runs(root, runs):
    """``runs``: (slug, run id, physical card's uuid hash, rows): one results file per card, one
    provenance record per run."""
    for slug, run, uuid, rows in runs:
        csv = R.csv_path(P.EXPERIMENT, slug, root=root)
        R.append_rows(csv, rows)
        R.write_provenance(csv, run, {**PROV, "gpu": {**PROV["gpu"], "uuid_sha16": uuid}})


def uvm_decode_rows(slug=SLUG, device_scale=1.0):
    """Synthetic uvm_decode rows of one card; ``device_scale`` scales the device-memory time only."""
    rows = []
    slow = {"device": 1.0, "managed": 1.01, "managed_cold": 40.0, "managed_prefetched": 1.005}
    for h, k in SHAPES:
        for n, b in ((4096, 1), (1024, 16)):
            for bs in (1, 16, 32):
                for kind, f in slow.items():
                    point = {"num_heads": h, "num_kv_heads": k, "seq_len": n, "batch_size": b, "block_size": bs,
                             "memory_kind": kind}
                    for backend in ("own-v1-paged", "own-v2-paged", "vllm"):
                        rows.append(_row("uvm_decode", point, backend,
                                         30 * f * (1 + 1 / bs) * (device_scale if kind == "device" else 1.0),
                                         memory_kind=kind, num_heads=h, num_kv_heads=k, seq_len=n, batch_size=b,
                                         block_size=bs, bytes_moved=2 * b * n * k * 128 * 2, gpu_slug=slug))
    return rows


def test_page_table_chapter_runs_on_synthetic_rows(tmp_path, run_chapter_cells):
    """One card, no FlashInfer sub-grid (as the H100): every name the prose refers to is glued,
    the other book cards' names and the FlashInfer numbers as NaN."""
    _write(tmp_path, P.EXPERIMENT, page_table_rows())
    glued = run_chapter_cells("chapters/page_table.md", tmp_path, {"shape": "seed"})
    refs = run_chapter_cells.refs("chapters/page_table.md")
    assert refs and refs <= set(glued), sorted(refs - set(glued))
    assert glued["pt_card"] == "NVIDIA Fake" and glued["pt_err_rows"] == 1 and glued["pt_err_backends"] == "flex_paged"
    assert glued["pt_pc_llama_max_fake_card"] == pytest.approx(0.98 ** -1 * (10 + 0) / 10, rel=0.05)
    assert glued["pt_pen_seed_ours_lo_fake_card"] > 1 and math.isfinite(glued["pt_share_llama_b1_fake_card"])
    assert math.isnan(glued["pt_pc_llama_max_h200"]) and math.isnan(glued["pt_fi_fs_seed_median"])
    assert glued["pt_fi_cards"] == "none" and glued["pt_fi_points"] == 0


def test_page_table_chapter_compares_two_cards_and_two_runs(tmp_path, run_chapter_cells):
    """An H100 (paged faster than contiguous) and an H200 with two runs of the 64:8 half on two
    physical cards (paged slower) and a FlashInfer sub-grid: the per-card numbers, the runs' gap
    and FlashInfer's ratios come out as built."""
    h100, h200 = "h100-80gb-hbm3", "h200"
    _write_runs(tmp_path, [
        (h100, "r100", "aaaa", page_table_rows(slug=h100, run="r100", pc=1.05)),
        (h200, "r1", "bbbb", page_table_rows(slug=h200, run="r1", pc=0.95, flashinfer=True)),
        (h200, "r2", "cccc", page_table_rows(slug=h200, run="r2", pc=0.94, shapes=((64, 8),),
                                             t="2026-01-02T00:00:00Z")),
    ])
    glued = run_chapter_cells("chapters/page_table.md", tmp_path, {"shape": "seed", "gpu": h200})
    refs = run_chapter_cells.refs("chapters/page_table.md")
    assert refs <= set(glued), sorted(refs - set(glued))
    assert glued["pt_cards_h200"] == 2 and glued["pt_runs_h200"] == 2 and glued["pt_cards_h100"] == 1
    n = glued["pt_pcn_seed_h100"]
    assert n > 0 and glued["pt_pcbelow_seed_h100"] == n and glued["pt_pcbelow_seed_h200"] == 0
    assert glued["pt_pc_seed_median_h200"] > 1 > glued["pt_pc_seed_median_h100"]
    # contiguous is 0.95 x or 0.94 x the paged time beyond a fixed 10 us, so the two runs lie at most
    # 0.95 / 0.94 apart, less where the fixed part weighs; more would be the gap of something else
    assert 0.5 < glued["pt_gap_pc_gap_max_h200"] < 100 * (0.95 / 0.94 - 1) + 1e-9
    assert glued["pt_gap_pc_gap_median_h200"] <= glued["pt_gap_pc_gap_max_h200"]
    assert glued["pt_below_pc_h200"] == "0/0"
    assert glued["pt_fi_fs_seed_median"] == pytest.approx(1.1)
    assert glued["pt_fi_fsh_seed_median"] == pytest.approx(1.2 / 1.1)
    assert glued["pt_fi_noise_llama_max"] == pytest.approx(1.01)
    assert glued["pt_fi_cards"] == "H200" and glued["pt_fi_absent"] == "H100"
    assert glued["pt_fi_maxpct"] < 100


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
    assert math.isnan(glued["ud_res_worst_h100"]) and math.isnan(glued["ud_dev_ratio_med"])  # no such cards


def test_uvm_decode_chapter_compares_two_cards(tmp_path, run_chapter_cells):
    """Both book cards: the per-card names carry each card's own numbers, the device-time ratio is
    the H200's over the H100's, and the chapter's `gpu` picks whose detail the unsuffixed names hold."""
    for slug, scale in (("h100-80gb-hbm3", 1.0), ("h200", 0.8)):
        csv = R.csv_path("uvm_decode", slug, root=tmp_path)
        R.append_rows(csv, uvm_decode_rows(slug, device_scale=scale))
        R.write_provenance(csv, "run1", PROV)
    shutil.copytree(DATA / "results" / "uvm", tmp_path / "uvm")
    glued = run_chapter_cells("chapters/uvm_decode.md", tmp_path, {"gpu": "h200"})
    refs = run_chapter_cells.refs("chapters/uvm_decode.md")
    assert refs <= set(glued), sorted(refs - set(glued))
    assert glued["ud_dev_ratio_med"] == pytest.approx(0.8)
    assert glued["ud_cold_med_h100"] == pytest.approx(40.0)  # 40x the device time of 1.0
    assert glued["ud_cold_med_h200"] == pytest.approx(50.0)  # the same cold time over 0.8 of it
    assert glued["ud_cold_med"] == pytest.approx(50.0)  # gpu = "h200": its detail
