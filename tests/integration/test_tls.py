"""TLS end to end with real processes: the gateway's HTTPS listener (and its SIGHUP reload), and `https://` and
`grpcs://` simulated workers verified against `--ca-cert-paths`, some requiring a client certificate (mTLS).

Certificates come from `trustme`: one CA signs the server certificates (for 127.0.0.1 and localhost) and the
gateway's client certificate; a second CA, which nobody trusts, signs the "untrusted" worker's certificate.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import ssl
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import trustme
from cryptography import x509

from tests.support.gateway import GatewayProcess, start_gateway
from tests.support.processes import ManagedProcess, SimFleet, free_ports, start_sim

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hello over TLS"}], "max_tokens": 4}


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path  # trusted: signed every certificate below except the untrusted one
    server_cert: Path
    server_key: Path
    server_serial: int
    renewed_cert: Path  # a second server certificate, for the reload test
    renewed_key: Path
    renewed_serial: int
    client_cert: Path
    client_key: Path
    untrusted_cert: Path  # signed by a CA nobody trusts
    untrusted_key: Path

    def context(self) -> ssl.SSLContext:
        """A client context that trusts the CA and presents the client certificate (to servers that ask)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(self.client_cert, self.client_key)
        return context

    def tls_args(self, cert: Path | None = None, key: Path | None = None) -> tuple[str, ...]:
        return ("--tls-cert-path", str(cert or self.server_cert), "--tls-key-path", str(key or self.server_key))

    def worker_trust_args(self, client_cert: bool = True) -> tuple[str, ...]:
        args = ("--ca-cert-paths", str(self.ca))
        if client_cert:
            args += ("--client-cert-path", str(self.client_cert), "--client-key-path", str(self.client_key))
        return args


def _write_leaf(leaf: trustme.LeafCert, cert: Path, key: Path) -> int:
    leaf.private_key_pem.write_to_path(str(key))
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=i > 0)
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    serial = _write_leaf(ca.issue_cert("127.0.0.1", "localhost"), d / "server.pem", d / "server.key")
    renewed = _write_leaf(ca.issue_cert("127.0.0.1", "localhost"), d / "renewed.pem", d / "renewed.key")
    _write_leaf(ca.issue_cert("shepherd-gateway"), d / "client.pem", d / "client.key")
    _write_leaf(stranger.issue_cert("127.0.0.1"), d / "untrusted.pem", d / "untrusted.key")
    return Pki(
        d,
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        serial,
        d / "renewed.pem",
        d / "renewed.key",
        renewed,
        d / "client.pem",
        d / "client.key",
        d / "untrusted.pem",
        d / "untrusted.key",
    )


