"""What an SGLang gRPC worker says about itself at registration: `GetModelInfo` and `GetServerInfo`, as SMG reads them.

The result has the shape HTTP discovery produces (`server_info`, `model_info`, `models`), so building the worker
(labels, DP ranks, KV capacity for cache_aware) is the same code for both kinds; `model_id` is the worker's served
model name, else its model path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shepherd.upstream.grpc_client import SglangClient

# From the engine's arguments, only these become labels (the rest can be long, or secret).
SERVER_ARG_LABELS = (
    "model_path",
    "served_model_name",
    "tokenizer_path",
    "tp_size",
    "dp_size",
    "pp_size",
    "context_length",
    "max_total_tokens",
    "max_running_requests",
    "load_balance_method",
    "disaggregation_mode",
    "disaggregation_bootstrap_port",
    "is_embedding",
    "vocab_size",
    "weight_version",
)


async def grpc_worker_info(client: SglangClient, timeout: float) -> dict[str, Any]:
    """Model and server info of a gRPC worker; raises ConnectionError when either RPC fails."""
    import grpc

    try:
        model_info = await client.model_info(timeout)
        server = await client.server_info(timeout)
    except grpc.aio.AioRpcError as exc:
        raise ConnectionError(f"{client.url}: {exc.code().name}: {exc.details()}") from None
    args = server.get("server_args") or {}
    server_info: dict[str, Any] = {key: args[key] for key in SERVER_ARG_LABELS if _useful(args.get(key))}
    for key in ("max_total_num_tokens", "max_running_requests"):
        value = server.get(key, args.get(key))
        if _useful(value):
            server_info[key] = int(value) if isinstance(value, float) and value.is_integer() else value
    if _useful(server.get("sglang_version")):
        server_info["version"] = server["sglang_version"]
    for key, value in server_info.items():
        if isinstance(value, float) and value.is_integer():  # protobuf Struct numbers are doubles
            server_info[key] = int(value)
    model_labels = {k: v for k, v in model_info.items() if _useful(v) and not isinstance(v, (dict, list))}
    model_id = next(
        (v for v in (model_info.get("served_model_name"), args.get("served_model_name"), model_info.get("model_path"))
         if isinstance(v, str) and v),
        None,
    )  # fmt: skip
    return {"server_info": server_info, "model_info": model_labels, "models": {}, "model_id": model_id}


def _useful(value: Any) -> bool:
    """SMG keeps non-empty strings, non-zero numbers and booleans."""
    if isinstance(value, bool):
        return True
    if isinstance(value, (int, float)):
        return value != 0
    return isinstance(value, str) and value != ""
