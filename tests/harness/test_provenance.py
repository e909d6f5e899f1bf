"""Provenance: complete on a GPU machine, graceful without one."""

import json
import re

import pytest

from lib.harness import provenance as P
from lib.engine.gpu import gpu_available


def test_collect_records_software_code_and_params():
    prov = P.collect({"experiment": "x", "seq_len": [1024]})
    json.dumps(prov)  # storable as it is
    assert prov["params"] == {"experiment": "x", "seq_len": [1024]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", prov["time_utc"])
    assert re.fullmatch(r"[0-9a-f]{16}", prov["host_sha16"])
    assert set(prov["libraries"]) >= {"torch", "cupy", "triton", "vllm", "numpy"}
    assert prov["libraries"]["numpy"]
    git = prov["git"]
    assert git["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", git["commit"])
    assert git["dirty"] in (True, False, None)


def test_git_state_tolerates_no_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("UVM_STUDY_GIT_COMMIT", raising=False)
    st = P.git_state(tmp_path)
    assert st["commit"] is None and st["dirty"] is None and st["lib_sha256"] is None
    assert st["source"].startswith("none")
    assert P.run_issues({"git": st}) == ["git: no commit recorded"]


@pytest.mark.skipif(gpu_available(), reason="a GPU is visible")
def test_without_a_gpu_the_gpu_fields_are_none():
    prov = P.collect({})
    assert prov["gpu"] is None and prov["snapshot_before"] is None
    assert P.snapshot() is None


@pytest.mark.gpu
def test_gpu_fields_on_a_gpu():
    prov = P.collect({})
    g = prov["gpu"]
    assert g["name"] and re.fullmatch(r"[0-9a-f]{16}", g["uuid_sha16"])
    assert g["l2_cache_bytes"] > 0 and g["cuda_runtime_version"]
    s = prov["snapshot_before"]
    if s is not None:  # nvidia-ml-py installed
        assert s["sm_clock_mhz"] and s["temperature_c"] is not None and s["label"].startswith("idle")
        assert g["pcie"]["max_generation"] and g["pcie"]["max_width"]
        assert prov["datasheet"]["pcie_gbps_per_direction"] > 0
    assert "datasheet" in prov["datasheet"]["label"]


@pytest.mark.gpu
def test_clocks_are_sampled_under_load_by_the_timing_probe():
    import cupy as cp

    from lib.engine import timing

    clocks = P.LoadClocks()
    if clocks._h is None:
        pytest.skip("nvidia-ml-py is not installed")
    buf = cp.empty(1 << 30, dtype=cp.uint8)
    sink = cp.zeros(1, dtype=cp.uint64)
    timing.set_load_probe(clocks)
    try:
        timing.time_graph(lambda: timing.read_sum(buf, sink), min_samples=30, max_samples=30)
    finally:
        timing.set_load_probe(None)
    summary = clocks.summary()
    assert summary["n"] >= 3  # one per batch of samples
    max_sm = P.snapshot()["sm_clock_max_mhz"]
    assert summary["sm_clock_mhz"]["median"] >= 0.5 * max_sm, summary  # not an idle clock


def test_a_declared_commit_wins_over_a_stale_git_in_the_copy(monkeypatch):
    monkeypatch.setenv("UVM_STUDY_GIT_COMMIT", "abc123")
    monkeypatch.setenv("UVM_STUDY_GIT_DIRTY", "0")
    st = P.git_state()  # this checkout has a .git whose HEAD is not "abc123"
    assert st["commit"] == "abc123" and st["dirty"] is False
    assert st["source"].startswith("declared")
    assert st["git_head_in_copy"] and st["git_head_in_copy"] != "abc123"


def test_a_declared_commit_is_used_without_git(monkeypatch, tmp_path):
    monkeypatch.setenv("UVM_STUDY_GIT_COMMIT", "abc123")
    monkeypatch.delenv("UVM_STUDY_GIT_DIRTY", raising=False)
    monkeypatch.delenv("UVM_STUDY_LIB_SHA", raising=False)
    st = P.git_state(tmp_path)
    assert {k: st[k] for k in ("commit", "dirty", "source")} == {
        "commit": "abc123", "dirty": None, "source": "declared by UVM_STUDY_GIT_COMMIT"}
    assert st["check"]["status"] == "unverified"


# ----------------------------------------------------------------------------- the code: lib hash

def _git(root, *args):
    import subprocess

    subprocess.run(["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", *args], cwd=root,
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A throw-away git repository with a lib/ of two modules and a CUDA file, committed."""
    for k in ("UVM_STUDY_GIT_COMMIT", "UVM_STUDY_GIT_DIRTY", "UVM_STUDY_LIB_SHA"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "lib" / "engine").mkdir(parents=True)
    (tmp_path / "lib" / "a.py").write_text("A = 1\n")
    (tmp_path / "lib" / "engine" / "k.cu").write_text("__global__ void k() {}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "lib")
    _git(tmp_path, "commit", "-q", "-m", "one")
    return tmp_path


def _head(root):
    import subprocess

    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


def test_lib_hash_of_a_clean_tree_is_its_commits_and_ignores_caches(repo):
    h = P.lib_hash(repo)
    assert re.fullmatch(r"[0-9a-f]{64}", h) and h == P.lib_hash_at("HEAD", repo)
    (repo / "lib" / "__pycache__").mkdir()
    (repo / "lib" / "__pycache__" / "a.cpython-312.pyc").write_bytes(b"\0junk")
    (repo / "lib" / "notes.txt").write_text("not code")
    assert P.lib_hash(repo) == h
    st = P.git_state(repo)
    assert st["commit"] == _head(repo) and st["dirty"] is False and st["lib_matches_commit"] is True
    assert st["lib_sha256"] == h and P.run_issues({"git": st}) == []


def test_a_dirty_tree_is_still_named_by_its_lib_hash(repo):
    clean = P.lib_hash(repo)
    (repo / "lib" / "engine" / "k.cu").write_text("__global__ void k() { /* edited */ }\n")
    st = P.git_state(repo)
    assert st["dirty"] is True and st["lib_matches_commit"] is False and st["lib_sha256"] != clean
    assert any("differed from commit" in i for i in P.run_issues({"git": st}))


def test_an_untracked_module_makes_the_tree_dirty(repo):
    """git status --untracked-files=no says clean; the lib hash sees the new module."""
    (repo / "lib" / "b.py").write_text("B = 2\n")
    st = P.git_state(repo)
    assert st["dirty"] is True and st["lib_matches_commit"] is False


def test_a_declared_commit_is_checked_against_the_lib_hash(repo, monkeypatch):
    head = _head(repo)
    monkeypatch.setenv("UVM_STUDY_GIT_COMMIT", head)
    assert P.git_state(repo)["check"]["status"] == "verified"  # the copy's .git holds the commit
    (repo / "lib" / "a.py").write_text("A = 3\n")
    st = P.git_state(repo)
    assert st["check"]["status"] == "mismatch" and st["commit"] == head
    assert any("does not hash to the declared commit" in i for i in P.run_issues({"git": st}))


def test_a_declared_lib_hash_checks_a_copy_without_git(repo, tmp_path_factory, monkeypatch):
    import shutil

    want = P.lib_hash_at("HEAD", repo)
    copy = tmp_path_factory.mktemp("copy")
    shutil.copytree(repo / "lib", copy / "lib")  # what a GPU node receives: no .git
    monkeypatch.setenv("UVM_STUDY_GIT_COMMIT", _head(repo))
    assert P.git_state(copy)["check"]["status"] == "unverified"
    monkeypatch.setenv("UVM_STUDY_LIB_SHA", want)
    assert P.git_state(copy)["check"]["status"] == "verified"
    (copy / "lib" / "a.py").write_text("A = 4\n")
    assert P.git_state(copy)["check"]["status"] == "mismatch"


def test_a_recorded_run_is_verified_later_against_the_repository(repo):
    head = _head(repo)
    good = {"commit": head, "lib_sha256": P.lib_hash(repo)}
    assert P.verify_git(good, repo)["status"] == "verified"
    assert P.verify_git({**good, "lib_sha256": "0" * 64}, repo)["status"] == "mismatch"
    assert P.verify_git({**good, "commit": "1" * 40}, repo)["status"] == "unknown_commit"
    assert P.verify_git({"commit": None}, repo)["status"] == "no_commit"
    assert P.commits_with_lib_hash(good["lib_sha256"], repo) == [head]


# ----------------------------------------------------------------------------- versions

def test_vllms_version_comes_from_a_kernel_only_install(tmp_path, monkeypatch):
    """A kernel-only install is no distribution on sys.path: its METADATA still names it."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("a vllm package is importable here")
    d = tmp_path / "kernel"
    mod = d / "vllm" / "v1" / "attention" / "ops"
    mod.mkdir(parents=True)
    (mod / "triton_unified_attention.py").write_text("")
    (d / "vllm-9.9.9.dist-info").mkdir()
    (d / "vllm-9.9.9.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 9.9.9\n\n")
    monkeypatch.setenv("UVM_STUDY_VLLM_DIR", str(d))
    assert P.library_versions()["vllm"] == "9.9.9"
    monkeypatch.setenv("UVM_STUDY_VLLM_DIR", str(tmp_path / "nothing"))
    assert P.library_versions()["vllm"] is None


def test_flashinfers_version_from_a_loaded_module(monkeypatch):
    import types

    if P._try(P.md.version, "flashinfer-python"):
        pytest.skip("flashinfer-python is installed here")
    monkeypatch.setitem(__import__("sys").modules, "flashinfer", types.SimpleNamespace(__version__="0.7.2.post1"))
    assert P.library_versions()["flashinfer"] == "0.7.2.post1"


def test_a_null_version_of_a_library_the_run_used_is_an_issue():
    prov = {"git": {"commit": "a" * 40, "dirty": False, "lib_sha256": "b" * 64},
            "libraries": {"vllm": None, "flashinfer": None}}
    assert P.run_issues(prov, ["own-v2-paged"]) == []
    (issue,) = P.run_issues(prov, ["own-v2-paged", "vllm"])
    assert issue.startswith("libraries: vllm")
    assert P.run_issues({**prov, "end": {"libraries": {"vllm": "0.33.0"}}}, ["vllm"]) == []


# ----------------------------------------------------------------------------- clocks, datasheet

class FakeNvml:
    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    def __init__(self, sm):
        self.sm = iter(sm)

    def nvmlDeviceGetClockInfo(self, h, which):
        return next(self.sm) if which == 1 else 2619

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h):
        return 5

    def nvmlDeviceGetCurrPcieLinkWidth(self, h):
        return 16


def test_load_clocks_summarize_per_window_and_per_run():
    c = P.LoadClocks.__new__(P.LoadClocks)  # no GPU here: give it a fake NVML
    c.samples, c._mark, c._nv, c._h = [], 0, FakeNvml([1980, 1755, 1980, 1410]), object()
    c()
    c()
    c.mark()
    c()
    c()
    win = c.since_mark()
    assert win["n"] == 2 and win["sm_clock_mhz"] == {"median": 1695.0, "min": 1410.0, "max": 1980.0}
    assert P.row_clocks(win) == {"sm_clock_mhz_under_load": 1695.0, "mem_clock_mhz_under_load": 2619.0}
    run = c.summary()
    assert run["n"] == 4 and "under load" in run["label"] and run["pcie_generation"]["median"] == 5
    assert P.summarize_clocks([]) == {} and P.row_clocks({}) == {}


def test_load_clocks_without_a_gpu_record_nothing():
    c = P.LoadClocks()
    if c._h is None:
        c()
        assert c.samples == [] and c.summary() == {"label": P.LoadClocks.LABEL}


def test_datasheet_peaks_by_card_and_link():
    h100 = P.datasheet("NVIDIA H100 80GB HBM3", {"max_generation": 5, "max_width": 16})
    assert h100["hbm_gbps"] == 3350.0 and h100["pcie_gbps_per_direction"] == 64.0
    assert h100["pcie_link"] == "PCIe Gen5 x16" and "datasheet" in h100["label"]
    assert P.datasheet("NVIDIA H200")["hbm_gbps"] == 4800.0
    unknown = P.datasheet("NVIDIA A100-SXM4-40GB", None)
    assert unknown["hbm_gbps"] is None and unknown["pcie_gbps_per_direction"] is None
    assert P.pcie_gbps(4, 16) == 32.0 and P.pcie_gbps(None, 16) is None
