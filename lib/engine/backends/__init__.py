"""One registry of everything that can be timed, behind one call signature.

A *problem* (`DecodeProblem`) says what to compute; a *case* (`DecodeCase`) holds its data on the
GPU in the pool layout and derives the other layouts on demand; a *backend* turns a case and an
output buffer into a zero-argument launcher on CuPy's current stream (graph-capture safe: all
scratch is allocated before, never inside, it):

    out = case.poisoned_output()
    launch = get_backend("own-v2-paged").prepare(case, out)

Backends: `own-{auto,v1,v2,v3}-{paged,contiguous,no_offset}` (ours), `vllm` (vLLM's Triton
`unified_attention`), `vllm-fa3` (vLLM's FlashAttention 3), `vllm2024-{v1,v2}` (vLLM's 2024 CUDA kernels, the seed's),
`sdpa_dense` (PyTorch SDPA on contiguous K/V: no page table), and optional
peers listed as unavailable when their library is absent.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from lib.engine import kernels
from lib.engine import validation
from lib.engine.backends.problem import DecodeCase, DecodeProblem, _default_alloc  # noqa: F401
from lib.engine.backends.torch_pool import mem_pool_context as _torch_mem_pool_context

Launcher = Callable[[], None]


@dataclass(frozen=True)
class Backend:
    """Something that can run decode attention: `prepare(case, out)` returns a launcher."""

    name: str
    family: str        # own, vllm, sdpa, peer
    layout: str        # classic, vllm, dense
    description: str
    version: int | str = ""
    addressing: str = ""
    _prepare: Callable | None = None
    _available: Callable[[], str | None] = lambda: None

    def unavailable_reason(self) -> str | None:
        """None when usable here, else a one-line reason (never raises)."""
        try:
            return self._available()
        except Exception as exc:  # a broken optional install is "unavailable", not a crash
            return f"{type(exc).__name__}: {exc}"

    def prepare(self, case: DecodeCase, out, **options) -> Launcher:
        """A launcher for ``case`` writing ``out`` (or, where the launcher has an ``output()``
        method, the array that returns: see :func:`output_of`). The case's tables are checked
        first (:meth:`DecodeCase.verify_tables`): a table edited after the case was built is a
        clear error here, never an illegal address in the kernel."""
        reason = self.unavailable_reason()
        if reason:
            raise RuntimeError(f"backend {self.name} is unavailable: {reason}")
        case.verify_tables()
        k, v = case.layout(self.layout)
        validation.validate_cache_arrays(case.q, k, v, out, layout=self.layout,
                                         num_kv_heads=case.problem.num_kv_heads,
                                         block_size=case.problem.block_size,
                                         dtype=case.problem.dtype)
        launcher = self._prepare(self, case, k, v, out, **options)
        import cupy

        # Inputs were written on the default stream; a launcher may run on any stream.
        cupy.cuda.Device().synchronize()
        return launcher


def _needs_cupy() -> str | None:
    from lib.engine.gpu import gpu_available

    return None if gpu_available() else "no CUDA GPU / CuPy here"


def _needs_torch() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    return _needs_cupy()


def _prepare_own(backend: Backend, case: DecodeCase, k, v, out, *, partition_size=None,
                 num_sms=None) -> Launcher:
    import cupy

    p = case.problem
    if backend.addressing == "contiguous":  # it reads seq_start[s] + j: check that range too
        validation.validate_contiguous_range(case.tables.seq_start, p.seq_lens, p.block_size,
                                             case.tables.num_blocks)
    if num_sms is None:
        num_sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    plan = kernels.plan_launch(
        dtype=p.dtype, block_size=p.block_size, head_size=p.head_size, num_heads=p.num_heads,
        num_kv_heads=p.num_kv_heads, num_seqs=p.num_seqs, max_seq_len=p.max_seq_len,
        addressing=backend.addressing, version=backend.version,
        partition_size=partition_size, num_sms=num_sms)
    launcher = kernels.OwnDecode(plan, q=case.q, k_cache=k, v_cache=v,
                                 block_tables=case.device_tables, seq_first=case.device_seq_start,
                                 seq_lens=case.device_seq_lens, out=out, scale=case.scale)
    case.verify_tables()  # the device copies the launcher holds equal the validated host tables
    return launcher


def torch_view(a):
    """A torch tensor sharing a CuPy array's memory (bf16 stored as uint16 is re-viewed), through
    `__cuda_array_interface__`: torch rejects DLPack's managed-memory device type (chapters/uvm.md)."""
    import torch

    t = torch.as_tensor(a, device="cuda")
    if t.dtype == torch.uint16:
        t = t.view(torch.bfloat16)
    return t


