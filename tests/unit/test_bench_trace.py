"""Trace replay for `shepherd bench routing`: parsing, windows, scaling, block texts and the bounds of a replay."""

from __future__ import annotations

import pytest

from shepherd.bench.cache_bounds import capacity_hit_rate, distinct_prompt_tokens, infinite_cache_hit_rate
from shepherd.bench.trace import (
    PromptBuilder,
    TraceRequest,
    block_words,
    parse_request,
    read_trace,
    scaled_input_tokens,
    scaled_output_tokens,
    trace_workload,
    unique_blocks,
    window,
)
from shepherd.bench.workloads import TRACE
from shepherd.sim.tokenizer import tokenize

PAGE = 16


def request(ts: float, blocks: list[int], input_length: int | None = None, output_length: int = 100) -> TraceRequest:
    return TraceRequest(ts, input_length if input_length is not None else 512 * len(blocks), output_length,
                        tuple(blocks))  # fmt: skip


def test_a_trace_line_parses_and_bad_lines_say_why() -> None:
    line = b'{"timestamp": 40, "input_length": 700, "output_length": 3, "hash_ids": [5, 6]}'
    assert parse_request(line) == TraceRequest(40.0, 700, 3, (5, 6))
    for bad in (b"{not json", b'{"timestamp": 0, "input_length": 1, "output_length": 1}', b"[1, 2]",
                b'{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": [1]}',
                b'{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": []}'):  # fmt: skip
        with pytest.raises(ValueError):
            parse_request(bad)


def test_a_trace_file_is_read_in_arrival_order(tmp_path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(
        '{"timestamp": 50, "input_length": 10, "output_length": 1, "hash_ids": [2]}\n\n'
        '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n'
        '{"timestamp": 50, "input_length": 10, "output_length": 1, "hash_ids": [3]}\n'
    )
    assert [r.hash_ids for r in read_trace(path)] == [(1,), (2,), (3,)]  # equal timestamps keep the file order
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError):
        read_trace(tmp_path / "empty.jsonl")


def test_a_window_is_picked_by_trace_time_then_count() -> None:
    requests = [request(1000 + 500 * i, [i]) for i in range(10)]  # 0.5 s apart, starting 1 s into the trace clock
    assert [r.hash_ids[0] for r in window(requests, start_s=1.0, duration_s=1.5)] == [2, 3, 4]
    assert [r.hash_ids[0] for r in window(requests, start_s=1.0, count=2)] == [2, 3]
    assert window(requests) == requests and window(requests, start_s=100) == []


def test_block_text_is_deterministic_and_one_token_per_word() -> None:
    words = block_words(7, 64)
    assert words == block_words(7, 64) and words != block_words(8, 64) and words != block_words(7, 64, seed=1)
    assert block_words(7, 10) == words[:10]  # a shorter block is a prefix of the longer one
    assert all(w.startswith(" ") and 1 <= len(w) - 1 <= 4 for w in words)
    assert len(tokenize("".join(words))) == 64


def test_equal_block_ids_give_token_equal_prefixes_cut_at_block_boundaries() -> None:
    builder = PromptBuilder(block_tokens=32)
    a = tokenize(builder.prompt(request(0, [1, 2, 3])))
    b = tokenize(builder.prompt(request(0, [1, 2, 9, 10])))
    assert len(a) == 96 and len(b) == 128
    assert a[:64] == b[:64] and a[64:96] != b[64:96]  # the shared blocks tokenize alike, the rest differs
    assert tokenize(builder.block(1)) + tokenize(builder.block(2)) == a[:64]  # blocks split at their boundary
    cut = tokenize(builder.prompt(request(0, [1, 2, 3], input_length=512 + 256)))  # one and a half blocks
    assert cut == a[:48]


def test_lengths_scale_with_the_block_size_within_their_bounds() -> None:
    r = request(0, [1, 2, 3], input_length=1100, output_length=300)
    assert scaled_input_tokens(r, 64) == round(1100 / 8) and scaled_input_tokens(r, 512) == 1100
    assert scaled_input_tokens(request(0, [1], input_length=5000), 64) == 64  # never more than the blocks hold
    assert scaled_input_tokens(request(0, [1], input_length=1), 64) == 1
    assert scaled_output_tokens(r, 64, cap=100) == round(300 / 8) and scaled_output_tokens(r, 64, cap=16) == 16
    assert scaled_output_tokens(request(0, [1], output_length=0), 64, cap=16) == 1


def test_a_trace_becomes_a_timed_workload_with_scaled_arrivals_and_answers() -> None:
    requests = [request(2000, [1, 2], output_length=96), request(3000, [1, 3], output_length=200),
                request(6000, [4], output_length=1)]  # fmt: skip
    workload = trace_workload(requests, block_tokens=16, time_scale=0.5, max_output_tokens=4, label="t.jsonl")
    assert workload.name == TRACE and workload.timed and workload.requests == 3
    assert [c.start for c in workload.conversations] == [0.0, 0.5, 2.0]
    assert [workload.answer_tokens(i) for i in range(3)] == [3, 4, 1]  # 96/32; 200/32 capped at 4; at least 1
    assert all(c.system == "" and len(c.turns) == 1 for c in workload.conversations)
    assert "t.jsonl: 3 requests" in workload.description and unique_blocks(requests) == 4
    assert trace_workload(requests, 16, 0.5, 4) == trace_workload(requests, 16, 0.5, 4)
    for bad in (([], 16, 0.5, 4), (requests, 16, 0.0, 4), (requests, 16, 0.5, 0), (requests, 0, 0.5, 4)):
        with pytest.raises(ValueError):
            trace_workload(*bad)


def test_bounds_of_a_hand_made_trace() -> None:
    # A = blocks 1 2; B = blocks 1 2 3 arrives next; C = block 4. One block = one page of 16 tokens.
    requests = [request(0, [1, 2]), request(10, [1, 2, 3]), request(20, [4])]
    turns = list(trace_workload(requests, block_tokens=PAGE, time_scale=1.0, max_output_tokens=1).replay())
    assert [len(prompt) for prompt, _ in turns] == [32, 48, 16]
    # Only B can hit: A's two pages, out of 96 prompt tokens.
    assert infinite_cache_hit_rate(turns, PAGE) == pytest.approx(32 / 96)
    assert capacity_hit_rate(turns, PAGE, 2 * PAGE) == pytest.approx(32 / 96)
    assert capacity_hit_rate(turns, PAGE, PAGE) == pytest.approx(16 / 96)  # room for block 1 only
    assert capacity_hit_rate(turns, PAGE, 0) == 0.0
    assert distinct_prompt_tokens(turns, PAGE) == 4 * PAGE
