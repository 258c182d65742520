"""TLS: the main port's certificate (reloaded on SIGHUP) and the trust and client certificate for workers.

Every connection the gateway opens to an `https://` worker (inference, probes, registration, admin fan-out,
`/engine_metrics`) uses the one context of `worker_context`; every `grpcs://` channel uses `grpc_tls`. Both trust
the system roots plus `--ca-cert-paths`, and present `--client-cert-path` when given. See docs/security.md.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

from shepherd.config import ConfigError, TlsConfig
from shepherd.upstream.grpc_pool import GrpcTls

log = logging.getLogger(__name__)

SERVER_FLAGS = "--tls-cert-path/--tls-key-path"
CLIENT_FLAGS = "--client-cert-path/--client-key-path"


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise ConfigError("the private key is encrypted; give an unencrypted PEM key")


def _check_file(flag: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"{flag}: no such file: {path}")


def _load_pair(context: ssl.SSLContext, flags: str, cert_path: str, key_path: str) -> None:
    for flag, path in zip(flags.split("/"), (cert_path, key_path), strict=True):
        _check_file(flag, path)
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError, ConfigError a ValueError
        raise ConfigError(f"{flags}: cannot load certificate {cert_path} with key {key_path}: {exc}") from None


def _load_ca(context: ssl.SSLContext, flag: str, path: str) -> None:
    _check_file(flag, path)
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{flag}: cannot load CA certificates from {path}: {exc}") from None


def server_context(cert_path: str, key_path: str, client_ca_path: str | None = None) -> ssl.SSLContext:
    """A server context for `cert_path` (PEM: the leaf, then intermediates); with `client_ca_path`, clients must
    present a certificate that CA signed (mTLS). Raises ConfigError naming the flag of a file that does not load."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_pair(context, SERVER_FLAGS, cert_path, key_path)
    if client_ca_path is not None:
        _load_ca(context, "--tls-client-ca", client_ca_path)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def worker_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The client context for `https://` workers: system roots plus `--ca-cert-paths`, and the client certificate.
    None when no worker TLS flag is set (aiohttp's default verification against the system roots)."""
    if not tls.to_workers:
        return None
    context = ssl.create_default_context()
    for path in tls.ca_cert_paths:
        _load_ca(context, "--ca-cert-paths", path)
    if tls.client_cert_path and tls.client_key_path:
        _load_pair(context, CLIENT_FLAGS, tls.client_cert_path, tls.client_key_path)
    return context


def grpc_tls(tls: TlsConfig) -> GrpcTls | None:
    """PEM material for `grpcs://` channels, trusting what `worker_context` trusts.

    gRPC takes roots as one PEM blob that replaces its own bundle, so extra CAs go along with the system bundle file
    (`SSL_CERT_FILE` or OpenSSL's default); without `--ca-cert-paths` gRPC keeps its default roots.
    """
    if not tls.to_workers:
        return None
    roots = None
    if tls.ca_cert_paths:
        system = ssl.get_default_verify_paths().cafile
        paths = [system, *tls.ca_cert_paths] if system and os.path.isfile(system) else list(tls.ca_cert_paths)
        roots = b"\n".join(Path(p).read_bytes() for p in paths)
    key = chain = None
    if tls.client_cert_path and tls.client_key_path:
        key, chain = Path(tls.client_key_path).read_bytes(), Path(tls.client_cert_path).read_bytes()
    return GrpcTls(root_certificates=roots, private_key=key, certificate_chain=chain)


class ServerTls:
    """The main port's TLS. `reload()` (on SIGHUP) reads the certificate files again: new connections get the new
    certificate, open ones keep theirs, and a pair that does not load leaves the current one in place.

    The listener's context never changes (the server holds it); each handshake switches to the newest context in
    its SNI callback, which OpenSSL calls for every ClientHello, with or without a server name. Swapping whole
    contexts means a reload is never half applied.
    """

    def __init__(self, cert_path: str, key_path: str) -> None:
        self._cert_path, self._key_path = cert_path, key_path
        self.context = self._current = server_context(cert_path, key_path)
        self.context.sni_callback = self._select

    def _select(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None, _context: ssl.SSLContext
    ) -> None:
        ssl_object.context = self._current

    def reload(self) -> None:
        """Load the certificate files again; when they do not load, log an error and keep the current ones."""
        try:
            self._current = server_context(self._cert_path, self._key_path)
        except ConfigError as exc:
            log.error("TLS certificate reload failed, still serving the previous certificate: %s", exc)
            return
        log.info("TLS certificate reloaded from %s", self._cert_path)
