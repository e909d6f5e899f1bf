"""Kernel-only vLLM installs from fake wheels (CPU, no torch) and vLLM's real kernel (GPU)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lib import ROOT
from lib.engine.backends import vllm as vk
from lib.tools import vllm_install as vi

FAKE_MODULE = "vllm.kern.attn"

# A fake `vllm`: the kernel module imports some of the package, reads one data file and
# probes for the pynvml shim, which (were it importable) would drag in `util/unused.py`.
FAKE_FILES = {
    "vllm/__init__.py": "from vllm.version import __version__\n",
    "vllm/version.py": "__version__ = '0.0.1'\n",
    "vllm/util/__init__.py": "",
    "vllm/util/used.py": "VALUE = 3\n",
    "vllm/util/unused.py": "raise RuntimeError('must not be imported')\n",
    "vllm/kern/__init__.py": "",
    "vllm/kern/table.json": '{"tile": 16}\n',
    "vllm/kern/other.py": "X = 1\n",
    "vllm/kern/attn.py": (
        "import importlib.metadata, json, os\n"
        "from vllm.util.used import VALUE\n"
        "try:\n"
        "    import vllm.third_party.pynvml\n"
        "    HAVE_PYNVML = True\n"
        "except ImportError:\n"
        "    HAVE_PYNVML = False\n"
        "with open(os.path.join(os.path.dirname(__file__), 'table.json')) as f:\n"
        "    TILE = json.load(f)['tile']\n"
        "VERSION = importlib.metadata.version('vllm')\n"
        "def unified_attention(**kw):\n"
        "    return (VALUE, TILE, VERSION, HAVE_PYNVML)\n"
    ),
    "vllm/third_party/__init__.py": "",
    "vllm/third_party/pynvml.py": "import vllm.util.unused\n",
    "vllm/big_unused.py": "# " + "x" * 10_000 + "\n",
    "vllm/_C.abi3.so": "not really a shared object",
    "vllm-0.0.1.dist-info/METADATA": "Metadata-Version: 2.4\nName: vllm\nVersion: 0.0.1\nRequires-Dist: torch==9.9\n\nLong text.\n",
    "vllm-0.0.1.dist-info/WHEEL": "Wheel-Version: 1.0\n",
    "vllm-0.0.1.dist-info/entry_points.txt": "[console_scripts]\nvllm = vllm.x:main\n",
    "vllm-0.0.1.dist-info/RECORD": "",
}

EXPECTED = {
    "vllm/__init__.py",
    "vllm/version.py",
    "vllm/util/__init__.py",
    "vllm/util/used.py",
    "vllm/kern/__init__.py",
    "vllm/kern/attn.py",
    "vllm/kern/table.json",
    "vllm/third_party/__init__.py",
    "vllm-0.0.1.dist-info/METADATA",
}


def make_wheel(directory: Path, files: dict[str, str] = FAKE_FILES, name: str = "vllm-0.0.1-py3-none-any.whl") -> Path:
    path = directory / name
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
    return path


def tree(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    return make_wheel(tmp_path)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch) -> Path:
    """Point tempfile at an empty folder, so tests can see whether anything was written."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(vi.tempfile, "tempdir", str(scratch))
    return scratch


# ----------------------------------------------------------------- install


def test_install_copies_only_imported_modules_inits_and_metadata(wheel, tmp_path, private_tmp):
    dest = tmp_path / "kernel"
    report = vi.install_kernel_only(wheel, dest, module=FAKE_MODULE)
    assert set(report.files) == EXPECTED
    assert tree(dest) == EXPECTED | {vk.MANIFEST_NAME}
    assert not (dest / "vllm/third_party/pynvml.py").exists()
    assert report.version == "0.0.1"
    assert report.bytes == sum((dest / f).stat().st_size for f in EXPECTED)
    assert report.dest == dest
    assert list(private_tmp.iterdir()) == []  # the unpacked wheel is gone


