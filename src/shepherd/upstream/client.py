"""The aiohttp client for calls off the request path (probes, registration, discovery, admin fan-out).

The request path itself goes through upstream/pool.py.
"""

from __future__ import annotations

import ssl

import aiohttp


class UpstreamClient:
    """One connection pool for all workers; created inside the running event loop.

    `ssl_context` (shepherd/tls.py) verifies `https://` workers and carries the client certificate; None keeps
    aiohttp's default verification against the system roots.
    """

    def __init__(self, connect_timeout_secs: float = 10.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self._connect_timeout = connect_timeout_secs
        self._ssl: ssl.SSLContext | bool = ssl_context or True
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True, ssl=self._ssl)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
