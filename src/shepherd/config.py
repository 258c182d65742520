"""One validated configuration object for the whole gateway.

`cli.py` turns SMG-compatible flags into a `GatewayConfig`; everything else reads only this object.
Defaults follow SMG 1.13 where the design documents disagree (see docs/configuration.md).
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import os
from dataclasses import dataclass, field

from shepherd.urls import display_url

POLICIES = ("random", "round_robin", "power_of_two", "cache_aware")
DEFAULT_REQUEST_ID_HEADERS = ("x-request-id", "x-correlation-id", "x-trace-id", "request-id")
STATIC_URL_SCHEMES = ("http://", "https://", "grpc://", "grpcs://")


class ConfigError(ValueError):
    """A flag value that cannot be used; the message names the flag."""


@dataclass(frozen=True, slots=True)
class PrefillSpec:
    url: str
    bootstrap_port: int | None = None


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_retries: int = 5  # total attempts, the first one included (SMG 1.13 semantics)
    initial_backoff_ms: int = 50
    max_backoff_ms: int = 30_000
    backoff_multiplier: float = 1.5
    jitter_factor: float = 0.2
    disabled: bool = False

    @property
    def max_attempts(self) -> int:
        return 1 if self.disabled else max(1, self.max_retries)


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    failure_threshold: int = 10
    success_threshold: int = 3
    timeout_secs: float = 60.0
    window_secs: float = 120.0
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    failure_threshold: int = 3
    success_threshold: int = 2
    timeout_secs: float = 5.0
    interval_secs: float = 60.0
    endpoint: str = "/health"
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """Limits and timeouts of the HTTP/1.1 data plane, both sides (docs/configuration.md)."""

    max_header_bytes: int = 65536  # request line + headers; more -> 431
    max_header_count: int = 128  # more -> 431
    header_timeout_secs: float = 10.0  # a client that has not sent its whole head by then is closed
    keepalive_timeout_secs: float = 75.0  # an idle client connection is closed after this
    max_pipelined_requests: int = 16  # queued behind the one being answered; more pauses reading the socket
    upstream_connect_timeout_secs: float = 10.0
    upstream_first_byte_timeout_secs: float | None = None  # None: bounded by --request-timeout-secs only
    stream_idle_timeout_secs: float = 300.0  # longest gap between two chunks of a worker's stream
    upstream_idle_timeout_secs: float = 4.0  # pooled worker connections are dropped before uvicorn's 5 s


@dataclass(frozen=True, slots=True)
class CacheAwareConfig:
    cache_threshold: float = 0.3  # SMG's flag, accepted; the cost model needs no match threshold (routing.md)
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_secs: float = 60.0
    max_tree_size: int = 2**26  # bytes of prefix index per model, over all workers (64 MiB)
    block_chars: int = 64  # index granularity near the start of a prompt (about one KV page)
    worker_kv_tokens: int = 0  # prefix-cache capacity of one worker; 0 = as reported (max_total_num_tokens)
    chars_per_token: float = 4.0  # converts KV tokens to indexed characters; high rather than low (routing.md)
    queue_tokens: float = 128.0  # prefill tokens one request in flight on a worker is worth in the cost model
    home_requests: float = 1.0  # queued requests a prompt's home may carry more, when the index knows nothing of it
    max_share: float = 1.3  # no worker takes more than this times the mean share of recent requests (0: no cap)
    pending_prefill_weight: float = 0.25  # per character a worker still prefills for requests sent to it


DISCOVERY_PROVIDERS = ("kubernetes", "file")


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Where discovered workers come from (see docs/discovery.md); `provider=None` turns discovery off."""

    provider: str | None = None
    selector: tuple[tuple[str, str], ...] = ()
    prefill_selector: tuple[tuple[str, str], ...] = ()
    decode_selector: tuple[tuple[str, str], ...] = ()
    namespace: str | None = None
    port: int = 80
    bootstrap_port_annotation: str = "sglang.ai/bootstrap-port"
    file: str | None = None
    check_interval_secs: float = 30.0

    @property
    def enabled(self) -> bool:
        return self.provider is not None


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    """Where the gateway gets tokenizers for gRPC workers (seed 002's tokenizer registry)."""

    model_path: str | None = None  # loaded at startup under this name; the fallback source for gRPC workers
    tokenizer_path: str | None = None  # overrides model_path as the startup source
    chat_template: str | None = None  # a template file used instead of the tokenizer directory's
    autoload: bool = True  # --disable-tokenizer-autoload: no startup load, no per-worker load


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Server TLS on the main port, and TLS/mTLS to `https://` and `grpcs://` workers (shepherd/tls.py)."""

    cert_path: str | None = None  # --tls-cert-path: PEM, the leaf first, then intermediates
    key_path: str | None = None  # --tls-key-path: its unencrypted PEM key
    ca_cert_paths: tuple[str, ...] = ()  # trusted for workers in addition to the system roots
    client_cert_path: str | None = None  # presented to workers (mTLS)
    client_key_path: str | None = None

    @property
    def to_workers(self) -> bool:
        """Whether worker connections need more than the default verification against the system roots."""
        return bool(self.ca_cert_paths or self.client_cert_path)

    def validate(self) -> None:
        """Pairs are complete and every file loads, so a bad path fails at startup, not at the first connection."""
        from shepherd.tls import server_context, worker_context

        pairs = (
            ("--tls-cert-path and --tls-key-path", self.cert_path, self.key_path),
            ("--client-cert-path and --client-key-path", self.client_cert_path, self.client_key_path),
        )
        for flags, cert, key in pairs:
            if bool(cert) != bool(key):
                raise ConfigError(f"{flags} go together: give both or neither")
        if self.cert_path and self.key_path:
            server_context(self.cert_path, self.key_path)
        worker_context(self)


CONTROL_PLANE_ROLES = ("admin", "user")


@dataclass(frozen=True, slots=True)
class ControlPlaneKey:
    """One `--control-plane-api-keys id:name:role:key` entry."""

    id: str
    name: str
    role: str
    key: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Control-plane credentials and audit (docs/security.md). `--api-key` stays on GatewayConfig (SMG's meaning)."""

    control_plane_api_keys: tuple[ControlPlaneKey, ...] = ()
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_jwks_uri: str | None = None  # None: discovered from the issuer's .well-known/openid-configuration
    jwt_role_mapping: tuple[tuple[str, str], ...] = ()  # (idp_role, gateway_role); empty: admin=admin, user=user
    audit_enabled: bool = False

    @property
    def jwt_enabled(self) -> bool:
        return self.jwt_issuer is not None

    @property
    def control_plane_protected(self) -> bool:
        """Whether control-plane credentials are configured: the control plane then takes only those."""
        return bool(self.control_plane_api_keys) or self.jwt_enabled

    def validate(self) -> None:
        if not self.jwt_enabled:
            if self.jwt_audience or self.jwt_jwks_uri or self.jwt_role_mapping:
                raise ConfigError("--jwt-audience, --jwt-jwks-uri and --jwt-role-mapping need --jwt-issuer")
            return
        if not self.jwt_audience:
            raise ConfigError("--jwt-issuer needs --jwt-audience (tokens for other audiences must be refused)")
        for flag, url in (("--jwt-issuer", self.jwt_issuer), ("--jwt-jwks-uri", self.jwt_jwks_uri)):
            if url is not None and not url.startswith(("https://", "http://")):
                raise ConfigError(f"{flag} must be an http:// or https:// URL, got {url!r}")

    def redacted(self) -> dict:
        data = dataclasses.asdict(self)
        for key in data["control_plane_api_keys"]:
            key["key"] = "<redacted>"
        return data


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str = "0.0.0.0"
    port: int = 30000
    worker_urls: tuple[str, ...] = ()
    policy: str = "cache_aware"
    prefill_policy: str | None = None
    decode_policy: str | None = None
    cache_aware: CacheAwareConfig = field(default_factory=CacheAwareConfig)

    pd_disaggregation: bool = False
    prefill: tuple[PrefillSpec, ...] = ()
    decode: tuple[str, ...] = ()
    dp_aware: bool = False

    max_payload_size: int = 512 * 1024 * 1024
    request_timeout_secs: float = 1800.0
    http: HttpConfig = field(default_factory=HttpConfig)
    worker_startup_timeout_secs: float = 1800.0
    worker_startup_check_interval: float = 30.0
    drain_timeout_secs: float = 5.0

    retry: RetryConfig = field(default_factory=RetryConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    remove_unhealthy_workers: bool = False
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    load_monitor_interval_secs: float = 10.0

    max_concurrent_requests: int = -1  # -1: max(4096, 1024 * cores); 0: unlimited
    queue_size: int = 100
    queue_timeout_secs: float = 60.0

    api_key: str | None = None
    auth: AuthConfig = field(default_factory=AuthConfig)
    cors_allowed_origins: tuple[str, ...] = ()
    request_id_headers: tuple[str, ...] = DEFAULT_REQUEST_ID_HEADERS
    tls: TlsConfig = field(default_factory=TlsConfig)

    prometheus_host: str = "0.0.0.0"
    prometheus_port: int = 29000
    prometheus_duration_buckets: tuple[float, ...] | None = None  # None: the SMG defaults (metrics.py)
    log_level: str = "info"
    log_dir: str | None = None
    log_json: bool = False
    shutdown_grace_period_secs: float = 180.0
    shutdown_drain_window_secs: float | None = None  # None: min(grace period / 2, 5 s), as SMG
    engine_metrics_cache_secs: float = 2.0  # /engine_metrics answers from one scrape for this long

    @property
    def drain_window_secs(self) -> float:
        """After SIGTERM: how long readiness answers 503 while new requests are still accepted and served."""
        if self.shutdown_drain_window_secs is not None:
            return self.shutdown_drain_window_secs
        return min(self.shutdown_grace_period_secs / 2, 5.0)

    @property
    def concurrency_limit(self) -> int:
        """Effective admission limit; 0 means unlimited."""
        if self.max_concurrent_requests < 0:
            return max(4096, 1024 * (os.cpu_count() or 1))
        return self.max_concurrent_requests

    def validate(self) -> GatewayConfig:
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for flag, value in (("--prefill-policy", self.prefill_policy), ("--decode-policy", self.decode_policy)):
            if value is not None and value not in POLICIES:
                raise ConfigError(f"{flag} must be one of {', '.join(POLICIES)}, got {value!r}")
        for url in (*self.worker_urls, *(p.url for p in self.prefill), *self.decode):
            if "://" in url and not url.startswith(STATIC_URL_SCHEMES):
                raise ConfigError(
                    f"worker URL {display_url(url)!r} must start with http://, https://, grpc:// or grpcs:// (or be "
                    "a bare host:port, probed for both HTTP and gRPC)"
                )
        if self.load_monitor_interval_secs <= 0:
            raise ConfigError("--load-monitor-interval must be > 0")
        if self.drain_window_secs < 0 or not 0 <= self.engine_metrics_cache_secs <= 5:
            raise ConfigError("--shutdown-drain-window-secs must be >= 0 and --engine-metrics-cache-secs in [0, 5]")
        if self.pd_disaggregation and self.worker_urls:
            raise ConfigError("--worker-urls cannot be combined with --pd-disaggregation; use --prefill/--decode")
        if not self.pd_disaggregation and (self.prefill or self.decode):
            raise ConfigError("--prefill/--decode need --pd-disaggregation")
        if self.dp_aware and not self.api_key:
            raise ConfigError("--dp-aware requires --api-key (it authenticates the gateway to the workers)")
        if self.cache_aware.balance_rel_threshold < 1.0:
            raise ConfigError("--balance-rel-threshold must be >= 1.0")
        if not 0.0 <= self.cache_aware.cache_threshold <= 1.0:
            raise ConfigError("--cache-threshold must be between 0 and 1")
        ca = self.cache_aware
        if ca.max_tree_size < 1 or ca.block_chars < 1 or ca.worker_kv_tokens < 0 or ca.eviction_interval_secs <= 0:
            raise ConfigError(
                "--max-tree-size and --cache-block-chars must be >= 1, --worker-kv-tokens >= 0, "
                "--eviction-interval-secs > 0"
            )
        if not ca.queue_tokens >= 0 or not ca.home_requests >= 0 or not ca.pending_prefill_weight >= 0:
            raise ConfigError(
                "--cache-queue-tokens, --cache-home-requests and --cache-pending-prefill-weight must be >= 0"
            )
        if not ca.chars_per_token > 0:
            raise ConfigError("--cache-chars-per-token must be > 0")
        if not (ca.max_share == 0 or ca.max_share >= 1):
            raise ConfigError("--cache-max-share must be 0 (no cap) or >= 1")
        hc = self.health_check
        if hc.failure_threshold < 1 or hc.success_threshold < 1:
            raise ConfigError("--health-failure-threshold and --health-success-threshold must be >= 1")
        if hc.interval_secs <= 0 or hc.timeout_secs <= 0:
            raise ConfigError("health check interval and timeout must be > 0")
        if not hc.endpoint.startswith("/"):
            raise ConfigError("--health-check-endpoint must start with '/'")
        cb = self.circuit_breaker
        if cb.failure_threshold < 1 or cb.success_threshold < 1 or cb.timeout_secs <= 0 or cb.window_secs <= 0:
            raise ConfigError("circuit breaker thresholds must be >= 1 and durations > 0")
        if self.retry.backoff_multiplier < 1.0 or not 0.0 <= self.retry.jitter_factor <= 1.0:
            raise ConfigError("--retry-backoff-multiplier must be >= 1 and --retry-jitter-factor in [0, 1]")
        if self.max_payload_size <= 0 or self.request_timeout_secs <= 0:
            raise ConfigError("--max-payload-size and --request-timeout-secs must be > 0")
        h = self.http
        if h.max_header_bytes < 1024 or h.max_header_count < 8 or h.max_pipelined_requests < 1:
            raise ConfigError("--max-header-bytes >= 1024, --max-header-count >= 8, --max-pipelined-requests >= 1")
        timeouts = (h.header_timeout_secs, h.keepalive_timeout_secs, h.upstream_connect_timeout_secs)
        timeouts += (h.stream_idle_timeout_secs, h.upstream_idle_timeout_secs, h.upstream_first_byte_timeout_secs or 1)
        if min(timeouts) <= 0:
            raise ConfigError("HTTP timeouts must be > 0")
        if self.queue_size < 0 or self.queue_timeout_secs <= 0:
            raise ConfigError("--queue-size must be >= 0 and --queue-timeout-secs > 0")
        if not self.request_id_headers:
            raise ConfigError("--request-id-headers needs at least one header name")
        buckets = self.prometheus_duration_buckets
        if buckets is not None and (
            not buckets or buckets[0] <= 0 or any(a >= b for a, b in itertools.pairwise(buckets))
        ):
            raise ConfigError("--prometheus-duration-buckets must be positive and strictly increasing")
        self._validate_discovery()
        self.tls.validate()
        self.auth.validate()
        if self.api_key is not None and any(
            hmac.compare_digest(key.key.encode(), self.api_key.encode()) for key in self.auth.control_plane_api_keys
        ):
            raise ConfigError(
                "--api-key must differ from every --control-plane-api-keys key: the data-plane key is sent to "
                "workers and held by every client, so it must not also change the fleet"
            )
        return self

    def _validate_discovery(self) -> None:
        sd = self.discovery
        if sd.provider is None:
            return
        if sd.provider not in DISCOVERY_PROVIDERS:
            raise ConfigError(f"--discovery-provider must be one of {', '.join(DISCOVERY_PROVIDERS)}")
        if sd.check_interval_secs <= 0:
            raise ConfigError("--discovery-check-interval-secs must be > 0")
        if sd.provider == "file":
            if not sd.file:
                raise ConfigError("--discovery-provider file needs --discovery-file PATH")
            return
        if not 0 < sd.port < 65536:
            raise ConfigError("--service-discovery-port must be a port number")
        if self.pd_disaggregation:
            if not (sd.prefill_selector or sd.decode_selector):
                raise ConfigError("--pd-disaggregation discovery needs --prefill-selector and/or --decode-selector")
        elif not sd.selector:
            raise ConfigError("--service-discovery needs --selector key=value (an empty selector matches no pod)")

    def redacted(self) -> dict:
        """The effective configuration as JSON-ready data, secrets replaced."""
        data = dataclasses.asdict(self)
        if data["api_key"]:
            data["api_key"] = "<redacted>"
        data["worker_urls"] = [display_url(url) for url in self.worker_urls]
        data["decode"] = [display_url(url) for url in self.decode]
        for prefill in data["prefill"]:
            prefill["url"] = display_url(prefill["url"])
        data["auth"] = self.auth.redacted()
        return data
