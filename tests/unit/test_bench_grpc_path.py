"""`shepherd bench grpc`: requests, response shapes, ratios, chat building and rendering (no processes, no timing)."""

from __future__ import annotations

import itertools

import orjson
import pytest

from shepherd.bench import grpc_path
from shepherd.bench.grpc_path import (
    Settings,
    build_chat,
    ratios,
    render,
    request_specs,
    response_shape,
    run_tokenize,
)
from shepherd.cli import build_parser


def test_requests_fix_the_output_length_and_ask_streams_for_usage() -> None:
    specs = request_specs(64, "m")
    chat, stream = orjson.loads(specs["chat"].body), orjson.loads(specs["chat_stream"].body)
    for body in (chat, stream):
        assert body["model"] == "m" and body["max_tokens"] == 64 and body["ignore_eos"] is True
    assert not specs["chat"].stream and "stream" not in chat
    assert specs["chat_stream"].stream and stream["stream"] is True
    assert stream["stream_options"] == {"include_usage": True}


def _frame(event: object) -> bytes:
    return b"data: " + (event if isinstance(event, bytes) else orjson.dumps(event)) + b"\n\n"


def test_response_shape_counts_frames_text_frames_and_usage() -> None:
    body = b"".join(
        [
            _frame({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            _frame({"choices": [{"index": 0, "delta": {"content": "Hello"}}]}),
            _frame({"choices": [{"index": 0, "delta": {"content": " world"}}]}),
            _frame({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}),
            _frame({"choices": [], "usage": {"completion_tokens": 2}}),
            _frame(b"[DONE]"),
        ]
    ).replace(b"\n\n", b"\r\n\r\n", 1)
    assert response_shape(body, stream=True) == {"completion_tokens": 2, "frames": 6, "content_frames": 2}
    plain = orjson.dumps({"choices": [], "usage": {"completion_tokens": 64}})
    assert response_shape(plain, stream=False) == {"completion_tokens": 64, "frames": None, "content_frames": None}
    assert response_shape(b"not json", stream=False)["completion_tokens"] is None


def _figures(cpu: float | None, added: float | None) -> dict:
    figures = {"rps": 1000.0, "p50_ms": 1.0, "failed": 0}
    if cpu is not None:
        figures |= {"cpu_us_per_req": cpu, "cpu_us_per_req_c1": 2 * cpu, "cpu_us_per_token": cpu / 64}
    if added is not None:
        figures["added_p50_ms"] = added
    return figures


def _profiles() -> dict:
    def shape(frames: int) -> dict:
        return {"completion_tokens": 64, "frames": frames + 4, "content_frames": frames}

    return {
        "instant": {
            "summary": {
                "chat": {"direct": _figures(None, None), "http": _figures(200, 0.5), "grpc": _figures(380, 1.0)},
                "chat_stream": {"direct": _figures(None, None), "http": _figures(200, 0.5), "grpc": _figures(900, 2.0)},
            },
            "shapes": {
                "http": {"chat": shape(0) | {"frames": None}, "chat_stream": shape(1)},
                "grpc": {"chat": shape(0) | {"frames": None}, "chat_stream": shape(64)},
            },
        },
        "paced": {
            "summary": {"chat_stream": {"http": _figures(1000, 4.0), "grpc": _figures(2500, 3.0)}},
            "shapes": {"http": {"chat_stream": shape(64)}, "grpc": {"chat_stream": shape(64)}},
        },
    }


def test_ratios_are_grpc_over_http_with_the_goal_and_whether_the_cell_is_even() -> None:
    out = ratios(_profiles())
    assert list(out) == ["instant/chat", "instant/chat_stream", "paced/chat_stream"]
    chat = out["instant/chat"]
    assert chat["cpu_per_req"] == pytest.approx(1.9) and chat["cpu_per_req_c1"] == pytest.approx(1.9)
    assert chat["added_p50"] == pytest.approx(2.0)
    assert chat["cpu_goal_met"] is True and chat["like_for_like"] is True
    assert out["instant/chat_stream"]["cpu_goal_met"] is False
    assert out["instant/chat_stream"]["like_for_like"] is False  # 1 text frame against 64
    paced = out["paced/chat_stream"]
    assert paced["cpu_per_req"] == pytest.approx(2.5) and paced["like_for_like"] is True
    assert paced["added_p50"] == pytest.approx(0.75)


def test_ratios_leave_out_missing_targets_and_figures() -> None:
    profiles = {"p": {"summary": {"chat": {"http": _figures(None, None), "grpc": _figures(100, None)}}}}
    assert ratios(profiles)["p/chat"]["cpu_per_req"] is None
    assert ratios(profiles)["p/chat"]["cpu_goal_met"] is None
    assert ratios({"p": {"summary": {"chat": {"http": _figures(1, 1)}}}}) == {}


def test_build_chat_alternates_turns_up_to_the_target_and_ends_with_the_user() -> None:
    paragraphs = [f"paragraph {i} " + "word " * 40 for i in range(50)]

    def count(text: str) -> int:
        return len(text) // 4

    messages = build_chat(paragraphs, count, 3000, turn_chars=1500)
    assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
    roles = [m["role"] for m in messages[1:]]
    assert all(a != b for a, b in itertools.pairwise(roles))
    total = sum(count(m["content"]) for m in messages)
    assert 3000 <= total < 3000 + 200  # the last turn is cut to what is left
    shifted = build_chat(paragraphs, count, 3000, offset=7, turn_chars=1500)
    assert shifted[1]["content"] != messages[1]["content"]
    assert "paragraph 7 " in shifted[1]["content"]
    with pytest.raises(ValueError):
        build_chat([], count, 10)


def test_tokenize_document_with_the_simulator_bpe(monkeypatch) -> None:
    monkeypatch.setattr(grpc_path, "_load_smollm2", lambda: None)
    document = run_tokenize(Settings(tokenize_runs=2, prompt_tokens=300), progress=lambda line: None)
    assert document["tokenizer"].startswith("the simulator's byte-level BPE")
    assert document["prompt_tokens"]["median"] >= 300
    for key in ("chat_prompt_us", "render_us", "encode_us", "encode_us_per_1k_tokens"):
        assert document[key]["runs"] == 2 and document[key]["median"] > 0
    assert isinstance(document["goal_met"], bool)


def test_render_shows_cells_ratios_and_tokenization() -> None:
    profiles = _profiles()
    document = {
        "settings": {"concurrency": 16, "workers": 2, "max_tokens": 64},
        "profiles": profiles,
        "ratios": ratios(profiles),
        "tokenize": {
            "tokenizer": "tok",
            "messages": 9,
            "prompt_tokens": {"median": 8200, "p90": 8300, "runs": 3},
            "chat_prompt_us": {"median": 8000.0, "p90": 9000.0, "runs": 3},
            "render_us": {"median": 100.0, "p90": 120.0, "runs": 3},
            "encode_us": {"median": 7900.0, "p90": 8800.0, "runs": 3},
            "encode_us_per_1k_tokens": {"median": 950.0, "p90": 990.0, "runs": 3},
            "goal_us": 2000.0,
            "goal_met": False,
        },
    }
    text = render(document)
    for needle in ("instant chat / grpc", "paced chat_stream / http", "instant/chat_stream", "1.90x", "2.50x"):
        assert needle in text
    assert "64/68" in text  # text frames / all frames of the probe
    assert "goal 2 ms: missed" in text and "8,000" in text
    assert "no (frames or tokens differ)" in text


def test_cli_registers_the_mode() -> None:
    args = build_parser().parse_args(["bench", "grpc", "--tokenize-only", "--prompt-tokens", "4096"])
    assert args.run is grpc_path.main and args.tokenize_only and args.prompt_tokens == 4096
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "grpc", "--tokenize-only", "--no-tokenize"])
