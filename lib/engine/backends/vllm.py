"""vLLM's current decode kernel (the pure-Triton ``unified_attention`` of vLLM 0.33), from a normal
install or a kernel-only one (:mod:`lib.tools.vllm_install`: just the files that kernel imports
plus vLLM's ``METADATA``).

Loading checks that vLLM kept real Triton: it silently swaps in a no-op stand-in when its version
does not resolve, and its pynvml shim would pull in a library compiled for another torch. The
kernel is wrapped for plain decode with preallocated, graph-capturable scratch. Importing vLLM
has side effects (``vllm.env_override`` sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1``,
``TORCHINDUCTOR_COMPILE_THREADS=1`` and patches ``torch._inductor``): mind them when timing
``torch.compile``-based peers beside it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as importlib_metadata
import importlib.util
import os
import re
import sys
from pathlib import Path
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


def read_metadata(text: str) -> dict[str, str]:
    """The first value of each header of a METADATA file (RFC 822 style)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the body (long description) starts after the first blank line
        key, sep, value = line.partition(":")
        if sep and not key.startswith((" ", "\t")):
            fields.setdefault(key.strip(), value.strip())
    return fields


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


# --------------------------------------------------------------------------- finding it


def _kernel_dir(kernel_dir: Path | str | None) -> Path:
    if kernel_dir is not None:
        return Path(kernel_dir)
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else DEFAULT_KERNEL_DIR


def _is_kernel_only(package_file: str | None) -> bool:
    """Is this `vllm/__init__.py` part of a kernel-only install (manifest beside `vllm/`)?"""
    return bool(package_file) and (Path(package_file).resolve().parent.parent / MANIFEST_NAME).is_file()


def _check_kernel_dir(kernel_dir: Path, module: str) -> str:
    """Raise unless `kernel_dir` looks like a usable kernel-only install; return its version."""
    top = module.split(".")[0]
    if not kernel_dir.is_dir():
        raise FileNotFoundError(
            f"no kernel-only vLLM install at {kernel_dir} (make one with "
            f"`python -m lib vllm-kernel --wheel vllm-<ver>-*.whl`, or set {ENV_DIR})")
    mod_file = kernel_dir / (module.replace(".", "/") + ".py")
    if not mod_file.is_file():
        raise FileNotFoundError(f"{kernel_dir} has no {mod_file.relative_to(kernel_dir)}")
    metas = (read_metadata(m.read_text(errors="replace")) for m in sorted(kernel_dir.glob("*.dist-info/METADATA")))
    meta = next((f for f in metas if canonical_name(f.get("Name", "")) == canonical_name(top)), None)
    if meta is None or not meta.get("Version"):
        raise RuntimeError(
            f"{kernel_dir} has no {top}-<ver>.dist-info/METADATA: vLLM would silently replace "
            "Triton by a no-op stand-in. Reinstall it from the wheel.")
    if (kernel_dir / top / PYNVML_SHIM).exists():
        raise RuntimeError(
            f"{kernel_dir / top / PYNVML_SHIM} is present: vLLM would pick its CUDA platform "
            "and import its compiled library (built for another torch). Delete that file.")
    return meta["Version"]


def load_unified_attention(kernel_dir: Path | str | None = None, *, module: str = KERNEL_MODULE,
                           attr: str = KERNEL_ATTR) -> Callable[..., Any]:
    """Return vLLM's `unified_attention`, importing it on first use.

    A normal vLLM install wins when importable and no `kernel_dir` is given; otherwise a
    kernel-only install: `kernel_dir`, else ``$UVM_STUDY_VLLM_DIR``, else ``<repo>/.vllm-kernel``.
    Raises when vLLM's version does not resolve or it disabled Triton (the kernel would be a no-op).
    """
    top = module.split(".")[0]
    if kernel_dir is not None:
        _check_kernel_dir(Path(kernel_dir), module)
    loaded = sys.modules.get(top)
    if loaded is None:
        spec = importlib.util.find_spec(top) if kernel_dir is None else None
        if spec is None or _is_kernel_only(spec.origin):
            # a kernel-only install already on sys.path, else the one named or configured
            path = Path(spec.origin).resolve().parent.parent if spec else _kernel_dir(kernel_dir).resolve()
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
                f"(pip install {name}; bring its wheel to offline nodes)") from exc
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
            "no-op stand-in without it. Its dist-info METADATA must be importable.") from None
    if _is_kernel_only(getattr(package, "__file__", None)):
        shim = Path(package.__file__).resolve().parent / PYNVML_SHIM
        if shim.exists():
            raise RuntimeError(f"{shim} is present in a kernel-only install; delete it")
    triton_utils = sys.modules.get(top + ".triton_utils")
    if triton_utils is not None and not getattr(triton_utils, "HAS_TRITON", True):
        raise RuntimeError(
            "vLLM disabled Triton (no triton, no active Triton driver such as a visible "
            "GPU, or no vLLM METADATA): unified_attention would do nothing.")


