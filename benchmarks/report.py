"""Every benchmark at several sizes, one table, one JSON report (`make bench`).

    python -m benchmarks.report [--sizes 10000,100000,1000000] [--only delivery,metrics]
                                [--out .run/bench] [--timeout 7200]

Runs each benchmark of `BENCHMARKS` as its own process, once per size where it has a size
parameter (participants, users or touches) and once otherwise, each invocation under
an exclusive flock(2) on /tmp/afterglow-bench.lock (the lock `flock /tmp/afterglow-bench.lock
<command>` takes), held by this runner from before the benchmark starts until it has exited, so
that it never overlaps another benchmark on the machine; the wait for it is recorded apart.
Do not run the runner itself under that lock: it would wait for itself.
Each writes its figures with `--json PATH` (one flat JSON object); a benchmark without that
option is reported as missing, one that fails or runs past `--timeout` as such, with the tail
of its log, and the others go on (the stack may take 0.006 s per participant when that
is longer than `--timeout`: 100 minutes at 1,000,000). A run past its timeout gets SIGTERM (so
that it stops the processes it started and drops its database) and SIGKILL a minute
later. Peak memory is the benchmark process's own maximum resident set (from wait4: the
largest of the process and the children it waited for, such as a provider it started);
`stack` (benchmarks/stack.py) runs the four services as processes of their own and reports
each one's peak, which the table shows in a section of its own, "memory".

Writes `<out>/<benchmark>-<size>.json` and `.log` per run and `<out>/report.json`:
{"started_at", "finished_at", "sizes", "machine": {"cpus", "load_1m_at_start"},
 "runs": [{"benchmark", "size", "status" (ok, failed, timeout, missing), "command",
 "seconds", "peak_rss_mb", "lock_wait_s", "load_1m_before", "figures": {...}, "error"}]};
then prints one table: a row per figure, a column per size.

Needs AFTERGLOW_DATABASE_URL and AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS (`make up`; `make bench`
sets them). Figures measured while other work runs on the machine are pessimistic: each run
records the load average before it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
LOCK = "/tmp/afterglow-bench.lock"


def _kafka() -> list[str]:
    servers = os.environ.get("AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS")
    return ["--kafka", servers] if servers else []


@dataclass(frozen=True)
class Benchmark:
    """How to run one benchmark module at a size (None: it has no size parameter)."""

    name: str
    args: Callable[[int | None], list[str]]
    sized: bool = True
    # Figures shown first in the table, in this order, when the benchmark reports them.
    headline: tuple[str, ...] = ()
    # The module run with `python -m`; default `benchmarks.<name>`.
    module_name: str | None = None
    # Seconds a run may take at least, per item of its size, when that is more than
    # `--timeout` (the stack plans and sends every participant's touches end to end).
    seconds_per_item: float = 0.0

    def timeout_s(self, size: int | None, default_s: float) -> float:
        return max(default_s, (size or 0) * self.seconds_per_item)

    @property
    def module(self) -> str:
        return self.module_name or f"benchmarks.{self.name}"


SERVICES = ("segmentation", "scheduling", "delivery", "metrics")

BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        # The four services as processes, end to end through Kafka to a loopback provider.
        "stack",
        # Its own timeout stays under the runner's, so that it ends and cleans up itself.
        lambda n: ["--participants", str(n), "--timeout", str(max(3600, (n or 0) // 200))],
        seconds_per_item=0.006,
        headline=(
            "planned_per_s",
            "dispatched_per_s",
            "due_p50_ms",
            "due_p99_ms",
            "ingest_requests_per_s",
            "ingest_p50_ms",
            "ingest_p99_ms",
            "users_per_s",
            # Users loaded with COPY rather than PUT /v1/users (all but the first 10,000).
            "bulk_users",
        ),
    ),
    Benchmark(
        "segmentation",
        lambda n: ["--users", str(n), "--ingest", str(min(n or 0, 200_000))],
        headline=(
            "ingest_activities_per_s",
            "ingest_p50_ms",
            "ingest_p99_ms",
            "audience_events_per_s",
            "rescoring_users_per_s",
        ),
    ),
    Benchmark(
        "scheduling",
        lambda n: ["--participants", str(n)],
        headline=("planned_per_s", "dispatched_per_s", "due_p50_ms", "due_p99_ms"),
    ),
    Benchmark(
        # End to end through Kafka to a loopback provider.
        "delivery",
        # One clean and one 5xx run per size (`make bench-delivery` takes medians of three).
        # A run stops at its `--timeout` (300 s by default) whether or not every touch was
        # delivered; 1,000,000 touches took 208 s on a quiet machine and over 359 s on a busy
        # one, so the deadline grows with the size (1 ms per touch).
        lambda n: [
            "--touches",
            str(n),
            "--pairs",
            "1",
            "--timeout",
            str(max(300, (n or 0) // 1000)),
            *_kafka(),
        ],
        headline=("clean_rate", "clean_p50_ms", "clean_p99_ms", "failing_rate", "rate_loss"),
    ),
    Benchmark(
        "metrics",
        lambda n: ["--participants", str(n), "--funnel-participants", str(n)],
        headline=("aggregate_events_per_s", "funnel_p50_ms", "funnel_p99_ms"),
    ),
    Benchmark("bus", lambda n: [], sized=False, headline=("produced_per_s", "consumed_per_s")),
)


@dataclass
class Run:
    benchmark: str
    size: int | None
    status: str = "pending"
    command: list[str] = field(default_factory=list)
    seconds: float | None = None
    peak_rss_mb: float | None = None
    lock_wait_s: float | None = None
    load_1m_before: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def supports_json(bench: Benchmark) -> bool:
    """Whether `--help` lists `--json` (so a benchmark without it is reported, not run)."""
    answer = subprocess.run(
        [sys.executable, "-m", bench.module, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return answer.returncode == 0 and "--json" in answer.stdout


def stop_group(pid: int, grace_s: float = 60.0) -> tuple[int, int, Any]:
    """SIGTERM to the group (a benchmark then stops what it started and drops its database),
    SIGKILL after `grace_s`; the wait4 result of `pid`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        reaped = os.wait4(pid, os.WNOHANG)
        if reaped[0]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # whatever of the group is left
            return reaped
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return os.wait4(pid, 0)


