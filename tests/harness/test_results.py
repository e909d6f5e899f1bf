"""The results store: schema, crash-safe appends, torn lines, resume keys, loading."""

import json
import multiprocessing as mp
import os
import re

import pandas as pd
import pytest

from lib.harness import results as R


def row(**kw):
    base = {
        "experiment": "t", "point_key": "n=1", "run_id": "r1", "gpu_slug": "cpu", "status": "ok",
        "backend": "b", "protocol": "rigorous", "median_us": 10.0, "p10_us": 9.0, "p90_us": 11.0,
        "samples": 10, "bytes_moved": 1_000_000,
    }
    base.update(kw)
    return base


def path_of(tmp_path, slug="cpu", part=None):
    return R.csv_path("t", slug, part=part, root=tmp_path)


# ----------------------------------------------------------------------------- schema

def test_schema_is_consistent():
    names = [c.name for c in R.SCHEMA]
    assert len(names) == len(set(names))
    assert R.HEADER.split(",") == names + ["crc"]
    assert {c.dtype for c in R.SCHEMA} <= {"str", "int", "float", "bool", "datetime", "json"}
    assert all(c.unit and c.meaning for c in R.SCHEMA)


def test_docstring_table_matches_schema():
    """The schema is documented in one place (the module docstring) and must match the code."""
    doc = {}
    for line in R.__doc__.splitlines():
        m = re.match(r"^([a-z_0-9]+)\s{2,}(str|int|float|bool|datetime|json)\s{2,}(\S+)\s", line)
        if m:
            doc[m.group(1)] = (m.group(2), m.group(3))
    assert list(doc) == list(R.COLUMNS)
    for c in R.SCHEMA:
        assert doc[c.name] == (c.dtype, c.unit), c.name


@pytest.mark.parametrize("name,slug", [
    ("NVIDIA H100 80GB HBM3", "h100-80gb-hbm3"),
    ("NVIDIA H200", "h200"),
    ("Tesla V100-SXM2-16GB", "tesla-v100-sxm2-16gb"),
    ("NVIDIA GeForce RTX 4090", "geforce-rtx-4090"),
])
def test_gpu_slug(name, slug):
    assert R.gpu_slug(name) == slug


def test_gpu_slug_rejects_empty():
    with pytest.raises(ValueError):
        R.gpu_slug("  nvidia  ")


# ----------------------------------------------------------------------------- rows

def test_roundtrip_types_and_derived_columns(tmp_path):
    p = path_of(tmp_path)
    R.append_row(p, row(read_ceiling_gbps=2000.0, check_passed=True, rel_error=1e-3, block_size=16,
                        error=None, extra={"note": 'a, "quoted"\nline', "k": 3}))
    text = p.read_text()
    assert text.startswith(R.HEADER + "\n") and text.count("\n") == 2
    df = R.load("t", root=tmp_path)
    assert len(df) == 1
    r = df.iloc[0]
    assert r["bandwidth_gbps"] == pytest.approx(100.0)  # 1e6 bytes / 10 us = 100 GB/s
    assert r["pct_of_read_ceiling"] == pytest.approx(5.0)
    assert r["check_passed"] is True or bool(r["check_passed"]) is True
    assert r["block_size"] == 16 and str(df["block_size"].dtype) == "Int64"
    assert pd.isna(r["seq_len"])
    assert r["extra"] == {"note": 'a, "quoted"\nline', "k": 3}
    assert str(df["time_utc"].dtype).startswith("datetime64")
    assert "crc" not in df.columns


def test_unknown_column_suggests_and_points_to_extra(tmp_path):
    with pytest.raises(ValueError, match=r"median_sec.*did you mean 'median_us'.*extra"):
        R.append_row(path_of(tmp_path), row(median_sec=1.0))


