"""Per-choice incremental detokenization with the gateway's stop handling (reference 2.4).

SGLang gRPC workers see token ids only: string stops are matched here, and EOS / stop-token ids, which the engine
leaves in its output, are hidden here. Text comes from `tokenizers.decoders.DecodeStream`, which never yields half a
UTF-8 character; text that could still be the start of a stop string is held back until it can no longer match.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


@dataclass(frozen=True, slots=True)
class StopConfig:
    """What ends a choice in the gateway.

    `token_stops` maps a stop token id to what `matched_stop` reports for it: the id itself for EOS and user
    `stop_token_ids`, the stop string for a single-token stop string (which the engine also stops on).
    """

    strings: tuple[str, ...] = ()
    token_stops: Mapping[int, int | str] = field(default_factory=dict)
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    _prefixes: frozenset[str] = field(init=False, repr=False, compare=False)
    _longest_prefix: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prefixes = frozenset(stop[:k] for stop in self.strings for k in range(1, len(stop)))
        object.__setattr__(self, "_prefixes", prefixes)
        object.__setattr__(self, "_longest_prefix", max(map(len, prefixes), default=0))

    def holdable(self, text: str) -> int:
        """How many trailing characters of `text` could still grow into a stop string."""
        prefixes = self._prefixes
        for k in range(min(len(text), self._longest_prefix), 0, -1):
            if text[-k:] in prefixes:
                return k
        return 0


class ChoiceDecoder:
    """Turns one choice's token ids into the text to release, stopping where the gateway must stop.

    After each `feed`, `consumed` says how many of the given ids belong to the output (all of them unless a
    stop fired inside the batch); once `stopped`, further ids are ignored and `matched_stop` holds the stop string
    or token id.
    """

    __slots__ = ("_config", "_held", "_pending", "_stream", "_tokenizer", "consumed", "matched_stop", "stopped")

    def __init__(self, tokenizer: Tokenizer, config: StopConfig) -> None:
        self._tokenizer = tokenizer
        self._config = config
        self._stream = DecodeStream(skip_special_tokens=config.skip_special_tokens)
        self._held = ""
        self._pending: list[int] = []  # ids fed since the decoder last produced text (an incomplete character)
        self.stopped = False
        self.matched_stop: int | str | None = None
        self.consumed = 0

    def feed(self, ids: Sequence[int]) -> str:
        """The text that can be released after `ids` (possibly "")."""
        self.consumed = 0
        if self.stopped:
            return ""
        token_stops = self._config.token_stops
        parts = []
        # Token by token: text is released as early as possible, and a stop tells which id ended the output.
        for token_id in ids:
            self.consumed += 1
            if token_id in token_stops:
                parts.append(self._stop_on_token(token_id))
                break
            text = self._decode(token_id)
            if text:
                parts.append(self._scan(text))
                if self.stopped:
                    break
        return "".join(parts)

    def flush(self) -> str:
        """Releases everything still held at the end of the choice (an unfinished character decodes as U+FFFD)."""
        if self.stopped:
            return ""
        text = ""
        if self._pending:
            text = self._scan(
                self._tokenizer.decode(self._pending, skip_special_tokens=self._config.skip_special_tokens)
            )
            self._pending.clear()
        if not self.stopped:
            text += self._held
            self._held = ""
        return text

    def _decode(self, token_id: int) -> str:
        text = self._stream.step(self._tokenizer, token_id)
        if text is None:
            self._pending.append(token_id)
            return ""
        self._pending.clear()
        return text

    def _stop_on_token(self, token_id: int) -> str:
        self.stopped = True
        self.matched_stop = self._config.token_stops[token_id]
        text = self._held
        self._held = ""
        if self._config.no_stop_trim:
            text += self._decode(token_id)
        return text

    def _scan(self, text: str) -> str:
        """Adds `text` to the held text and returns what is safe to release, stopping at the first stop string."""
        config = self._config
        if not config.strings:
            return text
        text = self._held + text
        start, matched = -1, ""
        for stop in config.strings:
            found = text.find(stop)
            if found != -1 and (start == -1 or found < start):
                start, matched = found, stop
        if start != -1:
            self.stopped = True
            self.matched_stop = matched
            self._held = ""
            return text[: start + len(matched)] if config.no_stop_trim else text[:start]
        keep = config.holdable(text)
        if keep:
            self._held = text[-keep:]
            return text[:-keep]
        self._held = ""
        return text
