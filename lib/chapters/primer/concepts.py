"""The primer's first principles as small pure functions: no GPU and no data.

How a virtual address splits at each page size, how many translations a range needs, what
least-recently-used eviction does to a kernel that sweeps its data in order, and the arithmetic
that turns measured rates (GB/s) into costs: the driver's overhead per migrated byte, the number of
reads after which a prefetch pays off, the price of a host byte in device bytes. The platform
table says what Unified Memory can do where.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict

import pandas as pd

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: (label, bytes, who uses it): the three page sizes the primer follows.
PAGE_SIZES = (
    ("4 KiB", 4 * KiB, "the CPU's base page on x86-64; the GPU's smallest page"),
    ("64 KiB", 64 * KiB, "the GPU's big page; the base page of many Arm64 server kernels"),
    ("2 MiB", 2 * MiB, "a CPU huge page; a GPU large page; the block the UVM driver manages"),
)


def _power_of_two(n: int, what: str) -> int:
    n = int(n)
    if n <= 0 or n & (n - 1):
        raise ValueError(f"{what} must be a positive power of two, got {n}")
    return n


def offset_bits(page_bytes: int) -> int:
    """How many low bits of an address select the byte within a page (12 for 4 KiB)."""
    return _power_of_two(page_bytes, "a page size").bit_length() - 1


def split_address(address: int, page_bytes: int) -> tuple[int, int]:
    """(virtual page number, offset in the page): what a page table looks up, and what it keeps."""
    if address < 0:
        raise ValueError(f"an address is not negative, got {address}")
    bits = offset_bits(page_bytes)
    return address >> bits, address & ((1 << bits) - 1)


def pages_to_map(nbytes: int, page_bytes: int) -> int:
    """Translations (page-table entries, and TLB entries to cover it all) a range of ``nbytes`` needs."""
    if nbytes < 0:
        raise ValueError(f"a size is not negative, got {nbytes}")
    return -(-int(nbytes) // _power_of_two(page_bytes, "a page size"))


def size_label(nbytes: float) -> str:
    """``"16 GiB"``, ``"64 KiB"``: a byte count in the largest binary unit that keeps it >= 1."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def grouped(n: int) -> str:
    """``20 756 224``: an integer with thin-space thousands separators (no commas, which a
    ``{glue:text}`` role would read as a tuple)."""
    return f"{int(n):,}".replace(",", "\u202f")


def page_size_table(nbytes: int) -> pd.DataFrame:
    """One row per page size: offset bits, translations to map ``nbytes``, who uses it."""
    return pd.DataFrame([{"page size": label, "offset bits": offset_bits(b),
                          f"pages to map {size_label(nbytes)}": grouped(pages_to_map(nbytes, b)),
                          "used as": who} for label, b, who in PAGE_SIZES])


# ----------------------------------------------------------------------------- eviction

POLICIES = {
    "lru": "evict the least recently used page (roughly what the driver does)",
    "random": "evict a page chosen at random",
    "keep": "keep a fixed set resident, cycle the rest through one slot",
}


def scan_misses(working_set: int, capacity: int, *, policy: str = "lru", passes: int = 4,
                seed: int = 0) -> float:
    """Share of page reads that miss (the page must migrate in) in the passes after the first,
    when a kernel reads pages ``0 .. working_set - 1`` in order, pass after pass, and GPU memory
    holds ``capacity`` pages. The first pass only fills memory, so it is not counted."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
    if working_set < 1 or capacity < 1 or passes < 2:
        raise ValueError("want working_set >= 1, capacity >= 1 and passes >= 2")
    rng = random.Random(seed)
    resident: OrderedDict[int, None] = OrderedDict()  # oldest use first
    kept = set(range(capacity - 1)) if policy == "keep" and working_set > capacity else set()
    misses = reads = 0
    for p in range(passes):
        for page in range(working_set):
            hit = page in resident
            if hit:
                resident.move_to_end(page)
            else:
                if len(resident) >= capacity:
                    if policy == "lru":
                        resident.popitem(last=False)
                    elif policy == "random":
                        del resident[rng.choice(list(resident))]
                    else:  # keep: evict the one page that is not in the kept set
                        victim = next(q for q in resident if q not in kept)
                        del resident[victim]
                resident[page] = None
            if p:
                reads += 1
                misses += not hit
    return misses / reads


def miss_curve(ratios, *, capacity: int = 240, policies=tuple(POLICIES), passes: int = 4,
               seed: int = 0) -> pd.DataFrame:
    """:func:`scan_misses` for working sets of ``ratio x capacity`` pages: columns ratio, policy,
    miss_share."""
    rows = []
    for policy in policies:
        for r in ratios:
            ws = max(1, round(float(r) * capacity))
            rows.append({"ratio": ws / capacity, "policy": policy,
                         "miss_share": scan_misses(ws, capacity, policy=policy, passes=passes, seed=seed)})
    return pd.DataFrame(rows)


def pass_slowdown(miss_share: float, device_gbps: float, fault_gbps: float) -> float:
    """A model of one sweep over the data, relative to the sweep with everything resident: the
    missed share moves at the fault-driven rate, the rest reads at device speed. A lower bound:
    it leaves out writing evicted pages back to the host."""
    if not (device_gbps > 0 and fault_gbps > 0):
        return float("nan")
    return 1.0 + miss_share * (device_gbps / fault_gbps - 1.0)


# ----------------------------------------------------------------------------- rates into costs

def seconds(nbytes: float, gbps: float) -> float:
    """Time to move ``nbytes`` at ``gbps`` (10^9 bytes per second)."""
    return float(nbytes) / (float(gbps) * 1e9) if gbps > 0 else float("nan")


def fault_overhead_us(nbytes: float, fault_gbps: float, link_gbps: float) -> float:
    """Microseconds that fault-driven migration of ``nbytes`` takes beyond a copy of the same bytes
    at the link's rate: the driver's share (fault handling, mapping, waiting), not the bus's."""
    return 1e6 * (seconds(nbytes, fault_gbps) - seconds(nbytes, link_gbps))


