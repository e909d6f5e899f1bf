"""What every kernel instantiation costs the GPU: registers, stack, spills, shared memory.

The instantiations CuPy compiles with NVRTC at run time are compiled here ahead of time with nvcc
(no GPU) per target architecture, and ptxas's `-v` report becomes one row per (arch, kernel): CI's
proof that every launchable instantiation compiles, and the kernel chapter's spill table. Each
translation unit takes the address of every kernel of one (dtype, head size) group by CuPy's own
name expressions, so the set compiled here is the set launched there. Full optimisation takes
~11 min of two cores for all 2 x 1476 kernels; `fast=True` proves they compile in ~2 min (CI).

nvcc is not the run-time compiler: `nvrtc_compile` drives NVRTC through ctypes (no GPU, no CuPy),
which catches what only NVRTC rejects (it has no <cmath>, so no INFINITY).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from lib.engine import kernels
from lib.engine.kernels.nvcc import (compile_cubin, nvcc_path, nvcc_version,  # noqa: F401
                                     parse_mangled, parse_ptxas)

ARCHS = ("sm_80", "sm_90")
#: the v2 partition the resource table assumes for dynamic shared memory (the launcher's default)
PARTITION_TOKENS = kernels.DEFAULT_PARTITION
#: sequence length assumed for the reduce kernel's dynamic shared memory (one weight per partition)
REDUCE_SEQ_TOKENS = 4096

COLUMNS = [
    "arch", "kernel", "dtype", "block_size", "head_size", "tile", "addressing", "registers",
    "barriers", "stack_bytes", "spill_stores", "spill_loads", "static_smem_bytes",
    "dynamic_smem_bytes",
]
#: what identifies one kernel within an arch
KEY = ("kernel", "dtype", "block_size", "head_size", "tile", "addressing")


class KernelCompileError(RuntimeError):
    """nvcc failed on one group: the message names the group, its kernels and the compiler output."""


def groups(modules: Iterable[tuple[str, int, int, int]] | None = None
           ) -> dict[tuple[str, int], list[str]]:
    """Name expressions per (dtype, head size): the decode kernels of `modules` (default: every
    module the registry can launch), then that group's reduce kernel once."""
    out: dict[tuple[str, int], list[str]] = {}
    for dtype, block_size, head_size, tile in _modules(modules):
        out.setdefault((dtype, head_size), []).extend(
            kernels.instantiations(dtype, block_size, head_size, tile))  # CuPy's exact names
    for names in out.values():  # each module repeats the reduce kernel: keep one, last
        reduce = [n for n in dict.fromkeys(names) if "_reduce<" in n]
        names[:] = [n for n in dict.fromkeys(names) if "_reduce<" not in n] + reduce
    return out


def expected(modules: Iterable[tuple[str, int, int, int]] | None = None) -> set[tuple]:
    """Every `KEY` that compiling `modules` (default: all launchable) must produce per arch."""
    keys = set()
    for dtype, block_size, head_size, tile in _modules(modules):
        kind = "mma" if tile in kernels.MMA_TILES else "decode"
        for addressing in kernels.ADDRESSING:
            keys.add((kind, dtype, block_size, head_size, tile, addressing))
        keys.add(("reduce", dtype, None, head_size, None, None))
    return keys


def _modules(modules):
    if modules is None:
        return list(kernels.all_modules())
    modules = list(modules)
    launchable = set(kernels.all_modules())
    unknown = [m for m in modules if tuple(m) not in launchable]
    if unknown:
        raise ValueError(f"not launchable modules (dtype, block, head, tile): {unknown[:5]}")
    return modules


def translation_unit(names: list[str], source: Path | str | None = None) -> str:
    """A .cu file that includes the kernel source (default: `lib.engine.kernels.SOURCE`) and
    instantiates `names` by taking their addresses (which makes nvcc compile each one)."""
    source = Path(source or kernels.SOURCE).resolve()
    lines = [f'#include "{source}"', "", "void* upa_instantiations[] = {"]
    lines += [f"    (void*)&{n}," for n in names]
    lines += ["};", ""]
    return "\n".join(lines)


