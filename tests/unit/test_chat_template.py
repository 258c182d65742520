"""Chat templates rendered like transformers: real-world templates, HF globals/filters, message preparation, sandbox."""

from __future__ import annotations

import json

import pytest

from shepherd.tokenizer.chat_template import ChatTemplate, ChatTemplateError, prepare_messages
from shepherd.tokenizer.loader import LoadedTokenizer, load_tokenizer
from tests.support.tiny_tokenizer import LLAMA3, write_tiny_tokenizer_dir

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Germany?"},
]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory) -> LoadedTokenizer:
    return load_tokenizer(write_tiny_tokenizer_dir(tmp_path_factory.mktemp("chatml")))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> LoadedTokenizer:
    directory = write_tiny_tokenizer_dir(
        tmp_path_factory.mktemp("llama3"), LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    return load_tokenizer(directory)


def render(source: str, messages: list[dict] | None = None, **kwargs) -> str:
    return ChatTemplate(source).render(messages or [{"role": "user", "content": "hi"}], **kwargs)


def test_chatml_renders_to_the_expected_ids(chatml: LoadedTokenizer) -> None:
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd of Germany?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    text = chatml.render_chat(CONVERSATION)
    assert text == expected
    ids = chatml.encode(text)
    assert ids == chatml.encode(expected)
    assert ids[0] == 1 and ids.count(1) == 5 and ids.count(2) == 4  # <|im_start|>, <|im_end|> are single tokens
    assert chatml.decode(ids, skip_special_tokens=False) == expected


def test_llama3_renders_bos_headers_and_trimmed_content(llama3: LoadedTokenizer) -> None:
    messages = [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "Hello world!"}]
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello world!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = llama3.encode(llama3.render_chat(messages))
    assert ids == llama3.encode(expected)
    assert ids[:2] == [3, 4] and llama3.eos_token_ids == (6,)


def test_add_generation_prompt_off(chatml: LoadedTokenizer) -> None:
    text = chatml.render_chat(CONVERSATION[:3], add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\nParis.<|im_end|>\n")


def test_content_parts_are_flattened_to_text(chatml: LoadedTokenizer) -> None:
    parts = [
        {"type": "text", "text": "Describe this."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "Briefly."},
    ]
    text = chatml.render_chat([{"role": "user", "content": parts}])
    assert text == "<|im_start|>user\nDescribe this.\nBriefly.<|im_end|>\n<|im_start|>assistant\n"


def test_tools_are_undefined_when_absent_and_rendered_when_given(chatml: LoadedTokenizer) -> None:
    source = "{% if tools is defined %}{{ tools | length }} tools{% else %}no tools{% endif %}"
    assert render(source) == "no tools"
    assert render(source, tools=[{"type": "function"}]) == "1 tools"
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    text = chatml.render_chat(CONVERSATION[:2], tools=[tool])
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}\n'
        "</tools><|im_end|>\n<|im_start|>user\n"
    )


def test_assistant_tool_calls_get_object_arguments_and_null_content(chatml: LoadedTokenizer) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*CONVERSATION[:2], {"role": "assistant", "tool_calls": [call]}]
    text = chatml.render_chat(messages, add_generation_prompt=False)
    assert text.endswith(
        '<|im_start|>assistant\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
    )


def test_prepare_messages_does_not_modify_its_input() -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": "not json"}}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}]},
        {"role": "assistant", "tool_calls": [call, {"type": "function", "function": {"name": "g", "arguments": "{}"}}]},
    ]
    snapshot = json.dumps(messages)
    prepared = prepare_messages(messages)
    assert json.dumps(messages) == snapshot
    assert prepared[0]["content"] == "a"
    assert prepared[1]["content"] is None
    assert [c["function"]["arguments"] for c in prepared[1]["tool_calls"]] == ["not json", {}]
    assert "content" not in prepare_messages([{"role": "tool", "tool_call_id": "x"}])[0]


def test_chat_template_kwargs_are_merged_but_cannot_override_reserved_names() -> None:
    source = (
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
        "{{ messages | length }}{{ add_generation_prompt }}"
    )
    assert render(source) == "1True"
    assert render(source, template_kwargs={"enable_thinking": True}) == "1True"
    assert render(source, template_kwargs={"enable_thinking": False}) == "<think>\n\n</think>\n\n1True"
    assert render(source, template_kwargs={"messages": [], "add_generation_prompt": False}) == "1True"


def test_special_tokens_are_template_variables() -> None:
    source = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
    assert render(source, special_tokens={"bos_token": "<s>", "eos_token": "</s>"}) == "<s>hi</s>"
    assert render(source) == "hi"  # an undefined variable prints as nothing, as in transformers


def test_tojson_keeps_non_ascii_and_takes_json_arguments() -> None:
    source = "{{ messages[0] | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}"
    out = render(source, [{"role": "user", "content": "Grüße 🦙 東京"}])
    left, right = out.split("|", 1)
    assert left == '{"role": "user", "content": "Grüße 🦙 東京"}'
    assert right == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}'
    assert render("{{ {'a': 1} | tojson(separators=(',', ':')) }}") == '{"a":1}'


def test_raise_exception_becomes_chat_template_error() -> None:
    source = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('System message required') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match=r"^System message required$"):
        render(source)


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{{ messages.append(1) }}", "unsafe"),
        ("{{ missing.attribute.deeper }}", "undefined"),
        ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    ],
)
def test_runtime_errors_become_chat_template_errors(source: str, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        render(source)


def test_syntax_error_is_reported_at_compile_time() -> None:
    with pytest.raises(ChatTemplateError, match=r"syntax error \(line 2\)"):
        ChatTemplate("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")


def test_hf_extras_generation_block_loop_controls_and_strftime() -> None:
    source = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
        "{{ strftime_now('%Y') | length }}"
    )
    assert render(source, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "[a]4"


def test_trim_and_lstrip_blocks() -> None:
    source = "{% for m in messages %}\n    {% if true %}\n{{ m['content'] }}\n    {% endif %}\n{% endfor %}"
    assert render(source) == "hi\n"


def test_render_chat_without_a_template_is_a_chat_template_error(chatml: LoadedTokenizer) -> None:
    bare = LoadedTokenizer(tokenizer=chatml.tokenizer, source="bare")
    with pytest.raises(ChatTemplateError, match="bare has no chat template"):
        bare.render_chat(CONVERSATION)
