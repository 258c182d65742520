from shepherd.config import CircuitBreakerConfig
from shepherd.workers.breaker import CircuitBreaker, CircuitState


def make(**overrides):
    transitions = []
    config = CircuitBreakerConfig(
        **{"failure_threshold": 3, "success_threshold": 2, "timeout_secs": 10.0, "window_secs": 5.0, **overrides}
    )
    breaker = CircuitBreaker(config, lambda _b, old, new: transitions.append((old.value, new.value)))
    return breaker, transitions


def test_opens_after_threshold_consecutive_failures_within_window():
    breaker, transitions = make()
    for t in (0.0, 1.0):
        breaker.record_failure(now=t)
    assert breaker.state is CircuitState.CLOSED
    breaker.record_failure(now=2.0)
    assert breaker.state is CircuitState.OPEN
    assert transitions == [("closed", "open")]
    assert not breaker.allows(now=5.0)


def test_failures_older_than_window_do_not_count():
    breaker, _ = make()
    breaker.record_failure(now=0.0)
    breaker.record_failure(now=1.0)
    breaker.record_failure(now=7.0)  # the first two fell out of the 5 s window
    assert breaker.state is CircuitState.CLOSED


def test_success_resets_the_failure_run():
    breaker, _ = make()
    breaker.record_failure(now=0.0)
    breaker.record_failure(now=0.1)
    breaker.record_success()
    breaker.record_failure(now=0.2)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.consecutive_failures == 1


def test_half_open_after_timeout_then_closes_on_successes():
    breaker, transitions = make()
    for t in (0.0, 0.1, 0.2):
        breaker.record_failure(now=t)
    assert breaker.reopen_in(now=5.2) == 5.0
    assert breaker.allows(now=10.2)
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.record_success()
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_any_failure_in_half_open_reopens():
    breaker, transitions = make()
    for t in (0.0, 0.1, 0.2):
        breaker.record_failure(now=t)
    breaker.allows(now=11.0)
    breaker.record_success()
    breaker.record_failure(now=11.5)
    assert breaker.state is CircuitState.OPEN
    assert transitions[-1] == ("half_open", "open")
    assert not breaker.allows(now=12.0)


def test_disabled_breaker_never_opens():
    breaker, transitions = make(disabled=True)
    for t in range(10):
        breaker.record_failure(now=float(t))
    assert breaker.state is CircuitState.CLOSED and breaker.allows(now=10.0)
    assert transitions == []


def half_open(breaker):
    for t in (0.0, 0.1, 0.2):
        breaker.record_failure(now=t)
    assert breaker.allows(now=10.2) and breaker.state is CircuitState.HALF_OPEN


def test_half_open_admits_at_most_success_threshold_trials_at_a_time():
    breaker, _ = make()  # success threshold 2
    changes = []
    breaker.on_trials = changes.append
    half_open(breaker)
    first = breaker.begin_trial()
    assert breaker.allows()
    second = breaker.begin_trial()
    assert not breaker.allows()  # both trial slots taken: the verdict is pending
    assert changes == [breaker]
    breaker.end_trial(first)  # e.g. a 429 or a client that left: no verdict, the slot frees
    assert breaker.allows() and changes == [breaker, breaker]
    breaker.record_success()
    breaker.end_trial(second)
    third = breaker.begin_trial()
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    breaker.end_trial(third)
    assert breaker.allows()


def test_a_trial_of_an_earlier_half_open_period_frees_no_slot_of_the_next():
    breaker, _ = make()
    half_open(breaker)
    stale = breaker.begin_trial()
    breaker.begin_trial()
    breaker.record_failure(now=11.0)  # reopens while both trials are in flight
    assert breaker.allows(now=21.0) and breaker.state is CircuitState.HALF_OPEN
    breaker.begin_trial()
    breaker.begin_trial()
    breaker.end_trial(stale)
    assert not breaker.allows()  # still two trials of this period in flight
