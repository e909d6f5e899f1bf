"""Provenance: what machine, software and code produced a run, and in what state the GPU was.

:func:`collect` is called once per sweep process and stored beside its rows (keyed by run_id);
:func:`snapshot` (clocks, temperature, power, PCIe link) is taken at the start and again at the
end, both *idle* (nothing runs then). The clocks that matter are sampled *under load*:
:class:`LoadClocks`, installed as :mod:`lib.engine.timing`'s load probe, reads them through NVML
once per batch of timed samples while the GPU runs it (``clocks_under_load`` in the run, and per
row in ``extra``). Everything degrades to ``None`` on a machine without a GPU, CuPy,
nvidia-ml-py or git: provenance never stops a run. Identifiers that could name a person's
machine (GPU UUID, host name) are stored as short hashes: enough to tell whether two runs used
the same card, not to identify it.

The code (:func:`git_state`): the commit (from git, or *declared* by the operator for a copy of the
tree without ``.git``: ``UVM_STUDY_GIT_COMMIT``), the dirty flag, and ``lib_sha256``, a hash of
the content of ``lib/`` (every ``.py`` and ``.cu`` file under it, :func:`lib_hash`), so that even
a dirty or undeclared run names its code. A declared commit is checked against that hash
(``check``): with ``UVM_STUDY_LIB_SHA`` (the hash of the declared commit, computed where git is,
``python -c "from lib.harness.provenance import lib_hash_at; print(lib_hash_at('HEAD'))"``), or
with the copy's own ``.git`` if it holds that commit; else it is recorded as unverified and
:func:`verify_git` (``scripts/verify_provenance.py``) checks it later against the repository.

Versions (:func:`library_versions`) come from package metadata; vLLM's and FlashInfer's kernel-only
installs are not on ``sys.path`` until their backend loads, so their versions are read from the
install itself (vLLM's ``METADATA``, FlashInfer's manifest), at the start and again at the end of
a run. :data:`DATASHEET` holds the vendors' peak numbers for known cards, stored beside the
measured ceilings and labelled as datasheet values. :func:`run_issues` lists what is wrong or
missing in a run's provenance; :mod:`lib.harness.known_issues` adds what is known to be wrong in
committed runs, and :func:`lib.harness.results.load` exposes both as the ``provenance_issues``
column.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform
import socket
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

#: distribution names to report; where several are given, the first installed one wins
LIBRARIES = {
    "torch": ("torch",), "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"),
    "triton": ("triton",), "vllm": ("vllm",), "numpy": ("numpy",), "pandas": ("pandas",),
    "nvidia-ml-py": ("nvidia-ml-py", "pynvml"), "cuda-python": ("cuda-python", "cuda-bindings"),
    "papermill": ("papermill",), "jupytext": ("jupytext",), "nbclient": ("nbclient",),
    "ipykernel": ("ipykernel",), "jupyter-book": ("jupyter-book",), "tqdm": ("tqdm",),
    "flashinfer": ("flashinfer-python", "flashinfer"), "apache-tvm-ffi": ("apache-tvm-ffi",),
}


def short_hash(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _kernel_only_versions() -> dict[str, str | None]:
    """vLLM's and FlashInfer's versions read from their installs without importing them (a
    kernel-only install is no distribution on ``sys.path`` until its backend loads it)."""
    out: dict[str, str | None] = {"vllm": None, "flashinfer": None, "apache-tvm-ffi": None,
                                  "vllm2024": vllm2024_build()}
    try:
        from lib.engine.backends.vllm import vllm_status

        out["vllm"] = vllm_status().get("version")
    except Exception:
        pass
    mod = sys.modules.get("flashinfer")
    if mod is not None and getattr(mod, "__version__", None):
        out["flashinfer"] = str(mod.__version__)
    try:
        import importlib

        fi = importlib.import_module("lib.engine.backends.flashinfer")
        status = fi.flashinfer_status()
        out["flashinfer"] = out["flashinfer"] or status.get("version")
        out["apache-tvm-ffi"] = status.get("tvm_ffi_version")
    except Exception:
        pass
    return out


def vllm2024_build() -> str | None:
    """vLLM's 2024 kernels as built here (``python -m lib vllm2024-kernel``): the release and the
    hash of the sources compiled, e.g. "0.3.3 source 4bc35272fade"; None without a build."""
    try:
        from lib.engine.backends import vllm2024

        st = vllm2024.status()
    except Exception:
        return None
    if not st.get("available"):
        return None
    return f"{st.get('version')} source {str(st.get('source_sha256'))[:12]} {st.get('arch')}"


def library_versions() -> dict[str, str | None]:
    """Installed versions from package metadata (no imports, so no torch start-up cost); vLLM and
    FlashInfer from their kernel-only installs where no distribution is installed."""
    out: dict[str, str | None] = {}
    for key, dists in LIBRARIES.items():
        found = (_try(md.version, d) for d in dists)  # None where not installed
        out[key] = next((v for v in found if v is not None), None)
    out["vllm2024"] = None
    if None in (out["vllm"], out["flashinfer"], out["vllm2024"]):
        for key, v in _kernel_only_versions().items():
            if out.get(key) is None:
                out[key] = v
    return out


# ----------------------------------------------------------------------------- the code

#: What the lib hash covers: every file under lib/ with one of these suffixes (what git tracks
#: there: the Python modules and the CUDA source), never caches.
LIB_SUFFIXES = (".py", ".cu", ".cuh")


def _lib_path(rel: str) -> bool:
    parts = rel.split("/")
    return (parts[0] == "lib" and rel.endswith(LIB_SUFFIXES) and "__pycache__" not in parts
            and not any(p.startswith(".") for p in parts))


def _digest(entries: Iterable[tuple[str, bytes]]) -> str:
    """One SHA-256 over (path, content) pairs, in path order."""
    h = hashlib.sha256()
    for rel, data in sorted(entries):
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).hexdigest().encode() + b"\n")
    return h.hexdigest()


def lib_hash(root: str | os.PathLike | None = None) -> str | None:
    """SHA-256 of the content of ``<root>/lib`` as it is on disk (:data:`LIB_SUFFIXES`); None
    without a lib/ there. Equal to :func:`lib_hash_at` of a commit when the tree is that commit's."""
    from lib import ROOT

    base = Path(root or ROOT)
    if not (base / "lib").is_dir():
        return None
    entries = []
    for f in (base / "lib").rglob("*"):
        rel = f.relative_to(base).as_posix()
        if f.is_file() and _lib_path(rel):
            entries.append((rel, f.read_bytes()))
    return _digest(entries)


