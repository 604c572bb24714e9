"""The ``proxyorch`` command: serve, admin, device-agent, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import warnings

from .config import ConfigError, load_settings, settings_help


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
    from .tunnel_cert import TunnelCertError

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
    try:
        _run(serve(settings))
    except TunnelCertError as exc:
        print(f"proxyorch serve: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a listener could not bind (address already in use, not permitted)
        print(f"proxyorch serve: cannot listen: {exc}", file=sys.stderr)
        return 1
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
    from device_tunnel.cli import run

    return run(args, args.parser)


def cmd_tunnel_fingerprint(args: argparse.Namespace) -> int:
    from .tunnel_cert import TunnelCertError, load_or_create

    settings = load_settings()
    if not settings.tunnel_tls:
        print("TUNNEL_TLS=0: the tunnel is plaintext, there is no certificate to pin", file=sys.stderr)
        return 1
    try:
        cert = load_or_create(settings)
    except TunnelCertError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(cert.fingerprint)
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

    f = asub.add_parser("tunnel-fingerprint",
                        help="print the tunnel certificate's sha256 fingerprint (creates the certificate if needed)")
    f.set_defaults(fn=cmd_tunnel_fingerprint)

    from device_tunnel.cli import add_agent_arguments

    a = sub.add_parser("device-agent", help="run the device side of the tunnel (same as proxyorch-agent)")
    add_agent_arguments(a)
    a.set_defaults(fn=cmd_device_agent, parser=a)

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
    """Run one command; a configuration error is one line on stderr and exit status 2."""
    handle_library_warnings()
    try:
        args = build_parser().parse_args(argv)
        if args.command == "admin":
            # only errors reach stderr; stdout carries the command's JSON alone
            logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
        return int(args.fn(args) or 0)
    except ConfigError as exc:
        print(f"proxyorch: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
