import pytest

from shepherd.cli import build_parser, config_from_args, duration
from shepherd.config import ConfigError


def parse(*argv):
    return config_from_args(build_parser().parse_args(["launch", *argv]))


def test_both_spellings_of_health_and_breaker_flags():
    a = parse("--health-check-interval-secs", "5", "--cb-failure-threshold", "4", "--health-check-endpoint", "/h")
    b = parse("--health-check-interval", "5s", "--circuit-breaker-threshold", "4", "--health-check-path", "/h")
    assert a.health_check == b.health_check and a.circuit_breaker == b.circuit_breaker
    assert a.health_check.interval_secs == 5.0 and a.circuit_breaker.failure_threshold == 4


def test_durations():
    assert duration("500ms") == 0.5 and duration("2m") == 120 and duration("3") == 3


def test_prefill_bootstrap_ports():
    config = parse(
        "--pd-disaggregation",
        "--prefill",
        "http://p1:8000",
        "9000",
        "--prefill",
        "http://p2:8000",
        "none",
        "--prefill",
        "http://p3:8000",
        "--decode",
        "http://d1:8000",
    )
    assert [(p.url, p.bootstrap_port) for p in config.prefill] == [
        ("http://p1:8000", 9000),
        ("http://p2:8000", None),
        ("http://p3:8000", None),
    ]
    assert config.decode == ("http://d1:8000",)


def test_invalid_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="--dp-aware requires --api-key"):
        parse("--dp-aware")
    with pytest.raises(ConfigError, match="need --pd-disaggregation"):
        parse("--decode", "http://d:1")
    with pytest.raises(ConfigError, match="worker URL"):
        parse("--worker-urls", "ftp://localhost:8000")


def test_bare_and_grpc_worker_urls_are_accepted():
    """A bare host:port is probed for HTTP and gRPC at registration; grpc:// URLs name gRPC workers."""
    config = parse("--worker-urls", "localhost:8000", "grpc://127.0.0.1:9000", "grpcs://gpu:9000")
    assert config.worker_urls == ("localhost:8000", "grpc://127.0.0.1:9000", "grpcs://gpu:9000")


def test_tokenizer_flags():
    config = parse("--model-path", "org/model", "--tokenizer-path", "/tok", "--chat-template", "/t.jinja")
    assert (config.tokenizer.model_path, config.tokenizer.tokenizer_path) == ("org/model", "/tok")
    assert config.tokenizer.chat_template == "/t.jinja" and config.tokenizer.autoload
    assert not parse("--disable-tokenizer-autoload").tokenizer.autoload


def test_secrets_are_redacted_from_config_view():
    assert parse("--api-key", "sekret").redacted()["api_key"] == "<redacted>"
