"""Synthetic request trace (determinism, distribution) and KV fragmentation arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lib.chapters.vmm.trace import (
    DEFAULT_BLOCK_TOKENS,
    DEFAULT_CHUNK_BYTES,
    fragmentation_rows,
    kv_bytes_per_token,
    max_reservation,
    paged_allocation,
    sequence_lengths,
    synthetic_trace,
    trace_rows,
    trace_summary,
    vmm_allocation,
)

# -- the trace -----------------------------------------------------------------------------------


def test_same_seed_same_trace():
    assert synthetic_trace(200, seed=7) == synthetic_trace(200, seed=7)
    assert synthetic_trace(200, seed=7) != synthetic_trace(200, seed=8)


def test_distribution_matches_the_documented_defaults():
    s = trace_summary(synthetic_trace(20_000, seed=1))
    z = 1.2815515655446004  # the standard normal's 90th percentile
    assert s["prompt_median"] == pytest.approx(512, rel=0.04)
    assert s["prompt_mean"] == pytest.approx(512 * math.exp(0.5), rel=0.05)
    assert s["prompt_p10"] == pytest.approx(512 * math.exp(-z), rel=0.05)
    assert s["prompt_p90"] == pytest.approx(512 * math.exp(z), rel=0.05)
    assert s["output_mean"] == pytest.approx(256, rel=0.04)
    # geometric: median is about ln 2 x mean
    assert s["output_median"] == pytest.approx(256 * math.log(2), rel=0.06)
    assert s["arrival_rate"] == pytest.approx(10.0, rel=0.04)
    assert s["total_mean"] == pytest.approx(s["prompt_mean"] + s["output_mean"])


def test_parameters_move_the_distribution():
    s = trace_summary(synthetic_trace(5000, seed=2, prompt_median=2048, output_mean=32, arrival_rate=100))
    assert s["prompt_median"] == pytest.approx(2048, rel=0.06)
    assert s["output_mean"] == pytest.approx(32, rel=0.06)
    assert s["arrival_rate"] == pytest.approx(100, rel=0.06)


def test_clipping_and_order():
    tr = synthetic_trace(5000, seed=3, prompt_sigma=4.0, output_max=8)
    prompts = np.array([r.prompt_tokens for r in tr])
    outputs = np.array([r.output_tokens for r in tr])
    assert prompts.min() == 16 and prompts.max() == 32768  # a wide sigma hits both bounds
    assert outputs.min() >= 1 and outputs.max() == 8 and (outputs == 8).mean() > 0.9
    arrivals = np.array([r.arrival_s for r in tr])
    assert (np.diff(arrivals) > 0).all() and arrivals[0] > 0
    assert [r.request_id for r in tr] == list(range(5000))


def test_trace_rows_are_tidy():
    rows = trace_rows(synthetic_trace(3, seed=0))
    assert len(rows) == 3
    assert set(rows[0]) == {"request_id", "arrival_s", "prompt_tokens", "output_tokens", "total_tokens"}
    assert all(r["total_tokens"] == r["prompt_tokens"] + r["output_tokens"] for r in rows)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_requests=0), "num_requests"),
    (dict(num_requests=2.5), "num_requests"),
    (dict(seed=-1), "seed"),
    (dict(prompt_sigma=0), "prompt_sigma"),
    (dict(prompt_median=float("nan")), "prompt_median"),
    (dict(prompt_min=100, prompt_max=50, prompt_median=60), "prompt_min"),
    (dict(prompt_median=8), r"prompt_median .* must lie"),
    (dict(output_mean=0.5), "output_mean"),
    (dict(output_max=0), "output_max"),
    (dict(arrival_rate=-1), "arrival_rate"),
])
def test_trace_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_trace(**{"num_requests": 10, **kwargs})


def test_sequence_lengths_progress():
    tr = synthetic_trace(50, seed=4)
    assert sequence_lengths(tr) == [r.total_tokens for r in tr]
    assert sequence_lengths(tr, 0) == [r.prompt_tokens for r in tr]
    assert sequence_lengths(tr, 0.5) == [r.prompt_tokens + r.output_tokens // 2 for r in tr]
    for bad in (1.5, -0.1, "half", None):
        with pytest.raises(ValueError, match="fraction"):
            sequence_lengths(tr, bad)
    with pytest.raises(ValueError, match="empty"):
        trace_summary([])


def test_kv_bytes_per_token():
    assert kv_bytes_per_token(32, 8, 128) == 2 * 32 * 8 * 128 * 2  # Llama-3-8B-like, fp16: 128 KiB
    assert kv_bytes_per_token(1, 1, 64, dtype_bytes=1) == 128
    with pytest.raises(ValueError, match="num_kv_heads"):
        kv_bytes_per_token(32, 0, 128)


# -- fragmentation, checked by hand on lengths [1, 16, 17] at 2 bytes per token (68 bytes used) ----

LENGTHS = [1, 16, 17]


@pytest.mark.parametrize("block, allocated, blocks", [(1, 68, 34), (16, 128, 4), (32, 192, 3), (256, 1536, 3)])
def test_paged_by_hand(block, allocated, blocks):
    row = paged_allocation(LENGTHS, block, 2)
    assert row["scheme"] == "paged" and row["block_tokens"] == block
    assert row["used_bytes"] == 68
    assert row["allocated_bytes"] == allocated
    assert row["wasted_bytes"] == allocated - 68
    assert row["waste_fraction"] == pytest.approx((allocated - 68) / allocated)
    assert row["metadata_bytes"] == 4 * blocks
    assert row["granule_bytes"] == 2 * block


@pytest.mark.parametrize("chunk, allocated", [(2, 68), (32, 128), (64, 192), (100, 300)])
def test_vmm_by_hand(chunk, allocated):
    row = vmm_allocation(LENGTHS, chunk, 2)  # 2, 32 and 34 bytes per sequence
    assert row["scheme"] == "vmm" and row["chunk_bytes"] == chunk == row["granule_bytes"]
    assert row["allocated_bytes"] == allocated and row["wasted_bytes"] == allocated - 68
    assert row["metadata_bytes"] == 0


def test_max_reservation_by_hand():
    row = max_reservation(LENGTHS, 2)
    assert row["max_tokens"] == 17 and row["allocated_bytes"] == 3 * 17 * 2 and row["wasted_bytes"] == 34
    assert max_reservation(LENGTHS, 2, max_tokens=32)["wasted_bytes"] == 3 * 64 - 68
    with pytest.raises(ValueError, match="shorter than the longest"):
        max_reservation(LENGTHS, 2, max_tokens=16)


def test_paged_and_vmm_agree_when_the_granule_is_the_same():
    lengths = synthetic_trace(300, seed=5)
    L = sequence_lengths(lengths)
    for b in DEFAULT_BLOCK_TOKENS:
        p, v = paged_allocation(L, b, 6), vmm_allocation(L, b * 6, 6)
        assert p["allocated_bytes"] == v["allocated_bytes"]
        assert 0 <= p["wasted_bytes"] < len(L) * b * 6  # less than one granule per sequence


def test_fragmentation_rows():
    L = sequence_lengths(synthetic_trace(500, seed=6))
    bpt = kv_bytes_per_token(32, 8, 128)
    rows = fragmentation_rows(L, bpt)
    assert len(rows) == len(DEFAULT_BLOCK_TOKENS) + len(DEFAULT_CHUNK_BYTES) + 1
    assert len({tuple(sorted(r)) for r in rows}) == 1  # one schema for every row
    assert [r["scheme"] for r in rows].count("max_reservation") == 1
    used = {r["used_bytes"] for r in rows}
    assert used == {sum(L) * bpt}
    paged = [r["wasted_bytes"] for r in rows if r["scheme"] == "paged"]
    assert paged == sorted(paged) and paged[0] == 0  # waste grows with block size; none at 1
    vmm = [r for r in rows if r["scheme"] == "vmm"]
    assert [r["wasted_bytes"] for r in vmm] == sorted(r["wasted_bytes"] for r in vmm)
    maxres = rows[-1]
    assert maxres["wasted_bytes"] > max(paged)  # the baseline paging was invented to beat
    only_paged = fragmentation_rows(L, bpt, block_tokens=[16], chunk_bytes=[])
    assert [r["scheme"] for r in only_paged] == ["paged", "max_reservation"]


@pytest.mark.parametrize("call, match", [
    (lambda: paged_allocation([], 16, 2), "empty"),
    (lambda: paged_allocation([4, 0], 16, 2), "positive"),
    (lambda: paged_allocation([4, True], 16, 2), "positive"),
    (lambda: paged_allocation([4, 2.5], 16, 2), "positive"),
    (lambda: paged_allocation([4], 0, 2), "block_tokens"),
    (lambda: paged_allocation([4], 257, 2), r"block_tokens must be in \[1, 256\]"),
    (lambda: paged_allocation([4], 16, 0), "bytes_per_token"),
    (lambda: vmm_allocation([4], 0, 2), "chunk_bytes"),
    (lambda: vmm_allocation([4], 64, -2), "bytes_per_token"),
    (lambda: max_reservation([4], 2, max_tokens=0), "max_tokens"),
    (lambda: fragmentation_rows([4], 2, block_tokens=[], chunk_bytes=[]), "at least one"),
])
def test_fragmentation_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call()
