"""Workload generators of `shepherd bench routing`: sizes, reproducibility, histories and the simulator's view."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from shepherd.bench.workloads import (
    MULTI_TURN,
    MULTI_TURN_THINK,
    SHARED_PREFIX,
    ZIPF_PREFIX,
    Conversation,
    Workload,
    chat_body,
    messages,
    multi_turn,
    multi_turn_think,
    random_text,
    shared_prefix,
    zipf_prefix,
    zipf_ranks,
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


def test_zipf_ranks_are_seeded_and_follow_the_popularity_law() -> None:
    draws = zipf_ranks(20000, 50, 1.0, random.Random(7))
    assert draws == zipf_ranks(20000, 50, 1.0, random.Random(7))
    assert draws != zipf_ranks(20000, 50, 1.0, random.Random(8))
    counts = Counter(draws)
    assert set(counts) <= set(range(50)) and counts.most_common(1)[0][0] == 0
    # Weight 1/r: rank 1 is drawn about twice as often as rank 2 and ten times as often as rank 10.
    assert 1.8 < counts[0] / counts[1] < 2.2 and 8 < counts[0] / counts[9] < 12.5
    uniform = Counter(zipf_ranks(20000, 4, 0.0, random.Random(1)))
    assert all(4000 < n < 6000 for n in uniform.values())


def test_zipf_prefix_requests_are_a_drawn_prefix_and_their_own_question() -> None:
    workload = zipf_prefix(groups=20, requests=200, exponent=1.0, prefix_tokens=40, question_tokens=8, max_tokens=4)
    assert workload.name == ZIPF_PREFIX and workload.requests == 200 and not workload.timed
    prefixes = Counter(c.system for c in workload.conversations)
    assert len(prefixes) <= 20 and prefixes.most_common(1)[0][1] > 200 / 20  # popular groups repeat
    assert len({c.turns for c in workload.conversations}) == 200
    assert all(len(tokenize(c.system)) == 40 and len(tokenize(c.turns[0])) == 8 for c in workload.conversations)
    assert workload == zipf_prefix(20, 200, 1.0, 40, 8, 4)
    assert workload != zipf_prefix(20, 200, 1.0, 40, 8, 4, seed=1)


def test_multi_turn_think_times_the_multi_turn_conversations() -> None:
    plain = multi_turn(6, 3, 20, 5, 4, system_tokens=10, seed=3)
    workload = multi_turn_think(6, 3, 20, 5, 4, 10, think_s=2.0, conversation_rate=4.0, seed=3)
    assert workload.name == MULTI_TURN_THINK and workload.timed and workload.requests == 18
    assert [(c.system, c.turns) for c in workload.conversations] == [(c.system, c.turns) for c in plain.conversations]
    starts = [c.start for c in workload.conversations]
    assert starts == sorted(starts) and starts[0] > 0 and all(len(c.think) == 2 for c in workload.conversations)
    assert workload == multi_turn_think(6, 3, 20, 5, 4, 10, 2.0, 4.0, seed=3)
    # The turns interleave by due time, not round by round.
    due = {(i, t): when for i, c in enumerate(workload.conversations) for t, when in enumerate(c.due_times())}
    order = list(workload.nominal_order())
    assert sorted(order) == sorted(due) and [due[k] for k in order] == sorted(due.values())
    assert order != list(plain.nominal_order())


def test_due_times_add_the_think_times_and_answer_lengths_can_differ() -> None:
    conversation = Conversation("", (" a", " b", " c"), start=1.0, think=(0.5, 2.0))
    assert conversation.due_times() == [1.0, 1.5, 3.5]
    assert Conversation("", (" a", " b"), start=2.0).due_times() == [2.0, 2.0]  # no think time: at once
    workload = Workload("w", (conversation, Conversation("", (" q",), max_tokens=9)), 3, "d", timed=True)
    assert [workload.answer_tokens(0), workload.answer_tokens(1)] == [3, 9]
    assert [len(answer) for _, answer in workload.replay()] == [9, 3, 3, 3]  # due order: q at 0, then a, b, c


@pytest.mark.parametrize(
    "build",
    [
        lambda: zipf_prefix(0, 1, 1.0, 1, 1, 1),
        lambda: zipf_prefix(1, 1, -1.0, 1, 1, 1),
        lambda: multi_turn_think(1, 1, 1, 1, 1, 0, think_s=0.0, conversation_rate=1.0),
        lambda: multi_turn_think(1, 1, 1, 1, 1, 0, think_s=1.0, conversation_rate=0.0),
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
