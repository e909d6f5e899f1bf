"""vLLM's 2024 kernels (`vllm2024-v1/v2`): what they refuse before any launch, how their launch
is sized, how the build reads an sdist (unsafe archives refused, the torch launcher left out, the
wrong release refused), and on a GPU their output against the float64 reference."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from lib.engine.backends import BACKENDS, get_backend, vllm2024 as K
from lib.tools import vllm2024 as T

#: A stand-in for vLLM 0.3.3's attention_kernels.cu with its layout: includes, macros, the
#: namespace block with the three kernels' signatures, then a torch launcher that must be dropped.
FAKE_KERNELS = """#include <torch/extension.h>
#include "attention_dtypes.h"
#include <algorithm>

#define WARP_SIZE 32
namespace vllm {
template<typename scalar_t> __global__ void paged_attention_v1_kernel(
  scalar_t* __restrict__ out, const int kv_head_stride) {}
template<typename scalar_t> __global__ void paged_attention_v2_kernel(
  float* __restrict__ exp_sums, const int kv_head_stride) {}
template<typename scalar_t> __global__ void paged_attention_v2_reduce_kernel(
  scalar_t* __restrict__ out, const int max_num_partitions) {}
} // namespace vllm

void paged_attention_v1(torch::Tensor& out) { LAUNCHER_USES_TORCH; }
"""


def make_sdist(tmp_path, members: dict[str, bytes | None], version="0.3.3", *, link=None):
    path = tmp_path / f"vllm-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
    return path


def good_members(version="0.3.3"):
    top = f"vllm-{version}/csrc/"
    return {top + T.KERNEL_SOURCE: FAKE_KERNELS.encode(),
            top + "attention/attention_dtypes.h": b"#pragma once\n",
            top + "cuda_compat.h": b"#pragma once\n",
            top + "layernorm_kernels.cu": b"not needed\n",
            f"vllm-{version}/setup.py": b"print('never run')\n"}


def test_both_backends_are_registered_on_the_classic_layout():
    for v in (1, 2):
        b = BACKENDS[f"vllm2024-v{v}"]
        assert (b.layout, b.family, b.version, b.addressing) == ("classic", "vllm2024", v, "paged")


@pytest.mark.parametrize("kw, match", [
    (dict(block_size=64), "block size 64: this build of vLLM's 2024 kernels has block sizes 1, 2, 4, 8, 16, 32"),
    (dict(head_size=72), "head size 72: vLLM's 2024 launcher has 64, 80, 96, 112, 128, 256"),
    (dict(block_size=1, head_size=80), "must be a multiple of 32"),
    (dict(dtype="float8"), "dtype 'float8'"),
    (dict(version=3), "v1 and v2"),
])
def test_what_it_cannot_run_is_refused_with_the_reason(kw, match):
    args = dict(version=1, dtype="float16", block_size=16, head_size=128, max_seq_len=4096) | kw
    with pytest.raises(ValueError, match=match):
        K.check_problem(**args)


def test_v1_refuses_a_sequence_whose_logits_do_not_fit_in_shared_memory():
    K.check_problem(1, dtype="float16", block_size=16, head_size=128, max_seq_len=32768,
                    max_shared=232448)  # 128 KiB of logits: fits an H100's 227 KiB
    with pytest.raises(ValueError, match="use vllm2024-v2"):
        K.check_problem(1, dtype="float16", block_size=16, head_size=128, max_seq_len=65536,
                        max_shared=232448)
    K.check_problem(2, dtype="float16", block_size=16, head_size=128, max_seq_len=65536, max_shared=232448)


def test_launch_is_sized_as_vllms_launcher_sized_it():
    # v1: the padded sequence's float logits; v2: one 512-token partition's; at least 1 output buffer
    assert K.shared_bytes(1, 16, 128, 4096) == 4096 * 4
    assert K.shared_bytes(1, 16, 128, 4097) == 4112 * 4
    assert K.shared_bytes(2, 16, 128, 4096) == 512 * 4
    assert K.shared_bytes(1, 16, 256, 1) == 2 * 256 * 4
    plan = K.Launch2024(2, "float16", 16, 128, 64, 8, 8, 4096)
    assert plan.partitions == 8 and K.Launch2024(1, "float16", 16, 128, 64, 8, 8, 4096).partitions == 1
    assert plan.describe() == "vllm2024 v2 threads=128 grid=64x8x8 smem=2048 partition=512"
    assert K.thread_group_size(1) == 32 and K.thread_group_size(32) == 1
    assert T.head_sizes_for(1) == (64, 96, 128, 256) and T.head_sizes_for(2) == K.HEAD_SIZES


def test_sources_are_only_the_kernels_and_carry_their_hashes(tmp_path):
    src = T.read_sources(make_sdist(tmp_path, good_members()))
    assert src.version == "0.3.3"
    assert sorted(src.files) == ["attention/attention_dtypes.h", T.KERNEL_SOURCE, "cuda_compat.h"]
    again = T.read_sources(make_sdist(tmp_path, good_members()))
    assert src.sha256 == again.sha256 and len(src.sdist_sha256) == 64
    changed = good_members()
    changed["vllm-0.3.3/csrc/cuda_compat.h"] = b"#pragma once // edited\n"
    (tmp_path / "b").mkdir()
    assert T.read_sources(make_sdist(tmp_path / "b", changed)).sha256 != src.sha256


@pytest.mark.parametrize("bad, why", [("vllm-0.3.3/../evil.h", "'..' component"),
                                      ("/abs/evil.h", "absolute path")])
def test_an_unsafe_member_anywhere_refuses_the_archive(tmp_path, bad, why):
    sdist = make_sdist(tmp_path, {**good_members(), bad: b"x"})
    with pytest.raises(ValueError, match=f"unsafe \\({why}"):
        T.read_sources(sdist)


def test_a_link_member_refuses_the_archive(tmp_path):
    sdist = make_sdist(tmp_path, good_members(), link="vllm-0.3.3/csrc/attention/link.h")
    with pytest.raises(ValueError, match=r"unsafe \(link\)"):
        T.read_sources(sdist)


def test_an_sdist_without_the_2024_kernels_is_refused(tmp_path):
    m = {k: v for k, v in good_members().items() if not k.endswith(T.KERNEL_SOURCE)}
    with pytest.raises(ValueError, match="has no csrc/attention/attention_kernels.cu"):
        T.read_sources(make_sdist(tmp_path, m))
    with pytest.raises(ValueError, match="expected vLLM's sdist"):
        T.read_sources(tmp_path / "other.tar.gz")


def test_the_translation_unit_keeps_the_templates_and_drops_the_torch_launcher(tmp_path):
    src = T.read_sources(make_sdist(tmp_path, good_members()))
    tu = T.translation_unit(src, "float16", 16)
    assert "namespace vllm {" in tu and "#define WARP_SIZE 32" in tu
    assert "#include <torch" not in tu and "torch::Tensor" not in tu and "LAUNCHER_USES_TORCH" not in tu
    assert tu.count("template __global__ void vllm::paged_attention_v1_kernel<uint16_t, uint16_t, ") == 6
    assert ("vllm::paged_attention_v2_kernel<uint16_t, uint16_t, 128, 16, 128, false, 512>(float*, float*, "
            "uint16_t*, const uint16_t*, const uint16_t*, const uint16_t*, int, float, const int*, "
            "const int*, int, const float*, int, int, int);") in tu
    assert T.translation_unit(src, "bfloat16", 1).count("paged_attention_v2_reduce_kernel<__nv_bfloat16") == 4


def test_a_release_with_other_kernel_signatures_is_refused():
    with pytest.raises(ValueError, match="paged_attention_v2_kernel is not vLLM 0.3.3's"):
        T.kernel_templates(FAKE_KERNELS.replace("float* __restrict__ exp_sums, const int kv_head_stride",
                                                "float* __restrict__ exp_sums, const float k_scale"))
    with pytest.raises(ValueError, match="expected one 'namespace vllm {'"):
        T.kernel_templates(FAKE_KERNELS.replace("namespace vllm {", "namespace vllm2 {"))


def test_the_ptxas_report_names_each_kernel():
    report = """ptxas info    : Compiling entry function '_ZN4vllm25paged_attention_v1_kernelIttLi128ELi16ELi128ELb0EEEvPT_PKS1_PKT0_S7_ifPKiS9_iPKfiii' for 'sm_90'
