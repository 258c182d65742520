"""Parsing the worker manifest of the file provider."""

from __future__ import annotations

import pytest

from shepherd.discovery.file import ManifestError, parse_manifest
from shepherd.workers.worker import WorkerType


def test_versioned_json_manifest_with_every_field():
    specs = parse_manifest(
        b"""{"version": 1, "workers": [
            {"url": "http://10.0.0.1:8000/", "worker_type": "prefill", "bootstrap_port": 8998,
             "api_key": "secret", "labels": {"zone": "a", "gpu": 8}},
            {"url": "http://10.0.0.2:8000", "worker_type": "decode"}
        ]}"""
    )
    prefill, decode = specs
    assert prefill.url == "http://10.0.0.1:8000"  # normalized like POST /workers
    assert prefill.worker_type is WorkerType.PREFILL and prefill.bootstrap_port == 8998
    assert prefill.api_key == "secret" and prefill.labels == {"zone": "a", "gpu": "8"}
    assert prefill.source == "file"
    assert decode.worker_type is WorkerType.DECODE and decode.bootstrap_port is None


def test_bare_yaml_list_and_plain_url_entries():
    specs = parse_manifest(
        b"""
# workers on the batch cluster
- url: http://node-1:30000
  labels: {rack: r1}
- http://node-2:30000
"""
    )
    assert [s.url for s in specs] == ["http://node-1:30000", "http://node-2:30000"]
    assert specs[0].labels == {"rack": "r1"}


def test_gateway_api_key_is_the_default_for_entries_without_one():
    specs = parse_manifest(b'[{"url": "http://a:1"}, {"url": "http://b:1", "api_key": "own"}]', "gateway-key")
    assert [s.api_key for s in specs] == ["gateway-key", "own"]


def test_an_empty_list_means_no_workers():
    assert parse_manifest(b"[]") == []
    assert parse_manifest(b"version: 1\nworkers: []\n") == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b"", "expected a list"),  # an empty (e.g. truncated) file is not "no workers"
        (b"{not json: [", "neither JSON nor YAML"),
        (b'{"version": 2, "workers": []}', "unsupported manifest version"),
        (b'{"workers": "http://a:1"}', "expected a list"),
        (b'[{"url": "ftp://a:1"}]', "workers[0]"),
        (b'[{"url": "http://a:1"}, {"worker_type": "decode"}]', "workers[1]"),
        (b'[{"url": "http://a:1", "worker_type": "encoder"}]', "worker_type"),
        (b'[{"url": "http://a:1", "bootstrap_port": 70000}]', "bootstrap_port"),
        (b'[{"url": "http://a:1"}, {"url": "http://a:1/"}]', "listed twice"),
        (b"[3]", "workers[0]"),
    ],
)
def test_malformed_manifests_are_rejected_whole(text, problem):
    with pytest.raises(ManifestError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        parse_manifest(text)
