"""Fast prompt encoding: split at special tokens, encode the pieces in parallel, remember the long ones.

HF `tokenizers` cuts a text at its added special tokens before anything else, and encodes the pieces in between
independently. So the pieces can be encoded as a batch (in parallel on the library's thread pool) and their ids
concatenated: the result is the same. Every encode here skips the character offsets (`encode_batch_fast`), which a
plain `encode` computes and the gateway never reads: about a quarter of its cost. A rendered chat is mostly
such pieces (one per message between `<|im_start|>`/`<|im_end|>`-style tokens), and a multi-turn conversation
re-sends the same earlier messages with every turn, so long pieces are kept in a bounded cache (SMG's "L1" cache).

Whether splitting gives the same ids depends on the tokenizer (a pre-tokenizer that prepends to "the first word"
would not): `SegmentEncoder` checks it on a probe text once, and encodes whole texts when it does not hold.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict

from tokenizers import Tokenizer

CACHED_MIN_CHARS = 256  # shorter pieces are cheaper to encode again than to look up and keep
SPLIT_MIN_CHARS = 2048  # below this a single call is cheaper than a batch
DEFAULT_CACHE_BYTES = 50 * 1024 * 1024
_PROBE = "Hi there,  it's 42°C 🦙!\n\n  def f(x):\treturn x  \n"


class SegmentEncoder:
    def __init__(self, tokenizer: Tokenizer, max_cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._tokenizer = tokenizer
        specials = sorted(
            (t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special and t.content),
            key=len,
            reverse=True,
        )
        self._splitter = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()  # large prompts are encoded in worker threads, small ones on the loop
        self._cache_bytes = 0
        self._max_cache_bytes = max_cache_bytes
        if self._splitter is not None and not self._splitting_is_exact(specials):
            self._splitter = None

    @property
    def splits(self) -> bool:
        return self._splitter is not None

    def encode(self, text: str) -> list[int]:
        """The ids of `text` without added special tokens; equal to `Tokenizer.encode(text).ids`."""
        if self._splitter is None or len(text) < SPLIT_MIN_CHARS:
            return self._tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids  # no offsets: faster
        pieces = [p for p in self._splitter.split(text) if p]
        cache = self._cache
        found: list[list[int] | None] = []
        missing: list[int] = []
        with self._lock:
            for i, piece in enumerate(pieces):
                ids = cache.get(piece)
                if ids is None:
                    missing.append(i)
                else:
                    cache.move_to_end(piece)
                found.append(ids)
        if missing:
            encodings = self._tokenizer.encode_batch_fast([pieces[i] for i in missing], add_special_tokens=False)
            with self._lock:
                for i, encoding in zip(missing, encodings, strict=True):
                    found[i] = ids = encoding.ids
                    if len(pieces[i]) >= CACHED_MIN_CHARS:
                        self._remember(pieces[i], ids)
        out: list[int] = []
        for ids in found:
            out.extend(ids)  # type: ignore[arg-type]
        return out

    def _remember(self, piece: str, ids: list[int]) -> None:
        size = len(piece) + 8 * len(ids)  # about what the key and the id list cost
        if size > self._max_cache_bytes:
            return
        self._cache[piece] = ids
        self._cache_bytes += size
        while self._cache_bytes > self._max_cache_bytes:
            old, old_ids = self._cache.popitem(last=False)
            self._cache_bytes -= len(old) + 8 * len(old_ids)

    def _splitting_is_exact(self, specials: list[str]) -> bool:
        probe = specials[0].join([_PROBE, " " + _PROBE, _PROBE.upper(), "x"])
        whole = self._tokenizer.encode(probe, add_special_tokens=False).ids
        pieces = [p for p in self._splitter.split(probe) if p]  # type: ignore[union-attr]
        parts: list[int] = []
        for encoding in self._tokenizer.encode_batch_fast(pieces, add_special_tokens=False):
            parts.extend(encoding.ids)
        return parts == whole
