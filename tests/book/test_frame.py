"""The chapter frame: mode = "run" says plainly when it replays and how to force a measurement;
card facts label their clock and carry the datasheet and the provenance notes."""

import pytest

from lib.book import frame
from lib.harness import experiments as E
from lib.harness import results as R

FAST = {"sleep_s": [0.0], "n": [1, 2]}


def test_run_mode_on_a_measured_card_says_it_replays_and_how_to_force(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(frame.FORCE_ENV, raising=False)
    first = frame.measure_if_asked(E.SELFTEST, "run", str(tmp_path), FAST)
    assert first.points_done == 4 and "REPLAYS" not in capsys.readouterr().out
    again = frame.measure_if_asked(E.SELFTEST, "run", str(tmp_path), FAST)
    text = capsys.readouterr().out
    assert again.replayed and "REPLAYS" in text and f"{frame.FORCE_ENV}=1" in text and "--force" in text
    monkeypatch.setenv(frame.FORCE_ENV, "1")
    forced = frame.measure_if_asked(E.SELFTEST, "run", str(tmp_path), FAST)
    assert forced.points_done == 4 and not forced.replayed  # a new run ...
    rows = R.load("selftest", root=tmp_path)
    assert set(rows["run_id"]) == set(forced.run_ids)  # ... which supersedes the old rows
    assert frame.measure_if_asked(E.SELFTEST, "replay", str(tmp_path), FAST) is None
    with pytest.raises(ValueError, match="mode"):
        frame.measure_if_asked(E.SELFTEST, "rerun", str(tmp_path), FAST)


def test_card_facts_of_the_committed_seed_run_name_an_idle_clock_and_the_datasheet():
    f = frame.card_facts("h100-80gb-hbm3")
    assert f["sm_clock_mhz"] == 345 and f["sm_clock_label"].startswith("idle")  # the glued value, labelled
    assert f["datasheet_hbm_gbps"] == 3350.0 and f["read_gbps"] < f["datasheet_hbm_gbps"]
    assert "64affe0" in f["provenance_issues"]


def test_card_facts_prefer_the_clock_under_load(tmp_path):
    p = R.csv_path("selftest", "cpu", root=tmp_path)
    R.write_provenance(p, "20300101T000000Z-aaaaaa", {
        "gpu": {"name": "NVIDIA H200"}, "snapshot_before": {"sm_clock_mhz": 345},
        "clocks_under_load": {"label": "x", "n": 9, "sm_clock_mhz": {"median": 1980.0, "min": 1900.0, "max": 1980.0}},
        "git": {"commit": "a" * 40, "dirty": False, "lib_sha256": "b" * 64}, "graph_floor": {"median_us": 2.5}})
    f = frame.card_facts("cpu", root=tmp_path, experiment="selftest")
    assert (f["sm_clock_mhz"], f["sm_clock_label"]) == (1980.0, "under load")
    assert f["datasheet_hbm_gbps"] == 4800.0 and f["graph_floor_us"] == 2.5 and f["provenance_issues"] == ""


def test_provenance_note_lists_each_note_once():
    import pandas as pd

    sep = R.ISSUE_SEPARATOR
    rows = pd.DataFrame({"provenance_issues": [f"git: a{sep}clocks: b", "git: a", ""]})
    assert frame.provenance_note(rows) == ("The provenance of these measurements is incomplete or wrong "
                                           "until they are re-measured: git: a; clocks: b.")
    assert frame.provenance_note(rows.iloc[[2]]) == ""


def test_plain_text_survives_the_glue_roles_literal_eval():
    import ast

    from lib.book.frame import Plain

    for text in ("1.000", "1,024", "0.50", "NVIDIA H200", "12", "v3 tile=8"):
        shown = repr(Plain(text))
        try:
            out = str(ast.literal_eval(shown))
        except (SyntaxError, ValueError):
            out = shown
        assert out.replace("\u2060", "") == text, text


def test_card_slugs_put_known_cards_first_in_book_order():
    import pandas as pd

    rows = pd.DataFrame({"gpu_slug": ["zz-card", "h200", "h100-80gb-hbm3", "h200", None]})
    assert frame.card_slugs(rows) == ["h100-80gb-hbm3", "h200", "zz-card"]
    assert frame.card_label("h100-80gb-hbm3") == "H100" and frame.card_label("zz-card") == "zz-card"


def test_with_physical_card_reads_each_runs_uuid_hash(tmp_path):
    import pandas as pd

    csv = R.csv_path("demo", "h200", root=tmp_path)
    csv.parent.mkdir(parents=True)
    R.write_provenance(csv, "run-a", {"gpu": {"uuid_sha16": "aaaa"}})
    R.write_provenance(csv, "run-b", {"gpu": {}})
    rows = pd.DataFrame({"run_id": ["run-a", "run-b", "run-c"]})
    got = frame.with_physical_card(rows, "demo", root=tmp_path)
    assert got["card_id"].tolist() == ["aaaa", "", ""]


def test_single_point_keeps_the_point_with_most_rows():
    import pandas as pd

    df = pd.DataFrame({"point_key": ["a", "b", "b", "b", "a"], "backend": list("xyzwv")})
    assert frame.single_point(df)["point_key"].eq("b").all()
    assert len(frame.single_point(df[df["point_key"] == "a"])) == 2


def test_kernels_used_reads_the_launch_plan():
    import pandas as pd

    df = pd.DataFrame({"backend": ["own-auto-paged", "own-auto-paged", "vllm", "own-auto-paged"],
                       "extra": ['{"plan": "v3 tile=8"}', {"plan": "v2 tile=4"}, '{"plan": "v1"}', None]})
    assert frame.kernels_used(df) == "v2, v3"
    assert frame.kernels_used(df, backend="sdpa_dense") == "unknown"
