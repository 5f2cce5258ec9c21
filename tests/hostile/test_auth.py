"""Every route of every service refuses a call without a token (401) and with a token that
lacks its scope (403), as RFC 9457 problems; routes are read from each app's router, so a new
route is covered without touching this file. Public routes are listed in `apps.PUBLIC`;
provider receipts are signed instead (`apps.SIGNED`) and refuse a missing or wrong signature.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from services.delivery.domain import sign
from services.registry import build_app
from shared.problems import PROBLEM_MEDIA_TYPE
from shared.settings import SERVICES
from tests.hostile.apps import SIGNED, is_public, routes, serving, settings_for, wrong_token

pytestmark = pytest.mark.timeout(120)


@contextlib.asynccontextmanager
async def running(service: str, tmp_path: Path) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = build_app(service, settings_for(service, f"sqlite+aiosqlite:///{tmp_path / service}.db"))
    async with serving(app, service) as client:
        yield app, client


def concrete(path: str) -> str:
    """`/v1/users/{user_id}` -> `/v1/users/x-1`."""
    return re.sub(r"\{[^}]+\}", "x-1", path)


def assert_problem(response: httpx.Response, status: int, where: str) -> dict[str, object]:
    assert response.status_code == status, f"{where}: {response.status_code} {response.text}"
    assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE), where
    body: dict[str, object] = response.json()
    assert body["status"] == status, where
    assert isinstance(body.get("detail"), str) and body["detail"], f"{where}: no detail"
    return body


@pytest.mark.parametrize("service", SERVICES)
async def test_every_route_refuses_a_missing_token_and_a_wrong_scope(
    service: str, tmp_path: Path
) -> None:
    async with running(service, tmp_path) as (app, client):
        guarded = [
            (method, path)
            for method, path in routes(app)
            if not is_public(path) and (method, path) not in SIGNED
        ]
        assert guarded, "no route found: the route walk is broken"
        for method, path in guarded:
            where = f"{service} {method} {path}"
            url = concrete(path)
            missing = await client.request(method, url, json={})
            body = assert_problem(missing, 401, where)
            assert "bearer token" in str(body["detail"]), where
            assert missing.headers["www-authenticate"].startswith("Bearer"), where

            unknown = await client.request(
                method, url, json={}, headers={"Authorization": "Bearer not-a-known-token"}
            )
            assert_problem(unknown, 401, where)

            wrong = await client.request(
                method,
                url,
                json={},
                headers={"Authorization": f"Bearer {wrong_token(service)}"},
            )
            body = assert_problem(wrong, 403, where)
            assert "lacks the scope" in str(body["detail"]), where
            assert 'error="insufficient_scope"' in wrong.headers["www-authenticate"], where


@pytest.mark.parametrize("service", SERVICES)
async def test_public_routes_answer_without_a_token(service: str, tmp_path: Path) -> None:
    async with running(service, tmp_path) as (app, client):
        public = [(m, p) for m, p in routes(app) if is_public(p) and "{" not in p]
        assert {"/healthz", "/readyz", "/metrics"} <= {p for _, p in public}
        for method, path in public:
            response = await client.request(method, path)
            assert response.status_code == 200, f"{service} {method} {path}: {response.text}"


async def test_receipts_refuse_a_missing_or_wrong_signature(tmp_path: Path) -> None:
    async with running("delivery", tmp_path) as (app, client):
        assert set(routes(app)) >= SIGNED, "a signed route is gone: update apps.SIGNED"
        raw = b'{"id": "t-1", "event": "opened", "at": "2026-03-08T12:00:00Z"}'
        headers = {"Content-Type": "application/json"}
        for signature in (None, sign(b"another secret", raw), "sha256=", "md5=abc"):
            sent = dict(headers)
            if signature is not None:
                sent["X-Afterglow-Signature"] = signature
            response = await client.post("/v1/receipts", content=raw, headers=sent)
            body = assert_problem(response, 401, f"signature {signature!r}")
            assert "X-Afterglow-Signature" in str(body["detail"])
