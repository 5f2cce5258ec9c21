"""Fixtures of the process-level end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.e2e.scenario import FailSome
from tests.support.provider_server import ProviderServer


@pytest.fixture
async def provider() -> AsyncIterator[ProviderServer]:
    """The loopback provider every channel calls, failing some calls (see FailSome)."""
    async with ProviderServer() as server:
        server.rule = FailSome()
        yield server
