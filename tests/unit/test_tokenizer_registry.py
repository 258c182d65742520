"""TokenizerRegistry: sources in order (local, hub, a worker's bundle), names unique, jobs that say why they failed."""

from __future__ import annotations

import hashlib
import io
import zipfile

import pytest

from shepherd.tokenizer import registry as registry_module
from shepherd.tokenizer.registry import TokenizerExists, TokenizerRegistry
from tests.support.tiny_tokenizer import write_tiny_tokenizer_dir


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(registry_module, "BACKOFF_SECS", 0.0)


def bundle(directory) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in directory.iterdir():
            archive.write(path, path.name)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


async def test_a_local_directory_loads_under_its_name(tmp_path):
    changes = []
    tokenizers = TokenizerRegistry(on_change=lambda: changes.append(1))
    directory = write_tiny_tokenizer_dir(tmp_path / "tiny")
    job = tokenizers.submit("tiny", str(directory))
    with pytest.raises(TokenizerExists) as pending:
        tokenizers.submit("tiny", str(directory))
    assert pending.value.existing_id == job.id
    await tokenizers.wait_idle()
    assert job.status == "completed" and changes == [1]
    entry = tokenizers.get("tiny")
    assert entry is not None and tokenizers.get(job.id) is entry and entry.tokenizer.vocab_size == 400
    assert tokenizers.for_model(None) is entry and tokenizers.for_model("unknown") is entry
    with pytest.raises(TokenizerExists):
        tokenizers.submit("tiny", str(directory))
    assert tokenizers.remove(job.id) is entry and tokenizers.get("tiny") is None and changes == [1, 1]
    await tokenizers.close()


async def test_a_name_that_is_no_path_comes_from_a_worker_of_that_model(tmp_path):
    asked = []

    async def fetch(model: str) -> tuple[bytes, str]:
        asked.append(model)
        return bundle(write_tiny_tokenizer_dir(tmp_path / "remote"))

    tokenizers = TokenizerRegistry(fetch_remote=fetch)
    job = tokenizers.submit("served-model", "served-model")
    await tokenizers.wait_idle()
    assert job.status == "completed" and asked == ["served-model"]
    assert tokenizers.get("served-model").tokenizer.encode("<|im_end|>") == [2]
    await tokenizers.close()


async def test_a_failed_load_is_retried_then_reports_every_source(tmp_path):
    attempts = []

    async def fetch(model: str) -> tuple[bytes, str]:
        attempts.append(model)
        raise LookupError(f"No healthy gRPC worker available for model '{model}'")

    tokenizers = TokenizerRegistry(fetch_remote=fetch)
    job = tokenizers.submit("ghost", str(tmp_path / "missing"))
    await tokenizers.wait_idle()
    assert job.status == "failed" and len(attempts) == registry_module.ATTEMPTS
    assert "is not a local path" in job.message and "No healthy gRPC worker" in job.message
    assert tokenizers.job("ghost") is job
    tokenizers.submit("ghost", str(write_tiny_tokenizer_dir(tmp_path / "found")))  # a failed name can be retried
    await tokenizers.wait_idle()
    assert tokenizers.get("ghost") is not None
    await tokenizers.close()


async def test_a_corrupt_bundle_fails_the_job(tmp_path):
    async def fetch(model: str) -> tuple[bytes, str]:
        data, _ = bundle(write_tiny_tokenizer_dir(tmp_path / "remote"))
        return data, "0" * 64

    tokenizers = TokenizerRegistry(fetch_remote=fetch)
    job = tokenizers.submit("m", "m")
    await tokenizers.wait_idle()
    assert job.status == "failed" and "SHA-256" in job.message
    await tokenizers.close()


async def test_an_unexpected_loader_error_fails_the_job_instead_of_leaving_it_running(tmp_path):
    tokenizers = TokenizerRegistry()
    directory = write_tiny_tokenizer_dir(tmp_path / "tiny")
    job = tokenizers.submit("odd", str(directory), chat_template_path="a\0b")  # open() raises ValueError
    await tokenizers.wait_idle()
    assert job.status == "failed" and "ValueError" in job.message
    assert not tokenizers.pending("odd")  # the name can be loaded again
    await tokenizers.close()
