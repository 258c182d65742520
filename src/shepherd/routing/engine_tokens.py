"""HTTP requests routed by the token ids their engine will cache, for engines that publish KV events.

Engines report what they cache as token ids (workers/kv_events.py), and cache_aware matches a request against those
reports by its own ids (`RequestContext.route_by_tokens`). A gRPC request is tokenized by the gateway anyway; an
HTTP one is tokenized here, for routing only, with its model's tokenizer (loaded for such workers as for gRPC ones)
and the same chat template and encoding the engine applies. The body goes to the worker as it came.

A model's requests are matched either all by text or all by token ids (the prefix index must not mix the two):
by ids once any of its workers reports a KV event publisher and its tokenizer is loaded. A body that cannot be
tokenized (a batch, a malformed prompt) is matched by its text and left for the worker to judge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from shepherd.routing.context import InvalidRequest, RequestContext
from shepherd.workers.worker import Worker

if TYPE_CHECKING:  # the tokenizer package (tokenizers, jinja2) is imported only where a model is tokenized
    from shepherd.tokenizer.loader import LoadedTokenizer

TokenizerFor = Callable[[str], "LoadedTokenizer | None"]


async def route_by_engine_tokens(ctx: RequestContext, workers: Sequence[Worker], tokenizer_for: TokenizerFor) -> None:
    """Match `ctx` on its token ids, for `workers` (the model's candidates) whose model has engines publishing KV
    events over ZeroMQ (the caller checks that: `Registry.publishes_kv_events`)."""
    if not workers:
        return
    model = workers[0].model_id
    tokenizer = tokenizer_for(model)
    if tokenizer is None:
        return
    if ctx.model is None and any(worker.model_id != model for worker in workers):
        return  # no model named and several served: each has its own tokenizer, so match on the text
    from shepherd.generation.prompt import prompt_ids
    from shepherd.tokenizer.loader import OFF_LOOP_BYTES

    args = (ctx.endpoint, ctx.payload, tokenizer)
    try:
        ids = await asyncio.to_thread(prompt_ids, *args) if len(ctx.body) > OFF_LOOP_BYTES else prompt_ids(*args)
    except InvalidRequest:
        return
    ctx.route_by_tokens(ids)