def _git(cwd, *args: str, input_bytes: bytes | None = None) -> bytes | None:
    try:
        r = subprocess.run(["git", *args], cwd=str(cwd), capture_output=True, timeout=30, input=input_bytes)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def lib_hash_at(commit: str, root: str | os.PathLike | None = None) -> str | None:
    """:func:`lib_hash` of ``lib/`` as committed in ``commit`` (from git's objects); None where
    git or the commit is not there."""
    from lib import ROOT

    root = root or ROOT
    listing = _git(root, "ls-tree", "-r", "-z", "--name-only", commit, "--", "lib")
    if listing is None:
        return None
    paths = [p for p in listing.decode().split("\0") if p and _lib_path(p)]
    if not paths:
        return None
    out = _git(root, "cat-file", "--batch", input_bytes="".join(f"{commit}:{p}\n" for p in paths).encode())
    if out is None:
        return None
    entries, pos = [], 0
    for rel in paths:  # each answer: "<sha> blob <size>\n<content>\n"
        nl = out.index(b"\n", pos)
        header = out[pos:nl].split()
        if len(header) != 3 or header[1] != b"blob":
            return None
        size = int(header[2])
        entries.append((rel, out[nl + 1:nl + 1 + size]))
        pos = nl + 1 + size + 1
    return _digest(entries)