def vllm_status(kernel_dir: Path | str | None = None, *, deep: bool = False) -> dict[str, Any]:
    """Is vLLM's decode kernel usable here, and from where (``source``: "installed", "kernel-only")?
    Never raises. ``deep=True`` really loads the kernel (imports torch and vLLM)."""
    status: dict[str, Any] = {"available": False, "version": None, "source": None, "path": None, "reason": None}
    try:
        loaded = sys.modules.get("vllm")
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
    """Buffers for one decode shape, allocated once (CUDA-graph capture must not allocate); the
    float32 ``segm_*`` hold split-K ("3D") partials, None on the one-pass ("2D") path."""

    cu_seqlens_q: Any
    num_segments: int
    seq_threshold_3d: int
    segm_output: Any = None
    segm_max: Any = None
    segm_expsum: Any = None

    @property
    def split_k(self) -> bool:
        return self.segm_output is not None


def make_decode_scratch(q, num_kv_heads: int, *, num_segments: int = NUM_PAR_SOFTMAX_SEGMENTS,
                        seq_threshold_3d: int | None = None) -> DecodeScratch:
    """Allocate what a decode of `q` needs, as vLLM's backend does: split-K into `num_segments`
    when num_seqs <= `seq_threshold_3d` (default 128 // num_kv_heads, its rule without CUDA-graph
    size rounding; 0 forces the one-pass kernel)."""
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
    scratch = DecodeScratch(torch.arange(num_seqs + 1, dtype=torch.int32, device=q.device),
                            num_segments, seq_threshold_3d)
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
    split = scratch.split_k
    return dict(q=q, k=k_pool, v=v_pool, out=out, cu_seqlens_q=scratch.cu_seqlens_q, max_seqlen_q=1,
                seqused_k=seq_lens, max_seqlen_k=max_seq_len, softmax_scale=float(scale), causal=True,
                window_size=(-1, -1), block_table=block_table, softcap=0, q_descale=None,
                k_descale=None, v_descale=None, seq_threshold_3D=scratch.seq_threshold_3d if split else None,
                num_par_softmax_segments=scratch.num_segments if split else None,
                softmax_segm_output=scratch.segm_output, softmax_segm_max=scratch.segm_max,
                softmax_segm_expsum=scratch.segm_expsum)


def unified_attention_decode(q, k_pool, v_pool, out, block_table, seq_lens, *, scale: float,
                             max_seq_len: int, scratch: DecodeScratch | None = None,
                             fn: Callable[..., Any] | None = None):
    """One decode step (one query token per sequence) through vLLM's kernel; returns `out`.
    Without `scratch` one is allocated per call: eager use only."""
    _check_decode_args(q, k_pool, v_pool, out, block_table, seq_lens, scale, max_seq_len)
    scratch = scratch or make_decode_scratch(q, k_pool.shape[2])
    (fn or load_unified_attention())(
        **_decode_kwargs(q, k_pool, v_pool, out, block_table, seq_lens, scale, max_seq_len, scratch))
    return out


class DecodeLauncher:
    """A zero-argument launch of one decode shape, safe to capture in a CUDA graph: everything
    is built once. Call it once before capture so Triton compiles outside the graph."""

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any], scratch: DecodeScratch):
        self.fn, self.kwargs, self.scratch = fn, kwargs, scratch

    def __call__(self) -> None:
        self.fn(**self.kwargs)


def prepare_decode(q, k_pool, v_pool, out, block_table, seq_lens, *, scale: float, max_seq_len: int,
                   num_segments: int = NUM_PAR_SOFTMAX_SEGMENTS, seq_threshold_3d: int | None = None,
                   fn: Callable[..., Any] | None = None) -> DecodeLauncher:
    """Validate once, preallocate everything and return a zero-arg launcher."""
    _check_decode_args(q, k_pool, v_pool, out, block_table, seq_lens, scale, max_seq_len)
    scratch = make_decode_scratch(q, k_pool.shape[2], num_segments=num_segments, seq_threshold_3d=seq_threshold_3d)
    kwargs = _decode_kwargs(q, k_pool, v_pool, out, block_table, seq_lens, scale, max_seq_len, scratch)
    return DecodeLauncher(fn or load_unified_attention(), kwargs, scratch)
