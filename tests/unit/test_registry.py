import time

from shepherd.config import CircuitBreakerConfig, HealthCheckConfig
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.health import HealthChecker
from shepherd.workers.load import Lease
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker, WorkerStatus, WorkerType
from tests.support.polling import until


def add_worker(registry, url, model="m", status=WorkerStatus.READY, worker_type=WorkerType.REGULAR):
    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1), registry.breaker_listener(url))
    worker = Worker(url, breaker, model_id=model, worker_type=worker_type)
    worker.status = status
    registry.add(worker)
    return worker


def test_candidates_are_ready_workers_of_the_model():
    registry = Registry()
    a = add_worker(registry, "http://a", "m1")
    b = add_worker(registry, "http://b", "m2")
    add_worker(registry, "http://c", "m1", status=WorkerStatus.NOT_READY)
    assert registry.candidates(WorkerType.REGULAR, "m1") == (a,)
    assert set(registry.candidates(WorkerType.REGULAR, None)) == {a, b}
    assert registry.serves(WorkerType.REGULAR, "m1") and not registry.serves(WorkerType.REGULAR, "m3")
    assert registry.candidates(WorkerType.PREFILL, None) == ()


def test_open_breaker_removes_worker_from_candidates():
    registry = Registry()
    a = add_worker(registry, "http://a")
    b = add_worker(registry, "http://b")
    a.breaker.record_failure()
    assert registry.candidates(WorkerType.REGULAR, "m") == (b,)


def test_status_change_and_removal_update_snapshots_and_notify():
    registry = Registry()
    removed = []
    registry.subscribe(on_removed=removed.append)
    a = add_worker(registry, "http://a")
    registry.set_status(a, WorkerStatus.DRAINING)
    assert registry.candidates(WorkerType.REGULAR, None) == ()
    registry.remove(a)
    assert removed == [a] and len(registry) == 0 and registry.by_url("http://a") is None


def test_health_state_machine():
    registry = Registry()
    failed = []
    checker = HealthChecker(
        registry,
        client=None,
        config=HealthCheckConfig(failure_threshold=2, success_threshold=2),
        on_failed=failed.append,
    )
    w = add_worker(registry, "http://a")
    checker.record(w, False)
    assert w.status is WorkerStatus.READY
    checker.record(w, False)
    assert w.status is WorkerStatus.NOT_READY
    checker.record(w, True)
    assert w.status is WorkerStatus.NOT_READY  # one success is not enough
    checker.record(w, True)
    assert w.status is WorkerStatus.READY
    for _ in range(6):  # 2 to not_ready, 6 (3 x F) to failed
        checker.record(w, False)
    assert w.status is WorkerStatus.FAILED and failed == [w]
    checker.record(w, True)
    checker.record(w, True)
    assert w.status is WorkerStatus.READY  # failed workers that are kept may recover


def test_draining_workers_are_not_touched_by_health():
    registry = Registry()
    checker = HealthChecker(registry, client=None, config=HealthCheckConfig(failure_threshold=1))
    w = add_worker(registry, "http://a")
    registry.set_status(w, WorkerStatus.DRAINING)
    checker.record(w, False)
    assert w.status is WorkerStatus.DRAINING


def test_a_half_open_worker_leaves_the_candidates_while_its_trials_are_in_flight():
    registry = Registry()
    a = add_worker(registry, "http://a")  # success threshold 3
    b = add_worker(registry, "http://b")
    a.breaker.record_failure()
    assert a.breaker.allows(now=time.monotonic() + 3600)  # the timeout passed: half-open
    registry.changed(a)
    assert registry.candidates(WorkerType.REGULAR, "m") == (a, b)
    leases = [Lease(a).__enter__() for _ in range(3)]
    assert registry.candidates(WorkerType.REGULAR, "m") == (b,)  # three trials in flight: no more for now
    leases[0].__exit__(None, None, None)
    assert registry.candidates(WorkerType.REGULAR, "m") == (a, b)
    for lease in leases[1:]:
        a.breaker.record_success()
        lease.__exit__(None, None, None)
    a.breaker.record_success()
    assert a.breaker.state.value == "closed" and a.load == 0
    assert registry.candidates(WorkerType.REGULAR, "m") == (a, b)


