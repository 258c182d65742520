"""Engine logprobs (`OutputLogProbs`, `InputLogProbs`) -> the OpenAI chat / completions and SGLang shapes."""

from __future__ import annotations

from typing import Any

from smg_grpc_proto import sglang_scheduler_pb2 as pb
from tokenizers import Tokenizer

# One output position: (token id, logprob, [(alternative id, its logprob), ...]).
Entry = tuple[int, float, list[tuple[int, float]]]


def take(logprobs: pb.OutputLogProbs, count: int) -> list[Entry]:
    """The first `count` positions (the ones the gateway kept before a stop)."""
    values, ids, tops = logprobs.token_logprobs, logprobs.token_ids, logprobs.top_logprobs
    entries = []
    for position in range(min(count, len(values), len(ids))):
        top = tops[position] if position < len(tops) else None
        alternatives = list(zip(top.token_ids, top.values, strict=False)) if top is not None else []
        entries.append((ids[position], values[position], alternatives))
    return entries


class TokenTexts:
    """Token id -> (text, UTF-8 bytes) as OpenAI logprobs show them; cached per response."""

    __slots__ = ("_cache", "_tokenizer")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        known = self._cache.get(token_id)
        if known is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            known = self._cache[token_id] = (text, list(text.encode()))
        return known


def chat_content(entries: list[Entry], texts: TokenTexts) -> list[dict[str, Any]]:
    """Entries of OpenAI chat `logprobs.content`."""
    content = []
    for token_id, logprob, alternatives in entries:
        text, raw = texts(token_id)
        top = []
        for alt_id, alt_logprob in alternatives:
            alt_text, alt_raw = texts(alt_id)
            top.append({"token": alt_text, "logprob": alt_logprob, "bytes": alt_raw})
        content.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": top})
    return content


def completion(entries: list[Entry], texts: TokenTexts, offset: int) -> tuple[dict[str, Any], int]:
    """OpenAI completions `logprobs` for `entries` whose text starts at character `offset`; also the next offset."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, logprob, alternatives in entries:
        text = texts(token_id)[0]
        tokens.append(text)
        token_logprobs.append(logprob)
        top_logprobs.append({texts(alt_id)[0]: alt_logprob for alt_id, alt_logprob in alternatives})
        text_offset.append(offset)
        offset += len(text)
    shape = {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
    return shape, offset


def sglang_output(entries: list[Entry], with_top: bool) -> dict[str, Any]:
    """SGLang meta_info `output_token_logprobs` ([logprob, id, null] per position) and `output_top_logprobs`."""
    fields: dict[str, Any] = {"output_token_logprobs": [[logprob, token_id, None] for token_id, logprob, _ in entries]}
    if with_top:
        fields["output_top_logprobs"] = [
            [[alt_logprob, alt_id, None] for alt_id, alt_logprob in alternatives] for _, _, alternatives in entries
        ]
    return fields


def sglang_input(logprobs: pb.InputLogProbs, with_top: bool) -> dict[str, Any]:
    """SGLang meta_info `input_token_logprobs` (the first prompt token has no logprob: null)."""
    values = [value.value if value.HasField("value") else None for value in logprobs.token_logprobs]
    fields: dict[str, Any] = {
        "input_token_logprobs": [
            [value, token_id, None] for value, token_id in zip(values, logprobs.token_ids, strict=False)
        ]
    }
    if with_top:
        fields["input_top_logprobs"] = [
            [[alt_logprob, alt_id, None] for alt_id, alt_logprob in zip(top.token_ids, top.values, strict=False)]
            or None
            for top in logprobs.top_logprobs
        ]
    return fields
