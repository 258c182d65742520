"""Deterministic, download-free tokenization and text generation for the simulator.

A token is a run of leading whitespace followed by up to four non-space characters (or a
trailing whitespace run).  Matching is greedy left to right, so the tokenization is
*prefix-stable*: for any cut point ``k``, every token of ``text`` that ends at or before ``k``
is also a token of ``text[:k]``, in the same position.  That is the property a prefix
(KV) cache needs, and it mirrors how BPE tokenizers behave away from the cut point.

Token ids are CRC32 of the token text modulo :data:`VOCAB_SIZE`, so they are the same in
every process (unlike ``hash(str)``, which is salted per process).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

VOCAB_SIZE = 32000

_TOKEN_RE = re.compile(r"\s*\S{1,4}|\s+")

# Output words have at most four letters and a leading space, so the tokenizer maps each one to
# exactly one token: a generated reply, re-sent as part of the next chat turn, hits the same
# cache pages.  Exactly 256 of them, so one random byte picks one word.
_WORDS = """the of and to in is it you that was for on are as with his they at be this have from or
one had by word but not what all were we when your can said use an each she do how if will
up out many then them so some her make like him into time has look two more go see no way
been call who oil its now find long down day did get come made may part over new take only
work know year live me back give most very our just name good man say help line turn much
mean old any same tell boy why ask went men read need land home us move try kind hand off
play away grow show also set put end does well big even such here must high act air run
red ten sun ice sea fox owl cat dog bee ant elk yak emu cow pig hen ram kit bat jay rat ox
oak elm ash fir yew fig lime pear plum kiwi date nut rice corn bean pea soy tea milk rain
snow wind fog hail mist dew dusk dawn noon moon star sky cave hill lake pond bay gold iron
tin zinc lead ruby jade opal onyx coal salt sand clay rock gem dust glow blue gray pink
teal tan jet wave tide reef surf foam rope knot sail mast keel deck hull port crew map path
road lane gate door wall roof room bed lamp desk book page ink pen note song tune drum harp
horn bell bow arc ring loop spin fast slow warm cool cold hot dry wet soft firm calm bold
wise fair true deep wide tall thin"""
OUTPUT_VOCAB: tuple[str, ...] = tuple(" " + w for w in dict.fromkeys(_WORDS.split()))[:256]
assert len(OUTPUT_VOCAB) == 256
_OUTPUT_IDS: tuple[int, ...] = tuple(zlib.crc32(w.encode()) % VOCAB_SIZE for w in OUTPUT_VOCAB)
_OUTPUT_LENGTHS: tuple[int, ...] = tuple(len(w) for w in OUTPUT_VOCAB)


def tokenize(text: str) -> list[int]:
    """Token ids of ``text`` (prefix-stable, see module docstring)."""
    crc = zlib.crc32
    return [crc(t.encode()) % VOCAB_SIZE for t in _TOKEN_RE.findall(text)]


@dataclass(slots=True)
class Completion:
    """A generated continuation: token ids plus the character offset after each token."""

    token_ids: list[int]
    text: str
    offsets: list[int]  # offsets[i] = len(text of the first i tokens); offsets[0] == 0

    @classmethod
    def ids_only(cls, token_ids: list[int]) -> Completion:
        """A completion without text, for workers that exchange token ids only (gRPC)."""
        return cls(token_ids, "", [0] * (len(token_ids) + 1))

    def text_upto(self, n_tokens: int) -> str:
        return self.text[: self.offsets[n_tokens]]

    def head(self, n_tokens: int) -> Completion:
        """The first ``n_tokens`` tokens."""
        if n_tokens >= len(self.token_ids):
            return self
        return Completion(self.token_ids[:n_tokens], self.text_upto(n_tokens), self.offsets[: n_tokens + 1])


def word_draws(prompt_ids: list[int], n_tokens: int, seed: int = 0, choice: int = 0) -> bytes:
    """Indexes into :data:`OUTPUT_VOCAB`, one byte per token: the same prompt, seed and choice index
    always give the same draws, in any process, and fewer tokens give a prefix of them."""
    # hash() of a tuple of ints is not salted per process (only str/bytes hashes are).
    key = struct.pack("<qqq", hash(tuple(prompt_ids)), seed, choice)
    return hashlib.shake_128(key).digest(n_tokens)


def generate(
    prompt_ids: list[int], n_tokens: int, seed: int = 0, choice: int = 0, word_ids: Sequence[int] = _OUTPUT_IDS
) -> Completion:
    """Deterministic continuation of ``prompt_ids`` (see :func:`word_draws`); ``word_ids[i]`` is the id of
    ``OUTPUT_VOCAB[i]`` (by default this module's; the BPE's ``SimTokenizer.word_ids`` give the same text)."""
    draws = word_draws(prompt_ids, n_tokens, seed, choice)
    return Completion(
        [word_ids[b] for b in draws],
        "".join([OUTPUT_VOCAB[b] for b in draws]),
        [0, *itertools.accumulate([_OUTPUT_LENGTHS[b] for b in draws])],
    )


def fake_logprob(token_id: int) -> float:
    """A stable, plausible-looking log-probability for a token."""
    return -((token_id % 997) / 200.0) - 0.001
