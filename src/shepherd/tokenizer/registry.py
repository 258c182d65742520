"""The tokenizer registry: named tokenizers the gRPC data plane encodes and decodes with (seed 002).

Entries are found by name first, then by id; names are unique. Each load is a background job tried up to three
times, from these sources in order:

1. a local directory or file;
2. the Hugging Face hub, for a source that looks like a model id (`org/name`); without network this fails in
   milliseconds and the job says so;
3. `GetTokenizer` from a healthy gRPC worker serving the model of that name (a zip, SHA-256 verified).

Requests find the tokenizer by their model id, so the entry loaded for a gRPC worker is named after its model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from shepherd.tokenizer.loader import LoadedTokenizer, TokenizerLoadError, load_tokenizer, load_tokenizer_zip

log = logging.getLogger(__name__)

ATTEMPTS = 3
BACKOFF_SECS = 2.0
JOBS_KEPT = 256  # finished jobs stay queryable until this many newer ones exist
HUB_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=3)
HUB_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
)

# model name -> (zip bytes, sha256) from a healthy gRPC worker of that model; raises LookupError when there is none
RemoteFetch = Callable[[str], Awaitable[tuple[bytes, str]]]


@dataclass(slots=True)
class TokenizerEntry:
    id: str
    name: str
    source: str
    tokenizer: LoadedTokenizer

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "source": self.source, "vocab_size": self.tokenizer.vocab_size}


@dataclass(slots=True)
class TokenizerJob:
    id: str
    name: str
    source: str
    chat_template_path: str | None = None
    status: str = "pending"  # pending -> running -> completed | failed
    message: str = ""
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "message": self.message}


class TokenizerExists(Exception):
    def __init__(self, name: str, existing_id: str) -> None:
        super().__init__(f"Tokenizer '{name}' already exists")
        self.existing_id = existing_id


class TokenizerRegistry:
    def __init__(
        self,
        fetch_remote: RemoteFetch | None = None,
        on_change: Callable[[], None] | None = None,
        hub_endpoint: str | None = None,
    ) -> None:
        self._fetch_remote = fetch_remote
        self._on_change = on_change
        self._hub = (hub_endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        self._by_name: dict[str, TokenizerEntry] = {}
        self._by_id: dict[str, TokenizerEntry] = {}
        self._jobs: OrderedDict[str, TokenizerJob] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self._scratch = tempfile.TemporaryDirectory(prefix="shepherd-tokenizers-")

    # --- reads ---------------------------------------------------------------------------------------------
    def get(self, key: str) -> TokenizerEntry | None:
        return self._by_name.get(key) or self._by_id.get(key)

    def entries(self) -> list[TokenizerEntry]:
        return sorted(self._by_name.values(), key=lambda e: e.name)

    def names(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def for_model(self, model: str | None) -> TokenizerEntry | None:
        """The tokenizer a request for `model` uses; no model (or "unknown") takes the first one, as SMG does."""
        if model and model != "unknown":
            return self.get(model)
        entries = self.entries()
        return entries[0] if entries else None

    def job(self, key: str) -> TokenizerJob | None:
        job = self._jobs.get(key)
        if job is not None:
            return job
        return next((j for j in reversed(self._jobs.values()) if j.name == key), None)

    def pending(self, name: str) -> bool:
        return any(j.name == name and j.status in ("pending", "running") for j in self._jobs.values())

    # --- writes --------------------------------------------------------------------------------------------
    def submit(self, name: str, source: str, chat_template_path: str | None = None) -> TokenizerJob:
        """Queue a load; raises TokenizerExists when the name is loaded or being loaded."""
        existing = self._by_name.get(name)
        if existing is not None:
            raise TokenizerExists(name, existing.id)
        for job in self._jobs.values():
            if job.name == name and job.status in ("pending", "running"):
                raise TokenizerExists(name, job.id)
        job = TokenizerJob(str(uuid.uuid4()), name, source, chat_template_path)
        job.message = f"Tokenizer '{name}' registration job submitted. Loading from: {source}"
        self._jobs[job.id] = job
        self._trim_jobs()
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def remove(self, key: str) -> TokenizerEntry | None:
        entry = self.get(key)
        if entry is None:
            return None
        del self._by_name[entry.name]
        del self._by_id[entry.id]
        self._jobs.pop(entry.id, None)  # its finished job would still say "loaded and ready"
        self._changed()
        return entry

    async def wait_idle(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._scratch.cleanup()

    # --- loading -------------------------------------------------------------------------------------------
    async def _run(self, job: TokenizerJob) -> None:
        job.status = "running"
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(BACKOFF_SECS)
            try:
                tokenizer = await self._load(job)
            except TokenizerLoadError as exc:
                job.message = str(exc)
                continue
            except Exception as exc:  # a file no loader expected (bad encoding, odd JSON): the job fails, not hangs
                job.message = f"Failed to load tokenizer '{job.name}': {type(exc).__name__}: {exc}"
                continue
            if job.name in self._by_name:  # loaded meanwhile under the same name by another job
                job.status, job.message = "failed", f"Tokenizer '{job.name}' already exists"
                return
            entry = TokenizerEntry(job.id, job.name, job.source, tokenizer)
            self._by_name[job.name] = self._by_id[job.id] = entry
            job.status, job.message = "completed", f"Tokenizer '{job.name}' is loaded and ready"
            log.info("tokenizer %s loaded from %s (vocab %d)", job.name, tokenizer.source, tokenizer.vocab_size)
            self._changed()
            return
        job.status = "failed"
        log.error("tokenizer %s could not be loaded: %s", job.name, job.message)

    async def _load(self, job: TokenizerJob) -> LoadedTokenizer:
        source, template = job.source, job.chat_template_path
        if Path(source).exists():
            return await asyncio.to_thread(load_tokenizer, source, template)
        reasons = [f"'{source}' is not a local path"]
        if _looks_like_hub_id(source):
            try:
                directory = await self._download(source)
                return await asyncio.to_thread(load_tokenizer, str(directory), template)
            except (TokenizerLoadError, OSError, aiohttp.ClientError) as exc:
                reasons.append(f"the hub ({self._hub}) failed: {exc or type(exc).__name__}")
        if self._fetch_remote is None:
            raise TokenizerLoadError(f"Failed to load tokenizer '{job.name}': {'; '.join(reasons)}")
        try:
            data, digest = await self._fetch_remote(job.name)
        except (LookupError, OSError) as exc:
            reasons.append(f"remotely from a worker: {exc}")
            raise TokenizerLoadError(f"Failed to load tokenizer '{job.name}': {'; '.join(reasons)}") from None
        return await asyncio.to_thread(load_tokenizer_zip, data, digest, None, template)  # extracted, loaded, deleted

    async def _download(self, repo: str) -> Path:
        """Tokenizer files of a hub model into the scratch directory; fails fast when the hub is unreachable."""
        directory = Path(self._scratch.name) / "hub" / repo.replace("/", "--")
        directory.mkdir(parents=True, exist_ok=True)
        token = os.environ.get("HF_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession(timeout=HUB_TIMEOUT, headers=headers) as session:
            for name in HUB_FILES:
                async with session.get(f"{self._hub}/{repo}/resolve/main/{name}") as resp:
                    if resp.status == 404 and name != "tokenizer.json":
                        continue
                    if resp.status >= 400:
                        raise TokenizerLoadError(f"{name}: HTTP {resp.status}")
                    (directory / name).write_bytes(await resp.read())
        return directory

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _trim_jobs(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.status in ("completed", "failed")]
        for key in finished[: max(0, len(self._jobs) - JOBS_KEPT)]:
            del self._jobs[key]


def _looks_like_hub_id(source: str) -> bool:
    """`org/name`, as hub model ids are; anything else cannot be on the hub."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~"))
