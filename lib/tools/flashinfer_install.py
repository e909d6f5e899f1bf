"""Kernel-only FlashInfer install: what its paged decode imports and JIT-compiles, from the wheels.

flashinfer-python 0.7.2.post1 is a 62 MB wheel that unpacks to 427 MB (kernels of every model
family, CUTLASS, CCCL); its paged decode needs a small part of it, and apache-tvm-ffi (its FFI,
compiled for one CPython). The part is found by running, never from a list: a probe in a python
with torch (no GPU needed) imports FlashInfer from the unpacked wheel with an audit hook on
``open``, asks FlashInfer's JIT for the modules ``BatchDecodeWithPagedKVCacheWrapper.plan`` builds
(the CUDA-core decode and the tensor-core "fa2" prefill kernel, per dtype and head size; they are
generated from templates the hook sees read), and runs each of their nvcc commands with ``-M``
(the preprocessor's dependency list, the same list the real compile's ``-MD`` gives). Kept:
the modules imported, files opened, headers the kernels include, every package ``__init__.py`` on
the way, the dist-info METADATA, and tvm-ffi whole. Every member of both archives is checked first.

On the GPU node the install is checked by running it (:func:`trace_on_gpu`,
``python -m lib flashinfer-kernel --trace FILE``): it records the modules the decode imported, the
files it opened and the headers ninja recorded for each JIT module in FlashInfer's cache, and
names any the install lacks (``--add-trace FILE`` adds them at the next install); a module or
header missing outright fails that run with its name.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from lib import ROOT
from lib.engine.backends.vllm import canonical_name
from lib.tools.wheel_files import (check_members, find_metadata, sha256_file,  # noqa: F401
                                   swap_in, unsafe_member)
from lib.engine.backends.flashinfer import (DEFAULT_KERNEL_DIR, ENV_DIR, MANIFEST_NAME,
                                            SUPPORTED_DTYPES, flashinfer_status)

DEFAULT_VERSION = "0.7.2.post1"
PACKAGE, DIST = "flashinfer", "flashinfer-python"
TVM_PACKAGE, TVM_DIST = "tvm_ffi", "apache-tvm-ffi"
#: What the probe asks FlashInfer's JIT for by default (the study's dtypes; head sizes whose
#: kernels the correctness matrix runs). Headers do not depend on them; templates might.
DEFAULT_DTYPES = SUPPORTED_DTYPES
DEFAULT_HEAD_DIMS = (64, 128, 256)
#: Target for the probe's nvcc commands: Hopper (the study's H100/H200); only the dependency scan
#: uses it, the node compiles for its own GPU.
DEFAULT_ARCH = "9.0a"


@dataclasses.dataclass(frozen=True)
class InstallReport:
    """What an install wrote; ``third_party``: distributions FlashInfer imported beyond torch's
    own requirements (the target python needs them too)."""

    files: tuple[str, ...]
    bytes: int
    version: str
    tvm_ffi_version: str
    dest: Path
    third_party: tuple[str, ...] = ()
    jit_modules: tuple[str, ...] = ()


# --------------------------------------------------------------------------- archives


def read_metadata(text: str) -> dict[str, Any]:
    """A METADATA file's headers (first value of each; ``Requires-Dist`` as a list)."""
    fields: dict[str, Any] = {"Requires-Dist": []}
    for line in text.splitlines():
        if not line.strip():
            break  # the long description starts after the first blank line
        key, sep, value = line.partition(":")
        if not sep or key.startswith((" ", "\t")):
            continue
        key, value = key.strip(), value.strip()
        if key == "Requires-Dist":
            fields[key].append(value)
        else:
            fields.setdefault(key, value)
    return fields


def wheel_tags(filename: str) -> tuple[str, str, str]:
    """(python, abi, platform) tags of a wheel file name (PEP 427)."""
    parts = Path(filename).name[:-4].split("-") if filename.endswith(".whl") else []
    if len(parts) not in (5, 6):
        raise ValueError(f"{filename} is not a wheel file name (name-version-python-abi-platform.whl)")
    return parts[-3], parts[-2], parts[-1]


