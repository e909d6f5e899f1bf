"""Kernel-only FlashInfer installs from tiny synthetic wheels (CPU, no torch, no real nvcc).

The fake FlashInfer behaves like the real one where the install looks: its package imports read a
data file, its JIT getters read a template and write a generated source, and its specs give nvcc
commands. A fake torch (three dtype names) and a fake nvcc (follows #include like `nvcc -M`) stand
in for the real tools.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import pytest

from lib.__main__ import main
from lib.engine.backends import flashinfer as fe
from lib.tools import flashinfer_install as fi

CORE = r'''
import os
NVCC = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
class JitSpec:
    def __init__(self, name, sources):
        self.name, self.sources = name, sources
    def build_and_load(self):
        raise RuntimeError("the probe must not compile")
    def get_compile_commands(self):
        inc = os.path.join(DATA, "include")
        return [{"command": f"{NVCC} -c {s} -isystem {inc} -DX=1 -o {s}.o"} for s in self.sources]
def gen(name, template):
    with open(os.path.join(DATA, "csrc", template)) as f:  # as FlashInfer reads its jinja templates
        text = f.read()
    d = os.path.join(os.environ["FLASHINFER_WORKSPACE_BASE"], "generated", name)
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, "kernel.cu")
    with open(src, "w") as f:
        f.write(text)
    return JitSpec(name, [src])
'''

FAKE_FI = {
    "flashinfer/__init__.py": (
        "import os\n"
        "from .version import __version__\n"
        "from . import jit, decode, prefill\n"
        "with open(os.path.join(os.path.dirname(__file__), 'tables', 'tiles.json')) as f:\n"
        "    TILES = f.read()\n"),
    "flashinfer/version.py": "__version__ = '0.0.1'\n",
    "flashinfer/jit/__init__.py": "from . import core\n",
    "flashinfer/jit/core.py": CORE,
    "flashinfer/decode.py": (
        "import torch, tvm_ffi\n"
        "from .jit import core\n"
        "def get_batch_decode_module(*args):\n"
        "    return core.gen('decode_%s_%s' % (args[0], args[4]), 'decode.jinja').build_and_load()\n"),
    "flashinfer/prefill.py": (
        "from .jit import core\n"
        "def get_batch_prefill_module(backend, *args):\n"
        "    assert backend == 'fa2'\n"
        "    return core.gen('prefill_%s_%s' % (args[0], args[4]), 'prefill.jinja').build_and_load()\n"),
    "flashinfer/unused_module.py": "raise RuntimeError('must not be imported')\n",
    "flashinfer/tables/tiles.json": '{"tile": 16}\n',
    "flashinfer/tables/unused.json": "{}\n",
    "flashinfer/data/__init__.py": "",
    "flashinfer/data/csrc/decode.jinja": "#include <flashinfer/decode.cuh>\n",
    "flashinfer/data/csrc/prefill.jinja": "#include <flashinfer/prefill.cuh>\n",
    "flashinfer/data/csrc/other.jinja": "#include <flashinfer/unused.cuh>\n",
    "flashinfer/data/include/flashinfer/decode.cuh": '#include "common.cuh"\n',
    "flashinfer/data/include/flashinfer/prefill.cuh": '#include "common.cuh"\n',
    "flashinfer/data/include/flashinfer/common.cuh": "// shared\n",
    "flashinfer/data/include/flashinfer/unused.cuh": "// " + "x" * 5000 + "\n",
    "build_backend.py": "# build-time only\n",
    "flashinfer_python-0.0.1.dist-info/METADATA": (
        "Metadata-Version: 2.4\nName: flashinfer-python\nVersion: 0.0.1\n"
        "Requires-Dist: apache-tvm-ffi<0.2,>=0.1.1\nRequires-Dist: torch\n\nLong text.\n"),
    "flashinfer_python-0.0.1.dist-info/RECORD": "",
    "flashinfer_python-0.0.1.dist-info/licenses/LICENSE": "Apache-2.0\n",
}

EXPECTED_FI = {
    "flashinfer/__init__.py", "flashinfer/version.py", "flashinfer/jit/__init__.py",
    "flashinfer/jit/core.py", "flashinfer/decode.py", "flashinfer/prefill.py",
    "flashinfer/tables/tiles.json", "flashinfer/data/__init__.py",
    "flashinfer/data/csrc/decode.jinja", "flashinfer/data/csrc/prefill.jinja",
    # the JIT's sources are kept whole (plan() picks the module on the GPU); their headers are not
    "flashinfer/data/csrc/other.jinja",
    "flashinfer/data/include/flashinfer/decode.cuh", "flashinfer/data/include/flashinfer/prefill.cuh",
    "flashinfer/data/include/flashinfer/common.cuh",
    "flashinfer_python-0.0.1.dist-info/METADATA", "flashinfer_python-0.0.1.dist-info/licenses/LICENSE",
}

FAKE_TVM = {
    "tvm_ffi/__init__.py": "__version__ = '0.1.5'\n",
    "tvm_ffi/lib/libtvm_ffi.so": "not really a shared object",
    "tvm_ffi/include/tvm/ffi/c_api.h": "// api\n",
    "apache_tvm_ffi-0.1.5.dist-info/METADATA": "Metadata-Version: 2.4\nName: apache-tvm-ffi\nVersion: 0.1.5\n\n",
    "apache_tvm_ffi-0.1.5.dist-info/RECORD": "",
    "apache_tvm_ffi-0.1.5.data/scripts/tvm-ffi-config": "#!/bin/sh\n",
}
EXPECTED_TVM = set(FAKE_TVM) - {"apache_tvm_ffi-0.1.5.data/scripts/tvm-ffi-config"}

FAKE_NVCC = r'''
import os, re, sys
args = sys.argv[1:]
mf = args[args.index("-MF") + 1]
dirs = [args[i + 1] for i, a in enumerate(args) if a in ("-isystem", "-I")]
src = next(a for a in args if a.endswith(".cu"))
seen, todo = [], [src]
while todo:
    f = todo.pop()
    if f in seen:
        continue
    seen.append(f)
    for m in re.finditer(r'#include [<"]([^>"]+)[>"]', open(f).read()):
        for d in [os.path.dirname(f)] + dirs:
            c = os.path.join(d, m.group(1))
            if os.path.isfile(c):
                todo.append(c)
                break
        else:
            sys.exit("fatal error: " + m.group(1) + ": No such file or directory")
with open(mf, "w") as out:
    out.write("kernel.o : " + " \\\n    ".join(seen) + "\n")
'''


def make_wheel(directory: Path, files: dict[str, str], name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
    return path


def tree(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture
def wheels(tmp_path: Path) -> tuple[Path, Path]:
    return (make_wheel(tmp_path / "w", FAKE_FI, "flashinfer_python-0.0.1-py3-none-any.whl"),
            make_wheel(tmp_path / "w", FAKE_TVM, "apache_tvm_ffi-0.1.5-py3-none-any.whl"))


@pytest.fixture
def tools(tmp_path: Path, monkeypatch) -> Path:
    """A fake torch (returned: put it on the probe's path) and a fake nvcc under CUDA_HOME."""
    torch_dir = tmp_path / "fake-site"
    (torch_dir / "torch").mkdir(parents=True)
    (torch_dir / "torch" / "__init__.py").write_text(
        "__version__ = '0.0+fake'\nfloat16, bfloat16, int32 = 'float16', 'bfloat16', 'int32'\n")
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    nvcc = cuda / "bin" / "nvcc"
    nvcc.write_text(f"#!{sys.executable}\n{FAKE_NVCC}")
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(cuda))
    return torch_dir


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch) -> Path:
    """Point tempfile at an empty folder, so tests can see whether anything was left."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(fi.tempfile, "tempdir", str(scratch))
    return scratch


def install(wheels, dest, tools, **kw):
    kw = {"dtypes": ("float16",), "head_dims": (64,), "probe_path": [tools], **kw}
    return fi.install_kernel_only(wheels[0], wheels[1], dest, **kw)


# ----------------------------------------------------------------- archive members


@pytest.mark.parametrize("member", ["../evil.py", "flashinfer/../../evil.py", "/etc/evil.py", "\\evil.py",
                                    "C:/evil.py", "C:evil.py", "flashinfer\\..\\..\\evil.py"])
@pytest.mark.parametrize("which", ["flashinfer", "tvm"])
def test_unsafe_members_are_refused_before_anything_is_written(tmp_path, tools, private_tmp, member, which):
    fi_files, tvm_files = dict(FAKE_FI), dict(FAKE_TVM)
    (fi_files if which == "flashinfer" else tvm_files)[member] = "boom"
    bad = (make_wheel(tmp_path / "w", fi_files, "flashinfer_python-0.0.1-py3-none-any.whl"),
           make_wheel(tmp_path / "w", tvm_files, "apache_tvm_ffi-0.1.5-py3-none-any.whl"))
    before = tree(tmp_path)
    dest = tmp_path / "kernel"
    name = bad[0].name if which == "flashinfer" else bad[1].name
    with pytest.raises(ValueError, match=rf"refusing {name}: member .* is unsafe"):
        install(bad, dest, tools)
    assert not dest.exists()
    assert tree(tmp_path) == before
    assert list(private_tmp.iterdir()) == []


def test_symlink_members_are_refused(tmp_path):
    path = tmp_path / "link.whl"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("flashinfer/evil")
        info.external_attr = (0o120777 << 16)  # S_IFLNK
        zf.writestr(info, "/etc/passwd")
    with zipfile.ZipFile(path) as zf, pytest.raises(ValueError, match="symbolic link"):
        fi.check_members(zf, path.name)


def test_safe_member_names_pass():
    for name in ["flashinfer/a.py", "flashinfer/..hidden/x.py", "a..b/c.py",
                 "flashinfer_python-0.7.2.post1.dist-info/METADATA"]:
        assert fi.unsafe_member(name) is None, name
    assert fi.unsafe_member("") and fi.unsafe_member("a\x00b")


def test_wheels_without_metadata_or_of_the_wrong_package_are_refused(tmp_path, wheels, tools):
    files = {k: v for k, v in FAKE_FI.items() if not k.endswith("METADATA")}
    no_meta = make_wheel(tmp_path / "x", files, "flashinfer_python-0.0.1-py3-none-any.whl")
    with pytest.raises(ValueError, match="METADATA"):
        install((no_meta, wheels[1]), tmp_path / "k", tools)
    with pytest.raises(ValueError, match="is not a wheel of apache-tvm-ffi"):
        install((wheels[0], wheels[0]), tmp_path / "k", tools)  # the FlashInfer wheel given twice
    with pytest.raises(ValueError, match="is not a wheel of flashinfer-python"):
        install((wheels[1], wheels[1]), tmp_path / "k", tools)


def test_not_a_zip_and_missing_wheels_are_refused(tmp_path, wheels, tools):
    junk = tmp_path / "x.whl"
    junk.write_text("not a zip")
    with pytest.raises(ValueError, match="not a zip"):
        install((junk, wheels[1]), tmp_path / "k", tools)
    with pytest.raises(ValueError, match="not found"):
        install((wheels[0], tmp_path / "nope.whl"), tmp_path / "k", tools)


def test_a_tvm_ffi_the_flashinfer_wheel_does_not_accept_is_refused(tmp_path, wheels, tools):
    pytest.importorskip("packaging")
    files = {k.replace("0.1.5", "0.0.9"): v.replace("0.1.5", "0.0.9") for k, v in FAKE_TVM.items()}
    old = make_wheel(tmp_path / "old", files, "apache_tvm_ffi-0.0.9-py3-none-any.whl")
    with pytest.raises(ValueError, match=r"requires apache-tvm-ffi<0.2,>=0.1.1; .* is 0.0.9"):
        install((wheels[0], old), tmp_path / "k", tools)


def test_wheel_tags_give_the_one_cpython_of_a_compiled_wheel():
    assert fi.wheel_tags("apache_tvm_ffi-0.1.15.post2-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl") \
        == ("cp312", "cp312", "manylinux_2_24_x86_64.manylinux_2_28_x86_64")
    assert fi._python_tag(Path("apache_tvm_ffi-0.1.15-cp312-cp312-manylinux_2_28_x86_64.whl")) == "cp312"
    assert fi._python_tag(Path("x-1.0-cp39-abi3-manylinux_2_28_x86_64.whl")) is None
    assert fi._python_tag(Path("x-1.0-py3-none-any.whl")) is None
    with pytest.raises(ValueError, match="not a wheel file name"):
        fi.wheel_tags("x-1.0.tar.gz")


# ----------------------------------------------------------------- the install


def test_install_keeps_what_the_decode_imports_opens_and_includes(wheels, tmp_path, tools, private_tmp):
    dest = tmp_path / "kernel"
    report = install(wheels, dest, tools)
    assert set(report.files) == EXPECTED_FI | EXPECTED_TVM
    assert tree(dest) == EXPECTED_FI | EXPECTED_TVM | {fe.MANIFEST_NAME}
    assert report.version == "0.0.1" and report.tvm_ffi_version == "0.1.5"
    assert report.bytes == sum((dest / f).stat().st_size for f in report.files)
    assert report.jit_modules == ("decode_float16_64", "prefill_float16_64")
    assert report.third_party == ()
    assert list(private_tmp.iterdir()) == []  # the unpacked wheels are gone


def test_manifest_records_versions_wheels_files_and_the_probe(wheels, tmp_path, tools):
    dest = tmp_path / "kernel"
    report = install(wheels, dest, tools, dtypes=("float16", "bfloat16"), head_dims=(64, 128))
    m = json.loads((dest / fe.MANIFEST_NAME).read_text())
    assert m["flashinfer_version"] == "0.0.1" and m["tvm_ffi_version"] == "0.1.5"
    assert m["python_tag"] is None  # a pure test wheel; a cp312 one records "cp312"
    for key, wheel in (("flashinfer", wheels[0]), ("tvm_ffi", wheels[1])):
        assert m["wheels"][key] == {"name": wheel.name, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
    assert m["files"] == sorted(EXPECTED_FI) and m["tvm_ffi_files"] == sorted(EXPECTED_TVM)
    assert m["total_bytes"] == report.bytes
    assert m["created"].endswith("+00:00")
    assert m["probe"]["torch"] == "0.0+fake" and m["probe"]["version"] == "0.0.1"
    assert m["probe"]["dtypes"] == ["float16", "bfloat16"] and m["probe"]["head_dims"] == [64, 128]
    assert len(m["probe"]["jit_modules"]) == 8 and m["probe"]["nvcc_commands"] == 8
    assert m["env"]["FLASHINFER_DISABLE_VERSION_CHECK"] == "1"


def test_the_install_is_what_the_engine_finds(wheels, tmp_path, tools):
    dest = tmp_path / "kernel"
    install(wheels, dest, tools)
    status = fe.flashinfer_status(dest)
    assert status["source"] == "kernel-only" and status["version"] == "0.0.1"
    assert status["tvm_ffi_version"] == "0.1.5"


def test_a_probe_python_without_torch_is_named(wheels, tmp_path, tools):
    with pytest.raises(RuntimeError, match="has no torch"):
        install(wheels, tmp_path / "k", tools, probe_path=[])


def test_no_nvcc_is_a_clear_error(wheels, tmp_path, tools, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    with pytest.raises(RuntimeError, match="nvcc not found"):
        install(wheels, tmp_path / "k", tools)


def test_a_missing_header_fails_the_install(tmp_path, tools):
    files = {k: v for k, v in FAKE_FI.items() if not k.endswith("common.cuh")}
    broken = (make_wheel(tmp_path / "b", files, "flashinfer_python-0.0.1-py3-none-any.whl"),
              make_wheel(tmp_path / "b", FAKE_TVM, "apache_tvm_ffi-0.1.5-py3-none-any.whl"))
    with pytest.raises(RuntimeError, match="nvcc -M failed .*common.cuh"):
        install(broken, tmp_path / "k", tools)


def test_bad_probe_settings_are_refused(wheels, tmp_path, tools):
    with pytest.raises(ValueError, match="float32"):
        install(wheels, tmp_path / "k", tools, dtypes=("float32",))
    with pytest.raises(ValueError, match="head_dims"):
        install(wheels, tmp_path / "k", tools, head_dims=())


def test_foreign_nonempty_dest_is_refused_and_kept(wheels, tmp_path, tools):
    dest = tmp_path / "kernel"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        install(wheels, dest, tools)
    assert tree(dest) == {"mine.txt"}


def test_reinstall_replaces_an_earlier_install(wheels, tmp_path, tools):
    dest = tmp_path / "kernel"
    install(wheels, dest, tools)
    (dest / "flashinfer" / "stale.py").write_text("")
    install(wheels, dest, tools)
    assert tree(dest) == EXPECTED_FI | EXPECTED_TVM | {fe.MANIFEST_NAME}
    assert not any(p.name.startswith(".kernel.") for p in tmp_path.iterdir())


def test_a_gpu_trace_adds_files_and_bad_entries_are_refused(wheels, tmp_path, tools):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"used": ["flashinfer/tables/unused.json"]}))
    report = install(wheels, tmp_path / "k", tools, extra_trace=trace)
    assert "flashinfer/tables/unused.json" in report.files
    for entry, why in (("../x.py", "not a path inside"), ("tvm_ffi/x.py", "not a path inside"),
                       ("flashinfer/absent.py", "not a file of this wheel")):
        trace.write_text(json.dumps({"used": [entry]}))
        with pytest.raises(ValueError, match=why):
            install(wheels, tmp_path / "k2", tools, extra_trace=trace)
    trace.write_text("{}")
    with pytest.raises(ValueError, match="not a flashinfer trace"):
        install(wheels, tmp_path / "k2", tools, extra_trace=trace)


def test_metadata_headers_keep_every_requirement():
    meta = fi.read_metadata("Name: x\nVersion: 1\nRequires-Dist: a\nRequires-Dist: b>1\n\nRequires-Dist: body\n")
    assert meta["Version"] == "1" and meta["Requires-Dist"] == ["a", "b>1"]


# ----------------------------------------------------------------- command line


def test_cli_needs_both_wheels(wheels, capsys):
    with pytest.raises(SystemExit) as exc:
        fi.cli(["--wheel", str(wheels[0])])
    assert exc.value.code == 2
    assert "--tvm-ffi-wheel" in capsys.readouterr().err


def test_cli_installs_and_reports(wheels, tmp_path, tools, capsys, monkeypatch):
    monkeypatch.setattr(fi, "install_kernel_only",
                        lambda *a, **kw: fi.InstallReport(("f",), 2_000_000, "0.0.1", "0.1.5", tmp_path, ("requests",), ("m",)))
    assert fi.cli(["--wheel", str(wheels[0]), "--tvm-ffi-wheel", str(wheels[1]), "--dest", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "FlashInfer 0.0.1 + tvm-ffi 0.1.5 kernel-only install: 1 files, 2.0 MB" in out
    assert "requests" in out


def test_cli_turns_install_errors_into_one_line(wheels, tmp_path, capsys):
    assert fi.cli(["--wheel", str(tmp_path / "nope.whl"), "--tvm-ffi-wheel", str(wheels[1])]) == 2
    assert capsys.readouterr().err.startswith("error: wheel file not found")


def test_status_command_reports_a_missing_install(tmp_path, capsys):
    assert main(["flashinfer-kernel", "--status", "--dest", str(tmp_path / "none")]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["available"] is False and "no kernel-only FlashInfer install" in status["reason"]


# ----------------------------------------------------------------- the wheelhouse


def test_wheelhouse_plan_brings_ninja_for_flashinfer(tmp_path, capsys):
    assert main(["wheelhouse", "--dry-run", "--flashinfer", "--dest", str(tmp_path / "wh")]) == 0
    cmd = capsys.readouterr().out.split()
    assert "ninja" in cmd and "papermill>=2.6" in cmd


def test_wheelhouse_refuses_half_or_doubled_flashinfer_arguments(tmp_path, capsys):
    assert main(["wheelhouse", "--dry-run", "--flashinfer-wheel", "x.whl", "--dest", str(tmp_path)]) == 2
    assert "--tvm-ffi-wheel" in capsys.readouterr().err
    assert main(["wheelhouse", "--dry-run", "--flashinfer", "0.7.2.post1", "--flashinfer-wheel", "x.whl",
                 "--tvm-ffi-wheel", "y.whl", "--dest", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err


def test_wheelhouse_makes_the_install_and_adds_what_it_imports(wheels, tmp_path, tools, monkeypatch):
    from lib.tools import wheelhouse

    calls, run = [], wheelhouse.subprocess.run

    def fake_run(cmd, **kw):  # pip download only: the probe really runs
        if "download" not in cmd:
            return run(cmd, **kw)
        calls.append(cmd)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(wheelhouse.subprocess, "run", fake_run)
    real = fi.install_kernel_only
    monkeypatch.setattr(fi, "install_kernel_only",
                        lambda w, t, d, **kw: real(w, t, d, dtypes=("float16",), head_dims=(64,),
                                                   probe_path=[tools], **kw))
    dest = tmp_path / "wh"
    assert wheelhouse.build(dest, python_version="3.12", platform="manylinux_2_28_x86_64", book=False,
                            flashinfer_wheel=str(wheels[0]), tvm_ffi_wheel=str(wheels[1])) == 0
    assert (dest / "flashinfer-kernel" / fe.MANIFEST_NAME).is_file()
    assert "ninja" in (dest / "requirements.txt").read_text()
    assert "flashinfer-kernel" in (dest / "install.sh").read_text()
    assert calls and "ninja" in calls[-1]
