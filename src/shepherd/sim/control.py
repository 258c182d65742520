"""Test-control routes: ``/__ctl`` (fault injection) and ``/__log`` (inspection).

``POST /__ctl`` takes a JSON object with any subset of::

    {"worker": i,                  # target worker index in this process (default: this one)
     "reset": true,                # clear all faults first (also reopens a refused listener)
     "health_status": 503,         # /health and /health_generate answer with this status
     "error_status": 500, "error_rate": 0.5, "error_body": {...},   # inference routes fail
     "latency_ms": 200,            # inference requests are delayed
     "hang": true,                 # inference requests wait until hang is cleared
     "disconnect_after_chunks": 3, # streams are cut after N frames, plain responses at once
     "refuse": true,               # close the listener and drop open connections (gRPC: the gRPC port)
     "stream_as_json": true,       # /generate answers a streamed request with one JSON body (a prefill may)
     "output_text": "Hi 🙂",       # gRPC workers: every output is the BPE encoding of this text
     "crash": true}                # answer, then exit the whole process with status 1

and answers with the target's fault state (``null`` clears a field).  ``GET /__ctl`` returns it.

``GET /__log[?worker=i]`` answers ``{"worker", "url", "counts": {path: n}, "requests": [{"method",
"path", "headers", "body", "ts", "status", "disconnected"}, ...] (last 200, oldest first),
"prompt_tokens", "cached_tokens", "completion_tokens", "num_requests" (since the last clear),
"running", "queued", "disconnects", "rank_requests": [n per DP rank], "published_rooms", "verified_rooms",
"unverified_rooms", "orphan_rooms" (PD bootstrap handshake, see ``shepherd.sim.bootstrap``)}``;
``DELETE /__log[?worker=i]`` clears it.  Requests to
``/__ctl`` and ``/__log`` themselves are not recorded.  A ``--grpc`` worker records its gRPC calls
the same way: ``path`` is the full method name (``/sglang.grpc.scheduler.SglangScheduler/Generate``),
``body`` the request message as a dict (proto field names), ``status`` the gRPC code name,
``disconnected`` true when the client cancelled, and ``Generate`` entries add ``choices``
(``shepherd.sim.request_log.GrpcLogEntry``).

Every worker can control and inspect its siblings, so a worker whose listener was closed with
``refuse`` can be restored through another one.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Protocol

from aiohttp import web

from shepherd.sim.bootstrap import PD_COUNTS
from shepherd.sim.faults import FaultError
from shepherd.sim.wire import RequestError, json_response, read_json_object
from shepherd.sim.worker import SimWorker

_CTL_FIELDS = frozenset(
    {
        "worker", "reset", "crash", "health_status", "error_status", "error_rate", "error_body",
        "latency_ms", "hang", "disconnect_after_chunks", "refuse", "output_text", "stream_as_json",
    }
)  # fmt: skip


class Fleet(Protocol):
    """What the control routes need from the process that hosts the workers."""

    workers: list[SimWorker]

    async def set_refusing(self, index: int, refusing: bool, spare: web.BaseRequest | None = None) -> None: ...


class ControlApi:
    def __init__(self, worker: SimWorker, fleet: Fleet) -> None:
        self.worker = worker
        self.fleet = fleet

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/__ctl", self.ctl),
            web.get("/__ctl", self.ctl),
            web.get("/__log", self.get_log),
            web.delete("/__log", self.clear_log),
        ]

    def _target(self, index: Any) -> SimWorker:
        if index is None:
            return self.worker
        try:
            return self.fleet.workers[int(index)]
        except (ValueError, IndexError):
            raise RequestError(f"no worker {index!r} in this process") from None

    async def ctl(self, request: web.Request) -> web.StreamResponse:
        """Apply faults (``reset`` first, then the given fields) and return the fault state."""
        body = await read_json_object(request) if request.method == "POST" else {}
        unknown = set(body) - _CTL_FIELDS
        if unknown:
            raise RequestError(f"unknown /__ctl fields: {sorted(unknown)}")
        target = self._target(body.get("worker"))
        if body.get("crash"):
            response = json_response({"crashing": True, "pid": os.getpid()})
            await response.prepare(request)
            await response.write_eof()
            asyncio.get_running_loop().call_soon(os._exit, 1)
            return response
        faults = target.faults
        was_refusing = faults.refuse
        if body.get("reset"):
            faults.reset()
        try:
            faults.apply(body)
        except FaultError as exc:
            raise RequestError(str(exc)) from None
        if faults.refuse != was_refusing:
            await self.fleet.set_refusing(target.index, faults.refuse, spare=request)
        return json_response({"worker": target.index, "url": target.url, **faults.to_dict()})

    async def get_log(self, request: web.Request) -> web.Response:
        target = self._target(request.query.get("worker"))
        log = target.log
        live = target.live_state()
        return json_response(
            {
                "worker": target.index,
                "url": target.url,
                "counts": dict(log.counts),
                "requests": [entry.to_dict() for entry in log.entries],
                **log.since_clear(target.counters()),
                "running": live.running,
                "queued": live.queued,
                "disconnects": log.disconnects,
                "rank_requests": [log.rank_requests[rank] for rank in range(target.config.dp_size)],
                **{name: log.pd_counts[name] for name in PD_COUNTS},
            }
        )

    async def clear_log(self, request: web.Request) -> web.Response:
        target = self._target(request.query.get("worker"))
        target.log.clear(target.counters())
        return json_response({"worker": target.index, "cleared": True})
