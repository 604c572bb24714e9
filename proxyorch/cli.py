"""The ``proxyorch`` command: serve, admin, device-agent, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import warnings

from .config import load_settings, settings_help


def _run(coro) -> object:  # noqa: ANN001
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


async def _with_pool(fn):  # noqa: ANN001, ANN202
    from . import db
    from .node import resolve_database_url

    settings = load_settings()
    url = await asyncio.to_thread(resolve_database_url, settings)
    pool = await db.create_pool(url, min_size=1, max_size=2)
    try:
        await db.migrate(pool)
        return await fn(pool, settings)
    finally:
        await pool.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from .cluster_config import ClusterConfigError, validate
    from .node import serve

    settings = load_settings()
    if args.workers is not None:
        settings.workers = args.workers
    try:
        validate(settings, supervisor=settings.workers > 1)
    except ClusterConfigError as exc:
        for problem in exc.problems:
            print(f"proxyorch serve: configuration error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.workers > 1:
        from .supervisor import supervise

        return supervise(settings)
    _run(serve(settings))
    return 0


def cmd_create_user(args: argparse.Namespace) -> int:
    from . import accounts

    async def go(pool, _s):  # noqa: ANN001, ANN202
        user_id, token = await accounts.create_user(pool, args.name)
        return {"user_id": user_id, "token": token}

    print(json.dumps(_run(_with_pool(go))))
    return 0


def cmd_create_device(args: argparse.Namespace) -> int:
    from . import accounts

    async def go(pool, _s):  # noqa: ANN001, ANN202
        return await accounts.create_device(pool, args.user, args.name)

    print(json.dumps(_run(_with_pool(go))))
    return 0


def cmd_create_connection(args: argparse.Namespace) -> int:
    from rms.crypto import PasswordBox, load_or_create_key
    from rms.service import Rms, RmsError

    async def go(pool, s):  # noqa: ANN001, ANN202
        owner = await pool.fetchval("SELECT user_id FROM devices WHERE remote_device_id = $1::uuid", args.device)
        if owner is None:
            raise RmsError(404, "device not found")
        rms = Rms(pool, PasswordBox(load_or_create_key(s.rms_key, s.data_dir)))
        conn = await rms.create(str(owner), args.device, args.name)
        return {"connectionId": conn["connectionId"], "password": conn["password"]}

    try:
        print(json.dumps(_run(_with_pool(go))))
    except RmsError as exc:
        print(json.dumps({"error": exc.message}), file=sys.stderr)
        return 1
    return 0


def cmd_device_agent(args: argparse.Namespace) -> int:
    from device_tunnel.agent import AgentConfig, DeviceAgent, device_metadata
    from device_tunnel.runner import make_runner

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, _, port = args.server.rpartition(":")
    meta_overrides = {}
    if args.country:
        meta_overrides["country"] = args.country
    config = AgentConfig(host=host.strip("[]") or "127.0.0.1", port=int(port), device_id=args.device_id,
                         token=args.token, tunnels=args.tunnels, source_address=args.source_address,
                         allow_private=args.allow_private, connect_timeout=args.connect_timeout,
                         ping_interval=args.ping_interval, dead_after=args.dead_after,
                         memory_budget=args.memory_budget,
                         meta=device_metadata(meta_overrides), runner=make_runner(args.automation_dir))

    async def main() -> None:
        agent = DeviceAgent(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    _run(main())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.__main__ import main as bench_main

    return bench_main(["--quick"] if args.quick else [])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="proxyorch", description="Mobile proxy orchestrator")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one node (proxy, tunnels, API)", epilog=settings_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--workers", type=int, help="node processes sharing the ports (default: WORKERS or 1)")
    serve.set_defaults(fn=cmd_serve)

    admin = sub.add_parser("admin", help="administrative commands (use the same DATA_DIR / DATABASE_URL)")
    asub = admin.add_subparsers(dest="admin_command", required=True)
    u = asub.add_parser("create-user", help="create a user and print its API token")
    u.add_argument("--name", required=True)
    u.set_defaults(fn=cmd_create_user)
    d = asub.add_parser("create-device", help="register a device and print its token")
    d.add_argument("--user", required=True)
    d.add_argument("--name")
    d.set_defaults(fn=cmd_create_device)
    c = asub.add_parser("create-connection", help="create a proxy credential routed through a device")
    c.add_argument("--device", required=True)
    c.add_argument("--name")
    c.set_defaults(fn=cmd_create_connection)

    a = sub.add_parser("device-agent", help="run the device side of the tunnel")
    a.add_argument("--server", required=True, help="node HOST:PORT (the tunnel port)")
    a.add_argument("--device-id", required=True)
    a.add_argument("--token", required=True)
    a.add_argument("--source-address", help="bind outgoing target connections to this local address")
    a.add_argument("--allow-private", action="store_true",
                   help="allow private, loopback and link-local targets (off by default)")
    a.add_argument("--tunnels", type=int, default=1, help="parallel tunnel connections")
    a.add_argument("--connect-timeout", type=float, default=10.0)
    a.add_argument("--ping-interval", type=float, default=float(os.environ.get("TUNNEL_PING_S", 5)),
                   help="seconds between keep-alive pings")
    a.add_argument("--dead-after", type=float, default=float(os.environ.get("TUNNEL_DEAD_AFTER", 15)),
                   help="declare the node dead after this many silent seconds and reconnect")
    a.add_argument("--memory-budget", type=int, default=256 * 1024 * 1024,
                   help="bytes of receive window all tunnels of this agent may grant together")
    a.add_argument("--country", help="ISO country code reported in the handshake")
    a.add_argument("--automation-dir", default="./automations", help="where launchAutomation code is saved")
    a.add_argument("--log-level", default="INFO")
    a.set_defaults(fn=cmd_device_agent)

    b = sub.add_parser("bench", help="run the benchmarks and write benchmarks/RESULTS.md")
    b.add_argument("--quick", action="store_true")
    b.set_defaults(fn=cmd_bench)
    return p


def handle_library_warnings() -> None:
    """Keep library warnings out of the command's output.

    Warnings become log records (``py.warnings``) instead of raw text on stderr, so ``admin``
    commands print their JSON and nothing else. platformdirs' ``RuntimeDirWarning`` (XDG_RUNTIME_DIR
    unset: the embedded PostgreSQL's lock directory falls back to /tmp/runtime-UID, which works)
    is dropped altogether.
    """
    warnings.filterwarnings("ignore", message=r"XDG_RUNTIME_DIR is not set")
    logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    handle_library_warnings()
    args = build_parser().parse_args(argv)
    if args.command == "admin":
        # only errors reach stderr; stdout carries the command's JSON alone
        logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