def wait_with_rusage(process: subprocess.Popen[bytes], timeout_s: float) -> tuple[int, Any]:
    """Reap the child with wait4 (for its own peak memory); kill its group past the timeout
    or when this runner is interrupted."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                return process.returncode, usage
            if time.monotonic() > deadline:
                _, status, usage = stop_group(process.pid)
                process.returncode = os.waitstatus_to_exitcode(status)
                raise TimeoutError(usage)
            time.sleep(0.2)
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGKILL)
        os.wait4(process.pid, 0)
        raise


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_one(bench: Benchmark, size: int | None, out: Path, timeout_s: float, lock: str) -> Run:
    label = f"{bench.name}-{size}" if size is not None else bench.name
    result = Run(bench.name, size)
    json_path = out / f"{label}.json"
    log_path = out / f"{label}.log"
    json_path.unlink(missing_ok=True)
    result.command = [
        sys.executable,
        "-m",
        bench.module,
        *bench.args(size),
        "--json",
        str(json_path),
    ]
    print(f"== {label}: {' '.join(result.command)}", flush=True)
    with open(lock, "a") as held:
        waiting = time.monotonic()
        fcntl.flock(held, fcntl.LOCK_EX)
        result.lock_wait_s = round(time.monotonic() - waiting, 1)
        result.load_1m_before = round(os.getloadavg()[0], 2)
        started = time.monotonic()
        with log_path.open("wb") as log:
            # A session of its own, so that a timeout kills the benchmark and what it started.
            process = subprocess.Popen(
                result.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code, usage = wait_with_rusage(process, timeout_s)
            except TimeoutError as exc:
                code, usage = None, exc.args[0]
        result.seconds = round(time.monotonic() - started, 1)
    # ru_maxrss is in KiB on Linux.
    result.peak_rss_mb = round(usage.ru_maxrss / 1024, 1)
    if code is None:
        result.status = "timeout"
        result.error = f"killed after {timeout_s:g} s\n{tail(log_path)}"
    elif code != 0:
        result.status = "failed"
        result.error = f"exit code {code}\n{tail(log_path)}"
    else:
        try:
            loaded = json.loads(json_path.read_text())
        except (OSError, ValueError) as exc:
            result.status = "failed"
            result.error = f"no readable JSON at {json_path}: {exc}"
        else:
            if isinstance(loaded, dict):
                result.status = "ok"
                result.figures = loaded
            else:
                result.status = "failed"
                result.error = f"{json_path} is not a JSON object"
    print(f"   {result.status} in {result.seconds} s, peak {result.peak_rss_mb} MB", flush=True)
    if result.error:
        print("   " + result.error.replace("\n", "\n   "), flush=True)
    return result


def run_all(
    benches: Sequence[Benchmark], sizes: Sequence[int], out: Path, timeout_s: float, lock: str
) -> list[Run]:
    runs: list[Run] = []
    for bench in benches:
        bench_sizes: list[int | None] = list(sizes) if bench.sized else [None]
        if not supports_json(bench):
            for size in bench_sizes:
                missing = Run(bench.name, size, status="missing")
                missing.error = f"{bench.module} has no --json option: no figures collected"
                runs.append(missing)
            print(f"== {bench.name}: missing (no --json option)", flush=True)
            continue
        for size in bench_sizes:
            runs.append(run_one(bench, size, out, bench.timeout_s(size, timeout_s), lock))
    return runs


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def figure(key: str) -> Callable[[Run], Any]:
    return lambda run: run.figures.get(key)


def table(
    runs: Sequence[Run], sizes: Sequence[int], benches: Sequence[Benchmark] = BENCHMARKS
) -> str:
    """A row per figure, a column per size; benchmarks without a size fill the first column."""
    columns = [str(s) for s in sizes] or ["-"]
    rows: list[list[str]] = []
    by_bench: dict[str, list[Run]] = {}
    for run in runs:
        by_bench.setdefault(run.benchmark, []).append(run)
    headlines = {b.name: b.headline for b in benches}

    def cells(bench_runs: list[Run], pick: Callable[[Run], Any]) -> list[str]:
        found = {r.size: pick(r) for r in bench_runs}
        if list(found) == [None]:
            return [fmt(found[None])] + [""] * (len(columns) - 1)
        return [fmt(found.get(s)) if s in found else "" for s in sizes]

    for name, bench_runs in by_bench.items():
        rows.append([name, "status", *cells(bench_runs, lambda r: r.status)])
        if all(r.status == "missing" for r in bench_runs):
            continue
        rows.append(["", "wall s", *cells(bench_runs, lambda r: r.seconds)])
        rows.append(["", "peak RSS MB", *cells(bench_runs, lambda r: r.peak_rss_mb)])
        rows.append(["", "lock wait s", *cells(bench_runs, lambda r: r.lock_wait_s)])
        rows.append(["", "load 1m before", *cells(bench_runs, lambda r: r.load_1m_before)])
        keys: list[str] = [
            k for k in headlines.get(name, ()) if any(k in r.figures for r in bench_runs)
        ]
        memory = [f"{svc}_peak_rss_mb" for svc in SERVICES]
        for run in bench_runs:
            for key, value in run.figures.items():
                if key not in keys + memory and not isinstance(value, (dict, list)):
                    keys.append(key)
        for key in keys:
            rows.append(["", key, *cells(bench_runs, figure(key))])
        # Each service process's own peak, as a section of its own (the stack benchmark).
        if any(key in r.figures for r in bench_runs for key in memory):
            for i, (svc, key) in enumerate(zip(SERVICES, memory, strict=True)):
                label = f"{svc} peak RSS MB"
                rows.append(["memory" if i == 0 else "", label, *cells(bench_runs, figure(key))])
    header = ["benchmark", "figure", *columns]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        left = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        right = [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        return "  ".join(left + right).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def parse_sizes(raw: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: not a list of integers: {raw!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"--sizes: positive integers, comma-separated: {raw!r}")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=list(DEFAULT_SIZES),
        help="participants per run, comma-separated (default 10000,100000,1000000)",
    )
    names = [b.name for b in BENCHMARKS]
    parser.add_argument(
        "--only", default=",".join(names), help=f"benchmarks to run (of {', '.join(names)})"
    )
    parser.add_argument("--out", type=Path, default=Path(".run/bench"))
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per run")
    parser.add_argument("--lock", default=LOCK, help="file locked (flock) around each run")
    args = parser.parse_args(argv)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        parser.error(
            f"--only: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(names)}"
        )
    benches = [b for b in BENCHMARKS if b.name in wanted]
    args.out.mkdir(parents=True, exist_ok=True)

    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_at_start = round(os.getloadavg()[0], 2)
    runs = run_all(benches, args.sizes, args.out, args.timeout, args.lock)
    report = {
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sizes": args.sizes,
        "machine": {"cpus": os.cpu_count(), "load_1m_at_start": load_at_start},
        "runs": [run.__dict__ for run in runs],
    }
    report_path = args.out / "report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(runs, args.sizes))
    print(f"\nwritten to {report_path}")
    return 0 if all(r.status in ("ok", "missing") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
