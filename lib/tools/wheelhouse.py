"""Wheels for an offline GPU node: ``python -m lib wheelhouse`` (see README, Offline GPU nodes),
with kernel-only vLLM and FlashInfer installs beside them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# What a GPU node needs beyond a stock CUDA PyTorch image with CuPy (torch, triton, cupy, numpy,
# pandas, matplotlib, seaborn, nvidia-ml-py come with it): running chapters through papermill.
RUN_PACKAGES = ["papermill>=2.6", "jupytext>=1.16", "nbclient", "nbformat", "ipykernel>=6.29", "tqdm>=4.66"]
# What `python -m lib sweep` alone needs (a node that only measures: `--sweeps-only`).
SWEEP_PACKAGES = ["tqdm>=4.66"]
# ... and rebuilding the book there (`reproduce` ends with a build unless --no-build).
BOOK_PACKAGES = ["jupyter-book==1.0.4.post1"]
# FlashInfer's JIT runs `ninja` (a declared requirement of flashinfer-python; stock images may lack it).
FLASHINFER_PACKAGES = ["ninja"]

INSTALL_SH = """#!/usr/bin/env sh
# Installs this wheelhouse into the Python environment of an offline GPU node (no index needed).
#   sh {dest}/install.sh            # uses python3, or set PYTHON=/path/to/python
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
PY="${{PYTHON:-python3}}"
"$PY" -m pip install --no-index --find-links "$here" -r "$here/requirements.txt"
# The kernel-only installs: where the backends look by default (<repo>/.vllm-kernel and
# <repo>/.flashinfer-kernel) when this wheelhouse sits in a checkout, so one command sets up all.
repo="$(dirname "$here")"
for kind in vllm flashinfer; do
  [ -d "$here/$kind-kernel" ] || continue
  var="UVM_STUDY_$(echo "$kind" | tr a-z A-Z)_DIR"
  if [ -f "$repo/lib/__main__.py" ] && [ ! -e "$repo/.$kind-kernel" ]; then
    ln -s "$(basename "$here")/$kind-kernel" "$repo/.$kind-kernel"
    echo "$kind kernel-only install: linked $repo/.$kind-kernel -> $here/$kind-kernel"
  elif [ -f "$repo/lib/__main__.py" ] && [ "$(cd "$repo/.$kind-kernel" && pwd -P)" = "$(cd "$here/$kind-kernel" && pwd -P)" ]; then
    echo "$kind kernel-only install: $repo/.$kind-kernel is this one"
  else
    echo "$kind kernel-only install: export $var=$here/$kind-kernel (or copy it to <repo>/.$kind-kernel)"
  fi
done
# vLLM's 2024 kernels (the seed's): built here from the release's sdist with nvcc (a few seconds).
for sdist in "$here"/vllm-*.tar.gz; do
  [ -f "$sdist" ] && [ -f "$repo/lib/__main__.py" ] || continue
  (cd "$repo" && "$PY" -m lib vllm2024-kernel --sdist "$sdist") \
    || echo "vLLM 2024 kernels: not built (nvcc missing?); the vllm2024 backends stay unavailable"
done
if [ -d "$here/flashinfer-kernel" ]; then
  echo "FlashInfer's JIT cache: FLASHINFER_WORKSPACE_BASE, default <repo>/.flashinfer-cache"
  echo "  (keep it between runs: the first compile takes ~20 s a kernel)"
fi
"$PY" -m lib env 2>/dev/null || echo "now run: $PY -m lib env (from the repository) to check"
"""


def platform_tags(platform: str) -> list[str]:
    """pip's --platform values for a target: a manylinux_2_Y tag also accepts every older glibc
    (pip does not expand these itself)."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    y, arch = int(m.group(1)), m.group(2)
    tags = [f"manylinux_2_{v}_{arch}" for v in range(y, 16, -1)]
    if y >= 17 and arch in ("x86_64", "i686", "aarch64", "ppc64le", "s390x", "armv7l"):
        tags.append(f"manylinux2014_{arch}")
    if arch in ("x86_64", "i686"):
        tags += [f"manylinux2010_{arch}"] * (y >= 12) + [f"manylinux1_{arch}"] * (y >= 5)
    return tags


def _target_python(version: str) -> str:
    """An interpreter of the target version with pip, else this one: pip evaluates dependency
    markers (python_version < "3.11", ...) with the interpreter that runs it."""
    if ".".join(map(str, sys.version_info[:2])) == version:
        return sys.executable
    exe = shutil.which(f"python{version}")
    if exe:
        try:
            if subprocess.run([exe, "-m", "pip", "--version"], capture_output=True, timeout=60).returncode == 0:
                return exe
        except (OSError, subprocess.SubprocessError):
            pass
    return sys.executable


