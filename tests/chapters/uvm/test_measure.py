"""The Unified Memory measurements' CPU-side logic, and the chapter on synthetic data.

The GPU measurements themselves run on a GPU (``python -m lib sweep uvm``); here: the grid,
the budget and estimate arithmetic, the tables and figures on rows shaped like a real run's,
and the chapter executed (papermill) in replay mode with no data and with synthetic data.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lib import catalog
from lib import ROOT
from lib.harness import experiments as E
from lib.engine import memory
from lib.engine import transfer as X
from lib.harness import guards
from lib.harness import results as R
from lib.chapters.uvm import analysis as A
from lib.chapters.uvm import measure as U
from lib.chapters.uvm import figures as F
from tests.conftest import glue_refs

MiB, GiB = U.MiB, U.GiB

# Synthetic bandwidths (GB/s) by state: shaped like an H100 run, not measured anywhere.
_READ_BW = {("device", "warm"): 3000, ("managed_gpu", "warm"): 2990, ("managed_readmostly", "warm"): 2980,
            ("managed_host_mapped", "warm"): 24, ("pinned", "warm"): 25, ("managed", "cold"): 200,
            ("managed_host_touched", "cold"): 8, ("managed_host", "cold"): 9,
            ("managed_readmostly", "cold"): 7, ("managed_host_touched", "prefetch_then_read"): 40}


def _timed(nbytes: int, gbps: float) -> dict:
    med = nbytes / gbps / 1e3
    return {"median_us": med, "p10_us": 0.97 * med, "p90_us": 1.05 * med, "samples": 3}


def fake_rows(slug: str = "fake-gpu-80gb", scale: float = 1.0) -> list[dict]:
    """One synthetic run of every point of the full grid, as the sweep would store it."""
    rows = []
    for p in E.expand(catalog.get("uvm")):
        n = int(p["nbytes"])
        base = {"experiment": "uvm", "point_key": E.point_key(p), "run_id": "fake-run", "gpu_slug": slug,
                "status": "ok", "read_ceiling_gbps": 3100.0, "wall_s": 1.0}
        extra = {k: v for k, v in p.items() if k not in R.BY_NAME}
        m = p["measurement"]
        if m == "gpu_read":
            bw = _READ_BW[(p["memory_kind"], p["phase"])] * scale
            rows.append({**base, "backend": "gpu_read", "memory_kind": p["memory_kind"], "bytes_moved": n,
                         "protocol": "rigorous" if p["phase"] == "warm" else "direct", "check_passed": True,
                         **_timed(n, bw), "extra": extra})
        elif m == "cpu_read":
            for backend, kind, phase, bw in [("cpu_read", "managed", "after_gpu_write", 3),
                                             ("cpu_read", "managed", "host_resident", 10),
                                             ("prefetch", "managed", "prefetch_to_host", 40),
                                             ("cpu_read", "managed", "after_prefetch_to_host", 10),
                                             ("cpu_read", "pageable", "baseline", 11),
                                             ("cpu_read", "pinned", "baseline", 11)]:
                rows.append({**base, "backend": backend, "memory_kind": kind, "bytes_moved": n,
                             "protocol": "direct" if backend == "prefetch" else None, "check_passed": True,
                             **_timed(n, bw * scale), "extra": {**extra, "phase": phase}})
        elif m == "granularity":
            s = int(p["stride_bytes"])
            touches = n // s
            moved = n if s <= 64 * 1024 else touches * 64 * 1024
            rows.append({**base, "backend": "gpu_touch", "memory_kind": "managed_host_touched",
                         "bytes_moved": moved, "protocol": "direct", "check_passed": True,
                         **_timed(moved, 8 * scale),
                         "extra": {**extra, "touches": touches, "touched_pages_bytes": touches * 4096,
                                   "moved_meminfo_median": moved, "moved_prefetch_estimate": int(0.95 * moved),
                                   "moved_meminfo_bytes": [moved] * 3}})
        else:
            bws = {"memcpy_pinned": ("memcpy", "pinned", 52, 50), "memcpy_pageable": ("memcpy", "pageable", 20, 18),
                   "prefetch": ("prefetch", "managed", 49, 30)}[p["method"]]
            for direction, bw in (("h2d", bws[2]), ("d2h", bws[3])):
                rows.append({**base, "backend": bws[0], "memory_kind": bws[1], "bytes_moved": n,
                             "protocol": "direct", "check_passed": True, **_timed(n, bw * scale),
                             "extra": {**extra, "direction": direction}})
    return rows


def write_fake(root, slugs=("fake-gpu-80gb",)) -> None:
    for i, slug in enumerate(slugs):
        path = R.csv_path("uvm", slug, root=root)
        R.append_rows(path, fake_rows(slug, scale=1.0 + 0.3 * i))
        R.write_provenance(path, "fake-run", {"gpu": {"name": f"Fake GPU {slug}", "driver_version": "580.0",
                                                      "cuda_runtime_version": "13.0"},
                                              "uvm_device_facts": {"concurrent_managed_access": 1,
                                                                   "pageable_memory_access": 0}})


# ----------------------------------------------------------------------------- grid and arithmetic

def test_experiment_is_registered_with_the_chapter():
    exp = catalog.get("uvm")
    assert exp.chapter == "chapters/uvm.md" and exp.measure == "lib.chapters.uvm.measure:measure_point"
    pts = E.expand(exp)
    by = {m: [p for p in pts if p["measurement"] == m] for m in U.MEASUREMENTS}
    assert all(by.values()), "every measurement has points"
    sizes = {p["nbytes"] for p in by["gpu_read"]}
    assert min(sizes) == 64 * MiB and max(sizes) == 8 * GiB
    states = {(p["memory_kind"], p["phase"]) for p in by["gpu_read"]}
    assert states == set(U.READ_LABELS), "every gpu_read state has a label in the book"
    assert {p["stride_bytes"] for p in by["granularity"]} == {4096, 65536, 2 * MiB}
    # every size is a multiple of every stride and of the read kernel's 16-byte vectors
    assert all(p["nbytes"] % 16 == 0 for p in pts)
    assert all(p["nbytes"] % p["stride_bytes"] == 0 for p in by["granularity"])


def test_quick_points_use_small_sizes_only_and_filter():
    exp = catalog.get("uvm")
    quick = E.expand(exp, U.overrides(quick=True))
    assert {p["nbytes"] for p in quick} == set(U.QUICK_SIZES)
    assert {p["measurement"] for p in quick} == set(U.MEASUREMENTS)
    only = E.expand(exp, U.overrides(quick=True, only="transfer"))
    assert only and {p["measurement"] for p in only} == {"transfer"}
    with pytest.raises(ValueError, match="unknown measurement"):
        U.overrides(only="gpu-read")


def test_measure_point_rejects_unknown_measurement():
    with pytest.raises(ValueError, match="measurement must be one of"):
        U.measure_point({"measurement": "nope"})


def test_budget_keeps_buffers_far_below_free_memory():
    assert X.budget_problem(GiB, 0, free_gpu=4 * GiB, free_host=0) is None  # exactly 25%
    why = X.budget_problem(GiB + 1, 0, free_gpu=4 * GiB, free_host=0)
    assert why and "25%" in why and "free" in why
    why = X.budget_problem(0, 3 * GiB, free_gpu=GiB, free_host=4 * GiB)
    assert why and "host memory" in why
    assert X.budget_problem(0, 2 * GiB, free_gpu=GiB, free_host=4 * GiB) is None
    with pytest.raises(ValueError):
        X.budget_problem(-1, 0, free_gpu=1, free_host=1)
    with pytest.raises(ValueError):
        X.budget_problem(1, 0, free_gpu=1, free_host=1, gpu_share=0)


def test_expected_sums():
    assert X.expected_word_sum(16) == 4 * 0x01010101
    assert U.expected_u64_sum(16) == 2 * 0x0101010101010101
    n = 8 * GiB  # wraps modulo 2**64 like NumPy's uint64 sum
    assert U.expected_u64_sum(n) == ((n // 8) * 0x0101010101010101) % (1 << 64)
    host = np.full(4096, X.FILL_BYTE, dtype=np.uint8)
    # the read kernel's sum is compared modulo 2**32 (its block partial sums wrap there)
    assert int(host.view(np.uint32).sum(dtype=np.uint64)) % 2**32 == X.expected_word_sum(4096)
    assert X.expected_word_sum(8 * GiB) == (2 * GiB * X.WORD) % 2**32
    assert U._cpu_sum(host) == U.expected_u64_sum(4096)


def test_resident_from_prefetch_time():
    assert U.resident_from_prefetch(1000, 250.0, 1000.0) == 750
    assert U.resident_from_prefetch(1000, 0.0, 1000.0) == 1000
    assert U.resident_from_prefetch(1000, 1500.0, 1000.0) == 0  # slower than full: nothing resident
    with pytest.raises(ValueError):
        U.resident_from_prefetch(1000, 1.0, 0.0)


def test_host_available_bytes_is_positive_here():
    assert memory.host_available_bytes() > 0


def test_transfer_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        X.measure_transfer("carrier_pigeon", MiB)


# ----------------------------------------------------------------------------- tables and figures

@pytest.fixture(scope="module")
def fake_df(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    write_fake(root, slugs=("fake-gpu-80gb", "fake-gpu-141gb"))
    df = A.load(root)
    assert df is not None
    return df


def test_load_returns_none_without_data(tmp_path):
    assert A.load(tmp_path) is None
    (tmp_path / "uvm").mkdir()
    assert A.load(tmp_path) is None


def test_tables_and_headline(fake_df):
    g = A.gpu_read_table(fake_df)
    assert set(g["label"]) == set(U.READ_LABELS.values())
    assert (g["bw_low"] <= g["bandwidth_gbps"]).all() and (g["bandwidth_gbps"] <= g["bw_high"]).all()
    c = A.cpu_read_table(fake_df)
    assert set(c["label"]) == set(A.CPU_LABELS.values())
    gr = A.granularity_table(fake_df)
    four_k = gr[(gr["stride_bytes"] == 4096) & (gr["gpu_slug"] == "fake-gpu-80gb")].iloc[0]
    assert four_k["amplification"] == pytest.approx(1.0)  # every page touched, every page moved
    t = A.transfer_table(fake_df)
    assert set(t["label"]) == set(A.TRANSFER_LABELS.values())
    h = A.headline(fake_df, "fake-gpu-80gb")
    assert h["read_device"] == pytest.approx(3000) and h["read_fault_touched"] == pytest.approx(8)
    assert h["read_size_gib"] == 8 and h["transfer_size_gib"] == 4
    assert h["managed_over_device"] == pytest.approx(2990 / 3000)
    assert h["prefetch_h2d"] == pytest.approx(49) and h["pinned_h2d"] == pytest.approx(52)
    assert h["gran_2m_touched_mib"] == pytest.approx(2.0)  # 512 touches x 4 KiB
    assert h["gran_64k_meminfo_mib"] == pytest.approx(1024)
    h2 = A.headline(fake_df, "fake-gpu-141gb")
    assert h2["read_device"] == pytest.approx(3900)
    empty = A.headline(fake_df, "no-such-gpu")
    assert math.isnan(empty["read_device"]) and math.isnan(empty["prefetch_h2d"])


def test_figures_draw(fake_df):
    figs = [F.read_bandwidth_figure(A.gpu_read_table(fake_df)), F.cpu_read_figure(A.cpu_read_table(fake_df)),
            F.granularity_figure(A.granularity_table(fake_df)), F.transfer_figure(A.transfer_table(fake_df)),
            F.unified_memory_diagram(), F.fault_timeline_diagram(), F.placement_diagram(),
            F.no_data_figure("x")]
    for fig in figs:
        assert fig.axes and fig.get_figwidth() > 3
    with pytest.raises(ValueError, match="needs columns"):
        F.read_bandwidth_figure(pd.DataFrame({"x": [1]}))
    with pytest.raises(ValueError, match="no rows"):
        F.transfer_figure(A.transfer_table(fake_df).iloc[:0])


def test_shown_formats_and_dashes():
    assert repr(F.shown(3.14159, ".2f")) == "3.14"
    assert repr(F.shown(float("nan"))) == "—"
    assert repr(F.shown(None)) == "—"
    html = F.key_numbers_table({"a": {"read_device": 3000.4}, "b": {}}).to_html()
    assert "3000" in html and "—" in html


# ----------------------------------------------------------------------------- the chapter

def _run_chapter(tmp_path, results_root: str) -> dict:
    pytest.importorskip("papermill")
    out = tmp_path / "uvm.ipynb"
    code = (
        "import sys, jupytext, papermill\n"
        f"nb = jupytext.read({str(ROOT / 'chapters' / 'uvm.md')!r})\n"
        f"jupytext.write(nb, {str(tmp_path / 'in.ipynb')!r})\n"
        f"papermill.execute_notebook({str(tmp_path / 'in.ipynb')!r}, {str(out)!r}, "
        f"parameters={{'results_root': {results_root!r}}}, cwd={str(ROOT / 'chapters')!r}, "
        "progress_bar=False, kernel_name='python3')\n"
    )
    env_path = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _glued_text(nb: dict) -> str:
    parts = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            for mime, value in o.get("data", {}).items():  # glue stores under prefixed mime types
                if mime.endswith(("text/plain", "text/markdown")):
                    parts.append("".join(value) if isinstance(value, list) else str(value))
    return "\n".join(parts)


@pytest.mark.slow
def test_chapter_runs_without_data(tmp_path):
    nb = _run_chapter(tmp_path, str(tmp_path / "empty"))
    text = _glued_text(nb)
    assert "No measurements" in text


def _glued_values(nb: dict) -> dict:
    out = {}
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            name = o.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                v = next((v for k, v in o.get("data", {}).items() if k.endswith("text/plain")), "")
                text = "".join(v) if isinstance(v, list) else str(v)
                out[name] = text.strip("'").replace("\u2060", "")  # Plain's word joiner
    return out


@pytest.mark.slow
def test_chapter_runs_on_synthetic_data(tmp_path):
    root = tmp_path / "results"
    write_fake(root, slugs=("h100-80gb-hbm3", "h200"))  # the H200's rates 1.3x the H100's
    nb = _run_chapter(tmp_path, str(root))
    text = _glued_text(nb)
    assert "No measurements" not in text
    g = _glued_values(nb)
    refs = glue_refs("chapters/uvm.md")
    assert refs <= set(g), sorted(refs - set(g))
    # unsuffixed names: the gpu parameter's card (empty: the H100); suffixed: each card's own
    assert g["u_read_device"] == "3000" and g["u_read_device_h200"] == "3900"
    assert g["u_c_hbm_lo"] == "1.30" and g["u_card"] == "H100"
    assert "the same as device memory to within 3%" in g["u_v_managed_h200"]


# ----------------------------------------------------------------------------- on a GPU (small sizes)

def _finalized(rows) -> list[dict]:
    """Rows as the sweep would store them: they must pass the results schema."""
    rows = rows if isinstance(rows, list) else [rows]
    base = {"experiment": "uvm", "point_key": "test", "run_id": "test", "gpu_slug": "test", "status": "ok"}
    return [R.finalize_row({**base, **r}) for r in rows]


@pytest.mark.gpu
@pytest.mark.parametrize("kind,phase", sorted(U.READ_LABELS))
def test_gpu_read_point(kind, phase):
    (row,) = _finalized(U.measure_gpu_read({"memory_kind": kind, "phase": phase, "nbytes": 64 * MiB}))
    assert row["bandwidth_gbps"] > 0 and row["bytes_moved"] == 64 * MiB
    assert row["protocol"] == ("rigorous" if phase == "warm" else "direct")
    assert row["check_passed"] is (None if (kind, phase) == ("managed", "cold") else True)


@pytest.mark.gpu
def test_cpu_read_point():
    rows = _finalized(U.measure_cpu_read({"nbytes": 64 * MiB}))
    assert len(rows) == 6 and all(r["check_passed"] for r in rows)
    assert {r["extra"]["phase"] for r in rows} >= {"after_gpu_write", "host_resident", "baseline"}


@pytest.mark.gpu
@pytest.mark.parametrize("stride", [4096, 2 * MiB])
def test_granularity_point(stride):
    (row,) = _finalized(U.measure_granularity({"nbytes": 64 * MiB, "stride_bytes": stride}))
    x = row["extra"]
    assert row["check_passed"] and x["touches"] == 64 * MiB // stride
    # what crossed the link is not measured: no bytes_moved, so no bandwidth is derived
    assert row.get("bytes_moved") is None and row.get("bandwidth_gbps") is None
    assert 0 <= x["moved_prefetch_estimate"] <= 64 * MiB
    if stride == 4096:  # every page touched: (nearly) everything must have moved, by either measure
        assert x["moved_prefetch_estimate"] > 32 * MiB


@pytest.mark.gpu
@pytest.mark.parametrize("method", U.TRANSFER_METHODS)
def test_transfer_point(method):
    rows = _finalized(U.measure_transfer({"method": method, "nbytes": 64 * MiB}))
    assert [r["extra"]["direction"] for r in rows] == ["h2d", "d2h"]
    assert all(r["check_passed"] and r["bandwidth_gbps"] > 0.5 for r in rows)


# ----------------------------------------------------------------------------- physical guards

def test_no_loaded_link_bandwidth_exceeds_the_links_measured_limit():
    """Issue 14: the committed granularity row stored 84.8 GB/s over a link that carries ~55: its
    bytes were reserved GPU memory, not bytes that crossed. Loaded, it is flagged and carries no
    bandwidth; every other link-crossing rate stays at or below the pinned memcpy limit."""
    from lib.harness import guards

    d = A.load()
    limit = guards.link_limit_gbps(d[d["measurement"] == "transfer"])
    assert 50 < limit < 64
    gran = d[d["measurement"] == "granularity"]
    assert gran["bandwidth_gbps"].isna().all() and gran["pct_of_read_ceiling"].isna().all()
    assert gran["above_link_limit"].sum() == 1  # the 2 MiB stride row, 84.8 GB/s as stored
    crossing = d[A.crosses_link(d)]
    assert (crossing["bandwidth_gbps"].dropna() <= limit * (1 + guards.ROUNDING_RTOL)).all()  # rounding only
    assert not d.loc[~A.crosses_link(d), "above_link_limit"].any()
    # resident reads at HBM speed are not link bandwidths, and keep their numbers
    dev = d[(d["measurement"] == "gpu_read") & (d["memory_kind"] == "device")]
    assert (dev["bandwidth_gbps"] > 2000).all()


def test_the_guard_blanks_a_rate_above_the_limit_on_synthetic_rows(fake_df):
    fast = fake_df.copy()
    i = fast.index[(fast["measurement"] == "gpu_read") & (fast["memory_kind"] == "pinned")][0]
    fast.loc[i, "bandwidth_gbps"] = 500.0  # a pinned read over PCIe cannot run at 500 GB/s
    g = A.with_link_guard(fast)
    assert g.loc[i, "above_link_limit"] and math.isnan(g.loc[i, "bandwidth_gbps"])
    assert not g.drop(index=i)["above_link_limit"].any()


# ----------------------------------------------------------------------------- two cards

H100, H200 = "h100-80gb-hbm3", "h200"


def test_the_guard_does_not_flag_the_row_that_sets_the_limit(fake_df):
    """The limit is recomputed from bytes and time; the stored rate of the same row can exceed it by a
    rounding (it did: the H200's fastest pinned copy, by 7e-15 GB/s), which must not blank it."""
    d = fake_df.copy()
    i = d.index[(d["measurement"] == "transfer") & (d["memory_kind"] == "pinned")]
    d.loc[i, "bandwidth_gbps"] = d.loc[i, "bytes_moved"].astype(float) / (d.loc[i, "median_us"] * 1e3) + 1e-12
    g = A.with_link_guard(d)
    assert not g.loc[i, "above_link_limit"].any() and g.loc[i, "bandwidth_gbps"].notna().all()


def test_committed_h200_rows_keep_every_link_rate_and_store_no_granularity_bandwidth():
    d = A.load()
    h2 = d[d["gpu_slug"] == H200]
    assert not h2["above_link_limit"].any()
    assert h2.loc[h2["measurement"] == "transfer", "bandwidth_gbps"].notna().all()
    raw = A.raw_granularity_bandwidth()
    assert raw[H100] > A.headline(d, H100)["pinned_h2d"]  # issue 14's 84.8 GB/s, above the link
    assert math.isnan(raw[H200])  # the current measurement stores none


def test_hbm_rates_scale_with_the_card_and_link_rates_do_not():
    d = A.load()
    heads = {c: A.headline(d, c) for c in (H100, H200)}
    cmp = A.card_comparison(heads, [H100, H200])
    assert set(cmp["bound"]) == set(A.BOUND_ORDER)
    hbm = cmp.loc[cmp["bound"] == "HBM", "ratio"]
    link = cmp.loc[cmp["bound"] == "link", "ratio"]
    assert (hbm > 1.3).all() and (hbm < 1.7).all()  # datasheet 4800 / 3350 = 1.43
    assert (abs(link - 1) < 0.05).all()  # the same PCIe Gen5 x16 link
    # and no stored rate is above a physical limit: HBM below datasheet, link below the pinned copy
    assert heads[H100]["read_device"] < 3350 and heads[H200]["read_device"] < 4800
    one = A.card_comparison(heads, [H100])
    assert "ratio" not in one.columns and one[H100].notna().any()


def test_run_headlines_show_two_h200_cards_and_their_spread():
    t = A.run_headlines(A.load_runs())
    assert list(t.columns.get_level_values("card")) == ["H100", "H200", "H200"]
    assert t.xs("H200", axis=1, level="card").shape[1] == 2  # two physical cards
    s = A.spread_within(t, "H200")
    assert s["read_device"] < 0.01  # resident reads agree between cards
    assert s["read_fault_touched"] > 10 * s["read_device"]  # fault-driven ones do not
    assert math.isnan(A.spread_within(t, "H100")["read_device"])  # one H100 card: no spread


def test_comparison_numbers_on_synthetic_cards(tmp_path):
    write_fake(tmp_path, slugs=(H100, H200))
    d = A.load(tmp_path)
    n = A.comparison_numbers(d, A.load_runs(tmp_path), [H100, H200], {H100: 3350.0, H200: 4800.0})
    assert n["hbm_lo"] == pytest.approx(1.3) and n["link_hi"] == pytest.approx(1.3)  # fakes scale all
    assert n["sheet_ratio"] == pytest.approx(4800 / 3350)
    assert n["pct_sheet_0"] == pytest.approx(100 * 3000 / 3350)
    assert n["noise_fault_touched_0"] == pytest.approx(100 * 0.08 / 1.0, rel=1e-6)  # p90 1.05, p10 0.97
    assert math.isnan(n["spread_read_device"])  # one run per card: no between-card spread


def test_offload_exercise_picks_one_card():
    """Since the H200 rows exist, kv_offload holds one row per card for each point: the
    exercise's numbers are the chosen card's, and the two cards' differ."""
    a, b = (A.exercise_solutions(A.headline(A.load(), c), c) for c in (H100, H200))
    assert all(math.isfinite(float(s["s_all"])) for s in (a, b))
    assert a["s_all"] != b["s_all"] and "model" in repr(b["s_closer"])


def test_coinciding_reads_are_found_said_and_drawn_apart():
    """Lines that lie on top of each other in the read figure are grouped (within 5% at every card
    and size), named in the caption with their spread, and drawn side by side."""
    rows = []
    for slug in ("card-a", "card-b"):
        for size in (64.0, 1024.0):
            for lab, bw in (("device memory", 3000.0), ("managed, prefetched to GPU", 2970.0),
                            ("managed, ReadMostly copy on GPU", 2400.0 if size == 64 else 2990.0),
                            ("managed on host, mapped (AccessedBy)", 51.0), ("pinned host, zero-copy", 51.1),
                            ("managed, first touch on GPU", 12.0)):
                rows.append({"gpu_slug": slug, "size_mib": size, "label": lab, "bandwidth_gbps": bw,
                             "phase": "cold" if "first touch" in lab else "warm"})
    t = pd.DataFrame(rows)
    groups = A.coinciding_reads(t)
    assert [g["labels"] for g in groups] == [["device memory", "managed, prefetched to GPU"],
                                              ["managed on host, mapped (AccessedBy)", "pinned host, zero-copy"]]
    assert groups[0]["spread"] == pytest.approx(3000 / 2970 - 1)  # ReadMostly's 64 MiB keeps it out
    said = A.coinciding_sentence(groups)
    assert "“device memory” and “managed, prefetched to GPU” read within 1.0%" in said
    assert A.coinciding_sentence([]) == "No two lines coincide."
    fig = F.read_bandwidth_figure(t, [g["labels"] for g in groups])
    xs = {ln.get_label(): ln.get_xdata()[0] for ln in fig.axes[0].get_lines()}
    assert xs["device memory"] < 64 < xs["managed, prefetched to GPU"]  # side by side
    assert xs["managed, first touch on GPU"] == 64  # a line alone stays where it is
    markers = {ln.get_marker() for ln in fig.axes[0].get_lines()}
    assert len(markers) == len(xs)  # one marker each
