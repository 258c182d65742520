"""Engine metrics logic: the sidecar address of gRPC workers, scrape targets, and merging expositions."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shepherd.config import CircuitBreakerConfig
from shepherd.observability.engine_metrics import ScrapeTarget, scrape_targets
from shepherd.observability.exposition import merge_expositions
from shepherd.observability.sidecar_address import canonical_address, sidecar_metrics_url, sidecar_port
from shepherd.workers.breaker import CircuitBreaker
from shepherd.workers.worker import Worker


# --- the sidecar address --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("grpc_port", "expected"),
    [(1, 10001), (50051, 60051), (55535, 65535), (55536, 45536), (60000, 50000), (65535, 55535)],
)
def test_sidecar_port_adds_10000_or_subtracts_past_65535(grpc_port, expected):
    assert sidecar_port(grpc_port) == expected


@pytest.mark.parametrize("bad", [0, -1, 65536, 70000])
def test_sidecar_port_rejects_non_ports(bad):
    with pytest.raises(ValueError):
        sidecar_port(bad)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("grpc://10.0.0.7:50051", "http://10.0.0.7:60051/metrics"),
        ("grpc://worker-0.ns.svc:65535", "http://worker-0.ns.svc:55535/metrics"),
        ("grpc://127.0.0.1:55536/", "http://127.0.0.1:45536/metrics"),
        ("grpcs://secure:8443", "http://secure:18443/metrics"),  # the sidecar is plain HTTP either way
        ("grpc://[::1]:50051", "http://[::1]:60051/metrics"),
        ("grpc://[2001:db8::5]:60000", "http://[2001:db8::5]:50000/metrics"),
        ("grpc://host:50051@0", "http://host:60051/metrics"),
        ("grpc://[::1]:65535@12", "http://[::1]:55535/metrics"),
    ],
)
def test_sidecar_metrics_url(url, expected):
    assert sidecar_metrics_url(url) == expected


@pytest.mark.parametrize("bad", ["http://host:8000", "grpc://host", "grpc://host:0", "grpc://host:99999", "host:1"])
def test_sidecar_metrics_url_rejects_what_has_no_sidecar(bad):
    with pytest.raises(ValueError):
        sidecar_metrics_url(bad)


def test_canonical_address_strips_rank_and_slash_only():
    assert canonical_address("grpc://h:1@3") == "grpc://h:1"
    assert canonical_address("http://h:1/") == "http://h:1"
    assert canonical_address("http://user@h:1") == "http://user@h:1"


# --- scrape targets --------------------------------------------------------------------------------------------
def worker(url: str, base_url: str | None = None, api_key: str | None = None, rank: int | None = None) -> Worker:
    return Worker(
        url, CircuitBreaker(CircuitBreakerConfig()), base_url=base_url, api_key=api_key, dp_rank=rank, dp_size=2
    )


def test_targets_deduplicate_dp_ranks_and_grpc_sidecars_and_keep_keys_per_worker():
    workers = [
        worker("http://a:8000@0", "http://a:8000", api_key="key-a", rank=0),
        worker("http://a:8000@1", "http://a:8000", api_key="key-a", rank=1),
        worker("http://b:8000"),
        worker("grpc://g:50051@0", "grpc://g:50051", api_key="grpc-key", rank=0),
        worker("grpc://g:50051@1", "grpc://g:50051", api_key="grpc-key", rank=1),
        worker("grpc://[::1]:60000", api_key="grpc-key"),
    ]
    assert scrape_targets(workers, gateway_api_key="gw-key") == [
        ScrapeTarget("http://a:8000/metrics", "http://a:8000", "key-a"),
        ScrapeTarget("http://b:8000/metrics", "http://b:8000", "gw-key"),
        ScrapeTarget("http://g:60051/metrics", "grpc://g:50051", None),
        ScrapeTarget("http://[::1]:50000/metrics", "grpc://[::1]:60000", None),
    ]


def test_targets_without_any_key_send_none():
    assert scrape_targets([worker("http://b:8000")], gateway_api_key=None)[0].api_key is None


# --- merging ---------------------------------------------------------------------------------------------------
ENGINE_A = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",engine_type="unified"} 3.0
# HELP sglang:prompt_tokens Number of prefill tokens processed.
# TYPE sglang:prompt_tokens counter
sglang:prompt_tokens_total{model_name="m"} 120.0
# HELP sglang:e2e_request_latency_seconds Histogram of end-to-end latency.
# TYPE sglang:e2e_request_latency_seconds histogram
sglang:e2e_request_latency_seconds_bucket{le="0.1",model_name="m"} 1.0
sglang:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 4.0
sglang:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 5.0
sglang:e2e_request_latency_seconds_sum{model_name="m"} 7.5
sglang:e2e_request_latency_seconds_count{model_name="m"} 5.0
"""
ENGINE_B = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="m"} 1
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="m"} 30
# TYPE sglang:e2e_request_latency_seconds histogram
sglang:e2e_request_latency_seconds_bucket{model_name="m",le="0.1"} 0
sglang:e2e_request_latency_seconds_bucket{model_name="m",le="1.0"} 2
sglang:e2e_request_latency_seconds_bucket{model_name="m",le="+Inf"} 2
sglang:e2e_request_latency_seconds_sum{model_name="m"} 0.9
sglang:e2e_request_latency_seconds_count{model_name="m"} 2
untyped_thing{x="1"} 42 1700000000000
"""


def parse(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_merge_keeps_one_help_and_type_per_family_and_labels_every_sample():
    merged = merge_expositions([("http://a:1", ENGINE_A), ("grpc://b:2", ENGINE_B)], header=["scraped 2 of 2"])
    text = merged.text
    assert text.startswith("# scraped 2 of 2\n")
    assert text.count("# TYPE sglang:num_running_reqs gauge") == 1
    assert text.count("# HELP sglang:num_running_reqs ") == 1
    assert text.count("# TYPE sglang:prompt_tokens_total counter") == 1  # `x` with `x_total` samples renamed
    assert text.count("# TYPE sglang:e2e_request_latency_seconds histogram") == 1
    families = parse(text)
    running = {s.labels["worker_addr"]: s.value for s in families["sglang:num_running_reqs"].samples}
    assert running == {"http://a:1": 3.0, "grpc://b:2": 1.0}
    assert families["sglang:prompt_tokens"].type == "counter"
    tokens = {s.labels["worker_addr"]: s.value for s in families["sglang:prompt_tokens"].samples}
    assert tokens == {"http://a:1": 120.0, "grpc://b:2": 30.0}
    for sample in (s for f in families.values() for s in f.samples):
        assert "worker_addr" in sample.labels
    assert families["untyped_thing"].samples[0].timestamp == 1700000000


def test_merged_histograms_stay_intact_per_source():
    families = parse(merge_expositions([("a", ENGINE_A), ("b", ENGINE_B)]).text)
    histogram = families["sglang:e2e_request_latency_seconds"]
    assert histogram.type == "histogram"
    by_source: dict[str, dict[str, float]] = {}
    for s in histogram.samples:
        key = s.name.rsplit("_", 1)[-1] + (s.labels.get("le", ""))
        by_source.setdefault(s.labels["worker_addr"], {})[key] = s.value
    assert by_source["a"] == {"bucket0.1": 1, "bucket1.0": 4, "bucket+Inf": 5, "sum": 7.5, "count": 5}
    assert by_source["b"] == {"bucket0.1": 0, "bucket1.0": 2, "bucket+Inf": 2, "sum": 0.9, "count": 2}
    # the family's samples are contiguous and `le` comes last in each label set, as SMG renders it
    lines = [ln for ln in merge_expositions([("a", ENGINE_A)]).text.splitlines() if "_bucket" in ln]
    assert lines[0] == 'sglang:e2e_request_latency_seconds_bucket{model_name="m",worker_addr="a",le="0.1"} 1.0'


def test_merge_drops_bad_lines_and_conflicting_types_and_overrides_worker_addr():
    bad = """\
# TYPE sglang:num_running_reqs counter
sglang:num_running_reqs 9
this is not a sample
broken{label="unterminated} 1
nan_value{a="1"} not-a-number
escaped{path="C:\\\\dir \\"quoted\\"",worker_addr="spoofed"} 2
"""
    merged = merge_expositions([("a", ENGINE_A), ("b", bad)])
    assert merged.dropped_lines == 4  # three malformed lines and b's counter that a declared a gauge
    families = parse(merged.text)
    assert [s.labels["worker_addr"] for s in families["sglang:num_running_reqs"].samples] == ["a"]
    (escaped,) = families["escaped"].samples
    assert escaped.labels == {"path": 'C:\\dir "quoted"', "worker_addr": "b"}


def test_merge_of_nothing_is_empty_and_addresses_are_escaped():
    assert merge_expositions([]).text == ""
    families = parse(merge_expositions([('we"ird', "up 1\n")]).text)
    assert families["up"].samples[0].labels == {"worker_addr": 'we"ird'}
