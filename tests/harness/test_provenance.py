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
    assert P.git_state(tmp_path) == {"commit": None, "dirty": None}


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
        assert s["sm_clock_mhz"] and s["temperature_c"] is not None


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
    st = P.git_state(tmp_path)
    assert st == {"commit": "abc123", "dirty": None, "source": "declared by UVM_STUDY_GIT_COMMIT"}