def build(dest: Path, *, python_version: str, platform: str, book: bool = True, extra=(),
          vllm_wheel: str | None = None, vllm_python: str | None = None,
          flashinfer_wheel: str | None = None, tvm_ffi_wheel: str | None = None,
          flashinfer_version: str | None = None, flashinfer_python: str | None = None,
          dry_run: bool = False, sweeps_only: bool = False, vllm_flash_attn: bool = False,
          vllm2024: str | None = None) -> int:
    """Download the wheels (and make the kernel-only vLLM and FlashInfer installs) into `dest`;
    an exit code. FlashInfer: its two wheels given, or `flashinfer_version` to download them for
    the target python and platform. `sweeps_only`: only what sweeps need (no papermill, no
    book), for a node that measures and sends its rows back. `vllm2024`: a vLLM release whose sdist
    is added (its 2024 kernels are built on the node by install.sh: `python -m lib vllm2024-kernel`)."""
    dest = Path(dest).resolve()
    if sweeps_only:
        packages = SWEEP_PACKAGES + list(extra)
    else:
        packages = RUN_PACKAGES + (BOOK_PACKAGES if book else []) + list(extra)
    notes = []
    if flashinfer_wheel and flashinfer_version:
        raise ValueError("give either --flashinfer-wheel (with --tvm-ffi-wheel) or --flashinfer VERSION, not both")
    if flashinfer_wheel and not tvm_ffi_wheel:
        raise ValueError("--flashinfer-wheel needs --tvm-ffi-wheel (apache-tvm-ffi for the node's python)")
    if flashinfer_wheel or flashinfer_version:
        packages += [p for p in FLASHINFER_PACKAGES if p not in packages]
        if not dry_run:
            notes.append(_flashinfer_kernel(dest, packages, python_version, platform, flashinfer_wheel,
                                            tvm_ffi_wheel, flashinfer_version, flashinfer_python))
    if vllm_wheel and not dry_run:
        from lib.tools import vllm_install

        rep = vllm_install.install_kernel_only(Path(vllm_wheel), dest / "vllm-kernel", flash_attn=vllm_flash_attn,
                                               **({"python": vllm_python} if vllm_python else {}))
        packages += [p for p in rep.third_party if p not in packages]
        notes.append(f"vLLM {rep.version} kernel-only install: {len(rep.files)} files in {rep.dest}")
    if vllm2024 and not dry_run:
        from lib.tools import vllm2024 as v2024

        sdist = v2024.fetch_sdist(vllm2024, dest)
        notes.append(f"vLLM {vllm2024}'s sdist for its 2024 kernels (built by install.sh): {sdist.name}")
    py = _target_python(python_version)
    host = ".".join(map(str, sys.version_info[:2])) if py == sys.executable else python_version
    if host != python_version:
        notes.append(f"note: pip ran under Python {host}; dependencies behind python_version markers "
                     f"follow {host}, not {python_version} (install python{python_version} to avoid this)")
    cmd = [py, "-m", "pip", "download", "--only-binary=:all:", "--dest", str(dest),
           "--python-version", python_version, "--implementation", "cp"]
    for tag in platform_tags(platform):
        cmd += ["--platform", tag]
    cmd += packages
    if dry_run:
        print(" ".join(cmd))
        for n in notes:
            print(n, file=sys.stderr)
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        print(f"error: pip download failed (exit {rc})", file=sys.stderr)
        return rc
    (dest / "requirements.txt").write_text(
        "# top-level packages; pip takes their dependencies from this directory or the environment\n"
        + "\n".join(packages) + "\n")
    (dest / "install.sh").write_text(INSTALL_SH.format(dest=dest.name))
    (dest / "install.sh").chmod(0o755)
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 1e6
    print(f"{len(wheels)} wheels ({size:.1f} MB) for CPython {python_version} on {platform} in {dest}")
    for n in notes:
        print(n)
    print(f"copy {dest.name}/ and this repository to the node, then: sh {dest.name}/install.sh")
    return 0


def _flashinfer_kernel(dest: Path, packages: list, python_version: str, platform: str, wheel, tvm_wheel,
                       version, python) -> str:
    """Make `dest`/flashinfer-kernel (downloading its wheels to a scratch folder when asked);
    add what FlashInfer imports beyond torch to `packages`; return the note to print."""
    from lib.tools import flashinfer_install

    scratch = Path(tempfile.mkdtemp(prefix="flashinfer-wheels-")) if version else None
    try:
        if version:
            wheel, tvm_wheel = flashinfer_install.download_wheels(
                version, scratch, python_version=python_version, platforms=platform_tags(platform))
        rep = flashinfer_install.install_kernel_only(Path(wheel), Path(tvm_wheel), dest / "flashinfer-kernel",
                                                     **({"python": python} if python else {}))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    packages += [p for p in rep.third_party if p not in packages]
    return (f"FlashInfer {rep.version} + tvm-ffi {rep.tvm_ffi_version} kernel-only install: "
            f"{len(rep.files)} files, {rep.bytes / 1e6:.1f} MB in {rep.dest}")
