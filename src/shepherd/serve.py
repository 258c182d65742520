"""`shepherd serve`: start N workers and the gateway in front of them, and stop the workers on exit.

`--backend sim` runs simulated SGLang workers (no GPU needed; with `--grpc`, simulated SGLang gRPC engines);
`sglang` and `vllm` start real engines on consecutive ports, one GPU each, when those engines are installed.
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

from shepherd.config import ConfigError, GatewayConfig

_SIM_READY_TIMEOUT_SECS = 30.0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workers")
    g.add_argument("--backend", choices=("sim", "sglang", "vllm"), default="sim")
    g.add_argument("--dp-size", type=int, default=2, help="number of workers to start")
    g.add_argument("--worker-host", default="127.0.0.1")
    g.add_argument("--worker-base-port", type=int, default=31000, help="first worker port (sglang/vllm)")
    g.add_argument("--worker-args", default="", help="extra arguments passed to every worker, one string")
    g.add_argument("--grpc", action="store_true", help="--backend sim: the workers speak SGLang's gRPC protocol")


def run_serve(args: argparse.Namespace, to_config: Callable[[argparse.Namespace], GatewayConfig]) -> int:
    from shepherd.cli import run_gateway

    if args.dp_size < 1:
        raise ConfigError("--dp-size must be >= 1")
    if args.grpc and args.backend != "sim":
        raise ConfigError("--grpc is only supported with --backend sim")
    processes, urls = _start_workers(args)
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
    if args.backend == "sglang":
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
