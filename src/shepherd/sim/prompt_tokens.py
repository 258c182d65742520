"""The token ids a simulated worker's engine works with: its prompt tokenizer, chosen once at start-up.

Every HTTP route turns request text into ids, and draws output words, through the worker's `PromptTokenizer`:

* `WORDS` (the default): the simulator's download-free word tokenizer (`shepherd.sim.tokenizer`); a chat prompt is
  the messages' contents concatenated;
* `BpePrompts` (`--kv-events-config` with the ZMQ publisher): the ids SGLang would cache, because KV events expose
  them to a gateway that tokenizes on its own. Text is encoded with the sim's BPE (`shepherd.sim.bpe`, the one
  `--grpc` uses and writes to its tokenizer directory); a chat is `bpe.CHAT_TEMPLATE` rendered over the messages
  with `add_generation_prompt=True` as a gateway renders an HF `chat_template`
  (`shepherd.tokenizer.chat_template`), then encoded; output words are the BPE's single-token ids of the same
  words, so a reply's text encodes to its output ids.

`input_ids` given by a client are used as they are either way.
"""

from __future__ import annotations

from typing import Any, Protocol

from shepherd.sim.bpe import CHAT_TEMPLATE, SimTokenizer
from shepherd.sim.parsing import chat_messages, chat_prompt_text
from shepherd.sim.tokenizer import Completion, generate, tokenize
from shepherd.sim.wire import RequestError
from shepherd.tokenizer.chat_template import ChatTemplate, ChatTemplateError


class PromptTokenizer(Protocol):
    def text(self, text: str) -> list[int]:
        """The ids of a text prompt."""

    def chat(self, messages: Any) -> list[int]:
        """The ids of a chat request's prompt (`messages` as sent; `RequestError` if they are malformed)."""

    def completion(self, prompt_ids: list[int], n_tokens: int, seed: int, choice: int) -> Completion:
        """The deterministic output of `n_tokens` for this prompt, seed and choice index."""


class WordPrompts:
    def text(self, text: str) -> list[int]:
        return tokenize(text)

    def chat(self, messages: Any) -> list[int]:
        return tokenize(chat_prompt_text(messages))

    def completion(self, prompt_ids: list[int], n_tokens: int, seed: int, choice: int) -> Completion:
        return generate(prompt_ids, n_tokens, seed, choice)


WORDS = WordPrompts()


class BpePrompts:
    def __init__(self, tokenizer: SimTokenizer) -> None:
        self.tokenizer = tokenizer
        self.template = ChatTemplate(CHAT_TEMPLATE)

    def text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def chat(self, messages: Any) -> list[int]:
        try:
            rendered = self.template.render(chat_messages(messages), add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise RequestError(str(exc)) from None
        return self.tokenizer.encode(rendered)

    def completion(self, prompt_ids: list[int], n_tokens: int, seed: int, choice: int) -> Completion:
        return generate(prompt_ids, n_tokens, seed, choice, self.tokenizer.word_ids)
