"""FlashInfer's paged decode (``BatchDecodeWithPagedKVCacheWrapper``) on the vLLM-layout pool: the
``flashinfer`` backend, from a normal install or a kernel-only one (:mod:`lib.tools.flashinfer_install`:
the files its decode path imports and JIT-compiles, plus apache-tvm-ffi).

FlashInfer keeps a page table in CSR form: ``indptr[s]..indptr[s+1]`` index a flat ``indices``
list of pages and ``last_page_len[s]`` (1..page size) says how much of a sequence's last page it
uses. :func:`plan_pages` builds the three from the case's block tables on the host (pure NumPy,
tested on CPU). The pool is NHD ``[num_blocks, block_size, num_kv_heads, head_size]``; K and V are
separate arrays, which ``run()`` takes as a ``(k, v)`` tuple without a copy.

Everything is made once in :func:`prepare_decode`: the wrapper in CUDA-graph mode
(``use_cuda_graph=True``) with preallocated indptr/indices/last-page buffers, a zeroed float
workspace, one ``plan()`` (which JIT-compiles the kernel with the node's nvcc on first use; the
compiled module is cached under ``$FLASHINFER_WORKSPACE_BASE/.cache/flashinfer``) and one warm-up
call into scratch (FlashInfer creates a small cached buffer on the first ``run``). The launcher
then only calls ``run(q, (k, v), out=out)``: no allocation, no host sync, capturable.

Tensor cores: FlashInfer's docs say ``use_tensor_cores`` is faster "for large group size"; the
rule serving engines apply (SGLang: a group of at least 4 query heads per KV head fills the MMA
rows) matches what was measured here (``shared/NOTES.md``): on for groups >= 4. FlashInfer's
kernels take fp16 and bf16 (and fp8), not fp32.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lib import ROOT
from lib.engine import kvcache
from lib.engine.validation import _host

#: Where a kernel-only install is looked for when given no directory and no env var.
DEFAULT_KERNEL_DIR = ROOT / ".flashinfer-kernel"
ENV_DIR = "UVM_STUDY_FLASHINFER_DIR"
#: Written into every kernel-only install; also how one is recognised.
MANIFEST_NAME = "flashinfer-kernel-manifest.json"
#: FlashInfer's own variable for its JIT cache root (``flashinfer/jit/env.py``): compiled modules
#: go to ``$FLASHINFER_WORKSPACE_BASE/.cache/flashinfer/<version>/<arch>/cached_ops``.
CACHE_ENV = "FLASHINFER_WORKSPACE_BASE"
#: Our default for it: inside the repository (ignored by git), so a warm node keeps it between runs.
DEFAULT_CACHE_BASE = ROOT / ".flashinfer-cache"
#: tvm-ffi's cache of its optional torch DLPack addon (built on first use with older torch).
TVM_FFI_CACHE_ENV = "TVM_FFI_CACHE_DIR"
#: The recipe measured on the H200 set it; it only matters where a flashinfer-cubin or
#: flashinfer-jit-cache package of another version is installed (see `flashinfer_status`).
VERSION_CHECK_ENV = "FLASHINFER_DISABLE_VERSION_CHECK"
#: Packages of prebuilt FlashInfer kernels: with the version check off they would be used
#: whatever their version, so a kernel-only install refuses to run beside them.
PREBUILT_PACKAGES = ("flashinfer_jit_cache", "flashinfer_cubin")
#: FlashInfer's recommended float workspace (its docstring: 128 MB), zeroed before first use.
WORKSPACE_BYTES = 128 * 1024 * 1024
#: Query heads per KV head from which the tensor-core (prefill-kernel) decode is used.
TENSOR_CORE_MIN_GROUP = 4
SUPPORTED_DTYPES = ("float16", "bfloat16")
#: The API this adapter calls (plan's q/kv/o dtypes, graph-mode buffers, ``backend=``) as of 0.7;
#: measured with 0.7.2.post1. An older FlashInfer is listed as unavailable rather than failing later.
MIN_VERSION = (0, 7)
#: Which FlashInfer implementation the wrapper runs: "fa2" is what its "auto" resolves to for
#: fp16/bf16 on Hopper; naming it keeps auto's cuDNN route (SM100) out, so every GPU runs the same.
DEFAULT_IMPL = "fa2"


# --------------------------------------------------------------------------- the plan (NumPy)


@dataclasses.dataclass(frozen=True)
class PagePlan:
    """The page table in FlashInfer's CSR terms (host int32 arrays)."""

    block_size: int
    indptr: np.ndarray          # [num_seqs + 1], indptr[0] = 0
    indices: np.ndarray         # [indptr[-1]]: physical pages, sequence after sequence
    last_page_len: np.ndarray   # [num_seqs], 1..block_size

    @property
    def num_seqs(self) -> int:
        return int(self.last_page_len.shape[0])

    def seq_lens(self) -> np.ndarray:
        """The lengths the plan encodes (for checks): full pages plus the last one."""
        pages = np.diff(self.indptr)
        return (pages - 1) * self.block_size + self.last_page_len


