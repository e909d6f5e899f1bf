"""The flashinfer backend: its CSR page plan from block tables (hand-computed), the tensor-core
rule, how it finds FlashInfer and says why not (CPU); the real kernel against the reference (GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lib import ROOT
from lib.engine import backends as B
from lib.engine import kvcache
from lib.engine.backends import flashinfer as F
from lib.engine.gpu import gpu_available

# ----------------------------------------------------------------- the plan


def test_plan_of_two_sequences_by_hand():
    # block 16: sequence 0 has 33 tokens on pages 3, 1, 0 (1 token on the last), sequence 1 has
    # exactly one full page (16 tokens on page 2); the table's padding (-1) is never read
    tables = np.array([[3, 1, 0], [2, -1, -1]], dtype=np.int32)
    plan = F.plan_pages(tables, [33, 16], block_size=16, num_blocks=4)
    assert plan.indptr.tolist() == [0, 3, 4]
    assert plan.indices.tolist() == [3, 1, 0, 2]
    assert plan.last_page_len.tolist() == [1, 16]
    assert all(a.dtype == np.int32 for a in (plan.indptr, plan.indices, plan.last_page_len))
    assert plan.seq_lens().tolist() == [33, 16]


def test_plan_with_one_token_pages():
    plan = F.plan_pages([[5, 0, 0], [1, 2, 4]], np.array([1, 3]), block_size=1, num_blocks=6)
    assert plan.indptr.tolist() == [0, 1, 4]
    assert plan.indices.tolist() == [5, 1, 2, 4]
    assert plan.last_page_len.tolist() == [1, 1]


def test_plan_of_a_partial_last_page_and_a_single_token():
    plan = F.plan_pages([[7, 6], [0, 0]], [20, 1], block_size=16)
    assert plan.indptr.tolist() == [0, 2, 3]
    assert plan.indices.tolist() == [7, 6, 0]
    assert plan.last_page_len.tolist() == [4, 1]


@pytest.mark.parametrize("placement", ["identity", "shuffled"])
@pytest.mark.parametrize("bs", [1, 16, 256])
def test_plan_reads_the_project_block_tables_in_page_order(placement, bs):
    lens = (1, bs + 1, 3 * bs - 1, 700, 1537)
    t = kvcache.make_block_tables(lens, bs, placement, np.random.default_rng(0))
    plan = F.plan_pages(t.tables, lens, block_size=bs, num_blocks=t.num_blocks)
    assert plan.seq_lens().tolist() == list(lens)
    pages = np.diff(plan.indptr)
    for s, n in enumerate(lens):
        assert plan.indices[plan.indptr[s]:plan.indptr[s + 1]].tolist() == t.tables[s, :pages[s]].tolist()
    if placement == "identity":
        assert plan.indices.tolist() == list(range(t.num_blocks))
    else:
        assert sorted(plan.indices.tolist()) == list(range(t.num_blocks))


def test_plan_allows_the_seed_protocol_shared_pages():
    t = kvcache.make_random_block_tables([16 * 64], 16, 4, np.random.default_rng(0))
    plan = F.plan_pages(t.tables, [16 * 64], block_size=16, num_blocks=t.num_blocks)
    assert plan.indices.size == 64 and set(plan.indices.tolist()) <= set(range(4))


def test_plan_refuses_what_flashinfer_would_misread():
    tables = np.array([[0, 1], [2, 3]], dtype=np.int32)
    with pytest.raises(ValueError, match="needs 3 pages of 16; block_tables has 2 columns"):
        F.plan_pages(tables, [40, 16], block_size=16)
    with pytest.raises(ValueError, match="outside the pool's 3 pages"):
        F.plan_pages(tables, [32, 32], block_size=16, num_blocks=3)
    with pytest.raises(ValueError, match=">= 1"):
        F.plan_pages(tables, [0, 16], block_size=16)
    with pytest.raises(ValueError, match="seq_lens must be 2 integers"):
        F.plan_pages(tables, [16], block_size=16)
    with pytest.raises(ValueError, match="2-D integer"):
        F.plan_pages(tables.astype(float), [16, 16], block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        F.plan_pages(tables, [16, 16], block_size=0)
    with pytest.raises(ValueError, match="no sequences"):
        F.plan_pages(np.zeros((0, 2), np.int32), np.zeros(0, np.int64), block_size=16)


def test_tensor_cores_from_groups_of_four():
    assert not F.use_tensor_cores(32, 32)   # MHA
    assert not F.use_tensor_cores(12, 4)    # group 3
    assert F.use_tensor_cores(8, 2)         # group 4
    assert F.use_tensor_cores(64, 8)        # the seed's 64:8
    assert F.use_tensor_cores(32, 1)        # MQA
    with pytest.raises(ValueError, match="multiple"):
        F.use_tensor_cores(6, 4)


def test_only_half_precision_dtypes():
    assert F.check_dtype("torch.bfloat16") == "bfloat16" and F.check_dtype("float16") == "float16"
    with pytest.raises(ValueError, match="float32 is not supported by FlashInfer"):
        F.check_dtype("float32")


# ----------------------------------------------------------------- finding it


def test_environment_defaults_fill_only_what_is_unset(tmp_path):
    env = {"FLASHINFER_WORKSPACE_BASE": str(tmp_path)}
    done = F.configure_environment(env)
    assert env["FLASHINFER_WORKSPACE_BASE"] == str(tmp_path)
    assert env["TVM_FFI_CACHE_DIR"] == str(tmp_path / "tvm-ffi")
    assert env["FLASHINFER_DISABLE_VERSION_CHECK"] == "1"
    assert "FLASHINFER_WORKSPACE_BASE" not in done
    env = {}
    F.configure_environment(env)
    assert env["FLASHINFER_WORKSPACE_BASE"] == str(F.DEFAULT_CACHE_BASE)


def test_status_without_an_install_names_the_command(tmp_path):
    status = F.flashinfer_status(tmp_path / "none")
    assert status["available"] is False and status["source"] == "kernel-only"
    assert "python -m lib flashinfer-kernel" in status["reason"]


def _fake_install(directory, **manifest):
    (directory / "flashinfer").mkdir(parents=True)
    (directory / "flashinfer" / "__init__.py").write_text("__version__ = '0.0.1'\nKERNEL_ONLY = True\n")
    m = {"flashinfer_version": "0.7.2.post1", "tvm_ffi_version": "0.1.15", "python_tag": None, **manifest}
    (directory / F.MANIFEST_NAME).write_text(json.dumps(m))
    return directory


def test_status_names_a_tvm_ffi_built_for_another_python(tmp_path):
    kernel = _fake_install(tmp_path / "k", python_tag="cp20")
    status = F.flashinfer_status(kernel)
    assert status["version"] == "0.7.2.post1" and not status["available"]
    assert "built for cp20" in status["reason"]


def test_status_names_a_missing_toolchain(tmp_path, monkeypatch):
    kernel = _fake_install(tmp_path / "k")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(F.shutil, "which", lambda *a, **kw: None)
    monkeypatch.setattr(F.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torch" else None)
    status = F.flashinfer_status(kernel)
    assert not status["available"] and "nvcc not found" in status["reason"]


def test_an_older_flashinfer_is_a_reason(tmp_path):
    kernel = _fake_install(tmp_path / "k", flashinfer_version="0.2.5")
    assert "older than the 0.7 API" in F.flashinfer_status(kernel)["reason"]


def test_a_broken_manifest_is_a_reason_not_a_crash(tmp_path):
    kernel = _fake_install(tmp_path / "k")
    (kernel / F.MANIFEST_NAME).write_text("{not json")
    assert "unreadable" in F.flashinfer_status(kernel)["reason"]


def test_load_imports_a_kernel_only_install_with_its_variables_set(tmp_path):
    kernel = _fake_install(tmp_path / "k")
    code = ("import os, sys; from lib.engine.backends import flashinfer as F\n"
            "m = F.load_flashinfer(sys.argv[1]); print(m.KERNEL_ONLY, os.environ['FLASHINFER_WORKSPACE_BASE'],"
            " os.environ['FLASHINFER_DISABLE_VERSION_CHECK'])\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("FLASHINFER_", "TVM_FFI"))}
    out = subprocess.run([sys.executable, "-c", code, str(kernel)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", str(F.DEFAULT_CACHE_BASE), "1"]


def test_registry_lists_flashinfer_with_its_adapter_and_a_reason():
    backend = B.get_backend("flashinfer")
    assert backend.layout == "vllm" and backend._prepare is not None
    reason = backend.unavailable_reason()
    assert reason is None or "no adapter" not in reason
    if not gpu_available():
        assert isinstance(reason, str) and reason


# ----------------------------------------------------------------- GPU

SHAPES = [  # (heads, kv heads, head size, block size, dtype, placement)
    (4, 4, 128, 16, "float16", "shuffled"),
    (8, 2, 64, 1, "bfloat16", "identity"),
    (8, 1, 256, 256, "float16", "shuffled"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("nh, nkv, d, bs, dtype, placement", SHAPES)
def test_flashinfer_matches_the_reference_and_captures(nh, nkv, d, bs, dtype, placement):
    from lib.engine.measure import check_then_time

    backend = B.get_backend("flashinfer")
    if backend.unavailable_reason():
        pytest.skip(f"FlashInfer unavailable: {backend.unavailable_reason()}")
    lens = (1, bs + 1, 3 * bs - 1, 700, 1537)
    problem = B.DecodeProblem(num_seqs=len(lens), num_heads=nh, num_kv_heads=nkv, head_size=d,
                              block_size=bs, dtype=dtype, seq_lens=lens, placement=placement, seed=3)
    case = B.DecodeCase.build(problem)
    out = case.poisoned_output()
    launch = backend.prepare(case, out)  # plans, JIT-compiles and warms up into scratch
    check = check_then_time(launch, out, case.reference(), dtype=dtype, protocol="rigorous")
    assert check["check_passed"], check
    assert check["median_us"] > 0


@pytest.mark.gpu
def test_flashinfer_refuses_float32_before_launch():
    backend = B.get_backend("flashinfer")
    if backend.unavailable_reason():
        pytest.skip(f"FlashInfer unavailable: {backend.unavailable_reason()}")
    problem = B.DecodeProblem.uniform(2, 40, num_heads=4, num_kv_heads=4, head_size=64, block_size=16,
                                      dtype="float32")
    case = B.DecodeCase.build(problem)
    with pytest.raises(ValueError, match="float32 is not supported"):
        backend.prepare(case, case.poisoned_output())


# ----------------------------------------------------------------- CPU, torch (a recording FlashInfer)


class _RecordingFlashInfer:
    """Stands in for the ``flashinfer`` package: records what the backend builds and calls."""

    def __init__(self):
        self.calls = []
        outer = self

        class Wrapper:
            def __init__(self, workspace, layout, **kw):
                outer.calls.append(("init", workspace, layout, kw))

            def plan(self, *args, **kw):
                outer.calls.append(("plan", args, kw))

            def run(self, q, kv, out=None):
                outer.calls.append(("run", q, kv, out))
                out.fill_(1.0)
                return out

        self.BatchDecodeWithPagedKVCacheWrapper = Wrapper


@pytest.mark.parametrize("heads, tc", [((4, 4), False), ((8, 2), True)])
def test_prepare_plans_once_in_graph_mode_and_runs_into_out(heads, tc):
    torch = pytest.importorskip("torch")
    nh, nkv = heads
    lens, bs = [33, 16], 16
    t = kvcache.make_block_tables(lens, bs, "shuffled", np.random.default_rng(1))
    q = torch.zeros(2, nh, 64, dtype=torch.float16)
    kp = torch.zeros(t.num_blocks, bs, nkv, 64, dtype=torch.float16)
    vp, out = torch.zeros_like(kp), torch.full_like(q, float("nan"))
    fake = _RecordingFlashInfer()
    launch = F.prepare_decode(q, kp, vp, out, t.tables, lens, scale=0.125, flashinfer=fake, workspace_bytes=1024)
    (_, ws, layout, kw), (_, pargs, pkw), (_, _, _, warm) = fake.calls
    assert layout == "NHD" and ws.numel() == 1024 and not ws.any()
    assert kw["use_cuda_graph"] and kw["use_tensor_cores"] is tc and kw["backend"] == "fa2"
    assert kw["paged_kv_indptr_buffer"].tolist() == [0, 3, 4]
    assert kw["paged_kv_indices_buffer"].tolist() == t.tables[0, :3].tolist() + t.tables[1, :1].tolist()
    assert kw["paged_kv_last_page_len_buffer"].tolist() == [1, 16]
    assert [a.tolist() if hasattr(a, "tolist") else a for a in pargs[3:]] == [nh, nkv, 64, bs]
    assert pkw["sm_scale"] == 0.125 and pkw["q_data_type"] == torch.float16
    assert warm is not out and torch.isnan(out).all()  # the warm-up wrote scratch, not the output
    launch()
    _, rq, (rk, rv), rout = fake.calls[-1]
    assert rq is q and rk is kp and rv is vp and rout is out and (out == 1).all()
    assert len([c for c in fake.calls if c[0] == "plan"]) == 1


def test_prepare_refuses_bad_arguments_before_flashinfer():
    torch = pytest.importorskip("torch")
    t = kvcache.make_block_tables([20], 16, "identity")
    q = torch.zeros(1, 4, 64)
    kp = torch.zeros(t.num_blocks, 16, 4, 64)
    with pytest.raises(ValueError, match="float32 is not supported"):
        F.prepare_decode(q, kp, kp, q.clone(), t.tables, [20], scale=0.125, flashinfer=object())
    h = torch.zeros(1, 4, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="head size"):
        F.prepare_decode(h, kp.half()[..., :32], kp.half()[..., :32], h.clone(), t.tables, [20], scale=0.1,
                         flashinfer=object())
    with pytest.raises(ValueError, match="needs 3 pages of 16"):
        F.prepare_decode(h, kp.half(), kp.half(), h.clone(), t.tables, [40], scale=0.1, flashinfer=object())
