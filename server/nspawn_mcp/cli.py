"""The nspawn-mcp command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from . import __version__
from .layout import Layout

if TYPE_CHECKING:
    from .daemon.main import DaemonConfig
    from .daemon.operator import OperatorRequest
    from .daemon.unit import DaemonOptions
    from .records import LiveSandbox

__all__ = ["main"]

_DEFAULT_MAX_SANDBOXES = 64
_DEFAULT_CALL_RATE = 50.0
_ROOT_COMMANDS = frozenset({"daemon", "setup", "image", "box", "token"})
"""Commands that drive systemd, machined, the pool or the state directory: root only, said in one line."""


def _one_line(message: object) -> str:
    """An error as one line (a policy error lists its fields on lines of their own)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _fail(message: object) -> int:
    print(f"nspawn-mcp: {_one_line(message)}", file=sys.stderr)
    return 1


def _not_root(command: str) -> str:
    return (
        f"{command} needs root: the daemon drives systemd, machined and the sandbox pool "
        "(run it with sudo, or as root in the MCP client's command)"
    )


def _daemon_config(args: argparse.Namespace) -> DaemonConfig:
    from .daemon.main import DaemonConfig, HttpAddress
    from .runtime import ServerConfig

    try:
        http = HttpAddress.parse(args.http) if args.http else None
    except ValueError as exc:
        raise SystemExit(f"nspawn-mcp: {exc}") from None
    return DaemonConfig(
        http=http,
        http_names=tuple(args.http_host_name),
        server=ServerConfig(
            layout=Layout.from_env(),
            policy_dirs=tuple(Path(p).absolute() for p in args.policy_dir),
            max_sandboxes=args.max_sandboxes,
            warm_pool=not args.no_warm_pool,
            audit_log=Path(args.audit_log).absolute() if args.audit_log else None,
        ),
        max_calls_per_second=args.max_calls_per_second,
        socket_group=args.socket_group,
        options=_daemon_arguments(args),
    )


def _daemon_arguments(args: argparse.Namespace) -> tuple[str, ...]:
    """The options to start the daemon with, as given to this command (absolute paths; defaults left out)."""
    arguments: list[str] = []
    for directory in args.policy_dir:
        arguments += ["--policy-dir", str(Path(directory).absolute())]
    if args.max_sandboxes != _DEFAULT_MAX_SANDBOXES:
        arguments += ["--max-sandboxes", str(args.max_sandboxes)]
    if args.no_warm_pool:
        arguments += ["--no-warm-pool"]
    if args.max_calls_per_second != _DEFAULT_CALL_RATE:
        arguments += ["--max-calls-per-second", f"{args.max_calls_per_second:g}"]
    if args.audit_log:
        arguments += ["--audit-log", str(Path(args.audit_log).absolute())]
    if args.socket_group:
        arguments += ["--socket-group", args.socket_group]
    if args.http:
        arguments += ["--http", args.http]
    for name in args.http_host_name:
        arguments += ["--http-host-name", name]
    return tuple(arguments)


def _serve(args: argparse.Namespace) -> int:
    from .daemon.main import DaemonError, check_config
    from .daemon.unit import DaemonOptions, start_daemon
    from .frontend.stdio import serve_stdio, stdio_streams

    layout = Layout.from_env()
    try:
        check_config(_daemon_config(args))  # reported here, not as a daemon that does not start
        if os.geteuid() != 0:
            _check_reachable(layout)
    except DaemonError as exc:
        message = _one_line(exc)
        _refuse_mcp_client(f"nspawn-mcp cannot serve: {message}")
        return _fail(message)
    options = DaemonOptions(_daemon_arguments(args))
    if args.http:
        return _serve_http(layout, options, args.http)

    async def ensure_daemon() -> None:
        await start_daemon(layout, options)

    stdin, stdout = stdio_streams()
    asked = options.arguments or None  # no options: any running daemon will do
    anyio.run(serve_stdio, ensure_daemon, str(layout.daemon_socket), asked, stdin, stdout)
    return 0


def _check_reachable(layout: Layout) -> None:
    """For a non-root ``serve``: the daemon must run already, with a socket this user may use
    (``--socket-group``); only root can start it."""
    import socket

    from .daemon.main import DaemonError

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(layout.daemon_socket))
        except OSError as exc:
            raise DaemonError(
                f"serve as uid {os.geteuid()} needs a running daemon whose socket you may use, and "
                f"{layout.daemon_socket} is not ({exc.strerror}): run serve as root (it starts the "
                "daemon), or have root start it with --socket-group GROUP, a group of yours"
            ) from None


