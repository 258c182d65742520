"""Command-line flags of ``shepherd sim`` and the settings they produce."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from shepherd.sim.engine import LatencyModel
from shepherd.sim.kv_zmq import KvEventsConfig

ROLES = ("regular", "prefill", "decode")


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``shepherd sim`` flags to ``parser``."""
    net = parser.add_argument_group("listeners")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    net.add_argument(
        "--port", type=int, default=30000,
        help="port of the first worker; worker i listens on port+i; 0 picks free ports (default: %(default)s)",
    )  # fmt: skip
    net.add_argument("--workers", type=int, default=1, help="workers served by this process")
    net.add_argument(
        "--ready-file",
        help='write {"urls": [...], "http_urls": [...], "bootstrap_ports": [...], "tokenizer_dir": ..., '
        '"kv_events_endpoints": [...], "pid": N} here (atomically) once every listener is bound (bootstrap ports '
        "are null unless --role prefill; tokenizer_dir, the workers' BPE tokenizer directory, is null without "
        "--grpc or a zmq --kv-events-config; kv_events_endpoints, each worker's resolved ZMQ endpoint, null "
        "without a zmq --kv-events-config)",
    )
    net.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on inference and admin routes")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="sim-model", help="served model name (default: %(default)s)")
    model.add_argument("--context-length", type=int, default=32768)
    model.add_argument("--max-new-tokens-default", type=int, default=16)
    model.add_argument("--seed", type=int, default=0, help="seed for generated text and fault draws")

    engine = parser.add_argument_group("engine")
    engine.add_argument("--kv-tokens", type=int, default=200_000, help="prefix-cache capacity per DP rank")
    engine.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    engine.add_argument("--max-running-requests", type=int, default=64)
    engine.add_argument(
        "--latency-model", choices=("none", "batch"), default="none",
        help="none: answer at once; batch: simulate a batching step loop (default: %(default)s)",
    )  # fmt: skip
    defaults = LatencyModel()
    engine.add_argument("--prefill-tokens-per-ms", type=float, default=defaults.prefill_tokens_per_ms)
    engine.add_argument("--decode-step-ms", type=float, default=defaults.decode_step_ms)
    engine.add_argument("--decode-step-ms-per-request", type=float, default=defaults.decode_step_ms_per_request)
    engine.add_argument("--chunked-prefill-size", type=int, default=defaults.chunked_prefill_size)

    topo = parser.add_argument_group("topology")
    topo.add_argument("--role", choices=ROLES, default="regular", help="PD disaggregation role")
    topo.add_argument(
        "--bootstrap-port", type=int, default=8998,
        help="prefill role: port of worker 0's bootstrap listener (worker i: port+i; 0 picks free ports) "
        "(default: %(default)s)",
    )  # fmt: skip
    topo.add_argument(
        "--bootstrap-timeout-secs", type=float, default=30.0,
        help="decode role: how long a request waits for its prefill to publish its bootstrap room(s) "
        "(default: %(default)s)",
    )  # fmt: skip
    topo.add_argument("--dp-size", type=int, default=1, help="data-parallel ranks per worker")
    grpc = parser.add_argument_group("gRPC")
    grpc.add_argument(
        "--grpc",
        action="store_true",
        help="be an SGLang gRPC engine: the worker port serves sglang.grpc.scheduler.SglangScheduler and "
        "grpc.health.v1 (URLs are grpc://), token ids come from a BPE trained at start-up, and the HTTP app "
        "(/metrics, /__ctl, /__log) listens on the metrics sidecar port (gRPC port + 10000, or - 10000 past 65535)",
    )
    grpc.add_argument(
        "--tokenizer-path-in-info",
        action="store_true",
        help="with --grpc: report the local tokenizer directory as GetModelInfo's tokenizer_path (default: empty, "
        "so a gateway has to fetch the tokenizer with GetTokenizer)",
    )
    grpc.add_argument(
        "--kv-events",
        action="store_true",
        help="with --grpc: serve the prefix cache's changes (pages stored, evicted, flushed; one publisher per DP "
        "rank) on SubscribeKvEvents: a snapshot of the resident pages, then live batches (without this flag or "
        "--kv-events-config with the zmq publisher, SubscribeKvEvents is UNIMPLEMENTED)",
    )
    events = parser.add_argument_group("KV events")
    events.add_argument(
        "--kv-events-config",
        metavar="JSON",
        help='publish the prefix cache\'s changes as SGLang does, e.g. \'{"publisher": "zmq", "endpoint": '
        '"tcp://*:5557", "topic": ""}\' (also replay_endpoint, buffer_steps, hwm, max_queue_size; no replay): one '
        "ZMQ PUB socket per DP rank at the endpoint's port + rank (worker i of the process: port + i * dp-size), "
        "bound if the endpoint has '*' or '::' or is ipc/inproc, else connected; a wildcard port "
        "(tcp://127.0.0.1:*) picks free ports. /get_server_info reports it with the endpoint resolved, and the BPE "
        "tokenizer the engine then caches by as tokenizer_path. With --grpc it also serves SubscribeKvEvents",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument(
        "--tls-cert-path", metavar="PATH",
        help="serve the worker port over TLS with this PEM certificate: URLs are https:// (grpcs:// with --grpc); "
        "the metrics sidecar of --grpc and the prefill bootstrap listener stay plain",
    )  # fmt: skip
    tls.add_argument("--tls-key-path", metavar="PATH", help="the certificate's unencrypted PEM key")
    tls.add_argument(
        "--tls-client-ca", metavar="PATH", help="require a client certificate signed by this PEM CA (mTLS)"
    )


@dataclass(frozen=True, slots=True)
class SimConfig:
    host: str
    port: int
    workers: int
    ready_file: str | None
    api_key: str | None
    model: str
    context_length: int
    max_new_tokens_default: int
    seed: int
    kv_tokens: int
    page_size: int
    max_running_requests: int
    latency: LatencyModel | None
    role: str
    bootstrap_port: int
    bootstrap_timeout_secs: float
    dp_size: int
    grpc: bool = False
    tokenizer_path_in_info: bool = False
    kv_events: bool = False  # a publisher per DP rank: --kv-events, or --kv-events-config with the zmq publisher
    kv_events_config: KvEventsConfig | None = None
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    tls_client_ca: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimConfig:
        if args.workers < 1 or args.dp_size < 1 or args.page_size < 1 or args.max_running_requests < 1:
            raise ValueError("--workers, --dp-size, --page-size and --max-running-requests must be >= 1")
        if args.bootstrap_timeout_secs <= 0 or not 0 <= args.bootstrap_port < 65536:
            raise ValueError("--bootstrap-timeout-secs must be positive and --bootstrap-port a port number or 0")
        if args.prefill_tokens_per_ms <= 0:
            raise ValueError("--prefill-tokens-per-ms must be positive")
        if bool(args.tls_cert_path) != bool(args.tls_key_path):
            raise ValueError("--tls-cert-path and --tls-key-path go together: give both or neither")
        if args.tls_client_ca and not args.tls_cert_path:
            raise ValueError("--tls-client-ca needs --tls-cert-path and --tls-key-path")
        events = None
        if args.kv_events_config is not None:
            events = KvEventsConfig.parse(args.kv_events_config, args.workers * args.dp_size)
        latency = None
        if args.latency_model == "batch":
            latency = LatencyModel(
                prefill_tokens_per_ms=args.prefill_tokens_per_ms,
                decode_step_ms=args.decode_step_ms,
                decode_step_ms_per_request=args.decode_step_ms_per_request,
                chunked_prefill_size=max(1, args.chunked_prefill_size),
            )
        return cls(
            host=args.host,
            port=args.port,
            workers=args.workers,
            ready_file=args.ready_file,
            api_key=args.api_key,
            model=args.model,
            context_length=args.context_length,
            max_new_tokens_default=args.max_new_tokens_default,
            seed=args.seed,
            kv_tokens=args.kv_tokens,
            page_size=args.page_size,
            max_running_requests=args.max_running_requests,
            latency=latency,
            role=args.role,
            bootstrap_port=args.bootstrap_port,
            bootstrap_timeout_secs=args.bootstrap_timeout_secs,
            dp_size=args.dp_size,
            grpc=args.grpc,
            tokenizer_path_in_info=args.tokenizer_path_in_info,
            kv_events=args.kv_events or (events is not None and events.zmq),
            kv_events_config=events,
            tls_cert_path=args.tls_cert_path,
            tls_key_path=args.tls_key_path,
            tls_client_ca=args.tls_client_ca,
        )

    @property
    def zmq_kv_events(self) -> bool:
        """Whether KV events go out over ZMQ (and the engine caches by its BPE's ids)."""
        return self.kv_events_config is not None and self.kv_events_config.zmq

    @property
    def tls(self) -> bool:
        return self.tls_cert_path is not None

    @property
    def disaggregation_mode(self) -> str:
        return "null" if self.role == "regular" else self.role
