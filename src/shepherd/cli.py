"""The `shepherd` command: launch (gateway), serve (workers + gateway), sim (simulated worker), bench.

Flag names follow SMG and the SGLang router; where the design documents spell a flag two ways, both work.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from shepherd.config import (
    DEFAULT_REQUEST_ID_HEADERS,
    DISCOVERY_PROVIDERS,
    POLICIES,
    AuthConfig,
    CacheAwareConfig,
    CircuitBreakerConfig,
    ConfigError,
    DiscoveryConfig,
    GatewayConfig,
    HealthCheckConfig,
    HttpConfig,
    PrefillSpec,
    RetryConfig,
    TlsConfig,
    TokenizerConfig,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(text: str) -> float:
    """Seconds from `5`, `5s`, `500ms`, `2m` or `1h`."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 5, 5s, 500ms, 2m)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def byte_size(text: str) -> int:
    """Bytes from `1048576`, `256MB` or `512MiB`."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 1048576, 256MB, 512MiB)")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()]


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `shepherd launch` flag (also accepted by `shepherd serve`)."""
    d = GatewayConfig()
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=d.host)
    g.add_argument("--port", type=int, default=d.port)
    g.add_argument("--worker-urls", nargs="*", default=[], metavar="URL")
    g.add_argument("--max-payload-size", type=byte_size, default=d.max_payload_size)
    g.add_argument("--request-timeout-secs", type=duration, default=d.request_timeout_secs)
    h = d.http
    g.add_argument("--max-header-bytes", type=byte_size, default=h.max_header_bytes)
    g.add_argument("--max-header-count", type=int, default=h.max_header_count)
    g.add_argument("--client-header-timeout-secs", type=duration, default=h.header_timeout_secs)
    g.add_argument("--client-keepalive-timeout-secs", type=duration, default=h.keepalive_timeout_secs)
    g.add_argument("--max-pipelined-requests", type=int, default=h.max_pipelined_requests)
    g.add_argument("--upstream-connect-timeout-secs", type=duration, default=h.upstream_connect_timeout_secs)
    g.add_argument("--upstream-first-byte-timeout-secs", type=duration, default=None)
    g.add_argument("--stream-idle-timeout-secs", type=duration, default=h.stream_idle_timeout_secs)
    g.add_argument("--upstream-idle-timeout-secs", type=duration, default=h.upstream_idle_timeout_secs)
    g.add_argument("--worker-startup-timeout-secs", type=duration, default=d.worker_startup_timeout_secs)
    g.add_argument("--worker-startup-check-interval", type=duration, default=d.worker_startup_check_interval)
    g.add_argument("--shutdown-grace-period-secs", type=duration, default=d.shutdown_grace_period_secs)
    g.add_argument(
        "--shutdown-drain-window-secs", type=duration, default=None,
        help="after SIGTERM, readiness is 503 while new requests are still served this long "
        "(default: half the grace period, at most 5 s)",
    )  # fmt: skip
    g.add_argument("--api-key", default=None)
    g.add_argument("--cors-allowed-origins", nargs="*", default=[], metavar="ORIGIN")
    g.add_argument("--request-id-headers", nargs="+", default=list(DEFAULT_REQUEST_ID_HEADERS), metavar="HEADER")

    r = parser.add_argument_group("routing")
    r.add_argument("--policy", choices=POLICIES, default=d.policy)
    r.add_argument("--prefill-policy", choices=POLICIES, default=None)
    r.add_argument("--decode-policy", choices=POLICIES, default=None)
    ca = CacheAwareConfig()
    r.add_argument("--cache-threshold", "--cache-match-threshold", type=float, default=ca.cache_threshold)
    r.add_argument("--balance-abs-threshold", type=int, default=ca.balance_abs_threshold)
    r.add_argument("--balance-rel-threshold", type=float, default=ca.balance_rel_threshold)
    r.add_argument("--eviction-interval-secs", type=duration, default=ca.eviction_interval_secs)
    r.add_argument(
        "--max-tree-size", type=byte_size, default=ca.max_tree_size,
        help="memory of the prefix index per model, in bytes (e.g. 67108864, 64MiB)",
    )  # fmt: skip
    r.add_argument("--cache-block-chars", type=int, default=ca.block_chars, help="prefix index granularity")
    r.add_argument(
        "--worker-kv-tokens", type=int, default=ca.worker_kv_tokens,
        help="prefix-cache capacity of one worker in tokens, so the index forgets what it evicted; 0: as reported",
    )  # fmt: skip
    r.add_argument(
        "--cache-chars-per-token", type=float, default=ca.chars_per_token,
        help="characters of prompt text per KV token, to size each worker's part of the prefix index",
    )  # fmt: skip
    r.add_argument(
        "--cache-queue-tokens", type=float, default=ca.queue_tokens,
        help="prefill tokens one request in flight on a worker is worth when comparing workers",
    )  # fmt: skip
    r.add_argument(
        "--cache-home-requests", type=float, default=ca.home_requests,
        help="queued requests a prompt's home may carry more than another worker when the index knows nothing of "
        "the prompt (keeps replicas' placements alike)",
    )  # fmt: skip
    r.add_argument(
        "--cache-max-share", type=float, default=ca.max_share,
        help="a worker busier than the mean with more than this times the mean share of recent requests is not "
        "chosen unless it is the least loaded (a hot prefix spills); 0: no cap",
    )  # fmt: skip
    r.add_argument(
        "--cache-pending-prefill-weight", type=float, default=ca.pending_prefill_weight,
        help="weight, per character, of the prompts a worker is still prefilling (sent to it, first token not yet "
        "back) when comparing workers; 1 is their full prefill time, lower keeps more affinity",
    )  # fmt: skip
    r.add_argument("--pd-disaggregation", action="store_true")
    r.add_argument("--prefill", nargs="+", action="append", default=[], metavar=("URL", "BOOTSTRAP_PORT"))
    r.add_argument("--decode", action="append", default=[], metavar="URL")
    r.add_argument("--dp-aware", action="store_true")

    rt = RetryConfig()
    f = parser.add_argument_group("retries")
    f.add_argument("--retry-max-retries", type=int, default=rt.max_retries, help="total attempts, first included")
    f.add_argument("--retry-initial-backoff-ms", type=int, default=rt.initial_backoff_ms)
    f.add_argument("--retry-max-backoff-ms", type=int, default=rt.max_backoff_ms)
    f.add_argument("--retry-backoff-multiplier", type=float, default=rt.backoff_multiplier)
    f.add_argument("--retry-jitter-factor", type=float, default=rt.jitter_factor)
    f.add_argument("--disable-retries", action="store_true")

    cb = CircuitBreakerConfig()
    c = parser.add_argument_group("circuit breaker")
    c.add_argument("--cb-failure-threshold", "--circuit-breaker-threshold", type=int, default=cb.failure_threshold)
    c.add_argument("--cb-success-threshold", type=int, default=cb.success_threshold)
    c.add_argument("--cb-timeout-duration-secs", "--circuit-breaker-timeout", type=duration, default=cb.timeout_secs)
    c.add_argument("--cb-window-duration-secs", type=duration, default=cb.window_secs)
    c.add_argument("--disable-circuit-breaker", action="store_true")

    hc = HealthCheckConfig()
    h = parser.add_argument_group("health checks")
    h.add_argument("--health-failure-threshold", type=int, default=hc.failure_threshold)
    h.add_argument("--health-success-threshold", type=int, default=hc.success_threshold)
    h.add_argument("--health-check-timeout-secs", "--health-check-timeout", type=duration, default=hc.timeout_secs)
    h.add_argument("--health-check-interval-secs", "--health-check-interval", type=duration, default=hc.interval_secs)
    h.add_argument("--health-check-endpoint", "--health-check-path", default=hc.endpoint)
    h.add_argument("--disable-health-check", action="store_true")
    h.add_argument(
        "--remove-unhealthy-workers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on when service discovery is on, else off",
    )

    a = parser.add_argument_group("admission")
    a.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests)
    a.add_argument("--queue-size", type=int, default=d.queue_size)
    a.add_argument("--queue-timeout-secs", type=duration, default=d.queue_timeout_secs)

    t = parser.add_argument_group("tokenizers (gRPC workers)")
    t.add_argument(
        "--model-path", "--model", default=None,
        help="model id or local directory: its tokenizer is loaded at startup under this name, and it is the "
        "fallback tokenizer source for gRPC workers that report no path (with `serve`: the model workers serve)",
    )  # fmt: skip
    t.add_argument("--tokenizer-path", default=None, help="tokenizer directory or file; overrides --model-path")
    t.add_argument("--chat-template", default=None, metavar="PATH", help="chat template file (Jinja)")
    t.add_argument(
        "--disable-tokenizer-autoload", action="store_true",
        help="load no tokenizer at startup nor when a gRPC worker registers (use POST /v1/tokenizers)",
    )  # fmt: skip
    t.add_argument(
        "--load-monitor-interval", type=duration, default=d.load_monitor_interval_secs,
        help="seconds between GetLoads polls of gRPC workers",
    )  # fmt: skip

    sd = DiscoveryConfig()
    s = parser.add_argument_group("service discovery")
    s.add_argument("--service-discovery", action="store_true", help="discover worker pods in Kubernetes")
    s.add_argument("--discovery-provider", choices=DISCOVERY_PROVIDERS, default=None)
    s.add_argument("--selector", nargs="+", type=selector_pair, default=[], metavar="KEY=VALUE")
    s.add_argument("--prefill-selector", nargs="+", type=selector_pair, default=[], metavar="KEY=VALUE")
    s.add_argument("--decode-selector", nargs="+", type=selector_pair, default=[], metavar="KEY=VALUE")
    s.add_argument("--service-discovery-namespace", default=None, help="default: all namespaces")
    s.add_argument("--service-discovery-port", type=int, default=sd.port)
    s.add_argument("--bootstrap-port-annotation", default=sd.bootstrap_port_annotation)
    s.add_argument("--discovery-file", default=None, metavar="PATH", help="JSON or YAML worker manifest")
    s.add_argument("--discovery-check-interval-secs", type=duration, default=sd.check_interval_secs)

    x = parser.add_argument_group("tls")
    x.add_argument(
        "--tls-cert-path", default=None, metavar="PATH",
        help="serve the main port over TLS with this PEM certificate (leaf, then intermediates); reloaded on SIGHUP",
    )  # fmt: skip
    x.add_argument("--tls-key-path", default=None, metavar="PATH", help="the certificate's unencrypted PEM key")
    x.add_argument(
        "--ca-cert-paths", nargs="+", action="extend", default=[], metavar="PATH",
        help="PEM CA certificates trusted for https:// and grpcs:// workers, in addition to the system roots",
    )  # fmt: skip
    x.add_argument("--client-cert-path", default=None, metavar="PATH", help="certificate presented to workers (mTLS)")
    x.add_argument("--client-key-path", default=None, metavar="PATH", help="its unencrypted PEM key")

    k = parser.add_argument_group("control-plane security")
    k.add_argument(
        "--control-plane-api-keys", nargs="+", action="extend", default=[], metavar="ID:NAME:ROLE:KEY",
        help="control-plane keys (role admin or user); once any is set, --api-key no longer reaches the control plane",
    )  # fmt: skip
    k.add_argument("--jwt-issuer", default=None, metavar="URL", help="accept JWTs from this OIDC issuer")
    k.add_argument("--jwt-audience", default=None, help="the audience a JWT must carry (required with --jwt-issuer)")
    k.add_argument("--jwt-jwks-uri", default=None, metavar="URL", help="default: from the issuer's OIDC discovery")
    k.add_argument(
        "--jwt-role-mapping", nargs="+", action="extend", default=[], metavar="IDP_ROLE=ROLE",
        help="map the token's `roles` claim to gateway roles (default: admin=admin user=user)",
    )  # fmt: skip
    k.add_argument("--control-plane-audit-enabled", action="store_true", help="log one line per control-plane request")

    o = parser.add_argument_group("observability")
    o.add_argument("--prometheus-host", default=d.prometheus_host)
    o.add_argument("--prometheus-port", type=int, default=d.prometheus_port)
    o.add_argument(
        "--prometheus-duration-buckets", nargs="+", type=float, default=None, metavar="SECONDS",
        help="histogram bucket bounds for durations (default: SMG's 0.001 ... 7200)",
    )  # fmt: skip
    o.add_argument("--log-level", default=d.log_level, choices=("debug", "info", "warning", "error", "critical"))
    o.add_argument("--log-dir", default=None)
    o.add_argument("--log-json", action="store_true")
    o.add_argument(
        "--engine-metrics-cache-secs", type=duration, default=d.engine_metrics_cache_secs,
        help="GET /engine_metrics answers from one scrape of the workers for this long (0 to 5; 0: scrape per call)",
    )  # fmt: skip


