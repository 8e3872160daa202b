"""The ``nspawn-mcp`` command line."""

from __future__ import annotations

import argparse
import logging
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from . import __version__
from .layout import Layout

__all__ = ["main"]


def _raise_open_file_limit() -> None:
    """Every egress sandbox may hold up to 64 relayed connections (two descriptors each): the
    soft limit of 1024 would run out long before the hard one, which is ours to take."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _serve(args: argparse.Namespace) -> int:
    from .app import build_server
    from .runtime import ServerConfig, open_service
    from .throttle import Throttle

    config = ServerConfig(
        layout=Layout.from_env(),
        policy_dirs=tuple(Path(p) for p in args.policy_dir),
        max_sandboxes=args.max_sandboxes,
        audit_log=Path(args.audit_log) if args.audit_log else None,
    )
    policies = config.load_policies()  # fail fast, before any client connects
    _raise_open_file_limit()
    throttle = Throttle(rate=args.max_calls_per_second, burst=args.max_calls_per_second * 4)
    server = build_server(lambda: open_service(config, policies), policies, throttle)

    if args.http:
        host, _, port = args.http.rpartition(":")
        server.run("streamable-http", host=host or "127.0.0.1", port=int(port))
    else:
        server.run("stdio")
    return 0


def _setup(args: argparse.Namespace) -> int:
    from .provision import QuotaMode, run_setup

    quotas = None if args.disk_quotas == "off" else QuotaMode(args.disk_quotas)
    return anyio.run(run_setup, Layout.from_env(), quotas)


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import print_report, run_checks

    return 0 if print_report(run_checks(Layout.from_env())) else 1


def _box(args: argparse.Namespace) -> int:
    from .box import find_box, start_box, stop_box

    layout = Layout.from_env()
    if args.action == "start":
        print(f"private systemd running, pid {start_box(layout).pid}")
    elif args.action == "stop":
        print("stopped" if stop_box(layout) else "not running")
    else:
        box = find_box(layout)
        print(f"running, pid {box.pid}" if box else "not running")
        return 0 if box else 3
    return 0


def _policy(args: argparse.Namespace) -> int:
    from .policy.loader import PolicyError, load_policy_file
    from .runtime import ServerConfig

    try:
        if args.action == "check":
            load_policy_file(Path(args.target))
            print(f"{args.target}: ok")
        else:
            config = ServerConfig(policy_dirs=tuple(Path(p) for p in args.policy_dir))
            policy = config.load_policies().policies.get(args.target)
            if policy is None:
                print(f"no policy named {args.target!r}", file=sys.stderr)
                return 1
            print(policy.model_dump_json(indent=2))
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _token(args: argparse.Namespace) -> int:
    from .auth.tokens import TokenError, TokenStore, default_token_file

    store = TokenStore(Path(args.file) if args.file else default_token_file(Layout.from_env()))
    try:
        if args.action == "add":
            token = store.add(args.name, args.policy, replace=args.replace)
            print(token)
            print(
                f"the token of {args.name!r}; shown only now, {store.path} keeps only its hash. "
                "Clients send it as 'Authorization: Bearer <token>'",
                file=sys.stderr,
            )
        elif args.action == "list":
            identities = store.identities()
            rows = [(i.name, ",".join(i.policies) or "(all)", i.created.isoformat()) for i in identities]
            for name, policies, created in [("NAME", "POLICIES", "CREATED"), *rows]:
                print(f"{name:<32}  {policies:<32}  {created}")
        else:
            store.remove(args.name)
            print(f"removed the token of {args.name!r}", file=sys.stderr)
    except TokenError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nspawn-mcp", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output to stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve MCP on stdio (default) or streamable HTTP")
    serve.add_argument("--http", metavar="HOST:PORT", help="serve streamable HTTP at http://HOST:PORT/mcp")
    serve.add_argument(
        "--policy-dir", action="append", default=[], help="directory of operator policies (*.toml)"
    )
    serve.add_argument("--max-sandboxes", type=int, default=64, help="live sandboxes in all (default 64)")
    serve.add_argument(
        "--max-calls-per-second",
        type=float,
        default=50,
        help="tool calls per second per client, bursts of four times that (default 50; 0: no limit)",
    )
    serve.add_argument(
        "--audit-log",
        metavar="PATH",
        help="JSON-lines audit log (default: audit.jsonl in the state directory)",
    )

    serve.set_defaults(func=_serve)

    setup = commands.add_parser("setup", help="create the image pool and the default template")
    setup.add_argument(
        "--disk-quotas",
        choices=["simple", "classic", "off"],
        nargs="?",
        const="simple",
        default="simple",
        help="btrfs quotas on the pool, which limits.*.disk needs: simple (default; Linux 6.7+, "
        "falls back to classic), classic (qgroups: slower create and destroy) or off (policies "
        "that cap disk are refused); quotas already on are left as they are",
    )
    setup.set_defaults(func=_setup)

    commands.add_parser("doctor", help="check every prerequisite").set_defaults(func=_doctor)

    box = commands.add_parser("box", help="the private systemd used where PID 1 is not systemd")
    box.add_argument("action", choices=["start", "stop", "status"])
    box.set_defaults(func=_box)

    policy = commands.add_parser("policy", help="validate or show policies")
    policy.add_argument("action", choices=["check", "show"])
    policy.add_argument("target", help="a policy file (check) or a policy name (show)")
    policy.add_argument("--policy-dir", action="append", default=[])
    policy.set_defaults(func=_policy)

    token_file = argparse.ArgumentParser(add_help=False)
    token_file.add_argument(
        "--file", metavar="PATH", help="token file (default: tokens.toml in the state directory)"
    )
    token = commands.add_parser("token", help="bearer tokens for the HTTP transport")
    token_actions = token.add_subparsers(dest="action", required=True)
    token_add = token_actions.add_parser(
        "add", parents=[token_file], help="create a token for NAME and print it, once"
    )
    token_add.add_argument("name", help="the identity the token's bearer acts as: [a-z0-9][a-z0-9_-]{0,31}")
    token_add.add_argument(
        "--policy", action="append", default=[], help="a policy it may use (repeatable; default: all)"
    )
    token_add.add_argument("--replace", action="store_true", help="replace NAME's token if it has one")
    token_actions.add_parser("list", parents=[token_file], help="names, policies and creation times")
    token_remove = token_actions.add_parser("remove", parents=[token_file], help="revoke NAME's token")
    token_remove.add_argument("name")
    token.set_defaults(func=_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
