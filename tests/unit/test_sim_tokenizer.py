import pytest

from shepherd.sim.tokenizer import OUTPUT_VOCAB, generate, tokenize

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\nand newlines  ",
    "supercalifragilisticexpialidocious words split into chunks",
    "ünïcödé  téxt — with symbols!? 1234567890",
]


@pytest.mark.parametrize("text", TEXTS)
def test_prefix_of_text_tokenizes_to_prefix_of_tokens(text):
    full = tokenize(text)
    for cut in range(len(text) + 1):
        head = tokenize(text[:cut])
        # Only the token that straddles the cut may differ.
        assert head[:-1] == full[: max(len(head) - 1, 0)]


def test_appending_text_extends_tokens_at_a_token_boundary():
    base = "You are a helpful assistant."
    assert tokenize(base + " Tell me a joke.")[: len(tokenize(base))] == tokenize(base)


def test_tokenization_is_stable_across_processes():
    # CRC32-based ids: fixed values, independent of PYTHONHASHSEED.
    assert tokenize("hello world") == [16099, 6980, 14374, 31436]


def test_empty_text_has_no_tokens():
    assert tokenize("") == []


def test_generation_is_deterministic_and_exactly_n_tokens():
    prompt = tokenize("Tell me a story")
    a = generate(prompt, 12, seed=1)
    assert a == generate(prompt, 12, seed=1)
    assert len(a.token_ids) == 12
    assert a.offsets[-1] == len(a.text)
    assert a.text_upto(3).split() == a.text.split()[:3]
    assert all(" " + word in OUTPUT_VOCAB for word in a.text.split())
    assert generate(prompt, 12, seed=2).text != a.text
    assert generate(prompt, 12, seed=1, choice=1).text != a.text
    assert generate(prompt, 0).text == ""


def test_generated_text_retokenizes_to_the_generated_ids():
    completion = generate(tokenize("x"), 20)
    assert tokenize("x" + completion.text)[1:] == completion.token_ids
    assert tokenize(completion.text_upto(5)) == completion.token_ids[:5]
