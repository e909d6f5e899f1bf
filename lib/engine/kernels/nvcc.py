"""nvcc ahead of time (no GPU needed): find it, compile a translation unit to a cubin with ptxas's
``-v`` report, and read our kernels out of that report. :mod:`.resources` tabulates the report,
:mod:`.cache` keeps the cubins."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from lib.engine.kernels.plan import ADDRESSING, compile_options

_DTYPE_OF_MANGLED = {"6__half": "float16", "13__nv_bfloat16": "bfloat16", "f": "float32"}
_ADDRESSING_OF = {v: k for k, v in ADDRESSING.items()}
_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
_PROPS = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
_USED = re.compile(r"Used (?P<regs>\d+) registers")
_BARRIERS = re.compile(r"used (?P<n>\d+) barriers")
_SMEM = re.compile(r"(?P<n>\d+) bytes smem")
_MANGLED = re.compile(
    r"^_ZN3upa\d+paged_attention_(?P<kernel>decode|reduce|mma)I(?P<type>6__half|13__nv_bfloat16|f)"
    r"(?P<ints>(?:Li\d+E)+)E")


def nvcc_path() -> str | None:
    """nvcc from $CUDA_HOME/$CUDA_PATH, then PATH, then /usr/local/cuda; None if absent."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and Path(root, "bin", "nvcc").is_file():
            return str(Path(root, "bin", "nvcc"))
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_version(nvcc: str | None = None) -> str | None:
    """The 'release X.Y, VX.Y.Z' line of `nvcc --version`, or None without nvcc."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [^\n]+", out)
    return m.group(0) if m else out.strip().splitlines()[-1]


def compile_cubin(nvcc: str, src: Path, arch: str, cubin: Path | None = None,
                  flags: tuple[str, ...] = ()) -> tuple[int, str]:
    """nvcc with the runtime's NVRTC options and ptxas's `-v` report (default output: beside `src`);
    returns (exit code, compiler output)."""
    cubin = cubin or src.with_suffix(f".{arch}.cubin")
    cmd = [nvcc, *compile_options(), "-cubin", f"-arch={arch}", "-Xptxas", "-v", *flags,
           "-o", str(cubin), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def parse_mangled(name: str) -> dict:
    """Template arguments of one of our kernels from its Itanium-mangled name."""
    m = _MANGLED.match(name)
    if m is None:
        raise ValueError(f"not one of our kernels: {name!r}")
    ints = [int(i) for i in re.findall(r"Li(\d+)E", m["ints"])]
    dtype = _DTYPE_OF_MANGLED[m["type"]]
    if m["kernel"] == "decode":
        if len(ints) != 4:
            raise ValueError(f"decode kernel with {len(ints)} integer arguments: {name!r}")
        bs, d, tile, addr = ints
        return dict(kernel="decode", dtype=dtype, block_size=bs, head_size=d, tile=tile,
                    addressing=_ADDRESSING_OF[addr])
    if m["kernel"] == "mma":
        if len(ints) != 4:
            raise ValueError(f"mma kernel with {len(ints)} integer arguments: {name!r}")
        bs, d, addr, tile = ints
        return dict(kernel="mma", dtype=dtype, block_size=bs, head_size=d, tile=tile,
                    addressing=_ADDRESSING_OF[addr])
    if len(ints) != 1:
        raise ValueError(f"reduce kernel with {len(ints)} integer arguments: {name!r}")
    return dict(kernel="reduce", dtype=dtype, block_size=None, head_size=ints[0], tile=None,
                addressing=None)


def parse_ptxas(text: str, parse_name=parse_mangled) -> list[dict]:
    """One dict per entry function in an `nvcc -Xptxas -v` report; `parse_name` turns an entry's
    mangled name into its identifying fields (default: our kernels'; ValueError for a foreign one)."""
    rows: list[dict] = []
    row: dict | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            row = dict(parse_name(m["name"]), arch=m["arch"], mangled=m["name"])
            rows.append(row)
            continue
        if row is None:
            continue
        m = _PROPS.search(line)
        if m:
            row.update(stack_bytes=int(m["stack"]), spill_stores=int(m["st"]),
                       spill_loads=int(m["ld"]))
        m = _USED.search(line)
        if m:
            row["registers"] = int(m["regs"])
            b, s = _BARRIERS.search(line), _SMEM.search(line)
            row["barriers"] = int(b["n"]) if b else 0
            row["static_smem_bytes"] = int(s["n"]) if s else 0
    for r in rows:
        missing = {"registers", "stack_bytes"} - r.keys()
        if missing:
            raise ValueError(f"ptxas report for {r['mangled']} lacks {sorted(missing)}")
    return rows
