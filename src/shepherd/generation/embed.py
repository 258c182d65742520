"""/v1/embeddings over gRPC: the body -> `EmbedRequest`, and `EmbedResponse` -> the OpenAI embeddings body."""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from typing import Any

import orjson
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from shepherd.generation.prompt import single_prompt
from shepherd.routing.context import InvalidRequest
from shepherd.tokenizer.loader import LoadedTokenizer

ENCODING_FORMATS = ("float", "base64")


def build_embed_request(payload: Mapping[str, Any], tokenizer: LoadedTokenizer, request_id: str) -> pb.EmbedRequest:
    """`input` is a string or token ids (a list holding one of them is accepted; a batch is a 400)."""
    if payload.get("encoding_format", "float") not in ENCODING_FORMATS:
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", "invalid_value", "encoding_format")
    if payload.get("dimensions") is not None:
        raise InvalidRequest("'dimensions' is not supported over gRPC", "unsupported_parameter", "dimensions")
    ids = single_prompt(payload.get("input"), "input", tokenizer)
    return pb.EmbedRequest(request_id=request_id, tokenized=pb.TokenizedInput(input_ids=ids))


def embedding_body(response: pb.EmbedResponse, model: str, encoding_format: str = "float") -> bytes:
    """The OpenAI embeddings body; "base64" carries the vector as little-endian float32, as OpenAI does."""
    values = response.embedding
    if encoding_format == "base64":
        embedding: Any = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    else:
        embedding = list(values)
    body = {
        "object": "list",
        "data": [{"object": "embedding", "embedding": embedding, "index": 0}],
        "model": model,
        "usage": {"prompt_tokens": response.prompt_tokens, "total_tokens": response.prompt_tokens},
    }
    return orjson.dumps(body)
