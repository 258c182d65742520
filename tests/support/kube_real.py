"""A real Kubernetes control plane for tests: etcd and kube-apiserver on 127.0.0.1, no kubelet, no scheduler.

The API server (built by tools/components/kubernetes.sh) serves HTTPS only, with a certificate from a test CA that
clients verify, authenticates static tokens (`--token-auth-file`) and service-account tokens, and authorizes with
RBAC. Its watch cache is off, so a watch resumed from a compacted resourceVersion gets etcd's own 410.
`TcpProxy` sits between a client and the API server to cut connections on demand.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.components import require
from tests.support.processes import ManagedProcess, free_ports, http_request

ADMIN_TOKEN = "shepherd-test-admin"
ISSUER = "https://kubernetes.default.svc"


class KubeCluster:
    """etcd + kube-apiserver in `workdir`; `start()` returns once the API server's /readyz answers 200."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.etcd_port, etcd_peer_port, self.port = free_ports(3)
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self.url = f"https://127.0.0.1:{self.port}"
        ca = trustme.CA()
        self.ca_pem = ca.cert_pem.bytes()
        self.ca_file = workdir / "ca.crt"
        self.ca_file.write_bytes(self.ca_pem)
        server = ca.issue_cert("127.0.0.1", "localhost")
        server.cert_chain_pems[0].write_to_path(str(workdir / "apiserver.crt"))
        server.private_key_pem.write_to_path(str(workdir / "apiserver.key"))
        _write_service_account_keys(workdir)
        (workdir / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin,"system:masters"\n')
        self.admin_kubeconfig = self.kubeconfig(workdir / "admin.kubeconfig", ADMIN_TOKEN)
        self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        self._kubectl = require("kubectl")
        self._etcd = ManagedProcess(
            [
                require("etcd"),
                "--name=test",
                f"--data-dir={workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}",
                f"--initial-cluster=test=http://127.0.0.1:{etcd_peer_port}",
                "--log-level=warn",
                "--logger=zap",
            ],
            "etcd",
            log_dir=workdir,
        )
        self._apiserver_argv = [
            str(require("kube-apiserver")),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            "--insecure-port=0",
            f"--tls-cert-file={workdir / 'apiserver.crt'}",
            f"--tls-private-key-file={workdir / 'apiserver.key'}",
            f"--cert-dir={workdir / 'certs'}",
            f"--token-auth-file={workdir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={ISSUER}",
            f"--api-audiences={ISSUER}",
            f"--service-account-key-file={workdir / 'sa.pub'}",
            f"--service-account-signing-key-file={workdir / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--endpoint-reconciler-type=none",
            "--disable-admission-plugins=ServiceAccount",
            "--watch-cache=false",
            "--profiling=false",
        ]
        self._apiserver: ManagedProcess | None = None
        self._starts = 0

    # --- processes -----------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> KubeCluster:
        """Start etcd, then the API server; wait until both are ready."""
        try:
            self._etcd.start()
            self._etcd.wait_http(self.etcd_url + "/health", timeout)
            self.start_apiserver(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_apiserver(self, timeout: float = 60.0) -> None:
        """(Re)start the API server on the same port and wait for /readyz."""
        self._starts += 1
        self._apiserver = ManagedProcess(self._apiserver_argv, f"kube-apiserver-{self._starts}", log_dir=self.workdir)
        self._apiserver.start()
        self._apiserver.wait_for(lambda: self._status("/readyz") == 200, timeout, f"{self.url}/readyz", interval=0.1)

    def stop_apiserver(self, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds: a stopping API server holds its open watches until killed."""
        if self._apiserver is not None:
            self._apiserver.stop(timeout=grace)
            self._apiserver = None

    def stop(self) -> None:
        self.stop_apiserver()
        self._etcd.stop()

    def __enter__(self) -> KubeCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _status(self, path: str) -> int | None:
        """Status of an admin GET to the API server; None when nothing answers."""
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self._ssl)
        )
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        try:
            with opener.open(request, timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    # --- clients -------------------------------------------------------------------------------------------------
    def kubeconfig(self, path: Path, token: str, server: str | None = None) -> Path:
        """A kubeconfig for `token` at `server` (default: the API server), trusting the test CA."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {
                        "server": server or self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def kubectl(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl (the admin's unless `kubeconfig` is given)."""
        argv = [str(self._kubectl), f"--kubeconfig={kubeconfig or self.admin_kubeconfig}", *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited with {result.returncode}: {result.stderr or result.stdout}")
        return result

    def core_api(self) -> Any:
        """A `kubernetes` CoreV1Api authenticated as the cluster admin."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        configuration.ssl_ca_cert = str(self.ca_file)
        configuration.api_key = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        return client.CoreV1Api(client.ApiClient(configuration))

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A token for service account `namespace/name` from the TokenRequest API."""
        body = {"spec": {"audiences": [ISSUER], "expirationSeconds": seconds}}
        answer = self.core_api().create_namespaced_service_account_token(name, namespace, body)
        return answer.status.token

    # --- etcd ----------------------------------------------------------------------------------------------------
    def compact(self) -> int:
        """Write a marker key (so every revision the API server handed out is older), then compact etcd's history
        up to it; returns the compacted revision."""
        key = base64.b64encode(b"/shepherd-test/compaction-marker").decode()
        status, answer = http_request("POST", self.etcd_url + "/v3/kv/put", {"key": key, "value": key})
        assert status == 200, answer
        revision = int(answer["header"]["revision"])
        status, answer = http_request(
            "POST", self.etcd_url + "/v3/kv/compaction", {"revision": revision, "physical": True}
        )
        assert status == 200, answer
        return revision


def _write_service_account_keys(workdir: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (workdir / "sa.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    (workdir / "sa.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def common_free_port(hosts: list[str], attempts: int = 20) -> int:
    """A port that is free on every address in `hosts` right now."""
    for _ in range(attempts):
        port = free_ports(1, hosts[0])[0]
        sockets: list[socket.socket] = []
        try:
            for host in hosts:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise AssertionError(f"no port free on all of {hosts}")


class TcpProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`upstream_port`; `cut()` drops every connection and refuses new
    ones (accepted and closed at once, counted in `refused`) until `restore()`."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.refused = 0
        self._open = True
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="kube-test-proxy", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._open:
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self._upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            _shutdown(sock)
        with self._lock:
            for sock in (source, sink):
                if sock in self._sockets:
                    self._sockets.discard(sock)
                    sock.close()

    def cut(self) -> None:
        self._open = False
        with self._lock:
            for sock in self._sockets:
                _shutdown(sock)

    def restore(self) -> None:
        self._open = True

    def close(self) -> None:
        self.cut()
        _shutdown(self._listener)
        self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def wait_log(process: ManagedProcess, text: str, timeout: float = 15.0) -> None:
    """Wait until `text` appears in the process's log."""
    process.wait_for(lambda: text in process.log_path.read_text(errors="replace"), timeout, f"{text!r} in the log")


class HostedSim:
    """One `shepherd sim` worker listening on `host:port`: what a pod with that IP serves on the discovery port."""

    def __init__(self, log_dir: Path, host: str, port: int, *args: str) -> None:
        self.host = host
        self.url = f"http://{host}:{port}"
        self.bootstrap_port: int | None = None
        self._ready = log_dir / f"sim-{host}.json"
        argv = [sys.executable, "-m", "shepherd.sim", "--host", host, "--port", str(port), "--workers", "1"]
        argv += ["--ready-file", str(self._ready), "--latency-model", "none", *args]
        self.process = ManagedProcess(argv, f"sim-{host}", log_dir=log_dir)

    def start(self) -> HostedSim:
        self.process.start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.process.wait_for(self._ready.exists, timeout, f"the ready file {self._ready}")
        self.bootstrap_port = json.loads(self._ready.read_text())["bootstrap_ports"][0]

    def log(self) -> dict[str, Any]:
        """`GET /__log`: what this worker received."""
        status, body = http_request("GET", self.url + "/__log")
        assert status == 200, body
        return body

    def generate_requests(self) -> int:
        return self.log()["counts"].get("/generate", 0)

    def stop(self) -> None:
        self.process.stop()
