"""vLLM's current decode kernel, from a normal install or a "kernel-only install".

vLLM 0.33 decodes on NVIDIA GPUs through the pure-Triton
``vllm.v1.attention.ops.triton_unified_attention.unified_attention``. Its wheel is
336 MB and pins its own torch, yet the kernel needs only a few dozen of the wheel's
pure-Python files. A *kernel-only install* is those files alone, found by importing
the kernel from the unpacked wheel in a subprocess and keeping every ``vllm`` module
that ended up in ``sys.modules``. It lets the kernel run beside another torch and on
GPU nodes that cannot reach a package index.

Two traps, both silent, shape the install (see the book's notes on vLLM):

* vLLM asks ``importlib.metadata.version("vllm")`` while deciding whether Triton is
  usable; when no ``vllm-<ver>.dist-info/METADATA`` is importable it swaps Triton for
  a no-op stand-in. So ``METADATA`` is copied beside the modules, and loading checks
  that the version resolves and that vLLM kept real Triton.
* ``vllm/third_party/pynvml.py`` makes vLLM pick its CUDA platform, which imports a
  large compiled library built for the wheel's own torch. It is never copied, and the
  import that decides the module set runs with it deleted, as at use time.

The probe runs with ``CUDA_VISIBLE_DEVICES=""``: vLLM then keeps real Triton even on
a machine without a GPU (it treats an empty device list as a distributed worker that
has not bound its GPU yet), so the module set found on a CPU-only builder is the one
a GPU node imports.

Importing vLLM has side effects on the process (``vllm.env_override`` sets
``PYTORCH_NVML_BASED_CUDA_CHECK=1``, ``TORCHINDUCTOR_COMPILE_THREADS=1`` and patches
parts of ``torch._inductor``); keep that in mind when timing ``torch.compile``-based
peers in the same process.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib
import importlib.metadata as importlib_metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

from lib import ROOT

#: The decode kernel's module (vLLM 0.33) and the callable in it.
KERNEL_MODULE = "vllm.v1.attention.ops.triton_unified_attention"
KERNEL_ATTR = "unified_attention"
#: Where `load_unified_attention` looks when given no directory and no env var.
DEFAULT_KERNEL_DIR = ROOT / ".vllm-kernel"
ENV_DIR = "UVM_STUDY_VLLM_DIR"
#: Written into every kernel-only install; also how one is recognised.
MANIFEST_NAME = "vllm-kernel-manifest.json"
#: vLLM's copy of pynvml: present, it selects vLLM's compiled CUDA platform.
PYNVML_SHIM = "third_party/pynvml.py"
#: vLLM's backend constants (vllm/v1/attention/backends/triton_attn.py, 0.33):
#: split-K when the 2D grid (num_seqs x kv_heads) is below 128 programs, 16 segments.
MIN_LAUNCH_GRID_SIZE_2D = 128
NUM_PAR_SOFTMAX_SEGMENTS = 16


# --------------------------------------------------------------------------- install


@dataclasses.dataclass(frozen=True)
class InstallReport:
    """What a kernel-only install wrote: relative file paths, their bytes, vLLM's version."""

    files: tuple[str, ...]
    bytes: int
    version: str
    dest: Path
    #: Distributions vLLM imported beyond torch, triton and their own requirements
    #: (e.g. regex, packaging): the target python needs them too.
    third_party: tuple[str, ...] = ()


def _unsafe_member(name: str) -> str | None:
    """Why an archive member name must not be extracted, or None when it is safe."""
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute():
        return "absolute path"
    if PureWindowsPath(name).drive:
        return "drive letter"
    if ".." in re.split(r"[/\\]", name):
        return "'..' component"
    return None


