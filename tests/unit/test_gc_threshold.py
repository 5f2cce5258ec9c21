"""The services' collector threshold: raised at start as configured, never lowered."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any, cast

import pytest

from services.scheduling.app import make_spec
from services.scheduling.config import SchedulingSettings
from shared.service import tune_gc


@pytest.fixture
def threshold() -> Iterator[int]:
    """Python's default young-generation threshold for the test, restored after it."""
    saved = gc.get_threshold()
    gc.set_threshold(700, *saved[1:])
    try:
        yield 700
    finally:
        gc.set_threshold(*saved)


def test_tune_gc_raises_the_young_threshold_and_keeps_the_older_ones(threshold: int) -> None:
    older = gc.get_threshold()[1:]
    tune_gc(50_000)
    assert gc.get_threshold() == (50_000, *older)


def test_tune_gc_never_lowers_it_and_zero_leaves_it(threshold: int) -> None:
    tune_gc(50_000)
    tune_gc(10_000)
    tune_gc(0)
    assert gc.get_threshold()[0] == 50_000


def test_scheduling_applies_its_setting_when_it_starts(
    threshold: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AFTERGLOW_SCHEDULING_GC_THRESHOLD", "250000")
    assert SchedulingSettings().gc_threshold == 250_000
    # The service's workers are made at start (shared.service's lifespan); no dispatcher
    # here, so no context is needed.
    spec = make_spec(SchedulingSettings(dispatchers=0))
    assert list(spec.workers(cast(Any, None))) == []
    assert gc.get_threshold()[0] == 250_000


def test_scheduling_default_leaves_planning_batches_out_of_young_collections(
    threshold: int,
) -> None:
    make_spec(SchedulingSettings(dispatchers=0)).workers(cast(Any, None))
    assert gc.get_threshold()[0] == 100_000