def plan_pages(block_tables, seq_lens, *, block_size: int, num_blocks: int | None = None) -> PagePlan:
    """CSR page table from block tables (int ``[S, W]``, only the first ceil(len / block_size)
    entries of a row are read) and lengths; ValueError on anything FlashInfer would misread."""
    tables = _host(block_tables)
    lens = _host(seq_lens)
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    bs = int(block_size)
    lens, pages, _, indices = kvcache.used_pages(tables, lens, bs, num_blocks)
    indptr = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(pages, out=indptr[1:])
    if indptr[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{int(indptr[-1])} pages overflow FlashInfer's int32 indices")
    last = lens - (pages - 1) * bs
    return PagePlan(bs, indptr.astype(np.int32), indices.astype(np.int32), last.astype(np.int32))


def use_tensor_cores(num_heads: int, num_kv_heads: int) -> bool:
    """FlashInfer's tensor-core decode for groups of >= TENSOR_CORE_MIN_GROUP query heads per KV head."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    return num_heads // num_kv_heads >= TENSOR_CORE_MIN_GROUP


def check_dtype(dtype) -> str:
    """The dtype name if FlashInfer's decode takes it; ValueError otherwise (fp32 is not)."""
    name = str(dtype).replace("torch.", "")
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {name} is not supported by FlashInfer's decode kernels "
                         f"(allowed: {', '.join(SUPPORTED_DTYPES)})")
    return name


# --------------------------------------------------------------------------- finding it


def _kernel_dir(kernel_dir: Path | str | None) -> Path:
    if kernel_dir is not None:
        return Path(kernel_dir)
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else DEFAULT_KERNEL_DIR


def read_manifest(kernel_dir: Path | str) -> dict[str, Any]:
    """The manifest of a kernel-only install; FileNotFoundError/RuntimeError with the way out."""
    kernel_dir = Path(kernel_dir)
    path = kernel_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no kernel-only FlashInfer install at {kernel_dir} (make one with `python -m lib "
            f"flashinfer-kernel --wheel flashinfer_python-<ver>-*.whl --tvm-ffi-wheel "
            f"apache_tvm_ffi-<ver>-*.whl`, or set {ENV_DIR})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path} is unreadable ({exc}): reinstall") from None
    if not (kernel_dir / "flashinfer" / "__init__.py").is_file():
        raise RuntimeError(f"{kernel_dir} has a manifest but no flashinfer/__init__.py: reinstall")
    return manifest


def _check_python_tag(manifest: dict[str, Any]) -> None:
    """tvm-ffi is compiled for one CPython: say so instead of a bare ImportError."""
    tag = manifest.get("python_tag")
    here = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    if tag and tag != here:
        raise RuntimeError(f"this kernel-only FlashInfer install carries tvm-ffi built for {tag}, "
                           f"but this python is {here}: rebuild it with a tvm-ffi wheel for {here}")


def _is_kernel_only(package_file: str | None) -> bool:
    return bool(package_file) and (Path(package_file).resolve().parent.parent / MANIFEST_NAME).is_file()


def configure_environment(environ=None) -> dict[str, str]:
    """Set FlashInfer's variables where unset, before it is imported (it reads them at import):
    the JIT cache under :data:`DEFAULT_CACHE_BASE`, tvm-ffi's cache beside it, the version check
    off. Returns what it set."""
    environ = os.environ if environ is None else environ
    base = Path(environ.get(CACHE_ENV) or DEFAULT_CACHE_BASE)
    wanted = {CACHE_ENV: str(base), TVM_FFI_CACHE_ENV: str(base / "tvm-ffi"), VERSION_CHECK_ENV: "1"}
    done = {}
    for key, value in wanted.items():
        if not environ.get(key):
            environ[key] = value
            done[key] = value
    return done


def find_nvcc(environ=None) -> str | None:
    """The nvcc FlashInfer's JIT would run (CUDA_HOME/CUDA_PATH first, then PATH), or None."""
    environ = os.environ if environ is None else environ
    home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if home:
        nvcc = Path(home) / "bin" / "nvcc"
        return str(nvcc) if nvcc.is_file() else None
    return shutil.which("nvcc", path=environ.get("PATH"))