def https_call(method: str, url: str, context: ssl.SSLContext | None, body: Any = None) -> tuple[int, Any]:
    """A blocking JSON call over HTTPS (no proxy): `(status, parsed JSON or text)`; OSError when nothing answers."""
    handlers = [urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)]
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=5) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except urllib.error.URLError as exc:
        raise exc.reason if isinstance(exc.reason, OSError) else exc from None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def peer_serial(url: str, ca: Path) -> int:
    """The serial number of the certificate a TLS server presents now (a new connection)."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((host, int(port)), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class HttpsGateway:
    """A gateway serving its main port over TLS, called with a context that trusts the test CA."""

    def __init__(self, tmp_path: Path, pki: Pki, worker_urls: list[str], *extra_args: str) -> None:
        port, prometheus_port = free_ports(2)
        self.url = f"https://127.0.0.1:{port}"
        self.context = pki.context()
        argv = [sys.executable, "-m", "shepherd.cli", "launch", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--prometheus-port", str(prometheus_port), "--log-level", "debug", "--policy", "round_robin"]
        argv += ["--shutdown-drain-window-secs", "0"]  # nothing routes to a test gateway: stop() need not wait
        if worker_urls:
            argv += ["--worker-urls", *worker_urls]
        self.process = ManagedProcess([*argv, *extra_args], f"gateway-{port}", log_dir=tmp_path).start()
        try:
            self.process.wait_for(lambda: self._status("/liveness") == 200, 15, "the HTTPS listener")
            self.process.wait_for(
                lambda: (
                    sum(w["status"] == "ready" for w in self.call("GET", "/workers")[1]["workers"]) == len(worker_urls)
                ),
                15,
                f"{len(worker_urls)} ready workers",
            )
        except BaseException:
            self.process.stop()
            raise

    def _status(self, path: str) -> int | None:
        try:
            return self.call("GET", path)[0]
        except OSError:
            return None

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return https_call(method, self.url + path, self.context, body)

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture(scope="module")
def https_sims(tmp_path_factory, pki):
    with start_sim(tmp_path_factory.mktemp("https-sims"), 2, *pki.tls_args()) as sims:
        yield sims


@pytest.fixture(scope="module")
def mtls_sim(tmp_path_factory, pki):
    args = (*pki.tls_args(), "--tls-client-ca", str(pki.ca))
    with start_sim(tmp_path_factory.mktemp("mtls-sim"), 1, *args) as sims:
        yield sims


@pytest.fixture(scope="module")
def grpcs_sim(tmp_path_factory, pki):
    args = ("--grpc", *pki.tls_args(), "--tls-client-ca", str(pki.ca))
    with start_sim(tmp_path_factory.mktemp("grpcs-sim"), 1, *args) as sims:
        yield sims


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, pki, https_sims, mtls_sim):
    """TLS on every hop: an HTTPS listener, three https:// workers, one of which requires the client certificate."""
    urls = [*https_sims.urls, *mtls_sim.urls]
    args = (*pki.tls_args(), *pki.worker_trust_args(), "--health-check-interval-secs", "0.1")
    gw = HttpsGateway(tmp_path_factory.mktemp("tls-gw"), pki, urls, *args)
    yield gw
    gw.stop()


def sim_counts(sims: SimFleet, pki: Pki, index: int) -> dict[str, int]:
    status, body = https_call("GET", f"{sims.urls[index]}/__log?worker={index}", pki.context())
    assert status == 200, body
    return body["counts"]


