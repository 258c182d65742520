"""Validation of request fields shared by the SGLang-native and OpenAI-style routes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shepherd.sim.tokenizer import tokenize
from shepherd.sim.wire import RequestError


def int_field(body: dict[str, Any], name: str, default: int, minimum: int = 0) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RequestError(f"'{name}' must be an integer >= {minimum}")
    return value


def token_prompts(value: Any, name: str, encode: Callable[[str], list[int]] = tokenize) -> tuple[list[list[int]], bool]:
    """Prompts given as a string, a list of strings (`encode`d), token ids, or lists of token ids.

    Returns the token lists and whether the input was a batch.
    """
    if isinstance(value, str):
        return [encode(value)], False
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [encode(v) for v in value], True
        if all(_is_token_id(v) for v in value):
            return [value], False
        if all(isinstance(v, list) and all(_is_token_id(t) for t in v) for v in value):
            return value, True
    raise RequestError(f"'{name}' must be a string, a list of strings, or (lists of) token ids")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """`messages` checked: a non-empty list of objects whose content is a string, content parts or null."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict):
            raise RequestError("each message must be an object")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise RequestError("message content must be a string or a list of content parts")
    return messages


def chat_prompt_text(messages: Any) -> str:
    """The simulated chat template: message contents concatenated in order (text parts only)."""
    parts: list[str] = []
    for message in chat_messages(messages):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "".join(parts)


def check_context(prompts: list[list[int]], max_new_tokens: list[int], context_length: int) -> None:
    for prompt, new in zip(prompts, max_new_tokens, strict=True):
        if len(prompt) + new > context_length:
            raise RequestError(
                f"Requested token count exceeds the model's maximum context length of {context_length} "
                f"tokens. You requested a total of {len(prompt) + new} tokens: {len(prompt)} tokens from "
                f"the input and {new} tokens for the completion."
            )
