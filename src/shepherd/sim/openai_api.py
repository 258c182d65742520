"""OpenAI-compatible routes: chat/text completions, embeddings, rerank and the model list."""

from __future__ import annotations

import base64
import hashlib
import math
import os
import struct
import time
from typing import Any

from aiohttp import web

from shepherd.sim.engine import SequenceGroup
from shepherd.sim.parsing import check_context, int_field, token_prompts
from shepherd.sim.wire import (
    RequestError,
    SseStream,
    apply_inference_faults,
    json_response,
    read_json_object,
)
from shepherd.sim.worker import SimWorker


class OpenAiApi:
    def __init__(self, worker: SimWorker) -> None:
        self.worker = worker

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/models", self.models),
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
            web.post("/v1/embeddings", self.embeddings),
            web.post("/v1/rerank", self.rerank),
        ]

    async def models(self, request: web.Request) -> web.Response:
        cfg = self.worker.config
        card = {
            "id": cfg.model,
            "object": "model",
            "created": int(self.worker.started_at),
            "owned_by": "sglang",
            "root": cfg.model,
            "max_model_len": cfg.context_length,
        }
        return json_response({"object": "list", "data": [card]})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        prompts = [self.worker.prompts.chat(body.get("messages"))]
        default_new = int_field(body, "max_tokens", self.worker.config.max_new_tokens_default)
        max_new = int_field(body, "max_completion_tokens", default_new)
        return await self._complete(request, body, prompts, max_new, chat=True, batch=False)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        prompts, batch = token_prompts(body.get("prompt"), "prompt", self.worker.prompts.text)
        max_new = int_field(body, "max_tokens", self.worker.config.max_new_tokens_default)
        return await self._complete(request, body, prompts, max_new, chat=False, batch=batch)

    async def _complete(
        self,
        request: web.Request,
        body: dict[str, Any],
        prompts: list[list[int]],
        max_new: int,
        chat: bool,
        batch: bool,
    ) -> web.StreamResponse:
        """`batch`: the prompt was a list of prompts."""
        n = int_field(body, "n", 1, minimum=1)
        check_context(prompts, [max_new] * len(prompts), self.worker.config.context_length)
        stream = bool(body.get("stream"))
        options = body.get("stream_options")
        include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
        denied = await apply_inference_faults(request, self.worker.faults, stream)
        if denied is not None:
            return denied
        # PD batches (one bootstrap room per item): a prompt list, or a chat with several choices.
        items = len(prompts) if batch else (n if chat and n > 1 else None)
        rooms = await self.worker.handshake.before(body, items)
        dp_rank = body.get("data_parallel_rank")
        group = self.worker.submit(prompts, [max_new] * len(prompts), n, dp_rank if isinstance(dp_rank, int) else None)
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex(),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model") or self.worker.config.model,
        }
        try:
            if not stream:
                await group.wait()
                self.worker.handshake.after(rooms)
                choices = [_choice(s.index, s.text, chat) for s in group.seqs]
                return json_response({**head, "choices": choices, "usage": _usage(group, n)})
            return await self._stream(request, group, head, chat, include_usage, n, rooms)
        finally:
            if not group.done:
                group.abort()

    async def _stream(
        self,
        request: web.Request,
        group: SequenceGroup,
        head: dict[str, Any],
        chat: bool,
        include_usage: bool,
        n: int,
        rooms: list[int],
    ) -> web.StreamResponse:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        sse = SseStream(request, self.worker.faults.disconnect_after_chunks)
        await sse.open()
        sent_chars = [-1] * len(group.seqs)  # -1: nothing sent yet for that choice
        async for seq in group.updates():
            start = sent_chars[seq.index]
            if start < 0 and chat:
                # Like SGLang, a choice's role chunk goes out with its first output (after prefill).
                await sse.send({**head, "choices": [_chunk_choice(seq.index, {"role": "assistant", "content": ""})]})
            end = seq.completion.offsets[seq.generated]
            delta = seq.completion.text[max(start, 0) : end]
            sent_chars[seq.index] = end
            finish = "length" if seq.finished else None
            if chat:
                if delta:
                    await sse.send({**head, "choices": [_chunk_choice(seq.index, {"content": delta})]})
                if finish:
                    await sse.send({**head, "choices": [_chunk_choice(seq.index, {}, finish)]})
            else:
                choice = {"index": seq.index, "text": delta, "logprobs": None, "finish_reason": finish}
                await sse.send({**head, "choices": [choice]})
        self.worker.handshake.after(rooms)
        if include_usage:
            await sse.send({**head, "choices": [], "usage": _usage(group, n)})
        await sse.close()
        return sse.response

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        prompts, _ = token_prompts(body.get("input"), "input", self.worker.prompts.text)
        dims = int_field(body, "dimensions", 16, minimum=1)
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise RequestError("'encoding_format' must be 'float' or 'base64'")
        denied = await apply_inference_faults(request, self.worker.faults, False)
        if denied is not None:
            return denied
        data = []
        for index, prompt in enumerate(prompts):
            vector = _embedding(prompt, dims)
            encoded: Any = vector
            if fmt == "base64":
                encoded = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(len(p) for p in prompts)
        return json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model") or self.worker.config.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def rerank(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        query, documents = body.get("query"), body.get("documents")
        if not isinstance(query, str) or not isinstance(documents, list):
            raise RequestError("'query' must be a string and 'documents' a list of strings")
        if not all(isinstance(d, str) for d in documents):
            raise RequestError("'documents' must be a list of strings")
        denied = await apply_inference_faults(request, self.worker.faults, False)
        if denied is not None:
            return denied
        results = [{"score": _relevance(query, doc), "document": doc, "index": i} for i, doc in enumerate(documents)]
        results.sort(key=lambda r: r["score"], reverse=True)
        return json_response(results)


def _choice(index: int, text: str, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index}
    if chat:
        choice["message"] = {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": None}
    else:
        choice["text"] = text
    choice.update(logprobs=None, finish_reason="length", matched_stop=None)
    return choice


def _chunk_choice(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _usage(group: SequenceGroup, n: int) -> dict[str, Any]:
    """Usage like SGLang's: prompt (and cached) tokens count once per prompt, not per choice."""
    firsts = group.seqs[::n]
    prompt = sum(len(s.prompt_ids) for s in firsts)
    completion = sum(s.generated for s in group.seqs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in firsts)},
    }


def _embedding(tokens: list[int], dims: int) -> list[float]:
    """A unit vector derived from the token ids (same input, same vector, in any process)."""
    raw = hashlib.shake_128(struct.pack("<q", hash(tuple(tokens)))).digest(4 * dims)
    values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{dims}I", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _relevance(query: str, document: str) -> float:
    """Share of the query's words found in the document, in [0, 1]."""
    words = set(query.lower().split())
    if not words:
        return 0.0
    return len(words & set(document.lower().split())) / len(words)
