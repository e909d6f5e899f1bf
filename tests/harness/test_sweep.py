"""Sweeps: resume after a kill, no duplicates, shards, worker processes, errors."""

import collections
import os
import signal
import subprocess
import sys
import time

import pytest

from lib import catalog
from lib import ROOT
from lib.harness import experiments as E
from lib.harness import results as R
from lib.harness import sweep as S

FAST = {"sleep_s": 0.0}
ALL_KEYS = {E.point_key(p) for p in E.expand(catalog.get("selftest"), FAST)}


def csv_of(tmp_path):
    return R.csv_path("selftest", "cpu", root=tmp_path)


def test_sweep_writes_every_point_then_resumes(tmp_path):
    s = S.run_sweep(E.SELFTEST, FAST, out_dir=tmp_path, progress=False)
    assert (s.points_total, s.points_done, s.rows, s.errors) == (16, 16, 16, 0)
    assert s.completed and len(s.run_ids) == 1
    df = R.load("selftest", root=tmp_path)
    assert set(df["point_key"]) == ALL_KEYS
    # point parameters that are not schema columns land in extra; measured extras stay
    assert df.iloc[0]["extra"]["variant"] in ("a", "b") and "square" in df.iloc[0]["extra"]
    again = S.run_sweep(E.SELFTEST, FAST, out_dir=tmp_path, progress=False)
    assert (again.points_done, again.points_skipped) == (0, 16)
    assert again.replayed and "already measured" in again.line()
    assert "replayed" in again.line() and "--force" in again.line()  # says so, and how to measure anew
    prov = R.load_provenance("selftest", root=tmp_path)
    (run,) = prov.values()
    assert run["status"] == "complete" and run["end"]["points"] == 16
    assert run["params"]["overrides"] == {"sleep_s": [0.0]}
    assert run["git"]["lib_sha256"] and "libraries" in run["end"]
    assert isinstance(run["provenance_issues"], list)


def test_a_partly_measured_grid_says_what_it_did_not_measure(tmp_path):
    S.run_sweep(E.SELFTEST, {**FAST, "n": 1}, out_dir=tmp_path, progress=False)
    s = S.run_sweep(E.SELFTEST, {**FAST, "n": [1, 2]}, out_dir=tmp_path, progress=False)
    assert (s.points_done, s.points_skipped) == (2, 2) and not s.replayed
    assert "2 points already measured were not measured again" in s.line() and "--force" in s.line()


def test_force_measures_again_and_loader_keeps_newest(tmp_path):
    S.run_sweep(E.SELFTEST, {**FAST, "n": 1}, out_dir=tmp_path, progress=False)
    s = S.run_sweep(E.SELFTEST, {**FAST, "n": 1}, out_dir=tmp_path, progress=False, force=True)
    assert s.points_done == 2
    assert len(R.load("selftest", root=tmp_path, dedupe=False)) == 4
    df = R.load("selftest", root=tmp_path)
    assert len(df) == 2 and set(df["run_id"]) == {s.run_ids[0]}


def test_failed_points_are_recorded_and_retried(tmp_path):
    over = {**FAST, "fail_n": 3}
    s = S.run_sweep(E.SELFTEST, over, out_dir=tmp_path, progress=False)
    assert (s.points_done, s.errors) == (16, 2)
    errs = R.load("selftest", root=tmp_path, include_errors=True).query("status == 'error'")
    assert len(errs) == 2 and errs["error"].str.contains("planned failure").all()
    s2 = S.run_sweep(E.SELFTEST, over, out_dir=tmp_path, progress=False)
    assert (s2.points_done, s2.points_skipped) == (2, 14)  # only the failed ones again


def test_a_bad_row_becomes_an_error_row(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "_selftest_measure", lambda p: {"median_us": 1.0, "bandwith": 3})
    s = S.run_sweep(E.SELFTEST, {**FAST, "n": 1}, out_dir=tmp_path, progress=False)
    assert s.errors == 2
    df = R.load("selftest", root=tmp_path, include_errors=True)
    assert df["error"].str.contains("did you mean 'bandwidth_gbps'").all()


