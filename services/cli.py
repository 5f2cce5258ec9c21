"""The `afterglow` command: serve a service, migrate, or play the embedded demo."""

from __future__ import annotations

import argparse
import asyncio
import sys

from shared.settings import DEFAULT_PORTS, SERVICES, Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from services.registry import build_app

    settings = Settings()
    app = build_app(args.service, settings)
    port = args.port or DEFAULT_PORTS[args.service]
    uvicorn.run(
        app,
        host=args.host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=25,
    )
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from shared.migrations import upgrade

    settings = Settings()
    targets = SERVICES if args.service == "all" else (args.service,)
    for service in targets:
        upgrade(settings.database_url, service)
        print(f"migrated {service}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from services.demo import run_demo

    return asyncio.run(run_demo(users=args.users, serve=args.serve, workdir=args.workdir))


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.stack import run_stack

    return asyncio.run(
        run_stack(logs=Path(args.logs), sandbox=args.sandbox, fail_share=args.fail_share)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afterglow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run one service over HTTP")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: the service's own port")
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("service", nargs="?", default="all", choices=(*SERVICES, "all"))
    migrate.set_defaults(run=_migrate)

    run = commands.add_parser(
        "run", help="the four services as separate processes (Kafka and PostgreSQL from env)"
    )
    run.add_argument("--logs", default=".run/logs", help="one <service>.log each (.run/logs)")
    run.add_argument(
        "--sandbox",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the sandbox provider for every channel (default: when no "
        "AFTERGLOW_PROVIDER_<CHANNEL>_URL is set)",
    )
    run.add_argument("--fail-share", type=float, default=0.02, help="sandbox failures (0.02)")
    run.set_defaults(run=_run)

    demo = commands.add_parser("demo", help="embedded mode: all four services in one process")
    demo.add_argument("--users", type=int, default=3000, help="synthetic users (default 3000)")
    demo.add_argument("--serve", action="store_true", help="keep the services up afterwards")
    demo.add_argument("--workdir", default=None, help="where the SQLite files go (default: temp)")
    demo.set_defaults(run=_demo)

    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
