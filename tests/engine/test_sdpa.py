"""Dense SDPA as a backend: its timed region holds only SDPA's own work, and it is checked where
it writes (issue 14). CPU: the launcher contract through check_then_time; GPU: the real one."""

import numpy as np
import pytest

from lib.engine import backends as B


def test_output_of_prefers_the_launchers_own_output():
    out = np.zeros(3)

    class Own:
        def __call__(self):
            pass

        def output(self):
            return "its own"

    assert B.output_of(Own(), out) == "its own"
    assert B.output_of(lambda: None, out) is out


def _case(heads=(32, 32), dtype="float16"):
    p = B.DecodeProblem.uniform(4, 1024, num_heads=heads[0], num_kv_heads=heads[1], head_size=128,
                                block_size=16, dtype=dtype, placement="shuffled")
    return B.DecodeCase.build(p)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 32), (64, 8)], ids=["MHA", "GQA"])
def test_sdpa_is_checked_in_its_own_output_and_the_harness_buffer_stays_poisoned(heads):
    pytest.importorskip("torch")
    import cupy

    from lib.engine import measure as M

    case = _case(heads)
    out = case.poisoned_output()
    launch = B.get_backend("sdpa_dense").prepare(case, out)
    ref = M.reference_for(case, "paged", {})
    row = M.check_then_time(launch, out, ref, dtype="float16", protocol="rigorous")
    assert row["check_passed"], row
    assert bool(cupy.isnan(out).all())  # SDPA never wrote the harness's buffer: no copy
    assert row["extra"]["timing"]["stop"] in ("noise", "max_samples", "timeout")


@pytest.mark.gpu
def test_the_captured_graph_writes_the_launchers_output():
    """Poison the output the capture left, replay the graph: the answer is back, in the same
    memory. So the timed graph computes into output(), with no copy out of it."""
    torch = pytest.importorskip("torch")

    from lib.engine import measure as M
    from lib.engine import timing as T
    from lib.engine.reference import TOLERANCE, relative_error

    case = _case()
    launch = B.get_backend("sdpa_dense").prepare(case, case.poisoned_output())
    ref = M.reference_for(case, "paged", {})
    st = T._device()
    with st.stream:
        launch()
    st.stream.synchronize()
    graph, pool = T._capture(launch, st.stream)
    try:
        held = launch.output()
        ptr = held.data_ptr()
        launch.poison_output()
        assert bool(torch.isnan(launch.output()).all())
        graph.launch(st.stream)
        st.stream.synchronize()
        assert launch.output().data_ptr() == ptr
        assert relative_error(launch.output(), ref, dtype_name="float16") <= TOLERANCE["float16"]
    finally:
        st.stream.synchronize()
        graph = None
        pool.free_all_blocks()


@pytest.mark.gpu
def test_an_sdpa_call_launches_no_copy_kernel():
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    case = _case()
    launch = B.get_backend("sdpa_dense").prepare(case, case.poisoned_output())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        launch()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if str(e.device_type).endswith("CUDA")]
    assert names, "the profiler saw no kernel"
    assert not [n for n in names if "direct_copy" in n or "memcpy" in n.lower()], names