def test_manifest_records_version_wheel_files_and_bytes(wheel, tmp_path):
    dest = tmp_path / "kernel"
    report = vi.install_kernel_only(wheel, dest, module=FAKE_MODULE)
    manifest = json.loads((dest / vk.MANIFEST_NAME).read_text())
    assert manifest["vllm_version"] == "0.0.1"
    assert manifest["kernel_module"] == FAKE_MODULE
    assert manifest["wheel"]["name"] == wheel.name
    assert manifest["wheel"]["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert manifest["files"] == sorted(EXPECTED)
    assert manifest["total_bytes"] == report.bytes
    assert manifest["created"].endswith("+00:00")
    assert manifest["probe"]["has_triton"] is None  # the fake has no triton_utils


def test_installed_kernel_loads_and_saw_no_pynvml(wheel, tmp_path):
    dest = tmp_path / "kernel"
    vi.install_kernel_only(wheel, dest, module=FAKE_MODULE)
    code = (
        "import sys; from lib.engine.backends.vllm import load_unified_attention as L\n"
        f"f = L(sys.argv[1], module={FAKE_MODULE!r}); print(f())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(dest)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 16, '0.0.1', False)"


def test_load_refuses_a_kernel_dir_without_metadata(wheel, tmp_path):
    dest = tmp_path / "kernel"
    vi.install_kernel_only(wheel, dest, module=FAKE_MODULE)
    (dest / "vllm-0.0.1.dist-info/METADATA").unlink()
    with pytest.raises(RuntimeError, match="METADATA"):
        vk.load_unified_attention(dest, module=FAKE_MODULE)
    assert str(dest.resolve()) not in sys.path


@pytest.mark.parametrize(
    "member",
    ["../evil.py", "vllm/../../evil.py", "/etc/evil.py", "\\evil.py", "C:/evil.py", "C:evil.py", "vllm\\..\\..\\evil.py"],
)
def test_unsafe_members_are_refused_before_anything_is_written(tmp_path, private_tmp, member):
    files = dict(FAKE_FILES)
    files[member] = "boom"
    bad = make_wheel(tmp_path, files)
    before = tree(tmp_path)
    dest = tmp_path / "kernel"
    with pytest.raises(ValueError, match=r"refusing .*member"):
        vi.install_kernel_only(bad, dest, module=FAKE_MODULE)
    assert not dest.exists()
    assert tree(tmp_path) == before
    assert list(private_tmp.iterdir()) == []


def test_safe_member_names_pass():
    for name in ["vllm/a.py", "vllm/..hidden/x.py", "vllm-1.0.dist-info/METADATA", "a..b/c.py"]:
        assert vi._unsafe_member(name) is None, name


def test_wheel_without_metadata_is_refused(tmp_path):
    files = {k: v for k, v in FAKE_FILES.items() if not k.endswith("METADATA")}
    with pytest.raises(ValueError, match="METADATA"):
        vi.install_kernel_only(make_wheel(tmp_path, files), tmp_path / "kernel", module=FAKE_MODULE)


def test_not_a_zip_and_missing_wheel_are_refused(tmp_path):
    junk = tmp_path / "x.whl"
    junk.write_text("not a zip")
    with pytest.raises(ValueError, match="not a zip"):
        vi.install_kernel_only(junk, tmp_path / "k", module=FAKE_MODULE)
    with pytest.raises(ValueError, match="not found"):
        vi.install_kernel_only(tmp_path / "nope.whl", tmp_path / "k", module=FAKE_MODULE)


def test_foreign_nonempty_dest_is_refused_and_kept(wheel, tmp_path):
    dest = tmp_path / "kernel"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        vi.install_kernel_only(wheel, dest, module=FAKE_MODULE)
    assert tree(dest) == {"mine.txt"}


def test_reinstall_replaces_an_earlier_install(tmp_path):
    dest = tmp_path / "kernel"
    vi.install_kernel_only(make_wheel(tmp_path), dest, module=FAKE_MODULE)
    files = dict(FAKE_FILES)
    files["vllm/kern/attn.py"] = "import vllm.kern.other\ndef unified_attention(**kw):\n    return 0\n"
    (tmp_path / "v2").mkdir()
    report = vi.install_kernel_only(make_wheel(tmp_path / "v2", files), dest, module=FAKE_MODULE)
    expected = {
        "vllm/__init__.py", "vllm/version.py", "vllm/kern/__init__.py", "vllm/kern/attn.py",
        "vllm/kern/other.py", "vllm-0.0.1.dist-info/METADATA",
    }
    assert set(report.files) == expected
    assert tree(dest) == expected | {vk.MANIFEST_NAME}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".kernel")] == []


def test_failing_import_is_reported(tmp_path):
    files = dict(FAKE_FILES)
    files["vllm/kern/attn.py"] = "raise ValueError('broken kernel module')\n"
    with pytest.raises(RuntimeError, match="broken kernel module"):
        vi.install_kernel_only(make_wheel(tmp_path, files), tmp_path / "k", module=FAKE_MODULE)
    assert not (tmp_path / "k").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="this python has torch")
def test_missing_torch_is_named(tmp_path):
    files = dict(FAKE_FILES)
    files["vllm/kern/attn.py"] = "import torch\n"
    with pytest.raises(RuntimeError, match=r"lacks torch.*needs torch and triton"):
        vi.install_kernel_only(make_wheel(tmp_path, files), tmp_path / "k", module=FAKE_MODULE)


