"""A loaded tokenizer: the HF `tokenizers` object plus what generation needs around it.

Interface shared by the registry, the gRPC data plane and the tests:

* `LoadedTokenizer.encode(text)` encodes without added special tokens (a chat template already placed them);
* `LoadedTokenizer.decode(ids, skip_special_tokens)`;
* `LoadedTokenizer.render_chat(messages, ...)` renders the chat template (ChatTemplateError when there is none);
* `eos_token_ids` come from `config.json` / `generation_config.json`, as the engines use them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing

from shepherd.tokenizer.chat_template import ChatTemplate, ChatTemplateError
from shepherd.tokenizer.encode import SegmentEncoder

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
MAX_ZIP_UNCOMPRESSED_BYTES = 512 * 1024 * 1024
OFF_LOOP_BYTES = 64 * 1024  # request bodies larger than this are tokenized in a worker thread (~1 ms per 1k tokens)


class TokenizerLoadError(Exception):
    """A tokenizer could not be loaded from a source; the message says which source and why."""


@dataclass(slots=True)
class LoadedTokenizer:
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... for the template
    eos_token_ids: tuple[int, ...] = ()
    special_ids: frozenset[int] = frozenset()  # ids of the special (added) tokens
    source: str = ""
    encoder: SegmentEncoder = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.encoder = SegmentEncoder(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.encoder.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def single_token_id(self, text: str) -> int | None:
        """The id `text` encodes to when it is exactly one token, else None (stop strings the engine can see)."""
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 else None

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The chat template rendered with this tokenizer's special tokens (encode the result with `encode`)."""
        if self.chat_template is None:
            raise ChatTemplateError(f"tokenizer {self.source or '<unnamed>'} has no chat template")
        return self.chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=self.special_tokens,
            template_kwargs=template_kwargs,
        )


def load_tokenizer(source: str | os.PathLike[str], chat_template_path: str | None = None) -> LoadedTokenizer:
    """Load a local tokenizer: a directory (`tokenizer.json`, else `vocab.json`+`merges.txt`) or a `.json` file.

    The configs beside it give the special-token strings, BOS/EOS post-processing, the EOS ids and the chat
    template (`chat_template_path` first, then `chat_template.json`, `*.jinja`, then `tokenizer_config.json`).
    """
    path = Path(source)
    if path.is_dir():
        directory = path
    elif path.is_file() and path.suffix == ".json":
        directory = path.parent
    elif path.exists():
        raise TokenizerLoadError(f"{path}: unsupported tokenizer file (expected a directory or a tokenizer .json)")
    else:
        raise TokenizerLoadError(f"{path}: no such file or directory")

    special_tokens = _special_tokens(_json_object(directory / "special_tokens_map.json"))
    config = _json_object(directory / "tokenizer_config.json")
    special_tokens.update(_special_tokens(config))
    tokenizer = _build_tokenizer(path, config, special_tokens)
    _set_bos_eos_post_processor(tokenizer, config, special_tokens, directory)

    template_text, template_origin = _find_chat_template(directory, config, chat_template_path)
    chat_template = None
    if template_text is not None:
        try:
            chat_template = ChatTemplate(template_text)
        except ChatTemplateError as exc:
            raise TokenizerLoadError(f"{template_origin}: {exc}") from exc

    special_ids = frozenset(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)
    return LoadedTokenizer(
        tokenizer=tokenizer,
        chat_template=chat_template,
        special_tokens=special_tokens,
        eos_token_ids=_eos_token_ids(directory, tokenizer, special_tokens),
        special_ids=special_ids,
        source=str(source),
    )


def load_tokenizer_zip(
    data: bytes, sha256: str, workdir: str | None = None, chat_template_path: str | None = None
) -> LoadedTokenizer:
    """Load a zipped tokenizer directory (a worker's `GetTokenizer` answer) after checking its SHA-256.

    The archive is extracted into `workdir`, which the caller owns and which keeps the files, or without one into
    a temporary directory removed once loaded. A single top-level folder in the archive is the tokenizer directory.
    """
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256.strip().lower():
        raise TokenizerLoadError(f"tokenizer zip: SHA-256 mismatch (expected {sha256}, got {digest})")
    if workdir is not None:
        return _load_extracted(data, Path(workdir), digest, chat_template_path)
    with tempfile.TemporaryDirectory(prefix="shepherd-tokenizer-") as tmp:
        return _load_extracted(data, Path(tmp), digest, chat_template_path)


def _load_extracted(data: bytes, root: Path, digest: str, chat_template_path: str | None) -> LoadedTokenizer:
    _extract_zip(data, root)
    entries = list(root.iterdir())
    directory = entries[0] if len(entries) == 1 and entries[0].is_dir() else root
    loaded = load_tokenizer(directory, chat_template_path)
    loaded.source = f"zip:sha256:{digest}"
    return loaded


