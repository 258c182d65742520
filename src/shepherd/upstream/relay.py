"""Relaying a worker's SSE stream to the client as it arrives, shared by the regular and PD routers.

One client write per upstream read (not per SSE event): a read usually holds several events, and each write is a
syscall. The client's socket sets the pace: `out.write` waits while it is full, so the worker is not read then
(its connection's buffer fills and the pool stops reading it), which bounds memory per stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shepherd.upstream.pool import UpstreamError, UpstreamResponse

_DONE = b"[DONE]"
_CACHED = b'"cached_tokens":'


def reported_cached_tokens(data: bytes) -> int | None:
    """The `cached_tokens` a worker reported in a JSON body or SSE data (SGLang's `meta_info.cached_tokens`, the
    OpenAI `usage.prompt_tokens_details.cached_tokens`): the last one in `data`, None when there is none."""
    at = data.rfind(_CACHED)
    if at < 0:
        return None
    start = at + len(_CACHED)
    while data[start : start + 1] == b" ":
        start += 1
    end = start
    while data[end : end + 1].isdigit():
        end += 1
    return int(data[start:end]) if end > start else None


class StreamOut(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def write_eof(self, data: bytes = b"") -> None: ...


@dataclass(slots=True)
class RelayOutcome:
    first_chunk_at: float  # perf_counter() when the first chunk arrived, 0.0 if none did
    events: int  # SSE `data:` events relayed, a final `data: [DONE]` excluded (one per decode step in SGLang)
    broken: bool  # the worker's side failed (or ran past the attempt's deadline) before the stream ended
    client_gone: bool = False  # the client's side closed first: nobody's fault on the worker's side
    cached_tokens: int | None = None  # what the worker reported it had cached of the prompt, if it did


async def relay_sse(
    upstream: UpstreamResponse,
    out: StreamOut,
    interrupted_frame: bytes,
    deadline: float,
    rewrite_line: Callable[[bytes], bytes] | None = None,
    read_cached_tokens: bool = False,
    on_first_chunk: Callable[[], object] | None = None,
) -> RelayOutcome:
    """Copy `upstream`'s body to the prepared `out` as it arrives (line by line with `rewrite_line`), then end it.

    A worker that breaks the stream midway, goes quiet for longer than the stream idle timeout, or runs past
    `deadline` (time.monotonic) gets `interrupted_frame` written in place of the rest (and no `[DONE]`), so the
    client can tell a cut stream from a finished one; its connection is closed, not pooled. A client that goes
    away ends the relay (`client_gone`) and closes the worker's connection too. With `read_cached_tokens` the
    outcome carries the `cached_tokens` the worker reported. `on_first_chunk` is called when the worker's first
    body bytes arrive: an engine streams its first chunk once the prompt's prefill is over.
    """
    first_chunk_at = 0.0
    events = 0
    chunk = last = b""
    broken = False
    pending = b""  # an incomplete line, with `rewrite_line`
    cached: int | None = None
    try:
        while True:
            # Reading from the worker is guarded separately: a failed write is the client's doing.
            try:
                chunk = await upstream.next_data()
            except (UpstreamError, TimeoutError):
                broken = True
                upstream.abort()
                await out.write_eof(interrupted_frame)
                break
            if not chunk:
                await out.write_eof(rewrite_line(pending) if pending and rewrite_line is not None else pending)
                break
            if not first_chunk_at:
                first_chunk_at = time.perf_counter()
                if on_first_chunk is not None:
                    on_first_chunk()
            if rewrite_line is not None:
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                chunk = b"".join(rewrite_line(line + b"\n") for line in lines)
            events += chunk.count(b"data:")
            if read_cached_tokens and _CACHED in chunk:
                cached = reported_cached_tokens(chunk)
            last = chunk
            if upstream.finished and not pending:  # the last piece: it and the end of the response in one write
                await out.write_eof(chunk)
                break
            await out.write(chunk)
            if time.monotonic() > deadline:
                broken = True
                upstream.abort()
                await out.write_eof(interrupted_frame)
                break
    except ConnectionResetError:
        upstream.abort()
        return RelayOutcome(first_chunk_at, events, broken, client_gone=True, cached_tokens=cached)
    except BaseException:  # cancelled with the client's connection: the worker's must not outlive it
        upstream.abort()
        raise
    if not broken:
        upstream.release()
        if _DONE in last[-16:]:
            events -= 1
    return RelayOutcome(first_chunk_at, events, broken, cached_tokens=cached)
