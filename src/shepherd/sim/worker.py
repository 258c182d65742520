"""State of one simulated SGLang worker: its engines (one per DP rank), faults and logs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import zmq

from shepherd.sim.bootstrap import Handshake
from shepherd.sim.config import SimConfig
from shepherd.sim.engine import Engine, Sequence, SequenceGroup
from shepherd.sim.faults import FaultState
from shepherd.sim.kv_cache import PrefixCache
from shepherd.sim.kv_events import KvEventPublisher
from shepherd.sim.kv_zmq import WorkerSockets
from shepherd.sim.metrics import LiveState, WorkerStats
from shepherd.sim.prompt_tokens import WORDS, PromptTokenizer
from shepherd.sim.request_log import RequestLog
from shepherd.sim.tokenizer import Completion

SGLANG_VERSION = "0.5.4-sim"


class SimWorker:
    def __init__(self, config: SimConfig, index: int, prompts: PromptTokenizer = WORDS) -> None:
        self.config = config
        self.index = index
        self.prompts = prompts  # how request text becomes the engine's token ids, and outputs are drawn
        self.port = 0  # set by the server once the listener is bound
        self.tokenizer_dir: Path | None = None  # with a zmq --kv-events-config: set by the server (`tokenizer_path`)
        self.started_at = time.time()
        self.stats = WorkerStats()
        # --kv-events or --kv-events-config: one publisher per DP rank, the sink of that rank's cache, for gRPC
        # SubscribeKvEvents and (`open_kv_sockets`) SGLang's ZMQ PUB sockets.
        self.kv_events = [KvEventPublisher(rank) for rank in range(config.dp_size)] if config.kv_events else []
        self.kv_sockets: WorkerSockets | None = None
        self.engines = [
            Engine(
                self._cache(rank),
                self.stats,
                config.max_running_requests,
                config.latency,
            )
            for rank in range(config.dp_size)
        ]
        self.faults = FaultState(seed=config.seed * 7919 + index)
        self.log = RequestLog()
        self.handshake = Handshake(config.role, config.bootstrap_timeout_secs, self.log)
        self.bootstrap_port: int | None = None  # prefill role: set by the server once its listener is bound

    def _cache(self, rank: int) -> PrefixCache:
        if not self.kv_events:
            return PrefixCache(self.config.kv_tokens, self.config.page_size)
        publisher = self.kv_events[rank]
        cache = PrefixCache(self.config.kv_tokens, self.config.page_size, publisher)
        publisher.attach(cache.resident_pages)
        return cache

    def open_kv_sockets(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        """Bind (or connect) this worker's ZMQ PUB sockets and make them outlets of its publishers
        (`ZMQError` if a port is taken)."""
        events = self.config.kv_events_config
        assert events is not None and events.zmq and self.kv_sockets is None
        self.kv_sockets = WorkerSockets(context, events, self.index, self.config.dp_size)
        for publisher, outlet in zip(self.kv_events, self.kv_sockets.outlets, strict=True):
            publisher.add_outlet(outlet)

    @property
    def url(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"  # a wildcard bind is reachable on loopback
        elif ":" in host:
            host = f"[{host}]"
        scheme = ("grpc" if self.config.grpc else "http") + ("s" if self.config.tls else "")
        return f"{scheme}://{host}:{self.port}"

    @property
    def engine_type(self) -> str:
        """The ``engine_type`` metric label SGLang uses for this role."""
        return "unified" if self.config.role == "regular" else self.config.role

    def submit(
        self, prompts: list[list[int]], max_new_tokens: list[int], n: int = 1, dp_rank: int | None = None
    ) -> SequenceGroup:
        """Start ``n`` generations per prompt (``max_new_tokens`` is per prompt) with the simulator's
        word output.  Sequences are ordered prompt-major."""
        seed = self.config.seed
        return self.start(
            [
                (prompt, self.prompts.completion(prompt, new, seed, choice))
                for prompt, new in zip(prompts, max_new_tokens, strict=True)
                for choice in range(n)
            ],
            dp_rank,
        )

    def start(self, work: list[tuple[list[int], Completion]], dp_rank: int | None = None) -> SequenceGroup:
        """Start one sequence per (prompt ids, output) pair; all of them share a DP rank.

        PD roles: a prefill worker stops after the first token, as SGLang's does (the decode worker
        generates the rest); a decode worker gets the prompt's KV cache from its prefill, so it does
        not compute the prompt again."""
        rank = self._pick_rank(dp_rank)
        self.log.rank_requests[rank] += 1
        engine = self.engines[rank]
        role = self.config.role
        group = SequenceGroup(
            [
                Sequence(
                    prompt,
                    completion.head(1) if role == "prefill" else completion,
                    kv_transferred=role == "decode",
                )
                for prompt, completion in work
            ]
        )
        for seq in group.seqs:
            engine.submit(seq)
        return group

    def _pick_rank(self, dp_rank: int | None) -> int:
        engines = self.engines
        if len(engines) == 1:
            return 0
        if dp_rank is not None:
            return dp_rank % len(engines)
        return min(range(len(engines)), key=lambda r: len(engines[r].running) + len(engines[r].waiting))

    def flush_cache(self) -> None:
        for engine in self.engines:
            engine.cache.clear()

    def live_state(self) -> LiveState:
        running = sum(len(e.running) for e in self.engines)
        queued = sum(len(e.waiting) for e in self.engines)
        usage = sum(e.token_usage for e in self.engines) / len(self.engines)
        return LiveState(running, queued, usage)

    def load(self) -> list[dict[str, Any]]:
        """``GET /get_load`` payload: one entry per DP rank."""
        return [
            {
                "dp_rank": rank,
                "num_reqs": len(e.running) + len(e.waiting),
                "num_waiting_reqs": len(e.waiting),
                "num_tokens": e.num_tokens,
            }
            for rank, e in enumerate(self.engines)
        ]

    def server_info(self) -> dict[str, Any]:
        """The facts SGLang's ``/server_info`` (and gRPC ``GetServerInfo``'s ``server_args``) report.

        With ``--kv-events-config``: ``kv_events_config`` is the flag's JSON with the endpoint resolved (this worker's
        rank-0 endpoint, its bound port instead of a wildcard), and ``tokenizer_path`` the directory of the BPE the
        engine caches by (a zmq publisher only)."""
        cfg = self.config
        info = self._server_info()
        if cfg.kv_events_config is not None:
            endpoint = self.kv_sockets.endpoint if self.kv_sockets is not None else None
            info["kv_events_config"] = cfg.kv_events_config.reported(endpoint)
            if self.tokenizer_dir is not None:
                info["tokenizer_path"] = str(self.tokenizer_dir)
        return info

    def _server_info(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "model_path": cfg.model,
            "tokenizer_path": cfg.model,
            "served_model_name": cfg.model,
            "host": cfg.host,
            "port": self.port,
            "tp_size": 1,
            "pp_size": 1,
            "dp_size": cfg.dp_size,
            "enable_dp_attention": cfg.dp_size > 1,
            "max_running_requests": cfg.max_running_requests,
            "max_total_tokens": cfg.kv_tokens,
            "max_total_num_tokens": cfg.kv_tokens,
            "context_length": cfg.context_length,
            "page_size": cfg.page_size,
            "chunked_prefill_size": cfg.latency.chunked_prefill_size if cfg.latency else None,
            "random_seed": cfg.seed,
            "disaggregation_mode": cfg.disaggregation_mode,
            "disaggregation_bootstrap_port": self.bootstrap_port or cfg.bootstrap_port,
            "is_embedding": False,
            "version": SGLANG_VERSION,
            "internal_states": [
                {"dp_rank": rank, "last_gen_throughput": self.stats.gen_throughput()} for rank in range(cfg.dp_size)
            ],
        }

    def counters(self) -> dict[str, int]:
        s = self.stats
        return {
            "prompt_tokens": s.prompt_tokens,
            "cached_tokens": s.cached_tokens,
            "completion_tokens": s.generation_tokens,
            "num_requests": s.num_requests,
        }

    def metrics_text(self) -> str:
        return self.stats.render(self.config.model, self.engine_type, self.live_state())

    async def close(self) -> None:
        for engine in self.engines:
            await engine.close()
        await self.handshake.close()
        if self.kv_sockets is not None:
            self.kv_sockets.close()