def _refuse_mcp_client(message: str) -> None:
    """Answer the MCP client's ``initialize`` with the reason serve cannot start (an MCP client
    shows that; a server that only exits is a closed connection to it). Waits a few seconds at most."""
    import json
    import select

    if sys.stdin.isatty():
        return
    try:
        ready, _, _ = select.select([sys.stdin], [], [], 5.0)
        line = sys.stdin.buffer.readline(1 << 20) if ready else b""
        request = json.loads(line) if line else None
    except (OSError, ValueError):
        return
    if isinstance(request, dict) and request.get("method") == "initialize" and "id" in request:
        error = {"code": -32603, "message": message}
        answer = {"jsonrpc": "2.0", "id": request["id"], "error": error}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def _serve_http(layout: Layout, options: DaemonOptions, address: str) -> int:
    """HTTP is served by the daemon itself: start it with this address, or check the running one has it."""
    from .daemon.unit import start_daemon
    from .errors import BackendError
    from .frontend.stdio import DaemonUnreachable, verify_daemon

    try:
        anyio.run(start_daemon, layout, options)
        anyio.run(verify_daemon, str(layout.daemon_socket), options.arguments)
    except (DaemonUnreachable, BackendError) as exc:
        print(f"nspawn-mcp: {exc}", file=sys.stderr)
        return 1
    print(f"the daemon serves MCP at http://{address}/mcp (bearer tokens: `nspawn-mcp token add NAME`)")
    print("it keeps serving after this command; `nspawn-mcp daemon stop` stops it", file=sys.stderr)
    return 0


def _daemon(args: argparse.Namespace) -> int:
    from .daemon.main import REFUSED, DaemonError, run_daemon
    from .daemon.unit import DaemonOptions, daemon_status, start_daemon, stop_daemon

    layout = Layout.from_env()
    if args.action == "run":
        from .daemon.main import systemd_path
        from .journal import JOURNAL_SOCKET, configure_logging, journal_available

        journal = Path(systemd_path(str(JOURNAL_SOCKET)))  # the private systemd's, if it runs us
        configure_logging(args.verbose, journal if journal_available(journal) else None)
        try:
            run_daemon(_daemon_config(args))
        except DaemonError as exc:
            print(f"nspawn-mcp daemon: {_one_line(exc)}", file=sys.stderr)
            return REFUSED
        return 0
    if args.action == "start":
        anyio.run(start_daemon, layout, DaemonOptions(_daemon_arguments(args)))
        print(f"running; serving {layout.daemon_socket}")
        return 0
    if args.action == "stop":
        print("stopped (its sandboxes keep running)" if anyio.run(stop_daemon, layout) else "not running")
        return 0
    status = anyio.run(daemon_status, layout)
    if status is None:
        print("not running")
        return 3
    print(f"{status.active_state} ({status.sub_state}); socket {layout.daemon_socket}")
    return 0 if status.active_state == "active" else 3


def _setup(args: argparse.Namespace) -> int:
    from .provision import QuotaMode, run_setup

    quotas = None if args.disk_quotas == "off" else QuotaMode(args.disk_quotas)
    return anyio.run(run_setup, Layout.from_env(), quotas, _image_dirs(args))


def _image_dirs(args: argparse.Namespace) -> tuple[Path, ...]:
    from .images.recipe import DEFAULT_IMAGE_DIR

    return tuple(Path(d).absolute() for d in args.image_dir) or (DEFAULT_IMAGE_DIR,)


def _image_build(args: argparse.Namespace) -> int:
    from .images.build import run_image_build

    return anyio.run(run_image_build, Layout.from_env(), args.name, _image_dirs(args))


def _image_import(args: argparse.Namespace) -> int:
    from .errors import InvalidRequest
    from .images.catalog import Catalog
    from .images.imports import ImportRefused, ImportRequest, import_into_pool

    layout = Layout.from_env()
    request = ImportRequest(source=Path(args.file), name=args.name, description=args.description)
    try:
        anyio.run(import_into_pool, layout, request)
    except InvalidRequest as exc:  # the name
        print(f"nspawn-mcp: {exc}", file=sys.stderr)
        return 1
    except ImportRefused as exc:
        print(f"nspawn-mcp: {args.file} is refused: {exc}", file=sys.stderr)
        print(f"(the log: {Catalog(layout.images_dir).log_path(args.name)})", file=sys.stderr)
        return 1
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import print_report, run_checks

    return 0 if print_report(run_checks(Layout.from_env())) else 1


