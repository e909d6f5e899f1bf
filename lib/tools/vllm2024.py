"""Build vLLM's 2024 paged-attention kernels from the release's source:
``python -m lib vllm2024-kernel``.

The seed profiled vLLM's CUDA ``paged_attention_v1/v2`` of March 2024 (vLLM 0.3.3). Its wheels are
built for torch 2.1 and cannot load beside today's torch, and ``pip download`` of its sdist runs a
build that asks for torch 2.1.2. So this tool works from the sdist itself:

1. :func:`fetch_sdist` downloads it from the package index's simple API and checks the sha256
   the index publishes (on a machine with network; the wheelhouse carries it to offline nodes).
2. :func:`read_sources` refuses the whole archive if any member is unsafe (absolute path, ``..``,
   link, device). It then reads only ``csrc/attention/`` and ``csrc/cuda_compat.h``.
3. :func:`translation_unit` keeps ``attention_kernels.cu``'s kernel templates (its ``namespace
   vllm`` block and the macros before it) and drops its torch launcher. It instantiates the
   templates at the block sizes the seed measured (1-32; vLLM's launcher had only 8, 16 and 32)
   and at every head size of vLLM's launcher.
4. :func:`build` compiles one cubin per (dtype, block size) with nvcc, using vLLM 0.3.3's own
   device flags (:data:`NVCC_FLAGS`). It writes the manifest the ``vllm2024-v1/v2`` backends load
   (:mod:`lib.engine.backends.vllm2024`): version, sdist and source hashes, flags, nvcc, the
   mangled name and ptxas resources of every kernel.
   A build whose manifest already matches is kept (cached). A new one is swapped in atomically.

None of vLLM's code is committed to this repository: it is fetched and compiled, like the
kernel-only vLLM install.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lib.engine.backends import vllm2024 as K
from lib.engine.kernels.nvcc import nvcc_path, nvcc_version, parse_ptxas
from lib.tools.wheel_files import sha256_file, swap_in, unsafe_member

INDEX = "https://pypi.org/simple/vllm/"
#: The files of the sdist the kernels need (relative to its csrc/).
KERNEL_SOURCE = "attention/attention_kernels.cu"
NEEDED_PREFIXES = ("attention/", "cuda_compat.h")
#: vLLM 0.3.3's setup.py: NVCC_FLAGS ("-O2", "-std=c++17") plus torch's COMMON_NVCC_FLAGS, which
#: setup.py appended before it removed the half-operator flags from torch's list (so they stay).
#: It also defined ENABLE_FP8_E5M2, which only adds the fp8-cache instantiations this build
#: does not make.
NVCC_FLAGS = ("-O2", "-std=c++17", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
              "--expt-relaxed-constexpr")
#: The three kernel templates' signatures in 0.3.3: a source whose templates differ is refused
#: (the launcher in lib.engine.backends.vllm2024 passes these arguments).
SIGNATURES = {
    "paged_attention_v1_kernel": ("scalar_t* __restrict__ out", "const int kv_head_stride"),
    "paged_attention_v2_kernel": ("float* __restrict__ exp_sums", "const int kv_head_stride"),
    "paged_attention_v2_reduce_kernel": ("scalar_t* __restrict__ out", "const int max_num_partitions"),
}
_MANGLED = re.compile(r"^_ZN4vllm\d+paged_attention_(?P<kind>v1_kernel|v2_kernel|v2_reduce_kernel)I"
                      r"(?P<type>t|f|13__nv_bfloat16)(?:t|f|S\d*_)?Li(?P<head>\d+)E")
_KIND = {"v1_kernel": "v1", "v2_kernel": "v2", "v2_reduce_kernel": "reduce"}


# --------------------------------------------------------------------------- the source

def sdist_name(version: str) -> str:
    return f"vllm-{version}.tar.gz"


def index_entry(version: str, *, index: str = INDEX, timeout: float = 60) -> dict:
    """The package index's record of vLLM's sdist of `version` (url, sha256, size)."""
    req = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        files = json.load(r)["files"]
    name = sdist_name(version)
    for f in files:
        if f.get("filename") == name:
            if not f.get("hashes", {}).get("sha256"):
                raise ValueError(f"the index lists {name} without a sha256: refusing it")
            return {"url": f["url"], "sha256": f["hashes"]["sha256"], "size": f.get("size")}
    raise FileNotFoundError(f"{index} has no {name} (is {version!r} a vLLM release with an sdist?)")


def fetch_sdist(version: str, dest: Path, *, index: str = INDEX) -> Path:
    """Download vLLM's sdist of `version` into `dest` (kept if already there with the published
    sha256); ValueError when the download does not match it."""
    entry = index_entry(version, index=index)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / sdist_name(version)
    if target.is_file() and sha256_file(target) == entry["sha256"]:
        return target
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=dest)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(entry["url"], timeout=300) as r:
            while chunk := r.read(1 << 20):
                out.write(chunk)
        got = sha256_file(Path(tmp))
        if got != entry["sha256"]:
            raise ValueError(f"{entry['url']}: sha256 {got}, the index says {entry['sha256']}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _unsafe_tar_member(info: tarfile.TarInfo) -> str | None:
    why = unsafe_member(info.name)
    if why:
        return why
    if info.issym() or info.islnk():
        return "link"
    if not (info.isfile() or info.isdir()):
        return "device, fifo or other special file"
    return None


@dataclass
class Sources:
    """The kernel sources read from an sdist: csrc-relative path -> bytes, and where they came from."""

    version: str
    sdist_sha256: str
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """One hash over the files compiled (names and contents, in name order)."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()


