"""Workload generators of `shepherd bench routing`: sizes, reproducibility, histories and the simulator's view."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from shepherd.bench.workloads import (
    MULTI_TURN,
    SHARED_PREFIX,
    Conversation,
    chat_body,
    messages,
    multi_turn,
    random_text,
    shared_prefix,
)
from shepherd.sim.parsing import chat_prompt_text
from shepherd.sim.tokenizer import generate, tokenize


def test_random_text_is_exactly_one_simulator_token_per_word() -> None:
    text = random_text(random.Random(1), 500)
    assert len(tokenize(text)) == 500
    assert text.startswith(" ") and all(1 <= len(word) <= 4 for word in text.split())


def test_shared_prefix_has_every_group_prompt_pair_with_exact_token_counts() -> None:
    workload = shared_prefix(groups=5, prompts_per_group=3, system_tokens=100, question_tokens=20, max_tokens=4)
    assert workload.name == SHARED_PREFIX and workload.requests == 15 and workload.max_tokens == 4
    systems = Counter(c.system for c in workload.conversations)
    assert len(systems) == 5 and set(systems.values()) == {3}
    assert len({c.turns for c in workload.conversations}) == 15  # every question is distinct
    for conversation in workload.conversations:
        assert len(conversation.turns) == 1
        assert len(tokenize(conversation.system)) == 100 and len(tokenize(conversation.turns[0])) == 20


def test_shared_prefix_is_shuffled_and_reproducible_by_seed() -> None:
    first = shared_prefix(8, 8, 32, 8, 4, seed=3)
    assert first == shared_prefix(8, 8, 32, 8, 4, seed=3)
    assert first != shared_prefix(8, 8, 32, 8, 4, seed=4)
    group_order = [c.system for c in first.conversations]
    runs = sum(1 for a, b in itertools.pairwise(group_order) if a != b)
    assert runs > 16  # not laid out group after group


def test_multi_turn_sizes_and_shared_system_prompt() -> None:
    workload = multi_turn(clients=4, rounds=3, first_tokens=50, turn_tokens=10, max_tokens=5, system_tokens=30)
    assert workload.name == MULTI_TURN and workload.requests == 12
    assert len({c.system for c in workload.conversations}) == 1
    for conversation in workload.conversations:
        assert len(tokenize(conversation.system)) == 30
        assert [len(tokenize(t)) for t in conversation.turns] == [50, 10, 10]
    assert multi_turn(4, 3, 50, 10, 5, seed=1) == multi_turn(4, 3, 50, 10, 5, seed=1)
    assert all(c.system == "" for c in multi_turn(2, 2, 5, 5, 5).conversations)


def test_nominal_order_is_round_major() -> None:
    workload = multi_turn(clients=3, rounds=2, first_tokens=4, turn_tokens=4, max_tokens=2)
    assert list(workload.nominal_order()) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]


def test_messages_carry_the_history_with_the_answers() -> None:
    conversation = Conversation(" sys", (" one", " two", " three"))
    assert messages(conversation, 2, [" a1", " a2"]) == [
        {"role": "system", "content": " sys"},
        {"role": "user", "content": " one"},
        {"role": "assistant", "content": " a1"},
        {"role": "user", "content": " two"},
        {"role": "assistant", "content": " a2"},
        {"role": "user", "content": " three"},
    ]
    assert messages(Conversation("", (" q",)), 0, []) == [{"role": "user", "content": " q"}]


def test_chat_body_streams_and_asks_for_usage() -> None:
    body = chat_body("m", Conversation("", (" q",)), 0, [], 7)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "m" and body["max_tokens"] == 7 and body["messages"] == [{"role": "user", "content": " q"}]


def test_replay_reproduces_the_prompts_and_answers_the_simulator_sees() -> None:
    workload = multi_turn(clients=2, rounds=3, first_tokens=40, turn_tokens=8, max_tokens=6, seed=2)
    replayed = list(workload.replay(seed=0))
    assert len(replayed) == 6
    answers: dict[int, list[str]] = {0: [], 1: []}
    for (index, turn), (prompt, answer) in zip(workload.nominal_order(), replayed, strict=True):
        text = chat_prompt_text(messages(workload.conversations[index], turn, answers[index]))
        assert prompt == tokenize(text)
        completion = generate(prompt, 6, 0)
        assert answer == completion.token_ids
        answers[index].append(completion.text)
    # Each turn's prompt starts with the previous turn's prompt and answer, token for token.
    for earlier, later in ((0, 2), (2, 4), (1, 3)):
        previous = replayed[earlier][0] + replayed[earlier][1]
        assert replayed[later][0][: len(previous)] == previous


@pytest.mark.parametrize(
    "build",
    [
        lambda: shared_prefix(0, 1, 1, 1, 1),
        lambda: shared_prefix(1, 1, -1, 1, 1),
        lambda: shared_prefix(1, 1, 1, 1, 0),
        lambda: multi_turn(1, 0, 1, 1, 1),
        lambda: multi_turn(1, 1, 1, 1, 1, system_tokens=-1),
    ],
)
def test_invalid_sizes_are_rejected(build) -> None:
    with pytest.raises(ValueError):
        build()
