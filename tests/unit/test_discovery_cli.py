"""Service discovery flags -> DiscoveryConfig, with SMG's defaults and the combinations that are refused."""

from __future__ import annotations

import pytest

from shepherd.cli import build_parser, config_from_args
from shepherd.config import ConfigError


def parse(*argv: str):
    return config_from_args(build_parser().parse_args(["launch", *argv]))


def test_kubernetes_flags_and_defaults():
    config = parse("--service-discovery", "--selector", "app=sglang", "env=prod", "--service-discovery-namespace", "ml")
    sd = config.discovery
    assert sd.provider == "kubernetes" and sd.enabled
    assert sd.selector == (("app", "sglang"), ("env", "prod"))
    assert sd.namespace == "ml"
    assert sd.port == 80
    assert sd.bootstrap_port_annotation == "sglang.ai/bootstrap-port"
    assert sd.check_interval_secs == 30


def test_provider_flag_is_the_other_spelling_of_service_discovery():
    a = parse("--service-discovery", "--selector", "app=w", "--service-discovery-port", "8000")
    b = parse("--discovery-provider", "kubernetes", "--selector", "app=w", "--service-discovery-port", "8000")
    assert a.discovery == b.discovery


def test_pd_selectors_and_annotation():
    sd = parse(
        "--pd-disaggregation",
        "--service-discovery",
        "--prefill-selector",
        "app=sglang",
        "role=prefill",
        "--decode-selector",
        "app=sglang",
        "role=decode",
        "--bootstrap-port-annotation",
        "example.com/bootstrap",
    ).discovery
    assert sd.prefill_selector == (("app", "sglang"), ("role", "prefill"))
    assert sd.decode_selector == (("app", "sglang"), ("role", "decode"))
    assert sd.bootstrap_port_annotation == "example.com/bootstrap"


def test_file_provider_flags():
    sd = parse(
        "--discovery-provider", "file", "--discovery-file", "/etc/w.yaml", "--discovery-check-interval-secs", "2"
    ).discovery
    assert (sd.provider, sd.file, sd.check_interval_secs) == ("file", "/etc/w.yaml", 2.0)


def test_remove_unhealthy_workers_defaults_on_only_under_discovery():
    assert parse().remove_unhealthy_workers is False
    assert parse("--service-discovery", "--selector", "app=w").remove_unhealthy_workers is True
    assert parse("--discovery-provider", "file", "--discovery-file", "m.json").remove_unhealthy_workers is True
    explicit = parse("--service-discovery", "--selector", "app=w", "--no-remove-unhealthy-workers")
    assert explicit.remove_unhealthy_workers is False
    assert parse("--remove-unhealthy-workers").remove_unhealthy_workers is True


def test_discovery_off_by_default():
    assert not parse().discovery.enabled


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--service-discovery"], "needs --selector"),
        (["--pd-disaggregation", "--service-discovery", "--selector", "app=w"], "--prefill-selector"),
        (["--discovery-provider", "file"], "--discovery-file"),
        (["--service-discovery", "--discovery-provider", "file", "--discovery-file", "m"], "conflicts"),
        (["--service-discovery", "--selector", "app=w", "--service-discovery-port", "0"], "port"),
        (["--discovery-provider", "file", "--discovery-file", "m", "--discovery-check-interval-secs", "0"], "> 0"),
    ],
)
def test_refused_combinations(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


def test_malformed_selector_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["launch", "--service-discovery", "--selector", "app"])
    assert "invalid selector" in capsys.readouterr().err
