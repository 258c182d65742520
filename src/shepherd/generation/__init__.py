"""The gRPC data plane's translation layer, without I/O: client body -> `GenerateRequest`, worker messages -> bytes.

`build_plan(kind, payload, tokenizer, request_id, defaults)` validates a chat / completions / SGLang /generate body and
returns a `GenerationPlan` holding the request; `plan.new_response(model, created)` gives one response builder per
attempt (`feed(message)`, `finish()`, `error_frame(message)`). Embeddings: `build_embed_request`, `embedding_body`.
"""

from shepherd.generation.embed import build_embed_request, embedding_body
from shepherd.generation.request import GenerationPlan, build_plan
from shepherd.generation.response import ResponseBuilder

__all__ = ["GenerationPlan", "ResponseBuilder", "build_embed_request", "build_plan", "embedding_body"]
