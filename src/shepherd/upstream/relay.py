"""Relaying a worker's SSE stream to the client as it arrives, shared by the regular and PD routers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

_DONE = b"[DONE]"


@dataclass(slots=True)
class RelayOutcome:
    first_chunk_at: float  # perf_counter() when the first chunk arrived, 0.0 if none did
    events: int  # SSE `data:` events relayed, a final `data: [DONE]` excluded (one per decode step in SGLang)
    broken: bool  # the worker's side failed before the stream ended
    client_gone: bool = False  # the client's side closed first: nobody's fault on the worker's side


async def relay_sse(
    upstream: aiohttp.ClientResponse,
    out: web.StreamResponse,
    interrupted_frame: bytes,
    rewrite_line: Callable[[bytes], bytes] | None = None,
) -> RelayOutcome:
    """Copy `upstream`'s body to the prepared `out` chunk by chunk (line by line with `rewrite_line`), then end it.

    A worker that breaks the stream midway gets `interrupted_frame` written in place of the rest (and no
    `[DONE]`), so the client can tell a cut stream from a finished one. A client that goes away ends the relay
    (`client_gone`); leaving the caller's `async with` then closes the upstream connection.
    """
    first_chunk_at = 0.0
    events = 0
    chunk = b""
    broken = False
    chunks = aiter(upstream.content.iter_any() if rewrite_line is None else upstream.content)
    try:
        while True:
            # Reading from the worker is guarded separately: a failed write is the client's doing and must not
            # be blamed on the worker (aiohttp reports both as ClientError subclasses).
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except (aiohttp.ClientError, TimeoutError):
                broken = True
                await out.write(interrupted_frame)
                break
            if not first_chunk_at:
                first_chunk_at = time.perf_counter()
            if rewrite_line is not None:
                chunk = rewrite_line(chunk)
            events += chunk.count(b"data:")
            await out.write(chunk)
        await out.write_eof()
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError for a closed client is one too
        return RelayOutcome(first_chunk_at, events, broken, client_gone=True)
    if not broken and _DONE in chunk[-16:]:
        events -= 1
    return RelayOutcome(first_chunk_at, events, broken)
