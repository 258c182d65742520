"""A parsed client body -> the `GenerateRequest` for an SGLang gRPC worker, plus what answering it needs.

Three request kinds share one pipeline (reference 2.2): "chat" (/v1/chat/completions: chat template, then encode
without special tokens), "completions" (/v1/completions) and "generate" (SGLang's native /generate).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from smg_grpc_proto import sglang_scheduler_pb2 as pb

from shepherd.generation.decode import StopConfig
from shepherd.generation.prompt import chat_prompt, completion_prompt, generate_prompt
from shepherd.generation.sampling import (
    OPENAI_NAMES,
    SGLANG_NAMES,
    boolean,
    build_sampling,
    gather,
    integer,
    response_format_constraint,
)
from shepherd.routing.context import InvalidRequest
from shepherd.tokenizer.loader import LoadedTokenizer

if TYPE_CHECKING:
    from shepherd.generation.response import ResponseBuilder

Kind = Literal["chat", "completions", "generate"]

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class GenerationPlan:
    """Everything one generation needs, built once per client request and shared by its attempts.

    `request` is the proto to send; the caller copies it before setting per-attempt fields (`data_parallel_rank`,
    `disaggregated_params`). `top_logprobs` is None when logprobs were not requested.
    """

    kind: Kind
    request: pb.GenerateRequest
    prompt_ids: list[int]
    stream: bool
    n: int
    tokenizer: LoadedTokenizer
    stops: StopConfig
    top_logprobs: int | None
    include_usage: bool
    started: float  # time.perf_counter() when the plan was built, for /generate's e2e_latency

    def new_response(self, model: str, created: int) -> ResponseBuilder:
        """A fresh response builder: one per attempt, since a retried attempt starts its output over."""
        from shepherd.generation.response import BUILDERS

        return BUILDERS[self.kind](self, model, created)


def build_plan(
    kind: Kind,
    payload: Mapping[str, Any],
    tokenizer: LoadedTokenizer,
    request_id: str,
    defaults: Mapping[str, Any] | None = None,
) -> GenerationPlan:
    """Validates the body and builds the request; raises `InvalidRequest` (a 400) for anything the client got wrong.

    `defaults` is the worker's parsed `default_sampling_params_json`: it fills what the client left out.
    """
    if kind == "generate":
        prompt_ids, given, return_logprob, top_logprobs, logprob_start_len = _sglang_inputs(payload, tokenizer)
    elif kind in ("chat", "completions"):
        prompt_ids, given, return_logprob, top_logprobs = _openai_inputs(kind, payload, tokenizer)
        logprob_start_len = -1
    else:
        raise ValueError(f"unknown generation kind {kind!r}")
    stream = _flag(payload, "stream")
    sampling, stops = build_sampling(given, tokenizer, defaults)
    request = pb.GenerateRequest(
        request_id=request_id,
        tokenized=pb.TokenizedInput(input_ids=prompt_ids),
        sampling_params=sampling,
        return_logprob=return_logprob,
        logprob_start_len=logprob_start_len,
        top_logprobs_num=top_logprobs,
        stream=stream,
        log_metrics=kind == "generate",
    )
    return GenerationPlan(
        kind=kind,
        request=request,
        prompt_ids=prompt_ids,
        stream=stream,
        n=sampling.n,
        tokenizer=tokenizer,
        stops=stops,
        top_logprobs=top_logprobs if return_logprob else None,
        include_usage=_include_usage(payload) and stream,
        started=time.perf_counter(),
    )


def _sglang_inputs(
    payload: Mapping[str, Any], tokenizer: LoadedTokenizer
) -> tuple[list[int], dict[str, tuple[str, Any]], bool, int, int]:
    """SGLang /generate: prompt ids, sampling fields given, return_logprob, top_logprobs_num, logprob_start_len."""
    prompt_ids = generate_prompt(payload, tokenizer)
    options = payload.get("sampling_params")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise InvalidRequest("'sampling_params' must be an object", "invalid_type", "sampling_params")
    start = payload.get("logprob_start_len")
    logprob_start_len = -1 if start is None else integer(start, "logprob_start_len")
    if logprob_start_len < -1:
        raise InvalidRequest("'logprob_start_len' must be >= -1", "invalid_value", "logprob_start_len")
    return_logprob = _flag(payload, "return_logprob")
    top_logprobs = _top_logprobs(payload.get("top_logprobs_num"), "top_logprobs_num")
    return prompt_ids, gather(options, SGLANG_NAMES), return_logprob, top_logprobs, logprob_start_len


def _openai_inputs(
    kind: Kind, payload: Mapping[str, Any], tokenizer: LoadedTokenizer
) -> tuple[list[int], dict[str, tuple[str, Any]], bool, int]:
    """Chat / completions: prompt ids, sampling fields given, return_logprob, top_logprobs_num."""
    if kind == "chat":
        prompt_ids = chat_prompt(payload, tokenizer)
        return_logprob = _flag(payload, "logprobs")
        top_logprobs = _top_logprobs(payload.get("top_logprobs"), "top_logprobs")
        if top_logprobs and not return_logprob:
            raise InvalidRequest("'top_logprobs' requires 'logprobs' to be true", "invalid_value", "top_logprobs")
    else:
        prompt_ids = completion_prompt(payload, tokenizer)
        count = payload.get("logprobs")  # an integer: how many alternatives per position
        return_logprob = count is not None
        top_logprobs = _top_logprobs(count, "logprobs")
    given = gather(payload, OPENAI_NAMES)
    schema = response_format_constraint(payload.get("response_format"))
    if schema is not None:
        given["json_schema"] = ("response_format", schema)
    return prompt_ids, given, return_logprob, top_logprobs


def _flag(payload: Mapping[str, Any], key: str, param: str | None = None) -> bool:
    value = payload.get(key)
    return False if value is None else boolean(value, param or key)


def _top_logprobs(value: Any, param: str) -> int:
    if value is None:
        return 0
    count = integer(value, param)
    if not 0 <= count <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"'{param}' must be in [0, {MAX_TOP_LOGPROBS}]", "invalid_value", param)
    return count


def _include_usage(payload: Mapping[str, Any]) -> bool:
    options = payload.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", "invalid_type", "stream_options")
    return _flag(options, "include_usage", "stream_options.include_usage")
