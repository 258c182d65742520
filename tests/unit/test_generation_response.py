"""Worker `GenerateResponse` messages -> OpenAI chat / completions and SGLang /generate bytes."""

from __future__ import annotations

import base64
import struct

import orjson
import pytest
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from shepherd.generation import build_plan, embedding_body
from shepherd.tokenizer.loader import LoadedTokenizer, load_tokenizer
from tests.support.tiny_tokenizer import write_tiny_tokenizer_dir

EOS = 2
USER = [{"role": "user", "content": "Hi"}]
PROMPT_TOKENS = 9


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> LoadedTokenizer:
    return load_tokenizer(write_tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def logprobs_for(ids: list[int], top: int = 0) -> pb.OutputLogProbs:
    """Made-up logprobs: -0.5 per token, alternatives ids 10, 11, ... at -1, -2, ..."""
    tops = [pb.TopLogProbs(values=[-1.0 - k for k in range(top)], token_ids=[10 + k for k in range(top)]) for _ in ids]
    return pb.OutputLogProbs(token_logprobs=[-0.5] * len(ids), token_ids=ids, top_logprobs=tops)


def chunk(ids: list[int], completion: int, index: int = 0, logprobs: pb.OutputLogProbs | None = None):
    message = pb.GenerateStreamChunk(
        token_ids=ids, prompt_tokens=PROMPT_TOKENS, completion_tokens=completion, cached_tokens=4, index=index
    )
    if logprobs is not None:
        message.output_logprobs.CopyFrom(logprobs)
    return pb.GenerateResponse(request_id="rid", chunk=message)


def complete(ids: list[int], completion: int, finish: str = "stop", index: int = 0, **extra):
    message = pb.GenerateComplete(
        output_ids=ids,
        finish_reason=finish,
        prompt_tokens=PROMPT_TOKENS,
        completion_tokens=completion,
        cached_tokens=4,
        index=index,
        **extra,
    )
    return pb.GenerateResponse(request_id="rid", complete=message)


def stream_of(tok, text: str, eos: bool = True, index: int = 0) -> list[pb.GenerateResponse]:
    """What the servicer streams for n=1: one chunk per token, then `complete` repeating the last chunk's ids."""
    ids = tok.encode(text) + ([EOS] if eos else [])
    messages = [chunk([token_id], k + 1, index) for k, token_id in enumerate(ids)]
    extra = {"matched_token_id": EOS} if eos else {}
    messages.append(complete(ids[-1:], len(ids), "stop" if eos else "length", index, **extra))
    return messages


def events(data: bytes) -> list:
    frames = data.decode().split("\n\n")
    assert frames[-1] == ""
    assert all(frame.startswith("data: ") for frame in frames[:-1])
    assert frames[-2] == "data: [DONE]"
    return [orjson.loads(frame[6:]) for frame in frames[:-2]]


def run(plan, messages) -> tuple[list[bytes], bytes]:
    builder = plan.new_response("tiny", 1700000000)
    return [builder.feed(message) for message in messages], builder.finish()


def plan_for(tok, kind: str, **body):
    if kind == "chat":
        body = {"messages": USER, **body}
    elif kind == "completions":
        body = {"prompt": "Hi", **body}
    else:
        body = {"text": "Hi", **body}
    return build_plan(kind, body, tok, "rid")


def test_chat_stream_role_content_finish_done(tok):
    text = "The capital of France is Paris."
    fed, tail = run(plan_for(tok, "chat", stream=True), stream_of(tok, text))
    out = events(b"".join(fed) + tail)
    assert all(event["id"] == "rid" and event["object"] == "chat.completion.chunk" for event in out)
    assert all(event["model"] == "tiny" and event["created"] == 1700000000 for event in out)
    assert out[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    deltas = [event["choices"][0]["delta"].get("content") for event in out[1:-1]]
    assert "".join(deltas) == text  # the EOS is hidden, the repeated ids of `complete` are not appended
    assert all(deltas)  # content deltas only when there is visible text
    assert out[-1]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop", "matched_stop": EOS}
    ]
    assert "usage" not in out[-1]
    assert tail == b"data: [DONE]\n\n"  # the finish chunk went out with the `complete`


def test_usage_chunk_only_with_include_usage(tok):
    plan = plan_for(tok, "chat", stream=True, stream_options={"include_usage": True})
    ids_count = len(tok.encode("Paris.")) + 1
    fed, tail = run(plan, stream_of(tok, "Paris."))
    out = events(b"".join(fed) + tail)
    usage = out[-1]
    assert usage["choices"] == [] and usage["object"] == "chat.completion.chunk"
    assert usage["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": ids_count,  # the engine's count: the hidden EOS is counted
        "total_tokens": PROMPT_TOKENS + ids_count,
        "prompt_tokens_details": {"cached_tokens": 4},
    }


def test_a_multi_token_stop_ends_the_choice_in_the_gateway(tok):
    plan = plan_for(tok, "chat", stream=True, stop=["XYZ"], max_tokens=30)
    ids = tok.encode("Hello XYZ and the rest")
    messages = [chunk([token_id], k + 1) for k, token_id in enumerate(ids)]
    messages.append(complete(ids[-1:], 30, "length"))  # the engine ran on to its own end
    fed, tail = run(plan, messages)
    stop_at = ids.index(tok.encode("Z")[0])
    assert all(frame == b"" for frame in fed[stop_at + 1 :])  # later engine output is ignored
    out = events(b"".join(fed) + tail)
    assert "".join(event["choices"][0]["delta"].get("content", "") for event in out) == "Hello "
    finish = out[-1]["choices"][0]
    assert (finish["finish_reason"], finish["matched_stop"]) == ("stop", "XYZ")


def test_n2_interleaved_chunks(tok):
    plan = plan_for(tok, "chat", stream=True, n=2, stream_options={"include_usage": True})
    first, second = stream_of(tok, "Paris.", index=0), stream_of(tok, "Hello world!", eos=False, index=1)
    interleaved = [message for pair in zip(first, second, strict=False) for message in pair]
    interleaved += second[len(first) :]
    fed, tail = run(plan, interleaved)
    out = events(b"".join(fed) + tail)
    by_index: dict[int, list] = {0: [], 1: []}
    for event in out[:-1]:
        (choice,) = event["choices"]
        by_index[choice["index"]].append(choice)
    for index, text, reason in ((0, "Paris.", "stop"), (1, "Hello world!", "length")):
        choices = by_index[index]
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(choice["delta"].get("content", "") for choice in choices[1:]) == text
        assert choices[-1]["finish_reason"] == reason
    assert by_index[0][-1]["matched_stop"] == EOS and by_index[1][-1]["matched_stop"] is None
    completion = len(tok.encode("Paris.")) + 1 + len(tok.encode("Hello world!"))
    assert out[-1]["usage"]["prompt_tokens"] == PROMPT_TOKENS  # one prompt
    assert out[-1]["usage"]["completion_tokens"] == completion  # summed over choices


def test_chat_non_stream_body(tok):
    text = "Hello world!"
    ids = tok.encode(text)
    fed, body = run(plan_for(tok, "chat", max_tokens=len(ids)), [complete(ids, len(ids), "length")])
    assert fed == [b""]
    assert orjson.loads(body) == {
        "id": "rid",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "tiny",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "length",
                "matched_stop": None,
            }
        ],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": len(ids),
            "total_tokens": PROMPT_TOKENS + len(ids),
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }


def test_non_stream_n2_and_eos_hidden_but_counted(tok):
    first, second = [*tok.encode("Paris."), EOS], tok.encode("The capital")
    messages = [
        complete(second, len(second), "length", 1),
        complete(first, len(first), "stop", 0, matched_token_id=EOS),
    ]
    body = orjson.loads(run(plan_for(tok, "chat", n=2), messages)[1])
    assert [choice["message"]["content"] for choice in body["choices"]] == ["Paris.", "The capital"]
    assert [choice["matched_stop"] for choice in body["choices"]] == [EOS, None]
    assert body["usage"]["completion_tokens"] == len(first) + len(second)


def test_emoji_never_streams_partially(tok):
    fed, tail = run(plan_for(tok, "chat", stream=True), stream_of(tok, "Fun 😀!"))
    contents = [event["choices"][0]["delta"].get("content") for event in events(b"".join(fed) + tail)]
    assert "😀" in contents and not any("\ufffd" in (content or "") for content in contents)


def test_completions_stream_and_body(tok):
    fed, tail = run(plan_for(tok, "completions", stream=True), stream_of(tok, "Paris."))
    out = events(b"".join(fed) + tail)
    assert all(event["object"] == "text_completion" for event in out)
    assert "".join(event["choices"][0]["text"] for event in out) == "Paris."
    assert out[0]["choices"][0] == {"index": 0, "text": "Paris", "logprobs": None, "finish_reason": None}
    assert out[-1]["choices"][0] == {
        "index": 0,
        "text": "",
        "logprobs": None,
        "finish_reason": "stop",
        "matched_stop": 2,
    }
    ids = [*tok.encode("Paris."), EOS]
    body = orjson.loads(run(plan_for(tok, "completions"), [complete(ids, len(ids), matched_token_id=EOS)])[1])
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "Paris."
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["total_tokens"] == PROMPT_TOKENS + len(ids)


def test_generate_non_stream_object_for_n1_and_list_for_n2(tok):
    ids = [*tok.encode("Paris."), EOS]
    body = orjson.loads(run(plan_for(tok, "generate"), [complete(ids, len(ids), matched_token_id=EOS)])[1])
    assert body["text"] == "Paris." and body["output_ids"] == ids
    meta = body["meta_info"]
    assert meta["id"] == "rid" and meta["finish_reason"] == {"type": "stop", "matched": EOS}
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]) == (PROMPT_TOKENS, len(ids), 4)
    assert meta["matched_stop"] == EOS and meta["e2e_latency"] >= 0
    plan = plan_for(tok, "generate", sampling_params={"n": 2})
    body = orjson.loads(run(plan, [complete(ids, len(ids), index=0), complete(ids[:2], 2, "length", index=1)])[1])
    assert [item["meta_info"]["id"] for item in body] == ["rid-0", "rid-1"]
    assert body[1]["meta_info"]["finish_reason"] == {"type": "length", "length": 2}


