"""Client bodies -> `GenerateRequest`: explicit sampling fields, defaults, stops, constraints and the 400s."""

from __future__ import annotations

import orjson
import pytest

from shepherd.generation import build_embed_request, build_plan
from shepherd.routing.context import InvalidRequest
from shepherd.tokenizer.chat_template import ChatTemplate
from shepherd.tokenizer.loader import LoadedTokenizer, load_tokenizer
from tests.support.tiny_tokenizer import write_tiny_tokenizer_dir

EOS = 2
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> LoadedTokenizer:
    return load_tokenizer(write_tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def chat(tok, **body):
    return build_plan("chat", {"messages": USER, **body}, tok, "chatcmpl-1")


def test_every_sampling_field_is_sent_explicitly_with_sglang_defaults(tok):
    plan = chat(tok)
    request = plan.request
    params = request.sampling_params
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (1.0, 1.0, -1, 0.0)
    assert (params.frequency_penalty, params.presence_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert params.skip_special_tokens and params.spaces_between_special_tokens
    assert params.n == 1 and params.min_new_tokens == 0 and not params.ignore_eos and not params.no_stop_trim
    assert not params.HasField("max_new_tokens")  # the engine's default
    assert not params.stop and not params.stop_token_ids and params.WhichOneof("constraint") is None
    assert request.request_id == "chatcmpl-1"
    assert list(request.tokenized.input_ids) == tok.encode(tok.render_chat(USER)) == plan.prompt_ids
    assert request.logprob_start_len == -1 and not request.return_logprob and request.top_logprobs_num == 0
    assert not request.stream and not request.log_metrics
    assert (plan.kind, plan.n, plan.stream, plan.top_logprobs, plan.include_usage) == ("chat", 1, False, None, False)


def test_user_values_override_and_worker_defaults_fill_the_rest(tok):
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": "bad", "max_new_tokens": 7}
    body = {
        "temperature": 0.2,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "max_tokens": 10,
        "max_completion_tokens": 12,
        "min_tokens": 2,
        "n": 2,
        "ignore_eos": True,
        "no_stop_trim": True,
        "skip_special_tokens": False,
        "stop_token_ids": [5, 6],
        "logit_bias": {"42": -100, "7": 2.5},
        "seed": 1234,  # not a gRPC field: dropped
    }
    plan = build_plan("chat", {"messages": USER, **body}, tok, "r", defaults)
    params = plan.request.sampling_params
    assert params.temperature == pytest.approx(0.2) and params.top_p == pytest.approx(0.9) and params.top_k == 20
    assert params.repetition_penalty == 1.0  # a bad worker default is skipped, not blamed on the client
    assert params.min_p == pytest.approx(0.05) and params.presence_penalty == 0.5 and params.frequency_penalty == -0.5
    assert params.max_new_tokens == 12 and params.min_new_tokens == 2  # max_completion_tokens wins
    assert params.n == 2 and plan.n == 2
    assert params.ignore_eos and params.no_stop_trim and not params.skip_special_tokens
    assert list(params.stop_token_ids) == [5, 6]
    assert dict(params.logit_bias) == {"42": -100.0, "7": 2.5}
    assert EOS not in plan.stops.token_stops  # ignore_eos: the gateway does not stop on EOS either
    assert plan.stops.no_stop_trim and not plan.stops.skip_special_tokens


def test_max_tokens_zero_is_sent(tok):
    params = chat(tok, max_tokens=0).request.sampling_params
    assert params.HasField("max_new_tokens") and params.max_new_tokens == 0


def test_single_token_stops_go_to_the_engine_and_all_stops_stay_in_the_gateway(tok):
    paris, newline = tok.single_token_id("Paris"), tok.single_token_id("\n")
    plan = chat(tok, stop=["Paris", "\n", "XYZ", "Paris"], stop_token_ids=[7])
    params = plan.request.sampling_params
    assert not params.stop  # string stops are never sent
    assert list(params.stop_token_ids) == [7, paris, newline]
    assert plan.stops.strings == ("Paris", "\n", "XYZ")
    assert plan.stops.token_stops == {EOS: EOS, 7: 7, paris: "Paris", newline: "\n"}
    assert chat(tok, stop="XYZ").stops.strings == ("XYZ",)


@pytest.mark.parametrize(
    ("body", "constraint", "value"),
    [
        ({"response_format": {"type": "json_object"}}, "json_schema", '{"type":"object"}'),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}},
            "json_schema",
            '{"type":"integer"}',
        ),
        ({"response_format": {"type": "text"}}, None, None),
        ({"regex": "[0-9]+"}, "regex", "[0-9]+"),
        ({"ebnf": 'root ::= "a"'}, "ebnf_grammar", 'root ::= "a"'),
    ],
)
def test_constraints(tok, body, constraint, value):
    params = chat(tok, **body).request.sampling_params
    assert params.WhichOneof("constraint") == constraint
    if constraint:
        assert getattr(params, constraint) == value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"n": 0}, "n"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_completion_tokens": 2.5}, "max_completion_tokens"),
        ({"max_tokens": 2, "min_tokens": 3}, "min_tokens"),
        ({"stop": 5}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": "1"}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream": "yes"}, "stream"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"regex": "a", "response_format": {"type": "json_object"}}, "response_format"),
        ({"regex": "a", "ebnf": "b"}, "ebnf"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
        ({"tools": {"type": "function"}}, "tools"),
        ({"add_generation_prompt": "no"}, "add_generation_prompt"),
        # Values the proto's 32-bit fields cannot carry, and sizes the gateway will not hold.
        ({"max_tokens": 5_000_000_000}, "max_tokens"),
        ({"max_tokens": 1e300}, "max_tokens"),
        ({"top_k": 5e9}, "top_k"),
        ({"stop_token_ids": [5e9]}, "stop_token_ids"),
        ({"temperature": 1e300}, "temperature"),
        ({"n": 129}, "n"),
        ({"stop": ["x" * 20_000]}, "stop"),
        ({"stop": [f"s{i}" for i in range(33)]}, "stop"),
    ],
)
def test_bad_values_are_400s_naming_the_parameter(tok, body, param):
    with pytest.raises(InvalidRequest) as caught:
        chat(tok, **body)
    assert caught.value.param == param
    assert param.split(".")[-1] in str(caught.value)


