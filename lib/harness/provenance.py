"""Provenance: what machine, software and code produced a run, and in what state the GPU was.

:func:`collect` is called once per sweep process and stored beside its rows (keyed by run_id);
:func:`snapshot` (clocks, temperature, power) is taken at the start and again at the end, since
a GPU that heats up or drops its clocks mid-run changes the numbers. Everything degrades to
``None`` on a machine without a GPU, CuPy, nvidia-ml-py or git: provenance never stops a run.
Identifiers that could name a person's machine (GPU UUID, host name) are stored as short hashes:
enough to tell whether two runs used the same card, not to identify it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from typing import Any

#: distribution names to report; where several are given, the first installed one wins
LIBRARIES = {
    "torch": ("torch",), "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"),
    "triton": ("triton",), "vllm": ("vllm",), "numpy": ("numpy",), "pandas": ("pandas",),
    "nvidia-ml-py": ("nvidia-ml-py", "pynvml"), "cuda-python": ("cuda-python", "cuda-bindings"),
    "papermill": ("papermill",), "jupytext": ("jupytext",), "nbclient": ("nbclient",),
    "ipykernel": ("ipykernel",), "jupyter-book": ("jupyter-book",), "tqdm": ("tqdm",),
}


def short_hash(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def library_versions() -> dict[str, str | None]:
    """Installed versions from package metadata (no imports, so no torch start-up cost)."""
    out: dict[str, str | None] = {}
    for key, dists in LIBRARIES.items():
        found = (_try(md.version, d) for d in dists)  # None where not installed
        out[key] = next((v for v in found if v is not None), None)
    return out


def git_state(cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout; measured data (data/results) does not count as dirty."""
    from lib import ROOT

    cwd = str(cwd or ROOT)

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    declared = os.environ.get("UVM_STUDY_GIT_COMMIT")
    if declared:
        # The operator says which commit this tree is (a GPU node fed a copy of the working tree):
        # recorded as declared, and wins over git, because a copy may carry a stale .git (one run
        # read the session's first commit from such a copy while the tree was four commits on).
        dirty = os.environ.get("UVM_STUDY_GIT_DIRTY")
        out = {"commit": declared, "dirty": None if dirty is None else dirty == "1",
               "source": "declared by UVM_STUDY_GIT_COMMIT"}
        if commit is not None and commit != declared:
            out["git_head_in_copy"] = commit
        return out
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)data/results")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _fmt_cuda_version(v: int | None) -> str | None:
    return None if v is None else f"{v // 1000}.{(v % 1000) // 10}"


