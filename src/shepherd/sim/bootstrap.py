"""PD bootstrap handshake: how a simulated decode worker knows that a prefill worker really served its request.

In SGLang's prefill-decode disaggregation the gateway puts `bootstrap_host`, `bootstrap_port` and `bootstrap_room`
into the request; the decode worker fetches the request's KV cache from the prefill worker at that host and
bootstrap port, keyed by the room. The simulator keeps the handshake and leaves out the KV transfer:

* `--role prefill`: every room the worker finished is published on its own bootstrap listener (a second HTTP
  port, `--bootstrap-port`);
* `--role decode`: before decoding, the worker asks the bootstrap listener named in the request for each room
  and fails the request when a room is not published within `--bootstrap-timeout-secs`. Such a room is an
  orphan: the gateway sent a decode without its prefill, or named the wrong prefill. With a null bootstrap port
  nothing can be checked; the room counts as unverified and the decode proceeds.

Batch requests carry one host, port and room per item, as lists. Wire of the bootstrap listener:
`POST /rooms/wait {"rooms": [int, ...], "timeout_ms": N}` answers `{"missing": [...]}` as soon as every room is
published, or after the timeout with the rooms still missing.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable
from typing import Any

import aiohttp
from aiohttp import web

from shepherd.sim.request_log import RequestLog
from shepherd.sim.wire import RequestError, json_response, read_json_object

MAX_PUBLISHED_ROOMS = 100_000  # oldest rooms are forgotten beyond this (a few MB)
PD_COUNTS = ("published_rooms", "verified_rooms", "unverified_rooms", "orphan_rooms")  # reported by GET /__log
_RECONNECT_DELAY_S = 0.05  # a decode retries an unreachable bootstrap listener this often until its deadline

Target = tuple[str | None, int | None]  # (bootstrap_host, bootstrap_port) of one item


class RoomBoard:
    """The rooms a prefill worker has published, and the decode requests waiting for some of them."""

    def __init__(self, capacity: int = MAX_PUBLISHED_ROOMS) -> None:
        self._capacity = capacity
        self._rooms: dict[int, None] = {}  # insertion-ordered set, oldest first
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}

    def publish(self, room: int) -> None:
        if room in self._rooms:
            return
        self._rooms[room] = None
        if len(self._rooms) > self._capacity:
            del self._rooms[next(iter(self._rooms))]
        for waiter in self._waiters.pop(room, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def missing(self, rooms: list[int], timeout: float) -> list[int]:
        """The rooms still unpublished once all of them are published or `timeout` seconds passed."""
        pending = [room for room in rooms if room not in self._rooms]
        if not pending or timeout <= 0:
            return pending
        loop = asyncio.get_running_loop()
        waiters = [loop.create_future() for _ in pending]
        for room, waiter in zip(pending, waiters, strict=True):
            self._waiters.setdefault(room, []).append(waiter)
        try:
            await asyncio.wait(waiters, timeout=timeout)
        finally:
            for room, waiter in zip(pending, waiters, strict=True):
                if not waiter.done():
                    waiter.cancel()
                    self._forget(room, waiter)
        return [room for room in pending if room not in self._rooms]

    def _forget(self, room: int, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(room)
        if waiters is not None:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[room]


class Handshake:
    """One worker's part in the handshake, by role; `before` runs ahead of generation, `after` once it finished."""

    def __init__(self, role: str, timeout_secs: float, log: RequestLog) -> None:
        self.role = role
        self.timeout_secs = timeout_secs
        self.board = RoomBoard()
        self._log = log
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def serve(self, sock: socket.socket) -> int:
        """Serve the bootstrap listener (prefill role) on the bound `sock`; returns its port."""
        app = web.Application()
        app.router.add_post("/rooms/wait", self._wait_handler)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        return sock.getsockname()[1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def before(self, body: dict[str, Any], batch: int | None) -> list[int]:
        """Check the request's bootstrap fields (`batch`: items in a batch request, None for a single one).

        Returns the request's rooms. A decode worker returns only once every room is verified or unverifiable,
        and raises a 500 `RequestError` naming the orphan rooms otherwise.
        """
        if self.role == "regular":
            return []
        items = bootstrap_items(body, batch, required=self.role == "decode")
        if self.role == "prefill" or not items:
            return [room for _, room in items]
        await self._verify(items)
        return [room for _, room in items]

    def after(self, rooms: Iterable[int]) -> None:
        """The request finished: a prefill worker publishes its rooms (its KV cache is ready)."""
        if self.role != "prefill":
            return
        published = 0
        for room in rooms:
            self.board.publish(room)
            published += 1
        self._log.pd_counts["published_rooms"] += published

    async def _verify(self, items: list[tuple[Target, int]]) -> None:
        by_target: dict[Target, list[int]] = {}
        for target, room in items:
            by_target.setdefault(target, []).append(room)
        counts = self._log.pd_counts
        unverifiable = [t for t in by_target if t[0] is None or t[1] is None]
        for target in unverifiable:
            counts["unverified_rooms"] += len(by_target.pop(target))
        if not by_target:
            return
        deadline = time.monotonic() + self.timeout_secs
        results = await asyncio.gather(*(self._missing(t, rooms, deadline) for t, rooms in by_target.items()))
        failures = []
        for (target, rooms), (missing, error) in zip(by_target.items(), results, strict=True):
            counts["verified_rooms"] += len(rooms) - len(missing)
            counts["orphan_rooms"] += len(missing)
            if missing:
                reason = f" (last error: {error})" if error else ""
                failures.append(
                    f"room(s) {missing} not published by the prefill bootstrap server {target[0]}:{target[1]} "
                    f"within {self.timeout_secs:g}s{reason}"
                )
        if failures:
            raise RequestError("PD bootstrap failed: " + "; ".join(failures), 500, "server_error")

    async def _missing(self, target: Target, rooms: list[int], deadline: float) -> tuple[list[int], str | None]:
        """Ask the prefill's bootstrap listener for `rooms` until `deadline`; (missing rooms, last transport error)."""
        host, port = target
        url = f"http://{host}:{port}/rooms/wait"
        error = None
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                async with self.session.post(
                    url,
                    json={"rooms": rooms, "timeout_ms": int(remaining * 1000)},
                    timeout=aiohttp.ClientTimeout(total=remaining + 1.0),
                ) as resp:
                    answer = await resp.json(content_type=None)
                    if resp.status == 200 and isinstance(answer, dict) and isinstance(answer.get("missing"), list):
                        return answer["missing"], None
                    error = f"bootstrap listener answered {resp.status}"
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                error = str(exc) or type(exc).__name__
            await asyncio.sleep(min(_RECONNECT_DELAY_S, max(0.0, deadline - time.monotonic())))
        return rooms, error

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No connection cap: every waiting decode request holds one long poll open.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def _wait_handler(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        rooms, timeout_ms = body.get("rooms"), body.get("timeout_ms", 0)
        if not isinstance(rooms, list) or not all(_is_room(r) for r in rooms) or not isinstance(timeout_ms, int):
            raise RequestError("expected {'rooms': [non-negative int, ...], 'timeout_ms': int}")
        return json_response({"missing": await self.board.missing(rooms, timeout_ms / 1000)})


def bootstrap_items(body: dict[str, Any], batch: int | None, required: bool) -> list[tuple[Target, int]]:
    """The ((host, port), room) of every item of the request: one for a single request, `batch` for a batch.

    Raises a 400 `RequestError` when the fields do not have the request's shape, or are missing and `required`.
    """
    host, port, room = body.get("bootstrap_host"), body.get("bootstrap_port"), body.get("bootstrap_room")
    if room is None:
        if required:
            raise RequestError("a decode worker needs 'bootstrap_room' (requests must come paired with a prefill)")
        return []
    if batch is None:
        if not (_is_room(room) and _is_host(host) and _is_port(port)):
            raise RequestError(
                "'bootstrap_room' must be a non-negative integer with a string 'bootstrap_host' and an integer or "
                "null 'bootstrap_port' for a single request"
            )
        return [((host, port), room)]
    if not all(isinstance(v, list) and len(v) == batch for v in (host, port, room)):
        raise RequestError(f"'bootstrap_host', 'bootstrap_port' and 'bootstrap_room' must be lists of {batch} items")
    if not (all(map(_is_room, room)) and all(map(_is_host, host)) and all(map(_is_port, port))):
        raise RequestError("bootstrap lists hold non-negative integer rooms, string hosts and integer or null ports")
    return [((h, p), r) for h, p, r in zip(host, port, room, strict=True)]


def _is_room(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _is_host(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_port(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))
