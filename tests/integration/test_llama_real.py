"""A real LLM engine behind the real gateway: two llama.cpp `llama-server`s serving SmolLM2-135M-Instruct.

Built by tools/components/llama.sh (`make components`). Each engine runs one thread, one slot and a small context,
with its prompt cache and `/metrics` on. The engine is not SGLang: it has no `/get_server_info` or
`/get_model_info`, so the gateway learns the model id from `/v1/models` (the engines' `--alias`). Generation is kept
to a few tokens per request (the engine makes ~70 tokens/s on one thread).
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.support.components import COMPONENTS, require
from tests.support.gateway import GatewayProcess, start_gateway
from tests.support.metrics import Exposition
from tests.support.processes import ManagedProcess, free_ports, http_request

MODEL = "smollm2"
GGUF = COMPONENTS / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# Two slots, so two conversations homed on one engine both keep their prompt cache.
ENGINE_ARGS = ("--threads", "1", "--threads-batch", "1", "--ctx-size", "4096", "--parallel", "2")
ENGINE_START_SECS = 60.0  # loading 98 MB and a warm-up run on a busy machine


def model_file() -> Path:
    """The GGUF llama.sh unpacked; a missing one fails the test loudly."""
    if not GGUF.is_file():
        pytest.fail(f"{GGUF} is missing: run `make components` (tools/components/llama.sh) first", pytrace=False)
    return GGUF


class Engine:
    """One llama-server process on a free loopback port."""

    def __init__(self, binary: Path, port: int, log_dir: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        argv = [binary, "--model", model_file(), "--alias", MODEL, "--host", "127.0.0.1", "--port", str(port)]
        argv += [*ENGINE_ARGS, "--metrics", "--cache-prompt", "--no-webui"]
        self.process = ManagedProcess(argv, f"llama-server-{port}", log_dir=log_dir)

    def metrics(self) -> Exposition:
        status, text = http_request("GET", self.url + "/metrics")
        assert status == 200, text
        return Exposition(text)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Engine]]:
    binary, log_dir = require("llama-server"), tmp_path_factory.mktemp("llama")
    started = [Engine(binary, port, log_dir) for port in free_ports(2)]
    try:
        for engine in started:
            engine.process.start()
        for engine in started:  # /health answers 503 while the model loads
            engine.process.wait_http(engine.url + "/health", timeout=ENGINE_START_SECS)
        yield started
    finally:
        for engine in started:
            engine.process.stop()


def start_llama_gateway(tmp_path: Path, engines: list[Engine]) -> GatewayProcess:
    """A gateway with the default policy (cache_aware) in front of the engines; /engine_metrics scrapes per call."""
    return start_gateway(tmp_path, [e.url for e in engines], "--engine-metrics-cache-secs", "0")


@pytest.fixture(scope="module")
def gateway(engines: list[Engine], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with start_llama_gateway(tmp_path_factory.mktemp("gateway"), engines) as gateway:
        yield gateway


def client(gateway: GatewayProcess) -> OpenAI:
    return OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def long_prefix(seed: int, words: int = 300) -> str:
    """A system prompt of a few hundred tokens that no other test sends."""
    rng = random.Random(seed)
    vocabulary = ("engine", "cache", "token", "route", "prefix", "batch", "queue", "worker", "gateway", "model")
    return "Remember these words: " + " ".join(rng.choice(vocabulary) for _ in range(words)) + "."


def chat(gateway: GatewayProcess, messages: list[dict[str, str]], model: str = MODEL) -> tuple[str, Any]:
    """One short chat completion: the engine it was routed to and the parsed response."""
    with client(gateway) as openai:
        raw = openai.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=4, temperature=0
        )
    return raw.headers["x-smg-routed-worker-id"], raw.parse()


def follow_up(reply: Any) -> list[dict[str, str]]:
    """The next turn of a conversation: the assistant's reply and a new question."""
    return [
        {"role": "assistant", "content": reply.choices[0].message.content},
        {"role": "user", "content": "And which comes last?"},
    ]


def test_the_gateway_learns_the_model_from_v1_models(gateway: GatewayProcess, engines: list[Engine]):
    workers = gateway.workers()
    assert {w["url"] for w in workers} == {e.url for e in engines}
    assert {w["model_id"] for w in workers} == {MODEL}
    with client(gateway) as openai:
        assert MODEL in {m.id for m in openai.models.list()}


def test_chat_and_completions_through_the_openai_client(gateway: GatewayProcess):
    with client(gateway) as openai:
        reply = openai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8
        )
        completion = openai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert 0 < reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
    assert completion.object == "text_completion" and completion.choices[0].text
    assert 0 < completion.usage.completion_tokens <= 8


