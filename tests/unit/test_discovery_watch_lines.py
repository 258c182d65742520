"""Splitting a watch stream into lines, whatever the line size and the chunking."""

from __future__ import annotations

import io

import orjson
from urllib3 import HTTPResponse

from shepherd.discovery.kube_watch import iter_lines


def response(data: bytes) -> HTTPResponse:
    return HTTPResponse(body=io.BytesIO(data), preload_content=False)


def test_lines_larger_than_the_chunk_and_than_512_kib_arrive_whole():
    big = orjson.dumps({"type": "ADDED", "object": {"metadata": {"annotations": {"a": "x" * 700_000}}}})
    small = b'{"type":"BOOKMARK"}'
    data = small + b"\n" + big + b"\n" + small + b"\n"
    for chunk in (1000, 4096, 64 * 1024, len(data)):
        assert list(iter_lines(response(data), chunk)) == [small, big, small]


def test_newlines_split_across_any_chunk_boundary():
    data = b'{"a":1}\n{"bb":22}\n{"ccc":333}\n'
    for chunk in range(1, len(data) + 1):
        assert list(iter_lines(response(data), chunk)) == [b'{"a":1}', b'{"bb":22}', b'{"ccc":333}']


def test_blank_lines_are_skipped_and_a_trailing_partial_line_is_not_an_event():
    assert list(iter_lines(response(b'\n{"a":1}\n\n{"b":2}\n{"trunc'), 5)) == [b'{"a":1}', b'{"b":2}']
