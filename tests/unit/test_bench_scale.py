"""`shepherd bench scale`'s fleet of loopback addresses and its gateway templates."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import pytest

from shepherd.bench.scale import SHEPHERD, gateways_from_args, loopback_urls, with_policy


def test_loopback_urls_are_distinct_loopback_hosts_on_one_port():
    urls = loopback_urls(4000, 30000)
    assert len(set(urls)) == 4000 and urls[0] == "http://127.0.0.1:30000"
    for url in urls:
        parts = urlsplit(url)
        address = ipaddress.ip_address(parts.hostname)
        assert address.is_loopback and parts.port == 30000 and str(address).split(".")[-1] not in ("0", "255")
    with pytest.raises(ValueError):
        loopback_urls(254 * 65536 + 1, 1)


def test_templates_must_place_the_policy():
    smg = "smg=smg launch --port {port} --worker-urls {worker_urls} --policy {policy}"
    shepherd, other = gateways_from_args([smg])
    assert shepherd.name == SHEPHERD and other.name == "smg"
    assert with_policy(other, "cache_aware").argv(1, 2, ["http://w"])[-2:] == ["--policy", "cache_aware"]
    with pytest.raises(ValueError, match="policy"):
        gateways_from_args(["smg=smg launch --port {port} --worker-urls {worker_urls}"])
