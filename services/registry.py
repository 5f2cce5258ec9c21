"""The four services by name, for the command line and the embedded mode."""

from __future__ import annotations

import importlib

from fastapi import FastAPI

from shared.bus import Bus
from shared.clock import Clock
from shared.service import ServiceSpec
from shared.settings import SERVICES, Settings


def spec_of(service: str) -> ServiceSpec:
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; choose one of {', '.join(SERVICES)}")
    module = importlib.import_module(f"services.{service}.app")
    spec: ServiceSpec = module.SPEC
    return spec


def build_app(
    service: str,
    settings: Settings | None = None,
    *,
    bus: Bus | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    return spec_of(service).create_app(settings, bus=bus, clock=clock)