def _on_cupy_stream(fn: Callable[[], None]) -> Launcher:
    """Run torch work on CuPy's current stream, so graph capture and events see it.

    On CuPy's legacy null stream (handle 0) torch work was not ordered with CuPy's: a 16-process
    correctness run read unwritten (NaN) outputs from a third of the torch backends' calls. So
    there the launcher waits for torch's work (eager use only: the timing harness has its own
    stream).
    """
    import cupy
    import torch

    def launch():
        ptr = cupy.cuda.get_current_stream().ptr
        if ptr:
            with torch.cuda.stream(torch.cuda.ExternalStream(ptr)):
                fn()
        else:
            fn()
            torch.cuda.current_stream().synchronize()

    return launch


def output_of(launch, out):
    """The array ``launch``'s result lands in: ``launch.output()`` where the launcher has one
    (SDPA's: its result *is* the checked buffer), else the ``out`` it was prepared with."""
    own = getattr(launch, "output", None)
    return own() if callable(own) else out


class SdpaLaunch:
    """SDPA's launcher: one ``F.scaled_dot_product_attention`` call and nothing else.

    SDPA has no out= variant (torch 2.11: neither the public op nor ``_flash_attention_forward``,
    ``_efficient_attention_forward`` or cuDNN's take one), so instead of copying its result into
    the harness's buffer (an extra copy kernel in the timed graph), its result *is* the buffer the
    harness checks: :meth:`output` returns the tensor the last call wrote, and the harness checks
    that (:func:`output_of`). Its allocations (the output, its log-sum-exp scratch) come from a
    memory pool of this launcher's own (``torch.cuda.MemPool``), made on the host when the call is
    enqueued: a CUDA graph captured from it holds no allocation node and no copy, only SDPA's
    kernels, and the blocks it writes on every replay belong to this pool alone, so no other tensor
    is ever handed memory the graph still writes. The last result is held (never freed) while the
    launcher lives. Before each call the previous result goes back to the pool, so repeated calls
    (and the capture) reuse memory instead of growing the pool. :meth:`poison_output` fills the
    held result with NaN before it is released: the checked call's output lands in poisoned or
    never-written memory, never in a previous correct answer.
    """

    def __init__(self, q, k, v, *, mask, scale: float, gqa: bool):
        import torch

        self._torch = torch
        self._use_pool = _torch_mem_pool_context(torch)
        self._pool = torch.cuda.MemPool()
        self._args = (q, k, v)
        self._kw = {"attn_mask": mask, "scale": scale, "enable_gqa": gqa}
        self._result = None

    def _run(self) -> None:
        import torch.nn.functional as F

        self._result = None  # back to this launcher's pool: this call's output reuses it
        with self._use_pool(self._pool):
            self._result = F.scaled_dot_product_attention(*self._args, **self._kw)

    def __call__(self) -> None:
        import cupy

        torch = self._torch
        ptr = cupy.cuda.get_current_stream().ptr
        if ptr:  # on CuPy's stream, so graph capture and the timing events see the work
            with torch.cuda.stream(torch.cuda.ExternalStream(ptr)):
                self._run()
        else:  # CuPy's legacy null stream is not ordered with torch's (see _on_cupy_stream)
            self._run()
            torch.cuda.current_stream().synchronize()

    def output(self):
        """``[num_seqs, num_heads, head_size]``: the last call's result (None before the first)."""
        return None if self._result is None else self._result.squeeze(2)

    def poison_output(self) -> None:
        """NaN into the held result (it is the memory the next call is most likely handed)."""
        if self._result is not None:
            self._torch.cuda.synchronize()  # whatever stream wrote it is done
            self._result.fill_(float("nan"))
            self._torch.cuda.synchronize()


