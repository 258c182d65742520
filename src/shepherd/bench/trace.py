"""Replay of a Mooncake-format request trace as a `shepherd bench routing` workload.

The format (Mooncake FAST'25 release and the other public Mooncake traces): one JSON object per line with
`timestamp` (ms since the trace's start), `input_length` and `output_length` (tokens) and `hash_ids`, one id per
512-token block of the input; requests whose first k ids are equal share their first k blocks of prompt.

Each block id becomes `block_tokens` simulator tokens of deterministic text: words drawn from a fixed table by
bytes hashed from the id, each word a space and one to four letters, so one token each, and a block boundary is
always a token boundary (the simulator's tokenizer splits before every space-led word). Equal ids give equal text
in any process; a request's prompt is the concatenation of its blocks' texts, cut to its input length scaled by
`block_tokens / 512`. Its answer length is scaled the same way and capped, so a replay stays short. Arrivals keep
the trace's spacing times `time_scale` (0.1 replays ten minutes of trace in one), counted from the window's first
request.

A window of the trace is picked by trace time (`start_s`, `duration_s`) and a request count, applied in that order.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import random
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson

from shepherd.bench.workloads import TRACE, Conversation, Workload

TRACE_BLOCK_TOKENS = 512  # what one hash id stands for in the trace
_TABLE_BITS = 16
_LETTERS = string.ascii_lowercase


@functools.cache
def _word_table() -> tuple[str, ...]:
    """The words block texts are drawn from (built on first use: every `shepherd` command imports this module)."""
    rng = random.Random("trace-words")
    return tuple(" " + "".join(rng.choices(_LETTERS, k=rng.randint(1, 4))) for _ in range(1 << _TABLE_BITS))


@dataclass(frozen=True, slots=True)
class TraceRequest:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def parse_request(line: str | bytes) -> TraceRequest:
    """One trace line; ValueError naming what is wrong."""
    try:
        record = orjson.loads(line)
        request = TraceRequest(
            float(record["timestamp"]),
            int(record["input_length"]),
            int(record["output_length"]),
            tuple(int(block) for block in record["hash_ids"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a trace record ({type(exc).__name__}: {exc}): {line[:120]!r}") from None
    if request.input_length < 1 or request.output_length < 0 or not request.hash_ids or request.timestamp_ms < 0:
        raise ValueError(f"trace record needs input_length >= 1, hash_ids and a timestamp >= 0: {line[:120]!r}")
    return request


def read_trace(path: str | os.PathLike[str]) -> list[TraceRequest]:
    """Every request of a JSONL trace file (blank lines skipped), in arrival order."""
    with open(path, "rb") as lines:
        requests = [parse_request(line) for line in lines if line.strip()]
    if not requests:
        raise ValueError(f"{path}: no requests")
    return sorted(requests, key=lambda r: r.timestamp_ms)  # stable: equal timestamps keep their file order


def window(
    requests: Sequence[TraceRequest], start_s: float = 0.0, duration_s: float | None = None, count: int | None = None
) -> list[TraceRequest]:
    """The requests from `start_s` seconds after the trace's first one, for `duration_s`, at most `count` of them."""
    origin = requests[0].timestamp_ms if requests else 0.0
    low = origin + start_s * 1000
    high = math.inf if duration_s is None else low + duration_s * 1000
    picked = [r for r in requests if low <= r.timestamp_ms < high]
    return picked if count is None else picked[:count]


def block_words(block_id: int, tokens: int, seed: int = 0) -> list[str]:
    """The `tokens` words (one simulator token each) that stand for block `block_id`."""
    digest = hashlib.shake_128(f"{seed}/{block_id}".encode()).digest(2 * tokens)
    words = _word_table()
    return [words[index] for index in memoryview(digest).cast("H")]


def scaled_input_tokens(request: TraceRequest, block_tokens: int) -> int:
    """The prompt length in simulator tokens: the input length scaled, at most what its blocks hold, at least 1."""
    return max(
        1, min(round(request.input_length * block_tokens / TRACE_BLOCK_TOKENS), len(request.hash_ids) * block_tokens)
    )


def scaled_output_tokens(request: TraceRequest, block_tokens: int, cap: int) -> int:
    """The answer length: the output length scaled like the input, between 1 and `cap`."""
    return max(1, min(cap, round(request.output_length * block_tokens / TRACE_BLOCK_TOKENS)))


class PromptBuilder:
    """Prompt texts of trace requests, with each full block's text built once."""

    def __init__(self, block_tokens: int, seed: int = 0) -> None:
        if block_tokens < 1:
            raise ValueError("block tokens must be >= 1")
        self.block_tokens = block_tokens
        self.seed = seed
        self._blocks: dict[int, str] = {}

    def block(self, block_id: int) -> str:
        text = self._blocks.get(block_id)
        if text is None:
            text = self._blocks[block_id] = "".join(block_words(block_id, self.block_tokens, self.seed))
        return text

    def prompt(self, request: TraceRequest) -> str:
        tokens = scaled_input_tokens(request, self.block_tokens)
        full, rest = divmod(tokens, self.block_tokens)
        parts = [self.block(block_id) for block_id in request.hash_ids[:full]]
        if rest:
            parts += block_words(request.hash_ids[full], rest, self.seed)
        return "".join(parts)


def unique_blocks(requests: Iterable[TraceRequest]) -> int:
    return len({block for request in requests for block in request.hash_ids})


def trace_workload(
    requests: Sequence[TraceRequest],
    block_tokens: int,
    time_scale: float,
    max_output_tokens: int,
    seed: int = 0,
    label: str = "trace",
) -> Workload:
    """One single-turn conversation per request, due at its scaled arrival time."""
    if not requests:
        raise ValueError("the trace window holds no request")
    if not time_scale > 0 or max_output_tokens < 1:
        raise ValueError("the trace time scale must be > 0 and the output cap >= 1")
    builder = PromptBuilder(block_tokens, seed)
    origin = requests[0].timestamp_ms
    conversations = tuple(
        Conversation(
            "",
            (builder.prompt(request),),
            start=(request.timestamp_ms - origin) / 1000 * time_scale,
            max_tokens=scaled_output_tokens(request, block_tokens, max_output_tokens),
        )
        for request in requests
    )
    span = (requests[-1].timestamp_ms - origin) / 1000
    description = (
        f"{label}: {len(requests)} requests over {span:,.1f}s of trace replayed in {span * time_scale:,.1f}s,"
        f" 1 block = {block_tokens} tokens, {unique_blocks(requests):,} distinct blocks,"
        f" answers <= {max_output_tokens} tokens"
    )
    return Workload(TRACE, conversations, max_output_tokens, description, timed=True)