def read_sources(sdist: Path) -> Sources:
    """The kernel sources of vLLM's sdist; ValueError on an unsafe member anywhere in it."""
    sdist = Path(sdist)
    m = re.fullmatch(r"vllm-(?P<v>[0-9][^/]*)\.tar\.gz", sdist.name)
    if not m:
        raise ValueError(f"{sdist.name}: expected vLLM's sdist, named vllm-<version>.tar.gz")
    version = m["v"]
    src = Sources(version, sha256_file(sdist))
    top = f"vllm-{version}/csrc/"
    with tarfile.open(sdist, "r:gz") as tf:
        members = tf.getmembers()
        for info in members:
            why = _unsafe_tar_member(info)
            if why:
                raise ValueError(f"refusing {sdist.name}: member {info.name!r} is unsafe ({why})")
        for info in members:
            if info.isfile() and info.name.startswith(top):
                rel = info.name[len(top):]
                if rel.startswith(NEEDED_PREFIXES):
                    src.files[rel] = tf.extractfile(info).read()
    if KERNEL_SOURCE not in src.files:
        raise ValueError(f"{sdist.name} has no csrc/{KERNEL_SOURCE}: not a vLLM release with the 2024 kernels")
    return src


def kernel_templates(text: str) -> str:
    """``attention_kernels.cu`` less its torch launcher: the macros after its includes and its
    ``namespace vllm`` block. ValueError when the file is not laid out as in vLLM 0.3.x."""
    start, begin, end = "#include <algorithm>\n", "namespace vllm {\n", "} // namespace vllm\n"
    for marker in (start, begin, end):
        if text.count(marker) != 1:
            raise ValueError(f"attention_kernels.cu: expected one {marker.strip()!r}, found "
                             f"{text.count(marker)} (a vLLM release other than 0.3.x?)")
    a, b = text.index(start) + len(start), text.index(begin)
    c = text.index(end) + len(end)
    body = text[a:b] + text[b:c]
    for name, (first, last) in SIGNATURES.items():
        m = re.search(rf"__global__ void {name}\((?P<params>[^)]*)\)", body)
        if not m or first not in m["params"] or not m["params"].rstrip().endswith(last):
            raise ValueError(f"attention_kernels.cu: {name} is not vLLM 0.3.3's (its launcher here "
                             "would pass the wrong arguments)")
    return body


def instantiations(dtype: str, block_size: int, head_sizes) -> list[str]:
    """Explicit instantiations of vLLM's own __global__ templates, with vLLM's launcher's template
    arguments (128 threads, no fp8 cache, v2 partitions of 512)."""
    t = K.SCALAR_TYPES[dtype]
    n, part = K.NUM_THREADS, K.PARTITION_SIZE
    tail = "int, float, const int*, const int*, int, const float*, int, int, int"
    lines = []
    for d in head_sizes:
        lines += [
            f"template __global__ void vllm::paged_attention_v1_kernel<{t}, {t}, {d}, {block_size}, {n}, "
            f"false>({t}*, const {t}*, const {t}*, const {t}*, {tail});",
            f"template __global__ void vllm::paged_attention_v2_kernel<{t}, {t}, {d}, {block_size}, {n}, "
            f"false, {part}>(float*, float*, {t}*, const {t}*, const {t}*, const {t}*, {tail});",
            f"template __global__ void vllm::paged_attention_v2_reduce_kernel<{t}, {d}, {n}, {part}>("
            f"{t}*, const float*, const float*, const {t}*, const int*, const int);",
        ]
    return lines


