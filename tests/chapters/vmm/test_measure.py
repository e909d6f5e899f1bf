"""The vmm_kv experiment: its grid and arena logic on the fake driver, its analysis and figures on
synthetic rows, the chapter end to end on a synthetic results directory (CPU), and one tiny point
of each measurement on a real GPU (marked gpu).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from lib import catalog
from lib import ROOT
from lib.harness import experiments as E
from lib.harness import results as R
from lib.harness import sweep
from lib.chapters.vmm import analysis as A
from lib.chapters.vmm import measure as V
from lib.chapters.vmm import figures as F

from tests.engine.fakes_vmm import FakeVmmDriver, InjectedFault

MiB, GiB = V.MiB, V.GiB
GRAN = 2 * MiB


# ----------------------------------------------------------------------------- the grid

def test_experiment_is_registered_with_the_chapter():
    exp = catalog.get("vmm_kv")
    assert exp.chapter == "chapters/vmm.md" and (ROOT / exp.chapter).exists()
    assert exp.measure == "lib.chapters.vmm.measure:measure_point" and exp.resolve_measure() is V.measure_point
    assert exp.resolve_prepare() is V.precompile_points
    pts = E.expand(catalog.get("vmm_kv"))
    kernel = [p for p in pts if p["measurement"] == "kernel"]
    maps = [p for p in pts if p["measurement"] == "map"]
    assert len(kernel) == 8 and len(maps) == 6
    assert {(p["batch_size"], p["seq_len"]) for p in kernel} == {(32, 4096), (8, 16384)}
    assert {(p["num_heads"], p["num_kv_heads"]) for p in kernel} == {(32, 32), (32, 8)}
    assert {p["block_size"] for p in kernel} == {16, 64}
    for p in kernel:  # every point's cache stays small next to an 80 GB card
        sh = V.kernel_shape(p)
        kv = 2 * sh["batch_size"] * sh["seq_len"] * sh["num_kv_heads"] * sh["head_size"] * 2
        assert V.KERNEL_MEMORY_FACTOR * kv <= 12 * GiB
    for p in maps:  # never more than 2 GiB mapped at once, at the H100/H200 granularity
        n = V.map_chunks(GRAN * p["chunk_multiple"], budget_bytes=p["budget_mib"] * MiB,
                         max_chunks=p["max_chunks"])
        assert 1 <= n and n * GRAN * p["chunk_multiple"] <= V.MAP_MAX_BYTES


def test_kernel_shape_rejects_bad_points():
    p = dict(E.expand(catalog.get("vmm_kv"))[0])
    assert V.kernel_shape(p)["reserve_tokens"] == 32768
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        V.kernel_shape({**p, "num_kv_heads": 5})
    with pytest.raises(ValueError, match="shorter than the sequences"):
        V.kernel_shape({**p, "reserve_tokens": 1024})
    with pytest.raises(ValueError, match="block_size must be an int"):
        V.kernel_shape({**p, "block_size": "16"})


def test_measure_point_rejects_unknown_measurement():
    with pytest.raises(ValueError, match="measurement must be one of"):
        V.measure_point({"measurement": "nope"})


def test_precompile_asks_for_each_module_once(monkeypatch):
    from lib.engine import kernels

    seen = []
    monkeypatch.setattr(kernels, "precompile", lambda keys: seen.append(set(keys)))
    V.precompile_points(E.expand(catalog.get("vmm_kv")))
    assert seen == [{("float16", 16, 128, 1), ("float16", 64, 128, 1),
                     ("float16", 16, 128, 4), ("float16", 64, 128, 4)}]
    seen.clear()
    V.precompile_points([p for p in E.expand(catalog.get("vmm_kv")) if p["measurement"] == "map"])
    assert seen == []


# ----------------------------------------------------------------------------- geometry

def test_classic_block_bytes():
    assert V.classic_block_bytes(32, 128, 16, 2) == 128 * 1024  # the brief's 128 KiB block
    with pytest.raises(ValueError, match="block_size"):
        V.classic_block_bytes(32, 128, 0, 2)


@pytest.mark.parametrize("blocks, block_bytes, chunk, want", [
    (2048, 128 << 10, GRAN, (256 * MiB, 2048)),          # 32768 tokens of block 16, MHA: exact
    (1, 128 << 10, GRAN, (GRAN, 16)),                     # one block still takes a whole chunk
    (100, 96 << 10, GRAN, (12 * MiB, 128)),               # head 96: lcm(96 KiB, 2 MiB) = 6 MiB
])
def test_slot_geometry_is_whole_chunks_and_whole_blocks(blocks, block_bytes, chunk, want):
    slot, per = V.slot_geometry(blocks, block_bytes, chunk)
    assert (slot, per) == want
    assert slot % chunk == 0 and slot % block_bytes == 0 and per * block_bytes == slot and per >= blocks


def test_slot_geometry_rejects_nonsense():
    with pytest.raises(ValueError, match="chunk_bytes"):
        V.slot_geometry(1, 1024, 0)


def test_check_mapped_reads():
    V.check_mapped_reads([0, 16], [256, 100], 16, 16, [16, 7])  # 16 and 7 blocks read, all mapped
    with pytest.raises(ValueError, match="sequence 1 would read blocks 16..22"):
        V.check_mapped_reads([0, 16], [256, 100], 16, 16, [16, 6])
    with pytest.raises(ValueError, match="sequence 1"):
        V.check_mapped_reads([0, 15], [16, 16], 16, 16, [16, 16])  # starts in slot 0
    with pytest.raises(ValueError, match="one entry per sequence"):
        V.check_mapped_reads([0], [16, 16], 16, 16, [1, 1])


# ----------------------------------------------------------------------------- arenas on the fake driver

def test_build_arenas_maps_only_what_each_sequence_holds():
    drv = FakeVmmDriver(granularity=GRAN)
    bb = V.classic_block_bytes(32, 128, 16, 2)  # 128 KiB: 16 blocks per chunk
    lens = [100, 4096, 33]
    pair = V.build_arenas(drv, lens, block_size=16, block_bytes=bb, chunk_bytes=GRAN, reserve_tokens=8192)
    assert pair.blocks_per_slot == 512
    assert pair.seq_first.dtype == np.int32 and pair.seq_first.tolist() == [0, 512, 1024]
    assert pair.seq_blocks.tolist() == [7, 256, 3]
    assert pair.mapped_blocks().tolist() == [16, 256, 16]  # whole chunks
    st = pair.stats()
    assert st["mapped_bytes"] == 2 * (1 + 16 + 1) * GRAN and st["used_bytes"] == 2 * (7 + 256 + 3) * bb
    assert st["reserved_bytes"] == 2 * 3 * 512 * bb and st["slot_bytes"] == 512 * bb
    V.check_mapped_reads(pair.seq_first, lens, 16, pair.blocks_per_slot, pair.mapped_blocks())
    pair.close()
    assert drv.leaks() == {"reservations": 0, "handles": 0, "mappings": 0}


def test_build_arenas_gives_everything_back_when_a_map_fails():
    drv = FakeVmmDriver(granularity=GRAN)
    drv.inject_failure("map", 20)  # during the V arena's growth
    with pytest.raises(InjectedFault):
        V.build_arenas(drv, [4096, 4096], block_size=16, block_bytes=128 << 10, chunk_bytes=GRAN,
                       reserve_tokens=4096)
    assert drv.leaks() == {"reservations": 0, "handles": 0, "mappings": 0}
    with pytest.raises(ValueError, match="reserve_tokens"):
        V.build_arenas(drv, [4096], block_size=16, block_bytes=128 << 10, chunk_bytes=GRAN, reserve_tokens=16)


def test_map_chunks_budget():
    assert V.map_chunks(GRAN) == 64
    assert V.map_chunks(64 * MiB) == 16
    assert V.map_chunks(GRAN, budget_bytes=8 * MiB, max_chunks=100) == 4
    with pytest.raises(ValueError, match="at most 2 GiB"):
        V.map_chunks(GRAN, budget_bytes=3 * GiB)
    with pytest.raises(ValueError, match="exceeds the budget"):
        V.map_chunks(64 * MiB, budget_bytes=32 * MiB)


class _Clock:
    """A fake clock: each read advances 1 µs, so every timed call reads as 1 µs."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1e-6
        return self.t


