"""RFC 9457 problem details for every error a service answers."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

PROBLEM_MEDIA_TYPE = "application/problem+json"

log = logging.getLogger(__name__)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Problem(Exception):
    def __init__(
        self,
        status: int,
        detail: str | None = None,
        *,
        title: str | None = None,
        type: str = "about:blank",
        field: str | None = None,
        errors: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title or _phrase(status))
        self.status = status
        self.title = title or _phrase(status)
        self.detail = detail
        self.type = type
        self.field = field
        self.errors = [dict(e) for e in errors] if errors else []
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status}
        if self.detail is not None:
            body["detail"] = self.detail
        if self.field is not None:
            body["field"] = self.field
        if self.errors:
            body["errors"] = self.errors
        return {**self.extra, **body}

    def to_response(self) -> JSONResponse:
        return JSONResponse(
            self.body(), self.status, headers=self.headers, media_type=PROBLEM_MEDIA_TYPE
        )


def field_path(loc: Sequence[str | int]) -> str:
    """`("activities", 3, "amount")` -> `activities[3].amount`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def validation_problem(exc: RequestValidationError) -> Problem:
    errors: list[dict[str, Any]] = []
    for error in exc.errors():
        location, *rest = error.get("loc") or ("body",)
        path = "" if error.get("type") == "json_invalid" else field_path(rest)
        errors.append({"field": path or None, "location": location, "message": error["msg"]})
    if not errors:
        return Problem(422, "the request is not valid")
    first = errors[0]
    where = f"{first['location']}.{first['field']}" if first["field"] else first["location"]
    detail = f"{where}: {first['message']}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return Problem(422, detail, field=first["field"], errors=errors)


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.to_response()


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail: str | None = exc.detail if isinstance(exc.detail, str) else None
    if detail == _phrase(exc.status_code):
        detail = _ROUTING_DETAILS.get(exc.status_code)
        if exc.status_code == 405 and exc.headers and "Allow" in exc.headers:
            detail = f"{request.method} is not allowed here; allowed: {exc.headers['Allow']}"
    return Problem(exc.status_code, detail, headers=exc.headers).to_response()


# What the router's own errors (no route, wrong method) mean; the path is not echoed back.
_ROUTING_DETAILS = {
    404: "no route matches this path (the API is described at /docs)",
    405: "this method is not allowed on this path",
}


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return validation_problem(exc).to_response()


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return Problem(500, "an unexpected error occurred; it has been logged").to_response()


NUL_MESSAGE = "text must not contain the NUL character (U+0000)"


def _nul_path(value: Any, loc: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """Where in a parsed JSON document a string (value or key) holds U+0000, if anywhere."""
    if isinstance(value, str):
        return loc if "\x00" in value else None
    if not isinstance(value, (dict, list)):
        return None
    items: Any = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(key, str) and "\x00" in key:
            return (*loc, key)
        found = _nul_path(item, (*loc, key))
        if found is not None:
            return found
    return None


class RefuseNul:
    """Refuse U+0000 anywhere in a request's path, query or JSON body with a 422 naming where.

    PostgreSQL text cannot hold it, so without this a NUL in any identifier would reach the
    database and fail there as a 500. The body is only parsed when its bytes contain the JSON
    escape `\\u0000`; the bytes reach the app unchanged (signatures over the raw body hold).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        where: str | None = None
        if "\x00" in scope.get("path", ""):
            where = "path"
        elif b"%00" in scope.get("query_string", b""):
            where = "query"
        if where is not None:
            await self._refuse(where, None, scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if b"\\u0000" in body:
            try:
                loc = _nul_path(json.loads(body))
            except ValueError:
                loc = None  # not JSON: the app's own parsing says so
            if loc is not None:
                await self._refuse("body", field_path(loc) or None, scope, receive, send)
                return
        await self.app(scope, _replay([{"type": "http.request", "body": body}], receive), send)

    @staticmethod
    async def _refuse(
        location: str, field: str | None, scope: Any, receive: Any, send: Any
    ) -> None:
        where = f"{location}.{field}" if field else location
        error = {"field": field, "location": location, "message": NUL_MESSAGE}
        problem = Problem(422, f"{where}: {NUL_MESSAGE}", field=field, errors=[error])
        await problem.to_response()(scope, receive, send)


def _replay(messages: list[Any], receive: Any) -> Any:
    async def replayed() -> Any:
        return messages.pop(0) if messages else await receive()

    return replayed


def install_problem_handlers(app: FastAPI) -> None:
    app.add_middleware(RefuseNul)
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(Exception, _unexpected)