def head_sizes_for(block_size: int) -> tuple[int, ...]:
    """The head sizes vLLM's kernel takes at this block size (see ``check_problem``)."""
    g = K.thread_group_size(block_size)
    return tuple(d for d in K.HEAD_SIZES if d % g == 0)


def translation_unit(sources: Sources, dtype: str, block_size: int) -> str:
    body = kernel_templates(sources.files[KERNEL_SOURCE].decode())
    head = [f"// Generated by lib.tools.vllm2024 from vLLM {sources.version}'s csrc/{KERNEL_SOURCE}",
            f"// (sdist sha256 {sources.sdist_sha256}): its kernel templates, unmodified, without",
            "// its torch launcher; instantiated for one dtype and block size.",
            "#include <stdint.h>", '#include "attention/attention_dtypes.h"',
            '#include "attention/attention_utils.cuh"', "#include <algorithm>"]
    return "\n".join(head) + "\n" + body + "\n" + "\n".join(
        instantiations(dtype, block_size, head_sizes_for(block_size))) + "\n"


# --------------------------------------------------------------------------- compiling

def kernel_of(mangled: str) -> dict:
    """Kind (v1, v2, reduce) and head size of one of vLLM's kernels from its mangled name."""
    k = _MANGLED.match(mangled)
    if not k:
        raise ValueError(f"unexpected entry function {mangled!r}")
    return {"kind": _KIND[k["kind"]], "head_size": int(k["head"])}


def parse_report(text: str) -> list[dict]:
    """One dict per vLLM kernel in an `nvcc -Xptxas -v` report (the project's ptxas parser)."""
    return parse_ptxas(text, kernel_of)


def _compile(nvcc: str, sources: Sources, src_dir: Path, out_dir: Path, dtype: str, block_size: int,
             arch: str) -> dict:
    name = K.module_name(dtype, block_size)
    cu = src_dir / f"{name}.cu"
    cu.write_text(translation_unit(sources, dtype, block_size))
    cubin = out_dir / f"{name}.cubin"
    cmd = [nvcc, *NVCC_FLAGS, "-cubin", f"-arch={arch}", "-Xptxas", "-v", f"-I{src_dir}",
           "-o", str(cubin), str(cu)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"nvcc failed for {name}:\n{(r.stdout + r.stderr)[-3000:]}")
    rows = parse_report(r.stdout + r.stderr)
    want = {K.kernel_id(kind, d) for d in head_sizes_for(block_size) for kind in ("v1", "v2", "reduce")}
    kernels = {K.kernel_id(x["kind"], x["head_size"]): x["mangled"] for x in rows}
    if set(kernels) != want:
        raise RuntimeError(f"{name}: ptxas reported {sorted(kernels)}, expected {sorted(want)}")
    return {"file": cubin.name, "kernels": kernels,
            "resources": [{k: v for k, v in x.items() if k != "mangled"} for x in rows]}


