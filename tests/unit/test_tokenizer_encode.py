"""SegmentEncoder: the same ids as `Tokenizer.encode`, computed piecewise between special tokens and cached."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from shepherd.tokenizer import encode as encode_module
from shepherd.tokenizer.encode import SegmentEncoder
from tests.support.tiny_tokenizer import tiny_tokenizer_json

CHAT = (
    "".join(
        f"<|im_start|>{role}\n{text}<|im_end|>\n"
        for role, text in [
            ("system", "You are terse. " * 40),
            ("user", "Héllo wörld 🦙, 42 + 17 = 59?\n\n  indented\tcode() " * 30),
            ("assistant", "Sure: " + "lorem ipsum dolor sit amet " * 60),
            ("user", "again " * 200),
        ]
    )
    + "<|im_start|>assistant\n"
)


def tiny() -> Tokenizer:
    return Tokenizer.from_str(tiny_tokenizer_json())


def test_split_encoding_equals_whole_encoding():
    tokenizer = tiny()
    encoder = SegmentEncoder(tokenizer)
    assert encoder.splits
    assert len(CHAT) >= encode_module.SPLIT_MIN_CHARS
    assert encoder.encode(CHAT) == tokenizer.encode(CHAT, add_special_tokens=False).ids
    short = "<|im_start|>user\nhi<|im_end|>"
    assert encoder.encode(short) == tokenizer.encode(short, add_special_tokens=False).ids


def test_long_pieces_are_cached_within_the_memory_bound():
    tokenizer = tiny()
    encoder = SegmentEncoder(tokenizer, max_cache_bytes=20_000)
    encoder.encode(CHAT)
    cached = dict(encoder._cache)
    assert cached and all(len(piece) >= encode_module.CACHED_MIN_CHARS for piece in cached)
    assert encoder._cache_bytes <= 20_000
    follow_up = CHAT + "<|im_end|>\n<|im_start|>user\n" + "one more question " * 200 + "<|im_end|>\n"
    assert encoder.encode(follow_up) == tokenizer.encode(follow_up, add_special_tokens=False).ids
    assert encoder._cache_bytes <= 20_000  # older pieces were evicted to make room


def test_a_tokenizer_whose_pieces_do_not_encode_alike_is_encoded_whole():
    """Metaspace with prepend_scheme="first" marks only the text's first word: pieces would each get the mark."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(["hello world, it is a test of the first word " * 20, CHAT], trainer)
    encoder = SegmentEncoder(tokenizer)
    assert not encoder.splits
    text = "hello</s>world " * 300
    assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False).ids
