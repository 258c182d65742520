"""The tokenizer registry's HTTP API (`/v1/tokenizers`, admin) and `/v1/tokenize`, `/v1/detokenize` (data plane).

Shapes and status codes follow SMG 1.13. On a gateway that never saw a gRPC worker nor a tokenizer request, the
registry (and `tokenizers`) is not loaded until one of these routes needs it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson

from shepherd.errors import GatewayError
from shepherd.exchange import Request, Response, json_response
from shepherd.http.routes import RouteTable

if TYPE_CHECKING:
    from shepherd.gateway import Gateway
    from shepherd.tokenizer.registry import TokenizerEntry


OFF_LOOP_CHARS = 64 * 1024  # longer prompts are encoded in a worker thread, so the event loop keeps serving


def add_tokenizer_routes(app: RouteTable, gateway: Gateway) -> None:
    routes = TokenizerRoutes(gateway)
    r = app
    r.add_post("/v1/tokenizers", routes.register)
    r.add_get("/v1/tokenizers", routes.list)
    r.add_get("/v1/tokenizers/{key:.+}/status", routes.status)
    r.add_get("/v1/tokenizers/{key:.+}", routes.get)
    r.add_delete("/v1/tokenizers/{key:.+}", routes.delete)
    r.add_post("/v1/tokenize", routes.tokenize)
    r.add_post("/v1/detokenize", routes.detokenize)


class TokenizerRoutes:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def register(self, request: Request) -> Response:
        from shepherd.tokenizer.registry import TokenizerExists

        body = await _json_object(request)
        name, source = body.get("name"), body.get("source")
        template = body.get("chat_template_path")
        if not isinstance(name, str) or not name or not isinstance(source, str) or not source:
            raise GatewayError(400, "invalid_request", "'name' and 'source' are required strings")
        if template is not None and not isinstance(template, str):
            raise GatewayError(
                400, "invalid_request", "'chat_template_path' must be a string", param="chat_template_path"
            )
        try:
            job = self.gw.tokenizer_registry().submit(name, source, template)
        except TokenizerExists as exc:
            return json_response({"id": exc.existing_id, "status": "failed", "message": str(exc)}, status=409)
        return json_response(job.to_json(), status=202)

    async def list(self, _request: Request) -> Response:
        entries = self.gw.tokenizer_registry().entries() if self.gw.tokenizers_loaded else []
        return json_response({"tokenizers": [e.to_json() for e in entries]})

    async def get(self, request: Request) -> Response:
        key = request.match_info["key"]
        entry = self._entry(key)
        if entry is None:
            return _not_found(key, "tokenizer_not_found")
        return json_response(entry.to_json())

    async def status(self, request: Request) -> Response:
        key = request.match_info["key"]
        entry = self._entry(key)
        if entry is not None:
            return json_response(
                {
                    "id": entry.id,
                    "status": "completed",
                    "message": f"Tokenizer '{entry.name}' is loaded and ready",
                    "vocab_size": entry.tokenizer.vocab_size,
                }
            )
        job = self.gw.tokenizer_registry().job(key) if self.gw.tokenizers_loaded else None
        if job is None:
            return _not_found(key, "not_found")
        return json_response(job.to_json())

    async def delete(self, request: Request) -> Response:
        key = request.match_info["key"]
        entry = self.gw.tokenizer_registry().remove(key) if self.gw.tokenizers_loaded else None
        if entry is None:
            return json_response({"success": False, "message": f"Tokenizer '{key}' not found"}, status=404)
        return json_response({"success": True, "message": f"Tokenizer '{entry.name}' removed successfully"})

    async def tokenize(self, request: Request) -> Response:
        body = await _json_object(request)
        entry = self._for_model(body.get("model"))
        prompt = body.get("prompt")
        encode = entry.tokenizer.encode
        if isinstance(prompt, str):
            tokens = await asyncio.to_thread(encode, prompt) if len(prompt) > OFF_LOOP_CHARS else encode(prompt)
            return json_response({"tokens": tokens, "count": len(tokens), "char_count": len(prompt)})
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            batches = [await asyncio.to_thread(encode, p) if len(p) > OFF_LOOP_CHARS else encode(p) for p in prompt]
            return json_response(
                {"tokens": batches, "count": [len(t) for t in batches], "char_count": [len(p) for p in prompt]}
            )
        raise GatewayError(
            400, "invalid_request", "'prompt' must be a string or a non-empty array of strings", param="prompt"
        )

    async def detokenize(self, request: Request) -> Response:
        body = await _json_object(request)
        entry = self._for_model(body.get("model"))
        tokens = body.get("tokens")
        skip = body.get("skip_special_tokens", True)
        if not isinstance(skip, bool):
            raise GatewayError(
                400, "invalid_request", "'skip_special_tokens' must be a boolean", param="skip_special_tokens"
            )
        vocab = entry.tokenizer.vocab_size
        if _token_ids(tokens, vocab):
            return json_response({"text": entry.tokenizer.decode(tokens, skip_special_tokens=skip)})
        if isinstance(tokens, list) and tokens and all(_token_ids(t, vocab) for t in tokens):
            return json_response({"text": [entry.tokenizer.decode(t, skip_special_tokens=skip) for t in tokens]})
        raise GatewayError(
            400,
            "invalid_request",
            f"'tokens' must be an array of token ids in [0, {vocab}) or an array of them",
            param="tokens",
        )

    def _entry(self, key: str) -> TokenizerEntry | None:
        return self.gw.tokenizer_registry().get(key) if self.gw.tokenizers_loaded else None

    def _for_model(self, model: Any) -> TokenizerEntry:
        if model is not None and not isinstance(model, str):
            raise GatewayError(400, "invalid_request", "'model' must be a string", param="model")
        registry = self.gw.tokenizer_registry()
        entry = registry.for_model(model)
        if entry is None:
            names = ", ".join(e.name for e in registry.entries()) or "none"
            raise GatewayError(
                400, "tokenizer_not_found", f"No tokenizer for model '{model or ''}' (loaded tokenizers: {names})"
            )
        return entry


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, "invalid_json", f"Failed to parse the request body as JSON: {exc}") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "invalid_request", "The request body must be a JSON object")
    return body


def _token_ids(value: Any, vocab: int) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in value
    )


def _not_found(key: str, kind: str) -> Response:
    return json_response({"error": {"message": f"Tokenizer '{key}' not found", "type": kind}}, status=404)
