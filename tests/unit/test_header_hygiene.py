from multidict import CIMultiDict, CIMultiDictProxy

from shepherd.upstream.headers import relay_response_headers, request_lines, response_lines


def proxy(*pairs):
    return CIMultiDictProxy(CIMultiDict(pairs))


def lines(block: bytes) -> list[bytes]:
    return [line for line in block.split(b"\r\n") if line]


def test_hop_by_hop_and_connection_listed_headers_are_not_relayed_by_the_admin_client():
    upstream = proxy(
        ("Content-Type", "application/json"), ("Content-Length", "10"), ("Transfer-Encoding", "chunked"),
        ("Connection", "keep-alive, X-Worker-Hop"), ("X-Worker-Hop", "1"), ("X-Kept", "yes"),
    )  # fmt: skip
    relayed = relay_response_headers(upstream, {"x-request-id": "r1"})
    assert dict(relayed) == {"Content-Type": "application/json", "X-Kept": "yes", "x-request-id": "r1"}


def test_a_worker_answer_keeps_end_to_end_headers_only():
    worker = [
        (b"Content-Type", b"application/json"), (b"Content-Length", b"10"), (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"keep-alive, X-Worker-Hop"), (b"X-Worker-Hop", b"1"), (b"Keep-Alive", b"timeout=5"),
        (b"Upgrade", b"h2c"), (b"Proxy-Authenticate", b"Basic"), (b"X-Request-Id", b"theirs"), (b"X-Kept", b"yes"),
    ]  # fmt: skip
    assert lines(response_lines(worker)) == [b"Content-Type: application/json", b"X-Kept: yes"]


def test_credentials_to_a_worker():
    client = [(b"authorization", b"Bearer client"), (b"cookie", b"c=1"), (b"traceparent", b"00-abc")]
    keyed = lines(request_lines(client, "r", "worker-key"))
    assert b"authorization: Bearer worker-key" in keyed and b"authorization: Bearer client" not in keyed
    plain = lines(request_lines(client, "r", None))
    assert b"authorization: Bearer client" in plain and b"traceparent: 00-abc" in plain
    assert not any(line.startswith(b"cookie") for line in plain)
    assert b"x-request-id: r" in plain
    url_credentials = lines(request_lines(client, "r", None, forward_client_auth=False))
    assert not any(line.startswith(b"authorization") for line in url_credentials)
