"""A worker's `GenerateResponse` stream -> the client's bytes (reference 2.2 steps 8-9, "Other endpoints").

A builder is fed every message of one attempt in order: `feed` returns the SSE frames to write now (b"" when not
streaming), `finish` the rest after the gRPC stream ended (the remaining frames and `data: [DONE]`, or the whole JSON
body), and `error_frame` ends a stream that failed midway.

Per choice (`index`): ids go through a `ChoiceDecoder`; in stream mode `complete.output_ids` repeat the last chunk's
ids, so they are decoded only when no chunk came for that index. Once the gateway's decoder stops a choice, later
engine output for it only updates the token counts, which are always the engine's (a hidden EOS is counted).
`finish_reason` is "stop" when the gateway stopped the choice, else the engine's; `matched_stop` is the matched stop
string or token id, else the engine's. The response `id` is the gRPC `request_id`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import orjson
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from shepherd.generation import logprobs as lp
from shepherd.generation.decode import ChoiceDecoder

if TYPE_CHECKING:
    from collections.abc import Sequence

    from shepherd.generation.request import GenerationPlan

DONE = b"data: [DONE]\n\n"


class Choice:
    """One choice's decoder, output and counts."""

    __slots__ = (
        "cached_tokens",
        "closed",
        "completion_tokens",
        "decoder",
        "engine_finish",
        "engine_matched",
        "index",
        "input_logprobs",
        "logprobs",
        "logprobs_sent",
        "output_ids",
        "prompt_tokens",
        "reasoning_tokens",
        "saw_chunk",
        "started",
        "text_parts",
    )

    def __init__(self, index: int, decoder: ChoiceDecoder) -> None:
        self.index = index
        self.decoder = decoder
        self.text_parts: list[str] = []  # joined only when a whole text is needed (no quadratic concatenation)
        self.output_ids: list[int] = []
        self.logprobs: list[lp.Entry] = []
        self.logprobs_sent = 0  # stream: entries already attached to a frame
        self.input_logprobs: pb.InputLogProbs | None = None
        self.started = False  # stream: a first frame was sent
        self.saw_chunk = False
        self.closed = False  # no more output: finished or stopped by the gateway
        self.engine_finish: str | None = None
        self.engine_matched: int | str | None = None
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = self.reasoning_tokens = 0

    @property
    def finish_reason(self) -> str:
        """A choice the engine never completed (the stream ended without its `complete`) reports "abort"."""
        if self.decoder.stopped:
            return "stop"
        return self.engine_finish or "abort"

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def matched_stop(self) -> int | str | None:
        return self.decoder.matched_stop if self.decoder.stopped else self.engine_matched

    def count(self, message: pb.GenerateStreamChunk | pb.GenerateComplete) -> None:
        self.prompt_tokens = message.prompt_tokens
        self.completion_tokens = message.completion_tokens
        self.cached_tokens = message.cached_tokens
        self.reasoning_tokens = message.reasoning_tokens

    def unsent_logprobs(self) -> list[lp.Entry]:
        entries = self.logprobs[self.logprobs_sent :]
        self.logprobs_sent = len(self.logprobs)
        return entries