def dynamic_smem(kernel: str, tile: int | None, head_size: int) -> int:
    """Dynamic shared memory the launcher requests in a typical v2 launch (see module constants)."""
    if kernel == "decode":
        return kernels.smem_bytes(tile, head_size, PARTITION_TOKENS)
    if kernel == "mma":
        return kernels.mma_smem_bytes(head_size, tile)
    parts = -(-REDUCE_SEQ_TOKENS // PARTITION_TOKENS)
    return 4 * (parts + kernels.NUM_WARPS)  # as OwnDecode sizes the reduce launch


def source_sha256() -> str:
    """Hash of the kernel source: the resource table is only valid for the source it came from."""
    return hashlib.sha256(kernels.SOURCE.read_bytes()).hexdigest()


def nvcc_flags() -> tuple[str, ...]:
    """The runtime's NVRTC options (C++17, CUDA include path, UVM_STUDY_KERNEL_DEFINES), for nvcc."""
    return kernels.compile_options()


def compile_modules(modules: Iterable[tuple[str, int, int, int]], archs=ARCHS,
                    jobs: int | None = None, *, fast: bool = False, nvcc: str | None = None):
    """Compile the kernels of `modules` ((dtype, block, head, tile) tuples) for every arch.

    One translation unit per (dtype, head size) and arch, `jobs` nvcc processes at a time
    (default: all cores). `fast=True` adds `--Ofast-compile=max`: about 6x quicker, proves every
    kernel compiles, but its registers and spills are NOT what the runtime compiler gives.
    Returns one DataFrame row per (arch, kernel), `attrs["source_sha256"]` naming the source
    compiled; raises KernelCompileError when nvcc fails and RuntimeError when ptxas reports other
    kernels than were asked for.
    """
    import pandas as pd

    archs = tuple(archs)
    if not archs or any(not isinstance(a, str) or not re.fullmatch(r"sm_\d+a?", a) for a in archs):
        raise ValueError(f"archs={archs!r}: give names like 'sm_80', 'sm_90'")
    jobs = (os.cpu_count() or 1) if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: need at least 1")
    modules = list(modules)
    work = groups(modules)
    if not work:
        raise ValueError("no modules to compile")
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if not Path(nvcc).is_file() and shutil.which(nvcc) is None:
        raise FileNotFoundError(f"nvcc not found at {nvcc}")
    flags = ("--Ofast-compile=max",) if fast else ()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="upa-kernels-") as tmp:
        # One snapshot of the source for every process: an edit mid-run cannot mix versions.
        code = kernels.SOURCE.read_bytes()
        snapshot = Path(tmp, kernels.SOURCE.name)
        snapshot.write_bytes(code)
        srcs = {}
        for (dtype, head_size), names in work.items():
            srcs[(dtype, head_size)] = src = Path(tmp, f"upa_{dtype}_d{head_size}.cu")
            src.write_text(translation_unit(names, snapshot))
        # Biggest groups (most kernels, widest dtype, largest head) first: a short pool tail.
        tasks = sorted(((key, arch) for arch in archs for key in srcs),
                       key=lambda t: (-len(work[t[0]]), -kernels.ITEMSIZE[t[0][0]], -t[0][1]))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda t: compile_cubin(nvcc, srcs[t[0]], t[1], flags=flags), tasks))
        for (key, arch), (rc, out) in zip(tasks, results):
            if rc != 0:
                names = "\n  ".join(work[key])
                raise KernelCompileError(
                    f"nvcc failed (exit {rc}) for {arch}, group dtype={key[0]} head_size={key[1]}, "
                    f"kernels:\n  {names}\n--- compiler output ---\n{out}")
            for r in parse_ptxas(out):
                if r["arch"] != arch:
                    raise RuntimeError(f"asked for {arch}, ptxas compiled {r['arch']}")
                r["dynamic_smem_bytes"] = dynamic_smem(r["kernel"], r["tile"], r["head_size"])
                rows.append(r)
    _check_complete(rows, archs, expected(modules))
    df = pd.DataFrame(rows)[COLUMNS]
    for col in ("block_size", "tile"):
        df[col] = df[col].astype("Int64")
    df = df.sort_values(["arch", "kernel", "dtype", "head_size", "block_size", "tile",
                         "addressing"], na_position="first").reset_index(drop=True)
    df.attrs["source_sha256"] = hashlib.sha256(code).hexdigest()
    return df


def compile_all(archs=ARCHS, jobs: int | None = None, *, fast: bool = False,
                nvcc: str | None = None):
    """`compile_modules` over every module the registry can launch (`lib.engine.kernels.all_modules`)."""
    return compile_modules(kernels.all_modules(), archs, jobs, fast=fast, nvcc=nvcc)