def _nvml():
    """Initialised pynvml module, or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def _nvml_handle(nv, device: int):
    """NVML handle of CUDA device ``device`` (by PCI bus id: robust to CUDA_VISIBLE_DEVICES)."""
    import cupy

    bus = cupy.cuda.runtime.deviceGetPCIBusId(device)
    for candidate in (bus, bus.encode()):
        try:
            return nv.nvmlDeviceGetHandleByPciBusId(candidate)
        except Exception:
            continue
    return None


def _current_device(device: int | None) -> int | None:
    from lib.engine.gpu import gpu_available

    if not gpu_available():
        return None
    import cupy

    return cupy.cuda.runtime.getDevice() if device is None else int(device)


def snapshot(device: int | None = None) -> dict[str, Any] | None:
    """SM and memory clocks (MHz), temperature (C), power (W), performance state, throttle reasons.

    ``None`` without a GPU or nvidia-ml-py; single fields are ``None`` where NVML cannot say.
    """
    dev = _current_device(device)
    nv = None if dev is None else _nvml()
    h = None if nv is None else _nvml_handle(nv, dev)
    if h is None:
        return None

    def q(fn, *args, scale=1.0):
        v = _try(lambda: getattr(nv, fn)(h, *args))
        return v * scale if v is not None and scale != 1.0 else v

    reasons = "nvmlDeviceGetCurrentClocksEventReasons"
    if not hasattr(nv, reasons):
        reasons = "nvmlDeviceGetCurrentClocksThrottleReasons"
    return {
        "time_utc": _utc_now(),
        "sm_clock_mhz": q("nvmlDeviceGetClockInfo", getattr(nv, "NVML_CLOCK_SM", 1)),
        "mem_clock_mhz": q("nvmlDeviceGetClockInfo", getattr(nv, "NVML_CLOCK_MEM", 2)),
        "sm_clock_max_mhz": q("nvmlDeviceGetMaxClockInfo", getattr(nv, "NVML_CLOCK_SM", 1)),
        "mem_clock_max_mhz": q("nvmlDeviceGetMaxClockInfo", getattr(nv, "NVML_CLOCK_MEM", 2)),
        "temperature_c": q("nvmlDeviceGetTemperature", getattr(nv, "NVML_TEMPERATURE_GPU", 0)),
        "power_w": q("nvmlDeviceGetPowerUsage", scale=1e-3),
        "power_limit_w": q("nvmlDeviceGetEnforcedPowerLimit", scale=1e-3),
        "pstate": q("nvmlDeviceGetPerformanceState"),
        "clock_event_reasons": q(reasons),
        "memory_used_bytes": _try(lambda: int(nv.nvmlDeviceGetMemoryInfo(h).used)),
    }


def gpu_info(device: int | None = None) -> dict[str, Any] | None:
    """Static facts about the GPU: name, UUID hash, driver and CUDA versions, size, SMs, L2."""
    dev = _current_device(device)
    if dev is None:
        return None
    import cupy

    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(dev)
    name = props.get("name", b"")
    name = name.decode() if isinstance(name, bytes) else str(name)
    info: dict[str, Any] = {
        "index": dev,
        "name": name,
        "compute_capability": f"{props.get('major')}.{props.get('minor')}",
        "sm_count": props.get("multiProcessorCount"),
        "memory_total_bytes": props.get("totalGlobalMem"),
        "l2_cache_bytes": props.get("l2CacheSize"),
        "memory_bus_width_bits": props.get("memoryBusWidth"),
        "cuda_runtime_version": _fmt_cuda_version(_try(rt.runtimeGetVersion)),
        "cuda_driver_version": _fmt_cuda_version(_try(rt.driverGetVersion)),
        "driver_version": None, "uuid_sha16": None, "pci_bus_id": None,  # filled in below
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    raw_uuid = props.get("uuid")
    if isinstance(raw_uuid, (bytes, bytearray)) and len(raw_uuid) == 16:
        h = raw_uuid.hex()
        info["uuid_sha16"] = short_hash(f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    nv = _nvml()
    if nv is not None:
        info["driver_version"] = _decode(_try(nv.nvmlSystemGetDriverVersion))
        handle = _nvml_handle(nv, dev)
        if handle is not None:
            uuid = _decode(_try(nv.nvmlDeviceGetUUID, handle))
            if uuid:
                info["uuid_sha16"] = short_hash(uuid)
    # the bus id locates a card in one host; the study keeps it only hashed like the UUID
    bus = _try(rt.deviceGetPCIBusId, dev)
    info["pci_bus_id"] = None if bus is None else short_hash(str(bus), 8)
    return info


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return None


def _decode(v):
    return v.decode() if isinstance(v, bytes) else v


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def collect(params: dict | None = None, *, device: int | None = None) -> dict[str, Any]:
    """Everything a reader needs to trust or repeat a run (see the module docstring)."""
    from lib import __version__

    return {"time_utc": _utc_now(), "host_sha16": short_hash(socket.gethostname()),
            "python": sys.version.split()[0], "platform": platform.platform(), "argv": list(sys.argv),
            "lib_version": __version__, "git": git_state(), "libraries": library_versions(),
            "gpu": gpu_info(device), "snapshot_before": snapshot(device), "params": dict(params or {})}


#: What each use of the study needs installed (``python -m lib env`` lists what is missing).
NEEDS = {
    "book (build from committed data)": ["jupyter-book", "jupytext", "papermill", "ipykernel", "pandas", "tqdm"],
    "gpu (measure)": ["cupy", "nvidia-ml-py"],
    "vLLM's kernel": ["torch", "triton", "vllm"],
    "dense SDPA peer": ["torch"],
}


def environment() -> dict[str, Any]:
    """This machine for ``python -m lib env``: GPU, libraries, vLLM's kernel, what is missing."""
    from lib.engine.backends.vllm import vllm_status
    from lib.engine.gpu import gpu_available

    libs = library_versions()
    gpu = gpu_info() if gpu_available() else None
    missing = {what: [p for p in pkgs if libs.get(p) is None] for what, pkgs in NEEDS.items()}
    vllm = vllm_status()
    if libs.get("vllm") is None and vllm.get("available"):  # a kernel-only install stands in
        missing["vLLM's kernel"].remove("vllm")
    return {"python": sys.version.split()[0], "executable": sys.executable, "gpu": gpu,
            "snapshot": snapshot() if gpu else None, "libraries": libs, "vllm_kernel": vllm,
            "missing": missing, "git": git_state()}
