"""Prebuilt kernel modules: compile with nvcc anywhere (no GPU needed), load on the GPU node.

NVRTC takes seconds per module and a full correctness matrix needs hundreds. `build` compiles
them ahead of time with nvcc into ``<dir>/<key>.cubin`` plus ``manifest.json`` (per module the
mangled name of every name expression; the source hash, options and architecture). `load` (used
by `lib.engine.kernels.get_module`) takes a module from ``$UVM_STUDY_KERNEL_CACHE``, else
``<repo>/.kernel-cache``, only when it was built from the *current* source and options for this
GPU's architecture: a stale or foreign cache is ignored, never trusted.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import tempfile
from pathlib import Path

from lib import ROOT
import lib.engine.kernels.plan as kernels
from lib.engine.kernels.nvcc import compile_cubin, nvcc_path, parse_ptxas

MANIFEST = "manifest.json"


def default_dir() -> Path:
    return Path(os.environ.get("UVM_STUDY_KERNEL_CACHE") or ROOT / ".kernel-cache")


def source_hash(options: tuple[str, ...]) -> str:
    h = hashlib.sha256(kernels.SOURCE.read_bytes())
    h.update(repr(tuple(o for o in options if not o.startswith("-I"))).encode())
    return h.hexdigest()[:16]


def key_name(key) -> str:
    dtype, bs, d, tile = key
    return f"{dtype}_b{bs}_d{d}_t{tile}"


def _translation_unit(key) -> str:
    """A .cu that includes the source and instantiates the module's kernels explicitly."""
    dtype, bs, d, tile = key
    t = kernels.CTYPE[dtype]
    lines = [f'#include "{kernels.SOURCE}"']
    for a in kernels.ADDRESSING.values():
        kernel = (f"paged_attention_mma<{t}, {bs}, {d}, {a}, {tile}>" if tile in kernels.MMA_TILES
                  else f"paged_attention_decode<{t}, {bs}, {d}, {tile}, {a}>")
        lines.append(
            f"template __global__ void upa::{kernel}("
            f"{t}*, float*, float*, float*, const {t}*, const {t}*, const {t}*, const int*, "
            "const int*, const int*, int, int, int, float, int, int, int);")
    lines.append(f"template __global__ void upa::paged_attention_reduce<{t}, {d}>({t}*, const float*, "
                 "const float*, const float*, const int*, int, int, int);")
    return "\n".join(lines) + "\n"


def _build_one(key, out_dir: Path, arch: str, nvcc: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp, "m.cu")
        cu.write_text(_translation_unit(key))
        cubin = out_dir / f"{key_name(key)}.cubin"
        rc, out = compile_cubin(nvcc, cu, arch, cubin)
        if rc:
            raise RuntimeError(f"nvcc failed for {key}:\n{out[-3000:]}")
    by_expr = {_name_expression(r): r["mangled"] for r in parse_ptxas(out)}
    names = {}
    for expr in kernels.instantiations(*key):
        if expr not in by_expr:
            raise RuntimeError(f"{expr} not found among the compiled entries of {key}")
        names[expr] = by_expr[expr]
    return {"file": cubin.name, "names": names}


def _name_expression(row: dict) -> str:
    """CuPy's name expression of a kernel parsed from the ptxas report."""
    if row["kernel"] == "decode":
        return kernels.decode_name(row["dtype"], row["block_size"], row["head_size"], row["tile"],
                                   row["addressing"])
    if row["kernel"] == "mma":
        return kernels.mma_name(row["dtype"], row["block_size"], row["head_size"], row["addressing"],
                                row["tile"])
    return kernels.reduce_name(row["dtype"], row["head_size"])


def build(keys=None, out_dir: Path | None = None, *, arch: str = "sm_90", jobs: int | None = None,
          progress: bool = True) -> Path:
    """Compile modules (default: every module the registry can launch) into `out_dir`."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("building the kernel cache needs nvcc (CUDA toolkit)")
    out_dir = Path(out_dir or default_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted(set(keys if keys is not None else kernels.all_modules()))
    options = kernels.compile_options()
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest.get("source_hash") != source_hash(options) or manifest.get("arch") != arch:
        manifest = {"source_hash": source_hash(options), "arch": arch, "modules": {}}
    todo = [k for k in keys if key_name(k) not in manifest["modules"]]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"nvcc {arch}", unit="module")
    def save():  # after every module: an interrupted build keeps what it finished
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        tmp.replace(manifest_path)

    with cf.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        futures = {pool.submit(_build_one, k, out_dir, arch, nvcc): k for k in todo}
        for fut in cf.as_completed(futures):
            manifest["modules"][key_name(futures[fut])] = fut.result()
            save()
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    save()
    return out_dir


class _Prebuilt:
    """A cubin module that answers `get_function(name_expression)` like a CuPy RawModule."""

    def __init__(self, path: Path, names: dict):
        import cupy

        self._mod = cupy.RawModule(path=str(path))
        self._names = names

    def get_function(self, expr: str):
        return self._mod.get_function(self._names[expr])


def load(key, options: tuple[str, ...]):
    """The prebuilt module for `key`, or None when no valid cache entry exists."""
    import cupy

    d = default_dir()
    manifest_path = d / MANIFEST
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return None
    arch = f"sm_{cupy.cuda.Device().compute_capability}"  # e.g. "90"
    if manifest.get("arch") != arch or manifest.get("source_hash") != source_hash(options):
        return None
    entry = manifest["modules"].get(key_name(key))
    if entry is None or not (d / entry["file"]).exists():
        return None
    return _Prebuilt(d / entry["file"], entry["names"])