def _prepare_sdpa(backend: Backend, case: DecodeCase, k, v, out) -> Launcher:
    """Dense SDPA over the case's dense K/V (:class:`SdpaLaunch`); ``out`` is only checked for
    shape and dtype: the result lands in the launcher's own output (:func:`output_of`)."""
    import torch

    p = case.problem
    q = torch_view(case.q).unsqueeze(2)           # [S, H, 1, D]
    kt, vt = torch_view(k), torch_view(v)
    mask = None
    if len(set(p.seq_lens)) > 1:                  # ragged: mask the zero padding
        lens = torch.as_tensor(p.seq_lens, device="cuda")
        mask = (torch.arange(p.max_seq_len, device="cuda")[None, :] < lens[:, None])[:, None, None, :]
    launch = SdpaLaunch(q, kt, vt, mask=mask, scale=case.scale, gqa=p.num_heads != p.num_kv_heads)
    launch()                # one call at prepare time: SDPA picks its kernel, the pool gets its blocks
    launch.poison_output()  # ... and that first result cannot pass for a later call's
    return launch


def _vllm_unavailable() -> str | None:
    reason = _needs_torch()
    if reason:
        return reason
    from lib.engine.backends.vllm import vllm_status

    status = vllm_status()
    return None if status.get("available") else status.get("reason", "vLLM not found")


def _prepare_vllm(backend: Backend, case: DecodeCase, k, v, out) -> Launcher:
    from lib.engine.backends import vllm

    p = case.problem
    launcher = vllm.prepare_decode(
        torch_view(case.q), torch_view(k), torch_view(v), torch_view(out),
        torch_view(case.device_tables), torch_view(case.device_seq_lens),
        scale=case.scale, max_seq_len=p.max_seq_len)
    return _on_cupy_stream(launcher)


def _flex_unavailable() -> str | None:
    from lib.engine.backends import flex as flex_paged

    return flex_paged.unavailable_reason()


def _prepare_flex(backend: Backend, case: DecodeCase, k, v, out) -> Launcher:
    from lib.engine.backends import flex as flex_paged

    launcher = flex_paged.prepare_decode(
        torch_view(case.q), torch_view(k), torch_view(v), torch_view(out), case.tables.tables,
        case.problem.seq_lens, scale=case.scale)
    return _on_cupy_stream(launcher)


def _flashinfer_unavailable() -> str | None:
    from lib.engine.backends import flashinfer

    return flashinfer.unavailable_reason()


def _prepare_flashinfer(backend: Backend, case: DecodeCase, k, v, out, **options) -> Launcher:
    from lib.engine.backends import flashinfer

    launcher = flashinfer.prepare_decode(
        torch_view(case.q), torch_view(k), torch_view(v), torch_view(out), case.tables.tables,
        case.problem.seq_lens, scale=case.scale, **options)
    return _on_cupy_stream(launcher)


def _vllm_fa3_unavailable() -> str | None:
    from lib.engine.backends import vllm_fa

    return vllm_fa.unavailable_reason()


def _prepare_vllm_fa3(backend: Backend, case: DecodeCase, k, v, out) -> Launcher:
    from lib.engine.backends import vllm_fa

    p = case.problem
    launcher = vllm_fa.prepare_decode(
        torch_view(case.q), torch_view(k), torch_view(v), torch_view(out),
        torch_view(case.device_tables), torch_view(case.device_seq_lens),
        scale=case.scale, max_seq_len=p.max_seq_len)
    return _on_cupy_stream(launcher)


