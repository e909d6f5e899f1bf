"""vLLM's FlashAttention 3 backend (`vllm-fa3`) without a GPU: the kernel-only install keeps
exactly vllm_flash_attn's files, the status names what is missing, and bad input is refused
before anything is loaded."""

from __future__ import annotations

import json

import pytest

from lib.engine.backends import BACKENDS, vllm as vk, vllm_fa
from lib.tools import vllm_install as vi
from tests.engine.test_vllm import FAKE_FILES, FAKE_MODULE, FakeTensor, decode_args, make_wheel

FA_FILES = {f: ("binary" if f.endswith(".so") else "# vllm_flash_attn\n") for f in vllm_fa.FLASH_ATTN_FILES}


def test_flash_attn_install_adds_exactly_its_three_files(tmp_path):
    wheel = make_wheel(tmp_path, {**FAKE_FILES, **FA_FILES,
                                  "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so": "FA2: left out"})
    plain = vi.install_kernel_only(wheel, tmp_path / "plain", module=FAKE_MODULE)
    with_fa = vi.install_kernel_only(wheel, tmp_path / "fa", module=FAKE_MODULE, flash_attn=True)
    assert set(with_fa.files) - set(plain.files) == set(vllm_fa.FLASH_ATTN_FILES)
    assert not (tmp_path / "fa" / "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so").exists()
    manifest = json.loads((tmp_path / "fa" / vk.MANIFEST_NAME).read_text())
    assert manifest["flash_attn_files"] == list(vllm_fa.FLASH_ATTN_FILES)
    assert json.loads((tmp_path / "plain" / vk.MANIFEST_NAME).read_text())["flash_attn_files"] == []


def test_flash_attn_install_from_a_wheel_without_it_is_refused(tmp_path):
    wheel = make_wheel(tmp_path)
    with pytest.raises(ValueError, match="no vLLM FlashAttention 3: missing vllm/vllm_flash_attn/__init__.py"):
        vi.install_kernel_only(wheel, tmp_path / "k", module=FAKE_MODULE, flash_attn=True)
    assert not (tmp_path / "k").exists()


def test_status_says_how_to_add_flash_attn(tmp_path, monkeypatch):
    monkeypatch.setattr(vk.importlib.util, "find_spec", lambda name: object() if name in ("torch", "triton") else None)
    files = {**FAKE_FILES, "vllm/v1/attention/ops/triton_unified_attention.py": "X = 1\n"}
    for pkg in ("vllm/v1/__init__.py", "vllm/v1/attention/__init__.py", "vllm/v1/attention/ops/__init__.py"):
        files[pkg] = ""
    files.pop("vllm/third_party/pynvml.py")
    dest = tmp_path / "kernel"
    for rel, text in files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)
    (dest / vk.MANIFEST_NAME).write_text("{}")
    st = vllm_fa.status(dest)
    assert st["available"] is False and st["fa3"] is False
    assert "python -m lib vllm-kernel --flash-attn" in st["reason"]
    for rel, text in FA_FILES.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)
    assert vllm_fa.status(dest) == {**st, "available": True, "fa3": True, "reason": None}


@pytest.mark.parametrize("block_size", [1, 2, 4, 8, 24, 40])
def test_block_sizes_off_vllms_rule_are_refused(block_size):
    with pytest.raises(ValueError, match="multiples of 16"):
        vllm_fa.check_block_size(block_size)


@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
def test_block_sizes_vllm_takes_pass(block_size):
    vllm_fa.check_block_size(block_size)


@pytest.mark.parametrize("over, match", [
    ({"q": FakeTensor((4, 8, 64), "torch.float32"), "k_pool": FakeTensor((32, 16, 2, 64), "torch.float32"),
      "v_pool": FakeTensor((32, 16, 2, 64), "torch.float32"), "out": FakeTensor((4, 8, 64), "torch.float32")},
     "float16 and bfloat16 only"),
    ({"k_pool": FakeTensor((32, 8, 2, 64)), "v_pool": FakeTensor((32, 8, 2, 64))}, "multiples of 16"),
    ({"out": FakeTensor((4, 8, 32))}, "out shape"),
])
def test_decode_refuses_bad_input_before_loading_anything(over, match):
    def never():
        raise AssertionError("loaded")

    with pytest.raises(ValueError, match=match):
        vllm_fa.prepare_decode(**decode_args(**over), scale=0.125, max_seq_len=64, interface=never)


def test_registered_as_a_peer_on_the_vllm_layout():
    b = BACKENDS["vllm-fa3"]
    assert (b.family, b.layout) == ("peer", "vllm")
    assert isinstance(b.unavailable_reason(), str)  # no GPU here: a reason, never a crash


# ----------------------------------------------------------------- GPU

GPU_SHAPES = [  # (heads, kv heads, head size, block size, dtype, placement)
    (4, 4, 128, 16, "float16", "shuffled"),
    (8, 1, 64, 32, "bfloat16", "identity"),
    (16, 2, 256, 256, "float16", "shuffled"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("nh, nkv, d, bs, dtype, placement", GPU_SHAPES)
def test_vllm_fa3_matches_the_reference_and_captures(nh, nkv, d, bs, dtype, placement):
    from lib.engine import backends as B
    from lib.engine.measure import check_then_time

    backend = B.get_backend("vllm-fa3")
    if backend.unavailable_reason():
        pytest.skip(f"vllm-fa3 unavailable: {backend.unavailable_reason()}")
    lens = (1, bs + 1, 3 * bs - 1, 700, 1537)
    problem = B.DecodeProblem(num_seqs=len(lens), num_heads=nh, num_kv_heads=nkv, head_size=d,
                              block_size=bs, dtype=dtype, seq_lens=lens, placement=placement, seed=5)
    case = B.DecodeCase.build(problem)
    out = case.poisoned_output()
    launch = backend.prepare(case, out)
    check = check_then_time(launch, out, case.reference(), dtype=dtype, protocol="rigorous")
    assert check["check_passed"], check
    assert check["median_us"] > 0


@pytest.mark.gpu
def test_vllm_fa3_refuses_a_block_size_vllm_does_not_take_before_launch():
    from lib.engine import backends as B

    backend = B.get_backend("vllm-fa3")
    if backend.unavailable_reason():
        pytest.skip(f"vllm-fa3 unavailable: {backend.unavailable_reason()}")
    problem = B.DecodeProblem.uniform(2, 40, num_heads=4, num_kv_heads=4, head_size=64, block_size=8,
                                      dtype="float16")
    case = B.DecodeCase.build(problem)
    with pytest.raises(ValueError, match="multiples of 16"):
        backend.prepare(case, case.poisoned_output())
