"""Which handler errors the consumer retries forever and which count towards the DLQ."""

from __future__ import annotations

import pytest
from asyncpg import exceptions as pg
from sqlalchemy import exc as sa_exc

from shared.consumer import is_transient


def _wrapped(orig: Exception) -> sa_exc.DBAPIError:
    # What SQLAlchemy's asyncpg dialect raises around a driver error.
    return sa_exc.DBAPIError("SELECT 1", None, orig)


@pytest.mark.parametrize(
    "error",
    [
        pg.CannotConnectNowError("the database system is starting up"),
        pg.AdminShutdownError("terminating connection due to administrator command"),
        pg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        _wrapped(pg.CannotConnectNowError("the database system is starting up")),
        ConnectionRefusedError(111, "Connect call failed"),
        TimeoutError(),
    ],
)
def test_a_database_going_away_or_starting_up_is_waited_for(error: Exception) -> None:
    # Raw asyncpg errors come from the hot paths that talk to the driver directly: a
    # PostgreSQL restart must delay their events, never send them to the DLQ.
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        pg.UniqueViolationError("duplicate key value violates unique constraint"),
        _wrapped(pg.UndefinedColumnError('column "x" does not exist')),
        ValueError("a bug"),
    ],
)
def test_a_broken_statement_or_a_bug_is_not(error: Exception) -> None:
    assert not is_transient(error)
