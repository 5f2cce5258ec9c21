"""Outbox and database helpers that need no database: hashing must stay stable.

Replicas of different versions run side by side during a rolling deploy. If the
advisory-lock key of a lane changed between versions, two replicas could both
"own" one lane and publish a key's events out of order; if the SQLite schema
file name changed, an upgrade would start on an empty database. Pin them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.db import DatabaseConfigError, async_url, sqlite_schema_path
from shared.migrations import migration_lock_key
from shared.outbox import lane_for, lane_lock_key, pack, unpack


def test_lanes_are_crc32_of_the_key() -> None:
    assert [lane_for(k, 8) for k in ("alice", "bob", "user-42", "")] == [7, 0, 3, 0]
    assert all(0 <= lane_for(f"k{i}", 5) < 5 for i in range(100))


def test_lock_keys_are_pinned_signed_64_bit() -> None:
    keys = [lane_lock_key("segmentation", "outbox", lane) for lane in range(8)]
    assert len(set(keys)) == 8
    assert all(-(2**63) <= k < 2**63 for k in keys)
    assert lane_lock_key("segmentation", "outbox", 0) == PINNED_LANE_KEY
    assert lane_lock_key("scheduling", "outbox", 0) != PINNED_LANE_KEY
    assert migration_lock_key("segmentation") == PINNED_MIGRATION_KEY


def test_sqlite_schema_file_sits_beside_the_main_file(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/data/afterglow.db"
    assert sqlite_schema_path(url, "delivery") == tmp_path / "data" / "afterglow.delivery.db"
    assert sqlite_schema_path("sqlite:///rel/x.db", "metrics") == Path("rel/x.metrics.db")


def test_memory_sqlite_is_refused_with_a_reason() -> None:
    with pytest.raises(DatabaseConfigError, match="in-memory SQLite"):
        async_url("sqlite+aiosqlite:///:memory:")


PINNED_LANE_KEY = -7321294925067278419
PINNED_MIGRATION_KEY = -7402410134713089599


# -- packed rows ---------------------------------------------------------------------


@given(st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=300)), max_size=30))
def test_a_pack_gives_back_its_messages_in_order(messages: list[tuple[str, bytes]]) -> None:
    assert unpack(pack(messages)) == messages


def test_the_pack_layout_is_pinned() -> None:
    """Rows written by one version are read by the next (and by `pack_sql` on PostgreSQL)."""
    assert pack([("é", b"{}"), ("", b"")]) == (
        b"\x00\x00\x00\x02\xc3\xa9\x00\x00\x00\x02{}" + b"\x00\x00\x00\x00" * 2
    )


@pytest.mark.parametrize(
    ("blob", "problem"),
    [
        (pack([("k", b"value")])[:-1], "overruns"),
        (pack([("k", b"value")])[:3], "malformed outbox pack at byte 0"),
        (b"\x00\x00\x00\x01k\x00\x00", "malformed outbox pack at byte 5"),
        (b"\x00\x00\x00\x01\xff\x00\x00\x00\x00", "malformed outbox pack at byte 0"),
    ],
)
def test_a_damaged_pack_is_refused_with_where(blob: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        unpack(blob)
