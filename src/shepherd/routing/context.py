"""What the gateway knows about one inference request, parsed once from the client's bytes."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An inference route: its metric/label name, the worker path it goes to, and what it requires."""

    name: str
    path: str
    upstream_path: str
    required: str | None = None
    id_prefix: str = "req-"


GENERATE = Endpoint("generate", "/generate", "/generate", id_prefix="gnt-")
CHAT = Endpoint("chat", "/v1/chat/completions", "/v1/chat/completions", "messages", "chatcmpl-")
COMPLETIONS = Endpoint("completions", "/v1/completions", "/v1/completions", "prompt", "cmpl-")
EMBEDDINGS = Endpoint("embeddings", "/v1/embeddings", "/v1/embeddings", "input")
RERANK = Endpoint("rerank", "/v1/rerank", "/v1/rerank", "query")
RERANK_LEGACY = Endpoint("rerank", "/rerank", "/v1/rerank", "query")
INFERENCE_ENDPOINTS = (GENERATE, CHAT, COMPLETIONS, EMBEDDINGS, RERANK, RERANK_LEGACY)
TOKEN_CHARS = 4  # characters of routing text per token id (RequestContext.route_by_tokens)


class InvalidRequest(ValueError):
    """The client's body cannot be served; `param` names the offending field when there is one."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class RequestContext:
    """A parsed inference request. `body` stays the client's bytes unless fields must be injected."""

    __slots__ = (
        "_routing_head",
        "_routing_text",
        "body",
        "by_tokens",
        "endpoint",
        "generation",
        "model",
        "payload",
        "predictions",
        "request_id",
        "stream",
    )

    def __init__(self, endpoint: Endpoint, body: bytes, request_id: str) -> None:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"Failed to parse the request body as JSON: {exc}", "invalid_json") from None
        if not isinstance(payload, dict):
            raise InvalidRequest("The request body must be a JSON object", "invalid_type")
        required = endpoint.required
        if required is not None and required not in payload:
            raise InvalidRequest(f"Missing required parameter '{required}'", "missing_required_parameter", required)
        if endpoint is CHAT:
            messages = payload["messages"]
            if not isinstance(messages, list) or not messages:
                raise InvalidRequest("'messages' must be a non-empty array", "invalid_type", "messages")
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidRequest("'model' must be a string", "invalid_type", "model")
        self.endpoint = endpoint
        self.body = body
        self.payload: dict[str, Any] = payload
        self.model: str | None = model or None
        self.stream = payload.get("stream") is True
        self.request_id = request_id
        self._routing_text: str | None = None
        self._routing_head = ""
        self.by_tokens = False  # the routing text is the prompt's token ids (route_by_tokens), not its text
        self.generation: Any = None  # gRPC workers: (model id, its tokenized GenerationPlan), built once per model
        self.predictions: dict[Any, Any] | None = None  # cache_aware, per worker picked: what it expected of it

    def release_pending(self) -> None:
        """The request is over, however it ended: no prefill charged to a worker for it stays pending."""
        predictions = self.predictions
        if predictions:
            for prediction in predictions.values():
                prediction.release()
            predictions.clear()

    @property
    def routing_text(self) -> str:
        """The text a cache-aware policy matches on; computed on first use only."""
        text = self._routing_text
        return self._extract_routing_text() if text is None else text

    @property
    def routing_head(self) -> str:
        """A chat's first message when more follow (its system prompt, usually): the start of `routing_text` that
        many requests repeat verbatim, so the keys of its blocks can be remembered. Empty otherwise."""
        if self._routing_text is None:
            self._extract_routing_text()
        return self._routing_head

    def forget_routing_text(self) -> None:
        """The attempt's worker is chosen: a request in flight need not hold a copy of its prompt (8 KB for an 8k
        prompt); a retry extracts it again. Token ids cannot be extracted again: they stay."""
        if not self.by_tokens:
            self._routing_text = None
            self._routing_head = ""

    def _extract_routing_text(self) -> str:
        if self.endpoint is CHAT:
            text, self._routing_head = _chat_text(self.payload.get("messages"))
        else:
            text = extract_routing_text(self.endpoint, self.payload)
        self._routing_text = text
        return text

    def route_by_tokens(self, token_ids: Sequence[int]) -> None:
        """Match prefixes on the prompt's token ids (what the engine caches) instead of its text.

        Each id is indexed as its 4 little-endian bytes, one character each: built in C, about as long as the
        text it encodes (TOKEN_CHARS characters per token), and two prompts share an indexed prefix exactly when
        they share a token prefix.
        """
        packed = array("I")
        if isinstance(token_ids, list):
            packed.fromlist(token_ids)  # a third faster than the constructor's path for any iterable
        else:
            packed.extend(token_ids)
        self._routing_text = packed.tobytes().decode("latin-1")
        self._routing_head = ""
        self.by_tokens = True

    def inject(self, fields: dict[str, Any]) -> bytes:
        """The body with extra fields set (PD bootstrap info, DP rank); the client's bytes are not touched."""
        return orjson.dumps({**self.payload, **fields})


def extract_routing_text(endpoint: Endpoint, payload: dict[str, Any]) -> str:
    if endpoint is GENERATE:
        text = payload.get("text")
        if isinstance(text, str):
            return text
        if isinstance(text, list):
            return " ".join(t for t in text if isinstance(t, str))
        return _join_ids(payload.get("input_ids"))
    if endpoint is CHAT:
        return _chat_text(payload.get("messages"))[0]
    if endpoint is COMPLETIONS:
        return _text_or_list(payload.get("prompt"))
    if endpoint is EMBEDDINGS:
        return _text_or_list(payload.get("input"))
    return _text_or_list(payload.get("query"))


def _text_or_list(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(v if isinstance(v, str) else _join_ids(v) for v in value)
    return ""


def _join_ids(ids: Any) -> str:
    if not isinstance(ids, list):
        return ""
    parts: list[str] = []
    for item in ids:
        if isinstance(item, list):
            parts.extend(str(i) for i in item)
        else:
            parts.append(str(item))
    return " ".join(parts)


def _chat_text(messages: Any) -> tuple[str, str]:
    """The messages' texts joined, and the first of them when there are several (see `routing_head`)."""
    if not isinstance(messages, list):
        return "", ""
    texts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            if content:
                texts.append(content)
        elif isinstance(content, list):
            parts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
            if parts:
                texts.append(" ".join(parts))
        reasoning = message.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            texts.append(reasoning)
    return " ".join(texts), texts[0] if len(texts) > 1 else ""
