"""check_then_time on the CPU: a NumPy step, a fake timer. Each test fails if a part of the
protocol (poisoning, the check, the state hook, the timing) is skipped or reordered."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lib.engine import kvcache
from lib.engine import measure as M
from lib.engine.reference import TOLERANCE
from lib.engine.timing import summarize

REF = np.array([[1.0, 2.0], [3.0, 4.0]])


class FakeTimer:
    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def __call__(self, step, protocol, **kw):
        self.calls.append((step, protocol, kw))
        if self.fail:
            raise RuntimeError("timer broke")
        return summarize([3.0, 1.0, 2.0], protocol)


def writer(out, value):
    def step():
        out[...] = value
    return step


def test_a_correct_step_passes_and_is_timed_with_the_protocol():
    out, timer = np.zeros((2, 2), np.float32), FakeTimer()
    step = writer(out, REF)
    row = M.check_then_time(step, out, REF, dtype="float32", protocol="hot", timer=timer)
    assert row == {"rel_error": 0.0, "check_passed": True, "protocol": "hot", "median_us": 2.0,
                   "p10_us": 1.2, "p90_us": 2.8, "samples": 3}
    assert timer.calls == [(step, "hot", {})]  # no before, no max_seconds: the timer's defaults


def test_the_output_is_poisoned_so_a_step_that_writes_nothing_fails():
    out = REF.astype(np.float16)  # already holds the right answer: only poisoning exposes the step
    row = M.check_then_time(lambda: None, out, REF, dtype="float16", timer=FakeTimer())
    assert row["rel_error"] == math.inf and row["check_passed"] is False
    assert np.isnan(out).all()


def test_bfloat16_storage_is_poisoned_with_nan_bits():
    out = np.zeros((2, 2), np.uint16)
    M.poison(out)
    assert (out == 0x7FC0).all()
    row = M.check_then_time(lambda: None, out, REF, dtype="bfloat16", protocol=None)
    assert row["check_passed"] is False


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_the_check_uses_the_dtype_tolerance(dtype):
    """A uniform scale error e gives rel_error ~e: the verdict flips around TOLERANCE[dtype]."""
    tol = TOLERANCE[dtype]
    out = np.zeros((2, 2), kvcache.storage_dtype(dtype))

    def run(value):
        return M.check_then_time(writer(out, kvcache.to_storage(value, dtype)), out, REF,
                                 dtype=dtype, protocol=None)

    assert run(REF) == {"rel_error": 0.0, "check_passed": True}
    assert run(REF * (1 + tol / 4))["check_passed"] is True
    assert run(REF * (1 + 4 * tol))["check_passed"] is False
    wrong = run(REF * 1.5)
    assert wrong["check_passed"] is False and wrong["rel_error"] == pytest.approx(0.5, rel=0.02)


def test_before_runs_ahead_of_the_checked_call_and_goes_to_the_timer():
    """The step reads a state that only ``before`` establishes (and the step consumes)."""
    out, state, timer = np.zeros((2, 2)), {"ready": False}, FakeTimer()

    def before():
        state["ready"] = True

    def step():
        out[...] = REF if state["ready"] else -REF
        state["ready"] = False  # the call changes the state: it must be re-made before each sample

    row = M.check_then_time(step, out, REF, dtype="float32", before=before, max_seconds=0.5,
                            timer=timer)
    assert row["check_passed"] is True
    assert timer.calls == [(step, "rigorous", {"before": before, "max_seconds": 0.5})]


def test_no_protocol_checks_without_timing():
    out, timer = np.zeros((2, 2)), FakeTimer()
    row = M.check_then_time(writer(out, REF), out, REF, dtype="float32", protocol=None, timer=timer)
    assert row == {"rel_error": 0.0, "check_passed": True} and timer.calls == []


def test_a_failed_timing_leaves_the_verdict_in_the_callers_row():
    out, row = np.zeros((2, 2)), {"backend": "fake"}
    with pytest.raises(RuntimeError, match="timer broke"):
        M.check_then_time(writer(out, 2 * REF), out, REF, dtype="float32", row=row,
                          timer=FakeTimer(fail=True))
    assert row == {"backend": "fake", "rel_error": pytest.approx(1.0), "check_passed": False}


def test_a_step_that_raises_is_never_timed():
    timer = FakeTimer()

    def boom():
        raise ValueError("launch failed")

    with pytest.raises(ValueError, match="launch failed"):
        M.check_then_time(boom, np.zeros((2, 2)), REF, dtype="float32", timer=timer)
    assert timer.calls == []


class OwnOutput:
    """A launcher whose result lands in an array of its own (as SDPA's does): the check reads
    that, and poisons the held one first."""

    def __init__(self, value):
        self.value, self.held, self.poisoned = value, None, 0

    def __call__(self):
        self.held = np.array(self.value, dtype=np.float32)

    def output(self):
        return self.held

    def poison_output(self):
        self.poisoned += 1
        if self.held is not None:
            self.held[...] = np.nan


def test_a_launcher_with_its_own_output_is_checked_there():
    out = np.zeros((2, 2), np.float32)
    step = OwnOutput(REF)
    row = M.check_then_time(step, out, REF, dtype="float32", protocol=None)
    assert row["check_passed"] is True and step.poisoned == 1
    assert np.isnan(out).all()  # the harness's buffer is not what was checked
    wrong = M.check_then_time(OwnOutput(2 * REF), out, REF, dtype="float32", protocol=None)
    assert wrong["check_passed"] is False


def test_a_launcher_that_produced_no_output_is_an_error():
    class Silent(OwnOutput):
        def __call__(self):
            pass

    with pytest.raises(RuntimeError, match="no output"):
        M.check_then_time(Silent(REF), np.zeros((2, 2)), REF, dtype="float32", protocol=None)


def test_how_the_stopping_rule_ended_goes_into_the_rows_extra():
    class RuleTimer(FakeTimer):
        def __call__(self, step, protocol, **kw):
            return summarize([3.0, 1.0, 2.0], protocol, stop="noise", target=0.05)

    out = np.zeros((2, 2))
    row = M.check_then_time(writer(out, REF), out, REF, dtype="float32", timer=RuleTimer(),
                            row={"extra": {"k": 1}})
    assert row["extra"] == {"k": 1, "timing": {"stop": "noise", "noise": pytest.approx(0.8),
                                               "noise_target": 0.05}}
    assert row["samples"] == 3