def test_snapshots_keep_registration_order_as_workers_leave_and_rejoin():
    registry = Registry()
    a, b, c, d = (add_worker(registry, f"http://{name}", model) for name, model in zip("abcd", "xyxy", strict=True))
    registry.set_status(b, WorkerStatus.NOT_READY)
    registry.set_status(a, WorkerStatus.NOT_READY)
    assert registry.candidates(WorkerType.REGULAR, None) == (c, d)
    registry.set_status(b, WorkerStatus.READY)
    registry.set_routing_hold(c, "pod not ready")
    assert registry.candidates(WorkerType.REGULAR, None) == (b, d)
    registry.set_status(a, WorkerStatus.READY)
    registry.set_routing_hold(c, None)
    assert registry.candidates(WorkerType.REGULAR, None) == (a, b, c, d)
    assert registry.candidates(WorkerType.REGULAR, "x") == (a, c)
    assert registry.candidates(WorkerType.REGULAR, "y") == (b, d)
    registry.changed()  # re-judging everyone from scratch gives the same snapshots
    assert registry.candidates(WorkerType.REGULAR, None) == (a, b, c, d)
    assert registry.candidates(WorkerType.REGULAR, "y") == (b, d)


def test_removal_updates_models_and_the_base_url_index():
    registry = Registry()
    ranks = []
    for rank in range(2):
        breaker = CircuitBreaker(CircuitBreakerConfig())
        worker = Worker(f"http://a@{rank}", breaker, model_id="m1", base_url="http://a", dp_rank=rank, dp_size=2)
        worker.status = WorkerStatus.READY
        registry.add(worker)
        ranks.append(worker)
    other = add_worker(registry, "http://b", "m2", status=WorkerStatus.NOT_READY)
    assert registry.at_base_url("http://a") == ranks and registry.at_base_url("http://b") == [other]
    assert registry.models() == ["m1", "m2"] and registry.serves(WorkerType.REGULAR, "m2")
    registry.remove(ranks[0])
    assert registry.at_base_url("http://a") == [ranks[1]] and registry.models() == ["m1", "m2"]
    registry.remove(ranks[1])
    registry.remove(other)
    assert registry.at_base_url("http://a") == [] and registry.models() == []
    assert not registry.serves(WorkerType.REGULAR, "m1") and registry.candidates(WorkerType.REGULAR, None) == ()


def test_grpc_workers_count_once_their_tokenizer_is_loaded():
    registry = Registry()
    worker = add_worker(registry, "grpc://g:1", "m")
    assert not registry.has_grpc("m") and registry.awaiting_tokenizer("m") and registry.models() == []
    registry.set_tokenized_models(frozenset({"m"}))
    assert registry.has_grpc("m") and registry.has_grpc(None) and registry.candidates(WorkerType.REGULAR, "m")
    registry.set_status(worker, WorkerStatus.NOT_READY)
    assert not registry.has_grpc("m") and registry.models() == ["m"]


async def test_an_open_breaker_rejoins_the_candidates_when_its_timeout_passes():
    registry = Registry()
    breaker = CircuitBreaker(
        CircuitBreakerConfig(failure_threshold=1, timeout_secs=0.05), registry.breaker_listener("u")
    )
    worker = Worker("u", breaker, model_id="m")
    worker.status = WorkerStatus.READY
    registry.add(worker)
    breaker.record_failure()
    assert registry.candidates(WorkerType.REGULAR, "m") == ()
    await until(lambda: registry.candidates(WorkerType.REGULAR, "m") == (worker,), "the half-open worker")
    assert breaker.state.value == "half_open"


def test_kv_event_publishers_are_counted_by_type_and_model_until_they_leave():
    registry = Registry()
    publisher = Worker("http://p", CircuitBreaker(CircuitBreakerConfig()), model_id="m",
                       kv_events_endpoints=("tcp://p:5557",))  # fmt: skip
    add_worker(registry, "http://q", "m")  # publishes nothing
    assert not registry.publishes_kv_events(WorkerType.REGULAR, "m")
    registry.add(publisher)
    assert registry.publishes_kv_events(WorkerType.REGULAR, "m")
    assert registry.publishes_kv_events(WorkerType.REGULAR, None)
    assert not registry.publishes_kv_events(WorkerType.REGULAR, "n")
    assert not registry.publishes_kv_events(WorkerType.PREFILL, "m")
    registry.remove(publisher)
    assert not registry.publishes_kv_events(WorkerType.REGULAR, "m")
    assert not registry.publishes_kv_events(WorkerType.REGULAR, None)
