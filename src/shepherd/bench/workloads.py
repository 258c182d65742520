"""Seeded, reproducible chat workloads for `shepherd bench routing`.

A workload is a list of conversations. A conversation has an opening system prompt (possibly empty) and user turns;
the request for turn k carries the system prompt, every earlier user turn with the answer the worker gave to it, and
turn k. Generated shapes:

- generated shared prefix (like SGLang's `generated-shared-prefix` dataset): `groups` system prompts of
  `system_tokens` tokens, each followed by `prompts_per_group` distinct questions of `question_tokens` tokens; every
  (system prompt, question) pair is a one-turn conversation, and the pairs are shuffled;
- multi-turn: `clients` conversations of `rounds` turns each: an opening message of `first_tokens` tokens that only
  this client sends (a document, say), then questions of `turn_tokens` tokens; the history grows every round.
  An optional shared system prompt of `system_tokens` tokens opens every conversation;
- Zipf prefix groups: `groups` shared prefixes (system prompts, documents) of `system_tokens` tokens whose
  popularity follows Zipf's law with `exponent` (the group of rank r is drawn with weight 1 / r^exponent);
  `requests` one-turn conversations, each a drawn group's prefix and a question of `question_tokens` of its own;
- multi-turn with think times: the multi-turn conversations, timed like users: conversations start at Poisson
  arrivals (`conversation_rate` per second) and each next turn is due an exponential think time (mean `think_s`)
  after the previous one was sent, so conversations interleave in a random order instead of round by round.

A timed workload (multi-turn with think times, and trace replay in `shepherd.bench.trace`) carries its own
schedule: every conversation has a start time and the think times between its turns, and the load driver follows
them instead of a rate or a number of clients.

Texts are made of words of one to four letters, each with a leading space, which the simulator's tokenizer maps
to exactly one token each; so the token counts above are exact, and message boundaries are token boundaries
(every message, and every simulated answer, starts with a space).

`nominal_order` is the order a load generator issues the turns in when it serves conversations first come first
served and a conversation's next turn becomes ready once the previous one is answered: round by round (for one-turn
conversations, simply their order); for a timed workload, the order of the turns' due times if every answer came at
once. `replay` yields the exact prompt and answer token ids of every turn in that order, computed with the
simulator's own tokenizer and answer generator (answers are deterministic given the prompt and the simulator's
seed), which is what the hit-rate bounds in `cache_bounds` are computed from.
"""

from __future__ import annotations

import bisect
import itertools
import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from shepherd.sim.parsing import chat_prompt_text
from shepherd.sim.tokenizer import generate, tokenize

SHARED_PREFIX = "shared-prefix"
MULTI_TURN = "multi-turn"
ZIPF_PREFIX = "zipf-prefix"
MULTI_TURN_THINK = "multi-turn-think"
TRACE = "trace"  # replay of a trace file (`shepherd.bench.trace`), run only when one is given
WORKLOADS = (SHARED_PREFIX, MULTI_TURN, ZIPF_PREFIX, MULTI_TURN_THINK)  # the generated ones

_LETTERS = string.ascii_lowercase


