import dataclasses

import orjson

from shepherd.config import GatewayConfig, RetryConfig
from shepherd.http.admission import Admission
from shepherd.observability.metrics import GatewayMetrics
from shepherd.routing.attempt import AttemptFailure
from shepherd.routing.context import CHAT, RequestContext
from shepherd.routing.dispatch import DispatchLoop
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker


class Scripted(DispatchLoop[Worker]):
    """Selects by the routing text, as a cache-aware policy does; fails the first attempt, answers the second."""

    def __init__(self, config: GatewayConfig, worker: Worker) -> None:
        super().__init__(config, GatewayMetrics(Registry(), Admission(1, 1, 1)))
        self.worker = worker
        self.selected_texts: list[str] = []
        self.held_during_attempt: list[bool] = []

    def select(self, ctx, failures):
        self.selected_texts.append(ctx.routing_text)
        return self.worker

    async def attempt(self, request, ctx, target, last, started):
        self.held_during_attempt.append(ctx._routing_text is not None)
        return "answer" if len(self.held_during_attempt) > 1 else AttemptFailure(target, status=503)

    def record(self, target, result, seconds):
        pass


async def test_a_request_in_flight_does_not_hold_its_routing_text_and_a_retry_extracts_it_again():
    config = dataclasses.replace(GatewayConfig(), retry=RetryConfig(initial_backoff_ms=1, jitter_factor=0))
    loop = Scripted(config, Worker("http://w0", CircuitBreaker(config.circuit_breaker)))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why"}]
    ctx = RequestContext(CHAT, orjson.dumps({"messages": messages}), "req-1")
    assert await loop.dispatch(None, ctx) == "answer"
    assert loop.held_during_attempt == [False, False]
    assert loop.selected_texts == ["be brief why", "be brief why"]


def test_routing_by_token_ids_keeps_them_once_a_worker_is_chosen():
    ctx = RequestContext(CHAT, orjson.dumps({"messages": [{"role": "user", "content": "hi"}]}), "req-1")
    ctx.route_by_tokens([1, 2, 3])
    routed = ctx.routing_text
    ctx.forget_routing_text()
    assert ctx.routing_text == routed and ctx.by_tokens
