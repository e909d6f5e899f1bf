"""Experiment grids: expansion, point keys, parameter parsing, shards."""

import itertools

import pytest

from lib import catalog
from lib.chapters.page_table import experiment as PT
from lib.harness import experiments as E


def exp(**kw):
    base = dict(
        name="demo", description="d", measure="lib.harness.experiments:_selftest_measure",
        grid={"block_size": [16, 1], "seq_len": [1024, 4096], "variant": ["paged", "contiguous"],
              "scale": [0.5], "flag": [False]},
    )
    base.update(kw)
    return E.Experiment(**base)


def test_expand_is_the_product_in_grid_order():
    pts = E.expand(exp())
    assert len(pts) == 2 * 2 * 2
    assert pts[0] == {"block_size": 16, "seq_len": 1024, "variant": "paged", "scale": 0.5, "flag": False}
    assert [p["block_size"] for p in pts] == [16] * 4 + [1] * 4  # first key varies slowest
    assert pts == E.expand(exp())  # deterministic


def test_point_key_is_sorted_and_typed():
    p = {"seq_len": 1024, "block_size": 16, "flag": True, "scale": 0.5, "x": None}
    assert E.point_key(p) == "block_size=16;flag=true;scale=0.5;seq_len=1024;x=none"
    assert E.point_key(dict(reversed(list(p.items())))) == E.point_key(p)


def test_overrides_accept_values_lists_and_cli_strings():
    e = exp()
    assert {p["seq_len"] for p in E.expand(e, {"seq_len": 2048})} == {2048}
    assert {p["seq_len"] for p in E.expand(e, {"seq_len": "512,2048"})} == {512, 2048}
    assert {p["seq_len"] for p in E.expand(e, {"seq_len": ["8"]})} == {8}
    over = E.parse_params(e, ["block_size=1,2,4", "scale=0.25", "flag=yes", "variant=paged"])
    assert over == {"block_size": [1, 2, 4], "scale": [0.25], "flag": [True], "variant": ["paged"]}
    pts = E.expand(e, over)
    assert len(pts) == 3 * 2
    assert all(isinstance(p["block_size"], int) and isinstance(p["scale"], float) for p in pts)


@pytest.mark.parametrize("item,match", [
    ("seqlen=4", "did you mean 'seq_len'"),
    ("block_size=abc", "not a valid int"),
    ("block_size=1.5", "not a valid int"),
    ("flag=maybe", "not a valid bool"),
    ("scale=", "empty value"),
    ("scale", "name=value"),
    ("variant=a;b", "not a valid str"),
])
def test_bad_params_are_clear(item, match):
    with pytest.raises(ValueError, match=match):
        E.parse_params(exp(), [item])


def test_param_given_twice_is_an_error():
    with pytest.raises(ValueError, match="given twice"):
        E.parse_params(exp(), ["seq_len=1", "seq_len=2"])


def test_unknown_experiment_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown experiment 'seltest'; did you mean 'selftest'"):
        catalog.get("seltest")


def test_union_of_grids_dedupes_and_where_filters():
    e = exp(grid=[{"a": [1, 2], "b": ["x"]}, {"a": [2, 3], "b": ["x", "y"]}],
            where=lambda p: not (p["a"] == 3 and p["b"] == "y"))
    keys = [E.point_key(p) for p in E.expand(e)]
    assert keys == ["a=1;b=x", "a=2;b=x", "a=2;b=y", "a=3;b=x"]
    # an override applies to every sub-grid that has the parameter
    assert {p["a"] for p in E.expand(e, {"a": 7})} == {7}


def test_int_and_float_values_coerce_to_float():
    e = exp(grid={"x": [1, 2.5]})
    assert E.expand(e, {"x": "3"}) == [{"x": 3.0}]
    assert isinstance(E.expand(e, {"x": "3"})[0]["x"], float)


@pytest.mark.parametrize("grid,match", [
    ({"a": []}, "no values"),
    ({"a": [1, "x"]}, "mixes value types"),
    ({"a": [[1]]}, "not a scalar"),
    ({"a": ["x;y"]}, "may not contain"),
    ({"not valid": [1]}, "identifier"),
])
def test_check_refuses_bad_grids(grid, match):
    with pytest.raises(ValueError, match=match):
        E.check(exp(name="bad-grid-test", grid=grid))


def test_catalog_names_each_experiment_once_by_its_own_name():
    assert all(name == e.name for name, e in catalog.EXPERIMENTS.items())
    assert len(catalog.EXPERIMENTS) == 9


def test_resolve_measure_lazily_and_clearly():
    assert catalog.get("selftest").resolve_measure() is E._selftest_measure
    with pytest.raises(ImportError, match="cannot load measure"):
        exp(measure="lib.nope:f").resolve_measure()
    with pytest.raises(ValueError, match="pkg.module:function"):
        exp(measure="lib.harness.experiments").resolve_measure()


@pytest.mark.parametrize("n_points,n", [(16, 1), (16, 3), (16, 16), (5, 7), (0, 2), (100, 9)])
def test_shards_cover_every_point_exactly_once(n_points, n):
    points = [{"i": i} for i in range(n_points)]
    shards = [E.shard(points, i, n) for i in range(n)]
    flat = [E.point_key(p) for p in itertools.chain(*shards)]
    assert sorted(flat) == sorted(E.point_key(p) for p in points)
    assert len(flat) == len(set(flat))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # round-robin keeps shards balanced