def _read_metadata(text: str) -> dict[str, str]:
    """The first value of each header of a METADATA file (RFC 822 style)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the body (long description) starts after the first blank line
        key, sep, value = line.partition(":")
        if sep and not key.startswith((" ", "\t")):
            fields.setdefault(key.strip(), value.strip())
    return fields


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_metadata(names: list[str], package: str) -> str:
    """The wheel's `<dist>-<ver>.dist-info/METADATA` member for `package`."""
    candidates = [n for n in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
    matching = [n for n in candidates if _canonical(n.split("-")[0]) == _canonical(package)]
    if len(matching) != 1:
        raise ValueError(
            f"expected one {package}-<version>.dist-info/METADATA in the wheel, "
            f"found {candidates or 'none'}"
        )
    return matching[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Runs in the target python. argv: root, module, out.json. Writes what the import
# pulled in; never raises (errors go into the json).
_PROBE = r"""
import importlib, importlib.metadata, importlib.util, json, os, sys
root, module, out = os.path.realpath(sys.argv[1]), sys.argv[2], sys.argv[3]
top = module.split(".")[0]
opened = set()
def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        opened.add(os.path.realpath(os.fsdecode(args[0])))
result = {"ok": False, "python": sys.version.split()[0]}
for name in ("torch", "triton"):  # preload: third_party then lists only vLLM's own needs
    result[name] = None
    if importlib.util.find_spec(name) is not None:
        try:
            result[name] = importlib.import_module(name).__version__
        except Exception as exc:
            result[name + "_error"] = f"{type(exc).__name__}: {exc}"
before = {m.split(".")[0] for m in sys.modules}
sys.path.insert(0, root)
sys.addaudithook(_hook)
try:
    importlib.import_module(module)
except BaseException as exc:
    result["error"] = f"{type(exc).__name__}: {exc}"
    result["missing"] = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
else:
    result["ok"] = True
    mods, outside = {}, []
    for name, mod in list(sys.modules.items()):
        if name != top and not name.startswith(top + "."):
            continue
        f = getattr(mod, "__file__", None)
        if not f:
            continue  # namespace package: no file
        f = os.path.realpath(f)
        if not f.startswith(root + os.sep):
            outside.append(f)
        else:
            mods[name] = os.path.relpath(f, root)
    result["modules"] = mods
    result["outside"] = outside
    pkg_root = os.path.join(root, top) + os.sep
    result["data_files"] = sorted(
        os.path.relpath(p, root) for p in opened
        if p.startswith(pkg_root) and "__pycache__" not in p and os.path.isfile(p)
    )
    try:
        result["version"] = importlib.metadata.version(top)
    except Exception as exc:
        result["version"] = None
    tu = sys.modules.get(top + ".triton_utils")
    result["has_triton"] = getattr(tu, "HAS_TRITON", None) if tu else None
    plat = sys.modules.get(top + ".platforms")
    cur = getattr(plat, "_current_platform", None) if plat else None
    result["platform"] = type(cur).__name__ if cur is not None else None
    std = set(sys.stdlib_module_names)
    new = {m.split(".")[0] for m in sys.modules} - before - std - {top}
    # Report distributions, leaving out what torch and triton themselves require.
    import re
    def _requires(dist):
        try:
            reqs = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            return []
        return [re.match(r"[A-Za-z0-9._-]+", r).group(0) for r in reqs if "extra ==" not in r]
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
    covered, todo = set(), ["torch", "triton"]
    while todo:
        d = norm(todo.pop())
        if d not in covered:
            covered.add(d)
            todo.extend(_requires(d))
    dists = importlib.metadata.packages_distributions()
    needed = set()
    for m in new:
        if m.startswith("_"):
            continue
        owners = dists.get(m)
        if owners:
            needed.update(norm(o) for o in owners)
        elif getattr(sys.modules.get(m), "__file__", None):
            needed.add(m)  # importable but owned by no distribution
    result["third_party"] = sorted(needed - covered)
with open(out, "w") as fh:
    json.dump(result, fh)
"""


def _probe_imports(python: str, root: Path, module: str) -> dict[str, Any]:
    """Import `module` from `root` in a fresh `python`; return what it pulled in."""
    out = root.parent / "probe.json"
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # vLLM keeps real Triton with no GPU bound (see top)
    env.pop("PYTHONPATH", None)
    # -I: no user site, no cwd on sys.path, PYTHON* ignored; -B: leave the tree unchanged
    cmd = [python, "-I", "-B", "-c", _PROBE, str(root), module, str(out)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise ValueError(f"python interpreter not found: {python}") from None
    if not out.exists():
        raise RuntimeError(
            f"the import probe in {python} failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-3000:]}"
        )
    return json.loads(out.read_text())


def _check_probe(result: dict[str, Any], python: str, module: str) -> None:
    """Turn a failed or misleading probe into a clear error."""
    top = module.split(".")[0]
    if not result["ok"]:
        missing = (result.get("missing") or "").split(".")[0]
        if missing in ("torch", "triton"):
            raise RuntimeError(
                f"{python} lacks {missing}: importing {module} needs torch and triton "
                f"in the python that runs the install (pass python=... / --python). "
                f"({result['error']})"
            )
        raise RuntimeError(f"importing {module} from the wheel failed in {python}: {result['error']}")
    if result["outside"]:
        raise RuntimeError(f"{top} modules were imported from outside the wheel: {result['outside'][:3]}")
    if result.get("has_triton") is False:
        why = "it has no triton" if result.get("triton") is None else "Triton looked unusable to it"
        raise RuntimeError(
            f"vLLM replaced Triton by its no-op stand-in during the import in {python} ({why}); "
            "the module set would not be the one a GPU run imports. Install triton there."
        )
    if not result.get("version"):
        raise RuntimeError(f"importlib.metadata.version({top!r}) did not resolve during the probe")


def _prepare_dest(dest: Path) -> None:
    """Refuse to overwrite anything but an earlier kernel-only install."""
    if dest.is_file():
        raise ValueError(f"{dest} is a file, not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MANIFEST_NAME).is_file():
        raise ValueError(f"{dest} exists, is not empty and holds no {MANIFEST_NAME}: refusing to replace it")


def install_kernel_only(
    wheel: Path,
    dest: Path,
    *,
    python: str = sys.executable,
    module: str = KERNEL_MODULE,
) -> InstallReport:
    """Make a kernel-only install of `module` in `dest` from the wheel file `wheel`.

    Every member is checked before anything is written; the whole wheel is unpacked
    to a temporary directory (without vLLM's pynvml shim); `python` (which needs torch
    and triton for the real kernel) imports `module` from there; the package files it
    imported, their packages' ``__init__.py``, any package data they opened and the
    dist-info ``METADATA`` are copied to `dest` with a json manifest. An earlier
    install in `dest` is replaced atomically; any other non-empty `dest` is refused.
    """
    wheel, dest = Path(wheel), Path(dest)
    top = module.split(".")[0]
    if not module or not all(p.isidentifier() for p in module.split(".")):
        raise ValueError(f"not a module name: {module!r}")
    if not wheel.is_file():
        raise ValueError(f"wheel file not found: {wheel}")
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise ValueError(f"{wheel} is not a zip archive (wheel)") from None
    with zf:
        names = zf.namelist()
        for name in names:
            why = _unsafe_member(name)
            if why:
                raise ValueError(f"refusing {wheel.name}: member {name!r} has an {why}")
        meta_member = _find_metadata(names, top)
        meta = _read_metadata(zf.read(meta_member).decode("utf-8", "replace"))
        _prepare_dest(dest)
        work = Path(tempfile.mkdtemp(prefix="vllm-kernel-"))
        try:
            tree = work / "wheel"
            zf.extractall(tree)
            (tree / top / PYNVML_SHIM).unlink(missing_ok=True)
            result = _probe_imports(python, tree, module)
            _check_probe(result, python, module)
            return _copy_install(tree, dest, wheel, meta_member, meta, module, result)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _copy_install(
    tree: Path,
    dest: Path,
    wheel: Path,
    meta_member: str,
    meta: dict[str, str],
    module: str,
    result: dict[str, Any],
) -> InstallReport:
    top = module.split(".")[0]
    files = set(result["modules"].values()) | set(result["data_files"])
    for rel in list(files):  # every package __init__.py on the way down
        parent = PurePosixPath(Path(rel).as_posix()).parent
        while parent.parts:
            if (tree / parent / "__init__.py").is_file():
                files.add((parent / "__init__.py").as_posix())
            parent = parent.parent
    files = {Path(f).as_posix() for f in files}
    files.discard(f"{top}/{PYNVML_SHIM}")
    files.add(meta_member)

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    try:
        total = 0
        for rel in sorted(files):
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tree / rel, target)
            total += target.stat().st_size
        version = meta.get("Version") or result["version"]
        manifest = {
            "vllm_version": version,
            "kernel_module": module,
            "wheel": {"name": wheel.name, "sha256": _sha256(wheel)},
            "files": sorted(files),
            "total_bytes": total,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "probe": {
                k: result.get(k)
                for k in ("python", "torch", "triton", "has_triton", "platform", "third_party")
            },
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if dest.exists():  # an earlier install (checked by _prepare_dest): swap it out
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return InstallReport(
        files=tuple(sorted(files)),
        bytes=total,
        version=version,
        dest=dest,
        third_party=tuple(result.get("third_party") or ()),
    )


# --------------------------------------------------------------------------- finding it


def _kernel_dir(kernel_dir: Path | str | None) -> Path:
    if kernel_dir is not None:
        return Path(kernel_dir)
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else DEFAULT_KERNEL_DIR


def _is_kernel_only(package_file: str | None) -> bool:
    """Is this `vllm/__init__.py` part of a kernel-only install (manifest beside `vllm/`)?"""
    return bool(package_file) and (Path(package_file).resolve().parent.parent / MANIFEST_NAME).is_file()


def _dir_metadata(kernel_dir: Path, package: str = "vllm") -> dict[str, str] | None:
    for meta in sorted(kernel_dir.glob("*.dist-info/METADATA")):
        fields = _read_metadata(meta.read_text(errors="replace"))
        if _canonical(fields.get("Name", "")) == _canonical(package):
            return fields
    return None


def _check_kernel_dir(kernel_dir: Path, module: str) -> str:
    """Raise unless `kernel_dir` looks like a usable kernel-only install; return its version."""
    top = module.split(".")[0]
    if not kernel_dir.is_dir():
        raise FileNotFoundError(
            f"no kernel-only vLLM install at {kernel_dir} (make one with "
            "`python -m lib vllm-kernel --wheel vllm-<ver>-*.whl`, or set "
            f"{ENV_DIR})"
        )
    mod_file = kernel_dir / (module.replace(".", "/") + ".py")
    if not mod_file.is_file():
        raise FileNotFoundError(f"{kernel_dir} has no {mod_file.relative_to(kernel_dir)}")
    meta = _dir_metadata(kernel_dir, top)
    if meta is None or not meta.get("Version"):
        raise RuntimeError(
            f"{kernel_dir} has no {top}-<ver>.dist-info/METADATA: vLLM would silently replace "
            "Triton by a no-op stand-in. Reinstall it from the wheel."
        )
    if (kernel_dir / top / PYNVML_SHIM).exists():
        raise RuntimeError(
            f"{kernel_dir / top / PYNVML_SHIM} is present: vLLM would pick its CUDA platform "
            "and import its compiled library (built for another torch). Delete that file."
        )
    return meta["Version"]


def load_unified_attention(
    kernel_dir: Path | str | None = None,
    *,
    module: str = KERNEL_MODULE,
    attr: str = KERNEL_ATTR,
) -> Callable[..., Any]:
    """Return vLLM's `unified_attention`, importing it on first use.

    With no `kernel_dir`, a normal vLLM install wins when one is importable; otherwise
    (or when `kernel_dir` is given) a kernel-only install is used: the argument, else
    ``$UVM_STUDY_VLLM_DIR``, else ``<repo>/.vllm-kernel``. Raises when vLLM's version
    does not resolve or vLLM disabled Triton, since the kernel would then be a no-op.
    """
    top = module.split(".")[0]
    if kernel_dir is not None:
        _check_kernel_dir(Path(kernel_dir), module)
    loaded = sys.modules.get(top)
    if loaded is None:
        spec = importlib.util.find_spec(top) if kernel_dir is None else None
        if spec is None or _is_kernel_only(spec.origin):
            if spec is not None:  # a kernel-only install already on sys.path
                path = Path(spec.origin).resolve().parent.parent
            else:
                path = _kernel_dir(kernel_dir).resolve()
            _check_kernel_dir(path, module)
            if str(path) not in sys.path:
                sys.path.insert(0, str(path))
            importlib.invalidate_caches()
    elif kernel_dir is not None:
        have = Path(getattr(loaded, "__file__", "") or "").resolve().parent.parent
        if have != Path(kernel_dir).resolve():
            raise RuntimeError(f"{top} is already imported from {have}, not {kernel_dir}")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        name = (exc.name or "").split(".")[0]
        if name and name != top:
            raise RuntimeError(
                f"importing {module} needs the package {name!r}, which this python lacks "
                f"(pip install {name}; bring its wheel to offline nodes)"
            ) from exc
        raise
    _check_loaded(top, sys.modules[top])
    return getattr(mod, attr)


def _check_loaded(top: str, package: Any) -> None:
    """The checks that catch vLLM's silent fallbacks, run after the import."""
    try:
        importlib_metadata.version(top)
    except importlib_metadata.PackageNotFoundError:
        raise RuntimeError(
            f"importlib.metadata.version({top!r}) does not resolve: vLLM swaps Triton for a "
            "no-op stand-in without it. Its dist-info METADATA must be importable."
        ) from None
    if _is_kernel_only(getattr(package, "__file__", None)):
        shim = Path(package.__file__).resolve().parent / PYNVML_SHIM
        if shim.exists():
            raise RuntimeError(f"{shim} is present in a kernel-only install; delete it")
    triton_utils = sys.modules.get(top + ".triton_utils")
    if triton_utils is not None and not getattr(triton_utils, "HAS_TRITON", True):
        raise RuntimeError(
            "vLLM disabled Triton (no triton, no active Triton driver such as a visible "
            "GPU, or no vLLM METADATA): unified_attention would do nothing."
        )


def vllm_status(kernel_dir: Path | str | None = None, *, deep: bool = False) -> dict[str, Any]:
    """Is vLLM's decode kernel usable here, and from where? Never raises.

    Keys: ``available`` (bool), ``version``, ``source`` ("installed", "kernel-only" or
    None), ``path``, ``reason`` (why not, else None). The default check imports
    nothing heavy; ``deep=True`` really loads the kernel (imports torch and vLLM).
    """
    status: dict[str, Any] = {"available": False, "version": None, "source": None, "path": None, "reason": None}
    try:
        loaded = sys.modules.get("vllm")
        spec = None
        if loaded is not None:
            origin = getattr(loaded, "__file__", None)
        else:
            spec = importlib.util.find_spec("vllm") if kernel_dir is None else None
            origin = spec.origin if spec is not None else None
        if origin and not _is_kernel_only(origin):
            status.update(source="installed", path=str(Path(origin).parent))
            status["version"] = importlib_metadata.version("vllm")
        else:
            path = Path(origin).resolve().parent.parent if origin else _kernel_dir(kernel_dir)
            status.update(source="kernel-only", path=str(path))
            status["version"] = _check_kernel_dir(path, KERNEL_MODULE)
        for dep in ("torch", "triton"):
            if importlib.util.find_spec(dep) is None:
                raise RuntimeError(f"{dep} is not installed in this python")
        if deep:
            load_unified_attention(kernel_dir)
        status["available"] = True
    except Exception as exc:  # the registry lists the reason, never fails on it
        status["reason"] = f"{type(exc).__name__}: {exc}"
    return status


# --------------------------------------------------------------------------- decode wrapper

_FLOAT_DTYPES = ("torch.float16", "torch.bfloat16", "torch.float32")


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _check_decode_args(q, k_pool, v_pool, out, block_table, seq_lens, scale, max_seq_len) -> None:
    """Shapes, dtypes and devices the decode call needs; ValueError before any launch."""
    if q.dim() != 3:
        raise ValueError(f"q must be [num_seqs, num_heads, head_size], got {tuple(q.shape)}")
    if k_pool.dim() != 4:
        raise ValueError(f"k_pool must be [num_blocks, block_size, kv_heads, head_size], got {tuple(k_pool.shape)}")
    if tuple(v_pool.shape) != tuple(k_pool.shape):
        raise ValueError(f"v_pool shape {tuple(v_pool.shape)} != k_pool shape {tuple(k_pool.shape)}")
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")
    num_seqs, num_heads, head_size = q.shape
    _, _, kv_heads, kv_head_size = k_pool.shape
    if kv_head_size != head_size:
        raise ValueError(f"head size of q ({head_size}) != head size of the cache ({kv_head_size})")
    if kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(f"query heads ({num_heads}) not a multiple of KV heads ({kv_heads})")
    if str(q.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"q dtype {q.dtype} not supported (float16, bfloat16, float32)")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool), ("out", out)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != num_seqs:
        raise ValueError(f"block_table must be [num_seqs={num_seqs}, max_blocks], got {tuple(block_table.shape)}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != num_seqs:
        raise ValueError(f"seq_lens must be [num_seqs={num_seqs}], got {tuple(seq_lens.shape)}")
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens)):
        if str(t.dtype) != "torch.int32":
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    for name, t in (("q", q), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool), ("out", out), ("block_table", block_table), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if not (isinstance(max_seq_len, int) and max_seq_len >= 1):
        raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")


@dataclasses.dataclass
class DecodeScratch:
    """Buffers for one decode shape, allocated once (CUDA-graph capture must not allocate).

    ``cu_seqlens_q`` is ``arange(num_seqs + 1)`` (one query token per sequence). The
    float32 ``segm_*`` buffers hold the split-K ("3D") partial results; they are None
    when the batch is large enough for vLLM to take the one-pass ("2D") path.
    """

    cu_seqlens_q: Any
    num_segments: int
    seq_threshold_3d: int
    segm_output: Any = None
    segm_max: Any = None
    segm_expsum: Any = None

    @property
    def split_k(self) -> bool:
        return self.segm_output is not None


def make_decode_scratch(
    q,
    num_kv_heads: int,
    *,
    num_segments: int = NUM_PAR_SOFTMAX_SEGMENTS,
    seq_threshold_3d: int | None = None,
) -> DecodeScratch:
    """Allocate what a decode of `q` ([num_seqs, heads, head_size]) needs, as vLLM's backend does.

    vLLM splits K into `num_segments` when num_seqs <= `seq_threshold_3d` (default
    128 // num_kv_heads, its backend's rule without CUDA-graph size rounding). Pass 0 to
    force the one-pass kernel, a large number to force split-K.
    """
    import torch

    if num_segments < 1 or num_segments & (num_segments - 1):
        raise ValueError(f"num_segments must be a power of two, got {num_segments}")
    if num_kv_heads < 1:
        raise ValueError(f"num_kv_heads must be >= 1, got {num_kv_heads}")
    if seq_threshold_3d is None:
        seq_threshold_3d = MIN_LAUNCH_GRID_SIZE_2D // num_kv_heads
    if seq_threshold_3d < 0:
        raise ValueError(f"seq_threshold_3d must be >= 0, got {seq_threshold_3d}")
    num_seqs, num_heads, head_size = q.shape
    scratch = DecodeScratch(
        cu_seqlens_q=torch.arange(num_seqs + 1, dtype=torch.int32, device=q.device),
        num_segments=num_segments,
        seq_threshold_3d=seq_threshold_3d,
    )
    if num_seqs <= seq_threshold_3d:
        f32 = dict(dtype=torch.float32, device=q.device)
        scratch.segm_output = torch.empty((num_seqs, num_heads, num_segments, _next_pow2(head_size)), **f32)
        scratch.segm_max = torch.empty((num_seqs, num_heads, num_segments), **f32)
        scratch.segm_expsum = torch.empty((num_seqs, num_heads, num_segments), **f32)
    return scratch


def _decode_kwargs(q, k_pool, v_pool, out, block_table, seq_lens, scale, max_seq_len, scratch) -> dict[str, Any]:
    """Keyword arguments of vLLM 0.33's `unified_attention` for plain decode."""
    if scratch.cu_seqlens_q.shape[0] != q.shape[0] + 1 or scratch.cu_seqlens_q.device != q.device:
        raise ValueError("scratch was made for another batch size or device")
    if scratch.split_k and tuple(scratch.segm_max.shape[:2]) != tuple(q.shape[:2]):
        raise ValueError("scratch was made for another batch size or head count")
    return dict(
        q=q,
        k=k_pool,
        v=v_pool,
        out=out,
        cu_seqlens_q=scratch.cu_seqlens_q,
        max_seqlen_q=1,
        seqused_k=seq_lens,
        max_seqlen_k=max_seq_len,
        softmax_scale=float(scale),
        causal=True,
        window_size=(-1, -1),
        block_table=block_table,
        softcap=0,
        q_descale=None,
        k_descale=None,
        v_descale=None,
        seq_threshold_3D=scratch.seq_threshold_3d if scratch.split_k else None,
        num_par_softmax_segments=scratch.num_segments if scratch.split_k else None,
        softmax_segm_output=scratch.segm_output,
        softmax_segm_max=scratch.segm_max,
        softmax_segm_expsum=scratch.segm_expsum,
    )


def unified_attention_decode(
    q,
    k_pool,
    v_pool,
    out,
    block_table,
    seq_lens,
    *,
    scale: float,
    max_seq_len: int,
    scratch: DecodeScratch | None = None,
    fn: Callable[..., Any] | None = None,
):
    """One decode step (one query token per sequence) through vLLM's kernel; returns `out`.

    q, out: [num_seqs, heads, head_size]; k_pool, v_pool: [num_blocks, block_size,
    kv_heads, head_size] (any strides); block_table int32 [num_seqs, max_blocks];
    seq_lens int32 [num_seqs]. Without `scratch` one is allocated per call: eager use only.
    """
    _check_decode_args(q, k_pool, v_pool, out, block_table, seq_lens, scale, max_seq_len)
    if scratch is None:
        scratch = make_decode_scratch(q, k_pool.shape[2])
    fn = fn or load_unified_attention()
    fn(**_decode_kwargs(q, k_pool, v_pool, out, block_table, seq_lens, scale, max_seq_len, scratch))
    return out


class DecodeLauncher:
    """A zero-argument launch of one decode shape, safe to capture in a CUDA graph.

    Everything (scratch buffers, argument dict) is built once; calling it only
    launches. Call it once before capture so Triton compiles outside the graph.
    """

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any], scratch: DecodeScratch):
        self.fn, self.kwargs, self.scratch = fn, kwargs, scratch

    def __call__(self) -> None:
        self.fn(**self.kwargs)


