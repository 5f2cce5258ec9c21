"""The dashboard page for marketing people: static HTML, JS and CSS (package data in
services/metrics/static), no CDN. The page itself is public and holds no data; it asks
for a token with the metrics:read scope and calls the JSON API with it (README)."""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(tags=["dashboard"], include_in_schema=False)

FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
HEADERS = {
    # Only this origin: no inline script, no third party, no framing.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@functools.cache
def asset(name: str) -> bytes:
    return resources.files("services.metrics.static").joinpath(name).read_bytes()


@router.get("/dashboard")
async def dashboard() -> Response:
    """The page (public; its data calls need a metrics:read token)."""
    return Response(asset("dashboard.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/dashboard/dashboard.js")
async def dashboard_js() -> Response:
    return Response(asset("dashboard.js"), media_type=FILES["dashboard.js"], headers=HEADERS)


@router.get("/dashboard/dashboard.css")
async def dashboard_css() -> Response:
    return Response(asset("dashboard.css"), media_type=FILES["dashboard.css"], headers=HEADERS)
