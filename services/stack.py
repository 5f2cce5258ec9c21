"""The four services as separate processes: `afterglow run` (and `make run`), and the
end-to-end tests that start, kill and restart them.

Each service is `afterglow serve <name>` in a process group of its own, its output in
`<logs>/<name>.log`; `wait_ready()` polls every `/readyz`; `stop()` ends them with
SIGTERM (they drain their consumers) and SIGKILL after a grace period. Children also
get SIGTERM when the launcher dies (Linux parent-death signal), so none outlives it.

When no `AFTERGLOW_PROVIDER_<CHANNEL>_URL` is configured, `afterglow run` adds the
sandbox provider (services/sandbox.py) as a fifth process and points every channel
at it, so that a developer's stack delivers somewhere without real credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from shared.settings import CHANNELS, DEFAULT_PORTS, SERVICES

SANDBOX_PORT = 8009
DEV_RECEIPT_SECRET = "dev-receipt-secret"
_PR_SET_PDEATHSIG = 1


class StackError(RuntimeError):
    """A process of the stack did not start, or exited while it should run."""


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGTERM when the launcher goes away.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Proc:
    """One child process: its command, log file and (while it runs) the Popen."""

    name: str
    argv: list[str]
    log_path: Path
    port: int
    popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, env: Mapping[str, str]) -> None:
        if self.running():
            raise StackError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def signal(self, signum: int) -> None:
        """Send `signum` to the process group (the service and anything it started)."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signum)

    async def wait_exit(self, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while self.popen is not None and self.popen.poll() is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)
        return self.popen.returncode if self.popen is not None else None

    async def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`; always closes the log file."""
        try:
            self.signal(signal.SIGTERM)
            if await self.wait_exit(grace_s) is None:
                self.signal(signal.SIGKILL)
                await self.wait_exit(5.0)
        finally:
            self.close_log()

    def kill(self) -> None:
        """SIGKILL the process group at once (fault injection); no clean shutdown."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5.0)
        self.close_log()

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def service_argv(name: str, port: int, python: str = sys.executable) -> list[str]:
    return [python, "-m", "services.cli", "serve", name, "--port", str(port)]


def sandbox_argv(port: int, fail_share: float, python: str = sys.executable) -> list[str]:
    return [
        python,
        "-m",
        "services.sandbox",
        "--port",
        str(port),
        "--fail-share",
        str(fail_share),
    ]


def provider_configured(env: Mapping[str, str]) -> bool:
    return any(env.get(f"AFTERGLOW_PROVIDER_{c.upper()}_URL", "").strip() for c in CHANNELS)


def with_provider(env: Mapping[str, str], url: str) -> dict[str, str]:
    """`env` with every channel's provider URL pointing at `url`."""
    return {**env, **{f"AFTERGLOW_PROVIDER_{c.upper()}_URL": url for c in CHANNELS}}


class Stack:
    """The four services (and optional extra processes) started and stopped together."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        logs: Path,
        ports: Mapping[str, int] | None = None,
        services: Iterable[str] = SERVICES,
        token: str | None = None,
        python: str = sys.executable,
    ) -> None:
        self.env = dict(env)
        self.logs = Path(logs)
        self.ports = {**DEFAULT_PORTS, **(ports or {})}
        self.token = token
        self.python = python
        self.procs: dict[str, Proc] = {
            name: Proc(
                name,
                service_argv(name, self.ports[name], python),
                self.logs / f"{name}.log",
                self.ports[name],
            )
            for name in services
        }
        self.extras: dict[str, Proc] = {}

    def url(self, name: str) -> str:
        return self.procs[name].url

    def add_sandbox(self, *, port: int = SANDBOX_PORT, fail_share: float = 0.0) -> str:
        """Run the sandbox provider beside the services and point every channel at it."""
        proc = Proc(
            "sandbox",
            sandbox_argv(port, fail_share, self.python),
            self.logs / "sandbox.log",
            port,
        )
        self.extras["sandbox"] = proc
        self.env = with_provider(self.env, proc.url)
        return proc.url

    def _all(self) -> list[Proc]:
        return [*self.extras.values(), *self.procs.values()]

    def start(self) -> None:
        for proc in self._all():
            proc.start(self.env)

    def restart(self, name: str) -> None:
        """Start a service again (after `kill` or `stop`), with the same settings."""
        self.procs[name].close_log()
        self.procs[name].start(self.env)

    async def wait_ready(self, timeout_s: float = 60.0, names: Iterable[str] | None = None) -> None:
        """Until every service answers 200 on /readyz; raises with the log tail if one exits."""
        waiting = {n: self.procs[n] for n in (names or self.procs)}
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            for proc in self.extras.values():
                await self._wait_port(proc, deadline)
            while waiting:
                for name, proc in list(waiting.items()):
                    if not proc.running():
                        raise StackError(
                            f"{name} exited with status {proc.popen and proc.popen.returncode}; "
                            f"last lines of {proc.log_path}:\n{proc.tail()}"
                        )
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(f"{proc.url}/readyz")).status_code == 200:
                            del waiting[name]
                if not waiting:
                    return
                if time.monotonic() > deadline:
                    tails = "\n".join(f"--- {n}:\n{p.tail()}" for n, p in waiting.items())
                    raise StackError(
                        f"not ready after {timeout_s:.0f} s: {', '.join(waiting)}\n{tails}"
                    )
                await asyncio.sleep(0.2)

    @staticmethod
    async def _wait_port(proc: Proc, deadline: float) -> None:
        while True:
            if not proc.running():
                raise StackError(f"{proc.name} exited; last lines:\n{proc.tail()}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", proc.port)
                writer.close()
                return
            if time.monotonic() > deadline:
                raise StackError(f"{proc.name} does not listen on port {proc.port}")
            await asyncio.sleep(0.1)

    async def stop(self, grace_s: float = 20.0) -> None:
        """Every process ends: SIGTERM to all at once, SIGKILL to those still up after grace."""
        await asyncio.gather(*(proc.stop(grace_s) for proc in reversed(self._all())))

    def kill_all(self) -> None:
        for proc in self._all():
            proc.kill()

    def exited(self) -> dict[str, int]:
        """Processes that ended on their own, with their exit status."""
        return {
            p.name: p.popen.returncode
            for p in self._all()
            if p.popen is not None and p.popen.returncode is not None
        }


def dev_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment `make run` gives the services: the shell's, with dev defaults."""
    env = dict(environ)
    env.setdefault("AFTERGLOW_PROFILE", "dev")
    env.setdefault("AFTERGLOW_LOG_FORMAT", "json")
    env.setdefault("AFTERGLOW_RECEIPT_SECRET", DEV_RECEIPT_SECRET)
    # The services import `services`/`shared` from the working tree.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    return env


async def run_stack(
    *,
    logs: Path,
    sandbox: bool | None,
    fail_share: float,
    environ: Mapping[str, str] | None = None,
    on_ready: Callable[[Stack], None] | None = None,
) -> int:
    """`afterglow run`: start, wait until ready, print where things are, stop on Ctrl-C."""
    env = dev_env(os.environ if environ is None else environ)
    missing = [
        name
        for name in ("AFTERGLOW_DATABASE_URL", "AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS")
        if not env.get(name)
    ]
    if missing:
        print(
            f"{' and '.join(missing)} not set: run `make up` and load .run/env "
            "(`make run` does both)",
            file=sys.stderr,
        )
        return 2
    stack = Stack(env, logs=logs)
    use_sandbox = not provider_configured(env) if sandbox is None else sandbox
    if use_sandbox:
        stack.add_sandbox(fail_share=fail_share)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        stack.start()
        print(f"starting {', '.join(stack.procs)}; logs in {logs}/", flush=True)
        ready = asyncio.create_task(stack.wait_ready(timeout_s=120))
        stop_wait = asyncio.create_task(stopping.wait())
        await asyncio.wait({ready, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            return 130
        stop_wait.cancel()
        ready.result()
        for name, proc in stack.procs.items():
            print(f"  {name:<13} {proc.url}  (docs {proc.url}/docs, pid {proc.pid})")
        if "sandbox" in stack.extras:
            print(f"  {'sandbox':<13} {stack.extras['sandbox'].url}  (provider for every channel)")
        if "metrics" in stack.procs:
            token = "dev-token" if not env.get("AFTERGLOW_API_TOKENS") else "<token>"
            print(f"  dashboard     {stack.url('metrics')}/dashboard#token={token}")
        print("Ctrl-C stops them all.", flush=True)
        if on_ready is not None:
            on_ready(stack)
        while not stopping.is_set():
            gone = stack.exited()
            if gone:
                print(f"exited on its own: {gone}; stopping the rest", file=sys.stderr)
                return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 1.0)
        return 0
    except StackError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        print("stopping...", flush=True)
        await stack.stop()
        print("stopped.", flush=True)
