"""PD routing helpers: batch sizes, logprob merging order, and the side-naming client errors."""

from __future__ import annotations

import orjson
import pytest

from shepherd.config import CircuitBreakerConfig
from shepherd.routing.attempt import AttemptFailure
from shepherd.routing.context import CHAT, COMPLETIONS, GENERATE, RequestContext
from shepherd.routing.pd import (
    _input_logprobs,
    _pd_error,
    _prepend_logprobs,
    _prepend_logprobs_to_frame,
    batch_size,
)
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.worker import Worker

PREFILL = [[None, 1, None], [-0.5, 2, None]]
DECODE = [[-0.25, 3, None]]


def ctx(endpoint, payload: dict) -> RequestContext:
    return RequestContext(endpoint, orjson.dumps(payload), "req-1")


@pytest.mark.parametrize(
    ("endpoint", "payload", "expected"),
    [
        (GENERATE, {"text": "one"}, None),
        (GENERATE, {"input_ids": [1, 2, 3]}, None),
        (GENERATE, {"input_ids": [[1, 2], [3]]}, 2),
        (COMPLETIONS, {"prompt": "one"}, None),
        (COMPLETIONS, {"prompt": [1, 2, 3]}, None),  # token ids of one prompt
        (COMPLETIONS, {"prompt": ["a", "b", "c"]}, 3),
        (CHAT, {"messages": [{"role": "user", "content": "x"}]}, None),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "n": 1}, None),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "n": 3}, 3),
    ],
)
def test_batch_size_follows_the_request_shape(endpoint, payload, expected):
    assert batch_size(ctx(endpoint, payload)) == expected


def test_prefill_logprobs_go_in_front_of_the_decodes():
    decode = orjson.dumps({"text": "x", "meta_info": {"input_token_logprobs": DECODE, "output_token_logprobs": []}})
    prefill = _input_logprobs(orjson.dumps({"meta_info": {"input_token_logprobs": PREFILL}}))
    merged = orjson.loads(_prepend_logprobs(decode, prefill))
    assert merged["meta_info"] == {"input_token_logprobs": PREFILL + DECODE, "output_token_logprobs": []}


def test_batch_items_are_merged_item_by_item():
    prefill_items = [
        {"meta_info": {"input_token_logprobs": PREFILL[:1]}},
        {"meta_info": {"input_token_logprobs": PREFILL}},
    ]
    decode_items = [{"meta_info": {"input_token_logprobs": []}}, {"meta_info": {"input_token_logprobs": DECODE}}]
    prefill = _input_logprobs(orjson.dumps(prefill_items))
    merged = orjson.loads(_prepend_logprobs(orjson.dumps(decode_items), prefill))
    assert [m["meta_info"]["input_token_logprobs"] for m in merged] == [PREFILL[:1], PREFILL + DECODE]


def test_stream_frames_are_merged_by_their_batch_index():
    prefill_stream = (
        b"".join(
            b"data: " + orjson.dumps({"index": i, "meta_info": {"input_token_logprobs": lp}}) + b"\n\n"
            for i, lp in ((1, PREFILL), (0, PREFILL[:1]))
        )
        + b"data: [DONE]\n\n"
    )
    prefill = _input_logprobs(prefill_stream)
    frame = b"data: " + orjson.dumps({"index": 1, "meta_info": {"input_token_logprobs": DECODE}}) + b"\n"
    merged = orjson.loads(_prepend_logprobs_to_frame(frame, prefill)[len(b"data: ") :])
    assert merged["meta_info"]["input_token_logprobs"] == PREFILL + DECODE
    assert _prepend_logprobs_to_frame(b"data: [DONE]\n", prefill) == b"data: [DONE]\n"


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (dict(side="decode", status=503, body=b'{"error": {"message": "busy"}}'), 503, "decode_unavailable"),
        (dict(side="prefill", status=500, body=b"boom"), 500, "prefill_internal_error"),
        (dict(side="prefill", status=400, body=b"bad"), 400, "prefill_error"),
        (dict(side="decode", transport_error="refused"), 502, "decode_unreachable"),
        (dict(side="prefill", timed_out=True), 504, "prefill_timeout"),
    ],
)
def test_client_error_names_the_failed_side(failure, status, code):
    worker = Worker("http://w:1", CircuitBreaker(CircuitBreakerConfig()))
    error = _pd_error(AttemptFailure(worker=worker, **failure))
    assert (error.status, error.code) == (status, code)
    assert error.message.startswith(f"{failure['side']} worker http://w:1")
    if failure.get("body"):
        assert error.message.endswith("busy" if failure["status"] == 503 else failure["body"].decode())
