"""Bearer tokens with scopes.

Scopes are named `<service>:read` and `<service>:write` (for example
`segmentation:write`); admin routes such as the manual clock need `admin`.
No scope implies another, except `*`, which grants every scope. Tokens and
their scopes come from `Settings.effective_tokens()` and live on
`app.state.tokens` (see `install_auth`), so several apps can share a process.

    router = APIRouter(dependencies=[requires(write_scope("segmentation"))])

    @router.get("/v1/segments")
    async def segments(caller: Annotated[Caller, Depends(require_scope("segmentation:read"))]):
        ...
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.problems import Problem

ADMIN = "admin"
ALL_SCOPES = "*"

_bearer = HTTPBearer(auto_error=False, scheme_name="bearer")


def read_scope(service: str) -> str:
    return f"{service}:read"


def write_scope(service: str) -> str:
    return f"{service}:write"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who called: a short fingerprint of the token (safe to log) and its scopes."""

    fingerprint: str
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return ALL_SCOPES in self.scopes or scope in self.scopes


class Tokens:
    """Known tokens, kept as SHA-256 digests and compared in constant time."""

    def __init__(self, tokens: Mapping[str, Iterable[str]]) -> None:
        self._entries = tuple((_digest(t), frozenset(s)) for t, s in tokens.items())

    def identify(self, token: str) -> Caller | None:
        candidate = _digest(token)
        found: frozenset[str] | None = None
        for digest, scopes in self._entries:
            if hmac.compare_digest(candidate, digest):
                found = scopes
        return None if found is None else Caller(candidate.hex()[:12], found)


def install_auth(app: FastAPI, tokens: Mapping[str, Iterable[str]]) -> None:
    app.state.tokens = Tokens(tokens)


def _unauthorized(detail: str, error: str | None = None) -> Problem:
    challenge = f'Bearer error="{error}"' if error else "Bearer"
    return Problem(401, detail, headers={"WWW-Authenticate": challenge})


def require_scope(scope: str) -> Callable[..., Awaitable[Caller]]:
    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Caller:
        tokens: Tokens | None = getattr(request.app.state, "tokens", None)
        if tokens is None:
            raise RuntimeError("shared.auth.install_auth was not called for this app")
        if credentials is None or not credentials.credentials:
            raise _unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        caller = tokens.identify(credentials.credentials)
        if caller is None:
            raise _unauthorized("the bearer token is not recognised", "invalid_token")
        if not caller.has(scope):
            raise Problem(
                403,
                f"this token lacks the scope {scope!r}",
                headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
                required_scope=scope,
            )
        return caller

    return dependency


def requires(scope: str) -> Any:
    """`dependencies=[requires("admin")]`, the same as `Depends(require_scope("admin"))`."""
    return Depends(require_scope(scope))
