"""SGLang-native routes: ``/generate``, health, model/server info, load, metrics, cache flush."""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web

from shepherd.sim.engine import Sequence
from shepherd.sim.parsing import check_context, int_field, token_prompts
from shepherd.sim.tokenizer import fake_logprob
from shepherd.sim.wire import RequestError, SseStream, apply_inference_faults, json_response, read_json_object
from shepherd.sim.worker import SimWorker

_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class SglangApi:
    def __init__(self, worker: SimWorker) -> None:
        self.worker = worker
        model = worker.config.model
        self._model_info = {
            "model_path": model,
            "tokenizer_path": model,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
        }

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/health", self.health),
            web.get("/health_generate", self.health),
            web.get("/get_model_info", self.model_info),
            web.get("/model_info", self.model_info),
            web.get("/get_server_info", self.server_info),
            web.get("/server_info", self.server_info),
            web.get("/get_load", self.get_load),
            web.get("/metrics", self.metrics),
            web.post("/flush_cache", self.flush_cache),
            web.get("/flush_cache", self.flush_cache),
            web.post("/generate", self.generate),
        ]

    async def health(self, request: web.Request) -> web.Response:
        status = self.worker.faults.health_status
        if status is not None and status != 200:
            return web.Response(status=status, text="unhealthy (injected)")
        return web.Response()

    async def model_info(self, request: web.Request) -> web.Response:
        tokenizer_dir = self.worker.tokenizer_dir  # a zmq --kv-events-config: the BPE the engine caches by
        tokenizer = {"tokenizer_path": str(tokenizer_dir)} if tokenizer_dir is not None else {}
        return json_response({**self._model_info, **tokenizer})

    async def server_info(self, request: web.Request) -> web.Response:
        return json_response(self.worker.server_info())

    async def get_load(self, request: web.Request) -> web.Response:
        return json_response(self.worker.load())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.worker.metrics_text().encode(), headers={"Content-Type": _PROMETHEUS})

    async def flush_cache(self, request: web.Request) -> web.Response:
        self.worker.flush_cache()
        return web.Response(text="Cache flushed.")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        if body.get("text") is not None:
            prompts, batch = token_prompts(body["text"], "text", self.worker.prompts.text)
        elif body.get("input_ids") is not None:
            prompts, batch = token_prompts(body["input_ids"], "input_ids")
        else:
            raise RequestError("Either text or input_ids should be provided.")
        default_new = self.worker.config.max_new_tokens_default
        params = body.get("sampling_params") or {}
        param_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(param_list) != len(prompts) or not all(isinstance(p, dict) for p in param_list):
            raise RequestError("'sampling_params' must be an object or one object per prompt")
        max_new = [int_field(p, "max_new_tokens", default_new) for p in param_list]
        n = int_field(param_list[0], "n", 1, minimum=1)
        check_context(prompts, max_new, self.worker.config.context_length)
        stream = bool(body.get("stream"))
        rids = _request_ids(body.get("rid"), len(prompts) * n, n)
        logprobs = bool(body.get("return_logprob"))
        # A PD decode worker did not compute the prompt: its prefill reports the input logprobs.
        input_logprobs = logprobs and self.worker.config.role != "decode"
        dp_rank = body.get("data_parallel_rank")

        denied = await apply_inference_faults(request, self.worker.faults, stream)
        if denied is not None:
            return denied
        handshake = self.worker.handshake
        rooms = await handshake.before(body, len(prompts) if batch else None)
        group = self.worker.submit(prompts, max_new, n, dp_rank if isinstance(dp_rank, int) else None)
        batch = batch or n > 1
        try:
            if not stream or self.worker.faults.stream_as_json:
                await group.wait()
                handshake.after(rooms)
                outputs = [_generate_output(s, rids[s.index], logprobs, input_logprobs) for s in group.seqs]
                return json_response(outputs if batch else outputs[0])
            sse = SseStream(request, self.worker.faults.disconnect_after_chunks)
            await sse.open()
            async for seq in group.updates():
                frame = _generate_output(seq, rids[seq.index], logprobs, input_logprobs)
                if batch:
                    frame["index"] = seq.index
                await sse.send(frame)
            handshake.after(rooms)
            await sse.close()
            return sse.response
        finally:
            if not group.done:
                group.abort()


def _request_ids(rid: Any, count: int, n: int) -> list[str]:
    if isinstance(rid, str):
        return [rid if count == 1 else f"{rid}-{i}" for i in range(count)]
    if isinstance(rid, list) and len(rid) * n == count:
        return [str(rid[i // n]) if n == 1 else f"{rid[i // n]}-{i % n}" for i in range(count)]
    return [os.urandom(16).hex() for _ in range(count)]


def _generate_output(seq: Sequence, rid: str, logprobs: bool, input_logprobs: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": {"type": "length", "length": seq.max_new_tokens} if seq.finished else None,
        "prompt_tokens": len(seq.prompt_ids),
        "completion_tokens": seq.generated,
        "cached_tokens": seq.cached_tokens,
        "weight_version": "default",
        "e2e_latency": seq.e2e_latency,
    }
    output_ids = seq.output_ids
    if logprobs:
        # SGLang reports no logprob for the first prompt token (nothing precedes it).
        meta["input_token_logprobs"] = (
            [[None if i == 0 else fake_logprob(t), t, None] for i, t in enumerate(seq.prompt_ids)]
            if input_logprobs
            else []
        )
        meta["output_token_logprobs"] = [[fake_logprob(t), t, None] for t in output_ids]
    return {"text": seq.text, "output_ids": output_ids, "meta_info": meta}
