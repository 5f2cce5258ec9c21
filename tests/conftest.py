"""Test tiers and the real servers they need.

Tests that need Kafka or PostgreSQL read `AFTERGLOW_TEST_KAFKA` (bootstrap
servers) and `AFTERGLOW_TEST_DATABASE_URL` (an asyncpg URL); `make test`
starts both servers and sets them. Without them a test skips locally, and
fails with CI=true, so CI can never pass without having run them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _answers(hostport: str) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _require(env: str, what: str, probe: str | None) -> str:
    value = os.environ.get(env, "")
    reason = None
    if not value:
        reason = f"{env} is not set: {what} is not up (run `make up`)"
    elif probe is not None and not _answers(probe):
        reason = f"{what} at {probe} does not answer ({env}={value})"
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    return value


@pytest.fixture
def kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    value = os.environ.get("AFTERGLOW_TEST_KAFKA", "")
    first = value.split(",")[0].removeprefix("PLAINTEXT://") if value else None
    bootstrap = _require("AFTERGLOW_TEST_KAFKA", "Kafka", first)
    request.node.user_properties.append(("real_server", "Kafka"))
    return bootstrap


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> str:
    value = os.environ.get("AFTERGLOW_TEST_DATABASE_URL", "")
    probe = None
    if value:
        from sqlalchemy.engine import make_url

        url = make_url(value)
        probe = f"{url.host or '127.0.0.1'}:{url.port or 5432}"
    database = _require("AFTERGLOW_TEST_DATABASE_URL", "PostgreSQL", probe)
    request.node.user_properties.append(("real_server", "PostgreSQL"))
    return database


# Every suffix handed out this session: the topics named with one are deleted at the end.
_suffixes: set[str] = set()


@pytest.fixture
def unique() -> Iterator[str]:
    """A short unique suffix for topic, group and schema names so tests never share state."""
    suffix = uuid.uuid4().hex[:10]
    _suffixes.add(suffix)
    yield suffix


async def _delete_test_topics(bootstrap: str, suffixes: set[str]) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        ours = [t for t in await admin.list_topics() if any(s in t for s in suffixes)]
        for start in range(0, len(ours), 100):
            await admin.delete_topics(ours[start : start + 100], timeout_ms=30_000)
        return len(ours)
    finally:
        await admin.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Delete the Kafka topics this session's tests created (only theirs: others may be running).

    A broker kept by `make up` otherwise gathers hundreds of partitions per run, and with
    them open files, until it no longer starts.
    """
    bootstrap = os.environ.get("AFTERGLOW_TEST_KAFKA", "")
    if not bootstrap or not _suffixes:
        return
    import asyncio

    try:
        deleted = asyncio.run(asyncio.wait_for(_delete_test_topics(bootstrap, _suffixes), 120))
    except Exception as exc:  # tidying up must never fail the run
        print(f"\nconftest: could not delete this run's test topics: {exc!r}")
    else:
        print(f"\nconftest: deleted {deleted} test topics")


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Service settings in tests come from what the test passes, never from the shell."""
    for name in list(os.environ):
        if name.startswith("AFTERGLOW_") and not name.startswith("AFTERGLOW_TEST_"):
            monkeypatch.delenv(name)


# Each test that took a real server, by outcome: CI's log shows they ran.
_real_server_outcomes: dict[str, dict[str, int]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    for name, value in dict.fromkeys(report.user_properties):
        if name == "real_server":
            counts = _real_server_outcomes.setdefault(str(value), {})
            counts[report.outcome] = counts.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _real_server_outcomes:
        return
    terminalreporter.section("tests on real servers")
    for server, counts in sorted(_real_server_outcomes.items()):
        summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
        terminalreporter.write_line(f"{server}: {summary}")


@contextlib.asynccontextmanager
async def fresh_database(postgres_url: str, name: str) -> AsyncIterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards; yields its URL.

    Services use fixed schema names; a database of its own keeps a test from
    meeting another test's (or another run's) tables.
    """
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    from shared.db import create_database_sql

    admin = create_async_engine(postgres_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(create_database_sql(name)))
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest.fixture
async def fresh_postgres_url(postgres_url: str, unique: str) -> AsyncIterator[str]:
    async with fresh_database(postgres_url, f"t_{unique}") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[str]:
    """An empty database on each backend: a SQLite file, or a fresh PostgreSQL database
    (dropped afterwards). `@pytest.mark.parametrize("database_url", ["postgres"],
    indirect=True)` keeps one backend."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
        return
    async with fresh_database(request.getfixturevalue("postgres_url"), f"t_{unique}") as url:
        yield url
