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
