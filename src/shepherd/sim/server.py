"""``shepherd sim``: a process serving one or more simulated SGLang workers.

Each worker has its own listener, aiohttp app, engines and fault state; they share the
process's event loop.  Listeners are plain sockets bound here, so a worker can stop
listening (``refuse`` fault: clients get ECONNREFUSED) and later listen on the same port again.
With ``--grpc`` the worker port is a gRPC server instead (``shepherd.sim.grpc_server``) and the
workers share one BPE tokenizer, trained at start-up and written to a temporary directory.
With ``--kv-events-config`` and the zmq publisher, every worker publishes its KV events on ZMQ PUB
sockets (``shepherd.sim.kv_zmq``; one zmq context for the process) and its engine tokenizes with that
BPE too (``shepherd.sim.prompt_tokens``), whose directory it reports as ``tokenizer_path``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
from pathlib import Path

import grpc
import uvloop
import zmq
from aiohttp import web

from shepherd.observability.sidecar_address import sidecar_metrics_url
from shepherd.sim import bpe
from shepherd.sim.app import build_app
from shepherd.sim.config import SimConfig, add_sim_arguments
from shepherd.sim.grpc_scheduler import SchedulerServicer
from shepherd.sim.grpc_server import GrpcListener, server_credentials
from shepherd.sim.prompt_tokens import WORDS, BpePrompts, PromptTokenizer
from shepherd.sim.worker import SimWorker
from shepherd.tls import server_context

__all__ = ["SimServer", "add_sim_arguments", "run_sim"]

# On shutdown, in-flight requests (e.g. hung by fault injection) get this long to finish.
_SHUTDOWN_GRACE_S = 1.0


class SimServer:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        # The engines' prompt tokenizer is chosen here, once: the BPE when KV events go out over ZMQ.
        self.tokenizer = bpe.build() if config.grpc or config.zmq_kv_events else None
        prompts: PromptTokenizer = WORDS
        if config.zmq_kv_events and self.tokenizer is not None:
            prompts = BpePrompts(self.tokenizer)
        self.workers = [SimWorker(config, i, prompts) for i in range(config.workers)]
        self._zmq: zmq.Context[zmq.Socket[bytes]] | None = None
        self._runners: list[web.AppRunner] = []
        self._sites: list[web.SockSite | None] = []
        self._http_ports: list[int] = []  # the HTTP app's port: the worker port, or its metrics sidecar port
        self._grpc_listeners: list[GrpcListener] = []
        self.tokenizer_dir: Path | None = None  # --grpc or zmq KV events: the workers' tokenizer directory
        self._ssl: ssl.SSLContext | None = None  # the HTTP worker port's TLS; a --grpc sidecar stays plain
        self._grpc_credentials: grpc.ServerCredentials | None = None
        if config.tls_cert_path and config.tls_key_path:
            # Loading checks the files (ConfigError) even for --grpc, whose server only reads them at bind time.
            context = server_context(config.tls_cert_path, config.tls_key_path, config.tls_client_ca)
            if config.grpc:
                self._grpc_credentials = server_credentials(
                    config.tls_cert_path, config.tls_key_path, config.tls_client_ca
                )
            else:
                self._ssl = context

    async def start(self) -> None:
        """Bind every worker's listener (raises ``OSError`` if a port is taken, ``zmq.ZMQError`` if a KV events
        port is)."""
        tokenizer = self.tokenizer
        if tokenizer is not None:
            self.tokenizer_dir = Path(tempfile.mkdtemp(prefix="shepherd-sim-tokenizer-"))
            tokenizer.write_dir(self.tokenizer_dir)
        if self.config.zmq_kv_events:
            self._zmq = zmq.Context()
            for worker in self.workers:
                worker.tokenizer_dir = self.tokenizer_dir
                worker.open_kv_sockets(self._zmq)
        for worker in self.workers:
            port = self.config.port + worker.index if self.config.port else 0
            if self.config.grpc and tokenizer is not None and self.tokenizer_dir is not None:
                servicer = SchedulerServicer(worker, tokenizer, self.tokenizer_dir)
                listener = GrpcListener(self.config.host, servicer, self._grpc_credentials)
                self._grpc_listeners.append(listener)
                sock = await listener.start_with_sidecar(port, _listen)
                worker.port = listener.port
            else:
                sock = _listen(self.config.host, port)
                worker.port = sock.getsockname()[1]
            self._http_ports.append(sock.getsockname()[1])
            runner = web.AppRunner(
                build_app(worker, self),
                handler_cancellation=True,  # a client disconnect cancels its handler
                access_log=None,
                shutdown_timeout=_SHUTDOWN_GRACE_S,
            )
            await runner.setup()
            site = web.SockSite(runner, sock, ssl_context=self._ssl)
            await site.start()
            self._runners.append(runner)
            self._sites.append(site)
            if self.config.role == "prefill":
                base = self.config.bootstrap_port
                sock = _listen(self.config.host, base + worker.index if base else 0)
                worker.bootstrap_port = await worker.handshake.serve(sock)

    @property
    def urls(self) -> list[str]:
        return [w.url for w in self.workers]

    @property
    def kv_events_endpoints(self) -> list[str] | None:
        """Each worker's resolved ZMQ KV events endpoint (its rank 0's); None without zmq KV events."""
        if not self.config.zmq_kv_events:
            return None
        return [w.kv_sockets.endpoint if w.kv_sockets is not None else "" for w in self.workers]

    @property
    def http_urls(self) -> list[str]:
        """Where each worker's HTTP app listens (with --grpc: the sidecar address)."""
        if not self.config.grpc:
            return self.urls
        return [sidecar_metrics_url(url).removesuffix("/metrics") for url in self.urls]

    async def set_refusing(self, index: int, refusing: bool, spare: web.BaseRequest | None = None) -> None:
        """Close (or reopen) a worker's listener.

        Closing also drops every open connection to the worker, in-flight requests included,
        so pooled clients see the worker as gone too.  Only the connection of ``spare`` (the
        control request asking for this) is closed gracefully, after its response.  A gRPC
        worker stops (or restarts) its gRPC server and keeps its HTTP sidecar listening.
        """
        if self._grpc_listeners:
            listener = self._grpc_listeners[index]
            await (listener.stop() if refusing else listener.start())
            return
        site = self._sites[index]
        if refusing and site is not None:
            await site.stop()
            self._sites[index] = None
            server = self._runners[index].server
            for conn in server.connections if server is not None else ():
                if spare is not None and conn is spare.protocol:
                    conn.close()
                else:
                    conn.force_close()
        elif not refusing and site is None:
            site = web.SockSite(
                self._runners[index], _listen(self.config.host, self._http_ports[index]), ssl_context=self._ssl
            )
            await site.start()
            self._sites[index] = site

    async def stop(self) -> None:
        for worker in self.workers:
            worker.faults.reset()  # release hung requests so they can finish
        for runner in self._runners:
            await runner.cleanup()
        for listener in self._grpc_listeners:
            await listener.stop()
        for worker in self.workers:
            await worker.close()  # closes its ZMQ sockets
        if self._zmq is not None:
            self._zmq.term()
            self._zmq = None
        if self.tokenizer_dir is not None:
            shutil.rmtree(self.tokenizer_dir, ignore_errors=True)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.setblocking(False)
    return sock


