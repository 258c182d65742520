"""Client prompts -> prompt token ids: chat messages through the chat template, text, or token ids.

Text is encoded without added special tokens (a chat template already placed them, reference 2.2 step 4). A batch of
several prompts is refused: one gRPC `Generate` call carries one prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shepherd.generation.sampling import boolean, integer
from shepherd.routing.context import CHAT, COMPLETIONS, GENERATE, Endpoint, InvalidRequest
from shepherd.tokenizer.chat_template import ChatTemplateError, prepare_messages
from shepherd.tokenizer.loader import LoadedTokenizer


def prompt_ids(endpoint: Endpoint, payload: Mapping[str, Any], tokenizer: LoadedTokenizer) -> list[int]:
    """The prompt's token ids for a chat, completions or /generate body; InvalidRequest for any other or a bad one."""
    build = _BUILDERS.get(endpoint)
    if build is None:
        raise InvalidRequest(f"{endpoint.path} has no prompt", "invalid_request")
    return build(payload, tokenizer)


def chat_prompt(payload: Mapping[str, Any], tokenizer: LoadedTokenizer) -> list[int]:
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", "invalid_type", "messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                "Each entry of 'messages' must be an object with a string 'role'", "invalid_type", "messages"
            )
    tools = payload.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array", "invalid_type", "tools")
    template_kwargs = payload.get("chat_template_kwargs")
    if template_kwargs is not None and not isinstance(template_kwargs, dict):
        raise InvalidRequest("'chat_template_kwargs' must be an object", "invalid_type", "chat_template_kwargs")
    add_generation_prompt = payload.get("add_generation_prompt", True)
    boolean(add_generation_prompt, "add_generation_prompt")
    # continue_final_message: render without the final assistant message, then append its text (as SMG does).
    continuation = ""
    if payload.get("continue_final_message") and messages[-1].get("role") == "assistant":
        content = prepare_messages(messages[-1:])[0].get("content")
        continuation = content if isinstance(content, str) else ""
        messages = messages[:-1]
    try:
        text = tokenizer.render_chat(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, template_kwargs=template_kwargs
        )
    except ChatTemplateError as exc:
        raise InvalidRequest(f"Failed to apply the chat template: {exc}", "invalid_request", "messages") from None
    return _non_empty(tokenizer.encode(text + continuation), "messages")


def completion_prompt(payload: Mapping[str, Any], tokenizer: LoadedTokenizer) -> list[int]:
    if payload.get("echo"):
        raise InvalidRequest("'echo' is not supported over gRPC", "unsupported_parameter", "echo")
    if payload.get("suffix"):
        raise InvalidRequest("'suffix' is not supported over gRPC", "unsupported_parameter", "suffix")
    return single_prompt(payload.get("prompt"), "prompt", tokenizer)


def generate_prompt(payload: Mapping[str, Any], tokenizer: LoadedTokenizer) -> list[int]:
    text, input_ids = payload.get("text"), payload.get("input_ids")
    if (text is None) == (input_ids is None):
        raise InvalidRequest("Exactly one of 'text' or 'input_ids' must be given", "invalid_request", "text")
    if text is not None:
        if not isinstance(text, str):
            raise InvalidRequest("Batched 'text' is not supported over gRPC", "unsupported_parameter", "text")
        return _non_empty(tokenizer.encode(text), "text")
    if isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], list):
        raise InvalidRequest("Batched 'input_ids' are not supported over gRPC", "unsupported_parameter", "input_ids")
    return _token_prompt(input_ids, "input_ids", tokenizer)


def single_prompt(prompt: Any, param: str, tokenizer: LoadedTokenizer) -> list[int]:
    """A string, a token id array, or a list holding exactly one of those."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) > 1:
            raise InvalidRequest(
                f"A batch of several prompts in '{param}' is not supported over gRPC", "unsupported_parameter", param
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        return _non_empty(tokenizer.encode(prompt), param)
    return _token_prompt(prompt, param, tokenizer)


def _token_prompt(value: Any, param: str, tokenizer: LoadedTokenizer) -> list[int]:
    if not isinstance(value, list):
        raise InvalidRequest(f"'{param}' must be a string or an array of token ids", "invalid_type", param)
    ids = [integer(token_id, param) for token_id in value]
    vocab_size = tokenizer.vocab_size
    if any(not 0 <= token_id < vocab_size for token_id in ids):
        raise InvalidRequest(
            f"'{param}' has token ids outside the vocabulary (0..{vocab_size - 1})", "invalid_value", param
        )
    return _non_empty(ids, param)


def _non_empty(ids: list[int], param: str) -> list[int]:
    if not ids:
        raise InvalidRequest(f"'{param}' must not be empty", "invalid_value", param)
    return ids


_BUILDERS = {CHAT: chat_prompt, COMPLETIONS: completion_prompt, GENERATE: generate_prompt}
