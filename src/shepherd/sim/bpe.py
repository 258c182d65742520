"""A real (tiny) tokenizer for simulated gRPC workers: a byte-level BPE trained at start-up.

A gRPC worker exchanges token ids, not text, so a gateway in front of it must tokenize and detokenize with the
worker's own tokenizer (loaded from a local directory or fetched with `GetTokenizer`). This module trains one in
memory, in a few tens of milliseconds, and writes it as a Hugging Face tokenizer directory.

Training is deterministic: the corpus is fixed and `tokenizers` breaks ties by token id, so every process (any
`PYTHONHASHSEED`) builds the same `tokenizer.json` and therefore the same ids. Every word of the simulator's output
vocabulary is a single token, so generated ids decode to the same words the HTTP simulator writes; rare text (the
emoji, most accented and CJK characters) stays split into byte tokens, so a client can be tested on characters that
span several ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shepherd.sim.tokenizer import OUTPUT_VOCAB

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # trained first: ids 0, 1, 2
VOCAB_SIZE = 1536

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_PROSE = """\
The quick brown fox jumps over the lazy dog while the old man reads a book by the lamp.
What is the capital of France? Paris is the capital of France, and Berlin is the capital of Germany.
Please write a short story about a robot who learns to paint the sea at dawn.
Explain how a prefix cache speeds up serving: requests that share a system prompt reuse its keys and values.
Summarize the following article in three sentences, then list the main points as bullet items.
You are a helpful assistant. Answer the user's questions truthfully and concisely.
Translate into French: "Good morning, how are you today?" Bonjour, comment allez-vous aujourd'hui ?
Numbers and dates: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024-05-17 12:30:45 3.14159 -273.15 1e-9 50% $19.99
def add(x: int, y: int) -> int:
    return x + y

for i in range(10):
    print(f"step {i}: {add(i, i)}")
{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "celsius"}, "ok": true, "items": [1, 2, 3]}
<html><body><p class="note">Hello, world!</p></body></html>
SELECT id, name FROM users WHERE age > 30 ORDER BY name LIMIT 5;
Café, naïve, résumé, Zürich, São Paulo, crème brûlée, Ångström, Łódź, über, façade.
你好，世界。東京は日本の首都です。한국어를 배우고 있습니다.
Привет, мир! مرحبا بالعالم שלום γειά σου
Emoji: 🙂 🚀 👍🏽 🇫🇷 ❤️ 🎉
Math: ∀x ∈ ℝ, x² ≥ 0; π ≈ 3.14; √2 ≠ 1.5; a → b ⇒ c.
"""  # noqa: RUF001 (non-Latin look-alikes on purpose)
_CHAT = f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n{IM_START}user\nHello!{IM_END}\n{ENDOFTEXT}"


def _corpus() -> list[str]:
    words = " ".join(OUTPUT_VOCAB)
    # Repetition weights the output words (they must become whole tokens) over the varied text.
    return [words] * 40 + [_PROSE] * 3 + [_CHAT]


def train() -> Tokenizer:
    """Train the simulator's BPE (the same tokenizer in every process)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,  # single occurrences (the emoji) stay byte tokens
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer


@dataclass(frozen=True, slots=True)
class SimTokenizer:
    """The trained tokenizer plus the ids the simulated worker needs."""

    tokenizer: Tokenizer
    eos_ids: tuple[int, ...]  # <|endoftext|> (the natural end of an output) and <|im_end|>
    word_ids: tuple[int, ...]  # OUTPUT_VOCAB[i] encodes to exactly word_ids[i]

    @property
    def eos_id(self) -> int:
        return self.eos_ids[0]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def write_dir(self, directory: Path) -> None:
        """Write a tokenizer directory loadable by `transformers`, SMG and `tokenizers.Tokenizer.from_file`.

        EOS ids go into `config.json` and `generation_config.json`: that is where loaders look for them.
        """
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        eos = list(self.eos_ids)
        files = {
            "tokenizer_config.json": {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": ENDOFTEXT,
                "eos_token": ENDOFTEXT,
                "pad_token": ENDOFTEXT,
                "add_bos_token": False,
                "add_eos_token": False,
                "model_max_length": 32768,
                "chat_template": CHAT_TEMPLATE,
            },
            "config.json": {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": self.vocab_size,
                "bos_token_id": self.eos_id,
                "eos_token_id": eos,
                "pad_token_id": self.eos_id,
            },
            "generation_config.json": {"bos_token_id": self.eos_id, "eos_token_id": eos},
        }
        for name, content in files.items():
            (directory / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def build() -> SimTokenizer:
    """Train the tokenizer and look up its special and output-word ids."""
    tokenizer = train()
    eos_ids = (tokenizer.token_to_id(ENDOFTEXT), tokenizer.token_to_id(IM_END))
    word_ids = []
    for word in OUTPUT_VOCAB:
        ids = tokenizer.encode(word, add_special_tokens=False).ids
        if len(ids) != 1:
            raise RuntimeError(f"output word {word!r} is not a single token of the simulator's BPE: {ids}")
        word_ids.append(ids[0])
    return SimTokenizer(tokenizer, eos_ids, tuple(word_ids))