def test_an_https_client_trusting_the_ca_is_served_and_plain_http_is_not(gateway, pki):
    assert gateway.url.startswith("https://") and peer_serial(gateway.url, pki.ca) == pki.server_serial
    with (
        httpx2.Client(verify=ssl.create_default_context(cafile=str(pki.ca)), trust_env=False) as transport,
        openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0, http_client=transport) as client,
    ):
        reply = client.chat.completions.create(**CHAT)
        assert reply.choices[0].message.content
        stream = client.chat.completions.create(**CHAT, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    with pytest.raises(ssl.SSLCertVerificationError):  # the system roots do not know the test CA
        https_call("GET", gateway.url + "/liveness", ssl.create_default_context())
    with pytest.raises((OSError, http.client.HTTPException)):  # plaintext on the TLS port: no HTTP answer
        https_call("GET", gateway.url.replace("https://", "http://") + "/liveness", None)


def test_https_workers_serve_every_gateway_call(gateway, pki, https_sims, mtls_sim):
    """Registration, health probes, the data plane (non-stream and stream) and /engine_metrics all reach every
    worker, the one requiring a client certificate included."""
    workers = gateway.call("GET", "/workers")[1]["workers"]
    assert sorted(w["url"] for w in workers) == sorted([*https_sims.urls, *mtls_sim.urls])
    assert all(w["status"] == "ready" and w["labels"]["served_model_name"] == "sim-model" for w in workers)
    before = sim_counts(mtls_sim, pki, 0).get("/health", 0)
    gateway.process.wait_for(
        lambda: sim_counts(mtls_sim, pki, 0).get("/health", 0) > before, 5, "a health probe of the mTLS worker"
    )

    def served() -> list[int]:
        counts = [sim_counts(https_sims, pki, i) for i in range(2)] + [sim_counts(mtls_sim, pki, 0)]
        return [c.get("/v1/chat/completions", 0) for c in counts]

    before_chats = served()
    for stream in (False, True, False, True, False, True):
        status, body = gateway.call("POST", "/v1/chat/completions", {**CHAT, "stream": stream})
        assert status == 200, body
    assert [n - m for n, m in zip(served(), before_chats, strict=True)] == [2, 2, 2]  # round robin over all three
    status, text = gateway.call("GET", "/engine_metrics")
    assert status == 200, text
    assert "scraped 3 of 3 workers" in text
    assert all(f'worker_addr="{url}"' in text for url in [*https_sims.urls, *mtls_sim.urls])


def test_sighup_reloads_the_certificate_and_keeps_it_when_the_new_one_is_bad(tmp_path, pki):
    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    gw = HttpsGateway(tmp_path, pki, [], *pki.tls_args(cert, key))
    try:
        assert peer_serial(gw.url, pki.ca) == pki.server_serial
        shutil.copy(pki.renewed_cert, cert)
        shutil.copy(pki.renewed_key, key)
        gw.process.send_signal(signal.SIGHUP)
        gw.process.wait_for(lambda: peer_serial(gw.url, pki.ca) == pki.renewed_serial, 5, "the renewed certificate")
        assert "TLS certificate reloaded from" in gw.process.log_path.read_text()

        cert.write_text("not a certificate\n")
        gw.process.send_signal(signal.SIGHUP)
        gw.process.wait_for(lambda: "TLS certificate reload failed" in gw.process.log_path.read_text(), 5, "an error")
        assert peer_serial(gw.url, pki.ca) == pki.renewed_serial
        assert gw.call("GET", "/liveness")[0] == 200
    finally:
        gw.stop()


def wait_job(gw: GatewayProcess, url: str, timeout: float) -> dict[str, Any]:
    """POST /workers {url} and poll its job until it fails or the worker is registered; the job's status."""
    status, body = gw.post("/workers", {"url": url})
    assert status == 202, body
    job: dict[str, Any] = {}

    def finished() -> bool:
        nonlocal job
        status, job = gw.get(body["location"])
        return status == 200 and (job["status"] != "pending" or job["job_status"]["status"] == "failed")

    gw.process.wait_for(finished, timeout, f"the registration of {url}")
    return job


def test_an_untrusted_worker_certificate_fails_registration_at_once(tmp_path, pki):
    args = ("--tls-cert-path", str(pki.untrusted_cert), "--tls-key-path", str(pki.untrusted_key))
    with start_sim(tmp_path / "sim", 1, *args) as sim, start_gateway(tmp_path, (), *pki.worker_trust_args()) as gw:
        job = wait_job(gw, sim.urls[0], timeout=5)  # the startup timeout is 1800 s: no waiting it out
        assert job["job_status"]["status"] == "failed"
        assert "certificate verify failed" in job["job_status"]["message"]
        assert gw.workers() == []


def test_workers_requiring_a_client_certificate_refuse_a_gateway_without_one(tmp_path, pki, mtls_sim, grpcs_sim):
    args = (*pki.worker_trust_args(client_cert=False), "--worker-startup-timeout-secs", "0.5")
    with start_gateway(tmp_path, (), *args) as gw:
        for url in (mtls_sim.urls[0], grpcs_sim.urls[0]):
            job = wait_job(gw, url, timeout=10)
            assert job["job_status"]["status"] == "failed", job
        assert gw.workers() == []


def test_a_grpcs_worker_with_mtls_serves_a_chat_completion(tmp_path, pki, grpcs_sim):
    """Channel credentials carry the CA and the client certificate; the tokenizer comes over TLS with GetTokenizer."""
    with start_gateway(tmp_path, grpcs_sim.urls, *pki.worker_trust_args()) as gw:
        assert grpcs_sim.urls[0].startswith("grpcs://")
        gw.process.wait_for(lambda: gw.get("/v1/models")[0] == 200, 10, "the sim-model tokenizer")
        assert gw.workers()[0]["connection_mode"] == "grpc"
        status, body = gw.post("/v1/chat/completions", CHAT)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"]
        counts = grpcs_sim.log(0)["counts"]  # through the plain-HTTP metrics sidecar
        assert counts["/sglang.grpc.scheduler.SglangScheduler/GetTokenizer"] >= 1
        assert counts["/sglang.grpc.scheduler.SglangScheduler/Generate"] == 1
