"""A Kafka broker and a PostgreSQL server of one test's own, for the tests that stop and
start them (the shared servers of `make up` are never touched).

    async with private_servers(tmp) as servers:     # ports of their own, data under tmp
        servers.kafka, servers.database_url          # bootstrap servers, asyncpg URL
        await servers.stop_kafka(); await servers.start_kafka()
        await servers.stop_postgres(); await servers.start_postgres()

Both run from deploy/kafka/kafka.sh and deploy/postgres/postgres.sh with
AFTERGLOW_RUN_DIR pointing at a scratch folder; both are stopped and their data removed
when the block ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import free_ports

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"
POSTGRES_SH = REPO / "deploy" / "postgres" / "postgres.sh"


class ServerScriptError(RuntimeError):
    """A deploy script failed; the message carries the end of its output."""


@dataclass
class PrivateServers:
    run_dir: Path
    kafka_port: int
    controller_port: int
    pg_port: int

    @property
    def kafka(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def database_url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.pg_port}/afterglow"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERGLOW_")}
        return {
            **env,
            "AFTERGLOW_RUN_DIR": str(self.run_dir),
            "AFTERGLOW_KAFKA_PORT": str(self.kafka_port),
            "AFTERGLOW_KAFKA_CONTROLLER_PORT": str(self.controller_port),
            "AFTERGLOW_PG_PORT": str(self.pg_port),
            "AFTERGLOW_KAFKA_HEAP": "-Xmx384m -Xms64m",
            # Keep the user's cache of Kafka jars (the script fetches them only once).
            **(
                {"AFTERGLOW_CACHE_DIR": os.environ["AFTERGLOW_CACHE_DIR"]}
                if "AFTERGLOW_CACHE_DIR" in os.environ
                else {}
            ),
        }

    async def _run(self, script: Path, command: str, timeout_s: float = 150.0) -> None:
        proc = await asyncio.create_subprocess_exec(
            str(script),
            command,
            env=self._env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ServerScriptError(f"{script.name} {command} took over {timeout_s}s") from None
        if proc.returncode != 0:
            tail = "\n".join(out.decode(errors="replace").splitlines()[-15:])
            raise ServerScriptError(f"{script.name} {command} exited {proc.returncode}:\n{tail}")

    async def start_kafka(self) -> None:
        await self._run(KAFKA_SH, "start")

    async def stop_kafka(self) -> None:
        await self._run(KAFKA_SH, "stop")

    async def start_postgres(self) -> None:
        await self._run(POSTGRES_SH, "start")

    async def stop_postgres(self) -> None:
        await self._run(POSTGRES_SH, "stop")


def _scratch_dir() -> Path:
    run_dir = Path(tempfile.mkdtemp(prefix="afterglow-faults-", dir="/tmp"))
    run_dir.chmod(0o755)
    return run_dir


@contextlib.asynccontextmanager
async def private_servers() -> AsyncIterator[PrivateServers]:
    """Start a broker and a server on free ports with their data in a scratch folder under
    /tmp (which the `postgres` system user can enter when the tests run as root); stop both
    and remove the folder at the end."""
    run_dir = _scratch_dir()
    kafka_port, controller_port, pg_port = free_ports(3)
    servers = PrivateServers(run_dir, kafka_port, controller_port, pg_port)
    try:
        started = await asyncio.gather(
            servers.start_postgres(), servers.start_kafka(), return_exceptions=True
        )
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        yield servers
    finally:
        for stop in (servers.stop_kafka, servers.stop_postgres):
            with contextlib.suppress(ServerScriptError):
                await stop()
        shutil.rmtree(run_dir, ignore_errors=True)
