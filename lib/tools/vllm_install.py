"""Kernel-only vLLM install: the few files of a vLLM wheel that its decode kernel imports.

vLLM 0.33's wheel is 336 MB and pins its own torch, yet its Triton decode kernel
(``lib.engine.backends.vllm.KERNEL_MODULE``) needs a few dozen pure-Python files: those a
subprocess imports from the unpacked wheel. The result runs beside another torch and on offline
GPU nodes. Two silent traps shape it (the engine's loader checks both again):

* vLLM asks ``importlib.metadata.version("vllm")`` to decide whether Triton is usable and swaps
  in a no-op stand-in when it does not resolve: ``METADATA`` is copied beside the modules.
* ``vllm/third_party/pynvml.py`` makes vLLM pick its CUDA platform, which imports a compiled
  library built for the wheel's torch: never copied, and deleted before the probe imports.

The probe runs with ``CUDA_VISIBLE_DEVICES=""``: vLLM then keeps real Triton without a GPU, so a
CPU-only builder finds the module set a GPU node imports.
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
from typing import Any

from lib import ROOT
from lib.engine.backends.vllm import (DEFAULT_KERNEL_DIR, KERNEL_MODULE, MANIFEST_NAME, PYNVML_SHIM,
                                      read_metadata, vllm_status)
from lib.tools.wheel_files import find_metadata, sha256_file, swap_in, unsafe_member


@dataclasses.dataclass(frozen=True)
class InstallReport:
    """What an install wrote; ``third_party``: distributions vLLM imported beyond torch, triton
    and their requirements (e.g. regex): the target python needs them too."""

    files: tuple[str, ...]
    bytes: int
    version: str
    dest: Path
    third_party: tuple[str, ...] = ()


#: the checks every install makes (kept under this module's old name)
_unsafe_member = unsafe_member


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
    result["modules"], result["outside"] = mods, outside
    pkg_root = os.path.join(root, top) + os.sep
    result["data_files"] = sorted(os.path.relpath(p, root) for p in opened
                                  if p.startswith(pkg_root) and "__pycache__" not in p and os.path.isfile(p))
    try:
        result["version"] = importlib.metadata.version(top)
    except Exception:
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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # vLLM keeps real Triton with no GPU bound (see top)
    # -I: no user site, no cwd on sys.path, PYTHON* ignored; -B: leave the tree unchanged
    try:
        proc = subprocess.run([python, "-I", "-B", "-c", _PROBE, str(root), module, str(out)],
                              env=env, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise ValueError(f"python interpreter not found: {python}") from None
    if not out.exists():
        raise RuntimeError(f"the import probe in {python} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _check_probe(result: dict[str, Any], python: str, module: str) -> None:
    """Turn a failed or misleading probe into a clear error."""
    top = module.split(".")[0]
    if not result["ok"]:
        missing = (result.get("missing") or "").split(".")[0]
        if missing in ("torch", "triton"):
            raise RuntimeError(f"{python} lacks {missing}: importing {module} needs torch and triton "
                               f"in the python that runs the install (pass python=... / --python). "
                               f"({result['error']})")
        raise RuntimeError(f"importing {module} from the wheel failed in {python}: {result['error']}")
    if result["outside"]:
        raise RuntimeError(f"{top} modules were imported from outside the wheel: {result['outside'][:3]}")
    if result.get("has_triton") is False:
        why = "it has no triton" if result.get("triton") is None else "Triton looked unusable to it"
        raise RuntimeError(f"vLLM replaced Triton by its no-op stand-in during the import in {python} "
                           f"({why}); the module set would not be the one a GPU run imports. Install triton there.")
    if not result.get("version"):
        raise RuntimeError(f"importlib.metadata.version({top!r}) did not resolve during the probe")


def install_kernel_only(wheel: Path, dest: Path, *, python: str = sys.executable,
                        module: str = KERNEL_MODULE, flash_attn: bool = False) -> InstallReport:
    """Make a kernel-only install of `module` in `dest` from `wheel` (its member names all checked first).

    `python` (with torch and triton) imports `module` from the unpacked wheel; the files it
    imported, their packages' ``__init__.py``, package data they opened and the ``METADATA`` go to
    `dest` with a manifest. An earlier install in `dest` is replaced atomically; any other
    non-empty `dest` is refused. `flash_attn`: add vLLM's FlashAttention 3 as well
    (:data:`lib.engine.backends.vllm_fa.FLASH_ATTN_FILES`: two Python files and its compiled
    library, 172 MB; named, since a probe without a GPU cannot load a CUDA library).
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
        meta_member = find_metadata(names, top, wheel.name)
        meta = read_metadata(zf.read(meta_member).decode("utf-8", "replace"))
        if dest.is_file():
            raise ValueError(f"{dest} is a file, not a directory")
        if dest.is_dir() and any(dest.iterdir()) and not (dest / MANIFEST_NAME).is_file():
            raise ValueError(f"{dest} exists, is not empty and holds no {MANIFEST_NAME}: refusing to replace it")
        work = Path(tempfile.mkdtemp(prefix="vllm-kernel-"))
        try:
            tree = work / "wheel"
            zf.extractall(tree)
            (tree / top / PYNVML_SHIM).unlink(missing_ok=True)
            result = _probe_imports(python, tree, module)
            _check_probe(result, python, module)
            if flash_attn:
                from lib.engine.backends.vllm_fa import FLASH_ATTN_FILES

                missing = [f for f in FLASH_ATTN_FILES if f not in names]
                if missing:
                    raise ValueError(f"{wheel.name} has no vLLM FlashAttention 3: missing {', '.join(missing)}")
                result = {**result, "data_files": [*result["data_files"], *FLASH_ATTN_FILES],
                          "flash_attn": list(FLASH_ATTN_FILES)}
            version = meta.get("Version") or result["version"]
            return _copy_install(tree, dest, wheel, meta_member, version, module, result)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _copy_install(tree: Path, dest: Path, wheel: Path, meta_member: str, version: str, module: str,
                  result: dict[str, Any]) -> InstallReport:
    files = set(result["modules"].values()) | set(result["data_files"])
    for rel in list(files):  # every package __init__.py on the way down
        parent = PurePosixPath(Path(rel).as_posix()).parent
        while parent.parts:
            if (tree / parent / "__init__.py").is_file():
                files.add((parent / "__init__.py").as_posix())
            parent = parent.parent
    files = {Path(f).as_posix() for f in files} - {f"{module.split('.')[0]}/{PYNVML_SHIM}"}
    files = sorted(files | {meta_member})
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    try:
        total = 0
        for rel in files:
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tree / rel, target)
            total += target.stat().st_size
        manifest = {
            "vllm_version": version, "kernel_module": module,
            "wheel": {"name": wheel.name, "sha256": sha256_file(wheel)},
            "files": files, "total_bytes": total,
            "flash_attn_files": result.get("flash_attn", []),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "probe": {k: result.get(k) for k in ("python", "torch", "triton", "has_triton", "platform",
                                                 "third_party")},
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        swap_in(staging, dest)  # an earlier install (checked above) is swapped out
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return InstallReport(tuple(files), total, version, dest, tuple(result.get("third_party") or ()))


def download_wheel(version: str, wheelhouse: Path) -> Path:
    """`pip download vllm==VERSION` (the wheel only) into `wheelhouse`; return its path."""
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version):
        raise ValueError(f"not a version: {version!r}")
    wheelhouse.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps",
                    "--only-binary=:all:", "-d", str(wheelhouse)], check=True)
    found = sorted(wheelhouse.glob(f"vllm-{version}-*.whl"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"pip download left no vllm-{version}-*.whl in {wheelhouse}")
    return found[-1]


def cli(argv: list[str] | None = None) -> int:
    """`python -m lib vllm-kernel`: make a kernel-only vLLM install from a wheel."""
    parser = argparse.ArgumentParser(
        prog="python -m lib vllm-kernel",
        description="Copy only the files vLLM's decode kernel imports (plus METADATA) out of a vLLM wheel.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", type=Path, help="a vllm-<ver>-*.whl file")
    src.add_argument("--download", metavar="VERSION", help="pip download vllm==VERSION into --wheelhouse first")
    src.add_argument("--status", action="store_true", help="print where vLLM's kernel would come from, as json")
    parser.add_argument("--dest", type=Path, default=None, help="install directory (default <repo>/.vllm-kernel)")
    parser.add_argument("--wheelhouse", type=Path, default=ROOT / "wheelhouse")
    parser.add_argument("--python", default=sys.executable, help="python with torch and triton that runs the import probe")
    parser.add_argument("--flash-attn", action="store_true",
                        help="add vLLM's FlashAttention 3 (the vllm-fa3 backend; +172 MB)")
    args = parser.parse_args(argv)
    if args.status:
        print(json.dumps(vllm_status(args.dest), indent=2))
        return 0
    try:
        wheel = download_wheel(args.download, args.wheelhouse) if args.download else args.wheel
        report = install_kernel_only(wheel, args.dest or DEFAULT_KERNEL_DIR, python=args.python,
                                     flash_attn=args.flash_attn)
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"vLLM {report.version} kernel-only install: {len(report.files)} files, "
          f"{report.bytes / 1e6:.2f} MB in {report.dest}")
    if report.third_party:
        print("it also imports (the target python needs them): " + ", ".join(report.third_party))
    return 0
