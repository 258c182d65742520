"""SGLang's ZMQ KV event wire (`--kv-events-config`): one PUB socket per DP rank, msgpack batches.

What SGLang's `ZmqEventPublisher` does, and so what the sim does:

* the config is JSON: `{"publisher": "zmq", "endpoint": "tcp://*:5557", "topic": ""}` plus `replay_endpoint`,
  `buffer_steps`, `hwm`, `max_queue_size` (accepted; there is no replay socket here, and no send queue: a batch is
  sent at once with `NOBLOCK`, so a full `hwm` drops it, as ZMQ does). `publisher: "null"` publishes nothing;
* DP rank r publishes on the endpoint with its port + r (`offset_endpoint_port`; `inproc://` and `ipc://` get the
  suffix `_dp{r}` instead). The socket binds when the endpoint contains `*` or `::` or is `ipc://`/`inproc://`,
  else it connects (to a subscriber that binds);
* each batch is a 3-frame message: topic bytes, the sequence number as 8 bytes big-endian (from 0 per rank), and
  the msgpack of the batch as msgspec encodes SGLang's tagged `array_like` structs:
  `[ts, [["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id], ["BlockRemoved",
  block_hashes], ["AllBlocksCleared"], ...]]`. The sim's chain keys are Python `hash` values, so they fit int64.

The sim adds one thing for tests and several workers per process: a wildcard port (`tcp://127.0.0.1:*`) picks free
ports, rank r at base + r (another base is tried if one is taken), and the resolved endpoint (rank 0's, with the
port) is what the worker reports. With an explicit port, worker i of the process uses port + i * dp_size as its
base, so every rank of every worker has its own port.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from shepherd.sim.kv_events import Cleared, KvBatch, KvEvent, Removed, Stored

PUBLISHERS = ("null", "zmq")
DEFAULT_ENDPOINT = "tcp://*:5557"
WILDCARD_PORT_ATTEMPTS = 50
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "publisher": str,
    "endpoint": str,
    "topic": str,
    "replay_endpoint": (str, type(None)),
    "buffer_steps": int,
    "hwm": int,
    "max_queue_size": int,
}


@dataclass(frozen=True, slots=True)
class KvEventsConfig:
    """`--kv-events-config`, as SGLang's `KVEventsConfig` reads it (unknown fields are an error there too)."""

    publisher: str = "null"
    endpoint: str = DEFAULT_ENDPOINT
    topic: str = ""
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    given: dict[str, Any] = field(default_factory=dict, compare=False)  # the JSON object as given

    @classmethod
    def parse(cls, text: str, ranks: int = 1) -> KvEventsConfig:
        """Read the flag's JSON (`ranks`: DP ranks of the whole process, one port each); `ValueError` with a message
        naming what is wrong."""
        try:
            given = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"--kv-events-config is not valid JSON ({exc}): {text!r}") from None
        if not isinstance(given, dict):
            raise ValueError(f"--kv-events-config must be a JSON object, got {text!r}")
        unknown = sorted(set(given) - set(_FIELDS))
        if unknown:
            raise ValueError(f"--kv-events-config: unknown field(s) {unknown}; known: {sorted(_FIELDS)}")
        for name, value in given.items():
            kind = _FIELDS[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"--kv-events-config: {name!r} has the wrong type: {value!r}")
        config = cls(**given, given=given)
        if config.publisher not in PUBLISHERS:
            raise ValueError(f"--kv-events-config: unknown publisher {config.publisher!r} (one of {list(PUBLISHERS)})")
        if config.hwm < 0:
            raise ValueError("--kv-events-config: 'hwm' must be >= 0")
        if config.zmq:
            rank_endpoint(config.endpoint, max(0, ranks - 1))  # checks the endpoint's form and the last port
        return config

    @property
    def zmq(self) -> bool:
        return self.publisher == "zmq"

    def reported(self, endpoint: str | None) -> str:
        """The config as a worker reports it (`server_info`'s `kv_events_config`): the JSON given, with `endpoint`
        set to the resolved one (the bound port instead of a wildcard) when there is one."""
        given = dict(self.given)
        if endpoint is not None:
            given["endpoint"] = endpoint
        return json.dumps(given)


# --- endpoints --------------------------------------------------------------------------------------------------------


