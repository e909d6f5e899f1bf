"""What the chapters' prose says about the committed data, checked on that data: a new run that
no longer shows it fails here, and the prose is rewritten, instead of the book printing it."""

import pandas as pd

from lib.chapters.kernel import anatomy as A
from lib.chapters.kernel import resources as KR
from lib.chapters.seed import tables as S
from lib.chapters.seed_repro import analysis as SR
from lib.harness import results as R

H100 = "h100-80gb-hbm3"


def test_kernel_vllm_fails_every_fp32_check():
    """kernel.md: vLLM's kernel "fails all" fp32 checks of the correctness matrix."""
    cm = R.load("correctness", H100, expand_extra=True)
    vl32 = cm[(cm["backend"] == "vllm") & (cm["dtype"] == "float32")]
    assert len(vl32) and (~vl32["check_passed"].astype(bool)).all()


def test_kernel_big_spills_are_fp32_head_256():
    """kernel.md: the kernels that spill a kilobyte or more are fp32 kernels with head size 256."""
    res, _ = KR.load()
    big = KR.spilling(res)
    big = big[big["spill_stores"] >= 1024]
    assert len(big) and set(big["dtype"]) == {"float32"} and set(big["head_size"]) == {256}


def test_kernel_capped_kernels_use_at_most_128_registers():
    """kernel.md: kernels capped at 4 blocks per SM use at most 128 registers; the others use more."""
    res, _ = KR.load()
    dec = res[res["kernel"] == "decode"]
    capped = pd.Series([A.min_blocks(t, int(b), int(h), int(g)) == 4 for t, b, h, g in
                        zip(dec["dtype"], dec["block_size"], dec["head_size"], dec["tile"])], index=dec.index)
    assert capped.any() and (~capped).any()
    assert (dec.loc[capped, "registers"] <= 128).all()
    assert (dec.loc[~capped, "registers"] >= 128).all()


def test_seed_repro_headline_findings_hold():
    """seed_repro.md: v1 keeps the small-block slowness under both protocols, today's vLLM does
    not; every one of our 768 rows passed its check."""
    seed, ours = S.load_seed(), SR.load_ours(H100)
    p = SR.block_penalty(SR.times_long(seed, ours))
    at = (p.table == 1) & (p.memory == "device")
    assert (p[at & p.source.str.startswith("v1")]["small_over_ref"] > 3).all()
    assert 0.8 < p[at & (p.source == SR.REFERENCE_LABELS["vllm"])]["small_over_ref"].item() < 1.2
    c = SR.checks(ours)
    assert c["rows"] == c["passed"] == 768


def test_intro_card_claims_hold_on_both_cards():
    """intro.md: resident managed memory reads at device speed and paged == contiguous at MHA
    32 x 4096 on both cards; the host link sets the fault, prefetch and offload rates, "the same on
    both cards" (within 10%); v3 ran the H200's 64:8 page-table grid, v2 the H100's."""
    from lib.chapters.intro.findings import CARDS, key_numbers

    k = {card: key_numbers(card) for card in CARDS}
    for card, n in k.items():
        assert abs(n["managed_resident_over_device"] - 1) <= 0.02, card
        assert abs(n["paged_over_contiguous"] - 1) <= 0.01, card
    a, b = k[H100], k["h200"]
    for name in ("fault_gbps", "prefetch_gbps", "ko_mha_copy_bus", "ko_mha_remote_bus", "ko_ys_pinned_h2d"):
        assert abs(b[name] / a[name] - 1) <= 0.10, name
    assert a["pt_kernel_seed"] == "v1, v2" and b["pt_kernel_seed"] == "v3"


def test_conclusions_host_share_costs_more_on_the_faster_card():
    """conclusions.md: with blocks on the host the H200's ratios are the larger ones (same link,
    faster memory), and the resident floor stays within a few per cent on both cards."""
    from lib.chapters.conclusions import summary as S

    a, b = (S.conclusions_numbers(None, c) for c in (H100, "h200"))
    for key in ("part_best", "part_worst", "all_best", "all_worst", "host_byte_cost"):
        assert b[key] > a[key], key
    assert a["gpu_worst_pct"] < 5 and b["gpu_worst_pct"] < 5
    assert str(a["k_gqa_kernel"]) == "v2" and str(b["k_gqa_kernel"]) == "v3"
