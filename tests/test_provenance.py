"""Provenance: complete on a GPU machine, graceful without one."""

import json
import re

import pytest

from lib import provenance as P
from lib.gpu import gpu_available


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


def test_git_state_tolerates_no_repository(tmp_path):
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
