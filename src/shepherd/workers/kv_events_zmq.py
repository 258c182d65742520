"""KV events of HTTP engines: SGLang's ZeroMQ publisher (`--kv-events-config '{"publisher": "zmq", ...}'`).

An SGLang HTTP server started with a zmq `--kv-events-config` publishes the same events its gRPC server streams
with `SubscribeKvEvents`, on a PUB socket per DP rank: rank r at the configured endpoint's port + r. It reports
the config in its server info (`kv_events_config`, a JSON string), which is how the gateway finds the endpoint; a
wildcard host (`tcp://*:5557`) is the worker's own host. Each message has three frames: the topic, the batch's
sequence number (8 bytes, big-endian, from 0 per rank) and the batch, msgpack-encoded as msgspec's array-like tagged
structs: `[ts, [event, ...], ...]` with events `["BlockStored", hashes, parent_hash, token_ids, block_size, ...]`,
`["BlockRemoved", hashes, ...]` and `["AllBlocksCleared"]` (trailing fields of newer engines are ignored).

PUB/SUB has no snapshot: a subscriber hears what the engine does from the moment it connects. So the view starts
from nothing at the first batch heard (`CacheCleared`), and holds a subset of what the engine caches until the
blocks stored before that have turned over. A skipped sequence number (the subscriber fell behind the publisher's
high-water mark) or one that goes back (the engine restarted) starts the view over the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import msgpack

from shepherd.workers.kv_events import BlocksRemoved, BlocksStored, CacheCleared, KvEvent

_WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]", "")


def zmq_endpoints(server_info: dict[str, Any], worker_url: str, ranks: range) -> tuple[str, ...]:
    """The endpoints an HTTP engine publishes its KV events on, one per DP rank in `ranks`; () if it reports none
    over TCP (no config, another publisher, ipc:// or inproc://). A wildcard host is the worker's own; a named one is
    taken as given (an engine whose PUB socket connects out to it: whatever listens there must republish)."""
    raw = server_info.get("kv_events_config")
    try:
        config = json.loads(raw) if isinstance(raw, str) and raw else raw
    except ValueError:
        return ()
    if not isinstance(config, dict) or config.get("publisher") != "zmq":
        return ()
    endpoint = config.get("endpoint", "tcp://*:5557")
    if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
        return ()
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not port.isdigit():
        return ()
    if host in _WILDCARD_HOSTS:
        host = urlsplit(worker_url).hostname or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
    return tuple(f"tcp://{host}:{int(port) + rank}" for rank in ranks)


def decode_batch(payload: bytes) -> list[KvEvent]:
    """The events of one msgpack batch, as plain data; ValueError if it is not a batch."""
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise ValueError(f"undecodable KV event batch: {exc}") from None
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("a KV event batch is [ts, events, ...]")
    events: list[KvEvent] = []
    for event in batch[1]:
        if not isinstance(event, list) or not event:
            raise ValueError("a KV event is [tag, fields...]")
        decode = _DECODERS.get(event[0])
        if decode is not None:  # unknown tags are newer engines' events nobody routes on
            events.append(decode(event))
    return events


def _stored(event: list[Any]) -> BlocksStored:
    hashes, parent, token_ids = tuple(_hash(h) for h in event[1]), event[2], event[3]
    if not hashes:
        return BlocksStored(None, ())
    size = event[4] if len(event) > 4 and isinstance(event[4], int) and event[4] > 0 else len(token_ids) // len(hashes)
    blocks = tuple((h, tuple(token_ids[i * size : (i + 1) * size])) for i, h in enumerate(hashes))
    return BlocksStored(None if parent is None else _hash(parent), blocks)


def _removed(event: list[Any]) -> BlocksRemoved:
    return BlocksRemoved(tuple(_hash(h) for h in event[1]))


def _hash(value: Any) -> int:
    """An engine block hash: SGLang sends integers; vLLM may send bytes."""
    if isinstance(value, int):
        return value
    if isinstance(value, bytes):
        return int.from_bytes(value[:8], "big", signed=True)
    raise ValueError(f"a block hash is an integer, not {type(value).__name__}")


_DECODERS: dict[str, Callable[[list[Any]], KvEvent]] = {
    "BlockStored": _stored,
    "BlockRemoved": _removed,
    "AllBlocksCleared": lambda event: CacheCleared(),
}