def test_map_cycle_times_every_operation_and_leaks_nothing():
    drv = FakeVmmDriver(granularity=GRAN)
    written, phases = [], []
    res = V.map_cycle(drv, 4 * MiB, 5, 3, clock=_Clock(), idle=lambda: phases.append("idle"),
                      after_grow=lambda a: written.append(a.stats()["mapped_chunks"]),
                      after_regrow=lambda a: a.stats()["handles_reused"] % 5 == 0)
    n = {op: len(xs) for op, xs in res["samples_us"].items()}
    assert n == {"grow_new": 15, "unmap": 30, "grow_reuse": 15, "release_handle": 15}
    assert all(x == pytest.approx(1.0) for xs in res["samples_us"].values() for x in xs)
    assert written == [5, 5, 5] and phases.count("idle") == 9
    c = res["counts"]
    assert c["handles_created"] == 16 and c["handles_reused"] == 15 and c["handles_released"] == 16
    assert c["live_handles"] == 0 and res["check"] is True and res["data_checked"] is True
    assert drv.calls["create_handle"] == 16 and drv.calls["release_handle"] == 16
    assert drv.leaks() == {"reservations": 0, "handles": 0, "mappings": 0}


def test_map_cycle_reports_a_failed_data_check():
    drv = FakeVmmDriver(granularity=GRAN)
    res = V.map_cycle(drv, GRAN, 2, 1, after_regrow=lambda a: False)
    assert res["check"] is False