def _toolchain_reason() -> str | None:
    """Why FlashInfer's JIT cannot compile here (it needs nvcc and ninja on this node), or None."""
    if find_nvcc() is None:
        return ("nvcc not found: FlashInfer JIT-compiles its kernels with the node's CUDA toolkit "
                "(put its bin/ on PATH or set CUDA_HOME)")
    if shutil.which("ninja") is None:
        return "ninja not found on PATH: FlashInfer's JIT builds with it (pip install ninja; the wheelhouse brings it)"
    return None


def _prebuilt_reason() -> str | None:
    for name in PREBUILT_PACKAGES:
        if importlib.util.find_spec(name) is not None:
            return (f"{name} is installed here: with {VERSION_CHECK_ENV}=1 a kernel-only FlashInfer "
                    "would load its prebuilt kernels whatever their version; uninstall it or use a "
                    "full FlashInfer install")
    return None


def load_flashinfer(kernel_dir: Path | str | None = None):
    """Return the ``flashinfer`` package, importing it on first use.

    A normal FlashInfer install wins when importable and no `kernel_dir` is given; otherwise a
    kernel-only install: `kernel_dir`, else ``$UVM_STUDY_FLASHINFER_DIR``, else
    ``<repo>/.flashinfer-kernel``. FlashInfer's variables are set first (:func:`configure_environment`).
    """
    loaded = sys.modules.get("flashinfer")
    if loaded is not None:
        if kernel_dir is not None:
            have = Path(getattr(loaded, "__file__", "") or "").resolve().parent.parent
            if have != Path(kernel_dir).resolve():
                raise RuntimeError(f"flashinfer is already imported from {have}, not {kernel_dir}")
        return loaded
    spec = importlib.util.find_spec("flashinfer") if kernel_dir is None else None
    if spec is None or _is_kernel_only(spec.origin):
        path = Path(spec.origin).resolve().parent.parent if spec else _kernel_dir(kernel_dir).resolve()
        _check_python_tag(read_manifest(path))
        reason = _prebuilt_reason()
        if reason:
            raise RuntimeError(reason)
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        importlib.invalidate_caches()
    configure_environment()
    try:
        return importlib.import_module("flashinfer")
    except ModuleNotFoundError as exc:
        name = (exc.name or "").split(".")[0]
        if name and name != "flashinfer":
            raise RuntimeError(f"importing flashinfer needs the package {name!r}, which this python "
                               f"lacks (pip install {name}; bring its wheel to offline nodes)") from exc
        raise


def _check_version(version: str | None) -> None:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    if not m:
        raise RuntimeError(f"FlashInfer's version {version!r} does not parse")
    if (int(m.group(1)), int(m.group(2))) < MIN_VERSION:
        raise RuntimeError(f"FlashInfer {version} is older than the {'.'.join(map(str, MIN_VERSION))} API "
                           "this backend calls")


def flashinfer_status(kernel_dir: Path | str | None = None, *, deep: bool = False) -> dict[str, Any]:
    """Is FlashInfer usable here, and from where (``source``: "installed", "kernel-only")? Never
    raises. ``deep=True`` really imports it (torch, tvm-ffi and FlashInfer's Python files)."""
    status: dict[str, Any] = {"available": False, "version": None, "tvm_ffi_version": None,
                              "source": None, "path": None, "reason": None}
    try:
        loaded = sys.modules.get("flashinfer")
        if loaded is not None:
            origin = getattr(loaded, "__file__", None)
        else:
            spec = importlib.util.find_spec("flashinfer") if kernel_dir is None else None
            origin = spec.origin if spec is not None else None
        if origin and not _is_kernel_only(origin):
            import importlib.metadata as md

            status.update(source="installed", path=str(Path(origin).parent),
                          version=md.version("flashinfer-python"))
        else:
            path = Path(origin).resolve().parent.parent if origin else _kernel_dir(kernel_dir)
            status.update(source="kernel-only", path=str(path))
            manifest = read_manifest(path)
            status.update(version=manifest.get("flashinfer_version"),
                          tvm_ffi_version=manifest.get("tvm_ffi_version"))
            _check_python_tag(manifest)
            reason = _prebuilt_reason()
            if reason:
                raise RuntimeError(reason)
        _check_version(status["version"])
        if importlib.util.find_spec("torch") is None:
            raise RuntimeError("torch is not installed in this python")
        reason = _toolchain_reason()
        if reason:
            raise RuntimeError(reason)
        if deep:
            load_flashinfer(kernel_dir)
        status["available"] = True
    except Exception as exc:  # the registry lists the reason, never fails on it
        status["reason"] = f"{type(exc).__name__}: {exc}"
    return status


def unavailable_reason() -> str | None:
    """None when the flashinfer backend can run here, else why not (never raises)."""
    from lib.engine.gpu import gpu_available

    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    status = flashinfer_status()
    if not status["available"]:
        return status["reason"]
    if not gpu_available():
        return "no CUDA GPU / CuPy here"
    return None


