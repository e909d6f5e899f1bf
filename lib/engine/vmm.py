"""A contiguous KV region backed on demand by physical chunks: CUDA virtual memory (the vAttention idea).

PagedAttention makes the *kernel* translate addresses through ``block_tables``; the CUDA
virtual-memory driver API lets the *GPU's page table* do it instead: reserve one large VA range,
give every sequence a fixed slot of it, and back each slot with physical memory only as far as
the sequence has grown. A kernel reads block ``seq_start[s] + j`` from one base pointer, while
physical memory is still handed out in chunks, not maximum-length reservations.

:class:`VmmDriver` is the driver protocol (:class:`CudaVmmDriver` is the real one, through
cuda-python; the CPU tests' fakes live in ``tests/fakes_vmm.py``). :class:`KVArena` splits one
reservation into slots whose chunks :meth:`~KVArena.grow` maps and :meth:`~KVArena.release`
unmaps onto a free list that later growth reuses; a failed growth is rolled back.
:func:`cupy_view` wraps a mapped range; :class:`SplitMapping` / :func:`split_allocator` put
pinned host memory first and device memory after in one range (the KV offload chapter's pool).

``chunk_bytes`` must be a multiple of the allocation granularity (2 MiB on H100/H200), the VMM
analogue of the block size: a sequence wastes at most one partly filled chunk. Reused chunks are
not cleared (like a freed paged-cache block, they hold the previous sequence's bytes).
cuda-python and CuPy are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np


class VmmDriverError(RuntimeError):
    """A virtual-memory driver call failed; ``call`` names it, ``code`` is the driver's error name."""

    def __init__(self, call: str, code: str, detail: str = ""):
        self.call = call
        self.code = code
        msg = f"{call} failed: {code}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


@runtime_checkable
class VmmDriver(Protocol):
    """What :class:`KVArena` needs from a virtual-memory driver. Addresses are ints; handles opaque."""

    def granularity(self, device: int) -> int:
        """Minimum mapping granularity (bytes) for physical memory on ``device``."""

    def reserve_va(self, size: int, alignment: int = 0) -> int:
        """Reserve ``size`` bytes of virtual addresses (no memory behind them); return the base."""

    def free_va(self, va: int, size: int) -> None:
        """Give back a whole reservation (everything in it must be unmapped first)."""

    def create_handle(self, size: int, device: int) -> Any:
        """Create ``size`` bytes of physical memory on ``device``; return its handle."""

    def release_handle(self, handle: Any) -> None:
        """Release a physical allocation (it must no longer be mapped)."""

    def map(self, va: int, size: int, handle: Any) -> None:
        """Map the whole of ``handle`` (offset 0, ``size`` bytes) at ``va`` inside a reservation."""

    def unmap(self, va: int, size: int) -> None:
        """Unmap exactly one earlier :meth:`map` (CUDA cannot unmap part of a mapping)."""

    def set_access(self, va: int, size: int, device: int) -> None:
        """Let ``device`` read and write a fully mapped range (needed after every map)."""


