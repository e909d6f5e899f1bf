"""The CuPy examples, on a CPU: they import without CuPy, and the thrashing demo refuses to run
unless asked and never asks for more than a quarter of the free GPU memory (a fake CuPy that
records what was called)."""

import types

import numpy as np
import pytest

from lib.chapters.primer import examples as E


class FakeRuntime:
    def __init__(self, free):
        self.free = free
        self.calls = []

    def memGetInfo(self):
        self.calls.append("memGetInfo")
        return self.free, 2 * self.free


def fake_cupy(free):
    rt = FakeRuntime(free)

    def malloc_managed(n):
        rt.calls.append(("malloc_managed", n))
        raise AssertionError("the demo must not allocate in this test")

    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=rt, malloc_managed=malloc_managed)), rt


def test_the_module_imports_without_cupy_and_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(E, "cp", None)
    with pytest.raises(RuntimeError, match="need CuPy"):
        E.device_facts()


def test_ping_pong_refuses_without_the_opt_in(monkeypatch):
    cp, rt = fake_cupy(free=8 * E.GiB)
    monkeypatch.setattr(E, "cp", cp)
    with pytest.raises(PermissionError, match="i_know_this_thrashes"):
        E.ping_pong(64 * E.MiB)
    assert rt.calls == []  # refused before asking the GPU anything


def test_ping_pong_checks_free_memory_before_allocating(monkeypatch):
    cp, rt = fake_cupy(free=200 * E.MiB)
    monkeypatch.setattr(E, "cp", cp)
    with pytest.raises(MemoryError, match="quarter"):
        E.ping_pong(64 * E.MiB, i_know_this_thrashes=True)  # 64 MiB > 200 / 4 MiB
    assert rt.calls == ["memGetInfo"]


def test_safe_size_cuts_to_a_share_of_free_memory_in_whole_blocks(monkeypatch):
    cp, _ = fake_cupy(free=1000 * E.MiB)
    monkeypatch.setattr(E, "cp", cp)
    assert E.safe_size(256 * E.MiB, 1 / 8) == 124 * E.MiB  # 125 MiB, rounded down to 2 MiB blocks
    assert E.safe_size(8 * E.MiB, 1 / 8) == 8 * E.MiB
    cp, _ = fake_cupy(free=10 * E.MiB)
    monkeypatch.setattr(E, "cp", cp)
    with pytest.raises(MemoryError, match="too little"):
        E.safe_size(256 * E.MiB, 1 / 8)


def test_command_line_thrash_needs_yes(monkeypatch):
    monkeypatch.setattr(E, "tour", lambda nbytes: [])
    with pytest.raises(SystemExit):
        E.main(["--thrash"])


def test_host_view_shares_the_bytes():
    buf = np.arange(8, dtype=np.float32)
    fake = types.SimpleNamespace(nbytes=buf.nbytes, dtype=buf.dtype,
                                 data=types.SimpleNamespace(ptr=buf.ctypes.data))
    view = E.host_view(fake)
    view[3] = -1.0
    assert buf[3] == -1.0 and view.dtype == np.float32 and len(view) == 8
