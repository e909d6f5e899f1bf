"""The primer's first principles: address arithmetic, the eviction simulation and rate arithmetic."""

import math

import pytest

from lib.chapters.primer import concepts as C


def test_offsets_and_translations():
    assert [C.offset_bits(b) for _, b, _ in C.PAGE_SIZES] == [12, 16, 21]
    assert C.split_address((5 << 21) + 7, 2 * C.MiB) == (5, 7)
    assert C.pages_to_map(C.GiB, 2 * C.MiB) == 512 and C.pages_to_map(C.GiB + 1, 2 * C.MiB) == 513
    assert C.pages_to_map(0, 4 * C.KiB) == 0
    with pytest.raises(ValueError, match="power of two"):
        C.offset_bits(3000)
    with pytest.raises(ValueError):
        C.split_address(-1, 4096)
    t = C.page_size_table(C.GiB)
    assert list(t["offset bits"]) == [12, 16, 21] and "pages to map 1 GiB" in t.columns
    assert C.size_label(79.2 * C.GiB) == "79.2 GiB" and C.size_label(64 * C.KiB) == "64 KiB"


def test_lru_thrashes_a_cyclic_scan_and_keeping_a_set_does_not():
    assert C.scan_misses(90, 100, policy="lru") == 0.0  # it fits: no misses after the first pass
    assert C.scan_misses(101, 100, policy="lru") == 1.0  # one page too many: every read misses
    keep = C.scan_misses(150, 100, policy="keep")
    assert keep == pytest.approx((150 - 99) / 150)
    rnd = C.scan_misses(150, 100, policy="random", seed=1)
    assert keep < rnd < 1.0
    with pytest.raises(ValueError, match="policy"):
        C.scan_misses(10, 5, policy="fifo")
    curve = C.miss_curve([0.5, 1.5], capacity=50)
    assert set(curve["policy"]) == set(C.POLICIES) and len(curve) == 2 * len(C.POLICIES)


def test_rates_into_costs():
    assert C.pass_slowdown(0.0, 3000, 7.5) == 1.0
    assert C.pass_slowdown(1.0, 3000, 7.5) == pytest.approx(400.0)
    assert math.isnan(C.pass_slowdown(1.0, 0, 7.5))
    assert C.fault_overhead_us(1e9, 10, 50) == pytest.approx(1e6 * (0.1 - 0.02))
    # prefetch at P, remote reads at R, device at D: 1/P + r/D = r/R
    r = C.prefetch_break_even(50, 50, 3000)
    assert 1 / 50 + r / 3000 == pytest.approx(r / 50)
    assert C.prefetch_break_even(50, 3000, 3000) == math.inf
    assert C.host_byte_cost(3000, 50) == 60 and C.doubling_fraction(61) == pytest.approx(1 / 60)


def test_platform_table_names_every_platform_once():
    t = C.platform_table()
    assert t["platform"].is_unique and len(t) >= 6
    assert any("HMM" in p for p in t["platform"]) and any("Grace" in p for p in t["platform"])