def _box(args: argparse.Namespace) -> int:
    from .box import find_box, start_box, stop_box

    layout = Layout.from_env()
    if args.action == "shell":
        return _box_shell(args.shell_command or [os.environ.get("SHELL") or "/bin/sh"])
    if args.shell_command:
        return _fail(f"box {args.action} takes no command")
    if args.action == "start":
        print(f"private systemd running, pid {start_box(layout).pid}")
    elif args.action == "stop":
        print("stopped" if stop_box(layout) else "not running")
    else:
        box = find_box(layout)
        print(f"running, pid {box.pid}" if box else "not running")
        return 0 if box else 3
    return 0


def _box_shell(command: list[str]) -> int:
    """Run ``command`` where machinectl and journalctl see the sandboxes: inside the private
    systemd's namespaces, or here on a host that runs systemd."""
    from .box import find_box, host_runs_systemd
    from .operator import box_shell_command

    if host_runs_systemd():
        print("this host runs systemd: machinectl and journalctl work here as they are", file=sys.stderr)
        argv = command
    else:
        box = find_box(Layout.from_env())
        if box is None:
            return _fail("the private systemd is not running, so there are no sandboxes to look at")
        argv = box_shell_command(box.pid, command)
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - an argv of the operator's, no shell
    except OSError as exc:
        return _fail(f"cannot run {argv[0]}: {exc.strerror}")


def _daemon_socket() -> str:
    return str(Layout.from_env().daemon_socket)


def _ask(request: OperatorRequest) -> list[LiveSandbox] | None:
    """One operator request to the daemon; errors as one line (ProgramExit)."""
    from .daemon.operator import OperatorError
    from .frontend.operator import ask_daemon
    from .frontend.stdio import DaemonUnreachable

    socket_path = _daemon_socket()
    if not Path(socket_path).exists():
        raise _Exit(
            "the nspawn-mcp daemon is not running, so no sandbox is served (`nspawn-mcp daemon start` "
            "starts it; sandboxes that outlived a daemon are adopted by the next one)"
        )
    try:
        return anyio.run(ask_daemon, socket_path, request)
    except (DaemonUnreachable, OperatorError) as exc:
        raise _Exit(str(exc)) from None


class _Exit(Exception):
    """A command's failure, said in one line."""