def _vllm2024_unavailable() -> str | None:
    from lib.engine.backends import vllm2024

    return vllm2024.unavailable_reason()


def _prepare_vllm2024(backend: Backend, case: DecodeCase, k, v, out) -> Launcher:
    from lib.engine.backends import vllm2024

    p = case.problem
    launcher = vllm2024.prepare_decode(
        backend.version, q=case.q, k_cache=k, v_cache=v, block_tables=case.device_tables,
        seq_lens=case.device_seq_lens, out=out, scale=case.scale, dtype=p.dtype,
        block_size=p.block_size, num_kv_heads=p.num_kv_heads, max_seq_len=p.max_seq_len)
    case.verify_tables()
    return launcher


def _peer_unavailable(module: str) -> Callable[[], str | None]:
    def check():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package (e.g. torch) is absent
            found = False
        if not found:
            return f"{module} is not installed (optional peer)"
        return "installed, but no adapter is written for it yet"
    return check


def _registry() -> dict[str, Backend]:
    reg: dict[str, Backend] = {}
    kinds = {"auto": "kernel (auto: v3 for GQA/MQA in fp16/bf16, else v1/v2)",
             1: "v1 kernel", 2: "v2 kernel", 3: "v3 kernel (matrix units, GQA tiles)"}
    for version, what in kinds.items():
        for addressing in kernels.ADDRESSING:
            name = f"own-{version if version == 'auto' else f'v{version}'}-{addressing}"
            reg[name] = Backend(name, "own", "classic",
                                f"our PagedAttention {what}, {addressing} addressing", version,
                                addressing, _prepare_own, _needs_cupy)
    reg["vllm"] = Backend("vllm", "vllm", "vllm",
                          "vLLM's Triton unified_attention (current decode kernel)",
                          _prepare=_prepare_vllm, _available=_vllm_unavailable)
    reg["sdpa_dense"] = Backend("sdpa_dense", "sdpa", "dense",
                                "torch SDPA on contiguous K/V (no page table)",
                                _prepare=_prepare_sdpa, _available=_needs_torch)
    reg["flashinfer"] = Backend("flashinfer", "peer", "vllm",
                                "FlashInfer's BatchDecodeWithPagedKVCacheWrapper over the paged cache "
                                "(CUDA-graph mode, tensor cores for groups >= 4)",
                                _prepare=_prepare_flashinfer, _available=_flashinfer_unavailable)
    reg["vllm-fa3"] = Backend("vllm-fa3", "peer", "vllm",
                              "vLLM's FlashAttention 3 (vllm_flash_attn, compiled into the vLLM "
                              "wheel): flash_attn_varlen_func over the paged cache",
                              _prepare=_prepare_vllm_fa3, _available=_vllm_fa3_unavailable)
    for version in (1, 2):
        name = f"vllm2024-v{version}"
        reg[name] = Backend(name, "vllm2024", "classic",
                            f"vLLM 0.3.3's CUDA paged_attention_v{version} (2024, the kernel the seed "
                            "profiled), built from its release source by `python -m lib vllm2024-kernel`",
                            version, "paged", _prepare_vllm2024, _vllm2024_unavailable)
    reg["flex_paged"] = Backend("flex_paged", "peer", "vllm",
                                "PyTorch FlexAttention (compiled) over the paged cache: the page "
                                "table as its block mask",
                                _prepare=_prepare_flex, _available=_flex_unavailable)
    return reg


BACKENDS: dict[str, Backend] = _registry()


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, BACKENDS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown backend {name!r}{hint} (known: {', '.join(BACKENDS)})") from None


def list_backends() -> list[dict]:
    """Every backend with its availability here."""
    return [{"backend": b.name, "family": b.family, "layout": b.layout,
             "description": b.description, "unavailable": b.unavailable_reason()}
            for b in BACKENDS.values()]
