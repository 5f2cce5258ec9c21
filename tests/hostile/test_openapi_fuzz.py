"""Schemathesis against each service's own OpenAPI, on PostgreSQL.

Every operation gets requests generated from its schema, both fitting it (positive) and
breaking it (negative), with an all-scopes token. Whatever comes in, a service never answers
5xx, and every 4xx is an RFC 9457 problem whose `detail` says what was wrong (a 422 also
names the field when there is one). The run is bounded and deterministic: a fixed number of
examples per operation and mode, derandomized, no example database.

The apps run in-process through Schemathesis's ASGI transport, each owning its in-process
bus and manual clock, on a fresh PostgreSQL database (stricter than SQLite about text and
numbers).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.python import asgi as schemathesis_asgi

from services.delivery.domain import sign
from services.registry import build_app
from shared.problems import PROBLEM_MEDIA_TYPE
from shared.settings import SERVICES
from tests.conftest import fresh_database
from tests.hostile.apps import ADMIN_TOKEN, RECEIPT_SECRET, SIGNED, settings_for

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(240)]

EXAMPLES_PER_MODE = 20
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def what_is_wrong(status: int, headers: dict[str, list[str]], content: bytes) -> str | None:
    """Why this answer breaks the contract, or None."""
    if status >= 500:
        return f"answered {status}: {content[:300]!r}"
    if status < 400:
        return None
    content_type = (headers.get("content-type") or [""])[0]
    if not content_type.startswith(PROBLEM_MEDIA_TYPE):
        return f"{status} is {content_type!r}, not {PROBLEM_MEDIA_TYPE}"
    try:
        problem = json.loads(content)
    except ValueError:
        return f"{status} problem is not JSON: {content[:200]!r}"
    if problem.get("status") != status:
        return f"problem status {problem.get('status')!r} differs from the answer's {status}"
    if not isinstance(problem.get("title"), str) or not problem["title"]:
        return f"{status} problem has no title: {problem}"
    if not isinstance(problem.get("detail"), str) or not problem["detail"]:
        return f"{status} problem does not say what was wrong: {problem}"
    if status == 422:
        for error in problem.get("errors") or []:
            if not error.get("message"):
                return f"422 error without a message: {problem}"
    return None


def plain_call(case: schemathesis.Case) -> schemathesis.Response:
    return case.call(headers=AUTH)


def signed_call(case: schemathesis.Case) -> schemathesis.Response:
    """Receipts are authenticated by an HMAC of the raw body: sign what is sent."""
    if not isinstance(case.body, (dict, list, str, int, float, bool)) and case.body is not None:
        return case.call(headers=AUTH)
    raw = json.dumps(case.body).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    headers["X-Afterglow-Signature"] = sign(RECEIPT_SECRET.encode(), raw)
    return case.call(headers=headers, data=raw)


def check_operation(
    operation: Any,
    mode: schemathesis.GenerationMode,
    call: Callable[[schemathesis.Case], schemathesis.Response],
) -> list[str]:
    """Up to three broken answers of one operation in one mode."""
    seen: list[str] = []
    where = f"{operation.method.upper()} {operation.path} [{mode.value}]"

    @hypothesis.settings(
        max_examples=EXAMPLES_PER_MODE,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        try:
            response = call(case)
        except Exception as exc:
            # The ASGI transport re-raises what the app's 500 handler answered for.
            wrong: str | None = f"answered 500 for {type(exc).__name__}: {str(exc)[:300]}"
        else:
            wrong = what_is_wrong(response.status_code, response.headers, response.content)
        if wrong is not None and len(seen) < 3:
            seen.append(f"{where} {wrong}\n    {case.as_curl_command()}")

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # Nothing in this operation can be made invalid (no parameters, no body).
        if mode is not schemathesis.GenerationMode.NEGATIVE:
            raise
    return seen


def fuzz(schema: Any) -> list[str]:
    """Run every operation in both modes; return one line per broken contract."""
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        signed = (operation.method.upper(), operation.path) in SIGNED
        for mode in MODES:
            failures += check_operation(operation, mode, signed_call if signed else plain_call)
    return failures


@pytest.mark.parametrize("service", SERVICES)
async def test_no_5xx_and_every_4xx_says_what_was_wrong(
    service: str, postgres_url: str, unique: str
) -> None:
    async with fresh_database(postgres_url, f"t_fuzz_{service}_{unique}") as url:
        app = build_app(service, settings_for(service, url))

        def run() -> list[str]:
            try:
                schema = schemathesis.openapi.from_asgi("/openapi.json", app)
                return fuzz(schema)
            finally:
                schemathesis_asgi.shutdown_lifespans()

        failures = await asyncio.to_thread(run)
    assert not failures, f"{len(failures)} broken answers:\n" + "\n".join(failures)
