"""``electron-serve``: the command line.

    electron-serve up [--workers N] [--port 8000] [--model PATH_OR_NAME]   everything, locally
    electron-serve router --ray-address ADDR [--port 8000] [--processes N] a router on a cluster
    electron-serve worker --ray-address ADDR [--workers N] [--model ...]  workers on a cluster
                          [--fleet NAME] [--keep-workers]                (a controller)
    electron-serve down --ray-address ADDR [--fleet NAME]                 stop a fleet's workers
    electron-serve tenants add|add-key|list|revoke-key|plans ...          tenants and keys
    electron-serve migrate                                                 the database schema

Flags override environment variables, which override the YAML file (``--config``); the
merged result is validated once by ``core.config.load_config``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import uvloop

from cluster import tenants_cli
from core.config import Config, ConfigError, load_config
from core.logs import configure_logging

LOG_LEVELS = ("debug", "info", "warning", "error")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="YAML configuration file")
    common.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    common.add_argument("--log-format", choices=("text", "json"),
                        help="log lines as text or JSON (observability.log_format)")

    joining = argparse.ArgumentParser(add_help=False)
    joining.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join")

    engine = argparse.ArgumentParser(add_help=False)
    engine.add_argument("--model", metavar="PATH_OR_NAME",
                        help="GGUF file, Hugging Face directory or embedded model name")
    engine.add_argument("--dtype", help="auto, bfloat16, float16 or float32")
    engine.add_argument("--kv-cache-mb", type=int, metavar="MB", help="KV cache per worker")
    engine.add_argument("--torch-threads", type=int, metavar="N",
                        help="torch threads per CPU worker")
    engine.add_argument("--block-size", type=int, metavar="TOKENS", help="KV block size")

    scale = argparse.ArgumentParser(add_help=False)
    scale.add_argument("--workers", type=int, metavar="N", help="worker actors to start")

    fleet = argparse.ArgumentParser(add_help=False)
    fleet.add_argument("--fleet", metavar="NAME",
                       help="the worker fleet this command keeps or stops (cluster.fleet); a "
                            "controller adopts the fleet's live workers when it starts")

    keep = argparse.ArgumentParser(add_help=False)
    keep.add_argument("--keep-workers", action="store_const", const=True,
                      help="on Ctrl-C / SIGTERM leave the workers serving for the fleet's "
                           "next controller (cluster.keep_workers_on_exit)")

    router = argparse.ArgumentParser(add_help=False)
    router.add_argument("--host", help="router listen address")
    router.add_argument("--port", type=int, help="router port (0: any free port)")
    router.add_argument("--policy", help="routing policy")

    processes = argparse.ArgumentParser(add_help=False)
    processes.add_argument(
        "--processes", type=int, metavar="N",
        help="router processes accepting on one port (SO_REUSEPORT); more than one needs "
             "tenancy.redis_url (router.processes)")

    parser = argparse.ArgumentParser(
        prog="electron-serve", description="OpenAI-compatible chat serving on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("up", parents=[common, scale, engine, router],
                        help="local Ray, N workers and a router in one command")
    commands.add_parser("router", parents=[common, joining, router, processes, engine],
                        help="a router joining an existing Ray cluster")
    commands.add_parser("worker", parents=[common, joining, scale, fleet, keep, engine],
                        help="worker actors joining an existing Ray cluster (a controller)")
    commands.add_parser("down", parents=[common, joining, fleet],
                        help="drain and stop every worker of a fleet, then exit")
    tenants_cli.add_parser(commands, [common])
    commands.add_parser("migrate", parents=[common],
                        help="apply the tenancy database's schema migrations, then exit")
    return parser


def run_migrate(config: Config) -> int:
    """``electron-serve migrate``: the schema migrations of ``tenancy.database_url`` (else the
    SQLite file), once, before routers with ``tenancy.migrate_on_start: false`` start."""
    from router.tenancy.sqldb import DatabaseUnavailable, database_of

    db = database_of(config.tenancy)
    try:
        version = db.migrate()
    except DatabaseUnavailable as exc:
        print(f"electron-serve migrate: the database is unavailable: {exc}", file=sys.stderr)
        return 1
    finally:
        db.close()
    print(f"{db.dialect} schema at version {version}", flush=True)
    return 0


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config sections named by flags; flags left out are absent (the layers below win)."""
    def given(**fields: Any) -> dict[str, Any]:
        return {k: v for k, v in fields.items() if v is not None}

    kv_mb = getattr(args, "kv_cache_mb", None)
    sections = {
        "engine": given(
            model=getattr(args, "model", None), dtype=getattr(args, "dtype", None),
            kv_cache_bytes=None if kv_mb is None else kv_mb * 1024 * 1024,
            torch_threads=getattr(args, "torch_threads", None),
            block_size=getattr(args, "block_size", None)),
        "router": given(host=getattr(args, "host", None), port=getattr(args, "port", None),
                        policy=getattr(args, "policy", None),
                        processes=getattr(args, "processes", None)),
        "cluster": given(workers=getattr(args, "workers", None),
                         ray_address=getattr(args, "ray_address", None),
                         fleet=getattr(args, "fleet", None),
                         keep_workers_on_exit=getattr(args, "keep_workers", None)),
        "observability": given(log_format=getattr(args, "log_format", None)),
    }
    return {name: fields for name, fields in sections.items() if fields}


def build_config(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides=overrides_from_args(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"electron-serve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, config.observability.log_format)

    if args.command == "tenants":
        return tenants_cli.run(args, config)
    if args.command == "migrate":
        return run_migrate(config)
    # Imported here: Ray and uvicorn take a second to import, and --help should not wait.
    from cluster import launcher

    if args.command == "up":
        run = launcher.run_up(config, args.log_level)
    elif args.command == "router" and config.router.processes > 1:
        from cluster.router_processes import supervise

        run = supervise(config, args.log_level)
    elif args.command == "router":
        run = launcher.run_router(config, args.log_level)
    elif args.command == "down":
        run = launcher.run_down(config)
    else:
        run = launcher.run_worker(config)
    try:
        # uvloop: the router's per-request CPU (HTTP parsing, SSE writes, gRPC reads) is what
        # queues requests behind each other under load; libuv's loop cuts it.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run)
    except (ConfigError, launcher.StartupFailed) as exc:
        print(f"electron-serve {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: shutdown was forced
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
