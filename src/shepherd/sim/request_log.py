"""What a simulated worker received, for tests and benchmarks (``GET /__log``).

Recording must be cheap (it runs for every request), so an entry keeps references to the
request's headers and raw body (or request message) and only converts them when the log is rendered.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

import orjson
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from multidict import CIMultiDictProxy

MAX_ENTRIES = 200


class LogEntry:
    __slots__ = ("body", "disconnected", "headers", "method", "path", "status", "ts")

    def __init__(self, method: str, path: str, headers: CIMultiDictProxy[str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.ts = time.time()
        self.status: int | None = None
        self.disconnected = False

    def to_dict(self) -> dict[str, Any]:
        body: Any = None
        if self.body:
            try:
                body = orjson.loads(self.body)
            except orjson.JSONDecodeError:
                body = self.body.decode("utf-8", "replace")
        return {
            "method": self.method,
            "path": self.path,
            # Header names are lower-cased so lookups in tests do not depend on client casing.
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body,
            "ts": self.ts,
            "status": self.status,
            "disconnected": self.disconnected,
        }


class GrpcLogEntry:
    """One gRPC call: ``path`` is the full method name, ``body`` the request message (rendered with its proto
    field names), ``status`` the gRPC status code name (``"OK"``, ``"INTERNAL"``, ``"CANCELLED"``...),
    ``disconnected`` whether the client cancelled the call, and ``choices`` (``Generate``) what each choice
    produced: ``{"index", "output_ids", "finish_reason"}``."""

    __slots__ = ("body", "choices", "disconnected", "metadata", "path", "status", "ts")

    def __init__(self, path: str, metadata: Sequence[tuple[str, str | bytes]], body: Message) -> None:
        self.path = path
        self.metadata = metadata
        self.body = body
        self.ts = time.time()
        self.status: str | None = None
        self.disconnected = False
        self.choices: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        entry = {
            "method": "POST",
            "path": self.path,
            "headers": {k: v if isinstance(v, str) else v.hex() for k, v in self.metadata},
            "body": MessageToDict(self.body, preserving_proto_field_name=True),
            "ts": self.ts,
            "status": self.status,
            "disconnected": self.disconnected,
        }
        if self.choices is not None:
            entry["choices"] = self.choices
        return entry


class RequestLog:
    def __init__(self) -> None:
        self.entries: deque[LogEntry | GrpcLogEntry] = deque(maxlen=MAX_ENTRIES)
        self.counts: Counter[str] = Counter()
        self.disconnects = 0
        self.rank_requests: Counter[int] = Counter()  # inference requests per DP rank
        self.pd_counts: Counter[str] = Counter()  # PD bootstrap rooms: published, verified, unverified, orphan
        self._baseline: dict[str, int] = {}

    def record(self, method: str, path: str, headers: CIMultiDictProxy[str], body: bytes) -> LogEntry:
        entry = LogEntry(method, path, headers, body)
        self.entries.append(entry)
        self.counts[path] += 1
        return entry

    def record_grpc(self, path: str, metadata: Sequence[tuple[str, str | bytes]], request: Message) -> GrpcLogEntry:
        entry = GrpcLogEntry(path, metadata, request)
        self.entries.append(entry)
        self.counts[path] += 1
        return entry

    def mark_disconnected(self, entry: LogEntry | GrpcLogEntry) -> None:
        if not entry.disconnected:
            entry.disconnected = True
            self.disconnects += 1

    def clear(self, counters: dict[str, int]) -> None:
        """Forget all entries; ``counters`` (cumulative engine counters now) become the new zero
        for :meth:`since_clear`."""
        self.entries.clear()
        self.counts.clear()
        self.disconnects = 0
        self.rank_requests.clear()
        self.pd_counts.clear()
        self._baseline = dict(counters)

    def since_clear(self, counters: dict[str, int]) -> dict[str, int]:
        return {k: v - self._baseline.get(k, 0) for k, v in counters.items()}
