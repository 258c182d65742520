"""HF chat templates rendered the way transformers' `apply_chat_template` renders them.

The environment, globals and filters mirror transformers (sandboxed jinja2, `trim_blocks`/`lstrip_blocks`,
`loopcontrols`, `raise_exception`, `strftime_now`, a non-escaping `tojson`), so a template written for a model
renders here to the same text and therefore to the same token ids as in the engine's own tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Variables the renderer sets itself; `chat_template_kwargs` cannot override them.
_RESERVED = frozenset({"messages", "add_generation_prompt", "tools", "documents"})


class ChatTemplateError(ValueError):
    """A chat template failed to compile or to render (the request is at fault, not the gateway)."""


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers tracks assistant spans with it; here it just renders."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


def _flatten_content(content: Any) -> Any:
    if not isinstance(content, list):
        return content
    texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
    return "\n".join(texts)


def _prepare_tool_calls(tool_calls: Any) -> Any:
    if not isinstance(tool_calls, list):
        return tool_calls
    prepared = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except ValueError:
                arguments = function["arguments"]  # not JSON: the template gets the string as sent
            call = {**call, "function": {**function, "arguments": arguments}}
        prepared.append(call)
    return prepared


def prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages -> what HF string templates expect (new dicts; the input is not modified).

    Content arrays become their text parts joined with "\\n", an assistant message without content gets
    `content: None`, and tool-call `arguments` sent as a JSON string become objects (templates `tojson` them).
    """
    prepared = []
    for message in messages:
        out = dict(message)
        if "content" in out:
            out["content"] = _flatten_content(out["content"])
        elif out.get("role") == "assistant":
            out["content"] = None
        if "tool_calls" in out:
            out["tool_calls"] = _prepare_tool_calls(out["tool_calls"])
        prepared.append(out)
    return prepared


class ChatTemplate:
    """One compiled chat template; `render` is safe to call from several threads."""

    __slots__ = ("_template", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template syntax error (line {exc.lineno}): {exc.message}") from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Render OpenAI `messages` (run through `prepare_messages` here) to the prompt text.

        `tools`/`documents` stay undefined in the template when None, so `{% if tools is defined %}` works.
        """
        context: dict[str, Any] = dict(special_tokens or {})
        context.update((k, v) for k, v in (template_kwargs or {}).items() if k not in _RESERVED)
        context["messages"] = prepare_messages(messages)
        context["add_generation_prompt"] = add_generation_prompt
        if tools is not None:
            context["tools"] = tools
        if documents is not None:
            context["documents"] = documents
        try:
            return self._template.render(context)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template error: {exc.message or type(exc).__name__}") from exc
        except Exception as exc:  # a template doing `'a' + none`, `x[5]` out of range, ...
            raise ChatTemplateError(f"chat template error: {type(exc).__name__}: {exc}") from exc