def _python_tag(tvm_wheel: Path) -> str | None:
    """The one CPython a compiled wheel runs on (``cp312``), or None (abi3 / pure)."""
    py, abi, _ = wheel_tags(tvm_wheel.name)
    return py if abi.startswith("cp") and re.fullmatch(r"cp\d+", py) else None


@dataclasses.dataclass
class Wheel:
    path: Path
    names: list[str]
    meta_member: str
    meta: dict[str, Any]

    @property
    def version(self) -> str:
        return self.meta.get("Version") or ""


def open_wheel(path: Path, dist: str) -> Wheel:
    """Check a wheel's every member and read its METADATA (ValueError with the reason)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"wheel file not found: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a zip archive (wheel)") from None
    with zf:
        names = check_members(zf, path.name)
        member = find_metadata(names, dist, path.name)
        meta = read_metadata(zf.read(member).decode("utf-8", "replace"))
    if not meta.get("Version"):
        raise ValueError(f"{path.name}: {member} names no Version")
    return Wheel(path, names, member, meta)


def _check_tvm_requirement(fi: Wheel, tvm: Wheel) -> None:
    """Refuse a tvm-ffi the FlashInfer wheel does not accept (when `packaging` is here to say)."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:
        return
    for text in fi.meta["Requires-Dist"]:
        req = Requirement(text)
        if canonical_name(req.name) == canonical_name(TVM_DIST) and not req.marker:
            if not req.specifier.contains(Version(tvm.version), prereleases=True):
                raise ValueError(f"{fi.path.name} requires {text}; {tvm.path.name} is {tvm.version}")