def _extract_zip(data: bytes, root: Path) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            # zipfile never yields more than an entry's declared size, so the declared sizes bound the output.
            if sum(info.file_size for info in infos) > MAX_ZIP_UNCOMPRESSED_BYTES:
                raise TokenizerLoadError(f"tokenizer zip: more than {MAX_ZIP_UNCOMPRESSED_BYTES} bytes uncompressed")
            targets = []
            for info in infos:  # every entry is checked before anything is written
                parts = PurePosixPath(info.filename.replace("\\", "/")).parts
                if not parts or parts[0] == "/" or ".." in parts or ":" in parts[0]:
                    raise TokenizerLoadError(f"tokenizer zip: unsafe entry {info.filename!r}")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise TokenizerLoadError(f"tokenizer zip: symlink entry {info.filename!r}")
                targets.append((info, root.joinpath(*parts)))
            for info, target in targets:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(info))
    except TokenizerLoadError:
        raise
    except Exception as exc:  # BadZipFile, CRC errors, zlib errors, encrypted entries, disk errors
        raise TokenizerLoadError(f"tokenizer zip: {type(exc).__name__}: {exc}") from exc


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"{path}: {exc}") from exc


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, {} when the file does not exist."""
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as configs write it: a string or an AddedToken dict `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    tokens = {key: _token_content(config.get(key)) for key in _SPECIAL_TOKEN_KEYS}
    return {key: token for key, token in tokens.items() if token is not None}


def _build_tokenizer(path: Path, config: Mapping[str, Any], special_tokens: Mapping[str, str]) -> Tokenizer:
    tokenizer_json = path if path.is_file() else path / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            return Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises a bare Exception for bad files
            raise TokenizerLoadError(f"{tokenizer_json}: {exc}") from exc
    vocab, merges = path / "vocab.json", path / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise TokenizerLoadError(f"{path}: no tokenizer.json and no vocab.json+merges.txt")
    try:
        tokenizer = Tokenizer(BPE.from_file(str(vocab), str(merges)))
    except Exception as exc:
        raise TokenizerLoadError(f"{path}: vocab.json+merges.txt: {exc}") from exc
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    tokenizer.decoder = decoders.ByteLevel()
    # A slow GPT-2 style tokenizer keeps its added tokens in tokenizer_config.json (by id).
    added = config.get("added_tokens_decoder")
    for _, entry in sorted(added.items() if isinstance(added, dict) else (), key=lambda item: int(item[0])):
        content = _token_content(entry)
        if isinstance(entry, dict) and content is not None:
            if entry.get("special"):
                tokenizer.add_special_tokens([AddedToken(content, special=True, normalized=False)])
            else:
                tokenizer.add_tokens([AddedToken(content, normalized=False)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens.values()])
    return tokenizer


def _set_bos_eos_post_processor(
    tokenizer: Tokenizer, config: Mapping[str, Any], special_tokens: Mapping[str, str], directory: Path
) -> None:
    """`add_bos_token`/`add_eos_token` rebuild the post-processor as transformers does (Llama-style tokenizers).

    Only `tokenizer.encode(..., add_special_tokens=True)` sees it: `LoadedTokenizer.encode` never adds tokens.
    """
    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    marks: dict[str, tuple[str, int] | None] = {}
    for key in ("bos_token", "eos_token"):
        marks[key] = None
        if config.get(f"add_{key}"):
            token = special_tokens.get(key)
            token_id = tokenizer.token_to_id(token) if token is not None else None
            if token is None or token_id is None:
                raise TokenizerLoadError(f"{directory}: add_{key} is set but {key} {token!r} is not in the vocabulary")
            marks[key] = (token, token_id)
    bos, eos = marks["bos_token"], marks["eos_token"]

    def segment(sequence: str, type_id: int) -> str:
        parts = [f"{bos[0]}:{type_id}"] if bos else []
        parts.append(f"{sequence}:{type_id}")
        return " ".join(parts + ([f"{eos[0]}:{type_id}"] if eos else []))

    tokenizer.post_processor = TemplateProcessing(
        single=segment("$A", 0),
        pair=f"{segment('$A', 0)} {segment('$B', 1)}",
        special_tokens=[mark for mark in (bos, eos) if mark],
    )


def _template_text(value: Any) -> str | None:
    """A `chat_template` value: a string, or a list of named templates of which "default" is used."""
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def _read_template_file(path: Path) -> str | None:
    if path.suffix == ".json":
        data = _read_json(path)
        return _template_text(data.get("chat_template")) if isinstance(data, dict) else None
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenizerLoadError(f"{path}: {exc}") from exc


def _find_chat_template(
    directory: Path, config: Mapping[str, Any], explicit: str | None
) -> tuple[str | None, Path | None]:
    """(template text, where it came from) in SMG's priority order."""
    if explicit:
        return _read_template_file(Path(explicit)), Path(explicit)
    candidates = [directory / "chat_template.json", directory / "chat_template.jinja"]
    candidates += sorted(directory.glob("*.jinja"))
    for candidate in candidates:
        if candidate.is_file():
            return _read_template_file(candidate), candidate
    return _template_text(config.get("chat_template")), directory / "tokenizer_config.json"


def _eos_token_ids(directory: Path, tokenizer: Tokenizer, special_tokens: Mapping[str, str]) -> tuple[int, ...]:
    """`eos_token_id` (int or list) of config.json and generation_config.json, merged; else the eos_token's id."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        value = _json_object(directory / name).get("eos_token_id")
        for token_id in value if isinstance(value, list) else [value]:
            if isinstance(token_id, int) and not isinstance(token_id, bool) and token_id not in ids:
                ids.append(token_id)
    if not ids and "eos_token" in special_tokens:
        token_id = tokenizer.token_to_id(special_tokens["eos_token"])
        if token_id is not None:
            ids.append(token_id)
    return tuple(ids)