def _check_declared(declared: str, lib_sha: str | None, root) -> dict[str, Any]:
    """Whether the tree here is the declared commit's, judged by the lib hash."""
    if lib_sha is None:
        return {"status": "unverified", "how": "no lib/ to hash here"}
    expected = os.environ.get("UVM_STUDY_LIB_SHA")
    how = "UVM_STUDY_LIB_SHA (the declared commit's lib hash, given by the operator)"
    if not expected:
        expected = lib_hash_at(declared, root)
        how = "the declared commit's objects in this copy's .git"
    if not expected:
        return {"status": "unverified",
                "how": "neither UVM_STUDY_LIB_SHA nor the declared commit's objects are here; "
                       "lib_sha256 lets scripts/verify_provenance.py check it against the repository"}
    return {"status": "verified" if expected == lib_sha else "mismatch", "how": how,
            "expected_lib_sha256": expected}


def git_state(cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit, dirty flag and lib hash of the tree; measured data (data/results) does not count as
    dirty. From git, unless a commit is declared (``UVM_STUDY_GIT_COMMIT``, with
    ``UVM_STUDY_GIT_DIRTY=0|1``): a declared commit wins and is checked (``check``, module
    docstring). From git, ``dirty`` is also true when lib/ differs from HEAD's (untracked files
    under lib/ included, which ``git status`` leaves out here)."""
    from lib import ROOT

    root = Path(cwd or ROOT)
    head = _git(root, "rev-parse", "HEAD")
    commit = head.decode().strip() if head else None
    lib_sha = lib_hash(root)
    declared = os.environ.get("UVM_STUDY_GIT_COMMIT")
    if declared:
        # The operator says which commit this tree is (a GPU node fed a copy of the working tree):
        # recorded as declared, and wins over git, because a copy may carry a stale .git (one run
        # read the session's first commit from such a copy while the tree was four commits on).
        dirty = os.environ.get("UVM_STUDY_GIT_DIRTY")
        out = {"commit": declared, "dirty": None if dirty is None else dirty == "1",
               "source": "declared by UVM_STUDY_GIT_COMMIT", "lib_sha256": lib_sha}
        if commit is not None and commit != declared:
            out["git_head_in_copy"] = commit
        out["check"] = _check_declared(declared, lib_sha, root)
        return out
    if commit is None:
        return {"commit": None, "dirty": None, "source": "none: no git here and no declared commit",
                "lib_sha256": lib_sha}
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)data/results")
    at_head = lib_hash_at(commit, root)
    lib_clean = None if at_head is None or lib_sha is None else at_head == lib_sha
    dirty = None if status is None else bool(status.strip()) or lib_clean is False
    return {"commit": commit, "dirty": dirty, "source": "git", "lib_sha256": lib_sha,
            "lib_matches_commit": lib_clean}


def verify_git(git: Mapping[str, Any], root: str | os.PathLike | None = None) -> dict[str, Any]:
    """A recorded ``git`` block checked against the repository at ``root``: does its commit's lib/
    hash to the recorded ``lib_sha256``? ``status``: verified, mismatch, unknown_commit, no_hash,
    no_commit."""
    commit, recorded = git.get("commit"), git.get("lib_sha256")
    if not commit:
        return {"status": "no_commit"}
    if not recorded:
        return {"status": "no_hash", "commit": commit}
    at = lib_hash_at(commit, root)
    if at is None:
        return {"status": "unknown_commit", "commit": commit}
    return {"status": "verified" if at == recorded else "mismatch", "commit": commit}


def commits_with_lib_hash(lib_sha: str, root: str | os.PathLike | None = None, *,
                          max_commits: int = 300) -> list[str]:
    """Commits (newest first, at most ``max_commits`` looked at) whose lib/ hashes to ``lib_sha``."""
    from lib import ROOT

    root = root or ROOT
    log = _git(root, "rev-list", f"--max-count={int(max_commits)}", "HEAD")
    if log is None:
        return []
    return [c for c in log.decode().split() if lib_hash_at(c, root) == lib_sha]


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
        "label": "idle snapshot: taken while nothing runs (clocks drop when idle)",
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
        "pcie_generation": q("nvmlDeviceGetCurrPcieLinkGeneration"),
        "pcie_width": q("nvmlDeviceGetCurrPcieLinkWidth"),
    }


def pcie_link(nv, handle) -> dict[str, Any]:
    """The PCIe link: current and maximum generation and width (the current ones drop when idle)."""
    def q(fn):
        return _try(lambda: getattr(nv, fn)(handle))

    return {"generation": q("nvmlDeviceGetCurrPcieLinkGeneration"),
            "width": q("nvmlDeviceGetCurrPcieLinkWidth"),
            "max_generation": q("nvmlDeviceGetMaxPcieLinkGeneration"),
            "max_width": q("nvmlDeviceGetMaxPcieLinkWidth"),
            "gpu_max_generation": q("nvmlDeviceGetGpuMaxPcieLinkGeneration")}


class LoadClocks:
    """Reads SM and memory clocks and the PCIe link through NVML each time it is called: the
    sweep installs it as :func:`lib.engine.timing.set_load_probe`, which calls it right after a
    batch of timed samples was enqueued, so every reading is taken under load. Never raises;
    without NVML or a GPU it records nothing."""

    LABEL = ("sampled by NVML under load: once per batch of timed samples, right after the batch "
             "was enqueued, while the GPU ran it")

    def __init__(self, device: int | None = None):
        self.samples: list[dict[str, Any]] = []
        self._mark = 0
        self._nv = self._h = None
        try:
            dev = _current_device(device)
            self._nv = None if dev is None else _nvml()
            self._h = None if self._nv is None else _nvml_handle(self._nv, dev)
        except Exception:
            self._nv = self._h = None

    def __call__(self) -> None:
        if self._h is None:
            return
        nv, h = self._nv, self._h
        sm = _try(lambda: nv.nvmlDeviceGetClockInfo(h, getattr(nv, "NVML_CLOCK_SM", 1)))
        mem = _try(lambda: nv.nvmlDeviceGetClockInfo(h, getattr(nv, "NVML_CLOCK_MEM", 2)))
        if sm is None and mem is None:
            return
        self.samples.append({"sm_clock_mhz": sm, "mem_clock_mhz": mem,
                             "pcie_generation": _try(lambda: nv.nvmlDeviceGetCurrPcieLinkGeneration(h)),
                             "pcie_width": _try(lambda: nv.nvmlDeviceGetCurrPcieLinkWidth(h))})

    def mark(self) -> None:
        """Start a new window (e.g. one point): :meth:`since_mark` summarizes what follows."""
        self._mark = len(self.samples)

    def since_mark(self) -> dict[str, Any]:
        return summarize_clocks(self.samples[self._mark:])

    def summary(self) -> dict[str, Any]:
        return {"label": self.LABEL, **summarize_clocks(self.samples)}


def summarize_clocks(samples: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Median, min and max of each reading over ``samples`` (empty dict without any)."""
    if not samples:
        return {}
    out: dict[str, Any] = {"n": len(samples)}
    for key in ("sm_clock_mhz", "mem_clock_mhz", "pcie_generation", "pcie_width"):
        vals = [float(x[key]) for x in samples if x.get(key) is not None]
        if vals:
            out[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def row_clocks(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What one row keeps of a point's clock summary (``extra``): the medians under load."""
    out = {}
    for key in ("sm_clock_mhz", "mem_clock_mhz"):
        if isinstance(summary.get(key), Mapping):
            out[f"{key}_under_load"] = summary[key]["median"]
    return out


# ----------------------------------------------------------------------------- datasheet peaks

#: Vendors' peak numbers for cards the study ran on, by model name (NVIDIA's datasheets):
#: HBM bandwidth in GB/s (10^9 bytes/s). Beside them in every run: the ceilings it measured.
DATASHEET = {
    "NVIDIA H100 80GB HBM3": {"hbm_gbps": 3350.0, "source": "NVIDIA H100 datasheet, SXM5: 3.35 TB/s"},
    "NVIDIA H200": {"hbm_gbps": 4800.0, "source": "NVIDIA H200 datasheet: 4.8 TB/s"},
}
#: PCIe signalling rate per lane and direction, GT/s, by generation; x lanes / 8 = GB/s per
#: direction before encoding (128b/130b from Gen3) and protocol overhead: Gen5 x16 = 64 GB/s.
PCIE_GT_PER_LANE = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}


def pcie_gbps(generation: int | None, width: int | None) -> float | None:
    """The datasheet rate of a PCIe link per direction in GB/s (None when unknown)."""
    if generation is None or width is None or int(generation) not in PCIE_GT_PER_LANE:
        return None
    return PCIE_GT_PER_LANE[int(generation)] * int(width) / 8


def datasheet(gpu_name: str | None, pcie: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Datasheet peaks for a card (labelled so: not measured): HBM from :data:`DATASHEET` by
    name, PCIe from the link's maximum generation and width. Missing values are None."""
    entry = DATASHEET.get(str(gpu_name or "").strip(), {})
    pcie = pcie or {}
    gen, width = pcie.get("max_generation"), pcie.get("max_width")
    return {"label": "datasheet peak (vendor's number, not measured here)",
            "hbm_gbps": entry.get("hbm_gbps"), "hbm_source": entry.get("source"),
            "pcie_gbps_per_direction": pcie_gbps(gen, width),
            "pcie_link": None if gen is None else f"PCIe Gen{gen} x{width}",
            "pcie_source": "signalling rate per direction, before encoding and protocol overhead"}


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
            info["pcie"] = pcie_link(nv, handle)
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

    gpu = gpu_info(device)
    return {"time_utc": _utc_now(), "host_sha16": short_hash(socket.gethostname()),
            "python": sys.version.split()[0], "platform": platform.platform(), "argv": list(sys.argv),
            "lib_version": __version__, "git": git_state(), "libraries": library_versions(),
            "gpu": gpu, "datasheet": None if gpu is None else datasheet(gpu.get("name"), gpu.get("pcie")),
            "snapshot_before": snapshot(device), "params": dict(params or {})}


# ----------------------------------------------------------------------------- what is wrong

def run_issues(prov: Mapping[str, Any], backends: Iterable[str] = ()) -> list[str]:
    """What a run's provenance gets wrong or leaves out, in words (empty: nothing found).

    ``backends``: the backends the run's rows used (a vLLM or FlashInfer row needs that library's
    version). Checks only what the record itself shows; runs known to be wrong in ways it cannot
    show are listed in :mod:`lib.harness.known_issues`.
    """
    out: list[str] = []
    git = prov.get("git") or {}
    if not git.get("commit"):
        out.append("git: no commit recorded" + (" (its lib_sha256 names the code: "
                                                "scripts/verify_provenance.py finds the commit)"
                                                if git.get("lib_sha256") else ""))
    check = git.get("check") or {}
    if check.get("status") == "mismatch":
        out.append(f"git: the tree's lib/ does not hash to the declared commit {str(git.get('commit'))[:12]}'s "
                   f"(checked by {check.get('how')})")
    if git.get("source") == "git" and git.get("lib_matches_commit") is False:
        out.append(f"git: lib/ differed from commit {str(git.get('commit'))[:12]} (dirty), "
                   "lib_sha256 names the code")
    if git.get("commit") and git.get("dirty") is not False and not git.get("lib_sha256"):
        out.append("git: the tree was dirty (or its state unknown) and no lib/ hash was recorded, "
                   "so the code that ran cannot be identified")
    libs = prov.get("libraries") or {}
    end_libs = (prov.get("end") or {}).get("libraries") or {}
    used = {str(b) for b in backends}
    for lib_name, names in (("vllm", {"vllm", "vllm-fa3"}), ("flashinfer", {"flashinfer"}),
                            ("vllm2024", {"vllm2024-v1", "vllm2024-v2"})):
        if used & names and not (libs.get(lib_name) or end_libs.get(lib_name)):
            out.append(f"libraries: {lib_name}'s version is not recorded (null) although the run used it")
    return out


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
            "datasheet": None if gpu is None else datasheet(gpu.get("name"), gpu.get("pcie")),
            "missing": missing, "git": git_state()}