def _extract(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        check_members(zf, wheel.name)  # checked again: this is the archive actually unpacked
        zf.extractall(dest)


# --------------------------------------------------------------------------- the probe

# Runs in the target python (with torch): argv[1] is a json config. Writes what FlashInfer's
# decode path imported, opened and (through nvcc -M) included; never raises (errors go into it).
_PROBE = r"""
import concurrent.futures, hashlib, importlib, importlib.machinery, importlib.metadata, json, os
import re, shlex, subprocess, sys
cfg = json.load(open(sys.argv[1]))
root = os.path.realpath(cfg["root"])
pkg_root = os.path.join(root, "flashinfer") + os.sep
opened = set()
def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        opened.add(os.path.realpath(os.fsdecode(args[0])))
result = {"ok": False, "python": sys.version.split()[0],
          "python_tag": "cp%d%d" % sys.version_info[:2]}
def finish():
    with open(cfg["out"], "w") as fh:
        json.dump(result, fh)
for p in reversed(cfg.get("path") or []):
    sys.path.insert(0, p)
try:  # preloaded: third_party then lists only what FlashInfer adds to torch
    import torch
    result["torch"] = torch.__version__
except ImportError:
    result["torch"] = None
before = {m.split(".")[0] for m in sys.modules}
sys.path.insert(0, root)
if cfg.get("tvm_root"):
    sys.path.insert(1, os.path.realpath(cfg["tvm_root"]))
sys.addaudithook(_hook)
try:
    import flashinfer, flashinfer.decode, flashinfer.prefill
    from flashinfer.jit import core as jit_core
    result["version"] = flashinfer.__version__
    import tvm_ffi
    result["tvm_ffi"] = {"version": getattr(tvm_ffi, "__version__", None),
                         "file": os.path.realpath(tvm_ffi.__file__)}
except BaseException as exc:
    result["error"] = "%s: %s" % (type(exc).__name__, exc)
    result["missing"] = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
    finish(); sys.exit(0)

# The modules BatchDecodeWithPagedKVCacheWrapper.plan builds (FlashInfer 0.7): the CUDA-core decode
# and, with tensor cores, the fa2 prefill kernel. Record each spec instead of compiling it.
specs = []
class _Recorded(Exception):
    pass
def _record(self, *a, **k):
    specs.append(self)
    raise _Recorded()
for cls in vars(jit_core).values():
    if isinstance(cls, type) and "build_and_load" in vars(cls):
        cls.build_and_load = _record
getters = {"decode": (flashinfer.decode, "get_batch_decode_module", ()),
           "tensor_cores": (flashinfer.prefill, "get_batch_prefill_module", ("fa2",))}
try:
    for path, (mod, name, head) in getters.items():
        if not hasattr(mod, name):
            raise RuntimeError("%s has no %s: the probe knows FlashInfer 0.7's decode path"
                               % (mod.__name__, name))
        for dt in cfg["dtypes"]:
            dtype = getattr(torch, dt)
            for hd in cfg["head_dims"]:
                args = head + (dtype, dtype, dtype, torch.int32, hd, hd, 0, False, False)
                if path == "tensor_cores":
                    args += (False,)  # use_fp16_qk_reduction
                try:
                    getattr(mod, name)(*args)
                except _Recorded:
                    pass
except BaseException as exc:
    result["error"] = "JIT generation: %s: %s" % (type(exc).__name__, exc)
    finish(); sys.exit(0)
result["jit_modules"] = sorted({s.name for s in specs})

def _scan(cmd):
    argv = shlex.split(cmd)
    if "-o" in argv:
        i = argv.index("-o"); del argv[i:i + 2]
    argv = [a for a in argv if a != "-c"]
    key = hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:16]
    dep = os.path.join(cfg["workspace"], "deps-%s.d" % key)
    p = subprocess.run(argv + ["-M", "-MF", dep], capture_output=True, text=True)
    if p.returncode != 0:
        return None, "nvcc -M failed (%d): %s" % (p.returncode, (p.stderr or p.stdout)[-1500:])
    text = open(dep).read().replace("\\\n", " ")
    return text.partition(":")[2].split(), None
cmds = sorted({c["command"] for s in specs for c in s.get_compile_commands()})
result["nvcc_commands"] = len(cmds)
deps, errors = set(), []
with concurrent.futures.ThreadPoolExecutor(max(1, int(cfg.get("jobs") or 1))) as pool:
    for found, err in pool.map(_scan, cmds):
        if err:
            errors.append(err)
        else:
            deps.update(os.path.realpath(d) for d in found)
if errors:
    result["error"] = errors[0]
    finish(); sys.exit(0)
result["jit_deps"] = sorted(os.path.relpath(d, root) for d in deps if d.startswith(pkg_root))
result["jit_deps_outside"] = len([d for d in deps if not d.startswith(pkg_root)])

mods, outside = {}, []
for name, mod in list(sys.modules.items()):
    if name != "flashinfer" and not name.startswith("flashinfer."):
        continue
    f = getattr(mod, "__file__", None)
    if not f:
        continue  # namespace package
    f = os.path.realpath(f)
    if f.startswith(root + os.sep):
        mods[name] = os.path.relpath(f, root)
    else:
        outside.append(f)
result["modules"], result["outside"] = mods, outside
result["data_files"] = sorted(os.path.relpath(p, root) for p in opened
                              if p.startswith(pkg_root) and "__pycache__" not in p and os.path.isfile(p))
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
def _requires(dist):
    try:
        reqs = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [re.match(r"[A-Za-z0-9._-]+", r).group(0) for r in reqs if "extra ==" not in r]
covered, todo = set(), ["torch"]
while todo:
    d = norm(todo.pop())
    if d not in covered:
        covered.add(d)
        todo.extend(_requires(d))
dists = importlib.metadata.packages_distributions()
needed = set()
for m in {m.split(".")[0] for m in sys.modules} - before - set(sys.stdlib_module_names) - {"flashinfer", "tvm_ffi"}:
    if m.startswith("_"):
        continue
    owners = dists.get(m)
    if owners:
        needed.update(norm(o) for o in owners)
    elif getattr(sys.modules.get(m), "__file__", None):
        needed.add(m)
result["third_party"] = sorted(needed - covered - {"apache-tvm-ffi", "flashinfer-python"})
result["ok"] = True
finish()
"""


def _probe_env(workspace: Path, arch: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLASHINFER_CUDA_ARCH_LIST")}
    env.update(CUDA_VISIBLE_DEVICES="", FLASHINFER_WORKSPACE_BASE=str(workspace),
               FLASHINFER_CUDA_ARCH_LIST=arch, FLASHINFER_DISABLE_VERSION_CHECK="1",
               TVM_FFI_CACHE_DIR=str(workspace / "tvm-ffi"))
    if not env.get("CUDA_HOME") and not env.get("CUDA_PATH") and Path("/usr/local/cuda/bin/nvcc").is_file():
        env["CUDA_HOME"] = "/usr/local/cuda"  # else FlashInfer derives it from `which nvcc`
    return env


def _check_nvcc(env: dict[str, str]) -> str:
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    nvcc = str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc", path=env.get("PATH"))
    if not nvcc or not Path(nvcc).is_file():
        raise RuntimeError("nvcc not found: the install lists the headers FlashInfer's JIT compiles "
                           "by running its nvcc commands with -M (no GPU needed); set CUDA_HOME or put "
                           "nvcc on PATH")
    return nvcc


def probe(python: str, tree: Path, tvm_tree: Path | None, work: Path, *, dtypes=DEFAULT_DTYPES,
          head_dims=DEFAULT_HEAD_DIMS, arch: str = DEFAULT_ARCH, jobs: int | None = None,
          path: Iterable[Path] = ()) -> dict[str, Any]:
    """Run the probe in `python` on the unpacked wheels; return its json (see `_PROBE`).
    `path`: folders put before that python's own sys.path (e.g. a torch kept elsewhere)."""
    workspace = work / "jit"
    workspace.mkdir(parents=True, exist_ok=True)
    env = _probe_env(workspace, arch)
    _check_nvcc(env)
    cfg = {"root": str(tree), "tvm_root": str(tvm_tree) if tvm_tree else None, "out": str(work / "probe.json"),
           "workspace": str(workspace), "dtypes": list(dtypes), "head_dims": [int(h) for h in head_dims],
           "jobs": jobs or os.cpu_count() or 1, "path": [str(Path(p).resolve()) for p in path]}
    (work / "probe-config.json").write_text(json.dumps(cfg))
    # -I: no user site, no cwd on sys.path, PYTHON* ignored; -B: leave the tree unchanged
    try:
        proc = subprocess.run([python, "-I", "-B", "-c", _PROBE, str(work / "probe-config.json")],
                              env=env, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        raise ValueError(f"python interpreter not found: {python}") from None
    out = Path(cfg["out"])
    if not out.exists():
        raise RuntimeError(f"the FlashInfer probe in {python} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def check_probe(result: dict[str, Any], python: str) -> None:
    """Turn a failed or misleading probe into a clear error."""
    if not result.get("ok"):
        missing = (result.get("missing") or "").split(".")[0]
        if missing == "torch":
            raise RuntimeError(f"{python} has no torch: the probe imports FlashInfer, which needs "
                               f"torch (pass --python with one; no GPU needed). ({result.get('error')})")
        if missing == "tvm_ffi":
            raise RuntimeError(f"{python} cannot import tvm_ffi: the tvm-ffi wheel is for another "
                               f"CPython and it has none of its own (pip install {TVM_DIST} there, or "
                               f"probe with the node's Python version). ({result.get('error')})")
        raise RuntimeError(f"the FlashInfer probe failed in {python}: {result.get('error')}")
    if result.get("outside"):
        raise RuntimeError(f"flashinfer modules were imported from outside the wheel: {result['outside'][:3]}")
    if not result.get("jit_modules") or not result.get("jit_deps"):
        raise RuntimeError("the probe recorded no JIT module or no header: nothing to compile from")


def select_files(result: dict[str, Any], tree: Path, extra: Iterable[str] = ()) -> list[str]:
    """The flashinfer files to keep (relative POSIX paths): imported modules, files opened, JIT
    headers, `extra` (a GPU trace), plus every package ``__init__.py`` on the way down."""
    files = set(result["modules"].values()) | set(result["data_files"]) | set(result["jit_deps"])
    # The JIT's own sources (flashinfer/data/csrc/*, ~10 MB) are kept whole: which module plan()
    # generates is decided on the GPU (a CPU probe of 0.7.2.post1 missed batch_prefill_paged.cu,
    # which the tensor-core decode opens on an H200); the headers they include are traced.
    csrc = tree / PACKAGE / "data" / "csrc"
    if csrc.is_dir():
        files |= {f.relative_to(tree).as_posix() for f in csrc.iterdir() if f.is_file()}
    for rel in extra:
        rel = PurePosixPath(rel).as_posix()
        if unsafe_member(rel) or not rel.startswith(PACKAGE + "/"):
            raise ValueError(f"trace entry {rel!r} is not a path inside {PACKAGE}/")
        if not (tree / rel).is_file():
            raise ValueError(f"trace entry {rel!r} is not a file of this wheel (another FlashInfer version?)")
        files.add(rel)
    for rel in list(files):
        parent = PurePosixPath(Path(rel).as_posix()).parent
        while parent.parts:
            if (tree / parent / "__init__.py").is_file():
                files.add((parent / "__init__.py").as_posix())
            parent = parent.parent
    return sorted(PurePosixPath(Path(f).as_posix()).as_posix() for f in files if "__pycache__" not in f)


def _dist_info_files(wheel: Wheel) -> list[str]:
    """METADATA (importlib.metadata resolves the version from it) and the licenses."""
    info = wheel.meta_member.split("/")[0]
    return sorted([wheel.meta_member] + [n for n in wheel.names if n.startswith(f"{info}/licenses/")
                                         and not n.endswith("/")])


def _tvm_files(tvm: Wheel) -> list[str]:
    """tvm-ffi whole (a compiled package that finds its library through its dist-info RECORD),
    less a wheel's ``.data`` install dirs."""
    return sorted(n for n in tvm.names if not n.endswith("/") and not n.split("/", 1)[0].endswith(".data"))


def read_trace(path: Path) -> list[str]:
    """The files a GPU trace (:func:`trace_on_gpu`) saw FlashInfer use."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the trace {path}: {exc}") from None
    files = data.get("used") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{path} is not a flashinfer trace (no 'used' list of paths)")
    return files


def install_kernel_only(wheel: Path, tvm_wheel: Path, dest: Path = DEFAULT_KERNEL_DIR, *,
                        python: str = sys.executable, dtypes=DEFAULT_DTYPES, head_dims=DEFAULT_HEAD_DIMS,
                        arch: str = DEFAULT_ARCH, extra_trace: Path | None = None,
                        jobs: int | None = None, probe_path: Iterable[Path] = ()) -> InstallReport:
    """Make a kernel-only FlashInfer install in `dest` from the two wheels (members checked first).

    `python` (with torch; no GPU needed; nvcc on this machine) runs the probe. An earlier install
    in `dest` is replaced atomically; any other non-empty `dest` is refused.
    """
    dest = Path(dest)
    fi, tvm = open_wheel(Path(wheel), DIST), open_wheel(Path(tvm_wheel), TVM_DIST)
    for d in dtypes:
        if d not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {d!r}: FlashInfer's decode takes {', '.join(SUPPORTED_DTYPES)}")
    if not head_dims or any(int(h) < 1 for h in head_dims):
        raise ValueError(f"head_dims must be positive integers, got {head_dims!r}")
    _check_tvm_requirement(fi, tvm)
    extra = read_trace(extra_trace) if extra_trace else []
    if dest.is_file():
        raise ValueError(f"{dest} is a file, not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MANIFEST_NAME).is_file():
        raise ValueError(f"{dest} exists, is not empty and holds no {MANIFEST_NAME}: refusing to replace it")
    work = Path(tempfile.mkdtemp(prefix="flashinfer-kernel-"))
    try:
        tree, tvm_tree = work / "wheel", work / "tvm"
        _extract(fi.path, tree)
        _extract(tvm.path, tvm_tree)
        tag = _python_tag(tvm.path)
        probe_tag = _probe_python_tag(python)
        result = probe(python, tree, tvm_tree if tag in (None, probe_tag) else None, work,
                       dtypes=dtypes, head_dims=head_dims, arch=arch, jobs=jobs, path=probe_path)
        check_probe(result, python)
        files = select_files(result, tree, extra)
        return _copy_install(tree, tvm_tree, dest, fi, tvm, files, result,
                             {"dtypes": list(dtypes), "head_dims": [int(h) for h in head_dims],
                              "arch": arch, "extra_trace": str(extra_trace) if extra_trace else None})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _probe_python_tag(python: str) -> str | None:
    try:
        out = subprocess.run([python, "-I", "-c", "import sys; print('cp%d%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ValueError(f"python interpreter not found: {python}") from None
    return out.stdout.strip() or None


def _copy_install(tree: Path, tvm_tree: Path, dest: Path, fi: Wheel, tvm: Wheel, files: list[str],
                  result: dict[str, Any], settings: dict[str, Any]) -> InstallReport:
    fi_files = sorted(set(files) | set(_dist_info_files(fi)))
    tvm_files = _tvm_files(tvm)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    try:
        total = 0
        for src_root, rels in ((tree, fi_files), (tvm_tree, tvm_files)):
            for rel in rels:
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src_root / rel, target)
                total += target.stat().st_size
        manifest = {
            "flashinfer_version": fi.version, "tvm_ffi_version": tvm.version,
            "python_tag": _python_tag(tvm.path),
            "wheels": {"flashinfer": {"name": fi.path.name, "sha256": sha256_file(fi.path)},
                       "tvm_ffi": {"name": tvm.path.name, "sha256": sha256_file(tvm.path)}},
            "files": fi_files, "tvm_ffi_files": tvm_files, "total_bytes": total,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "probe": {**settings, **{k: result.get(k) for k in (
                "python", "torch", "tvm_ffi", "version", "jit_modules", "nvcc_commands",
                "jit_deps_outside", "third_party")}},
            "env": {"FLASHINFER_DISABLE_VERSION_CHECK": "1",
                    "FLASHINFER_WORKSPACE_BASE": "the JIT cache root (default <repo>/.flashinfer-cache)"},
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        swap_in(staging, dest)  # an earlier install (checked above) is swapped out
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return InstallReport(tuple(fi_files + tvm_files), total, fi.version, tvm.version, dest,
                         tuple(result.get("third_party") or ()), tuple(result.get("jit_modules") or ()))


# --------------------------------------------------------------------------- downloads


#: pip does not widen a --platform to older manylinux tags: the defaults name the usual ones.
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                     "manylinux2014_x86_64")


def download_wheels(version: str, wheelhouse: Path, *, python_version: str = "3.12",
                    platforms: Iterable[str] = DEFAULT_PLATFORMS) -> tuple[Path, Path]:
    """``pip download`` flashinfer-python==VERSION (pure Python) and the apache-tvm-ffi its
    METADATA asks for, built for the target CPython and platforms; return both paths."""
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version):
        raise ValueError(f"not a version: {version!r}")
    if not re.fullmatch(r"3\.\d+", python_version):
        raise ValueError(f"not a CPython version: {python_version!r} (e.g. 3.12)")
    wheelhouse = Path(wheelhouse)
    wheelhouse.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheelhouse)]
    subprocess.run(pip + [f"{DIST}=={version}"], check=True)
    found = sorted(wheelhouse.glob(f"flashinfer_python-{version}-*.whl"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"pip download left no flashinfer_python-{version}-*.whl in {wheelhouse}")
    fi = open_wheel(found[-1], DIST)
    spec = next((r for r in fi.meta["Requires-Dist"] if canonical_name(re.split(r"[<>=!~;\[ (]", r)[0]) == canonical_name(TVM_DIST)
                 and "extra ==" not in r), TVM_DIST)
    spec = spec.split(";")[0].replace(" ", "").replace("(", "").replace(")", "")
    target = ["--python-version", python_version, "--implementation", "cp"]
    for tag in platforms:
        target += ["--platform", tag]
    subprocess.run(pip + target + [spec], check=True)
    tvm = sorted(wheelhouse.glob("apache_tvm_ffi-*.whl"), key=lambda p: p.stat().st_mtime)
    if not tvm:
        raise RuntimeError(f"pip download left no apache_tvm_ffi-*.whl in {wheelhouse}")
    return found[-1], tvm[-1]


# --------------------------------------------------------------------------- the GPU check

# Runs on the GPU node from the repository root: argv[1] out.json, argv[2] dtypes, argv[3] head
# dims. Loads FlashInfer as the backend does, runs a decode per config (JIT-compiling what is not
# cached), then records modules, opened files and ninja's header lists of every cached module.
_TRACE = r"""
import json, os, subprocess, sys, time
out, dtypes, heads = sys.argv[1], sys.argv[2].split(","), [int(h) for h in sys.argv[3].split(",")]
opened = set()
def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        opened.add(os.path.realpath(os.fsdecode(args[0])))
sys.addaudithook(_hook)
import torch
from lib.engine.backends import flashinfer as F
result = {"ok": False, "runs": []}
try:
    fi = F.load_flashinfer()
    root = os.path.realpath(os.path.dirname(os.path.dirname(fi.__file__)))
    pkg = os.path.join(root, "flashinfer") + os.sep
    result.update(root=root, version=fi.__version__, status=F.flashinfer_status())
    from flashinfer.jit import env as jit_env
    result["jit_dir"] = str(jit_env.FLASHINFER_JIT_DIR)
    for dt in dtypes:
        for hd in heads:
            for nh, nkv in ((4, 4), (8, 1)):
                t0 = time.perf_counter()
                g = torch.Generator(device="cuda").manual_seed(0)
                lens, bs = [1, 17, 300], 16
                pages = [(n + bs - 1) // bs for n in lens]
                table = torch.zeros(len(lens), max(pages), dtype=torch.int32)
                perm = torch.randperm(sum(pages), generator=torch.Generator().manual_seed(0)).to(torch.int32)
                k = 0
                for s, p in enumerate(pages):
                    table[s, :p] = perm[k:k + p]; k += p
                dtype = getattr(torch, dt)
                mk = lambda *shape: torch.randn(*shape, generator=g, device="cuda").to(dtype)
                q, kp, vp = mk(len(lens), nh, hd), mk(sum(pages), bs, nkv, hd), mk(sum(pages), bs, nkv, hd)
                o = torch.full_like(q, float("nan"))
                F.prepare_decode(q, kp, vp, o, table.numpy(), lens, scale=hd ** -0.5)()
                torch.cuda.synchronize()
                result["runs"].append({"dtype": dt, "head_dim": hd, "heads": f"{nh}:{nkv}",
                                       "finite": bool(torch.isfinite(o).all()),
                                       "seconds": round(time.perf_counter() - t0, 2)})
    deps = set()
    jit_dir = result["jit_dir"]
    for name in sorted(os.listdir(jit_dir)) if os.path.isdir(jit_dir) else []:
        d = os.path.join(jit_dir, name)
        if not os.path.isfile(os.path.join(d, "build.ninja")):
            continue
        p = subprocess.run(["ninja", "-C", d, "-f", "build.ninja", "-t", "deps"], capture_output=True, text=True)
        for line in p.stdout.splitlines():
            if line.startswith((" ", "\t")) and line.strip():
                deps.add(os.path.realpath(line.strip()))
    mods = {n: os.path.realpath(m.__file__) for n, m in list(sys.modules.items())
            if (n == "flashinfer" or n.startswith("flashinfer.")) and getattr(m, "__file__", None)}
    used = {f for f in list(mods.values()) + list(opened) + list(deps) if f.startswith(pkg) and "__pycache__" not in f}
    result["used"] = sorted(os.path.relpath(f, root) for f in used)
    result["modules"] = len(mods)
    result["jit_deps"] = len([d for d in deps if d.startswith(pkg)])
    result["ok"] = True
except BaseException as exc:
    import traceback
    result["error"] = f"{type(exc).__name__}: {exc}"
    result["traceback"] = traceback.format_exc()[-4000:]
with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
"""


def trace_on_gpu(out: Path, *, dtypes=DEFAULT_DTYPES, head_dims=(128,), python: str = sys.executable,
                 kernel_dir: Path | None = None) -> dict[str, Any]:
    """Run FlashInfer's decode on this node's GPU and record what it used; compare with the
    install's manifest (``missing``: used but not installed; ``unused``: installed, never used)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if kernel_dir is not None:
        env[ENV_DIR] = str(Path(kernel_dir).resolve())
    proc = subprocess.run([python, "-c", _TRACE, str(out), ",".join(dtypes), ",".join(map(str, head_dims))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if not out.exists():
        raise RuntimeError(f"the FlashInfer trace failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    manifest_path = Path(result.get("root") or "") / MANIFEST_NAME
    if result.get("ok") and manifest_path.is_file():
        installed = set(json.loads(manifest_path.read_text()).get("files", []))
        used = set(result["used"])
        result["missing"] = sorted(used - installed)
        result["unused"] = len(installed - used)
        out.write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------- command line


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cli(argv: list[str] | None = None) -> int:
    """`python -m lib flashinfer-kernel`: make, inspect or check a kernel-only FlashInfer install."""
    parser = argparse.ArgumentParser(
        prog="python -m lib flashinfer-kernel",
        description="Copy only what FlashInfer's paged decode imports and JIT-compiles out of a "
                    "flashinfer-python wheel, plus apache-tvm-ffi, into .flashinfer-kernel/.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", type=Path, help="a flashinfer_python-<ver>-py3-none-any.whl (with --tvm-ffi-wheel)")
    src.add_argument("--download", metavar="VERSION", nargs="?", const=DEFAULT_VERSION,
                     help=f"pip download both wheels into --wheelhouse first (default {DEFAULT_VERSION})")
    src.add_argument("--status", action="store_true", help="print where FlashInfer would come from, as json")
    src.add_argument("--trace", type=Path, metavar="OUT.json",
                     help="on a GPU node: run the decode from the install and record what it used")
    parser.add_argument("--tvm-ffi-wheel", type=Path, help="an apache_tvm_ffi-<ver>-cpXY-*.whl for the node's python")
    parser.add_argument("--dest", type=Path, default=None, help="install directory (default <repo>/.flashinfer-kernel)")
    parser.add_argument("--wheelhouse", type=Path, default=ROOT / "wheelhouse")
    parser.add_argument("--python-version", default="3.12", help="the node's CPython, for the tvm-ffi download")
    parser.add_argument("--platform", action="append", metavar="TAG",
                        help=f"the node's platform tags, repeatable (default {', '.join(DEFAULT_PLATFORMS)})")
    parser.add_argument("--python", default=sys.executable, help="python with torch that runs the probe")
    parser.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES))
    parser.add_argument("--head-dims", default=",".join(map(str, DEFAULT_HEAD_DIMS)))
    parser.add_argument("--arch", default=DEFAULT_ARCH, help="nvcc target of the dependency scan")
    parser.add_argument("--add-trace", type=Path, metavar="TRACE.json", help="also keep what a GPU trace used")
    args = parser.parse_args(argv)
    try:
        if args.status:
            print(json.dumps(flashinfer_status(args.dest), indent=2))
            return 0
        if args.trace:
            res = trace_on_gpu(args.trace, dtypes=_csv(args.dtypes), head_dims=[int(h) for h in _csv(args.head_dims)],
                               kernel_dir=args.dest)
            if not res.get("ok"):
                print(f"error: {res.get('error')}\n{res.get('traceback', '')}", file=sys.stderr)
                return 1
            bad = [r for r in res["runs"] if not r["finite"]]
            print(f"FlashInfer {res['version']} from {res['root']}: {len(res['runs'])} decodes "
                  f"({', '.join(str(r['seconds']) + ' s' for r in res['runs'])}), {len(res['used'])} files used, "
                  f"{len(res.get('missing', []))} missing from the install, {res.get('unused', '-')} installed but unused"
                  + (f"; {len(bad)} outputs not finite" if bad else ""))
            return 1 if bad or res.get("missing") else 0
        if args.download:
            wheel, tvm_wheel = download_wheels(args.download, args.wheelhouse, python_version=args.python_version,
                                               platforms=args.platform or DEFAULT_PLATFORMS)
        else:
            if args.tvm_ffi_wheel is None:
                parser.error("--wheel needs --tvm-ffi-wheel")
            wheel, tvm_wheel = args.wheel, args.tvm_ffi_wheel
        report = install_kernel_only(wheel, tvm_wheel, args.dest or DEFAULT_KERNEL_DIR, python=args.python,
                                     dtypes=_csv(args.dtypes), head_dims=[int(h) for h in _csv(args.head_dims)],
                                     arch=args.arch, extra_trace=args.add_trace)
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"FlashInfer {report.version} + tvm-ffi {report.tvm_ffi_version} kernel-only install: "
          f"{len(report.files)} files, {report.bytes / 1e6:.1f} MB in {report.dest} "
          f"({len(report.jit_modules)} JIT modules traced)")
    if report.third_party:
        print("it also imports (the target python needs them): " + ", ".join(report.third_party))
    return 0