class ResponseBuilder(ABC):
    """The decoding shared by the three response shapes; subclasses frame the output."""

    def __init__(self, plan: GenerationPlan, model: str, created: int) -> None:
        self.plan = plan
        self.model = model
        self.created = created
        self.id = plan.request.request_id
        self._stream = plan.stream
        self._tokenizer = plan.tokenizer.tokenizer
        self._want_logprobs = plan.top_logprobs is not None
        self._texts = lp.TokenTexts(self._tokenizer)
        self._choices: dict[int, Choice] = {}

    def feed(self, message: pb.GenerateResponse) -> bytes:
        """Takes the next worker message; returns the SSE bytes to write now (always b"" when not streaming)."""
        kind = message.WhichOneof("response")
        if kind == "chunk":
            chunk = message.chunk
            choice = self._choice(chunk.index)
            choice.saw_chunk = True
            choice.count(chunk)
            if chunk.HasField("input_logprobs"):
                choice.input_logprobs = chunk.input_logprobs
            logprobs = chunk.output_logprobs if chunk.HasField("output_logprobs") else None
            return self._advance(choice, chunk.token_ids, logprobs, final=False)
        if kind == "complete":
            complete = message.complete
            choice = self._choice(complete.index)
            choice.count(complete)
            choice.engine_finish = complete.finish_reason or None
            matched = complete.WhichOneof("matched_stop")
            choice.engine_matched = getattr(complete, matched) if matched else None
            if choice.saw_chunk:  # stream: output_ids repeat the last chunk's ids
                return self._advance(choice, (), None, final=True)
            if complete.HasField("input_logprobs"):
                choice.input_logprobs = complete.input_logprobs
            logprobs = complete.output_logprobs if complete.HasField("output_logprobs") else None
            return self._advance(choice, complete.output_ids, logprobs, final=True)
        return b""

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the engine reported it found cached (the most over the choices, as `usage` reports)."""
        return max((choice.cached_tokens for choice in self._choices.values()), default=0)

    def finish(self) -> bytes:
        """After the gRPC stream ended: the remaining SSE frames and [DONE], or the whole JSON body."""
        for index in range(self.plan.n):
            self._choice(index)
        choices = sorted(self._choices.values(), key=lambda choice: choice.index)
        if not self._stream:
            for choice in choices:
                self._advance(choice, (), None, final=True)
            return self._body(choices)
        frames = [self._advance(choice, (), None, final=True) for choice in choices]
        frames.append(self._stream_tail(choices))
        return b"".join(frames)

    def error_frame(self, message: str) -> bytes:
        """Ends a stream that failed after it started (the HTTP status is already sent)."""
        error = {"error": {"message": f"Stream error: {message}", "type": "internal_error"}}
        return b"data: " + orjson.dumps(error) + b"\n\n" + DONE

    def _choice(self, index: int) -> Choice:
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = Choice(index, ChoiceDecoder(self._tokenizer, self.plan.stops))
        return choice

    def _advance(self, choice: Choice, ids: Sequence[int], logprobs: pb.OutputLogProbs | None, *, final: bool) -> bytes:
        if choice.closed:
            return b""
        decoder = choice.decoder
        ids = list(ids)
        text = decoder.feed(ids)
        kept = ids[: decoder.consumed]
        if logprobs is not None and self._want_logprobs:
            choice.logprobs.extend(lp.take(logprobs, decoder.consumed))
        if final:
            text += decoder.flush()
        if text:
            choice.text_parts.append(text)
        choice.output_ids.extend(kept)
        done = final or decoder.stopped
        frames = self._frames(choice, text, kept, done) if self._stream else b""
        choice.closed = done
        return frames

    @abstractmethod
    def _frames(self, choice: Choice, text: str, kept: list[int], done: bool) -> bytes:
        """Stream frames for new `text` / `kept` ids of a choice, and its last frame when `done`."""

    @abstractmethod
    def _stream_tail(self, choices: list[Choice]) -> bytes:
        """What ends a stream after every choice is done."""

    @abstractmethod
    def _body(self, choices: list[Choice]) -> bytes:
        """The non-stream JSON body."""


def _usage(choices: list[Choice]) -> dict[str, Any]:
    """One prompt, n completions: prompt and cached tokens once, completion tokens summed."""
    prompt = max(choice.prompt_tokens for choice in choices)
    completion = sum(choice.completion_tokens for choice in choices)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": max(choice.cached_tokens for choice in choices)},
    }
    reasoning = sum(choice.reasoning_tokens for choice in choices)
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


class _OpenAIResponse(ResponseBuilder, ABC):
    """Chat and text completions: per-index delta frames, a finish frame, optional usage frame, [DONE]."""

    CHUNK_OBJECT = ""
    BODY_OBJECT = ""

    def __init__(self, plan: GenerationPlan, model: str, created: int) -> None:
        super().__init__(plan, model, created)
        # Frames are pre-encoded constant bytes around the variable parts: `_head` + index + part + `}]}`.
        self._head = b"".join(
            (
                b'data: {"id":',
                orjson.dumps(self.id),
                b',"object":"',
                self.CHUNK_OBJECT.encode(),
                b'","created":',
                str(created).encode(),
                b',"model":',
                orjson.dumps(model),
                b',"choices":[{"index":',
            )
        )

    def _frame(self, choice: Choice, part: bytes) -> bytes:
        return self._head + str(choice.index).encode() + part + b"}]}\n\n"

    def _frames(self, choice: Choice, text: str, kept: list[int], done: bool) -> bytes:
        frames = b""
        if not choice.started:
            choice.started = True
            frames = self._first_frame(choice)
        if text:
            logprobs = self._logprobs_json(choice)
            frames += self._frame(choice, self._delta(text) + b',"logprobs":' + logprobs + b',"finish_reason":null')
        if done:
            finish = orjson.dumps(choice.finish_reason)
            matched = orjson.dumps(choice.matched_stop)
            part = b',"logprobs":' + self._logprobs_json(choice) + b',"finish_reason":' + finish
            frames += self._frame(choice, self._delta("") + part + b',"matched_stop":' + matched)
        return frames

    def _stream_tail(self, choices: list[Choice]) -> bytes:
        if not self.plan.include_usage:
            return DONE
        usage = {
            "id": self.id,
            "object": self.CHUNK_OBJECT,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": _usage(choices),
        }
        return b"data: " + orjson.dumps(usage) + b"\n\n" + DONE

    def _body(self, choices: list[Choice]) -> bytes:
        body = {
            "id": self.id,
            "object": self.BODY_OBJECT,
            "created": self.created,
            "model": self.model,
            "choices": [self._choice_json(choice) for choice in choices],
            "usage": _usage(choices),
        }
        return orjson.dumps(body)

    def _logprobs_json(self, choice: Choice) -> bytes:
        """The logprobs not yet sent for this choice, as JSON (`null` when not requested or none are new)."""
        entries = choice.unsent_logprobs() if self._want_logprobs else None
        return orjson.dumps(self._logprobs(choice, entries)) if entries else b"null"

    def _first_frame(self, choice: Choice) -> bytes:
        return b""

    @abstractmethod
    def _delta(self, text: str) -> bytes:
        """The frame part carrying `text` ("" in the finish frame)."""

    @abstractmethod
    def _logprobs(self, choice: Choice, entries: list[lp.Entry]) -> Any:
        """`entries` in this endpoint's logprobs shape."""

    @abstractmethod
    def _choice_json(self, choice: Choice) -> dict[str, Any]:
        """One element of the non-stream `choices`."""


