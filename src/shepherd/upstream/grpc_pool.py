"""gRPC worker URLs and the per-worker client pool, without importing grpc until a gRPC worker appears.

HTTP-only gateways never load grpc, protobuf or the SGLang stubs (`upstream/grpc_client.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from shepherd.upstream.grpc_client import SglangClient

GRPC_SCHEMES = ("grpc://", "grpcs://")


def is_grpc_url(url: str) -> bool:
    return url.startswith(GRPC_SCHEMES)


def grpc_target(url: str) -> str:
    """`host:port` (IPv6 hosts in brackets) from a `grpc://` or `grpcs://` URL."""
    return urlsplit(url).netloc


@dataclass(frozen=True, slots=True)
class GrpcTls:
    """PEM arguments of `grpc.ssl_channel_credentials` for `grpcs://` channels (built by shepherd/tls.py).

    `root_certificates` None: gRPC's default roots; `private_key` and `certificate_chain`: the client certificate.
    """

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None


class GrpcClients:
    """One `SglangClient` per base URL (DP ranks of one engine share it), closed when the engine leaves."""

    def __init__(self, tls: GrpcTls | None = None) -> None:
        self._clients: dict[str, SglangClient] = {}
        self._tls = tls

    def get(self, url: str, api_key: str | None = None) -> SglangClient:
        """The client of `url`, sending `api_key`: the channel is per URL, the key per call (it may change)."""
        client = self._clients.get(url)
        if client is None:
            from shepherd.upstream.grpc_client import SglangClient

            client = self._clients[url] = SglangClient(url, api_key, self._tls)
        elif client.api_key != api_key:
            client.set_api_key(api_key)
        return client

    async def discard(self, url: str) -> None:
        client = self._clients.pop(url, None)
        if client is not None:
            await client.close()

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()
