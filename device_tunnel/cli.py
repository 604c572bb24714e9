"""``proxyorch-agent`` (and ``proxyorch device-agent``): run the device side of the tunnel.

The node is verified before any tunnel byte is sent: ``--server-fingerprint sha256:HEX`` pins its
certificate (what ``proxyorch admin tunnel-fingerprint`` prints), or ``--ca-file`` checks it against
a CA (the host in ``--server`` must match the certificate). Without either the agent exits with
status 2; ``--plaintext`` is the explicit, warned-about opt-out for nodes behind a TLS terminator.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from . import __version__

log = logging.getLogger("device_tunnel.agent")

PLAINTEXT_WARNING = ("--plaintext: the tunnel is NOT encrypted; the device token and every client byte cross "
                     "the network in the clear. Use it only where TLS is terminated in front of the node.")


def add_agent_arguments(a: argparse.ArgumentParser) -> None:
    """Every option of the agent (shared by ``proxyorch-agent`` and ``proxyorch device-agent``)."""
    a.add_argument("--server", required=True,
                   help="node HOST:PORT (the tunnel port); a comma-separated list = fail over in that order")
    a.add_argument("--device-id", required=True)
    token = a.add_mutually_exclusive_group(required=True)
    token.add_argument("--token", help="the device token")
    token.add_argument("--token-file", help="read the device token from this file (keeps it out of `ps`)")
    a.add_argument("--server-fingerprint", metavar="sha256:HEX",
                   help="pin the node's certificate (from `proxyorch admin tunnel-fingerprint`)")
    a.add_argument("--ca-file", help="verify the node's certificate against this CA bundle (PEM) and host name")
    a.add_argument("--plaintext", action="store_true",
                   help="no TLS (only where TLS is terminated in front of the node); prints a warning")
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
    a.add_argument("--rotate-command", metavar="CMD",
                   help="shell command that changes the public IP; a printed line source_address=IP makes new "
                        "target connections bind to IP")
    a.add_argument("--ip-echo-url", metavar="URL",
                   help="fetched through the device's egress at start and after each rotation to learn the public "
                        "IP (body: the address, or JSON with an 'ip' field)")
    a.add_argument("--rotate-recheck-s", type=float, default=5.0,
                   help="after a rotation that left the IP unchanged, check it once more after this many seconds")
    a.add_argument("--automation-dir", default="./automations", help="where launchAutomation code is saved")
    a.add_argument("--log-level", default="INFO")
    a.add_argument("--stats-file", metavar="PATH",
                   help="append the tunnels' outbound queue sizes by layer here every 100 ms (diagnostics)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="proxyorch-agent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"proxyorch-agent {__version__}")
    add_agent_arguments(p)
    return p


def build_config(args: argparse.Namespace, parser: argparse.ArgumentParser):  # noqa: ANN201
    """An ``AgentConfig`` from parsed options; a usage error (exit 2) when the node cannot be verified."""
    from .agent import AgentConfig, device_metadata
    from .runner import make_runner
    from .servers import parse_servers
    from .tls import client_context, parse_fingerprint, pin_verifier

    try:
        servers = parse_servers(args.server)  # HOST:PORT[,HOST:PORT...]: fail over in that order
    except ValueError as exc:
        parser.error(f"--server must be HOST:PORT[,HOST:PORT...]: {exc}")
    host, port = servers[0]
    if args.plaintext and (args.server_fingerprint or args.ca_file):
        parser.error("--plaintext cannot be combined with --server-fingerprint / --ca-file")
    if not args.plaintext and not args.server_fingerprint and not args.ca_file:
        parser.error("the node cannot be verified: pass --server-fingerprint sha256:HEX (run `proxyorch admin "
                     "tunnel-fingerprint` on the node, or take tunnel_fingerprint from the device registration) "
                     "or --ca-file PATH; --plaintext only where TLS is terminated in front of the node")
    token = args.token
    if args.token_file:
        try:
            with open(args.token_file) as fh:
                token = fh.readline().strip()
        except OSError as exc:
            parser.error(f"--token-file: {exc}")
        if not token:
            parser.error(f"--token-file {args.token_file} is empty")
    ssl_ctx = verify = None
    if not args.plaintext:
        pin = None
        if args.server_fingerprint:  # one pin, or a comma-separated list (nodes rotating certificates)
            try:
                pins = [parse_fingerprint(p) for p in args.server_fingerprint.split(",") if p.strip()]
            except ValueError as exc:
                parser.error(f"--server-fingerprint: {exc}")
            if not pins:
                parser.error("--server-fingerprint: empty")
            pin = pins[0]
            verify = pin_verifier(*pins)
        try:
            ssl_ctx = client_context(pin=pin, ca_file=args.ca_file)
        except (OSError, ValueError) as exc:
            parser.error(f"--ca-file {args.ca_file}: {exc}")
    meta_overrides = {"country": args.country.upper()} if args.country else {}
    if args.ip_echo_url and not args.ip_echo_url.startswith(("http://", "https://")):
        parser.error(f"--ip-echo-url must be an http:// or https:// URL, got {args.ip_echo_url!r}")
    return AgentConfig(host=host, port=int(port), servers=servers, device_id=args.device_id, token=token, tunnels=args.tunnels,
                       source_address=args.source_address, allow_private=args.allow_private,
                       connect_timeout=args.connect_timeout, ping_interval=args.ping_interval,
                       dead_after=args.dead_after, memory_budget=args.memory_budget, meta=device_metadata(meta_overrides),
                       runner=make_runner(args.automation_dir), ssl=ssl_ctx, verify=verify,
                       server_hostname=host if args.ca_file else None, plaintext=args.plaintext,
                       rotate_command=args.rotate_command, ip_echo_url=args.ip_echo_url,
                       rotate_recheck_s=args.rotate_recheck_s, stats_file=args.stats_file)


def _run(coro) -> object:  # noqa: ANN001
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the agent until SIGINT/SIGTERM."""
    from .agent import DeviceAgent

    config = build_config(args, parser)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.plaintext:
        log.warning(PLAINTEXT_WARNING)
    else:
        how = f"pinned {args.server_fingerprint}" if args.server_fingerprint else f"CA {args.ca_file}"
        log.info("proxyorch-agent %s: TLS to %s:%d (%s)", __version__, config.host, config.port, how)

    async def main() -> None:
        agent = DeviceAgent(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    _run(main())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run(args, parser)


if __name__ == "__main__":
    sys.exit(main())