def round_up(nbytes: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``nbytes``."""
    _check_int("multiple", multiple, minimum=1)
    _check_int("nbytes", nbytes, minimum=0)
    return -(-nbytes // multiple) * multiple


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# The real driver through cuda-python


def _driver_module():
    """``cuda.bindings.driver`` (cuda-bindings >= 12.6), else ``cuda.cuda`` (older cuda-python)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
        except ImportError as exc:
            raise ImportError(
                "CudaVmmDriver needs NVIDIA's cuda-python driver bindings: pip install cuda-bindings "
                "(or '.[gpu]')"
            ) from exc
    return driver


def cuda_python_available() -> bool:
    """True when cuda-python's driver bindings import (says nothing about a GPU being present)."""
    try:
        _driver_module()
    except ImportError:
        return False
    return True


def _error_name(drv: Any, err: Any) -> str:
    """``CUDA_ERROR_...`` for a CUresult: the enum's own name, else the driver's, else the number."""
    name = getattr(err, "name", None)
    if name:
        return str(name)
    try:
        res = drv.cuGetErrorName(err)
        if res[0] == drv.CUresult.CUDA_SUCCESS:
            return res[1].decode() if isinstance(res[1], bytes) else str(res[1])
    except Exception:
        pass
    return str(err)


def _checked(drv: Any, call: str, result: Any) -> Any:
    """Raise :class:`VmmDriverError` unless a binding's ``(CUresult, *values)`` is a success."""
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != drv.CUresult.CUDA_SUCCESS:
        raise VmmDriverError(call, _error_name(drv, err))
    if not values:
        return None
    return values[0] if len(values) == 1 else values


class CudaVmmDriver:
    """The VMM driver API through cuda-python, bound to one device's *primary context*.

    It retains the primary context (the one the runtime, so CuPy and torch, uses) and makes it
    current around every call, restoring the caller's afterwards, so mapped memory is usable by
    CuPy kernels on that device. :meth:`close` releases the context: close arenas first. Every
    ``CUresult`` is checked: a failure raises :class:`VmmDriverError` naming the call and error.
    """

    def __init__(self, device: int = 0):
        _check_int("device", device, minimum=0)
        self.device = device
        self._drv = drv = _driver_module()
        try:
            res = drv.cuInit(0)
        except RuntimeError as exc:  # the bindings could not load libcuda at all
            raise VmmDriverError("cuInit", "NO_DRIVER", str(exc)) from exc
        _checked(drv, "cuInit", res)
        self._cudev = _checked(drv, "cuDeviceGet", drv.cuDeviceGet(device))
        self.context = _checked(drv, "cuDevicePrimaryCtxRetain", drv.cuDevicePrimaryCtxRetain(self._cudev))
        self._closed = False

    @contextlib.contextmanager
    def _current(self) -> Iterator[None]:
        drv = self._drv
        prev = _checked(drv, "cuCtxGetCurrent", drv.cuCtxGetCurrent())
        switch = (0 if prev is None else int(prev)) != int(self.context)
        if switch:
            _checked(drv, "cuCtxSetCurrent", drv.cuCtxSetCurrent(self.context))
        try:
            yield
        finally:
            if switch:
                _checked(drv, "cuCtxSetCurrent", drv.cuCtxSetCurrent(prev))

    def _call(self, name: str, *args: Any) -> Any:
        if self._closed:
            raise RuntimeError("CudaVmmDriver is closed")
        with self._current():
            return _checked(self._drv, name, getattr(self._drv, name)(*args))

    def _prop(self, device: int) -> Any:
        drv = self._drv
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        return prop

    # -- the protocol -------------------------------------------------------------------------
    def granularity(self, device: int | None = None, *, recommended: bool = False) -> int:
        flags = self._drv.CUmemAllocationGranularity_flags
        option = (flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED if recommended
                  else flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)
        dev = self.device if device is None else device
        return int(self._call("cuMemGetAllocationGranularity", self._prop(dev), option))

    def reserve_va(self, size: int, alignment: int = 0) -> int:
        return int(self._call("cuMemAddressReserve", size, alignment, 0, 0))

    def free_va(self, va: int, size: int) -> None:
        self._call("cuMemAddressFree", va, size)

    def create_handle(self, size: int, device: int | None = None) -> Any:
        dev = self.device if device is None else device
        return self._call("cuMemCreate", size, self._prop(dev), 0)

    def release_handle(self, handle: Any) -> None:
        self._call("cuMemRelease", handle)

    def map(self, va: int, size: int, handle: Any) -> None:
        self._call("cuMemMap", va, size, 0, handle, 0)

    def unmap(self, va: int, size: int) -> None:
        self._call("cuMemUnmap", va, size)

    def set_access(self, va: int, size: int, device: int | None = None) -> None:
        drv = self._drv
        desc = drv.CUmemAccessDesc()
        desc.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = self.device if device is None else device
        desc.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._call("cuMemSetAccess", va, size, [desc], 1)

    # -- host-located physical memory (for SplitMapping) -------------------------------------
    #: Host locations cuMemCreate may accept, tried in this order: the host NUMA node nearest the
    #: GPU (drivers for CUDA >= 12.2), then "any host memory" (newer drivers).
    HOST_LOCATIONS = ("host_numa", "host")

    def _host_prop(self, location: str) -> Any:
        drv = self._drv
        kinds = drv.CUmemLocationType
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        if location == "host_numa":
            prop.location.type = kinds.CU_MEM_LOCATION_TYPE_HOST_NUMA
            attr = drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID
            numa = int(self._call("cuDeviceGetAttribute", attr, self._cudev))
            prop.location.id = max(numa, 0)  # -1: no NUMA; the API then wants id 0
        elif location == "host":
            prop.location.type = kinds.CU_MEM_LOCATION_TYPE_HOST
            prop.location.id = 0
        else:
            raise ValueError(f"host location must be one of {self.HOST_LOCATIONS}, got {location!r}")
        return prop

    def host_location(self) -> str:
        """The host location this driver backs ``cuMemMap`` with ('host_numa' or 'host'), probed
        once with one allocation of each kind; :class:`VmmDriverError` naming every failure when
        none works (old driver or bindings)."""
        found = getattr(self, "_host_found", None)
        if found is not None:
            return found[0]
        option = self._drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        errors = []
        for loc in self.HOST_LOCATIONS:
            try:
                prop = self._host_prop(loc)
                gran = int(self._call("cuMemGetAllocationGranularity", prop, option))
                handle = self._call("cuMemCreate", gran, prop, 0)
                self._call("cuMemRelease", handle)
            except (VmmDriverError, AttributeError) as exc:  # AttributeError: bindings too old
                errors.append(f"{loc}: {exc}")
                continue
            self._host_found = (loc, gran)
            return loc
        raise VmmDriverError("cuMemCreate", "HOST_LOCATION_UNSUPPORTED",
                             "no host location works for cuMemCreate here (" + "; ".join(errors) + ")")

    def host_granularity(self) -> int:
        """Minimum granularity (bytes) of host-located physical memory (see :meth:`host_location`)."""
        self.host_location()
        return self._host_found[1]

    def create_host_handle(self, size: int) -> Any:
        """``size`` bytes of pinned *host* memory as a handle :meth:`map` can map (the GPU reads it
        over the bus once :meth:`set_access` grants it)."""
        return self._call("cuMemCreate", size, self._host_prop(self.host_location()), 0)

    # -- diagnostics --------------------------------------------------------------------------
    def is_mapped(self, va: int) -> bool:
        """Does the driver have physical memory mapped at ``va``? Any error of
        ``cuMemRetainAllocationHandle`` counts as "not mapped"; tests pair it with positive checks."""
        drv = self._drv
        with self._current():
            res = drv.cuMemRetainAllocationHandle(va)
        if res[0] != drv.CUresult.CUDA_SUCCESS:
            return False
        self._call("cuMemRelease", res[1])  # the query took a reference
        return True

    def close(self) -> None:
        """Release the retained primary context (the runtime keeps its own reference)."""
        if not self._closed:
            self._closed = True
            _checked(self._drv, "cuDevicePrimaryCtxRelease", self._drv.cuDevicePrimaryCtxRelease(self._cudev))

    def __enter__(self) -> "CudaVmmDriver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The arena


class KVArena:
    """One VA reservation of ``num_slots`` equal slots, physical chunks mapped on demand.

    A slot's mapped part is always a prefix of whole chunks. *Used* bytes are what :meth:`grow`
    was asked for (the largest request since the slot's last release), *mapped* bytes whole
    chunks, internal waste = mapped - used; physical bytes also count chunks parked on the free
    list (held, not mapped).
    """

    def __init__(self, driver: Any, num_slots: int, slot_bytes: int, chunk_bytes: int, *, device: int = 0):
        _check_int("num_slots", num_slots, minimum=1)
        _check_int("slot_bytes", slot_bytes, minimum=1)
        _check_int("chunk_bytes", chunk_bytes, minimum=1)
        _check_int("device", device, minimum=0)
        gran = int(driver.granularity(device))
        if chunk_bytes % gran:
            raise ValueError(
                f"chunk_bytes={chunk_bytes} must be a positive multiple of the driver's allocation "
                f"granularity ({gran} bytes); try {round_up(chunk_bytes, gran)}"
            )
        if slot_bytes % chunk_bytes:
            raise ValueError(
                f"slot_bytes={slot_bytes} must be a multiple of chunk_bytes={chunk_bytes}; "
                f"try {round_up(slot_bytes, chunk_bytes)}"
            )
        self.driver = driver
        self.device = device
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.chunk_bytes = chunk_bytes
        self.granularity = gran
        self.reserved_bytes = num_slots * slot_bytes
        self.base = int(driver.reserve_va(self.reserved_bytes, 0))
        self._chunks: list[list[Any]] = [[] for _ in range(num_slots)]  # handles, in VA order
        self._used = [0] * num_slots
        self._free: list[Any] = []
        self._closed = False
        self._counts = {"handles_created": 0, "handles_reused": 0, "handles_released": 0,
                        "grow_calls": 0, "failed_grows": 0, "release_calls": 0,
                        "chunks_mapped": 0, "chunks_unmapped": 0}

    # -- addresses ----------------------------------------------------------------------------
    @property
    def chunks_per_slot(self) -> int:
        return self.slot_bytes // self.chunk_bytes

    def _slot(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be an int in [0, {self.num_slots}), got {slot!r}")
        return slot

    def _open(self) -> None:
        if self._closed:
            raise RuntimeError("KVArena is closed")

    def slot_offset(self, slot: int) -> int:
        """Byte offset of ``slot`` from :attr:`base`."""
        return self._slot(slot) * self.slot_bytes

    def slot_address(self, slot: int) -> int:
        return self.base + self.slot_offset(slot)

    def mapped_bytes(self, slot: int) -> int:
        return len(self._chunks[self._slot(slot)]) * self.chunk_bytes

    def used_bytes(self, slot: int) -> int:
        return self._used[self._slot(slot)]

    @property
    def total_mapped_bytes(self) -> int:
        return sum(len(c) for c in self._chunks) * self.chunk_bytes

    @property
    def total_used_bytes(self) -> int:
        return sum(self._used)

    @property
    def free_chunks(self) -> int:
        return len(self._free)

    # -- growth and release -------------------------------------------------------------------
    def grow(self, slot: int, nbytes: int) -> int:
        """Map chunks (free list first, else new) until ``slot``'s mapped prefix covers ``nbytes``;
        return how many were mapped. If a driver call fails, this call's chunks are unmapped and
        given back and the error re-raised: the arena is as before."""
        self._open()
        s = self._slot(slot)
        _check_int("nbytes", nbytes, minimum=0)
        if nbytes > self.slot_bytes:
            raise ValueError(
                f"slot {s} cannot hold {nbytes} bytes: each slot reserves {self.slot_bytes} bytes "
                f"({self.chunks_per_slot} chunks of {self.chunk_bytes})"
            )
        self._counts["grow_calls"] += 1
        have = len(self._chunks[s])
        want = -(-nbytes // self.chunk_bytes)
        start = self.slot_address(s) + have * self.chunk_bytes
        done: list[tuple[Any, bool]] = []  # (handle, fresh) per chunk mapped by this call
        try:
            for i in range(want - have):
                fresh = not self._free
                handle = self.driver.create_handle(self.chunk_bytes, self.device) if fresh else self._free.pop()
                try:
                    self.driver.map(start + i * self.chunk_bytes, self.chunk_bytes, handle)
                except BaseException as err:
                    self._give_back(handle, fresh, err)
                    raise
                done.append((handle, fresh))
            if done:
                self.driver.set_access(start, len(done) * self.chunk_bytes, self.device)
        except BaseException as err:
            self._counts["failed_grows"] += 1
            self._roll_back(s, start, done, err)
            raise
        self._chunks[s].extend(h for h, _ in done)
        fresh_count = sum(f for _, f in done)
        self._counts["handles_created"] += fresh_count
        self._counts["handles_reused"] += len(done) - fresh_count
        self._counts["chunks_mapped"] += len(done)
        self._used[s] = max(self._used[s], nbytes)
        return len(done)

    def _give_back(self, handle: Any, fresh: bool, err: BaseException) -> None:
        """Undo taking an unmapped ``handle``: release it if this grow created it, else park it again
        (also when the release fails, with a note on ``err``: close() releases it later)."""
        if fresh:
            try:
                self.driver.release_handle(handle)
                return
            except Exception as undo_err:
                self._counts["handles_created"] += 1
                _add_note(err, f"roll-back could not release a new handle ({undo_err}); parked it")
        self._free.append(handle)

    def _roll_back(self, s: int, start: int, done: list[tuple[Any, bool]], err: BaseException) -> None:
        """Unmap, newest first, what a failed grow mapped. If an unmap fails too, the chunks still
        mapped stay recorded in the slot (a prefix: release/close unmap them), noted on ``err``."""
        for i in range(len(done) - 1, -1, -1):
            handle, fresh = done[i]
            try:
                self.driver.unmap(start + i * self.chunk_bytes, self.chunk_bytes)
            except Exception as undo_err:
                kept = done[: i + 1]
                self._chunks[s].extend(h for h, _ in kept)
                self._counts["handles_created"] += sum(f for _, f in kept)
                self._counts["handles_reused"] += sum(not f for _, f in kept)
                self._counts["chunks_mapped"] += len(kept)
                _add_note(err, f"roll-back stopped: unmapping chunk {i} failed ({undo_err}); "
                               f"{len(kept)} chunk(s) stay mapped in slot {s}")
                return
            self._give_back(handle, fresh, err)

    def release(self, slot: int) -> int:
        """Unmap all of ``slot``'s chunks onto the free list (memory stays allocated); return their count.

        Last-to-first onto a LIFO list: a slot released and regrown gets the same chunks back.
        """
        self._open()
        s = self._slot(slot)
        self._counts["release_calls"] += 1
        chunks = self._chunks[s]
        n = 0
        while chunks:
            va = self.slot_address(s) + (len(chunks) - 1) * self.chunk_bytes
            self.driver.unmap(va, self.chunk_bytes)
            self._free.append(chunks.pop())
            self._counts["chunks_unmapped"] += 1
            n += 1
        self._used[s] = 0
        return n

    def trim(self, keep: int = 0) -> int:
        """Release free-list chunks back to the driver, keeping ``keep``; return how many were released."""
        self._open()
        _check_int("keep", keep, minimum=0)
        n = 0
        while len(self._free) > keep:
            self.driver.release_handle(self._free[-1])
            self._free.pop()
            self._counts["handles_released"] += 1
            n += 1
        return n

    def close(self) -> None:
        """Unmap every slot, release every handle, free the reservation (idempotent); carries on past
        failures so as much as possible is given back, then raises the first."""
        if self._closed:
            return
        errors: list[BaseException] = []
        for s in range(self.num_slots):
            try:
                self.release(s)
            except Exception as e:
                errors.append(e)
        while self._free:
            handle = self._free.pop()
            try:
                self.driver.release_handle(handle)
                self._counts["handles_released"] += 1
            except Exception as e:
                errors.append(e)
        if not any(self._chunks):
            try:
                self.driver.free_va(self.base, self.reserved_bytes)
            except Exception as e:
                errors.append(e)
        self._closed = True
        if errors:
            first = errors[0]
            for e in errors[1:]:
                _add_note(first, f"also failed during close: {e}")
            raise first

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "KVArena":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- accounting ---------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Everything countable about the arena now, as one flat dict of ints."""
        mapped = self.total_mapped_bytes
        used = self.total_used_bytes
        live = self._counts["handles_created"] - self._counts["handles_released"]
        return {
            "num_slots": self.num_slots,
            "slot_bytes": self.slot_bytes,
            "chunk_bytes": self.chunk_bytes,
            "granularity": self.granularity,
            "reserved_bytes": self.reserved_bytes,
            "mapped_bytes": mapped,
            "used_bytes": used,
            "internal_waste_bytes": mapped - used,
            "mapped_chunks": mapped // self.chunk_bytes,
            "free_chunks": len(self._free),
            "live_handles": live,
            "physical_bytes": live * self.chunk_bytes,
            "active_slots": sum(1 for c in self._chunks if c),
            **self._counts,
        }

    # -- CuPy views ---------------------------------------------------------------------------
    def slot_view(self, slot: int, dtype: Any, shape: tuple[int, ...] | None = None):
        """A CuPy array over ``slot``'s mapped prefix (keeps the arena alive, not its mappings)."""
        self._open()
        nbytes = self.mapped_bytes(slot)
        if nbytes == 0:
            raise ValueError(f"slot {slot} has nothing mapped; grow it first")
        return cupy_view(self.slot_address(slot), nbytes, dtype, shape, owner=self, device=self.device)

    def full_view(self, dtype: Any, shape: tuple[int, ...] | None = None):
        """A CuPy array over the whole reservation, for kernels that take one base pointer. Only
        mapped parts may be touched: an unmapped address is illegal and ends the CUDA context."""
        self._open()
        return cupy_view(self.base, self.reserved_bytes, dtype, shape, owner=self, device=self.device)


def _add_note(err: BaseException, note: str) -> None:
    if hasattr(err, "add_note"):  # Python 3.11+
        err.add_note(note)


def cupy_view(ptr: int, nbytes: int, dtype: Any, shape: tuple[int, ...] | None = None, *,
              owner: Any = None, device: int = 0):
    """Wrap ``nbytes`` of device memory at ``ptr`` as a ``cupy.ndarray`` (no copy, no ownership);
    ``shape`` defaults to 1-D over all of it, ``owner`` is kept alive by the array."""
    _check_int("ptr", ptr, minimum=1)
    _check_int("nbytes", nbytes, minimum=1)
    dt = np.dtype(dtype)
    if shape is None:
        if nbytes % dt.itemsize:
            raise ValueError(f"nbytes={nbytes} is not a multiple of {dt} itemsize {dt.itemsize}")
        shape = (nbytes // dt.itemsize,)
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    need = math.prod(shape) * dt.itemsize
    if need > nbytes:
        raise ValueError(f"shape {shape} of {dt} needs {need} bytes, only {nbytes} are mapped")
    import cupy

    mem = cupy.cuda.UnownedMemory(ptr, nbytes, owner, device)
    return cupy.ndarray(shape, dt, cupy.cuda.MemoryPointer(mem, 0))


# ---------------------------------------------------------------------------------------------
# A range split between pinned host and device memory (the KV offload chapter's zero-copy pool)


class SplitMapping:
    """One virtual range: pinned host memory for its first ``host_bytes``, device memory after.

    A host-located and a device handle mapped back to back: a kernel given the base pointer reads
    the host part over the bus and the rest from device memory, with no idea which is which.
    Released by :meth:`close` or when garbage-collected; a failed construction undoes itself.
    """

    def __init__(self, driver: Any, host_bytes: int, device_bytes: int, *, device: int = 0):
        for name, v in (("host_bytes", host_bytes), ("device_bytes", device_bytes)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        host_bytes, device_bytes = int(host_bytes), int(device_bytes)
        if host_bytes + device_bytes == 0:
            raise ValueError("a split mapping needs at least one byte")
        gran = int(driver.granularity(device))
        if host_bytes:
            gran = math.lcm(gran, int(driver.host_granularity()))
        for name, v in (("host_bytes", host_bytes), ("device_bytes", device_bytes)):
            if v % gran:
                raise ValueError(f"{name}={v} is not a multiple of the allocation granularity "
                                 f"({gran} bytes)")
        self.driver, self.device = driver, device
        self.host_bytes, self.device_bytes = host_bytes, device_bytes
        self.nbytes = host_bytes + device_bytes
        self.va = int(driver.reserve_va(self.nbytes, 0))
        done: list[tuple[int, int, Any]] = []  # (va, size, handle) mapped so far
        try:
            for offset, size, make in ((0, host_bytes, lambda: driver.create_host_handle(host_bytes)),
                                       (host_bytes, device_bytes,
                                        lambda: driver.create_handle(device_bytes, device))):
                if not size:
                    continue
                handle = make()
                try:
                    driver.map(self.va + offset, size, handle)
                except BaseException:
                    driver.release_handle(handle)
                    raise
                done.append((self.va + offset, size, handle))
                driver.set_access(self.va + offset, size, device)
        except BaseException:
            _unmap_all(driver, self.va, self.nbytes, done)
            raise
        self._finalizer = weakref.finalize(self, _unmap_all, driver, self.va, self.nbytes, done)
        self._finalizer.atexit = False  # the process's exit frees it; CUDA may be shutting down

    def close(self) -> None:
        """Unmap, release and free now (idempotent). Arrays over the range must be gone."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


def _unmap_all(driver, va: int, nbytes: int, done: list) -> None:
    for mva, size, handle in reversed(done):
        driver.unmap(mva, size)
        driver.release_handle(handle)
    done.clear()
    driver.free_va(va, nbytes)


def split_allocator(driver: Any, host_blocks: int, *, device: int = 0) -> Callable:
    """``alloc(shape, dtype)`` for :meth:`lib.engine.backends.DecodeCase`: arrays whose first
    ``host_blocks`` blocks (leading axis) are pinned host memory, the rest device memory."""
    if isinstance(host_blocks, bool) or not isinstance(host_blocks, (int, np.integer)) or host_blocks < 0:
        raise ValueError(f"host_blocks must be an integer >= 0, got {host_blocks!r}")

    def alloc(shape, dtype):
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if not shape or shape[0] < host_blocks or nbytes % shape[0]:
            raise ValueError(f"shape {shape} has fewer than {host_blocks} blocks on its leading axis")
        host = host_blocks * (nbytes // shape[0])
        mapping = SplitMapping(driver, host, nbytes - host, device=device)
        return cupy_view(mapping.va, nbytes, dtype, shape, owner=mapping, device=device)

    return alloc


_DRIVER: dict[int, Any] = {}


def vmm_driver(device: int | None = None):
    """One :class:`CudaVmmDriver` per device for this process (kept open: mappings' finalizers
    use it)."""
    import cupy

    dev = int(cupy.cuda.runtime.getDevice()) if device is None else int(device)
    if dev not in _DRIVER:
        _DRIVER[dev] = CudaVmmDriver(dev)
    return _DRIVER[dev]


def host_memory_unavailable(device: int | None = None) -> str | None:
    """None when pinned host memory can back a VMM mapping here, else why not (one line)."""
    try:
        vmm_driver(device).host_location()
    except Exception as exc:
        return f"pinned host memory for cuMemMap is not available here ({type(exc).__name__}: {exc})"
    return None
