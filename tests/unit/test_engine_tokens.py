"""HTTP requests matched by the token ids their engines publish (routing/engine_tokens.py): when, and which ids."""

import orjson
import pytest

from shepherd.config import CacheAwareConfig, CircuitBreakerConfig
from shepherd.generation.prompt import chat_prompt
from shepherd.routing.context import CHAT, RequestContext
from shepherd.routing.policies.cache_aware import CacheAwarePolicy
from shepherd.routing.router import match_by_tokens
from shepherd.sim.bpe import build
from shepherd.tokenizer.loader import load_tokenizer
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.registry import Registry
from shepherd.workers.worker import Worker, WorkerStatus, WorkerType

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    build().write_dir(directory)
    return load_tokenizer(str(directory))


def worker(i, model="m", publishes=True):
    endpoints = (f"tcp://w{i}:5557",) if publishes else ()
    return Worker(f"http://w{i}:1", CircuitBreaker(CircuitBreakerConfig()), model_id=model,
                  kv_events_endpoints=endpoints)  # fmt: skip


async def match(request, workers, tokenizer_for):
    """What the routers do before picking: the registry of `workers`, all ready, and cache_aware."""
    registry = Registry()
    for each in workers:
        each.status = WorkerStatus.READY
        registry.add(each)
    policy = CacheAwarePolicy(CacheAwareConfig())
    await match_by_tokens(request, registry, WorkerType.REGULAR, policy, None, tokenizer_for)


def ctx(model="m"):
    return RequestContext(CHAT, orjson.dumps({"model": model, "messages": MESSAGES}), "req")


async def test_a_model_whose_engines_publish_is_matched_by_the_ids_the_engine_caches(tokenizer):
    request = ctx()
    await match(request, (worker(0, publishes=False), worker(1)), {"m": tokenizer}.get)
    expected = ctx()
    expected.route_by_tokens(chat_prompt({"messages": MESSAGES}, tokenizer))  # the chat template, then the BPE
    assert request.by_tokens and request.routing_text == expected.routing_text
    assert request.body == ctx().body  # the body goes to the worker as it came


async def test_text_when_no_engine_publishes_or_no_tokenizer_or_several_models_unnamed(tokenizer):
    tokenizers = {"m": tokenizer, "n": tokenizer}.get
    for workers, request, lookup in [
        ((worker(0, publishes=False), worker(1, publishes=False)), ctx(), tokenizers),  # nobody publishes
        ((worker(0), worker(1)), ctx(), {}.get),  # no tokenizer loaded for the model
        ((worker(0, "m"), worker(1, "n")), ctx(None), tokenizers),  # no model named, two served
    ]:
        await match(request, workers, lookup)
        assert not request.by_tokens
