"""The per-choice decoder: whole characters only, stop tokens and stop strings as the gateway applies them."""

from __future__ import annotations

import pytest

from shepherd.generation.decode import ChoiceDecoder, StopConfig
from shepherd.tokenizer.loader import LoadedTokenizer, load_tokenizer
from tests.support.tiny_tokenizer import write_tiny_tokenizer_dir

EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> LoadedTokenizer:
    return load_tokenizer(write_tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def decoder(tok: LoadedTokenizer, *strings: str, **options) -> ChoiceDecoder:
    token_stops = options.pop("token_stops", {EOS: EOS})
    return ChoiceDecoder(tok.tokenizer, StopConfig(strings=strings, token_stops=token_stops, **options))


def feed_each(dec: ChoiceDecoder, ids: list[int]) -> list[str]:
    return [dec.feed([token_id]) for token_id in ids]


def test_token_by_token_text_matches_a_whole_decode(tok):
    text = "The quick brown fox — déjà vu, 東京 🙂!"
    ids = tok.encode(text)
    dec = decoder(tok)
    assert "".join(feed_each(dec, ids)) + dec.flush() == text


def test_a_four_byte_emoji_split_over_byte_tokens_is_never_emitted_partially(tok):
    ids = tok.encode("Hi 😀!")
    emoji_ids = tok.encode("😀")
    assert len(emoji_ids) == 4  # one byte per token
    pieces = feed_each(decoder(tok), ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "😀" in pieces  # released whole, by the token completing it
    assert "".join(pieces) == "Hi 😀!"


def test_a_stop_string_split_over_three_chunks_is_hidden(tok):
    dec = decoder(tok, "XYZ")
    chunks = [tok.encode("Hello X"), tok.encode("Y"), tok.encode("Z and more")]
    out = [dec.feed(ids) for ids in chunks]
    assert out[0] == "Hello "  # "X" is held: it could start "XYZ"
    assert out[1] == ""
    assert out[2] == ""
    assert dec.stopped and dec.matched_stop == "XYZ"
    assert dec.consumed == 1  # the "Z" token; " and more" is not part of the output
    assert dec.feed(tok.encode(" later")) == "" and dec.flush() == ""


def test_no_stop_trim_keeps_the_stop_string(tok):
    dec = decoder(tok, "XYZ", no_stop_trim=True)
    text = "".join(dec.feed(ids) for ids in (tok.encode("Hello X"), tok.encode("Y"), tok.encode("Z and more")))
    assert text == "Hello XYZ"
    assert dec.matched_stop == "XYZ"


def test_only_a_possible_stop_prefix_is_held(tok):
    dec = decoder(tok, "XYZ")
    assert dec.feed(tok.encode("Hello XY")) == "Hello "
    assert dec.feed(tok.encode("a")) == "XYa"  # can no longer become "XYZ"
    assert dec.feed(tok.encode("Paris")) == "Paris"
    assert dec.feed(tok.encode(" X")) == " "
    assert dec.flush() == "X"  # the end releases what was held
    assert not dec.stopped


def test_the_earliest_of_several_stop_strings_wins(tok):
    dec = decoder(tok, "lazy", "fox")
    assert dec.feed(tok.encode("The quick brown fox jumps over the lazy dog")) == "The quick brown "
    assert dec.matched_stop == "fox"


def test_eos_is_hidden_and_ends_the_choice(tok):
    dec = decoder(tok, "XYZ")
    assert dec.feed([*tok.encode("Hello X"), EOS, *tok.encode("after")]) == "Hello X"  # held text is released
    assert dec.stopped and dec.matched_stop == EOS
    assert dec.consumed == len(tok.encode("Hello X")) + 1


def test_eos_without_stop_strings_stops_in_one_step(tok):
    dec = decoder(tok)
    ids = tok.encode("Paris.")
    assert dec.feed([*ids, EOS, 5, 6]) == "Paris."
    assert dec.consumed == len(ids) + 1 and dec.matched_stop == EOS


def test_a_visible_eos_with_no_stop_trim_and_special_tokens_kept(tok):
    dec = decoder(tok, no_stop_trim=True, skip_special_tokens=False)
    assert dec.feed([*tok.encode("Paris"), EOS]) == "Paris<|im_end|>"
    dec = decoder(tok, no_stop_trim=True)  # skipped special tokens stay invisible
    assert dec.feed([*tok.encode("Paris"), EOS]) == "Paris"


def test_a_user_stop_token_and_a_single_token_stop_string(tok):
    paris = tok.single_token_id("Paris")
    dec = decoder(tok, "Paris", token_stops={EOS: EOS, paris: "Paris"})
    assert dec.feed(tok.encode("The capital is Paris, France")) == "The capital is "
    assert dec.matched_stop == "Paris"
    period = tok.single_token_id(".")
    dec = decoder(tok, token_stops={period: period}, no_stop_trim=True)
    assert dec.feed(tok.encode("Fine. Thanks")) == "Fine."
    assert dec.matched_stop == period


def test_an_unfinished_character_at_the_end_flushes_as_a_replacement_char(tok):
    dec = decoder(tok)
    assert dec.feed(tok.encode("ok 😀")[:-1]) == "ok "
    assert dec.flush() == "\ufffd"