class ChatResponse(_OpenAIResponse):
    """/v1/chat/completions: `chat.completion` / `chat.completion.chunk` with a first role delta per index."""

    CHUNK_OBJECT = "chat.completion.chunk"
    BODY_OBJECT = "chat.completion"
    _ROLE = b',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null'

    def _first_frame(self, choice: Choice) -> bytes:
        return self._frame(choice, self._ROLE)

    def _delta(self, text: str) -> bytes:
        return b',"delta":{"content":' + orjson.dumps(text) + b"}" if text else b',"delta":{}'

    def _logprobs(self, choice: Choice, entries: list[lp.Entry]) -> dict[str, Any]:
        return {"content": lp.chat_content(entries, self._texts)}

    def _choice_json(self, choice: Choice) -> dict[str, Any]:
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": self._logprobs(choice, choice.logprobs) if self._want_logprobs else None,
            "finish_reason": choice.finish_reason,
            "matched_stop": choice.matched_stop,
        }


class CompletionResponse(_OpenAIResponse):
    """/v1/completions: `text_completion` objects with `choices[i].text`."""

    CHUNK_OBJECT = "text_completion"
    BODY_OBJECT = "text_completion"

    def __init__(self, plan: GenerationPlan, model: str, created: int) -> None:
        super().__init__(plan, model, created)
        self._offsets: dict[int, int] = {}  # per index: where the next logprob token starts in the text

    def _delta(self, text: str) -> bytes:
        return b',"text":' + orjson.dumps(text)

    def _logprobs(self, choice: Choice, entries: list[lp.Entry]) -> dict[str, Any]:
        shape, self._offsets[choice.index] = lp.completion(entries, self._texts, self._offsets.get(choice.index, 0))
        return shape

    def _choice_json(self, choice: Choice) -> dict[str, Any]:
        return {
            "index": choice.index,
            "text": choice.text,
            "logprobs": self._logprobs(choice, choice.logprobs) if self._want_logprobs else None,
            "finish_reason": choice.finish_reason,
            "matched_stop": choice.matched_stop,
        }