def _write_ready_file(path: str, server: SimServer) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        data = {
            "urls": server.urls,
            "http_urls": server.http_urls,
            "bootstrap_ports": [w.bootstrap_port for w in server.workers],  # null unless --role prefill
            "tokenizer_dir": str(server.tokenizer_dir) if server.tokenizer_dir else None,
            "kv_events_endpoints": server.kv_events_endpoints,
            "pid": os.getpid(),
        }
        json.dump(data, f)
    os.replace(tmp, path)


async def _serve(config: SimConfig) -> int:
    try:
        server = SimServer(config)
    except ValueError as exc:  # a TLS file that does not load
        print(f"shepherd sim: {exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except (OSError, zmq.ZMQError) as exc:
        print(f"shepherd sim: cannot listen: {exc}", file=sys.stderr)
        await server.stop()
        return 1
    # What exists now lives as long as the process: keep it out of collections, and collect rarely (as the gateway
    # does). Serving 4,000 workers' connections (`shepherd bench scale`), full collections otherwise paused the
    # process for up to 100 ms, which the benchmark would charge to the gateway.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 1000)
    print(f"shepherd sim: {len(server.workers)} worker(s) at {' '.join(server.urls)}", flush=True)
    if config.ready_file:
        _write_ready_file(config.ready_file, server)
    await stop.wait()
    await server.stop()
    return 0


def run_sim(args: argparse.Namespace) -> int:
    """Run the simulator until SIGTERM/SIGINT; returns the process exit code."""
    try:
        config = SimConfig.from_args(args)
    except ValueError as exc:
        print(f"shepherd sim: {exc}", file=sys.stderr)
        return 2
    return uvloop.run(_serve(config))