def test_generate_stream_accumulates_text(tok):
    text = "Hello world!"
    ids = [*tok.encode(text), EOS]
    fed, tail = run(plan_for(tok, "generate", stream=True), stream_of(tok, text))
    out = events(b"".join(fed) + tail)
    assert [event["text"] for event in out] == [tok.decode(ids[: k + 1]) for k in range(len(ids) - 1)] + [text]
    assert [token_id for event in out for token_id in event["output_ids"]] == ids  # no id repeated
    assert all(event["meta_info"]["finish_reason"] is None for event in out[:-1])
    assert out[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    assert out[-1]["meta_info"]["completion_tokens"] == len(ids)


def test_chat_logprobs(tok):
    ids = tok.encode("Hello")
    plan = plan_for(tok, "chat", logprobs=True, top_logprobs=1)
    body = orjson.loads(run(plan, [complete(ids, len(ids), "length", output_logprobs=logprobs_for(ids, 1))])[1])
    content = body["choices"][0]["logprobs"]["content"]
    first = tok.decode([ids[0]])
    alt = tok.tokenizer.decode([10], skip_special_tokens=False)
    assert content[0] == {
        "token": first,
        "logprob": -0.5,
        "bytes": list(first.encode()),
        "top_logprobs": [{"token": alt, "logprob": -1.0, "bytes": list(alt.encode())}],
    }
    assert "".join(entry["token"] for entry in content) == "Hello"
    stream_plan = plan_for(tok, "chat", stream=True, logprobs=True)
    messages = [chunk([token_id], k + 1, logprobs=logprobs_for([token_id])) for k, token_id in enumerate(ids)]
    fed, tail = run(stream_plan, [*messages, complete(ids[-1:], len(ids), "length")])
    out = events(b"".join(fed) + tail)
    streamed = [entry for event in out for entry in (event["choices"][0]["logprobs"] or {}).get("content", [])]
    assert [entry["token"] for entry in streamed] == [tok.decode([token_id]) for token_id in ids]
    assert all(entry["top_logprobs"] == [] for entry in streamed)


def test_completion_and_generate_logprobs(tok):
    ids = tok.encode("Hello world")
    message = complete(ids, len(ids), output_logprobs=logprobs_for(ids, 1))
    body = orjson.loads(run(plan_for(tok, "completions", logprobs=1), [message])[1])
    logprobs = body["choices"][0]["logprobs"]
    tokens = [tok.decode([token_id]) for token_id in ids]
    assert logprobs["tokens"] == tokens and logprobs["token_logprobs"] == [-0.5] * len(ids)
    assert logprobs["text_offset"] == [sum(map(len, tokens[:k])) for k in range(len(ids))]
    assert logprobs["top_logprobs"][0] == {tok.tokenizer.decode([10], skip_special_tokens=False): -1.0}
    plan = plan_for(tok, "generate", return_logprob=True, top_logprobs_num=1)
    meta = orjson.loads(run(plan, [message])[1])["meta_info"]
    assert meta["output_token_logprobs"] == [[-0.5, token_id, None] for token_id in ids]
    assert meta["output_top_logprobs"] == [[[-1.0, 10, None]] for _ in ids]


def test_error_frame(tok):
    builder = plan_for(tok, "chat", stream=True).new_response("tiny", 1)
    frame = builder.error_frame("worker went away")
    assert frame == (
        b'data: {"error":{"message":"Stream error: worker went away","type":"internal_error"}}\n\ndata: [DONE]\n\n'
    )


def test_a_choice_the_engine_never_completed_still_gets_a_finish(tok):
    fed, tail = run(plan_for(tok, "chat", stream=True), [chunk(tok.encode("Hi"), 1)])
    out = events(b"".join(fed) + tail)
    assert out[-1]["choices"][0]["finish_reason"] == "abort"


def test_embedding_body():
    response = pb.EmbedResponse(embedding=[0.5, -1.0], embedding_dim=2, prompt_tokens=3)
    assert orjson.loads(embedding_body(response, "tiny")) == {
        "object": "list",
        "data": [{"object": "embedding", "embedding": [0.5, -1.0], "index": 0}],
        "model": "tiny",
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    packed = orjson.loads(embedding_body(response, "tiny", "base64"))["data"][0]["embedding"]
    assert struct.unpack("<2f", base64.b64decode(packed)) == (0.5, -1.0)


def test_the_engines_cached_tokens_are_kept_for_the_router(tok):
    plan = plan_for(tok, "chat", n=2)
    builder = plan.new_response("tiny", 1700000000)
    assert builder.cached_tokens == 0  # nothing reported yet
    ids = tok.encode("Hi there")
    builder.feed(complete(ids, len(ids), index=0))
    second = complete(ids, len(ids), index=1)
    second.complete.cached_tokens = 7
    builder.feed(second)
    assert builder.cached_tokens == 7  # the most over the choices, as `usage` reports it