def binds(endpoint: str) -> bool:
    """Whether a PUB socket binds this endpoint (SGLang's rule) rather than connecting to it."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def rank_endpoint(endpoint: str, rank: int) -> str:
    """The endpoint of DP rank `rank` (SGLang's `offset_endpoint_port`); a wildcard port stays a wildcard."""
    if endpoint.startswith(("inproc://", "ipc://")):
        return f"{endpoint}_dp{rank}"
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"--kv-events-config: endpoint must be tcp://, ipc:// or inproc://, got {endpoint!r}")
    address, _, port = endpoint.rpartition(":")
    if address == "tcp" or not port or port.endswith("]"):  # no ":port" after the host ("tcp://[::1]" neither)
        raise ValueError(f"--kv-events-config: a tcp endpoint needs a port (or '*'): {endpoint!r}")
    if port == "*":
        return endpoint
    if not port.isdigit() or not 0 < int(port) + rank < 65536:
        raise ValueError(f"--kv-events-config: bad port in endpoint {endpoint!r} (rank {rank})")
    return f"{address}:{int(port) + rank}"


def worker_endpoint(endpoint: str, worker: int, dp_size: int) -> str:
    """Worker `worker`'s rank-0 endpoint: its base port (or suffix) is `worker * dp_size` past the configured one."""
    return rank_endpoint(endpoint, worker * dp_size) if worker else endpoint


# --- encoding ---------------------------------------------------------------------------------------------------------


def encode_event(event: KvEvent) -> list[Any]:
    """One event as msgspec encodes SGLang's tagged, `array_like` struct."""
    if isinstance(event, Stored):
        pages = event.pages
        return [
            "BlockStored",
            [key for key, _ in pages],
            event.parent,
            [token for _, tokens in pages for token in tokens],
            len(pages[0][1]),  # block_size: every page of a run is one page size
            None,  # lora_id
        ]
    if isinstance(event, Removed):
        return ["BlockRemoved", event.keys]
    assert isinstance(event, Cleared)
    return ["AllBlocksCleared"]


def encode_batch(batch: KvBatch) -> bytes:
    """The payload frame of one batch: msgpack of `[ts, [event, ...]]`."""
    return msgpack.packb([batch.timestamp, [encode_event(event) for event in batch.events]])


class ZmqOutlet:
    """The ZMQ outlet of one DP rank's publisher: sends each batch on its PUB socket, numbered from 0."""

    listening = True  # a PUB socket publishes whether or not anyone subscribes

    def __init__(self, socket: zmq.Socket[bytes], topic: str) -> None:
        self.socket = socket
        self.topic = topic.encode()
        self.sequence = 0  # the next batch's

    def publish(self, batch: KvBatch) -> None:
        if self.socket.closed:  # the worker is shutting down
            return
        sequence = self.sequence
        self.sequence += 1
        frames = [self.topic, sequence.to_bytes(8, "big"), encode_batch(batch)]
        # At the high-water mark the batch is dropped (subscribers see the gap in the sequence numbers).
        with contextlib.suppress(zmq.Again):
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK)


# --- sockets ----------------------------------------------------------------------------------------------------------


class WorkerSockets:
    """One worker's PUB sockets, one per DP rank, bound (or connected) on creation; `endpoint` is rank 0's,
    resolved (the wildcard port replaced by the bound one)."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], config: KvEventsConfig, worker: int, dp_size: int):
        self.config = config
        self.sockets: list[zmq.Socket[bytes]] = []
        base = worker_endpoint(config.endpoint, worker, dp_size)
        try:
            if base.startswith("tcp://") and base.endswith(":*"):
                self.endpoint = self._bind_wildcard(context, base, dp_size)
            else:
                self.endpoint = base
                for rank in range(dp_size):
                    endpoint = rank_endpoint(base, rank)
                    self._open(context, endpoint, binds(endpoint))
        except zmq.ZMQError:
            self.close()
            raise
        self.outlets = [ZmqOutlet(sock, config.topic) for sock in self.sockets]

    def _open(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str, bind: bool) -> zmq.Socket[bytes]:
        sock = context.socket(zmq.PUB)
        self.sockets.append(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        if "[" in endpoint or "::" in endpoint:
            sock.setsockopt(zmq.IPV6, 1)
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
        return sock

    def _bind_wildcard(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str, dp_size: int) -> str:
        """Bind rank 0 on a port the OS picks and rank r on that port + r; try another port if one is taken."""
        address = endpoint.removesuffix(":*")
        for _ in range(WILDCARD_PORT_ATTEMPTS):
            first = self._open(context, endpoint, bind=True)
            last = first.getsockopt(zmq.LAST_ENDPOINT)
            assert isinstance(last, bytes)
            port = int(last.decode().rsplit(":", 1)[1])
            try:
                if port + dp_size > 65536:
                    raise zmq.ZMQError(zmq.EADDRINUSE)
                for rank in range(1, dp_size):
                    self._open(context, f"{address}:{port + rank}", bind=True)  # a wildcard endpoint binds
            except zmq.ZMQError as exc:
                self.close()
                if exc.errno != zmq.EADDRINUSE:
                    raise
                continue
            return f"{address}:{port}"
        raise zmq.ZMQError(zmq.EADDRINUSE, f"no {dp_size} consecutive free ports for {endpoint}")

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        self.sockets = []