class SglangGenerateResponse(ResponseBuilder):
    """SGLang's native /generate.

    Non-stream: like SGLang's own HTTP server, one object for a single prompt with n == 1 and a list for n > 1
    (SMG always answers a list). Stream: one event per engine chunk with the ACCUMULATED text and that chunk's new
    `output_ids`, the final event (with `finish_reason`) adds no ids already sent, then `data: [DONE]`; so
    concatenating `output_ids` over the events gives the output. With n > 1, `meta_info.id` is "<rid>-<index>".
    Logprobs in `meta_info` are cumulative, as SGLang streams them.
    """

    def _frames(self, choice: Choice, text: str, kept: list[int], done: bool) -> bytes:
        if not kept and not done:
            return b""
        event = {"text": choice.text, "output_ids": kept, "meta_info": self._meta(choice, done)}
        return b"data: " + orjson.dumps(event) + b"\n\n"

    def _stream_tail(self, choices: list[Choice]) -> bytes:
        return DONE

    def _body(self, choices: list[Choice]) -> bytes:
        outputs = [
            {"text": choice.text, "output_ids": choice.output_ids, "meta_info": self._meta(choice, True)}
            for choice in choices
        ]
        return orjson.dumps(outputs[0] if len(outputs) == 1 else outputs)

    def _meta(self, choice: Choice, done: bool) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": self.id if self.plan.n == 1 else f"{self.id}-{choice.index}",
            "finish_reason": self._finish_reason(choice) if done else None,
            "prompt_tokens": choice.prompt_tokens,
            "completion_tokens": choice.completion_tokens,
            "cached_tokens": choice.cached_tokens,
        }
        if done:
            meta["matched_stop"] = choice.matched_stop
            meta["e2e_latency"] = time.perf_counter() - self.plan.started
        if self._want_logprobs:
            with_top = bool(self.plan.top_logprobs)
            meta.update(lp.sglang_output(choice.logprobs, with_top))
            if choice.input_logprobs is not None:
                meta.update(lp.sglang_input(choice.input_logprobs, with_top))
        return meta

    @staticmethod
    def _finish_reason(choice: Choice) -> dict[str, Any]:
        """SGLang's finish_reason object: {"type": "stop", "matched": ...} / {"type": "length", "length": n}."""
        reason = choice.finish_reason
        if reason == "stop":
            return {"type": "stop", "matched": choice.matched_stop}
        if reason == "length":
            return {"type": "length", "length": choice.completion_tokens}
        return {"type": reason}


BUILDERS: dict[str, type[ResponseBuilder]] = {
    "chat": ChatResponse,
    "completions": CompletionResponse,
    "generate": SglangGenerateResponse,
}
