from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from shared.problems import PROBLEM_MEDIA_TYPE, Problem, field_path, install_problem_handlers


class Activity(BaseModel):
    id: str
    amount: float


class Batch(BaseModel):
    activities: list[Activity]


def make_app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/teapot")
    async def teapot() -> None:
        raise Problem(418, "short and stout", field="spout", errors=[{"field": "spout"}], hint="x")

    @app.get("/gone")
    async def gone() -> None:
        raise HTTPException(410, "promotion p-1 was archived")

    @app.post("/activities")
    async def activities(batch: Batch, limit: int = 10) -> dict[str, int]:
        return {"n": len(batch.activities)}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("db password=hunter2 at 10.0.0.5")

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def test_problem_renders_rfc9457_members(client: httpx.AsyncClient) -> None:
    response = await client.get("/teapot")
    assert response.status_code == 418
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.json() == {
        "type": "about:blank",
        "title": "I'm a Teapot",
        "status": 418,
        "detail": "short and stout",
        "field": "spout",
        "errors": [{"field": "spout"}],
        "hint": "x",
    }


def test_a_bare_problem_takes_its_title_from_the_status() -> None:
    problem = Problem(404)
    assert problem.body() == {"type": "about:blank", "title": "Not Found", "status": 404}
    assert str(problem) == "Not Found"


async def test_unknown_path_is_a_404_problem(client: httpx.AsyncClient) -> None:
    response = await client.get("/nowhere")
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.json() == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "detail": "no route matches this path (the API is described at /docs)",
    }


async def test_wrong_method_is_a_405_problem_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.delete("/teapot")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert response.json()["title"] == "Method Not Allowed"
    assert response.json()["detail"] == "DELETE is not allowed here; allowed: GET"


async def test_http_exception_keeps_its_detail(client: httpx.AsyncClient) -> None:
    response = await client.get("/gone")
    assert response.status_code == 410
    assert response.json()["detail"] == "promotion p-1 was archived"


async def test_validation_names_every_offending_field(client: httpx.AsyncClient) -> None:
    body = {"activities": [{"id": "a-0", "amount": 1}] * 3 + [{"id": "a-3", "amount": "x"}]}
    response = await client.post("/activities?limit=many", json=body)
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    problem = response.json()
    assert problem["detail"].startswith("query.limit: Input should be a valid integer")
    assert problem["detail"].endswith("(and 1 more)")
    assert problem["field"] == "limit"
    assert [(e["location"], e["field"]) for e in problem["errors"]] == [
        ("query", "limit"),
        ("body", "activities[3].amount"),
    ]
    assert problem["errors"][1]["message"].startswith("Input should be a valid number")


async def test_validation_detail_for_a_single_body_error(client: httpx.AsyncClient) -> None:
    response = await client.post("/activities", json={"activities": [{"amount": 1}]})
    problem = response.json()
    assert problem["detail"] == "body.activities[0].id: Field required"
    assert problem["errors"] == [
        {"field": "activities[0].id", "location": "body", "message": "Field required"}
    ]


async def test_validation_never_echoes_the_input(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/activities", json={"activities": [{"id": "a", "amount": "+8613800000000x"}]}
    )
    assert "13800000000" not in response.text


async def test_broken_json_names_the_body(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/activities", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    problem = response.json()
    assert problem["detail"] == "body: JSON decode error"
    assert problem["errors"][0]["field"] is None


async def test_unexpected_error_is_a_generic_500_and_logged(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="shared.problems"):
        response = await client.get("/boom")
    assert response.status_code == 500
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert "hunter2" not in response.text
    assert "RuntimeError" not in response.text
    assert response.json()["title"] == "Internal Server Error"
    [record] = [r for r in caplog.records if r.name == "shared.problems"]
    assert record.exc_info is not None
    assert "GET /boom" in record.getMessage()


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        (("activities", 3, "amount"), "activities[3].amount"),
        (("user_ids", 0), "user_ids[0]"),
        (("consent", "sms"), "consent.sms"),
        ((), ""),
    ],
)
def test_field_path(loc: tuple[str | int, ...], expected: str) -> None:
    assert field_path(loc) == expected
