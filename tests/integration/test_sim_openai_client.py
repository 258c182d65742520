"""The official ``openai`` client (sync, async, streaming) works against the simulator."""

from __future__ import annotations

import pytest
from openai import AsyncOpenAI, OpenAI

from tests.support.processes import SimFleet, start_sim

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    with start_sim(tmp_path_factory.mktemp("sim"), 1) as fleet:
        yield fleet


def sync_client(sim: SimFleet) -> OpenAI:
    return OpenAI(base_url=sim.urls[0] + "/v1", api_key="unused", max_retries=0, timeout=10)


def async_client(sim: SimFleet) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=sim.urls[0] + "/v1", api_key="unused", max_retries=0, timeout=10)


def test_sync_chat_completion(sim: SimFleet):
    with sync_client(sim) as client:
        resp = client.chat.completions.create(model="sim-model", messages=MESSAGES, max_tokens=6, n=2)
    assert resp.id.startswith("chatcmpl-")
    assert len(resp.choices) == 2
    assert resp.choices[0].message.role == "assistant"
    assert len(resp.choices[0].message.content.split()) == 6
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens_details.cached_tokens == 0


def test_sync_streaming_chat_with_usage(sim: SimFleet):
    with sync_client(sim) as client:
        stream = client.chat.completions.create(
            model="sim-model",
            messages=MESSAGES,
            max_completion_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        whole = client.chat.completions.create(model="sim-model", messages=MESSAGES, max_completion_tokens=5)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_sync_completions_and_streaming(sim: SimFleet):
    with sync_client(sim) as client:
        resp = client.completions.create(model="sim-model", prompt="Hello", max_tokens=4)
        stream = client.completions.create(model="sim-model", prompt="Hello", max_tokens=4, stream=True)
        streamed = "".join(c.choices[0].text for c in stream)
    assert resp.object == "text_completion"
    assert streamed == resp.choices[0].text
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 4


def test_models_and_embeddings(sim: SimFleet):
    with sync_client(sim) as client:
        assert [m.id for m in client.models.list()] == ["sim-model"]
        floats = client.embeddings.create(model="sim-model", input="vector", encoding_format="float")
        packed = client.embeddings.create(model="sim-model", input="vector")  # base64 on the wire
    assert len(floats.data[0].embedding) == 16
    assert packed.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)


async def test_async_chat_and_streaming(sim: SimFleet):
    async with async_client(sim) as client:
        resp = await client.chat.completions.create(model="sim-model", messages=MESSAGES, max_tokens=3)
        stream = await client.chat.completions.create(model="sim-model", messages=MESSAGES, max_tokens=3, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream]
        completion = await client.completions.create(model="sim-model", prompt=[1, 2, 3], max_tokens=2)
    assert "".join(parts) == resp.choices[0].message.content
    assert completion.usage.prompt_tokens == 3
