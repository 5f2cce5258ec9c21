from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI

from shared.auth import (
    ADMIN,
    Caller,
    Tokens,
    install_auth,
    read_scope,
    require_scope,
    requires,
    write_scope,
)
from shared.problems import PROBLEM_MEDIA_TYPE, install_problem_handlers
from shared.settings import DEV_TOKEN, Settings

TOKENS = {
    "reader-token": frozenset({"segmentation:read"}),
    "writer-token": frozenset({"segmentation:read", "segmentation:write"}),
    "root-token": frozenset({"*"}),
}


def make_app(tokens: dict[str, frozenset[str]] | None = TOKENS) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)
    if tokens is not None:
        install_auth(app, tokens)
    router = APIRouter(prefix="/v1", dependencies=[requires(write_scope("segmentation"))])

    @router.post("/activities")
    async def write() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/v1/segments")
    async def read(
        caller: Annotated[Caller, Depends(require_scope(read_scope("segmentation")))],
    ) -> dict[str, object]:
        return {"fingerprint": caller.fingerprint, "scopes": sorted(caller.scopes)}

    @app.get("/v1/admin/thing", dependencies=[requires(ADMIN)])
    async def admin() -> dict[str, bool]:
        return {"ok": True}

    app.include_router(router)
    return app


async def call(app: FastAPI, method: str, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.request(method, path, headers=headers)


@pytest.fixture
async def app() -> AsyncIterator[FastAPI]:
    yield make_app()


async def test_missing_token_is_401_with_challenge(app: FastAPI) -> None:
    response = await call(app, "GET", "/v1/segments")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.json()["title"] == "Unauthorized"


@pytest.mark.parametrize("header", ["Basic cmVhZGVyOng=", "reader-token", "Bearer", "Bearer "])
async def test_malformed_header_is_401(app: FastAPI, header: str) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/v1/segments", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_unknown_token_is_401_invalid_token(app: FastAPI) -> None:
    response = await call(app, "GET", "/v1/segments", "reader-tokem")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert "reader-tokem" not in response.text


async def test_wrong_scope_is_403_naming_the_scope(app: FastAPI) -> None:
    response = await call(app, "POST", "/v1/activities", "reader-token")
    assert response.status_code == 403
    problem = response.json()
    assert "segmentation:write" in problem["detail"]
    assert problem["required_scope"] == "segmentation:write"
    assert 'scope="segmentation:write"' in response.headers["www-authenticate"]


async def test_right_scope_passes(app: FastAPI) -> None:
    assert (await call(app, "POST", "/v1/activities", "writer-token")).status_code == 200
    response = await call(app, "GET", "/v1/segments", "reader-token")
    assert response.status_code == 200
    body = response.json()
    assert body["scopes"] == ["segmentation:read"]
    assert "reader-token" not in body["fingerprint"]


async def test_star_grants_every_scope(app: FastAPI) -> None:
    for method, path in [
        ("GET", "/v1/segments"),
        ("POST", "/v1/activities"),
        ("GET", "/v1/admin/thing"),
    ]:
        assert (await call(app, method, path, "root-token")).status_code == 200


async def test_admin_needs_the_admin_scope(app: FastAPI) -> None:
    assert (await call(app, "GET", "/v1/admin/thing", "writer-token")).status_code == 403


async def test_development_token_from_settings() -> None:
    settings = Settings(profile="dev", api_tokens={})
    app = make_app(settings.effective_tokens())
    assert (await call(app, "GET", "/v1/admin/thing", DEV_TOKEN)).status_code == 200


async def test_apps_keep_their_own_tokens() -> None:
    other = make_app({"other-token": frozenset({"*"})})
    assert (await call(other, "GET", "/v1/segments", "root-token")).status_code == 401
    assert (await call(make_app(), "GET", "/v1/segments", "other-token")).status_code == 401


async def test_an_app_without_tokens_fails_closed() -> None:
    response = await call(make_app(tokens=None), "GET", "/v1/segments", "root-token")
    assert response.status_code == 500


def test_tokens_identify() -> None:
    tokens = Tokens({"a": ["x:read"], "b": ["*"]})
    caller = tokens.identify("a")
    assert caller is not None
    assert caller.scopes == {"x:read"}
    assert caller.has("x:read")
    assert not caller.has("x:write")
    assert tokens.identify("c") is None
    assert tokens.identify("") is None
    star = tokens.identify("b")
    assert star is not None
    assert star.has("anything")


def test_openapi_declares_the_bearer_scheme(app: FastAPI) -> None:
    schema = app.openapi()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