@pytest.mark.parametrize("bad,match", [
    ({"bandwidth_gbps": 100e3}, "bandwidth_gbps"),  # MB/s where GB/s was meant
    ({"read_ceiling_gbps": 2000.0, "pct_of_read_ceiling": 0.05}, "pct_of_read_ceiling"),  # a fraction, not %
    ({"p10_us": 12.0}, "p10_us"),
    ({"median_us": -1.0}, "median_us"),
    ({"protocol": "fast"}, "protocol"),
    ({"status": "meh"}, "status"),
    ({"run_id": None}, "run_id"),
    ({"block_size": 1.5}, "block_size"),
    ({"check_passed": "maybe"}, "check_passed"),
    ({"extra": [1, 2]}, "extra"),
])
def test_bad_rows_are_refused(tmp_path, bad, match):
    p = path_of(tmp_path)
    with pytest.raises(ValueError, match=match):
        R.append_row(p, row(**bad))
    assert not p.exists()  # nothing half-written


def test_error_rows_skip_unit_checks(tmp_path):
    p = path_of(tmp_path)
    R.append_row(p, {"experiment": "t", "point_key": "n=1", "run_id": "r", "gpu_slug": "cpu",
                     "status": "error", "error": "boom\nsecond line"})
    assert R.load("t", root=tmp_path).empty
    df = R.load("t", root=tmp_path, include_errors=True)
    assert df.iloc[0]["error"] == "boom second line"


def test_rows_of_one_point_are_one_write(tmp_path, monkeypatch):
    writes = []
    real = os.write
    monkeypatch.setattr(R.os, "write", lambda fd, b: writes.append(b) or real(fd, b))
    R.append_rows(path_of(tmp_path), [row(point_key="n=1"), row(point_key="n=1", backend="c")])
    R.append_rows(path_of(tmp_path), [row(point_key="n=2")])
    assert len(writes) == 2
    assert writes[0].count(b"\n") == 3  # header + both rows in the first write


# ----------------------------------------------------------------------------- torn and corrupt lines

def test_torn_trailing_line_is_ignored_and_isolated(tmp_path):
    p = path_of(tmp_path)
    R.append_row(p, row(point_key="n=1"))
    R.append_row(p, row(point_key="n=2"))
    full = R.format_line(R.finalize_row(row(point_key="n=3")))
    with open(p, "ab") as f:  # a power loss in the middle of a write
        f.write(full[: len(full) // 2].encode())
    assert R.done_keys(p) == {"n=1", "n=2"}
    assert len(R.load("t", root=tmp_path)) == 2
    R.append_row(p, row(point_key="n=4"))  # must not glue onto the torn fragment
    raw = R.read_raw(p)
    assert raw.skipped == 1
    assert R.done_keys(p) == {"n=1", "n=2", "n=4"}


def test_corrupt_middle_line_is_skipped(tmp_path):
    p = path_of(tmp_path)
    for n in range(3):
        R.append_row(p, row(point_key=f"n={n}", median_us=10.0 + n, p10_us=9.0, p90_us=20.0))
    lines = p.read_text().split("\n")
    lines[2] = lines[2].replace("11.0", "91.0", 1)  # flipped digits: the CRC no longer matches
    p.write_text("\n".join(lines))
    assert R.done_keys(p) == {"n=0", "n=2"}


def test_wrong_header_is_a_clear_error(tmp_path):
    p = path_of(tmp_path)
    p.parent.mkdir(parents=True)
    p.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="header does not match"):
        R.load("t", root=tmp_path)


def _append_many(args):
    path, k = args
    for i in range(40):
        R.append_row(path, row(point_key=f"w={k};i={i}", run_id=f"r{k}"))


def test_concurrent_appends_to_one_file_stay_whole(tmp_path):
    p = path_of(tmp_path)
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_append_many, [(str(p), k) for k in range(4)])
    raw = R.read_raw(p)
    assert raw.skipped == 0 and len(raw.rows) == 160
    assert p.read_text().count(R.HEADER) == 1


# ----------------------------------------------------------------------------- loading