def _list(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from .daemon.operator import ListRequest
    from .operator import format_json, format_table

    try:
        sandboxes = _ask(ListRequest()) or []
    except _Exit as exc:
        return _fail(exc)
    print(format_json(sandboxes) if args.json else format_table(sandboxes, datetime.now(UTC)))
    return 0


def _destroy(args: argparse.Namespace) -> int:
    from .daemon.operator import DestroyRequest
    from .errors import InvalidRequest
    from .naming import parse_sandbox_id

    try:
        _ask(DestroyRequest(parse_sandbox_id(args.sandbox_id)))
    except (_Exit, InvalidRequest) as exc:
        return _fail(exc)
    print(f"destroyed {args.sandbox_id}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    from .box import find_box, host_runs_systemd
    from .errors import InvalidRequest
    from .naming import parse_sandbox_id
    from .operator import journal_command
    from .runtime import Daemons

    try:
        sandbox_id = parse_sandbox_id(args.sandbox_id)
    except InvalidRequest as exc:
        return _fail(exc)
    journal_dir = None
    if not host_runs_systemd():
        box = find_box(Layout.from_env())
        if box is None:
            return _fail("the private systemd is not running; its journal (kept in memory) went with it")
        journal_dir = Daemons(box.bus_address, box_pid=box.pid).journal_dir
    argv = journal_command(sandbox_id, journal_dir, follow=args.follow, lines=args.lines)
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - an argv of the operator's, no shell
    except OSError as exc:
        return _fail(f"cannot run journalctl: {exc.strerror}")


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


def _add_daemon_options(parser: argparse.ArgumentParser) -> None:
    """The daemon's options; ``serve`` passes them on when it has to start the daemon."""
    parser.add_argument(
        "--policy-dir", action="append", default=[], help="directory of operator policies (*.toml)"
    )
    parser.add_argument(
        "--max-sandboxes", type=int, default=_DEFAULT_MAX_SANDBOXES, help="live sandboxes in all (default 64)"
    )
    parser.add_argument(
        "--no-warm-pool",
        action="store_true",
        help="start no sandboxes ahead of demand, whatever the policies' [pool] sections ask",
    )
    parser.add_argument(
        "--max-calls-per-second",
        type=float,
        default=_DEFAULT_CALL_RATE,
        help="tool calls per second per client identity, bursts of four times that (default 50; 0: no limit)",
    )
    parser.add_argument(
        "--audit-log",
        metavar="PATH",
        help="JSON-lines audit log (default: audit.jsonl in the state directory)",
    )
    parser.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="members of GROUP may connect to the daemon's socket (default: root only)",
    )
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="the daemon also serves streamable HTTP at http://HOST:PORT/mcp, to clients with a bearer "
        "token (`nspawn-mcp token add`); [::1]:PORT for IPv6",
    )
    parser.add_argument(
        "--http-host-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name HTTP clients use to reach the daemon (needed for 0.0.0.0 and ::; the Host "
        "header of every request is checked against the bind address and these)",
    )


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

    serve = commands.add_parser(
        "serve", help="MCP on stdio, relayed to the daemon (started if it does not run)"
    )
    _add_daemon_options(serve)
    serve.set_defaults(func=_serve)

    daemon = commands.add_parser("daemon", help="the one process per host that owns every sandbox")
    daemon.add_argument(
        "action",
        choices=["run", "start", "stop", "status"],
        help="run: in the foreground (what its unit runs); start/stop/status: its systemd unit",
    )
    _add_daemon_options(daemon)
    daemon.set_defaults(func=_daemon)

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
    setup.add_argument(
        "--image-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of image recipes (NAME.toml; default /etc/nspawn-mcp/images); a recipe there "
        "wins over the shipped one of the same name",
    )
    setup.set_defaults(func=_setup)

    image = commands.add_parser("image", help="build the images sandboxes start from")
    image_actions = image.add_subparsers(dest="action", required=True)
    image_build = image_actions.add_parser(
        "build", help="build NAME from its recipe and replace its template atomically"
    )
    image_build.add_argument("name", help="the recipe's name (default, python, node or one of yours)")
    image_build.add_argument(
        "--image-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of image recipes (NAME.toml; default /etc/nspawn-mcp/images), searched before "
        "the shipped recipes",
    )
    image_build.set_defaults(func=_image_build)
    image_import = image_actions.add_parser(
        "import",
        help="make a root filesystem (a tarball such as `podman export` writes, a disk image or a "
        "directory) the image NAME, replacing an older one",
    )
    image_import.add_argument(
        "file", help="a .tar (.gz, .xz, .bz2), a disk image (.raw, .qcow2) or a directory"
    )
    image_import.add_argument("name", help="the image name policies and create_sandbox(image=...) use")
    image_import.add_argument("--description", default="", help="what list_images shows about it")
    image_import.set_defaults(func=_image_import)

    commands.add_parser("doctor", help="check every prerequisite").set_defaults(func=_doctor)

    box = commands.add_parser(
        "box",
        help="the private systemd used where PID 1 is not systemd",
        description="The private systemd (systemd, dbus, machined) this project boots where PID 1 is "
        "not systemd. shell runs COMMAND (default: a shell) in its namespaces, where machinectl and "
        "journalctl see the sandboxes; on a host that runs systemd it runs COMMAND here.",
    )
    box.add_argument("action", choices=["start", "stop", "status", "shell"])
    box.add_argument(
        "shell_command",
        metavar="COMMAND",
        nargs=argparse.REMAINDER,
        help="shell: the command to run (default: $SHELL)",
    )
    box.set_defaults(func=_box)

    listing = commands.add_parser(
        "list", help="the live sandboxes of every client: owner, policy, image, age, expiry, memory, CPU"
    )
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    listing.set_defaults(func=_list)

    destroy = commands.add_parser("destroy", help="destroy any client's sandbox (root only)")
    destroy.add_argument("sandbox_id", metavar="ID", help="as list shows it: sbx-1a2b3c4d")
    destroy.set_defaults(func=_destroy)

    logs = commands.add_parser(
        "logs",
        help="a sandbox's journal: what the daemon logged about it, its nspawn service's output and "
        "systemd's messages about its units",
    )
    logs.add_argument(
        "sandbox_id", metavar="ID", help="sbx-1a2b3c4d (a gone one too, while the journal keeps it)"
    )
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    logs.add_argument("-n", "--lines", type=int, metavar="N", help="only the last N entries")
    logs.set_defaults(func=_logs)

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
    if args.command in _ROOT_COMMANDS and os.geteuid() != 0:
        return _fail(_not_root(args.command))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
