import orjson
import pytest

from shepherd.routing.context import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    GENERATE,
    TOKEN_CHARS,
    InvalidRequest,
    RequestContext,
)


def ctx(endpoint, payload):
    return RequestContext(endpoint, orjson.dumps(payload), "req-1")


def test_generate_text_and_input_ids_routing_text():
    assert ctx(GENERATE, {"text": "hello"}).routing_text == "hello"
    assert ctx(GENERATE, {"input_ids": [1, 2, 3]}).routing_text == "1 2 3"
    assert ctx(GENERATE, {"input_ids": [[1, 2], [3]]}).routing_text == "1 2 3"
    assert ctx(GENERATE, {}).routing_text == ""


def test_chat_routing_text_concatenates_messages_in_order():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": "x", "reasoning_content": "thinking"},
    ]
    assert ctx(CHAT, {"messages": messages}).routing_text == "be brief what x thinking"


def test_routing_head_is_a_chat_first_message_when_more_follow():
    system = {"role": "system", "content": "you are terse"}
    question = {"role": "user", "content": "why"}
    chat = ctx(CHAT, {"messages": [system, question]})
    assert chat.routing_head == "you are terse"  # before the routing text is asked for
    assert chat.routing_text.startswith(chat.routing_head + " ")
    assert ctx(CHAT, {"messages": [question]}).routing_head == ""
    assert ctx(GENERATE, {"text": "hello"}).routing_head == ""
    assert ctx(COMPLETIONS, {"prompt": ["a", "b"]}).routing_head == ""
    by_tokens = ctx(CHAT, {"messages": [system, question]})
    by_tokens.route_by_tokens([1, 2, 3])
    assert by_tokens.routing_head == ""


def test_completions_and_embeddings_text():
    assert ctx(COMPLETIONS, {"prompt": ["a", "b"]}).routing_text == "a b"
    assert ctx(EMBEDDINGS, {"input": "vec"}).routing_text == "vec"


def test_body_is_kept_byte_for_byte():
    raw = b'{"text":  "spaced"  , "stream": true}'
    parsed = RequestContext(GENERATE, raw, "r")
    assert parsed.body is raw and parsed.stream is True and parsed.model is None


def test_inject_adds_fields_without_touching_the_original():
    parsed = ctx(GENERATE, {"text": "a", "model": "m"})
    assert orjson.loads(parsed.inject({"data_parallel_rank": 1})) == {
        "text": "a",
        "model": "m",
        "data_parallel_rank": 1,
    }
    assert orjson.loads(parsed.body) == {"text": "a", "model": "m"}


@pytest.mark.parametrize(
    "endpoint,raw,code,param",
    [
        (GENERATE, b"{nope", "invalid_json", None),
        (GENERATE, b"[1, 2]", "invalid_type", None),
        (CHAT, b'{"model": "m"}', "missing_required_parameter", "messages"),
        (CHAT, b'{"messages": []}', "invalid_type", "messages"),
        (COMPLETIONS, b'{"model": "m"}', "missing_required_parameter", "prompt"),
        (GENERATE, b'{"model": 3}', "invalid_type", "model"),
    ],
)
def test_invalid_requests_name_the_problem(endpoint, raw, code, param):
    with pytest.raises(InvalidRequest) as info:
        RequestContext(endpoint, raw, "r")
    assert info.value.code == code and info.value.param == param


def test_routing_by_tokens_shares_exactly_the_shared_token_prefix():
    first = RequestContext(GENERATE, b'{"text": "a"}', "r1")
    second = RequestContext(GENERATE, b'{"text": "b"}', "r2")
    first.route_by_tokens([5, 70000, 3, 9])
    second.route_by_tokens([5, 70000, 4])
    a, b = first.routing_text, second.routing_text
    assert len(a) == 4 * TOKEN_CHARS and len(b) == 3 * TOKEN_CHARS
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared == 2 * TOKEN_CHARS


def test_token_ids_route_alike_from_a_list_or_any_other_sequence():
    ids = [5, 70000, 3, 2**32 - 1]
    from_list, from_tuple = (RequestContext(GENERATE, b'{"text": "a"}', "r") for _ in range(2))
    from_list.route_by_tokens(ids)
    from_tuple.route_by_tokens(tuple(ids))
    assert from_list.routing_text == from_tuple.routing_text and from_list.by_tokens and from_tuple.by_tokens