def prefetch_break_even(prefetch_gbps: float, remote_gbps: float, device_gbps: float) -> float:
    """Reads of a host-resident buffer after which prefetching it once (then reading it from
    device memory) costs less than reading it over the link every time. Solves
    ``1/P + r/D = r/R`` for ``r``; infinite when remote reads are as fast as device reads."""
    gain = 1.0 / remote_gbps - 1.0 / device_gbps
    return (1.0 / prefetch_gbps) / gain if gain > 0 else math.inf


def host_byte_cost(device_gbps: float, link_gbps: float) -> float:
    """How many bytes of device memory a kernel reads in the time one host byte crosses the link."""
    return device_gbps / link_gbps


def doubling_fraction(cost: float) -> float:
    """The host share *f* at which a step that reads its two parts one after the other takes twice
    its all-GPU time: (1 - f) + f N = 2, so f = 1 / (N - 1)."""
    return 1.0 / (cost - 1.0) if cost > 1 else math.inf


# ----------------------------------------------------------------------------- platforms

#: What Unified Memory can do on each kind of machine (documented behaviour, not measurements).
#: Attributes: CMA = ConcurrentManagedAccess, PMA = PageableMemoryAccess, host tables =
#: PageableMemoryAccessUsesHostPageTables.
PLATFORMS = [
    {"platform": "x86-64 + PCIe GPU, Linux (this study's machines)",
     "page tables": "two: the OS's for the CPU, the driver's for the GPU",
     "the GPU can use": "managed and pinned memory; not plain malloc",
     "faults, oversubscription": "yes (Pascal and newer)",
     "attributes": "CMA 1, PMA 0"},
    {"platform": "x86-64 + PCIe GPU, Linux with HMM",
     "page tables": "two; the driver mirrors the CPU's through the kernel's HMM",
     "the GPU can use": "any memory (malloc, mmap): it migrates on faults like managed memory",
     "faults, oversubscription": "yes (open kernel modules, recent kernel and driver)",
     "attributes": "CMA 1, PMA 1, host tables 0"},
    {"platform": "Grace Hopper, Grace Blackwell (NVLink-C2C, coherent)",
     "page tables": "one for system memory: the GPU walks the CPU's through ATS",
     "the GPU can use": "any memory, read in place at cache-line grain; hot pages can migrate",
     "faults, oversubscription": "yes",
     "attributes": "CMA 1, PMA 1, host tables 1"},
    {"platform": "Jetson and other integrated GPUs (one DRAM)",
     "page tables": "two, over the same physical memory",
     "the GPU can use": "managed, pinned and device memory; nothing crosses a bus",
     "faults, oversubscription": "no oversubscription beyond DRAM; on many releases the CPU must "
                                 "not touch managed memory while a kernel runs",
     "attributes": "CMA often 0: query it"},
    {"platform": "Windows (WDDM), native",
     "page tables": "two, managed through the Windows display driver model",
     "the GPU can use": "managed memory, made resident for the GPU when a kernel starts",
     "faults, oversubscription": "no on-demand faults, no oversubscription; the CPU waits "
                                 "for the GPU before touching managed memory",
     "attributes": "CMA 0"},
    {"platform": "WSL 2",
     "page tables": "as on Windows", "the GPU can use": "as on Windows; pinned memory is limited too",
     "faults, oversubscription": "as on Windows", "attributes": "CMA 0"},
]


def platform_table() -> pd.DataFrame:
    return pd.DataFrame(PLATFORMS)