ptxas info    : Function properties for x
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 288 bytes smem
ptxas info    : Compiling entry function '_ZN4vllm25paged_attention_v2_kernelI13__nv_bfloat16S1_Li256ELi1ELi128ELb0ELi512EEEvPfS2_PT_PKS3_PKT0_S9_ifPKiSB_iPKfiii' for 'sm_90'
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 544 bytes smem
ptxas info    : Compiling entry function '_ZN4vllm32paged_attention_v2_reduce_kernelIfLi64ELi128ELi512EEEvPT_PKfS4_PKS1_PKii' for 'sm_90'
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 32 bytes smem
"""
    rows = T.parse_report(report)
    assert [(r["kind"], r["head_size"], r["registers"], r["spill_stores"]) for r in rows] == [
        ("v1", 128, 96, 0), ("v2", 256, 255, 4), ("reduce", 64, 32, 0)]
    with pytest.raises(ValueError, match="unexpected entry function"):
        T.parse_report("ptxas info    : Compiling entry function '_Z3fooi' for 'sm_90'")


def test_status_without_a_build_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv(K.ENV_DIR, str(tmp_path / "none"))
    st = K.status()
    assert not st["available"] and "python -m lib vllm2024-kernel" in st["reason"]
    assert "python -m lib vllm2024-kernel" in get_backend("vllm2024-v1").unavailable_reason()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / K.MANIFEST).write_text(json.dumps({"vllm_version": "0.3.3", "arch": "sm_90", "modules": {}}))
    monkeypatch.setenv(K.ENV_DIR, str(tmp_path / "b"))
    assert K.status()["available"] and K.status()["version"] == "0.3.3"
    with pytest.raises(FileNotFoundError, match="no float16_b16 module"):
        K.get_kernel("v1", "float16", 16, 128)


def test_a_current_build_is_kept(tmp_path, monkeypatch):
    """The cache: same sources, flags, nvcc and modules -> nothing is compiled again."""
    sdist = make_sdist(tmp_path, good_members())
    src = T.read_sources(sdist)
    monkeypatch.setattr(T, "nvcc_path", lambda: "/no/nvcc")
    monkeypatch.setattr(T, "nvcc_version", lambda nvcc: "release 13.0")
    out = tmp_path / "build"
    out.mkdir()
    (out / "float16_b16.cubin").write_bytes(b"cubin")
    have = {"vllm_version": "0.3.3", "sdist_sha256": src.sdist_sha256, "source_sha256": src.sha256,
            "arch": "sm_90", "nvcc": "release 13.0", "nvcc_flags": list(T.NVCC_FLAGS),
            "num_threads": 128, "partition_size": 512,
            "modules": {"float16_b16": {"file": "float16_b16.cubin", "kernels": {}}}}
    (out / K.MANIFEST).write_text(json.dumps(have))
    monkeypatch.setattr(T, "_compile", lambda *a: pytest.fail("a current build was compiled again"))
    assert T.build(sdist, out, dtypes=["float16"], block_sizes=[16], progress=False) == have


# --------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["vllm2024-v1", "vllm2024-v2"])
@pytest.mark.parametrize("dtype, block, heads, kv, head, lens, kind", [
    ("float16", 16, 64, 8, 128, (4096, 1, 700), "device"),
    ("bfloat16", 1, 8, 1, 64, (17, 1537), "device"),
    ("float32", 32, 4, 4, 80, (1, 33, 513), "device"),
    ("float16", 4, 16, 2, 112, (1024, 5), "managed"),
])
def test_vllm2024_matches_the_reference(backend, dtype, block, heads, kv, head, lens, kind):
    from lib.engine import memory
    from lib.engine.backends import DecodeCase, DecodeProblem
    from lib.engine.measure import check_then_time

    b = get_backend(backend)
    if b.unavailable_reason():
        pytest.skip(b.unavailable_reason())
    alloc = memory.allocator(kind) if kind != "device" else None
    p = DecodeProblem(num_seqs=len(lens), num_heads=heads, num_kv_heads=kv, head_size=head,
                      block_size=block, dtype=dtype, seq_lens=lens, placement="shuffled", seed=7)
    case = DecodeCase.build(p, **({"alloc": alloc} if alloc else {}))
    out = case.poisoned_output()
    launch = b.prepare(case, out)
    got = check_then_time(launch, out, case.reference(), dtype=dtype, protocol=None)
    assert got["check_passed"], got
    assert np.isfinite(got["rel_error"])
    assert launch.describe().startswith(f"vllm2024 v{b.version} threads=128")


@pytest.mark.gpu
def test_vllm2024_refuses_a_block_size_it_was_not_built_for_before_launching():
    from lib.engine.backends import DecodeCase, DecodeProblem

    b = get_backend("vllm2024-v2")
    if b.unavailable_reason():
        pytest.skip(b.unavailable_reason())
    case = DecodeCase.build(DecodeProblem.uniform(2, 100, num_heads=8, num_kv_heads=2, head_size=128,
                                                  block_size=64, dtype="float16"))
    with pytest.raises(ValueError, match="block size 64"):
        b.prepare(case, case.poisoned_output())