def build(sdist: Path, out: Path | None = None, *, arch: str = "sm_90", dtypes=None, block_sizes=None,
          jobs: int | None = None, force: bool = False, progress: bool = True) -> dict:
    """Compile the kernels of vLLM's sdist into `out` (default: the backends' directory); return
    the manifest. A build with the same sources, flags, nvcc and modules is kept as it is."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("building vLLM's 2024 kernels needs nvcc (CUDA toolkit)")
    dtypes = tuple(dtypes or K.SCALAR_TYPES)
    block_sizes = tuple(int(b) for b in (block_sizes or K.BLOCK_SIZES))
    for b in block_sizes:
        K.check_problem(1, dtype=dtypes[0], block_size=b, head_size=128, max_seq_len=1)
    for d in dtypes:
        K.check_problem(1, dtype=d, block_size=16, head_size=128, max_seq_len=1)
    sources = read_sources(Path(sdist))
    out = K.kernel_dir(out)
    want = {"vllm_version": sources.version, "sdist_sha256": sources.sdist_sha256,
            "source_sha256": sources.sha256, "arch": arch, "nvcc": nvcc_version(nvcc),
            "nvcc_flags": list(NVCC_FLAGS), "num_threads": K.NUM_THREADS,
            "partition_size": K.PARTITION_SIZE}
    names = sorted(K.module_name(d, b) for d in dtypes for b in block_sizes)
    if not force and (out / K.MANIFEST).is_file():
        have = json.loads((out / K.MANIFEST).read_text())
        if ({k: have.get(k) for k in want} == want and set(names) <= set(have.get("modules", {}))
                and all((out / m["file"]).is_file() for m in have["modules"].values())):
            if progress:
                print(f"vLLM {sources.version}'s kernels: the build at {out} is current ({len(have['modules'])} modules)")
            return have
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src_dir = Path(tmp)
            for rel, data in sources.files.items():
                (src_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                (src_dir / rel).write_bytes(data)
            modules = {}
            with cf.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
                futs = {pool.submit(_compile, nvcc, sources, src_dir, staging, d, b, arch): K.module_name(d, b)
                        for d in dtypes for b in block_sizes}
                for i, fut in enumerate(cf.as_completed(futs), 1):
                    modules[futs[fut]] = fut.result()
                    if progress:
                        print(f"  [{i}/{len(futs)}] {futs[fut]}", file=sys.stderr, flush=True)
        manifest = {**want, "modules": dict(sorted(modules.items())),
                    "build_seconds": round(time.perf_counter() - t0, 1)}
        (staging / K.MANIFEST).write_text(json.dumps(manifest, indent=1))
        swap_in(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if progress:
        print(f"vLLM {sources.version}'s kernels: {len(modules)} modules in {out} "
              f"({manifest['build_seconds']} s, {arch})")
    return manifest


def find_sdist(version: str, places) -> Path | None:
    """An sdist of `version` in one of `places` (e.g. the wheelhouse), or None."""
    for p in places:
        f = Path(p) / sdist_name(version)
        if f.is_file():
            return f
    return None


def cli(argv: list[str]) -> int:
    from lib import ROOT

    p = argparse.ArgumentParser(
        prog="python -m lib vllm2024-kernel",
        description="Build vLLM's 2024 paged_attention v1/v2 kernels (the seed's) from the release's "
                    "source, for the vllm2024-v1/v2 backends. Offline: pass --sdist (the wheelhouse "
                    "carries it); with network the sdist is fetched from the package index.")
    p.add_argument("--version", default=K.DEFAULT_VERSION, help="vLLM release (default %(default)s)")
    p.add_argument("--sdist", metavar="PATH", help="vllm-<version>.tar.gz (default: wheelhouse/, else fetch)")
    p.add_argument("--fetch-only", metavar="DIR", help="only download the sdist into DIR (checked by sha256)")
    p.add_argument("--out", metavar="DIR", help=f"build directory (default {K.DEFAULT_DIR} or ${K.ENV_DIR})")
    p.add_argument("--arch", default="sm_90", help="GPU architecture (default %(default)s)")
    p.add_argument("--dtypes", default=",".join(K.SCALAR_TYPES))
    p.add_argument("--block-sizes", default=",".join(map(str, K.BLOCK_SIZES)))
    p.add_argument("--jobs", type=int)
    p.add_argument("--force", action="store_true", help="rebuild even when the build is current")
    args = p.parse_args(argv)
    try:
        if args.fetch_only:
            f = fetch_sdist(args.version, Path(args.fetch_only))
            print(f"{f} (sha256 {sha256_file(f)})")
            return 0
        sdist = Path(args.sdist) if args.sdist else find_sdist(args.version, [ROOT / "wheelhouse"])
        if sdist is None:
            sdist = fetch_sdist(args.version, Path(tempfile.mkdtemp(prefix="vllm-sdist-")))
        build(sdist, Path(args.out) if args.out else None, arch=args.arch,
              dtypes=[d for d in args.dtypes.split(",") if d],
              block_sizes=[int(b) for b in args.block_sizes.split(",") if b],
              jobs=args.jobs, force=args.force)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
