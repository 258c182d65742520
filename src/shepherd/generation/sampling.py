"""Client sampling options -> a fully explicit `SamplingParams` and the gateway's stop configuration.

Proto3 zeros are not SGLang's defaults, so every field is always sent (reference 1.2): SGLang's defaults, then the
worker's `default_sampling_params_json`, then what the client gave. String stops are never sent to the engine
(reference 2.2 step 6): a stop string that is one token also goes to `stop_token_ids`, and all of them are matched in
the gateway. Every bad value becomes a 400 `InvalidRequest` naming the client's parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from smg_grpc_proto import sglang_scheduler_pb2 as pb

from shepherd.generation.decode import StopConfig
from shepherd.routing.context import InvalidRequest
from shepherd.tokenizer.loader import LoadedTokenizer

SGLANG_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "ignore_eos": False,
    "no_stop_trim": False,
    "n": 1,
}

CONSTRAINTS = ("regex", "json_schema", "ebnf_grammar", "structural_tag")

# OpenAI body key -> SGLang sampling field; later keys win (max_completion_tokens over max_tokens).
OPENAI_NAMES: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty",
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "skip_special_tokens": "skip_special_tokens",
    "spaces_between_special_tokens": "spaces_between_special_tokens",
    "ignore_eos": "ignore_eos",
    "no_stop_trim": "no_stop_trim",
    "n": "n",
    "logit_bias": "logit_bias",
    "regex": "regex",
    "ebnf": "ebnf_grammar",
}

# SGLang `sampling_params` key (native /generate) -> field.
SGLANG_NAMES: dict[str, str] = {
    **{name: name for name in SGLANG_DEFAULTS},
    "max_new_tokens": "max_new_tokens",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "logit_bias": "logit_bias",
    "regex": "regex",
    "json_schema": "json_schema",
    "ebnf": "ebnf_grammar",
    "structural_tag": "structural_tag",
}

# Worker defaults that may fill omitted fields (what SGLang derives from generation_config.json).
DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")


MAX_N = 128  # choices per request, as OpenAI allows: the engine runs one sub-request per choice
MAX_STOPS, MAX_STOP_CHARS = 32, 2048  # the gateway holds back every prefix of every stop string
FLOAT32_MAX = 3.4028234e38  # the proto's floats: anything larger would reach the engine as infinity
INT32 = 2**31  # the proto's integers are 32 bits wide


def number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"'{param}' must be a number", "invalid_type", param)
    if abs(value) > FLOAT32_MAX:
        raise _out_of_range(param, "a 32-bit float")
    return float(value)


def integer(value: Any, param: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{param}' must be an integer", "invalid_type", param)
    if not -INT32 <= value < INT32:
        raise _out_of_range(param, f"between {-INT32} and {INT32 - 1}")
    return value


def boolean(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{param}' must be a boolean", "invalid_type", param)
    return value


def string(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"'{param}' must be a string", "invalid_type", param)
    return value


def _out_of_range(param: str, allowed: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}' must be {allowed}", "invalid_value", param)


def _top_k(value: Any, param: str) -> int:
    value = integer(value, param)
    if value == 0:  # what the servicer does with 0 too
        return -1
    if value < -1:
        raise _out_of_range(param, "-1 (disabled) or at least 1")
    return value


def _ranged(convert: Callable[[Any, str], Any], allowed: str, ok: Callable[[Any], bool]) -> Callable[[Any, str], Any]:
    """A validator: `convert` the value (number or integer), then check it is in range (`allowed` says which)."""

    def validate(value: Any, param: str) -> Any:
        value = convert(value, param)
        if not ok(value):
            raise _out_of_range(param, allowed)
        return value

    return validate


def _stop(value: Any, param: str) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) and stop for stop in stops):
        raise InvalidRequest(f"'{param}' must be a non-empty string or an array of them", "invalid_type", param)
    if len(stops) > MAX_STOPS or sum(map(len, stops)) > MAX_STOP_CHARS:
        raise _out_of_range(param, f"at most {MAX_STOPS} strings of {MAX_STOP_CHARS} characters in all")
    return list(dict.fromkeys(stops))


def _token_ids(value: Any, param: str) -> list[int]:
    if not isinstance(value, list):
        raise InvalidRequest(f"'{param}' must be an array of token ids", "invalid_type", param)
    ids = [integer(token_id, param) for token_id in value]
    if any(token_id < 0 for token_id in ids):
        raise _out_of_range(param, "an array of non-negative token ids")
    return ids


def _logit_bias(value: Any, param: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{param}' must be an object mapping token ids to biases", "invalid_type", param)
    bias = {}
    for key, weight in value.items():
        if not (key.isascii() and key.isdigit()):
            raise InvalidRequest(f"'{param}' keys must be token ids, got '{key}'", "invalid_value", param)
        weight = number(weight, param)
        if not -100 <= weight <= 100:
            raise _out_of_range(param, "values in [-100, 100]")
        bias[str(int(key))] = weight
    return bias


def _json_schema(value: Any, param: str) -> str:
    """SGLang takes the schema as a JSON string; an object is serialized."""
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    return string(value, param)


VALIDATORS: dict[str, Callable[[Any, str], Any]] = {
    "temperature": _ranged(number, ">= 0", lambda v: v >= 0),
    "top_p": _ranged(number, "in (0, 1]", lambda v: 0 < v <= 1),
    "top_k": _top_k,
    "min_p": _ranged(number, "in [0, 1]", lambda v: 0 <= v <= 1),
    "frequency_penalty": _ranged(number, "in [-2, 2]", lambda v: -2 <= v <= 2),
    "presence_penalty": _ranged(number, "in [-2, 2]", lambda v: -2 <= v <= 2),
    "repetition_penalty": _ranged(number, "in (0, 2]", lambda v: 0 < v <= 2),
    "max_new_tokens": _ranged(integer, ">= 0", lambda v: v >= 0),
    "min_new_tokens": _ranged(integer, ">= 0", lambda v: v >= 0),
    "stop": _stop,
    "stop_token_ids": _token_ids,
    "skip_special_tokens": boolean,
    "spaces_between_special_tokens": boolean,
    "ignore_eos": boolean,
    "no_stop_trim": boolean,
    "n": _ranged(integer, f"between 1 and {MAX_N}", lambda v: 1 <= v <= MAX_N),
    "logit_bias": _logit_bias,
    "regex": string,
    "json_schema": _json_schema,
    "ebnf_grammar": string,
    "structural_tag": _json_schema,
}


def gather(source: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """The sampling fields a client gave: field -> (the client's parameter name, raw value); nulls are omitted."""
    given = {}
    for key, field_name in names.items():
        value = source.get(key)
        if value is not None:
            given[field_name] = (key, value)
    return given


def response_format_constraint(value: Any) -> str | None:
    """OpenAI `response_format` -> the `json_schema` constraint SGLang takes (None for plain text)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return '{"type":"object"}'
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest(
                "'response_format.json_schema.schema' must be an object", "invalid_value", "response_format"
            )
        return orjson.dumps(schema).decode()
    raise InvalidRequest(
        "'response_format.type' must be one of 'text', 'json_object', 'json_schema'", "invalid_value", "response_format"
    )


def build_sampling(
    given: Mapping[str, tuple[str, Any]],
    tokenizer: LoadedTokenizer,
    defaults: Mapping[str, Any] | None = None,
) -> tuple[pb.SamplingParams, StopConfig]:
    """The explicit `SamplingParams` for the engine and the stop handling for the gateway."""
    params: dict[str, Any] = dict(SGLANG_DEFAULTS)
    if defaults:
        params.update(_usable_defaults(defaults))
    for field_name, (param, value) in given.items():
        params[field_name] = VALIDATORS[field_name](value, param)

    max_new_tokens = params.get("max_new_tokens")
    if max_new_tokens is not None and params["min_new_tokens"] > max_new_tokens:
        param = given["min_new_tokens"][0]
        raise InvalidRequest(f"'{param}' must not exceed the maximum number of tokens", "invalid_value", param)
    constraints = [name for name in CONSTRAINTS if name in given]
    if len(constraints) > 1:
        names = ", ".join(given[name][0] for name in constraints)
        raise InvalidRequest(
            f"Only one constraint can be used at a time, got: {names}", "invalid_value", given[constraints[1]][0]
        )

    stop_strings: list[str] = params.get("stop", [])
    user_stop_ids: list[int] = params.get("stop_token_ids", [])
    engine_stop_ids = list(user_stop_ids)
    token_stops: dict[int, int | str] = {}
    if not params["ignore_eos"]:
        token_stops.update((token_id, token_id) for token_id in tokenizer.eos_token_ids)
    token_stops.update((token_id, token_id) for token_id in user_stop_ids)
    for stop in stop_strings:
        token_id = tokenizer.single_token_id(stop)
        if token_id is not None:
            token_stops[token_id] = stop
            if token_id not in engine_stop_ids:
                engine_stop_ids.append(token_id)

    sampling = pb.SamplingParams(
        temperature=params["temperature"],
        top_p=params["top_p"],
        top_k=params["top_k"],
        min_p=params["min_p"],
        frequency_penalty=params["frequency_penalty"],
        presence_penalty=params["presence_penalty"],
        repetition_penalty=params["repetition_penalty"],
        max_new_tokens=max_new_tokens,
        stop_token_ids=engine_stop_ids,
        skip_special_tokens=params["skip_special_tokens"],
        spaces_between_special_tokens=params["spaces_between_special_tokens"],
        n=params["n"],
        min_new_tokens=params["min_new_tokens"],
        ignore_eos=params["ignore_eos"],
        no_stop_trim=params["no_stop_trim"],
        logit_bias=params.get("logit_bias"),
    )
    if constraints:
        setattr(sampling, constraints[0], params[constraints[0]])
    stops = StopConfig(
        strings=tuple(stop_strings),
        token_stops=token_stops,
        no_stop_trim=params["no_stop_trim"],
        skip_special_tokens=params["skip_special_tokens"],
    )
    return sampling, stops


def _usable_defaults(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The worker's defaults that are valid; a bad worker value is skipped, never blamed on the client."""
    usable = {}
    for name in DEFAULTABLE:
        value = defaults.get(name)
        if value is None:
            continue
        try:
            usable[name] = VALIDATORS[name](value, name)
        except InvalidRequest:
            continue
    return usable