def selector_pair(text: str) -> tuple[str, str]:
    """One `key=value` pair of a label selector."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"invalid selector {text!r} (use key=value)")
    return key.strip(), value.strip()


def _discovery_config(args: argparse.Namespace) -> DiscoveryConfig:
    provider = args.discovery_provider
    if args.service_discovery:
        if provider not in (None, "kubernetes"):
            raise ConfigError("--service-discovery is the Kubernetes provider; it conflicts with --discovery-provider")
        provider = "kubernetes"
    return DiscoveryConfig(
        provider=provider,
        selector=tuple(args.selector),
        prefill_selector=tuple(args.prefill_selector),
        decode_selector=tuple(args.decode_selector),
        namespace=args.service_discovery_namespace,
        port=args.service_discovery_port,
        bootstrap_port_annotation=args.bootstrap_port_annotation,
        file=args.discovery_file,
        check_interval_secs=args.discovery_check_interval_secs,
    )


def _prefill_specs(groups: Sequence[Sequence[str]]) -> tuple[PrefillSpec, ...]:
    specs = []
    for group in groups:
        if len(group) > 2:
            raise ConfigError(f"--prefill takes URL [BOOTSTRAP_PORT|none], got {' '.join(group)!r}")
        port: int | None = None
        if len(group) == 2 and group[1].lower() != "none":
            if not group[1].isdigit() or not 0 < int(group[1]) < 65536:
                raise ConfigError(f"--prefill bootstrap port must be a port number or 'none', got {group[1]!r}")
            port = int(group[1])
        specs.append(PrefillSpec(group[0], port))
    return tuple(specs)


def _auth_config(args: argparse.Namespace) -> AuthConfig:
    from shepherd.security.principals import parse_control_plane_keys, parse_role_mapping

    return AuthConfig(
        control_plane_api_keys=parse_control_plane_keys(args.control_plane_api_keys),
        jwt_issuer=args.jwt_issuer,
        jwt_audience=args.jwt_audience,
        jwt_jwks_uri=args.jwt_jwks_uri,
        jwt_role_mapping=parse_role_mapping(args.jwt_role_mapping),
        audit_enabled=args.control_plane_audit_enabled,
    )


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    discovery = _discovery_config(args)
    remove_unhealthy = args.remove_unhealthy_workers
    return GatewayConfig(
        host=args.host,
        port=args.port,
        worker_urls=tuple(args.worker_urls),
        policy=args.policy,
        prefill_policy=args.prefill_policy,
        decode_policy=args.decode_policy,
        cache_aware=CacheAwareConfig(
            cache_threshold=args.cache_threshold,
            balance_abs_threshold=args.balance_abs_threshold,
            balance_rel_threshold=args.balance_rel_threshold,
            eviction_interval_secs=args.eviction_interval_secs,
            max_tree_size=args.max_tree_size,
            block_chars=args.cache_block_chars,
            worker_kv_tokens=args.worker_kv_tokens,
            chars_per_token=args.cache_chars_per_token,
            queue_tokens=args.cache_queue_tokens,
            home_requests=args.cache_home_requests,
            max_share=args.cache_max_share,
            pending_prefill_weight=args.cache_pending_prefill_weight,
        ),
        pd_disaggregation=args.pd_disaggregation,
        prefill=_prefill_specs(args.prefill),
        decode=tuple(args.decode),
        dp_aware=args.dp_aware,
        max_payload_size=args.max_payload_size,
        request_timeout_secs=args.request_timeout_secs,
        http=HttpConfig(
            max_header_bytes=args.max_header_bytes,
            max_header_count=args.max_header_count,
            header_timeout_secs=args.client_header_timeout_secs,
            keepalive_timeout_secs=args.client_keepalive_timeout_secs,
            max_pipelined_requests=args.max_pipelined_requests,
            upstream_connect_timeout_secs=args.upstream_connect_timeout_secs,
            upstream_first_byte_timeout_secs=args.upstream_first_byte_timeout_secs,
            stream_idle_timeout_secs=args.stream_idle_timeout_secs,
            upstream_idle_timeout_secs=args.upstream_idle_timeout_secs,
        ),
        worker_startup_timeout_secs=args.worker_startup_timeout_secs,
        worker_startup_check_interval=args.worker_startup_check_interval,
        retry=RetryConfig(
            max_retries=args.retry_max_retries,
            initial_backoff_ms=args.retry_initial_backoff_ms,
            max_backoff_ms=args.retry_max_backoff_ms,
            backoff_multiplier=args.retry_backoff_multiplier,
            jitter_factor=args.retry_jitter_factor,
            disabled=args.disable_retries,
        ),
        circuit_breaker=CircuitBreakerConfig(
            failure_threshold=args.cb_failure_threshold,
            success_threshold=args.cb_success_threshold,
            timeout_secs=args.cb_timeout_duration_secs,
            window_secs=args.cb_window_duration_secs,
            disabled=args.disable_circuit_breaker,
        ),
        health_check=HealthCheckConfig(
            failure_threshold=args.health_failure_threshold,
            success_threshold=args.health_success_threshold,
            timeout_secs=args.health_check_timeout_secs,
            interval_secs=args.health_check_interval_secs,
            endpoint=args.health_check_endpoint,
            disabled=args.disable_health_check,
        ),
        remove_unhealthy_workers=discovery.enabled if remove_unhealthy is None else remove_unhealthy,
        discovery=discovery,
        tokenizer=TokenizerConfig(
            model_path=args.model_path,
            tokenizer_path=args.tokenizer_path,
            chat_template=args.chat_template,
            autoload=not args.disable_tokenizer_autoload,
        ),
        load_monitor_interval_secs=args.load_monitor_interval,
        max_concurrent_requests=args.max_concurrent_requests,
        queue_size=args.queue_size,
        queue_timeout_secs=args.queue_timeout_secs,
        api_key=args.api_key,
        auth=_auth_config(args),
        cors_allowed_origins=tuple(args.cors_allowed_origins),
        request_id_headers=tuple(h.lower() for h in args.request_id_headers),
        tls=TlsConfig(
            cert_path=args.tls_cert_path,
            key_path=args.tls_key_path,
            ca_cert_paths=tuple(args.ca_cert_paths),
            client_cert_path=args.client_cert_path,
            client_key_path=args.client_key_path,
        ),
        prometheus_host=args.prometheus_host,
        prometheus_port=args.prometheus_port,
        prometheus_duration_buckets=(
            tuple(args.prometheus_duration_buckets) if args.prometheus_duration_buckets else None
        ),
        log_level=args.log_level,
        log_dir=args.log_dir,
        log_json=args.log_json,
        shutdown_grace_period_secs=args.shutdown_grace_period_secs,
        shutdown_drain_window_secs=args.shutdown_drain_window_secs,
        engine_metrics_cache_secs=args.engine_metrics_cache_secs,
    ).validate()


def run_gateway(config: GatewayConfig) -> int:
    import uvloop

    from shepherd.gateway import Gateway
    from shepherd.observability.logging import setup_logging

    setup_logging(config.log_level, config.log_dir, config.log_json)
    uvloop.run(Gateway(config).serve_forever())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from shepherd.observability.sidecar import add_sidecar_arguments
    from shepherd.serve import add_serve_arguments
    from shepherd.sim.server import add_sim_arguments

    parser = argparse.ArgumentParser(prog="shepherd", description="Shepherd model gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    launch = sub.add_parser("launch", help="run the gateway in front of existing workers")
    add_gateway_arguments(launch)
    serve = sub.add_parser("serve", help="start workers (simulated, SGLang or vLLM) and the gateway in front")
    add_gateway_arguments(serve)
    add_serve_arguments(serve)
    sim = sub.add_parser("sim", help="run simulated SGLang workers")
    add_sim_arguments(sim)
    sidecar = sub.add_parser("metrics-sidecar", help="serve a gRPC engine's Prometheus multiprocess metrics")
    add_sidecar_arguments(sidecar)
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from shepherd.bench import register_benchmarks

    register_benchmarks(bench_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "launch":
            return run_gateway(config_from_args(args))
        if args.command == "serve":
            from shepherd.serve import run_serve

            return run_serve(args, config_from_args)
        if args.command == "sim":
            from shepherd.sim.server import run_sim

            return run_sim(args)
        if args.command == "metrics-sidecar":
            from shepherd.observability.sidecar import run_sidecar

            return run_sidecar(args)
        return args.run(args)
    except ConfigError as exc:
        parser.error(str(exc))
    return 2


if __name__ == "__main__":
    sys.exit(main())
