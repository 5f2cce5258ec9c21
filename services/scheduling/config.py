"""Scheduling's own settings (prefix AFTERGLOW_SCHEDULING_), beside the shared ones."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SchedulingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AFTERGLOW_SCHEDULING_", extra="ignore")

    # Due touches claimed per dispatch transaction.
    dispatch_batch: int = Field(1000, ge=1, le=20_000)
    # Longest nap of an idle dispatcher (it also wakes when the clock moves or touches
    # are planned).
    dispatch_idle_s: float = Field(1.0, gt=0)
    # After a claim that did not fill a batch, the next claim waits until this long after it
    # started, so that touches coming due one by one go out in batches (adds up to this much
    # latency; a full batch is followed at once).
    dispatch_gather_s: float = Field(0.05, ge=0, le=5)
    # Dispatcher loops per process (each claims its own batches).
    dispatchers: int = Field(1, ge=0, le=32)
    # The process's first-generation GC threshold (0: Python's 700; `shared.service.tune_gc`).
    # Planning keeps a batch's events, rows and encoded parts alive across thousands of
    # allocations; with the default the collector re-scanned them and took 9% of the CPU.
    gc_threshold: int = Field(100_000, ge=0)
