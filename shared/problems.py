"""RFC 9457 problem details for every error a service answers."""

from __future__ import annotations

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
        detail = None
    return Problem(exc.status_code, detail, headers=exc.headers).to_response()


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return validation_problem(exc).to_response()


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return Problem(500, "an unexpected error occurred; it has been logged").to_response()


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(Exception, _unexpected)
