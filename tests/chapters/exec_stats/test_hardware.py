"""The execution-statistics page's card table, on committed provenance and on a synthetic root."""

import json

import pytest

from lib.chapters.exec_stats.hardware import card_table


def test_card_table_counts_runs_per_physical_card(tmp_path):
    d = tmp_path / "kernel_speed"
    d.mkdir()
    prov = {f"2026120{i}T000000Z-ab{w}{i}-d0w{w}": {"gpu": {"name": "NVIDIA H200", "uuid_sha16": f"u{i % 2}",
                                                          "driver_version": "580"},
                                                  "git": {"commit": f"c{i}" * 4}, "time_utc": f"2026-12-0{i}"}
            for i in (1, 2, 3) for w in (0, 1)}
    (d / "h200.json").write_text(json.dumps(prov))
    t = card_table(["kernel_speed", "absent"], root=tmp_path)
    assert list(t["card id (uuid hash)"]) == ["u0", "u1"]
    assert list(t["runs"]) == [1, 2]           # worker suffixes count once
    assert t.iloc[1]["commits"] == "c1c1c1c, c3c3c3c"
    assert t.iloc[1]["dates"] == "2026-12-01 to 2026-12-03"
    with pytest.raises(FileNotFoundError):
        card_table(["absent"], root=tmp_path)


def test_committed_data_names_its_cards():
    t = card_table(["kernel_speed", "correctness"])
    assert {"NVIDIA H100 80GB HBM3", "NVIDIA H200"} <= set(t["card"])
