"""Run-time fault injection state of one simulated worker (driven by ``POST /__ctl``)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

_INT_FIELDS = ("health_status", "error_status", "latency_ms", "disconnect_after_chunks")
_BOOL_FIELDS = ("hang", "refuse", "stream_as_json")


class FaultError(ValueError):
    """A ``/__ctl`` payload that cannot be applied."""


class FaultState:
    """Faults that shape how a worker answers.

    ``health_status``: status of ``/health`` and ``/health_generate``.
    ``error_status`` / ``error_rate`` / ``error_body``: inference requests fail with that status
    with the given probability (default 1.0).
    ``latency_ms``: extra delay before an inference request is processed.
    ``hang``: inference requests wait until the fault is cleared (then proceed normally).
    ``disconnect_after_chunks``: streams are cut after N SSE frames; non-streaming inference
    responses are cut before any byte is sent.
    ``refuse``: the listener is closed (applied by the server, which owns the socket).
    ``stream_as_json``: ``/generate`` with ``"stream": true`` answers one JSON body, as for a plain request (what
    some prefill servers do; the gateway must read PD input logprobs from either shape).
    ``output_text`` (gRPC workers): every generation outputs exactly the BPE encoding of this text
    (not a fault, a script for tests: it pins which ids a client must detokenize).
    """

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._unhang = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        self.health_status: int | None = None
        self.error_status: int | None = None
        self.error_rate = 1.0
        self.error_body: Any = None
        self.latency_ms: int | None = None
        self.disconnect_after_chunks: int | None = None
        self.hang = False
        self.refuse = False
        self.stream_as_json = False
        self.output_text: str | None = None
        self._unhang.set()
        self._refresh()

    def apply(self, changes: dict[str, Any]) -> None:
        """Apply a ``/__ctl`` payload (only the fault fields; ``null`` clears a field)."""
        for name in _INT_FIELDS:
            if name in changes:
                value = changes[name]
                if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                    raise FaultError(f"{name} must be an integer or null")
                setattr(self, name, value)
        for name in _BOOL_FIELDS:
            if name in changes:
                setattr(self, name, bool(changes[name]))
        if "error_rate" in changes:
            rate = changes["error_rate"]
            if not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
                raise FaultError("error_rate must be a number in [0, 1]")
            self.error_rate = float(rate)
        if "error_body" in changes:
            self.error_body = changes["error_body"]
        if "output_text" in changes:
            text = changes["output_text"]
            if text is not None and not isinstance(text, str):
                raise FaultError("output_text must be a string or null")
            self.output_text = text
        if self.hang:
            self._unhang.clear()
        else:
            self._unhang.set()
        self._refresh()

    def _refresh(self) -> None:
        # One flag for the hot path: most requests run with no fault at all.
        self.affects_inference = bool(
            self.error_status or self.latency_ms or self.hang or self.disconnect_after_chunks is not None
        )

    def should_fail(self) -> bool:
        return self.error_status is not None and (self.error_rate >= 1.0 or self._rng.random() < self.error_rate)

    async def wait_while_hung(self) -> None:
        await self._unhang.wait()

    async def before_inference(self) -> int | None:
        """Delay or hang an inference request as the faults dictate; the status it must fail with, if any.

        Shared by the HTTP routes and the gRPC servicer, which each render the failure their own way."""
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        if self.hang:
            await self.wait_while_hung()
        return (self.error_status or 500) if self.should_fail() else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "health_status": self.health_status,
            "error_status": self.error_status,
            "error_rate": self.error_rate,
            "error_body": self.error_body,
            "latency_ms": self.latency_ms,
            "hang": self.hang,
            "disconnect_after_chunks": self.disconnect_after_chunks,
            "refuse": self.refuse,
            "stream_as_json": self.stream_as_json,
            "output_text": self.output_text,
        }
