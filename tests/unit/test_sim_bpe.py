"""The `--grpc` simulator's trained BPE, its output plans, and GetTokenizer's chunking."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from tokenizers import Tokenizer

from shepherd.sim import bpe
from shepherd.sim.grpc_output import plan_output
from shepherd.sim.grpc_scheduler import TOKENIZER_CHUNK_BYTES, tokenizer_chunks
from shepherd.sim.tokenizer import OUTPUT_VOCAB


@pytest.fixture(scope="module")
def tok() -> bpe.SimTokenizer:
    return bpe.build()


def test_training_is_deterministic_across_processes(tok):
    digest = hashlib.sha256(tok.tokenizer.to_str().encode()).hexdigest()
    code = "import hashlib, shepherd.sim.bpe as b; print(hashlib.sha256(b.train().to_str().encode()).hexdigest())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == digest


def test_special_ids_output_words_and_byte_split_text(tok):
    assert tok.eos_ids == (0, 2) and tok.tokenizer.token_to_id(bpe.IM_START) == 1
    assert 1000 <= tok.vocab_size <= 2000
    assert [tok.tokenizer.decode([i]) for i in tok.word_ids] == list(OUTPUT_VOCAB)
    assert len(tok.encode("🙂")) > 1 and tok.tokenizer.decode(tok.encode("Zürich 🙂 東京")) == "Zürich 🙂 東京"


def test_the_written_directory_carries_eos_ids_and_a_chatml_template(tok, tmp_path):
    tok.write_dir(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == [0, 2]
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [0, 2]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == bpe.ENDOFTEXT and "<|im_start|>" in config["chat_template"]
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("hi").ids == tok.encode("hi")


def params(**fields) -> pb.SamplingParams:
    return pb.SamplingParams(**fields)


def test_plans_end_with_eos_by_length_or_at_a_stop_id(tok):
    natural = plan_output(tok, [1, 2, 3], params(), 8, 0, 0, None)
    assert len(natural.ids) == 8 and natural.ids[-1] == 0 and natural.finish(8) == ("stop", 0)
    capped = plan_output(tok, [1, 2, 3], params(max_new_tokens=8), 8, 0, 0, None)
    assert capped.ids[:7] == natural.ids[:7] and capped.finish(8) == ("length", None)
    assert plan_output(tok, [1, 2, 3], params(max_new_tokens=0), 8, 0, 0, None).ids == []
    assert plan_output(tok, [1, 2, 3], params(), 8, 0, 1, None).ids != natural.ids  # another choice
    stop = capped.ids[3]
    first = capped.ids.index(stop)
    stopped = plan_output(tok, [1, 2, 3], params(max_new_tokens=8, stop_token_ids=[stop]), 8, 0, 0, None)
    assert stopped.ids == capped.ids[: first + 1] and stopped.matched == stop
    late = plan_output(tok, [1, 2, 3], params(stop_token_ids=[stop], min_new_tokens=first + 1), 8, 0, 0, None)
    assert late.ids[first] == stop and len(late.ids) > first + 1
    ignoring = plan_output(tok, [1, 2, 3], params(ignore_eos=True), 8, 0, 0, None)
    assert len(ignoring.ids) == 8 and 0 not in ignoring.ids and ignoring.matched is None
    # A prefill (one id produced) of a planned stop finishes by length.
    assert natural.finish(1) == ("length", None)


def test_a_script_is_encoded_then_ends_with_eos(tok):
    plan = plan_output(tok, [1], params(), 8, 0, 0, "ok 🙂")
    assert plan.ids == [*tok.encode("ok 🙂"), 0] and plan.matched == 0
    assert plan_output(tok, [1], params(max_new_tokens=1), 8, 0, 0, "ok 🙂").ids == tok.encode("ok 🙂")[:1]


def test_tokenizer_chunks_carry_the_digest_only_on_the_last():
    bundle = os.urandom(2 * TOKENIZER_CHUNK_BYTES + 10)
    chunks = tokenizer_chunks(bundle)
    assert [len(c.data) for c in chunks] == [TOKENIZER_CHUNK_BYTES, TOKENIZER_CHUNK_BYTES, 10]
    assert [c.sha256 for c in chunks] == ["", "", hashlib.sha256(bundle).hexdigest()]