def key_of(row) -> tuple:
    """`KEY` of a row (a dict, or a Series from a DataFrame or a CSV): missing -> None, ints."""
    import pandas as pd

    def clean(v):
        if v is None or pd.isna(v):
            return None
        return int(v) if isinstance(v, (int, float)) or hasattr(v, "__index__") else v
    return tuple(clean(row[c]) for c in KEY)


def _check_complete(rows: list[dict], archs: tuple[str, ...], want: set[tuple]) -> None:
    for arch in archs:
        keys = [key_of(r) for r in rows if r["arch"] == arch]
        got = set(keys)
        if len(keys) != len(got):
            raise RuntimeError(f"{arch}: {len(keys) - len(got)} kernels reported twice")
        if got != want:
            missing, extra = sorted(want - got, key=str), sorted(got - want, key=str)
            raise RuntimeError(f"{arch}: ptxas compiled a different kernel set; "
                               f"missing {missing[:10]} ({len(missing)}), extra {extra[:10]} "
                               f"({len(extra)})")


# ---- NVRTC: the compiler CuPy uses at run time, driven through ctypes (no GPU, no CuPy) ----

class NvrtcError(RuntimeError):
    """NVRTC rejected the source: the message holds its log."""


def nvrtc_library():
    """ctypes handle to libnvrtc (the `nvidia-cuda-nvrtc` wheel, else the system's), or None."""
    import ctypes
    import glob
    import importlib.util

    candidates = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(glob.glob(os.path.join(root, "cu*", "lib", "libnvrtc.so*")))
        candidates += sorted(glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so*")))
    cuda = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates += sorted(glob.glob(os.path.join(cuda, "lib64", "libnvrtc.so*")))
    candidates += ["libnvrtc.so.13", "libnvrtc.so"]
    for path in candidates:
        if "alt" in os.path.basename(path):
            continue
        # libnvrtc dlopens libnvrtc-builtins by name at compile time: load the one beside it
        # first (global symbols), so a wheel's copy is found without LD_LIBRARY_PATH.
        for builtins in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
            if "alt" not in os.path.basename(builtins):
                try:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def nvrtc_version(lib=None) -> tuple[int, int] | None:
    """(major, minor) of libnvrtc, or None without it."""
    import ctypes

    lib = lib or nvrtc_library()
    if lib is None:
        return None
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def nvrtc_compile(names: list[str], arch: str = "sm_90", options: tuple[str, ...] | None = None,
                  lib=None) -> tuple[dict[str, str], str]:
    """Compile the kernel source with NVRTC as CuPy does, for the name expressions `names`.

    Returns ({name expression: lowered (mangled) name}, compile log). `arch` 'sm_XX' makes NVRTC
    run ptxas too (CuPy's path on current GPUs); 'compute_XX' stops at PTX. Raises NvrtcError
    with NVRTC's log when the source does not compile, RuntimeError when libnvrtc is missing.
    """
    import ctypes

    if not re.fullmatch(r"(sm|compute)_\d+a?", arch):
        raise ValueError(f"arch={arch!r}: give 'sm_90' or 'compute_90'")
    if not names:
        raise ValueError("no name expressions given")
    lib = lib or nvrtc_library()
    if lib is None:
        raise RuntimeError("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    options = kernels.compile_options() if options is None else options
    opts = [f"-arch={arch}", *options]

    def check(rc: int, what: str, log: str = "") -> None:
        if rc != 0:
            msg = lib.nvrtcGetErrorString(rc).decode()
            raise NvrtcError(f"{what}: {msg}\n{log}")

    prog = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), kernels.SOURCE.read_bytes(),
                                 b"paged_attention.cu", 0, None, None), "nvrtcCreateProgram")
    try:
        for n in names:
            check(lib.nvrtcAddNameExpression(prog, n.encode()), f"nvrtcAddNameExpression({n})")
        c_opts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        rc = lib.nvrtcCompileProgram(prog, len(opts), c_opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        check(rc, f"nvrtcCompileProgram({' '.join(opts)})", log)
        lowered = {}
        for n in names:
            ptr = ctypes.c_char_p()
            check(lib.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(ptr)),
                  f"nvrtcGetLoweredName({n})")
            lowered[n] = ptr.value.decode()
        return lowered, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
