"""The four services as the hostile-input tests build them: each app owns its in-process bus,
its manual clock and its database, with one all-scopes token and one token holding every
scope of the *other* services (the wrong scope)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute

from shared.settings import SERVICES, ClockKind, Profile, Settings

ADMIN_TOKEN = "hostile-admin-token"
RECEIPT_SECRET = "hostile-receipt-secret"
# Routes anyone may call: probes and the Prometheus scrape (PRODUCT.md, "REST surface"), and
# the OpenAPI document with its two viewers.
PUBLIC = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc"})
# The metrics dashboard's page and assets hold no data (its API calls need a token).
PUBLIC_PREFIXES = ("/docs/", "/dashboard")
# Provider receipts carry an HMAC signature instead of a bearer token.
SIGNED = frozenset({("POST", "/v1/receipts")})


def wrong_token(service: str) -> str:
    return f"hostile-wrong-scope-for-{service}"


def wrong_scopes(service: str) -> frozenset[str]:
    """Every scope a token can have except this service's, `admin` and `*`."""
    others = [s for s in SERVICES if s != service]
    return frozenset(f"{s}:{access}" for s in others for access in ("read", "write"))


def settings_for(
    service: str, database_url: str, *, profile: Profile = Profile.DEV, **overrides: object
) -> Settings:
    values: dict[str, object] = {
        "profile": profile,
        "database_url": database_url,
        "clock": ClockKind.WALL if profile is Profile.PRODUCTION else ClockKind.MANUAL,
        "api_tokens": {
            ADMIN_TOKEN: frozenset({"*"}),
            wrong_token(service): wrong_scopes(service),
        },
        "receipt_secret": RECEIPT_SECRET,
        "outbox_poll_s": 0.05,
        "log_level": "WARNING",
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def serving(
    app: FastAPI, service: str, token: str | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and a client to it (with `token` as bearer)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=f"http://{service}", headers=headers
        ) as client,
    ):
        yield client


def routes(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path) the app answers, from its router, hidden ones included."""
    found: set[tuple[str, str]] = set()
    for path, methods in _walk(app.router.routes):
        for method in methods - {"HEAD"}:
            found.add((method, path))
    return sorted(found, key=lambda r: (r[1], r[0]))


def _walk(candidates: list[object]) -> list[tuple[str, set[str]]]:
    out: list[tuple[str, set[str]]] = []
    for route in candidates:
        if isinstance(route, APIRoute) or hasattr(route, "methods"):
            path = getattr(route, "path", None)
            methods = getattr(route, "methods", None)
            if path is not None and methods:
                out.append((path, set(methods)))
                continue
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:  # FastAPI >= 0.16x keeps included routers as a tree
            for context in contexts():
                methods = getattr(context.original_route, "methods", None)
                if methods:
                    out.append((context.path, set(methods)))
    return out


def is_public(path: str) -> bool:
    return path in PUBLIC or path.startswith(PUBLIC_PREFIXES)