def test_two_constraints_name_both(tok):
    with pytest.raises(InvalidRequest, match="regex, ebnf"):
        chat(tok, regex="a", ebnf="b")


def test_logprobs_and_stream_options(tok):
    plan = chat(tok, logprobs=True, top_logprobs=3, stream=True, stream_options={"include_usage": True})
    request = plan.request
    assert request.return_logprob and request.top_logprobs_num == 3 and request.logprob_start_len == -1
    assert request.stream and plan.stream and plan.include_usage and plan.top_logprobs == 3
    assert not chat(tok, stream_options={"include_usage": True}).include_usage  # only meaningful when streaming


def test_chat_template_inputs(tok):
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    plan = build_plan("chat", {"messages": messages, "tools": tools, "add_generation_prompt": False}, tok, "r")
    rendered = tok.render_chat(messages, add_generation_prompt=False, tools=tools)
    assert "get_weather" in rendered and "a\nb" in rendered and not rendered.endswith("assistant\n")
    assert plan.prompt_ids == tok.encode(rendered)


def test_continue_final_message_appends_the_assistant_text_after_rendering(tok):
    messages = [*USER, {"role": "assistant", "content": "The capital"}]
    plan = build_plan("chat", {"messages": messages, "continue_final_message": True}, tok, "r")
    assert tok.decode(plan.prompt_ids, False) == tok.render_chat(USER) + "The capital"


def test_template_kwargs_reach_the_template(tmp_path):
    template = "{% if shout %}LOUD {% endif %}{{ messages[0]['content'] }}"
    tok = load_tokenizer(write_tiny_tokenizer_dir(tmp_path, template))
    plan = build_plan("chat", {"messages": USER, "chat_template_kwargs": {"shout": True}}, tok, "r")
    assert tok.decode(plan.prompt_ids) == "LOUD Hi"


def test_template_failures_are_400s(tok):
    broken = LoadedTokenizer(tok.tokenizer, ChatTemplate("{{ raise_exception('no system role') }}"))
    with pytest.raises(InvalidRequest, match="no system role") as caught:
        build_plan("chat", {"messages": USER}, broken, "r")
    assert caught.value.param == "messages"
    with pytest.raises(InvalidRequest, match="no chat template"):
        build_plan("chat", {"messages": USER}, LoadedTokenizer(tok.tokenizer), "r")


