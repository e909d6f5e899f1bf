"""Test doubles for :mod:`lib.engine.vmm`: a pure-Python VMM driver for CPU tests and a wrapper that
makes the k-th call of any driver operation fail."""

from __future__ import annotations

from typing import Any

from lib.engine.vmm import VmmDriverError, _check_int, round_up

#: names of the driver operations (also the keys of fault injection and call counters)
OPERATIONS = ("granularity", "reserve_va", "free_va", "create_handle", "release_handle", "map",
              "unmap", "set_access")


class InjectedFault(VmmDriverError):
    """A failure requested by a test (:meth:`FakeVmmDriver.inject_failure`)."""


# ---------------------------------------------------------------------------------------------
# Fault injection (shared by the fake driver and the wrapper for the real one)


class _FaultPlan:
    """Counts calls per operation and raises :class:`InjectedFault` on the ones armed to fail."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {op: 0 for op in OPERATIONS}
        self._armed: dict[str, set[int]] = {}

    def arm(self, op: str, nth: int = 1) -> None:
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}; choose from {', '.join(OPERATIONS)}")
        _check_int("nth", nth, minimum=1)
        self._armed.setdefault(op, set()).add(self.calls[op] + nth)

    def clear(self) -> None:
        self._armed.clear()

    def tick(self, op: str) -> None:
        """Count a call of ``op``; raise if this call was armed to fail (before any effect)."""
        self.calls[op] += 1
        due = self._armed.get(op)
        if due and self.calls[op] in due:
            due.discard(self.calls[op])
            raise InjectedFault(op, "INJECTED", f"call #{self.calls[op]} of {op} armed to fail")


# ---------------------------------------------------------------------------------------------
# Pure-Python driver for CPU tests


class FakeVmmDriver:
    """An in-memory model of the VMM driver: tracks reservations, handles and mappings.

    It enforces CUDA's rules (sizes and addresses multiples of the granularity, maps only inside
    a reservation and never over another mapping, unmaps of whole mappings only, access only on
    mapped ranges) and is stricter in two places, to catch allocator bugs: releasing a handle that
    is still mapped and freeing a reservation that still has mappings both raise (CUDA defers the
    first and leaves the second undefined). Every violation raises :class:`VmmDriverError`, with
    no change of state. ``inject_failure(op, nth)`` makes the nth next call of ``op`` fail.
    """

    BASE_VA = 0x7F00_0000_0000

    def __init__(self, granularity: int = 2 << 20, *, num_devices: int = 1):
        self._gran = _check_int("granularity", granularity, minimum=1)
        self.num_devices = _check_int("num_devices", num_devices, minimum=1)
        self._faults = _FaultPlan()
        self._next_va = self.BASE_VA
        self._next_handle = 1
        #: va -> size
        self.reservations: dict[int, int] = {}
        #: handle -> (size, device)
        self.handles: dict[int, tuple[int, int]] = {}
        #: va -> {"size", "handle", "access": set of devices}
        self.mappings: dict[int, dict[str, Any]] = {}

    # -- test controls ------------------------------------------------------------------------
    @property
    def calls(self) -> dict[str, int]:
        """How many times each operation was called (failed calls included)."""
        return dict(self._faults.calls)

    def inject_failure(self, op: str, nth: int = 1) -> None:
        """Make the ``nth`` next call of ``op`` (an :data:`OPERATIONS` name) raise InjectedFault."""
        self._faults.arm(op, nth)

    def is_mapped(self, va: int) -> bool:
        """Is the byte at ``va`` backed by a mapping?"""
        return self._mapping_at(va) is not None

    def is_accessible(self, va: int, device: int = 0) -> bool:
        m = self._mapping_at(va)
        return m is not None and device in self.mappings[m]["access"]

    def leaks(self) -> dict[str, int]:
        """What is still held: reservations, handles, mappings (all zero after a clean close)."""
        return {"reservations": len(self.reservations), "handles": len(self.handles),
                "mappings": len(self.mappings)}

    # -- helpers ------------------------------------------------------------------------------
    def _fail(self, call: str, detail: str) -> None:
        raise VmmDriverError(call, "CUDA_ERROR_INVALID_VALUE", detail)

    def _aligned(self, call: str, **values: int) -> None:
        for name, v in values.items():
            if v <= 0 and name == "size":
                self._fail(call, f"size must be positive, got {v}")
            if v % self._gran:
                self._fail(call, f"{name}={v:#x} is not a multiple of the granularity {self._gran:#x}")

    def _device(self, call: str, device: int) -> None:
        if not isinstance(device, int) or not 0 <= device < self.num_devices:
            raise VmmDriverError(call, "CUDA_ERROR_INVALID_DEVICE", f"device {device!r}")

    def _reservation_of(self, va: int, size: int) -> int | None:
        for base, rsize in self.reservations.items():
            if base <= va and va + size <= base + rsize:
                return base
        return None

    def _mapping_at(self, va: int) -> int | None:
        for base, m in self.mappings.items():
            if base <= va < base + m["size"]:
                return base
        return None

    def _overlaps(self, va: int, size: int) -> bool:
        return any(base < va + size and va < base + m["size"] for base, m in self.mappings.items())

    # -- the protocol -------------------------------------------------------------------------
    def granularity(self, device: int = 0) -> int:
        self._faults.tick("granularity")
        self._device("cuMemGetAllocationGranularity", device)
        return self._gran

    def reserve_va(self, size: int, alignment: int = 0) -> int:
        self._faults.tick("reserve_va")
        self._aligned("cuMemAddressReserve", size=size)
        align = max(alignment, self._gran)
        va = round_up(self._next_va, align)
        self._next_va = va + size
        self.reservations[va] = size
        return va

    def free_va(self, va: int, size: int) -> None:
        self._faults.tick("free_va")
        if self.reservations.get(va) != size:
            self._fail("cuMemAddressFree", f"no reservation of {size} bytes at {va:#x}")
        if self._overlaps(va, size):
            self._fail("cuMemAddressFree", f"reservation at {va:#x} still has mappings")
        del self.reservations[va]

    def create_handle(self, size: int, device: int = 0) -> int:
        self._faults.tick("create_handle")
        self._aligned("cuMemCreate", size=size)
        self._device("cuMemCreate", device)
        h = self._next_handle
        self._next_handle += 1
        self.handles[h] = (size, device)
        return h

    def release_handle(self, handle: int) -> None:
        self._faults.tick("release_handle")
        if handle not in self.handles:
            self._fail("cuMemRelease", f"unknown handle {handle!r}")
        if any(m["handle"] == handle for m in self.mappings.values()):
            self._fail("cuMemRelease", f"handle {handle} is still mapped (the fake is strict here)")
        del self.handles[handle]

    def map(self, va: int, size: int, handle: int) -> None:
        self._faults.tick("map")
        self._aligned("cuMemMap", size=size, va=va)
        if handle not in self.handles:
            self._fail("cuMemMap", f"unknown handle {handle!r}")
        if self.handles[handle][0] != size:
            self._fail("cuMemMap", f"size {size} != handle size {self.handles[handle][0]}")
        if self._reservation_of(va, size) is None:
            self._fail("cuMemMap", f"[{va:#x}, +{size:#x}) is not inside a reservation")
        if self._overlaps(va, size):
            self._fail("cuMemMap", f"[{va:#x}, +{size:#x}) overlaps an existing mapping")
        self.mappings[va] = {"size": size, "handle": handle, "access": set()}

    def unmap(self, va: int, size: int) -> None:
        self._faults.tick("unmap")
        m = self.mappings.get(va)
        if m is None or m["size"] != size:
            self._fail("cuMemUnmap", f"no mapping of exactly {size} bytes at {va:#x}")
        del self.mappings[va]

    def set_access(self, va: int, size: int, device: int = 0) -> None:
        self._faults.tick("set_access")
        self._device("cuMemSetAccess", device)
        covered, pos = [], va
        while pos < va + size:
            base = self._mapping_at(pos)
            if base is None:
                self._fail("cuMemSetAccess", f"{pos:#x} in [{va:#x}, +{size:#x}) is not mapped")
            covered.append(base)
            pos = base + self.mappings[base]["size"]
        for base in covered:
            self.mappings[base]["access"].add(device)


class FaultInjectingDriver:
    """Wraps any driver; ``inject_failure(op, nth)`` makes its nth next ``op`` call raise first.

    For GPU tests: the real driver's state stays exactly what the wrapped calls made it.
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self._faults = _FaultPlan()

    @property
    def calls(self) -> dict[str, int]:
        return dict(self._faults.calls)

    def inject_failure(self, op: str, nth: int = 1) -> None:
        self._faults.arm(op, nth)

    def __getattr__(self, name: str) -> Any:  # is_mapped, context, close, ...
        return getattr(self.inner, name)


def _forward(op: str):
    """A method of :class:`FaultInjectingDriver`: count (and maybe fail) the call, then delegate."""
    def call(self, *args: Any) -> Any:
        self._faults.tick(op)
        return getattr(self.inner, op)(*args)

    call.__name__ = op
    return call


for _op in OPERATIONS:  # real class attributes: runtime_checkable Protocols look them up statically
    setattr(FaultInjectingDriver, _op, _forward(_op))