def test_shards_together_measure_the_grid_once(tmp_path):
    n = 3
    for i in range(n):
        S.run_sweep(E.SELFTEST, FAST, shard=(i, n), out_dir=tmp_path, progress=False)
    parts = R.sibling_parts(csv_of(tmp_path))
    assert [p.name for p in parts] == [f"cpu.part-s{i}of{n}.csv" for i in range(n)]
    keys = [r["point_key"] for r in R.iter_raw(parts)]
    assert collections.Counter(keys) == collections.Counter(ALL_KEYS)
    # a shard rerun finds its points done, also after the merge
    assert S.run_sweep(E.SELFTEST, FAST, shard="1/3", out_dir=tmp_path, progress=False).points_done == 0
    R.merge_parts(csv_of(tmp_path))
    assert R.sibling_parts(csv_of(tmp_path)) == []
    assert set(R.load("selftest", root=tmp_path)["point_key"]) == ALL_KEYS
    assert len(R.load_provenance("selftest", root=tmp_path)) == n


def test_one_worker_process_per_device(tmp_path):
    s = S.run_sweep(E.SELFTEST, FAST, devices=[0, 1], out_dir=tmp_path, progress=False)
    assert (s.workers, s.points_done, s.rows) == (2, 16, 16)
    assert len(s.run_ids) == 2 and all(r.endswith(("-d0", "-d1")) for r in s.run_ids)
    assert R.sibling_parts(csv_of(tmp_path)) == []  # merged into the main file
    df = R.load("selftest", root=tmp_path)
    assert set(df["point_key"]) == ALL_KEYS and len(df) == 16
    prov = R.load_provenance("selftest", root=tmp_path)
    assert sorted(p["params"]["device"] for p in prov.values()) == [0, 1]


def test_bad_devices_are_refused():
    for bad in ("a,b", [0, 0], [-1], []):
        with pytest.raises(ValueError, match="devices"):
            S._check_devices(bad)


def test_gpu_experiment_without_gpu_is_a_clear_error(tmp_path, monkeypatch):
    from lib.engine.gpu import gpu_available

    if gpu_available():
        pytest.skip("a GPU is visible")
    e = E.Experiment(name="needs-gpu", description="d", measure="lib.harness.experiments:_selftest_measure",
                     grid={"n": [1]}, gpu=True)
    monkeypatch.setitem(catalog.EXPERIMENTS, e.name, e)
    with pytest.raises(S.NeedsGPU, match="needs a CUDA GPU"):
        S.run_sweep(e, out_dir=tmp_path, progress=False)


def test_killed_sweep_resumes_without_duplicates_or_losses(tmp_path):
    """SIGKILL a sweep mid-way, rerun it: every point exactly once, nothing measured is lost."""
    cmd = [sys.executable, "-m", "lib", "sweep", "selftest", "-p", "sleep_s=0.1",
           "--out", str(tmp_path), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    path = csv_of(tmp_path)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if path.exists() and len(R.read_raw(path).rows) >= 4:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the sweep wrote no rows in 30 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = R.read_raw(path).rows
    assert 4 <= len(before) < 16, "the kill should land mid-sweep"
    prov = R.load_provenance("selftest", root=tmp_path)
    assert [p["status"] for p in prov.values()] == ["running"]  # a killed run says so

    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    after = R.read_raw(path)
    assert after.skipped == 0
    keys = [dict(zip(R.COLUMNS, f))["point_key"] for f in after.rows]
    want = {E.point_key(p) for p in E.expand(catalog.get("selftest"), {"sleep_s": 0.1})}
    assert collections.Counter(keys) == collections.Counter(want)  # each point once
    assert all(f in after.rows for f in before)  # earlier rows untouched
    assert f"measured {16 - len(before)} points" in r.stdout


def test_timed_experiments_refuse_shared_gpu_workers(tmp_path):
    with pytest.raises(ValueError, match="distort"):
        S.run_sweep(E.SELFTEST, workers_per_device=2, out_dir=tmp_path, progress=False)


def test_assignments_cover_points_once_in_contiguous_runs():
    todo = list(range(23))
    plan = S._assignments(todo, [0, 1], 3)
    assert sorted(p for _, _, chunk in plan for p in chunk) == todo
    assert {wid for wid, _, _ in plan} == {f"d{d}w{w}" for d in (0, 1) for w in range(3)}
    for _, dev, chunk in plan:  # round-robin over devices, then contiguous within a device
        assert all(p % 2 == dev for p in chunk)
        assert chunk == sorted(chunk) and all(b - a == 2 for a, b in zip(chunk, chunk[1:]))


def test_overhead_excludes_the_experiments_own_compile_time():
    s = S.SweepSummary("x", "x.csv", 10, 0, points_done=10, wall_s=100.0, measure_s=80.0,
                       prepare_s=15.0)
    assert abs(s.overhead_frac - 0.05) < 1e-12
    assert "compiling 15.0 s" in s.line() and "harness overhead 5.0%" in s.line()
