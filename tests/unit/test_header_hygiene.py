from multidict import CIMultiDict, CIMultiDictProxy

from shepherd.upstream.client import forward_request_headers, relay_response_headers


def proxy(*pairs):
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_hop_by_hop_and_connection_listed_headers_are_not_relayed():
    upstream = proxy(
        ("Content-Type", "application/json"), ("Content-Length", "10"), ("Transfer-Encoding", "chunked"),
        ("Connection", "keep-alive, X-Worker-Hop"), ("X-Worker-Hop", "1"), ("X-Kept", "yes"),
    )  # fmt: skip
    relayed = relay_response_headers(upstream, {"x-request-id": "r1"})
    assert dict(relayed) == {"Content-Type": "application/json", "X-Kept": "yes", "x-request-id": "r1"}


def test_credentials_to_a_worker():
    client = proxy(("Authorization", "Bearer client"), ("Cookie", "c=1"), ("traceparent", "00-abc"))
    assert forward_request_headers(client, "r", "worker-key", "gw-key")["Authorization"] == "Bearer worker-key"
    assert forward_request_headers(client, "r", None, "gw-key")["Authorization"] == "Bearer gw-key"
    plain = forward_request_headers(client, "r", None, None)
    assert plain["Authorization"] == "Bearer client" and plain["traceparent"] == "00-abc" and "Cookie" not in plain
