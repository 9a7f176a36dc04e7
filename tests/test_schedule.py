"""The learning-rate schedules (on the share of the budget spent, so that a
time budget decays too) and the validation cadence, over their whole
range."""
import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn.errors import CharrnnError
from charrnn.optim import SCHEDULES, Schedule
from charrnn.train import Cadence

schedules = st.builds(Schedule, base_lr=st.floats(1e-5, 1.0), kind=st.sampled_from(SCHEDULES),
                      warmup=st.integers(0, 1000), decay_every=st.integers(0, 1000),
                      decay=st.floats(0.1, 1.0), min_frac=st.floats(0.0, 1.0),
                      decay_start=st.floats(0.0, 0.99))
steps = st.integers(0, 10 ** 6)
shares = st.floats(0.0, 1.0)


@settings(max_examples=500, deadline=None)
@given(schedules, steps, shares)
def test_the_rate_is_never_above_the_base_rate_nor_negative(s, step, spent):
    assert 0 <= s.get_lr(step, spent) <= s.base_lr * (1 + 1e-12)


@settings(max_examples=500, deadline=None)
@given(schedules, steps, shares, shares)
def test_after_warmup_the_rate_never_rises_as_the_budget_is_spent(s, step, a, b):
    early, late = sorted((a, b))
    step = max(step, s.warmup)
    assert s.get_lr(step, late) <= s.get_lr(step, early) * (1 + 1e-12)


@settings(max_examples=300, deadline=None)
@given(schedules, steps, shares)
def test_warmup_scales_the_rate_linearly_over_its_steps(s, step, spent):
    plain = dataclasses.replace(s, warmup=0)
    factor = (step + 1) / s.warmup if step < s.warmup else 1.0
    assert s.get_lr(step, spent) == pytest.approx(plain.get_lr(step, spent) * factor, rel=1e-12)


@settings(max_examples=300, deadline=None)
@given(schedules, steps)
def test_cosine_and_linear_hold_the_rate_until_the_decay_starts_and_end_at_the_floor(s, step):
    if s.kind in ("cosine", "linear"):
        step = max(step, s.warmup)
        assert s.get_lr(step, s.decay_start) == pytest.approx(s.base_lr, rel=1e-9)
        assert s.get_lr(step, 1.0) == pytest.approx(s.base_lr * s.min_frac, rel=1e-9, abs=1e-15)


def test_step_decays_at_each_third_of_the_budget():
    s = Schedule(1.0, "step", decay=0.5)
    assert [s.get_lr(0, t) for t in (0, 0.34, 0.67, 1.0)] == [1.0, 0.5, 0.25, 0.25]


def test_a_decay_start_outside_the_budget_is_an_error():
    with pytest.raises(CharrnnError, match="decay must start"):
        Schedule(1.0, "cosine", decay_start=1.0)


# ------------------------------------------------------------------ cadence

@pytest.mark.parametrize("spec,want", [
    (5, Cadence(5, "steps")), ("5", Cadence(5, "steps")), ("30s", Cadence(30.0, "seconds")),
    ("2m", Cadence(120.0, "seconds")), ("0.5e", Cadence(0.5, "epochs")), ("auto", None),
    (" AUTO ", None), ("1.5s", Cadence(1.5, "seconds"))])
def test_eval_every_reads_steps_seconds_minutes_epochs_and_auto(spec, want):
    assert Cadence.parse(spec) == want


@pytest.mark.parametrize("spec", [0, -3, "0", "1.5", "x", "3h", "-2s", "nan", "infs", "", True])
def test_eval_every_refuses_anything_else(spec):
    with pytest.raises(CharrnnError, match="--eval-every must be"):
        Cadence.parse(spec)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 500), st.integers(1, 5000))
def test_a_step_cadence_validates_every_nth_step_and_nothing_else(every, total):
    c = Cadence(every, "steps")
    assert [s for s in range(1, total + 1) if c.due(s, 100, 0.0, 0.0)] == list(range(every, total + 1, every))


@settings(max_examples=300, deadline=None)
@given(st.floats(0.01, 10), st.integers(1, 2000), st.integers(1, 5000))
def test_an_epoch_cadence_validates_at_the_nearest_whole_step_at_least_one(epochs, per_epoch, total):
    c = Cadence(epochs, "epochs")
    every = max(1, round(epochs * per_epoch))
    assert sum(c.due(s, per_epoch, 0.0, 0.0) for s in range(1, total + 1)) == total // every


@settings(max_examples=300, deadline=None)
@given(st.floats(0.1, 1e5), st.booleans(), st.floats(0, 1e5), st.floats(0, 1e5), st.floats(0, 1e4))
def test_a_clock_cadence_waits_its_interval_and_auto_ten_validations_long(every, auto, last, gap, cost):
    c = Cadence(every, "seconds", auto)
    wait = max(every, 10 * cost) if auto else every
    assert c.due(1, 100, last + gap, last, cost) == ((last + gap) - last >= wait)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 10 ** 7), st.floats(0.01, 10 ** 4))
def test_auto_validates_twenty_times_a_step_budget_and_every_twentieth_of_a_time_budget(max_steps, minutes):
    assert Cadence.for_budget(max_steps, minutes) == Cadence(max(1, round(max_steps / 20)), "steps")
    by_clock = Cadence.for_budget(None, minutes)
    assert by_clock.auto and by_clock.every == pytest.approx(min(300.0, max(5.0, minutes * 60 / 20)))
    assert math.isfinite(by_clock.every)