# --------------------------------------------------------------------------- the decode


def _check_args(q, k_pool, v_pool, out) -> tuple[int, int, int, int, int]:
    if q.dim() != 3 or tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"q {tuple(q.shape)} and out {tuple(out.shape)} must both be "
                         "[num_seqs, num_heads, head_size]")
    if k_pool.dim() != 4 or tuple(v_pool.shape) != tuple(k_pool.shape):
        raise ValueError(f"k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} must both be "
                         "[num_blocks, block_size, num_kv_heads, head_size] (NHD)")
    num_seqs, num_heads, head_size = (int(n) for n in q.shape)
    num_blocks, block_size, num_kv_heads, kd = (int(n) for n in k_pool.shape)
    if kd != head_size:
        raise ValueError(f"head size of q ({head_size}) != head size of the cache ({kd})")
    if len({t.dtype for t in (q, k_pool, v_pool, out)}) != 1:
        raise ValueError("q, k_pool, v_pool and out must share one dtype")
    check_dtype(q.dtype)
    if len({t.device for t in (q, k_pool, v_pool, out)}) != 1:
        raise ValueError("q, k_pool, v_pool and out must be on one device")
    for name, t in (("q", q), ("out", out), ("k_pool", k_pool), ("v_pool", v_pool)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    use_tensor_cores(num_heads, num_kv_heads)  # raises on a bad head ratio
    return num_seqs, num_heads, num_kv_heads, head_size, block_size


class FlashInferDecode:
    """A prepared decode: calling it runs one step on torch's current stream, writing `out`."""

    def __init__(self, wrapper, q, kv, out, plan: PagePlan, tensor_cores: bool, buffers: dict):
        self.wrapper, self.plan, self.tensor_cores = wrapper, plan, tensor_cores
        self._q, self._kv, self._out = q, kv, out
        self.buffers = buffers  # kept alive with the wrapper (graph mode reads them in place)

    def __call__(self) -> None:
        self.wrapper.run(self._q, self._kv, out=self._out)


def prepare_decode(q, k_pool, v_pool, out, block_tables, seq_lens, *, scale: float,
                   tensor_cores: bool | None = None, impl: str = DEFAULT_IMPL,
                   workspace_bytes: int = WORKSPACE_BYTES, flashinfer=None) -> FlashInferDecode:
    """Validate, plan once (JIT-compiling on first use) and warm up; return the zero-arg launcher.

    q, out: ``[num_seqs, num_heads, head_size]`` torch tensors; k_pool, v_pool: the NHD pool.
    block_tables and seq_lens are read once on the host. `tensor_cores` None: the group rule
    (:func:`use_tensor_cores`). `out` is not written here.
    """
    import torch

    num_seqs, num_heads, num_kv_heads, head_size, block_size = _check_args(q, k_pool, v_pool, out)
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    plan = plan_pages(block_tables, seq_lens, block_size=block_size, num_blocks=int(k_pool.shape[0]))
    if plan.num_seqs != num_seqs:
        raise ValueError(f"block_tables has {plan.num_seqs} rows for {num_seqs} sequences")
    tc = use_tensor_cores(num_heads, num_kv_heads) if tensor_cores is None else bool(tensor_cores)
    fi = flashinfer or load_flashinfer()
    dev = q.device

    def on_device(a):
        return torch.as_tensor(a, dtype=torch.int32).to(dev)

    buffers = {"indptr": on_device(plan.indptr), "indices": on_device(plan.indices),
               "last_page_len": on_device(plan.last_page_len),
               "workspace": torch.zeros(int(workspace_bytes), dtype=torch.uint8, device=dev)}
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
        buffers["workspace"], "NHD", use_cuda_graph=True, use_tensor_cores=tc,
        paged_kv_indptr_buffer=buffers["indptr"], paged_kv_indices_buffer=buffers["indices"],
        paged_kv_last_page_len_buffer=buffers["last_page_len"], backend=impl)
    wrapper.plan(torch.as_tensor(plan.indptr), torch.as_tensor(plan.indices),
                 torch.as_tensor(plan.last_page_len), num_heads, num_kv_heads, head_size, block_size,
                 q_data_type=q.dtype, kv_data_type=k_pool.dtype, o_data_type=out.dtype,
                 sm_scale=float(scale), non_blocking=False)
    kv = (k_pool, v_pool)
    wrapper.run(q, kv, out=torch.empty_like(out))  # warm-up: its lazily made buffers, not in a capture
    if q.is_cuda:
        torch.cuda.synchronize(dev)
    return FlashInferDecode(wrapper, q, kv, out, plan, tc, buffers)