@pytest.mark.parametrize("prompt", ["The capital", ["The capital"], "TOKENS", ["TOKENS"]])
def test_completion_prompts(tok, prompt):
    ids = tok.encode("The capital")
    if prompt == "TOKENS":
        prompt = ids
    elif prompt == ["TOKENS"]:
        prompt = [ids]
    plan = build_plan("completions", {"prompt": prompt, "logprobs": 2}, tok, "cmpl-1")
    assert plan.prompt_ids == ids and plan.kind == "completions"
    assert plan.request.return_logprob and plan.request.top_logprobs_num == 2 and plan.top_logprobs == 2


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": ["a", "b"]}, "prompt", "not supported over gRPC"),
        ({"prompt": [[1], [2]]}, "prompt", "not supported over gRPC"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": [1, 100000]}, "prompt", "outside the vocabulary"),
        ({"prompt": 5}, "prompt", "string or an array of token ids"),
        ({"prompt": "a", "echo": True}, "echo", "not supported"),
        ({"prompt": "a", "logprobs": -1}, "logprobs", "must be in"),
    ],
)
def test_completion_400s(tok, body, param, message):
    with pytest.raises(InvalidRequest, match=message) as caught:
        build_plan("completions", body, tok, "r")
    assert caught.value.param == param


def test_sglang_generate_request(tok):
    body = {
        "text": "The capital",
        "sampling_params": {
            "temperature": 0,
            "max_new_tokens": 16,
            "min_new_tokens": 1,
            "stop": "XYZ",
            "stop_token_ids": [9],
            "json_schema": {"type": "object"},
            "n": 1,
            "top_k": 0,
        },
        "return_logprob": True,
        "top_logprobs_num": 2,
        "logprob_start_len": 0,
        "stream": True,
    }
    plan = build_plan("generate", body, tok, "gnt-1")
    request = plan.request
    params = request.sampling_params
    assert params.temperature == 0 and params.max_new_tokens == 16 and params.min_new_tokens == 1
    assert params.top_k == -1 and list(params.stop_token_ids) == [9] and plan.stops.strings == ("XYZ",)
    assert orjson.loads(params.json_schema) == {"type": "object"}
    assert request.return_logprob and request.top_logprobs_num == 2 and request.logprob_start_len == 0
    assert request.stream and request.log_metrics
    assert plan.prompt_ids == tok.encode("The capital")
    ids_plan = build_plan("generate", {"input_ids": [5, 6]}, tok, "gnt-2")
    assert list(ids_plan.request.tokenized.input_ids) == [5, 6] and ids_plan.request.logprob_start_len == -1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "text"),
        ({"text": "a", "input_ids": [1]}, "text"),
        ({"text": ["a", "b"]}, "text"),
        ({"input_ids": [[1], [2]]}, "input_ids"),
        ({"text": "a", "sampling_params": []}, "sampling_params"),
        ({"text": "a", "sampling_params": {"max_new_tokens": -5}}, "max_new_tokens"),
        ({"text": "a", "sampling_params": {"regex": "a", "json_schema": "{}"}}, "json_schema"),
        ({"text": "a", "logprob_start_len": -2}, "logprob_start_len"),
    ],
)
def test_sglang_generate_400s(tok, body, param):
    with pytest.raises(InvalidRequest) as caught:
        build_plan("generate", body, tok, "r")
    assert caught.value.param == param


def test_embed_request(tok):
    request = build_embed_request({"input": "Hello world"}, tok, "embd-1")
    assert request.request_id == "embd-1" and list(request.tokenized.input_ids) == tok.encode("Hello world")
    assert list(build_embed_request({"input": [[5, 6]]}, tok, "e").tokenized.input_ids) == [5, 6]
    with pytest.raises(InvalidRequest, match="not supported over gRPC"):
        build_embed_request({"input": ["a", "b"]}, tok, "e")
    with pytest.raises(InvalidRequest) as caught:
        build_embed_request({"input": "a", "encoding_format": "int8"}, tok, "e")
    assert caught.value.param == "encoding_format"