def prepare_decode(
    q,
    k_pool,
    v_pool,
    out,
    block_table,
    seq_lens,
    *,
    scale: float,
    max_seq_len: int,
    num_segments: int = NUM_PAR_SOFTMAX_SEGMENTS,
    seq_threshold_3d: int | None = None,
    fn: Callable[..., Any] | None = None,
) -> DecodeLauncher:
    """Validate once, preallocate everything and return a zero-arg launcher (see DecodeLauncher)."""
    _check_decode_args(q, k_pool, v_pool, out, block_table, seq_lens, scale, max_seq_len)
    scratch = make_decode_scratch(q, k_pool.shape[2], num_segments=num_segments, seq_threshold_3d=seq_threshold_3d)
    fn = fn or load_unified_attention()
    kwargs = _decode_kwargs(q, k_pool, v_pool, out, block_table, seq_lens, scale, max_seq_len, scratch)
    return DecodeLauncher(fn, kwargs, scratch)


# --------------------------------------------------------------------------- CLI


def download_wheel(version: str, wheelhouse: Path) -> Path:
    """`pip download vllm==VERSION` (the wheel only) into `wheelhouse`; return its path."""
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version):
        raise ValueError(f"not a version: {version!r}")
    wheelhouse.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps",
           "--only-binary=:all:", "-d", str(wheelhouse)]
    subprocess.run(cmd, check=True)
    found = sorted(wheelhouse.glob(f"vllm-{version}-*.whl"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"pip download left no vllm-{version}-*.whl in {wheelhouse}")
    return found[-1]


def cli(argv: list[str] | None = None) -> int:
    """`python -m lib vllm-kernel`: make a kernel-only vLLM install from a wheel."""
    parser = argparse.ArgumentParser(
        prog="python -m lib vllm-kernel",
        description="Copy only the files vLLM's decode kernel imports (plus METADATA) out of a vLLM wheel.",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", type=Path, help="a vllm-<ver>-*.whl file")
    src.add_argument("--download", metavar="VERSION", help="pip download vllm==VERSION into --wheelhouse first")
    src.add_argument("--status", action="store_true", help="print where vLLM's kernel would come from, as json")
    parser.add_argument("--dest", type=Path, default=None, help="install directory (default <repo>/.vllm-kernel)")
    parser.add_argument("--wheelhouse", type=Path, default=ROOT / "wheelhouse")
    parser.add_argument("--python", default=sys.executable, help="python with torch and triton that runs the import probe")
    args = parser.parse_args(argv)

    if args.status:
        print(json.dumps(vllm_status(args.dest), indent=2))
        return 0
    try:
        wheel = download_wheel(args.download, args.wheelhouse) if args.download else args.wheel
        report = install_kernel_only(wheel, args.dest or DEFAULT_KERNEL_DIR, python=args.python)
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"vLLM {report.version} kernel-only install: {len(report.files)} files, "
        f"{report.bytes / 1e6:.2f} MB in {report.dest}"
    )
    if report.third_party:
        print("it also imports (the target python needs them): " + ", ".join(report.third_party))
    return 0


if __name__ == "__main__":  # python -m lib.engine.backends.vllm ...
    raise SystemExit(cli())