def test_streaming_delivers_tokens_as_the_engine_makes_them(gateway: GatewayProcess):
    arrivals: list[float] = []
    usage = None
    with client(gateway) as openai:
        stream = openai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count from one to fifty in words."}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},  # llama-server's own parameter: exactly max_tokens tokens
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
            usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 16
    assert len(arrivals) >= 8, arrivals
    # One chunk per token, each arriving when the engine decoded it: a buffered stream would deliver them all
    # within microseconds of each other, a real one spaces most of them by a decode step.
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert sum(gap > 0.001 for gap in gaps) >= len(gaps) // 2, gaps


def test_cached_tokens_rise_on_a_repeated_long_prefix(gateway: GatewayProcess):
    system = {"role": "system", "content": long_prefix(1)}
    first_engine, first = chat(gateway, [system, {"role": "user", "content": "Which word comes first?"}])
    again_engine, again = chat(gateway, [system, {"role": "user", "content": "Which word comes last?"}])
    assert again_engine == first_engine  # cache_aware: the prefix is held there
    first_cached = first.usage.prompt_tokens_details.cached_tokens
    again_cached = again.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens > 300
    assert first_cached < 0.2 * first.usage.prompt_tokens, first.usage
    # The engine's prompt cache held the whole system prompt; only the differing question was computed.
    assert again_cached > 0.9 * again.usage.prompt_tokens, again.usage


def test_cache_aware_sends_a_returning_conversation_to_the_engine_that_holds_it(engines: list[Engine], tmp_path: Path):
    conversation = [
        {"role": "system", "content": long_prefix(2)},
        {"role": "user", "content": "Which word comes first?"},
    ]
    other = [{"role": "system", "content": long_prefix(3)}, {"role": "user", "content": "Which word comes first?"}]
    with start_llama_gateway(tmp_path, engines) as gateway:  # a fresh prefix index: routing starts from scratch
        holder, first = chat(gateway, conversation)
        other_holder, other_first = chat(gateway, other)  # a new prefix goes to its home engine (either one)
        other_returned, _ = chat(gateway, [*other, *follow_up(other_first)])
        returned, again = chat(gateway, [*conversation, *follow_up(first)])
    assert (other_returned, returned) == (other_holder, holder)  # round-robin would swap them
    # The engine still held the whole first turn: all of it came from its prompt cache.
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_engine_metrics_merges_the_llamacpp_families_of_both_engines(gateway: GatewayProcess, engines: list[Engine]):
    chat(gateway, [{"role": "user", "content": "Hello!"}])
    status, text = gateway.get("/engine_metrics")
    assert status == 200, text
    merged = Exposition(text)
    families = {name for name in merged.families if name.startswith("llamacpp:")}
    assert {"llamacpp:prompt_tokens", "llamacpp:tokens_predicted", "llamacpp:requests_processing"} <= families
    for engine in engines:  # each engine's own counters, labelled with its address (nothing runs in between)
        own = engine.metrics()
        for name in ("llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens_cached_total", "llamacpp:n_decode_total"):
            assert own.value(name) is not None, name
            assert merged.value(name, worker_addr=engine.url) == own.value(name), name
    assert merged.total("llamacpp:tokens_predicted_total") > 0


def test_serve_backend_llama_starts_an_engine_and_the_gateway_and_stops_both(tmp_path: Path):
    port, prometheus_port, engine_port = free_ports(3)
    args = [sys.executable, "-m", "shepherd.cli", "serve", "--backend", "llama", "--dp-size", "1",
            "--model-path", str(model_file()), "--llama-server", str(require("llama-server")),
            "--worker-base-port", str(engine_port), "--worker-args", " ".join(ENGINE_ARGS),
            "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(prometheus_port),
            "--shutdown-drain-window-secs", "0"]  # fmt: skip
    gateway = GatewayProcess(ManagedProcess(args, "serve-llama", log_dir=tmp_path).start(), port, prometheus_port)
    with gateway:
        gateway.process.wait_http(gateway.url + "/liveness", timeout=30)
        [worker] = gateway.wait_ready_workers(1, timeout=ENGINE_START_SECS)
        assert worker["url"] == f"http://127.0.0.1:{engine_port}"
        model = GGUF.name.removesuffix(".gguf")  # the engine's alias: the file's name
        assert worker["model_id"] == model
        _, reply = chat(gateway, [{"role": "user", "content": "Hi!"}], model)
        assert reply.choices[0].message.content
        assert gateway.stop() == 0
    with pytest.raises(OSError):  # the engine went down with the gateway
        http_request("GET", worker["url"] + "/health", timeout=1)
