"""`shepherd serve`: start N workers and the gateway in front of them, and stop the workers on exit.

`--backend sim` runs simulated SGLang workers (no GPU needed; with `--grpc`, simulated SGLang gRPC engines);
`sglang` and `vllm` start real engines on consecutive ports, one GPU each, when those engines are installed;
`llama` starts llama.cpp's `llama-server` on CPU, serving the GGUF file `--model-path` under its file name.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from shepherd.config import ConfigError, GatewayConfig

_SIM_READY_TIMEOUT_SECS = 30.0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workers")
    g.add_argument("--backend", choices=("sim", "sglang", "vllm", "llama"), default="sim")
    g.add_argument("--dp-size", type=int, default=2, help="number of workers to start")
    g.add_argument("--worker-host", default="127.0.0.1")
    g.add_argument("--worker-base-port", type=int, default=31000, help="first worker port (sglang/vllm/llama)")
    g.add_argument("--worker-args", default="", help="extra arguments passed to every worker, one string")
    g.add_argument("--grpc", action="store_true", help="--backend sim: the workers speak SGLang's gRPC protocol")
    g.add_argument("--llama-server", default="llama-server", help="--backend llama: the llama-server executable")


def run_serve(args: argparse.Namespace, to_config: Callable[[argparse.Namespace], GatewayConfig]) -> int:
    from shepherd.cli import run_gateway

    if args.dp_size < 1:
        raise ConfigError("--dp-size must be >= 1")
    if args.grpc and args.backend != "sim":
        raise ConfigError("--grpc is only supported with --backend sim")
    processes, urls = _start_workers(args)
    if args.backend == "llama":
        args.model_path = None  # the GGUF is the engines' to load: the gateway needs no tokenizer for HTTP workers
    try:
        args.worker_urls = [*args.worker_urls, *urls]
        config = to_config(args)
        if args.backend != "sim":
            # Engines take minutes to load weights; register them as soon as they answer.
            config = dataclasses.replace(
                config, worker_startup_check_interval=min(config.worker_startup_check_interval, 5)
            )
        return run_gateway(config)
    finally:
        for proc in processes:
            proc.terminate()
        for proc in processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _start_workers(args: argparse.Namespace) -> tuple[list[subprocess.Popen], list[str]]:
    extra = args.worker_args.split()
    if args.backend == "sim":
        return _start_sim(args, extra)
    ports = [args.worker_base_port + i for i in range(args.dp_size)]
    if args.backend == "llama":
        commands = _llama_commands(args, ports, extra)
        envs = [None] * len(ports)
    elif args.backend == "sglang":
        if importlib.util.find_spec("sglang") is None:
            raise ConfigError(
                "--backend sglang: SGLang is not installed here (pip install 'sglang[all]'); "
                "use --backend sim to try Shepherd without a GPU"
            )
        commands = [
            [
                sys.executable,
                "-m",
                "sglang.launch_server",
                "--model-path",
                args.model_path or "sim-model",
                "--host",
                args.worker_host,
                "--port",
                str(port),
                "--base-gpu-id",
                str(i),
                *extra,
            ]
            for i, port in enumerate(ports)
        ]
        envs = [None] * len(ports)
    else:
        vllm = shutil.which("vllm")
        if vllm is None:
            raise ConfigError(
                "--backend vllm: vLLM is not installed here (pip install vllm); "
                "use --backend sim to try Shepherd without a GPU"
            )
        commands = [
            [vllm, "serve", args.model_path or "sim-model", "--host", args.worker_host, "--port", str(port), *extra]
            for port in ports
        ]
        envs = [{**os.environ, "CUDA_VISIBLE_DEVICES": str(i)} for i in range(len(ports))]
    processes = [subprocess.Popen(cmd, env=env) for cmd, env in zip(commands, envs, strict=True)]
    return processes, [f"http://{args.worker_host}:{port}" for port in ports]


def _llama_commands(args: argparse.Namespace, ports: list[int], extra: list[str]) -> list[list[str]]:
    """llama-server command lines: the model under its file name (a later `--alias` in --worker-args wins),
    Prometheus metrics on (for /engine_metrics), no web UI."""
    server = shutil.which(args.llama_server)
    if server is None:
        raise ConfigError(
            f"--backend llama: {args.llama_server} not found; build it with tools/components/llama.sh (it lands in "
            "~/.cache/shepherd-components/bin) or install llama.cpp, and pass its path with --llama-server"
        )
    if not args.model_path or not os.path.isfile(args.model_path):
        raise ConfigError(f"--backend llama: --model-path must be a GGUF file (got {args.model_path!r})")
    alias = Path(args.model_path).name.removesuffix(".gguf")
    common = [server, "--model", args.model_path, "--alias", alias, "--host", args.worker_host]
    return [[*common, "--port", str(port), "--metrics", "--no-webui", *extra] for port in ports]


def _start_sim(args: argparse.Namespace, extra: list[str]) -> tuple[list[subprocess.Popen], list[str]]:
    ready = os.path.join(tempfile.mkdtemp(prefix="shepherd-sim-"), "ready.json")
    cmd = [
        sys.executable,
        "-m",
        "shepherd.sim",
        "--host",
        args.worker_host,
        "--port",
        "0",
        "--workers",
        str(args.dp_size),
        "--model",
        args.model_path or "sim-model",
        "--ready-file",
        ready,
        *(["--grpc"] if args.grpc else []),
        *extra,
    ]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + _SIM_READY_TIMEOUT_SECS
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise ConfigError(f"simulated workers did not start (exit code {proc.poll()})")
        time.sleep(0.05)
    with open(ready) as f:
        urls = json.load(f)["urls"]
    return [proc], urls
