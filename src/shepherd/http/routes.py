"""The main port's route table: (method, path template) -> handler. Static paths are one dict lookup; the few
templated ones are matched segment by segment: `{name}` is one segment, `{name:.+}` one or more (a worker URL or
an `org/model` tokenizer name). Parameters are percent-decoded. HEAD is served by the GET handler."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import unquote

from shepherd.errors import GatewayError
from shepherd.exchange import Request, Response, Route, StreamResponse

Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


class RouteTable:
    def __init__(self) -> None:
        self._static: dict[str, dict[str, Route]] = {}
        self._templated: list[tuple[tuple[str, ...], dict[str, Route]]] = []

    def add(self, method: str, template: str, handler: Handler) -> None:
        route = Route(method, re.sub(r"\{(\w+):[^}]*\}", r"{\1}", template), handler)
        if "{" not in template:
            self._static.setdefault(template, {})[method] = route
            return
        segments = tuple(template.strip("/").split("/"))
        for known, methods in self._templated:
            if known == segments:
                methods[method] = route
                return
        self._templated.append((segments, {method: route}))

    def add_get(self, template: str, handler: Handler) -> None:
        self.add("GET", template, handler)

    def add_post(self, template: str, handler: Handler) -> None:
        self.add("POST", template, handler)

    def add_patch(self, template: str, handler: Handler) -> None:
        self.add("PATCH", template, handler)

    def add_delete(self, template: str, handler: Handler) -> None:
        self.add("DELETE", template, handler)

    def routes(self) -> Iterator[Route]:
        for methods in self._static.values():
            yield from methods.values()
        for _, methods in self._templated:
            yield from methods.values()

    def resolve(self, request: Request) -> Route:
        """The route for `request` (its path parameters set on `request.match_info`); 404 or 405 when none."""
        method = "GET" if request.method == "HEAD" else request.method
        methods = self._static.get(request.path)
        if methods is None:
            methods = self._match_templated(request, method)
        if methods is None:
            raise GatewayError(404, "unknown_url", f"Invalid URL ({request.method} {request.path})")
        route = methods.get(method)
        if route is None:
            allowed = sorted({*methods, *(("HEAD",) if "GET" in methods else ())})
            raise GatewayError(
                405,
                "method_not_allowed",
                f"Invalid URL ({request.method} {request.path})",
                headers={"allow": ",".join(allowed)},
            )
        return route

    def _match_templated(self, request: Request, method: str) -> dict[str, Route] | None:
        """The methods of the first template that matches the path and allows `method`, else of the first that
        matches the path at all (a 405), else None (a 404)."""
        parts = request.path[1:].split("/")
        path_match: tuple[dict[str, str], dict[str, Route]] | None = None
        for segments, methods in self._templated:
            params = _match(segments, parts)
            if params is None:
                continue
            if method in methods:
                request.match_info = params
                return methods
            if path_match is None:
                path_match = params, methods
        if path_match is None:
            return None
        request.match_info = path_match[0]
        return path_match[1]


def _match(segments: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    params: dict[str, str] = {}
    extra = len(parts) - len(segments)  # how many more parts a `{name:.+}` segment may absorb
    i = 0
    for pattern in segments:
        if i >= len(parts):
            return None
        if pattern[0] != "{":
            if pattern != parts[i]:
                return None
            i += 1
            continue
        name, _, regex = pattern[1:-1].partition(":")
        width = 1 + extra if regex == ".+" else 1
        if extra < 0 or width < 1:
            return None
        value = "/".join(parts[i : i + width])
        if not value:
            return None
        params[name] = unquote(value)
        i += width
    return params if i == len(parts) else None