@pytest.mark.parametrize("text", ["2/2", "-1/2", "0/0", "a/2", "1", "1/2/3", ""])
def test_bad_shards_are_refused(text):
    with pytest.raises(ValueError, match="shard"):
        E.parse_shard(text)


def test_parse_shard_is_zero_based():
    assert E.parse_shard("0/4") == (0, 4)
    assert E.parse_shard("3/4") == (3, 4)


def test_selftest_measure_is_deterministic_and_can_fail():
    p = {"n": 3, "variant": "b", "sleep_s": 0.0, "fail_n": 0}
    assert E._selftest_measure(p) == E._selftest_measure(p)
    assert E._selftest_measure(p)["median_us"] == 30.5
    with pytest.raises(RuntimeError, match="planned failure"):
        E._selftest_measure({**p, "fail_n": 3})


def test_page_table_grid_skips_caches_that_would_not_fit():
    pts = E.expand(catalog.get("page_table"))
    assert pts and all(PT.kv_fits(p) for p in pts)
    biggest = max(2 * p["batch_size"] * p["seq_len"] * p["num_kv_heads"] * 128 * 2 for p in pts)
    assert biggest <= PT.MAX_KV_BYTES
    assert {(1, 32768), (256, 512)} <= {(p["batch_size"], p["seq_len"]) for p in pts}


def test_seed_tables_are_a_two_by_two_factorial_that_keeps_the_committed_points():
    """{seed, rigorous timing} x {the seed's 1024 reused random blocks, distinct blocks}: every
    point in all four arms; the committed run's two arms keep their point keys (they resume)."""
    from lib.chapters.seed_repro.experiment import ARMS, SEED_BACKENDS, TABLES, VLLM2024_BACKENDS
    from lib.harness import results as R

    every = E.expand(catalog.get("seed_tables"))
    assert len(every) == 768  # the first grid, and vLLM 2024's sub-grid on the same points
    pts = [p for p in every if p["backends"] == SEED_BACKENDS]
    vllm2024 = E.expand(catalog.get("seed_tables"), {"backends": VLLM2024_BACKENDS})
    assert len(vllm2024) == 384 and {p["backends"] for p in vllm2024} == {VLLM2024_BACKENDS}
    strip = lambda p: {k: v for k, v in p.items() if k != "backends"}  # noqa: E731
    assert sorted(map(str, map(strip, vllm2024))) == sorted(map(str, map(strip, pts)))
    assert len(pts) == 384 and sum(p["num_heads"] == 64 for p in pts) == 192
    arm = lambda p: (p["protocol"], p["placement"], p["physical_blocks"])  # noqa: E731
    want = {(t, *TABLES[d]) for t, d in ARMS}
    assert len(want) == 4 and {arm(p) for p in pts} == want
    rest = lambda p: tuple(sorted((k, v) for k, v in p.items()  # noqa: E731
                                  if k not in ("protocol", "placement", "physical_blocks")))
    by_point: dict = {}
    for p in pts:
        by_point.setdefault(rest(p), set()).add(arm(p))
    assert len(by_point) == 96 and all(arms == want for arms in by_point.values())
    committed = R.load("seed_tables", "h100-80gb-hbm3", include_errors=True)
    diagonal = {("seed", "random", 1024), ("rigorous", "identity", 0)}
    keys = {E.point_key(p) for p in pts if arm(p) in diagonal}
    assert set(committed["point_key"]) == keys  # the H100's 192 points are the diagonal arms
    h200 = R.load("seed_tables", "h200", include_errors=True)
    assert {E.point_key(p) for p in pts} <= set(h200["point_key"])  # the H200 ran all four arms


@pytest.mark.parametrize("name", ["kernel_speed", "seed_tables", "page_table", "uvm_decode", "uvm",
                                  "vmm_kv", "kv_offload"])
def test_every_committed_point_is_a_point_of_its_grid(name):
    """The grids moved into the chapter packages: the committed rows must still resume."""
    from lib.harness import results as R

    keys = {E.point_key(p) for p in E.expand(catalog.get(name))}
    committed = set(R.load(name, include_errors=True)["point_key"])
    assert committed and committed <= keys, sorted(committed - keys)[:3]


def test_a_selector_override_picks_sub_grids_instead_of_relabelling_them():
    exp = E.Experiment(name="sel", description="", measure="x:y", selectors=("kind",),
                       grid=[{"kind": ["read"], "size": [1, 2]}, {"kind": ["copy"], "method": ["a", "b"]}])
    plain = {E.point_key(p) for p in E.expand(exp)}
    reads = E.expand(exp, {"kind": "read"})
    assert [p["size"] for p in reads] == [1, 2] and all(p["kind"] == "read" for p in reads)
    assert {E.point_key(p) for p in reads} <= plain
    assert len(E.expand(exp, {"kind": "read,copy"})) == 4
    assert E.expand(exp, {"kind": "read", "size": 2}) == [{"kind": "read", "size": 2}]
    assert E.expand(exp, {"kind": "neither"}) == []
    # without the selector, an override relabels every sub-grid (the old behaviour)
    loose = E.Experiment(name="loose", description="", measure="x:y", grid=exp.grid)
    assert any("method" in p and p["kind"] == "read" for p in E.expand(loose, {"kind": "read"}))


def test_uvm_only_parameter_measures_grid_points_only():
    from lib.chapters.uvm.measure import overrides

    grid = {E.point_key(p) for p in E.expand(catalog.UVM)}
    only = E.expand(catalog.UVM, overrides(only="gpu_read"))
    assert only and all(p["measurement"] == "gpu_read" for p in only)
    assert {E.point_key(p) for p in only} <= grid
