"""A tiny, deterministic byte-level BPE tokenizer directory for tests (trained in memory in ~0.1 s).

`write_tiny_tokenizer_dir(path)` writes what a model directory holds for its tokenizer: `tokenizer.json`,
`tokenizer_config.json` (special-token strings and a chat template) and `config.json` (`eos_token_id`).
Special tokens get the first ids, in `SPECIAL_TOKENS` order: `<|endoftext|>` 0, `<|im_start|>` 1, `<|im_end|>` 2,
then the Llama-3 header tokens 3..6.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

# A Qwen2.5-style ChatML template: an optional tools block in the system turn, tool calls as JSON.
CHATML = (
    "{%- if tools is defined and tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- continue %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is not none %}{{- message['content'] }}{%- endif %}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{- '\\n<tool_call>\\n' + call['function'] | tojson + '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The Llama-3 Instruct template's core: BOS, header-delimited turns, trimmed content, `<|eot_id|>`.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "What is the capital of France? Paris is the capital of France.",
    "You are a helpful assistant. Answer the question in one sentence.",
    "system user assistant tool tools function arguments name weather city",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14",
    "Café, naïve, résumé, déjà vu — les élèves étudient à l'école.",
    "def main():\n    print('hello')\n    return 0\n",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
]


@functools.cache
def tiny_tokenizer_json() -> str:
    """The trained `tokenizer.json` text (same bytes in every process: the corpus is fixed, ties break by id)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer)
    return tokenizer.to_str()


def write_tiny_tokenizer_dir(
    path: str | Path,
    chat_template: str = CHATML,
    *,
    bos_token: str = "<|endoftext|>",
    eos_token: str = "<|im_end|>",
) -> Path:
    """Write the tiny tokenizer as a model directory at `path` (created if missing) and return it.

    `config.json` carries the id of `eos_token`; for the Llama-3 template pass `bos_token="<|begin_of_text|>"` and
    `eos_token="<|eot_id|>"`.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": "<|endoftext|>",
        "chat_template": chat_template,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    model_config = {"model_type": "tiny", "eos_token_id": SPECIAL_TOKENS.index(eos_token)}
    (directory / "config.json").write_text(json.dumps(model_config), encoding="utf-8")
    return directory
