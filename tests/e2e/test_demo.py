"""`afterglow demo` (embedded: one process, in-process bus, SQLite) plays both promotions
to the end and its checks from the provider's log hold, on a small population."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.demo import run_demo

pytestmark = pytest.mark.timeout(240)


async def test_the_demo_plays_both_promotions_and_its_checks_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = await run_demo(users=120, serve=False, workdir=str(tmp_path))
    out = capsys.readouterr().out
    assert status == 0, out
    for line in (
        "Spring sale (spring-sale)",
        "Member week (member-week)",
        "[ok] no user over a cap (2 per 7 days, 5 per 30 days)",
        "[ok] nothing sent in a user's quiet hours (21:00-09:00 local)",
        "[ok] nothing sent after an unsubscribe or a complaint",
        "[ok] no Idempotency-Key accepted twice",
        "[ok] metrics and scheduling agree on sent touches",
    ):
        assert line in out, out
    assert "holdout:" in out and "uplift vs holdout" in out, out
