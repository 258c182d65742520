"""Seeded, reproducible chat workloads for `shepherd bench routing`.

A workload is a list of conversations. A conversation has an opening system prompt (possibly empty) and user turns;
the request for turn k carries the system prompt, every earlier user turn with the answer the worker gave to it, and
turn k. Two shapes:

- generated shared prefix (like SGLang's `generated-shared-prefix` dataset): `groups` system prompts of
  `system_tokens` tokens, each followed by `prompts_per_group` distinct questions of `question_tokens` tokens; every
  (system prompt, question) pair is a one-turn conversation, and the pairs are shuffled;
- multi-turn: `clients` conversations of `rounds` turns each: an opening message of `first_tokens` tokens that only
  this client sends (a document, say), then questions of `turn_tokens` tokens; the history grows every round.
  An optional shared system prompt of `system_tokens` tokens opens every conversation.

Texts are made of words of one to four letters, each with a leading space, which the simulator's tokenizer maps
to exactly one token each; so the token counts above are exact, and message boundaries are token boundaries
(every message, and every simulated answer, starts with a space).

`nominal_order` is the order a load generator issues the turns in when it serves conversations first come first
served and a conversation's next turn becomes ready once the previous one is answered: round by round (for one-turn
conversations, simply their order). `replay` yields the exact prompt and answer token ids of every turn
in that order, computed with the simulator's own tokenizer and answer generator (answers are deterministic given
the prompt and the simulator's seed), which is what the hit-rate bounds in `cache_bounds` are computed from.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from shepherd.sim.parsing import chat_prompt_text
from shepherd.sim.tokenizer import generate, tokenize

SHARED_PREFIX = "shared-prefix"
MULTI_TURN = "multi-turn"
WORKLOADS = (SHARED_PREFIX, MULTI_TURN)

_LETTERS = string.ascii_lowercase


@dataclass(frozen=True, slots=True)
class Conversation:
    system: str  # "" for none
    turns: tuple[str, ...]  # user messages, in order


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    conversations: tuple[Conversation, ...]
    max_tokens: int  # answer length of every turn
    description: str

    @property
    def requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    def nominal_order(self) -> Iterator[tuple[int, int]]:
        """(conversation, turn) pairs: round-major, so each round of every conversation precedes the next round."""
        rounds = max((len(c.turns) for c in self.conversations), default=0)
        for turn in range(rounds):
            for index, conversation in enumerate(self.conversations):
                if turn < len(conversation.turns):
                    yield index, turn

    def replay(self, seed: int = 0) -> Iterator[tuple[list[int], list[int]]]:
        """(prompt token ids, answer token ids) of every turn in nominal order, as a simulator with `seed` sees them."""
        answers: list[list[str]] = [[] for _ in self.conversations]
        for index, turn in self.nominal_order():
            prompt = tokenize(chat_prompt_text(messages(self.conversations[index], turn, answers[index])))
            answer = generate(prompt, self.max_tokens, seed)
            answers[index].append(answer.text)
            yield prompt, answer.token_ids


def messages(conversation: Conversation, turn: int, answers: Sequence[str]) -> list[dict[str, str]]:
    """The chat messages of `turn`: the system prompt, earlier turns with their `answers`, then the turn itself."""
    out = [{"role": "system", "content": conversation.system}] if conversation.system else []
    for earlier in range(turn):
        out.append({"role": "user", "content": conversation.turns[earlier]})
        out.append({"role": "assistant", "content": answers[earlier]})
    out.append({"role": "user", "content": conversation.turns[turn]})
    return out


def chat_body(
    model: str, conversation: Conversation, turn: int, answers: Sequence[str], max_tokens: int
) -> dict[str, Any]:
    """A streamed chat request for `turn`, asking for usage (cached tokens) in the last frame."""
    return {
        "model": model,
        "messages": messages(conversation, turn, answers),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def random_text(rng: random.Random, tokens: int) -> str:
    """`tokens` random words of 1-4 letters, each with a leading space (one simulator token each)."""
    choices = rng.choices
    return "".join(" " + "".join(choices(_LETTERS, k=1 + int(rng.random() * 4))) for _ in range(tokens))


def shared_prefix(
    groups: int, prompts_per_group: int, system_tokens: int, question_tokens: int, max_tokens: int, seed: int = 0
) -> Workload:
    """`groups` x `prompts_per_group` one-turn conversations, shuffled with `seed`."""
    if min(groups, prompts_per_group, question_tokens) < 1 or system_tokens < 0 or max_tokens < 1:
        raise ValueError("groups, prompts per group, question and answer tokens must be >= 1, system tokens >= 0")
    rng = random.Random(f"shared-prefix/{seed}")
    systems = [random_text(rng, system_tokens) for _ in range(groups)]
    conversations = [
        Conversation(system, (random_text(rng, question_tokens),))
        for system in systems
        for _ in range(prompts_per_group)
    ]
    rng.shuffle(conversations)
    description = (
        f"{groups} groups x {prompts_per_group} prompts, system {system_tokens} + question {question_tokens} tokens,"
        f" {max_tokens}-token answers, shuffled"
    )
    return Workload(SHARED_PREFIX, tuple(conversations), max_tokens, description)


def multi_turn(
    clients: int,
    rounds: int,
    first_tokens: int,
    turn_tokens: int,
    max_tokens: int,
    system_tokens: int = 0,
    seed: int = 0,
) -> Workload:
    """`clients` conversations of `rounds` turns; the first turn is `first_tokens` long, later ones `turn_tokens`."""
    if min(clients, rounds, first_tokens, turn_tokens, max_tokens) < 1 or system_tokens < 0:
        raise ValueError("clients, rounds, turn and answer tokens must be >= 1, system tokens >= 0")
    rng = random.Random(f"multi-turn/{seed}")
    system = random_text(rng, system_tokens)
    conversations = [
        Conversation(
            system,
            (random_text(rng, first_tokens), *(random_text(rng, turn_tokens) for _ in range(rounds - 1))),
        )
        for _ in range(clients)
    ]
    description = (
        f"{clients} clients x {rounds} rounds, first turn {first_tokens} + {turn_tokens} tokens per later turn,"
        f" {max_tokens}-token answers" + (f", shared system prompt {system_tokens} tokens" if system_tokens else "")
    )
    return Workload(MULTI_TURN, tuple(conversations), max_tokens, description)
