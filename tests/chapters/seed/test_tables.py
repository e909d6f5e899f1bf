"""The seed's tidy table and the ratios the seed chapter reads from it."""

import pandas as pd
import pytest

from lib.chapters.seed import tables as S


@pytest.fixture(scope="module")
def seed():
    return S.load_seed()


def test_schema_and_row_count(seed):
    assert list(seed.columns) == list(S.COLUMNS)
    assert len(seed) == 51
    assert sorted(seed["table"].unique()) == [1, 2, 3, 4, 5, 6]
    assert seed["time_us"].dtype.kind == "f"
    for col in ("table", "block_size", "seq_len", "batch_size"):
        assert seed[col].dtype.kind == "i", col
    assert (seed["time_us"] > 0).all()
    assert set(seed["block_size"]) == {1, 2, 4, 8, 16, 32}


def test_rows_per_table(seed):
    # The post's tables: 12 cells (uvm + normal), 8, 7, 12 (b32 + b16), 6 (b32 empty), 6.
    assert seed.groupby("table").size().to_dict() == {1: 12, 2: 8, 3: 7, 4: 12, 5: 6, 6: 6}


def _cell(df, table, block, memory="device", seq_len=None, batch=None):
    rows = df[(df["table"] == table) & (df["block_size"] == block) & (df["memory"] == memory)]
    if seq_len is not None:
        rows = rows[rows["seq_len"] == seq_len]
    if batch is not None:
        rows = rows[rows["batch_size"] == batch]
    assert len(rows) == 1
    return float(rows["time_us"].iloc[0])


def test_known_cells(seed):
    assert _cell(seed, 1, 16) == pytest.approx(163.369)
    assert _cell(seed, 1, 16, memory="managed") == pytest.approx(163.439)
    assert _cell(seed, 2, 1, seq_len=1024) == pytest.approx(207.329)
    assert _cell(seed, 3, 8, seq_len=1024) == pytest.approx(68.620)
    assert _cell(seed, 4, 8, batch=32) == pytest.approx(990.562)
    assert _cell(seed, 6, 32) == pytest.approx(184.604)
    # Table 5's batch-32 column is empty in the post: no such rows.
    assert seed[(seed["table"] == 5) & (seed["batch_size"] == 32)].empty


def test_validation_rejects_bad_tables(seed):
    with pytest.raises(ValueError, match="rows"):
        S.validate_seed(seed.iloc[:-1])
    with pytest.raises(ValueError, match="lacks columns"):
        S.validate_seed(seed.drop(columns=["time_us"]))
    bad = seed.copy()
    bad.loc[0, "time_us"] = -1.0
    with pytest.raises(ValueError, match="positive"):
        S.validate_seed(bad)
    bad = seed.copy()
    bad["table"] = bad["table"].replace(6, 7)
    with pytest.raises(ValueError, match="table ids"):
        S.validate_seed(bad)
    bad = seed.copy()
    bad["block_size"] = bad["block_size"].astype(float)
    with pytest.raises(ValueError, match="dtype"):
        S.validate_seed(bad)
    bad = seed.copy()
    bad.loc[0, "memory"] = "pinned"
    with pytest.raises(ValueError, match="unexpected values"):
        S.validate_seed(bad)
    with pytest.raises(ValueError, match="no seed table"):
        S.load_seed("/nonexistent/seed.csv")


def test_parse_and_select_tables(seed):
    assert S.parse_tables("3, 1,1") == [1, 3]
    assert S.parse_tables(4) == [4]
    assert S.parse_tables([6, 5]) == [5, 6]
    for bad in ("", "1,x", "7", [0]):
        with pytest.raises(ValueError):
            S.parse_tables(bad)
    assert set(S.select_tables(seed, "2,3")["table"]) == {2, 3}


def test_wide_table(seed):
    wide = S.wide_table(seed)
    assert list(wide.columns) == [1, 2, 4, 8, 16, 32]
    assert wide.shape == (10, 6)
    assert int(wide.notna().sum().sum()) == 51
    # The post's order inside table 1: "uvm" (managed) first.
    assert wide.loc[1].index.get_level_values("memory").tolist() == ["managed", "device"]


def test_managed_over_device(seed):
    md = S.managed_over_device(seed)
    assert len(md) == 6
    row = md[md["block_size"] == 16].iloc[0]
    assert row["ratio"] == pytest.approx(163.439 / 163.369)
    assert (md["ratio"] - 1).abs().max() == pytest.approx(1 - 238.968 / 239.627)


def test_no_lookup_over_original(seed):
    nl = S.no_lookup_over_original(seed)
    # 6 points at 4096 x 1, the lone 1024 x 1 point (block 8), 6 points at 1024 x 16.
    assert len(nl) == 13
    assert set(zip(nl["seq_len"], nl["batch_size"])) == {(4096, 1), (1024, 1), (1024, 16)}
    lone = nl[(nl["seq_len"] == 1024) & (nl["batch_size"] == 1)]
    assert lone["block_size"].tolist() == [8]
    assert lone["ratio"].iloc[0] == pytest.approx(64.420 / 68.620)
    b16 = nl[(nl["batch_size"] == 16) & (nl["block_size"] == 2)].iloc[0]
    assert b16["ratio"] == pytest.approx(368.940 / 856.398)


def test_no_offset_and_repeat(seed):
    no = S.no_offset_over_original(seed)
    assert len(no) == 6
    assert no.set_index("block_size").loc[16, "ratio"] == pytest.approx(137.137 / 321.019)
    rep = S.repeat_agreement(seed)
    assert rep.set_index("block_size").loc[16, "ratio"] == pytest.approx(173.120 / 163.369)


def test_ratio_rejects_bad_pairs(seed):
    with pytest.raises(ValueError, match="unknown seed table"):
        S.ratio(seed, 9, 1)
    with pytest.raises(ValueError, match="no rows"):
        S.ratio(seed, 2, 3, num_memory="managed")


def test_slowest(seed):
    assert S.slowest_over_fastest(seed, 1) == pytest.approx(1476.911 / 163.369)
    assert S.slowest_block(seed, 1) == 2
    assert S.slowest_block(seed, 4, seq_len=1024, batch_size=16) == 8
    with pytest.raises(ValueError, match="several series"):
        S.slowest_over_fastest(seed, 4)
    with pytest.raises(ValueError, match="no rows"):
        S.slowest_block(seed, 5, batch_size=32)


def test_likely_cache():
    # 1024 blocks x 1 token x 8 KV heads x 128 x fp16, for K and V: 4 MiB.
    assert S.likely_cache_bytes(1) == 4 * 2**20
    assert S.likely_cache_bytes(32) == 128 * 2**20
    assert S.likely_cache_bytes(16, num_blocks=1) == 2 * 16 * 8 * 128 * 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            S.likely_cache_bytes(bad)
    table = S.likely_cache_table()
    assert table["block_size"].tolist() == [1, 2, 4, 8, 16, 32]
    assert table.set_index("block_size").loc[1, "logical_per_physical"] == pytest.approx(4.0)
    assert table.set_index("block_size").loc[4, "cache_MiB"] == pytest.approx(16.0)
    assert isinstance(table, pd.DataFrame)
