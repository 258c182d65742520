"""`shepherd metrics-sidecar`: a gRPC engine's Prometheus metrics over plain HTTP.

An engine serving gRPC (SGLang with PROMETHEUS_MULTIPROC_DIR set) writes its metrics as Prometheus
multiprocess files and exposes no HTTP endpoint. This process serves that directory at `GET /metrics`
(every other path: 404) on the port the gateway expects (see sidecar_address.py; `--grpc-port` derives
it). It is unauthenticated by design and expects no credentials; bind it to a private address.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from shepherd.observability.exposition import TEXT_CONTENT_TYPE
from shepherd.observability.sidecar_address import sidecar_port

_PROG = "shepherd metrics-sidecar"


def add_sidecar_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--multiproc-dir",
        default=os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
        help="the engine's Prometheus multiprocess directory (default: $PROMETHEUS_MULTIPROC_DIR)",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to bind, IPv4 or IPv6 (default: %(default)s)")
    port = parser.add_mutually_exclusive_group(required=True)
    port.add_argument("--port", type=int, help="port to serve /metrics on")
    port.add_argument(
        "--grpc-port", type=int, help="the engine's gRPC port: serve on the port the gateway derives from it"
    )


def run_sidecar(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code (1: cannot listen, 2: bad arguments)."""
    directory = args.multiproc_dir
    if not directory:
        return _fail(2, "--multiproc-dir (or PROMETHEUS_MULTIPROC_DIR) is required")
    if not os.path.isdir(directory):
        return _fail(2, f"--multiproc-dir {directory!r} is not a directory")
    try:
        port = args.port if args.port is not None else sidecar_port(args.grpc_port)
    except ValueError as exc:
        return _fail(2, f"--grpc-port: {exc}")
    return uvloop.run(_serve(directory, args.host, port))


async def _serve(directory: str, host: str, port: int) -> int:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)

    async def metrics(_request: web.Request) -> web.Response:
        # Reading and merging the per-process files is file I/O plus CPU: keep it off the event loop.
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": TEXT_CONTENT_TYPE})

    async def not_found(_request: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", not_found)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        return _fail(1, f"cannot listen on {_host_port(host, port)}: {exc.strerror or exc}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{_PROG}: serving {directory} at http://{_host_port(host, port)}/metrics", flush=True)
    await stop.wait()
    await runner.cleanup()
    return 0


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _fail(code: int, message: str) -> int:
    print(f"{_PROG}: {message}", file=sys.stderr)
    return code