def test_triton_stand_in_is_refused(tmp_path):
    files = dict(FAKE_FILES)
    files["vllm/triton_utils/__init__.py"] = "HAS_TRITON = False\n"
    files["vllm/kern/attn.py"] = "import vllm.triton_utils\n"
    with pytest.raises(RuntimeError, match="no-op stand-in"):
        vi.install_kernel_only(make_wheel(tmp_path, files), tmp_path / "k", module=FAKE_MODULE)


def test_bad_module_name_and_missing_python(wheel, tmp_path):
    with pytest.raises(ValueError, match="module name"):
        vi.install_kernel_only(wheel, tmp_path / "k", module="vllm..x")
    with pytest.raises(ValueError, match="python interpreter not found"):
        vi.install_kernel_only(wheel, tmp_path / "k", module=FAKE_MODULE, python=str(tmp_path / "nopython"))


# ----------------------------------------------------------------- status


def test_status_reports_unavailable_without_install(tmp_path, monkeypatch):
    monkeypatch.setenv(vk.ENV_DIR, str(tmp_path / "absent"))
    status = vk.vllm_status(tmp_path / "absent")
    assert status["available"] is False
    assert status["source"] == "kernel-only"
    assert "no kernel-only vLLM install" in status["reason"]
    if importlib.util.find_spec("vllm") is None and "vllm" not in sys.modules:
        status = vk.vllm_status()  # falls back to the env var
        assert status["available"] is False and str(tmp_path / "absent") == status["path"]


def test_status_names_a_missing_metadata_or_a_present_pynvml(tmp_path):
    kdir = tmp_path / "k"
    (kdir / "vllm/v1/attention/ops").mkdir(parents=True)
    (kdir / (vk.KERNEL_MODULE.replace(".", "/") + ".py")).write_text("")
    status = vk.vllm_status(kdir)
    assert not status["available"] and "METADATA" in status["reason"]
    (kdir / "vllm-0.33.0.dist-info").mkdir()
    (kdir / "vllm-0.33.0.dist-info/METADATA").write_text("Name: vllm\nVersion: 0.33.0\n")
    (kdir / "vllm/third_party").mkdir()
    (kdir / "vllm/third_party/pynvml.py").write_text("")
    status = vk.vllm_status(kdir)
    assert not status["available"] and "pynvml" in status["reason"]
    (kdir / "vllm/third_party/pynvml.py").unlink()
    status = vk.vllm_status(kdir)
    assert status["version"] == "0.33.0"
    has_gpu_stack = all(importlib.util.find_spec(m) for m in ("torch", "triton"))
    assert status["available"] is has_gpu_stack


# ----------------------------------------------------------------- decode argument checks (no torch)


class FakeTensor:
    """Just enough of a tensor for the argument checks."""

    def __init__(self, shape, dtype="torch.float16", device="cuda:0"):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device

    def dim(self):
        return len(self.shape)

    def stride(self, d):
        return 1 if d in (-1, len(self.shape) - 1) else 2


def decode_args(**over):
    args = dict(
        q=FakeTensor((4, 8, 64)),
        k_pool=FakeTensor((32, 16, 2, 64)),
        v_pool=FakeTensor((32, 16, 2, 64)),
        out=FakeTensor((4, 8, 64)),
        block_table=FakeTensor((4, 8), "torch.int32"),
        seq_lens=FakeTensor((4,), "torch.int32"),
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(q=FakeTensor((4, 8, 64, 1))), "q must be"),
        (dict(k_pool=FakeTensor((32, 16, 128))), "k_pool must be"),
        (dict(v_pool=FakeTensor((32, 16, 2, 32))), "v_pool shape"),
        (dict(out=FakeTensor((4, 8, 32))), "out shape"),
        (dict(k_pool=FakeTensor((32, 16, 3, 64)), v_pool=FakeTensor((32, 16, 3, 64))), "multiple of KV heads"),
        (dict(k_pool=FakeTensor((32, 16, 2, 128)), v_pool=FakeTensor((32, 16, 2, 128))), "head size"),
        (dict(q=FakeTensor((4, 8, 64), "torch.int8"), out=FakeTensor((4, 8, 64), "torch.int8")), "not supported"),
        (dict(v_pool=FakeTensor((32, 16, 2, 64), "torch.bfloat16")), "v_pool dtype"),
        (dict(block_table=FakeTensor((3, 8), "torch.int32")), "block_table must be"),
        (dict(block_table=FakeTensor((4, 8), "torch.int64")), "block_table must be int32"),
        (dict(seq_lens=FakeTensor((4,), "torch.int64")), "seq_lens must be int32"),
        (dict(seq_lens=FakeTensor((5,), "torch.int32")), "seq_lens must be"),
        (dict(k_pool=FakeTensor((32, 16, 2, 64), device="cpu")), "k_pool is on cpu"),
    ],
)
def test_decode_rejects_bad_arguments_before_loading(over, match):
    with pytest.raises(ValueError, match=match):
        vk.unified_attention_decode(**decode_args(**over), scale=0.125, max_seq_len=100)