def test_load_keeps_latest_run_of_a_point(tmp_path):
    p = path_of(tmp_path)
    R.append_row(p, row(point_key="n=1", run_id="old", median_us=10.0, time_utc="2026-01-01T00:00:00Z"))
    R.append_row(p, row(point_key="n=2", run_id="old", median_us=10.0, time_utc="2026-01-01T00:00:01Z"))
    R.append_row(p, row(point_key="n=1", run_id="new", median_us=10.5, p90_us=12.0, time_utc="2026-02-01T00:00:00Z"))
    df = R.load("t", root=tmp_path)
    assert sorted(zip(df["point_key"], df["run_id"])) == [("n=1", "new"), ("n=2", "old")]
    assert len(R.load("t", root=tmp_path, dedupe=False)) == 3


def test_load_filters_gpu_and_expands_extra(tmp_path):
    R.append_row(path_of(tmp_path, "h100-80gb-hbm3"), row(gpu_slug="h100-80gb-hbm3", extra={"tile": 4}))
    R.append_row(path_of(tmp_path, "h200"), row(gpu_slug="h200", extra={"tile": 8}))
    assert set(R.load("t", root=tmp_path)["gpu_slug"]) == {"h100-80gb-hbm3", "h200"}
    df = R.load("t", gpu="h200", root=tmp_path, expand_extra=True)
    assert list(df["tile"]) == [8]
    with pytest.raises(FileNotFoundError, match="have"):
        R.load("t", gpu="a100", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no results for experiment"):
        R.load("nope", root=tmp_path)


def test_load_of_empty_file_has_schema_columns(tmp_path):
    p = path_of(tmp_path)
    p.parent.mkdir(parents=True)
    p.write_text(R.HEADER + "\n")
    df = R.load("t", root=tmp_path)
    assert df.empty and list(df.columns) == [*R.COLUMNS, "memory_state", "provenance_issues"]


def test_load_splits_a_managed_state_out_of_the_memory_kind(tmp_path):
    """Old rows say ``managed_cold`` in one column; new ones say managed + extra memory_state:
    loaded, both read memory_kind = managed, memory_state = cold, and nothing else changes."""
    old = R.finalize_row(row(point_key="a", memory_kind="managed_cold"))
    new = R.finalize_row(row(point_key="b", memory_kind="managed", extra={"memory_state": "cold", "k": 1}))
    dev = R.finalize_row(row(point_key="c", memory_kind="device"))
    R.append_rows(path_of(tmp_path), [old, new, dev])
    df = R.load("t", root=tmp_path).set_index("point_key")
    assert list(df["memory_kind"]) == ["managed", "managed", "device"]
    assert df.loc["a", "memory_state"] == df.loc["b", "memory_state"] == "cold"
    assert pd.isna(df.loc["c", "memory_state"]) and df.loc["b", "extra"] == {"k": 1}


# ----------------------------------------------------------------------------- parts and provenance

def test_parts_are_read_with_main_and_merge_by_concatenation(tmp_path):
    main = path_of(tmp_path)
    R.append_row(main, row(point_key="n=0"))
    for k in (1, 2):
        part = path_of(tmp_path, part=f"s{k}of3")
        R.append_row(part, row(point_key=f"n={k}", run_id=f"r{k}"))
        R.write_provenance(part, f"r{k}", {"k": k})
    assert R.done_keys(main) == {"n=0", "n=1", "n=2"}
    assert len(R.load("t", root=tmp_path)) == 3
    assert set(R.load_provenance("t", root=tmp_path)) == {"r1", "r2"}
    assert R.merge_parts(main) == 2
    assert R.sibling_parts(main) == []
    assert R.read_raw(main).skipped == 0 and len(R.read_raw(main).rows) == 3
    assert json.loads(R.provenance_path(main).read_text()).keys() == {"r1", "r2"}


def test_interrupted_merge_leaves_no_duplicates(tmp_path):
    main = path_of(tmp_path)
    part = path_of(tmp_path, part="d0")
    R.append_row(part, row(point_key="n=1"))
    R._append_bytes(main, part.read_bytes().split(b"\n", 1)[1])  # merged, but the part was not removed
    assert len(R.load("t", root=tmp_path, dedupe=False)) == 2
    assert len(R.load("t", root=tmp_path)) == 1


def test_provenance_accumulates_by_run_id(tmp_path):
    p = path_of(tmp_path)
    R.write_provenance(p, "a", {"x": 1})
    R.write_provenance(p, "b", {"x": 2})
    R.write_provenance(p, "a", {"x": 3})  # the end-of-run update replaces the start record
    assert R.load_provenance("t", root=tmp_path) == {"a": {"x": 3}, "b": {"x": 2}}


def test_schema_markdown_lists_every_column():
    md = R.schema_markdown()
    assert all(f"`{c}`" in md for c in R.COLUMNS)


# ----------------------------------------------------------------------------- provenance issues

def test_load_names_what_is_wrong_in_each_runs_provenance(tmp_path):
    p = path_of(tmp_path)
    R.append_rows(p, [row(point_key="a", run_id="good"), row(point_key="b", run_id="nocommit", backend="vllm"),
                      row(point_key="c", run_id="orphan")])
    R.write_provenance(p, "good", {"git": {"commit": "a" * 40, "dirty": False, "lib_sha256": "f" * 64},
                                   "libraries": {}})
    R.write_provenance(p, "nocommit", {"git": {"commit": None}, "libraries": {"vllm": None},
                                       "provenance_issues": ["clocks: none sampled under load"]})
    df = R.load("t", root=tmp_path).set_index("point_key")
    assert df.loc["a", "provenance_issues"] == ""
    notes = R.provenance_issue_list(df.loc["b", "provenance_issues"])
    assert notes[0] == "clocks: none sampled under load"  # what the run wrote itself, first
    assert "git: no commit recorded" in notes and any(n.startswith("libraries: vllm") for n in notes)
    assert "no provenance record" in df.loc["c", "provenance_issues"]


def test_committed_runs_with_wrong_provenance_are_flagged_and_their_numbers_kept():
    """Issue 14: seed_tables, page_table and uvm_decode record a commit (64affe0) that cannot have
    produced them, uvm records none, vLLM's version is null: the notes come from the committed
    list and the records; the measured numbers are the file's, untouched."""
    import math

    from lib.harness.known_issues import KNOWN_ISSUES

    H100 = "h100-80gb-hbm3"
    for exp in ("seed_tables", "page_table", "uvm_decode"):
        df = R.load(exp, H100)
        assert df["provenance_issues"].str.contains("64affe0").all(), exp
        assert df["provenance_issues"].str.contains("libraries: vllm").all(), exp
        # the H200 runs of 2026-12-02 declare a verified commit and record vLLM: no such notes
        assert not R.load(exp, "h200")["provenance_issues"].str.contains("64affe0|libraries: vllm").any(), exp
    assert R.load("uvm", H100)["provenance_issues"].str.contains("no commit").all()
    assert not R.load("uvm", "h200")["provenance_issues"].str.contains("no commit").any()
    assert R.load("kernel_speed", "h100-80gb-hbm3")["provenance_issues"].str.contains("libraries: vllm").all()
    # the H200 runs record vLLM's and FlashInfer's versions and a verified commit: no such note
    assert not R.load("kernel_speed", "h200")["provenance_issues"].str.contains("vllm").any()
    # every committed note names a run that exists
    for exp, runs in KNOWN_ISSUES.items():
        assert set(runs) <= set(R.load_provenance(exp)), exp
    # the loaded medians are the file's own numbers
    raw = {r["point_key"] + r["backend"]: r["median_us"] for r in
           R.iter_raw([R.csv_path("seed_tables", "h100-80gb-hbm3")]) if r["status"] == "ok"}
    df = R.load("seed_tables", H100)
    for key, med in zip(df["point_key"] + df["backend"], df["median_us"]):
        assert math.isclose(float(raw[key]), med)
