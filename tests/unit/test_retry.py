import random

import pytest

from shepherd.config import RetryConfig
from shepherd.upstream.retry import RETRYABLE_STATUSES, Backoff, is_worker_fault


def test_backoff_without_jitter_is_exponential_and_capped():
    backoff = Backoff(RetryConfig(initial_backoff_ms=100, backoff_multiplier=2.0, max_backoff_ms=500, jitter_factor=0))
    assert [backoff.delay_secs(k) for k in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]


def test_jitter_stays_within_factor():
    backoff = Backoff(RetryConfig(initial_backoff_ms=100, jitter_factor=0.2), rng=random.Random(7))
    delays = [backoff.delay_secs(0) for _ in range(500)]
    assert min(delays) >= 0.08 - 1e-9 and max(delays) <= 0.12 + 1e-9
    assert max(delays) - min(delays) > 0.02  # jitter actually spreads the delays


def test_disable_retries_means_one_attempt():
    assert RetryConfig(max_retries=5, disabled=True).max_attempts == 1
    assert RetryConfig(max_retries=3).max_attempts == 3


@pytest.mark.parametrize("status,fault", [(500, True), (503, True), (408, True), (429, False), (400, False)])
def test_worker_fault_classification(status, fault):
    assert is_worker_fault(status) is fault


def test_retryable_statuses():
    assert {408, 429, 500, 502, 503, 504} == RETRYABLE_STATUSES