def test_map_cycle_closes_the_arena_when_the_driver_fails():
    drv = FakeVmmDriver(granularity=GRAN)
    drv.inject_failure("set_access", 4)
    with pytest.raises(InjectedFault):
        V.map_cycle(drv, GRAN, 3, 2)
    assert drv.leaks() == {"reservations": 0, "handles": 0, "mappings": 0}


# ----------------------------------------------------------------------------- synthetic rows

def fake_rows(slug: str = "fake-h100-80gb", *, paged_slowdown: float = 1.08, scale: float = 1.0,
              check: bool = True) -> list[dict]:
    """One synthetic run of the whole grid, stored the way the sweep stores it (not measured)."""
    rows = []
    for p in E.expand(catalog.get("vmm_kv")):
        base = {"experiment": "vmm_kv", "point_key": E.point_key(p), "run_id": "20990101T000000Z-fake",
                "gpu_slug": slug, "status": "ok", "wall_s": 1.0, "read_ceiling_gbps": 3000.0}
        if p["measurement"] == "kernel":
            kv = 2 * p["batch_size"] * p["seq_len"] * p["num_kv_heads"] * p["head_size"] * 2
            moved = kv + 2 * p["batch_size"] * p["num_heads"] * p["head_size"] * 2
            t_dev = moved / 2500e9 * 1e6 * scale
            bb = V.classic_block_bytes(p["num_kv_heads"], p["head_size"], p["block_size"], 2)
            slot, per = V.slot_geometry(p["reserve_tokens"] // p["block_size"], bb, GRAN)
            for (backend, kind, place), t in ((V.PAGED, t_dev * paged_slowdown), (V.DEVICE_CONTIGUOUS, t_dev),
                                              (V.VMM_CONTIGUOUS, t_dev * 1.003)):
                extra = {"plan": "v2 tile=1"}
                if kind == "vmm":
                    extra.update(granularity=GRAN, chunk_bytes=GRAN, block_bytes=bb, blocks_per_slot=per,
                                 slot_bytes=slot, reserved_bytes=2 * slot * p["batch_size"], mapped_bytes=kv,
                                 used_bytes=kv, internal_waste_bytes=0, kv_bytes=kv, grow_ms=40.0,
                                 copy_ms=12.0, arena_stats={"mapped_chunks": kv // GRAN})
                row = {"backend": backend, "memory_kind": kind, "placement": place,
                       "addressing": "paged" if backend.endswith("paged") else "contiguous",
                       "median_us": t, "p10_us": 0.98 * t, "p90_us": 1.03 * t, "samples": 20,
                       "bytes_moved": moved, "rel_error": 1e-4, "check_passed": check, "extra": extra}
                rows.append(sweep._complete(row, dict(base), p))
        else:
            m = p["chunk_multiple"]
            for op, t in (("grow_new", 40 + 8 * m), ("unmap", 20 + 3 * m), ("grow_reuse", 25 + 4 * m),
                          ("release_handle", 15 + 6 * m)):
                t *= scale
                row = {"backend": op, "memory_kind": "vmm", "protocol": "direct", "median_us": t,
                       "p10_us": 0.9 * t, "p90_us": 1.3 * t, "samples": 64, "bytes_moved": GRAN * m,
                       "check_passed": True,
                       "extra": {"timer": "host_clock", "granularity": GRAN, "chunk_bytes": GRAN * m, "chunks": 16,
                                 "operation": V.MAP_LABELS[op], "reserve_us": 30.0, "noop_grow_us": 2.0,
                                 "driver_call_us": 1.5, "counts": {}, "samples_us": [t] * 4}}
                rows.append(sweep._complete(row, dict(base), p))
    return rows


def write_fake(root, slugs=("fake-h100-80gb",), **kw) -> None:
    for i, slug in enumerate(slugs):
        path = R.csv_path("vmm_kv", slug, root=root)
        path.parent.mkdir(parents=True, exist_ok=True)
        R.append_rows(path, fake_rows(slug, scale=1.0 + 0.5 * i, **kw))
        R.write_provenance(path, "20990101T000000Z-fake", {"gpu": {"name": f"Fake card {slug}"},
                                                           "end": {"wall_s": 95.0}})


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vmm_results")
    write_fake(root)
    return root


def test_load_without_data_says_what_to_do(tmp_path):
    with pytest.raises(A.NoData, match="No vmm_kv measurements.*mode = \"run\""):
        A.load(root=tmp_path)


def test_load_refuses_rows_that_failed_their_check(tmp_path):
    write_fake(tmp_path, check=False)
    with pytest.raises(ValueError, match="failed their check"):
        A.load(root=tmp_path)


def test_kernel_table_lines_up_the_three_series(fake_root):
    rows = A.load(root=fake_root)
    k = A.kernel_table(rows)
    assert len(k) == 8 and set(k["shape"]) == {"MHA 32:32", "GQA 32:8"}
    assert k["paged_over_vmm"].to_numpy() == pytest.approx(1.08 / 1.003)
    assert k["vmm_over_device"].to_numpy() == pytest.approx(1.003)
    assert (k["chunk_bytes"] == GRAN).all() and (k["vmm_gbps"] > 0).all()
    shown = A.kernel_display(k)
    assert list(shown.columns)[-2:] == ["paged / VMM", "VMM / cudaMalloc"]


def test_map_and_growth_arithmetic(fake_root):
    rows = A.load(root=fake_root)
    k, m = A.kernel_table(rows), A.map_table(rows)
    assert len(m) == 24 and list(dict.fromkeys(m["operation"])) == list(V.MAP_OPERATIONS)
    assert A.map_time(m, "fake-h100-80gb", "grow_new", GRAN) == pytest.approx(48.0)
    assert np.isnan(A.map_time(m, "fake-h100-80gb", "grow_new", 3 * GRAN))
    assert A.map_wide(m, "fake-h100-80gb").shape == (6, 4)
    g = A.growth_cost(k, m)
    mha = g[(g["shape"] == "MHA 32:32") & (g["batch_size"] == 32) & (g["block_size"] == 16)].iloc[0]
    assert mha["tokens_per_chunk"] == 256  # 2 MiB / (32 heads x 128 x 2 bytes)
    assert mha["grow_new_step_us"] == pytest.approx(2 * 32 * 48.0 / 256)
    assert mha["grow_new_share"] == pytest.approx(mha["grow_new_step_us"] / mha["vmm_us"])
    shown = A.growth_display(g)
    assert len(shown) == 8 and shown["share, new chunks"].max() == pytest.approx(g["grow_new_share"].max())


def test_growth_per_step():
    assert A.growth_per_step_us(50.0, GRAN, 2048, 8) == pytest.approx(2 * 8 * 50.0 / 1024)
    with pytest.raises(ValueError):
        A.growth_per_step_us(50.0, GRAN, 0, 8)
    with pytest.raises(ValueError):
        A.growth_per_step_us(-1.0, GRAN, 2048, 8)


def test_headline_and_verdicts(fake_root):
    rows = A.load(root=fake_root)
    k, m = A.kernel_table(rows), A.map_table(rows)
    h = A.headline(k, m, A.growth_cost(k, m), "fake-h100-80gb")
    assert h["granularity"] == GRAN and h["largest_chunk"] == 32 * GRAN and h["points"] == 8
    assert h["grow_new_us"] == pytest.approx(48.0) and h["grow_new_big_us"] == pytest.approx(40 + 8 * 32)
    assert h["issue_kv_bytes"] == 2 * GiB and h["issue_paged_over_vmm"] == pytest.approx(1.08 / 1.003)
    say = A.verdicts(h)
    assert say["paged_vs_vmm"].startswith("slower at every point, by about 8%")
    assert say["vmm_vs_device"].startswith("within 2%")
    assert say["paper"].startswith("So a gap of that size does not come from the block table")
    assert say["reuse"].startswith("cheaper than a new one")
    assert say["per_mib"].startswith("falls from 24.0")
    same = A.verdicts({**h, "paged_over_vmm_min": 0.995, "paged_over_vmm_max": 1.01})
    assert same["paged_vs_vmm"].startswith("the same to within 2%")
    assert A.verdicts({})["paged_vs_vmm"] == "—"


def test_waste_frame_puts_blocks_and_chunks_on_one_scale():
    lengths = A.trace_frame(300, 1)["total_tokens"].tolist()
    w = A.waste_frame(lengths)
    assert set(w["shape"]) == {"MHA 32:32", "GQA 32:8"}
    small = w[(w["scheme"] == "vmm") & (w["chunk_bytes"] < GRAN)]
    assert len(small) == 6 and not small["stock_driver"].any()
    # 256 tokens of 32 heads x 128 x 2 bytes are exactly one 2 MiB chunk: the same waste
    assert A.waste_at(w, "MHA 32:32", "paged", block_tokens=256) == pytest.approx(
        A.waste_at(w, "MHA 32:32", "vmm", chunk_bytes=GRAN))
    # a paged block's waste does not depend on the shape; a chunk's does (fewer heads: more tokens)
    assert A.waste_at(w, "MHA 32:32", "paged", block_tokens=16) == A.waste_at(w, "GQA 32:8", "paged", block_tokens=16)
    assert A.waste_at(w, "GQA 32:8", "vmm", chunk_bytes=GRAN) > A.waste_at(w, "MHA 32:32", "vmm", chunk_bytes=GRAN)
    with pytest.raises(ValueError, match="expected one waste row"):
        A.waste_at(w, "MHA 32:32", "paged", block_tokens=3)
    assert A.chunk_sizes(GRAN)[:4] == [64 << 10, 128 << 10, 256 << 10, GRAN]
    s = A.summary_numbers(A.trace_frame(300, 1))
    assert s["num_requests"] == 300 and s["total_median"] > s["prompt_median"]


def test_figures_draw(fake_root):
    rows = A.load(root=fake_root)
    k, m = A.kernel_table(rows), A.map_table(rows)
    tr = A.trace_frame(200, 0)
    figs = [F.arena_diagram(), F.kernel_figure(k), F.map_figure(m), F.trace_figure(tr),
            F.waste_figure(A.waste_frame(tr["total_tokens"].tolist()))]
    assert all(isinstance(f, Figure) and f.axes for f in figs)
    assert len(figs[1].axes) == 2 and len(figs[2].axes) == 2  # two (batch, tokens) panels; two views
    with pytest.raises(ValueError, match="needs columns"):
        F.kernel_figure(pd.DataFrame({"gpu_slug": ["x"]}))
    with pytest.raises(ValueError, match="no rows for gpu"):
        F.map_figure(m, gpu="another")


# ----------------------------------------------------------------------------- the chapter

def _run_chapter(tmp_path, results_root: str):
    pytest.importorskip("papermill")
    out = tmp_path / "vmm.ipynb"
    code = (
        "import jupytext, papermill\n"
        f"nb = jupytext.read({str(ROOT / 'chapters' / 'vmm.md')!r})\n"
        f"jupytext.write(nb, {str(tmp_path / 'in.ipynb')!r})\n"
        f"papermill.execute_notebook({str(tmp_path / 'in.ipynb')!r}, {str(out)!r}, "
        f"parameters={{'results_root': {results_root!r}, 'num_requests': 400}}, "
        f"cwd={str(ROOT / 'chapters')!r}, progress_bar=False, kernel_name='python3')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, out


def _glued(nb: dict) -> dict[str, str]:
    out = {}
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            name = o.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                data = o.get("data", {})
                text = next((v for k, v in data.items() if k.endswith("text/plain")), "")
                out[name] = "".join(text) if isinstance(text, list) else str(text)
    return out


@pytest.mark.slow
def test_chapter_fails_clearly_without_data(tmp_path):
    proc, _ = _run_chapter(tmp_path, str(tmp_path / "empty"))
    assert proc.returncode != 0
    assert "No vmm_kv measurements" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_chapter_runs_on_synthetic_data(tmp_path):
    root = tmp_path / "results"
    write_fake(root, slugs=("fake-h100-80gb", "a-h200-141gb"))  # the slower H200 sorts first by name
    proc, out = _run_chapter(tmp_path, str(root))
    assert proc.returncode == 0, proc.stderr[-4000:]
    g = _glued(json.loads(out.read_text()))
    assert g["vm_card"] == "Fake card a-h200-141gb" and g["vm_gran_mib"] == "2.0"
    assert float(g["vm_grow_new_us"]) == pytest.approx(48.0 * 1.5)  # that card's own map times
    assert float(g["vm_issue_ratio"]) == pytest.approx(1.08 / 1.003)
    assert g["vm_say_paged"].startswith("slower at every point")
    assert float(g["vm_w_mha_tokens"]) == 256 and float(g["vm_w_gqa_tokens"]) == 1024
    assert int(g["vm_tr_n"]) == 400


# ----------------------------------------------------------------------------- on a GPU (tiny points)

def _finalized(rows) -> list[dict]:
    """Rows as the sweep would store them: they must pass the results schema."""
    base = {"experiment": "vmm_kv", "point_key": "test", "run_id": "test", "gpu_slug": "test", "status": "ok"}
    return [R.finalize_row({**base, **r}) for r in rows]


@pytest.mark.gpu
def test_kernel_point_on_the_gpu():
    pytest.importorskip("cuda.bindings")
    point = {"measurement": "kernel", "batch_size": 3, "seq_len": 700, "num_heads": 32, "num_kv_heads": 8,
             "head_size": 128, "block_size": 16, "dtype": "float16", "chunk_multiple": 1,
             "reserve_tokens": 2048, "protocol": "rigorous", "seed": 0}
    rows = _finalized(V.measure_point(point))
    kinds = [(r["backend"], r["memory_kind"], r["placement"]) for r in rows]
    assert kinds == [V.PAGED, V.DEVICE_CONTIGUOUS, V.VMM_CONTIGUOUS]
    assert all(r["check_passed"] and r["median_us"] > 0 and r["rel_error"] < 2e-3 for r in rows)
    x = rows[2]["extra"]
    block_bytes = 8 * 128 * 16 * 2
    assert x["chunk_bytes"] % x["granularity"] == 0 and x["block_bytes"] == block_bytes
    assert x["used_bytes"] == 2 * 3 * 44 * block_bytes  # 700 tokens: 44 blocks of 16, K and V
    assert x["mapped_bytes"] == 2 * 3 * -(-44 * block_bytes // x["chunk_bytes"]) * x["chunk_bytes"]
    assert x["reserved_bytes"] == 2 * 3 * x["slot_bytes"] and x["slot_bytes"] >= 128 * block_bytes
    assert x["arena_stats"]["live_handles"] == x["mapped_bytes"] // x["chunk_bytes"]


@pytest.mark.gpu
def test_map_point_on_the_gpu():
    pytest.importorskip("cuda.bindings")
    rows = _finalized(V.measure_point({"measurement": "map", "chunk_multiple": 2, "rounds": 1,
                                       "max_chunks": 4, "budget_mib": 64}))
    assert [r["backend"] for r in rows] == list(V.MAP_OPERATIONS)
    for r in rows:
        x = r["extra"]
        assert r["check_passed"] is True and r["protocol"] == "direct" and r["median_us"] > 0
        assert x["chunk_bytes"] == 2 * x["granularity"] and x["chunks"] == 4
        # a driver call moves no bytes over any link: no bytes_moved, no bandwidth, no % of ceiling
        assert r.get("bytes_moved") is None and r.get("bandwidth_gbps") is None
        assert r.get("pct_of_read_ceiling") is None
        assert x["counts"]["live_handles"] == 0
    assert [r["samples"] for r in rows] == [4, 8, 4, 4]


def test_committed_driver_call_rows_carry_no_bandwidth():
    """Issue 14: the map rows stored the chunk size as bytes moved, which gave driver calls a
    bandwidth and a percent of the read ceiling (up to 105 %). Loaded, they carry neither; the
    kernel rows keep theirs."""
    rows = A.load()
    calls, kernels = rows[rows["measurement"] == "map"], rows[rows["measurement"] == "kernel"]
    assert len(calls) and calls[["bytes_moved", "bandwidth_gbps", "pct_of_read_ceiling"]].isna().all().all()
    assert calls["chunk_bytes"].notna().all()  # the chunk size is still there, as what it is
    assert len(kernels) and (kernels["bandwidth_gbps"] > 1000).all()
