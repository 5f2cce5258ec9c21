"""`make bench`'s runner (benchmarks/report.py): each benchmark runs as its own process under
the lock, its JSON figures are collected, and one without `--json`, one that fails or one
that runs too long is reported as such while the others go on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.report import Benchmark, Run, run_all, table

GOOD = """
import argparse, fcntl, json, os, pathlib
parser = argparse.ArgumentParser()
parser.add_argument("--participants", type=int)
parser.add_argument("--json", type=pathlib.Path)
args = parser.parse_args()
big = bytearray(args.participants * 1000)  # some memory to see in the peak
with open(os.environ["FAKE_BENCH_LOCK"], "a") as lock:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = False
    except BlockingIOError:
        locked = True  # held by the runner while this runs
figures = {"participants": args.participants, "touches_per_s": 1234.5, "locked": locked}
args.json.write_text(json.dumps(figures))
"""
NO_JSON = """
import argparse
argparse.ArgumentParser().parse_args()
"""
BROKEN = """
import argparse, sys
parser = argparse.ArgumentParser()
parser.add_argument("--json")
parser.parse_args()
print("the database is not there")
sys.exit(3)
"""
SLOW = """
import argparse, time
parser = argparse.ArgumentParser()
parser.add_argument("--json")
parser.parse_args()
time.sleep(60)
"""

TIDY = """
import argparse, os, pathlib, signal, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--json")
parser.parse_args()
def tidy(*_):
    done = pathlib.Path(os.environ["FAKE_BENCH_LOCK"]).with_name("tidied")
    done.write_text("services stopped, database dropped")
    sys.exit(0)
signal.signal(signal.SIGTERM, tidy)
time.sleep(60)
"""


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, source in {
        "good": GOOD,
        "nojson": NO_JSON,
        "broken": BROKEN,
        "slow": SLOW,
        "tidy": TIDY,
    }.items():
        (tmp_path / f"fake_bench_{name}.py").write_text(source)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FAKE_BENCH_LOCK", str(tmp_path / "bench.lock"))
    return tmp_path


def fake(name: str, sized: bool = True) -> Benchmark:
    return Benchmark(
        name,
        lambda n: ["--participants", str(n)] if sized else [],
        sized=sized,
        module_name=f"fake_bench_{name}",
        headline=("touches_per_s",),
    )


def test_figures_are_collected_and_failures_reported_without_stopping(
    fakes: Path, tmp_path: Path
) -> None:
    benches = [fake("nojson"), fake("broken", sized=False), fake("good")]
    out = tmp_path / "out"
    out.mkdir()
    runs = run_all(benches, [1000, 20000], out, 30.0, str(tmp_path / "bench.lock"))

    by = {(r.benchmark, r.size): r for r in runs}
    assert [(r.benchmark, r.size) for r in runs] == [
        ("nojson", 1000),
        ("nojson", 20000),
        ("broken", None),
        ("good", 1000),
        ("good", 20000),
    ]
    assert by["nojson", 1000].status == "missing"
    assert "no --json" in (by["nojson", 1000].error or "")
    broken = by["broken", None]
    assert broken.status == "failed"
    assert "exit code 3" in (broken.error or "")
    assert "the database is not there" in (broken.error or "")
    good = by["good", 20000]
    assert good.status == "ok"
    assert good.figures == {"participants": 20000, "touches_per_s": 1234.5, "locked": True}
    assert good.lock_wait_s is not None
    assert good.peak_rss_mb is not None and good.peak_rss_mb > 20  # 20 MB array + Python
    assert json.loads((out / "good-1000.json").read_text())["participants"] == 1000

    printed = table(runs, [1000, 20000], benches)
    assert "missing" in printed and "failed" in printed
    row = next(line for line in printed.splitlines() if "touches_per_s" in line)
    assert row.split()[-2:] == ["1,234", "1,234"]


def test_a_run_past_its_timeout_is_killed_and_reported(fakes: Path, tmp_path: Path) -> None:
    (slow,) = run_all([fake("slow", sized=False)], [10], tmp_path, 1.0, str(tmp_path / "l"))
    assert slow.status == "timeout"
    assert "killed after 1 s" in (slow.error or "")


def test_a_run_past_its_timeout_may_clean_up_before_it_is_killed(
    fakes: Path, tmp_path: Path
) -> None:
    # 3 s: time enough for the fake to start and take SIGTERM on a loaded machine.
    (tidy,) = run_all([fake("tidy", sized=False)], [10], tmp_path, 3.0, str(tmp_path / "l"))
    assert tidy.status == "timeout"
    assert (fakes / "tidied").read_text() == "services stopped, database dropped"


def test_the_table_shows_a_size_a_benchmark_did_not_run_as_blank() -> None:
    runs = [Run("good", 10, status="ok", figures={"rate": 0.5})]
    printed = table(runs, [10, 100], [fake("good")])
    assert "0.5" in printed