@pytest.mark.parametrize("scale, max_seq_len", [(0.0, 10), (-1.0, 10), (0.1, 0), (0.1, 2.5)])
def test_decode_rejects_bad_scalars(scale, max_seq_len):
    with pytest.raises(ValueError):
        vk.prepare_decode(**decode_args(), scale=scale, max_seq_len=max_seq_len)


# ----------------------------------------------------------------- CLI


def test_cli_refuses_unsafe_wheel_and_prints_status(tmp_path, capsys):
    files = dict(FAKE_FILES)
    files["../evil.py"] = ""
    bad = make_wheel(tmp_path, files)
    assert vi.cli(["--wheel", str(bad), "--dest", str(tmp_path / "k")]) == 2
    assert "refusing" in capsys.readouterr().err
    assert vi.cli(["--status", "--dest", str(tmp_path / "k")]) == 0
    assert json.loads(capsys.readouterr().out)["available"] is False
    with pytest.raises(SystemExit):
        vi.cli([])


# ----------------------------------------------------------------- the real kernel

REAL_DIR = Path(os.environ.get(vk.ENV_DIR, vk.DEFAULT_KERNEL_DIR))


@pytest.mark.skipif(
    not (all(importlib.util.find_spec(m) for m in ("torch", "triton")) and (REAL_DIR / "vllm").is_dir()),
    reason="needs torch, triton and a kernel-only install (python -m lib vllm-kernel)",
)
def test_real_kernel_under_triton_interpreter():
    """vLLM's own kernel, run on the CPU by Triton's interpreter, through our wrapper."""
    code = (
        "import torch\n"
        "from tests.test_vllm_kernels import run_gqa_check\n"
        "errs = run_gqa_check('cpu', torch.float16)\n"
        "print(errs)\n"
        "assert max(errs.values()) < 2e-3, errs\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", UVM_STUDY_VLLM_DIR=str(REAL_DIR))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.gpu
def test_real_kernel_gqa_against_float64():
    torch = pytest.importorskip("torch")
    status = vk.vllm_status()
    if not status["available"]:
        pytest.skip(f"vLLM's kernel unavailable: {status['reason']}")
    errs = run_gqa_check("cuda", torch.float16, graph=True)
    assert max(errs.values()) < 2e-3, errs


def run_gqa_check(device: str, dtype, graph: bool = False) -> dict[str, float]:
    """GQA 8:2 decode on a shuffled paged cache, ragged lengths; max relative error per path."""
    import torch

    gen = torch.Generator().manual_seed(0)
    num_heads, kv_heads, head_size, block = 8, 2, 64, 16
    lens = [1, 17, 100]  # one token, one past a block, several blocks
    max_blocks = -(-max(lens) // block)
    num_blocks = 3 * max_blocks + 5
    k = torch.randn(num_blocks, block, kv_heads, head_size, generator=gen).to(device, dtype)
    v = torch.randn(num_blocks, block, kv_heads, head_size, generator=gen).to(device, dtype)
    q = torch.randn(len(lens), num_heads, head_size, generator=gen).to(device, dtype)
    table = torch.randperm(num_blocks, generator=gen)[: len(lens) * max_blocks].reshape(len(lens), max_blocks)
    table = table.to(device, torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = head_size**-0.5

    ref = torch.empty(q.shape, dtype=torch.float64)
    group = num_heads // kv_heads
    for s, n in enumerate(lens):
        kk = k[table[s].long()].reshape(-1, kv_heads, head_size)[:n].double().cpu().repeat_interleave(group, 1)
        vv = v[table[s].long()].reshape(-1, kv_heads, head_size)[:n].double().cpu().repeat_interleave(group, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[s].double().cpu(), kk) * scale, dim=-1)
        ref[s] = torch.einsum("hn,nhd->hd", p, vv)

    errs = {}
    for name, threshold in (("split_k", None), ("one_pass", 0)):
        out = torch.full_like(q, float("nan"))
        launch = vk.prepare_decode(q, k, v, out, table, seq_lens, scale=scale, max_seq_len=max(lens), seq_threshold_3d=threshold)
        assert launch.scratch.split_k is (threshold is None)
        launch()
        if graph:
            out.fill_(float("nan"))
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                launch()
            g.replay()
            torch.cuda.synchronize()
        errs[name] = ((out.double().cpu() - ref).abs().max() / ref.abs().max()).item()
    eager = torch.full_like(q, float("nan"))
    vk.unified_attention_decode(q, k, v, eager, table, seq_lens, scale=scale, max_seq_len=max(lens))
    errs["eager"] = ((eager.double().cpu() - ref).abs().max() / ref.abs().max()).item()
    return errs