@dataclass(frozen=True, slots=True)
class Conversation:
    system: str  # "" for none
    turns: tuple[str, ...]  # user messages, in order
    start: float = 0.0  # timed workloads: when the first turn is due, seconds after the run starts
    think: tuple[float, ...] = ()  # timed workloads: seconds from sending turn k to turn k + 1 being due
    max_tokens: int | None = None  # answer length of every turn, when not the workload's

    def think_after(self, turn: int) -> float:
        """Seconds from sending `turn` to the next turn being due (0 when not given: at once)."""
        return self.think[turn] if turn < len(self.think) else 0.0

    def due_times(self) -> list[float]:
        """When each turn is due if every answer comes at once (a timed workload's nominal schedule)."""
        gaps = (self.think_after(turn) for turn in range(len(self.turns) - 1))
        return list(itertools.accumulate(gaps, initial=self.start))


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    conversations: tuple[Conversation, ...]
    max_tokens: int  # answer length of every turn, unless its conversation sets its own
    description: str
    timed: bool = False  # the conversations' start and think times schedule the load

    @property
    def requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    def answer_tokens(self, index: int) -> int:
        """The answer length of conversation `index`."""
        own = self.conversations[index].max_tokens
        return self.max_tokens if own is None else own

    def nominal_order(self) -> Iterator[tuple[int, int]]:
        """(conversation, turn) pairs: round-major, so each round of every conversation precedes the next round;
        by due time for a timed workload."""
        if self.timed:
            due = [
                (when, index, turn)
                for index, conversation in enumerate(self.conversations)
                for turn, when in enumerate(conversation.due_times())
            ]
            yield from ((index, turn) for _, index, turn in sorted(due))
            return
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
            answer = generate(prompt, self.answer_tokens(index), seed)
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


def zipf_ranks(count: int, groups: int, exponent: float, rng: random.Random) -> list[int]:
    """`count` group indexes drawn with `rng`: group r (0-based) with weight 1 / (r + 1)^exponent."""
    cumulative = list(itertools.accumulate((rank + 1) ** -exponent for rank in range(groups)))
    total = cumulative[-1]
    last = groups - 1
    return [min(bisect.bisect(cumulative, rng.random() * total), last) for _ in range(count)]


def zipf_prefix(
    groups: int,
    requests: int,
    exponent: float,
    prefix_tokens: int,
    question_tokens: int,
    max_tokens: int,
    seed: int = 0,
) -> Workload:
    """`requests` one-turn conversations, each a Zipf-drawn group's prefix followed by its own question."""
    if min(groups, requests, prefix_tokens, question_tokens, max_tokens) < 1 or exponent < 0:
        raise ValueError("groups, requests, prefix, question and answer tokens must be >= 1, the exponent >= 0")
    rng = random.Random(f"zipf-prefix/{seed}")
    prefixes = [random_text(rng, prefix_tokens) for _ in range(groups)]
    drawn = zipf_ranks(requests, groups, exponent, rng)
    conversations = tuple(Conversation(prefixes[group], (random_text(rng, question_tokens),)) for group in drawn)
    top = drawn.count(0) / requests
    description = (
        f"{requests} prompts over {groups} prefix groups with Zipf popularity (exponent {exponent:g}; the top group"
        f" {top:.0%} of requests, {len(set(drawn))} groups drawn), prefix {prefix_tokens} + question"
        f" {question_tokens} tokens, {max_tokens}-token answers"
    )
    return Workload(ZIPF_PREFIX, conversations, max_tokens, description)


def multi_turn_think(
    clients: int,
    rounds: int,
    first_tokens: int,
    turn_tokens: int,
    max_tokens: int,
    system_tokens: int,
    think_s: float,
    conversation_rate: float,
    seed: int = 0,
) -> Workload:
    """The `multi_turn` conversations of the same sizes and seed, started at Poisson arrivals of
    `conversation_rate` per second, with exponential think times of mean `think_s` between turns."""
    if not think_s > 0 or not conversation_rate > 0:
        raise ValueError("the think time and the conversation rate must be > 0")
    base = multi_turn(clients, rounds, first_tokens, turn_tokens, max_tokens, system_tokens, seed)
    rng = random.Random(f"multi-turn-think/{seed}")
    starts = itertools.accumulate(rng.expovariate(conversation_rate) for _ in base.conversations)
    conversations = tuple(
        replace(c, start=start, think=tuple(rng.expovariate(1 / think_s) for _ in range(rounds - 1)))
        for c, start in zip(base.conversations, starts, strict=True)
    )
    description = (
        f"{base.description}; conversations start at {conversation_rate:g}/s (Poisson), think times exponential,"
        f" mean {think_s:g}s"
    )
    return Workload(MULTI_TURN_THINK, conversations, max_tokens, description, timed=True)
