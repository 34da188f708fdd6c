"""The ``emailmw`` command.

Subcommands:

``demo``          intraprocess pub/sub + service demo (no server needed)
``dev-server``    run a local Dovecot + Postfix and write ready config files
                  (``--rmw-email-compat``: shared with rmw_email reference nodes)
``check-config``  load the config, log in to both servers, report capabilities
``ping``          round trips (a request and its reply) through the mailbox
``send``          send a raw email (RFC 5322 bytes from a file or stdin) via SMTP
``receive``       print raw emails as they arrive in the mailbox
``publish``       publish a message on a topic
``echo``          print the messages published on a topic (``--json``: one JSON
                  object per message, with its info)
``call``          send a request to a service and print the response
``hz``            print the message rate on a topic every second
``prune``         delete old emailmw emails from the folder (the ``retention``)
``topics``        list the topics in the folder (count, publishers, last message)
``history``       print the last messages of a topic in the folder

``prune`` and ``history`` report their progress on stderr: a bar on a
terminal, plain lines otherwise.

``echo``, ``hz`` and ``receive`` run until stopped; SIGTERM stops them as
Ctrl-C does (the context shuts down cleanly). ``hz`` then exits 0, the others
130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

__all__ = ["main"]


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        help="config file (default: $EMAIL_CONFIG_FILE, ./email.yml, ~/email.yml)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``emailmw`` command."""
    parser = argparse.ArgumentParser(prog="emailmw", description="Pub/sub and services over email.")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="logging level (default WARNING)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="intraprocess pub/sub + service demo")
    demo.add_argument("--messages", type=int, default=3)

    sub.add_parser(
        "dev-server", help="run a local Dovecot + Postfix for development", add_help=False
    )

    check = sub.add_parser("check-config", help="check the config and both servers")
    _add_config(check)

    ping = sub.add_parser(
        "ping",
        help="round trips through the mailbox: a request and its reply",
        description="Send requests through the configured account and time each reply, "
        "like ping. Exit status 1 when no reply came back.",
    )
    _add_config(ping)
    ping.add_argument(
        "--count",
        "-n",
        type=_count,
        default=4,
        help="requests to send (default 4; 0: until Ctrl-C)",
    )
    ping.add_argument(
        "--interval",
        "-i",
        type=_seconds,
        default=1.0,
        metavar="S",
        help="seconds between requests (default 1)",
    )
    ping.add_argument(
        "--timeout",
        "-W",
        type=_positive_seconds,
        default=DEFAULT_PING_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for each reply (default {DEFAULT_PING_TIMEOUT:g})",
    )
    ping.add_argument(
        "--service", default="/emailmw/ping", help="service name (default /emailmw/ping)"
    )
    ping.add_argument(
        "--remote",
        action="store_true",
        help="do not answer here: a server for --service in another process must",
    )

    send = sub.add_parser("send", help="send a raw email via SMTP")
    _add_config(send)
    send.add_argument("file", nargs="?", help="raw email file (default: stdin)")

    receive = sub.add_parser("receive", help="print raw emails as they arrive")
    _add_config(receive)
    receive.add_argument("--count", type=int, default=0, help="stop after N emails (0: never)")
    receive.add_argument("--timeout", type=float, default=None, help="stop after N seconds")

    publish = sub.add_parser("publish", help="publish a message on a topic")
    _add_config(publish)
    publish.add_argument("topic")
    publish.add_argument("message")

    echo = sub.add_parser("echo", help="print the messages published on a topic")
    _add_config(echo)
    echo.add_argument("topic")
    echo.add_argument("--count", type=int, default=0, help="stop after N messages (0: never)")
    echo.add_argument("--timeout", type=float, default=None, help="stop after N seconds")
    echo.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line: topic, message, source_timestamp and "
        "received_timestamp (ns), publisher_gid, headers",
    )

    call = sub.add_parser("call", help="send a request to a service and print the response")
    _add_config(call)
    call.add_argument("service")
    call.add_argument("request")
    call.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CALL_TIMEOUT,
        help=f"seconds to wait for the response (default {DEFAULT_CALL_TIMEOUT:g}; "
        "negative: forever)",
    )

    hz = sub.add_parser("hz", help="print the message rate on a topic every second")
    _add_config(hz)
    hz.add_argument("topic")
    hz.add_argument(
        "--window",
        type=_window,
        default=DEFAULT_HZ_WINDOW,
        help=f"messages the statistics cover (default {DEFAULT_HZ_WINDOW})",
    )
    hz.add_argument(
        "--clock",
        choices=["source", "received"],
        default="source",
        help="measure between the messages' Source-Timestamp (default: when they were "
        "published) or between the times they were received (email comes in bursts)",
    )

    prune = sub.add_parser("prune", help="delete old emailmw emails (email.retention)")
    _add_config(prune)
    prune.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    prune.add_argument(
        "--older-than",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="delete emails older than this (default: retention.max-age)",
    )
    prune.add_argument("--topic", default=None, help="prune this topic only")

    topics = sub.add_parser("topics", help="list the topics in the folder")
    _add_config(topics)
    topics.add_argument("--json", action="store_true", help="one JSON object per topic")

    history = sub.add_parser("history", help="print the last messages of a topic")
    _add_config(history)
    history.add_argument("topic")
    history.add_argument("-n", type=_count, default=10, help="how many messages (default 10)")
    history.add_argument("--json", action="store_true", help="one JSON object per message")
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


#: ``emailmw call --timeout`` default, in seconds.
DEFAULT_CALL_TIMEOUT = 30.0
#: ``emailmw ping --timeout`` default, in seconds (a round trip is two emails).
DEFAULT_PING_TIMEOUT = 10.0
#: ``emailmw hz --window`` default (as ``ros2 topic hz``).
DEFAULT_HZ_WINDOW = 10_000


def _window(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (messages), got {value}")
    return value


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While running a command, SIGTERM stops it as Ctrl-C does (so contexts shut
    down cleanly); the previous handler is restored afterwards. Only where Python
    can install handlers (the main thread) and none was installed already."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``emailmw`` command; return the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["dev-server"]:
        from emailmw.devserver import main as dev_server_main

        return dev_server_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from emailmw.errors import EmailmwError

    try:
        with _sigterm_as_interrupt():
            return _run(args)
    except EmailmwError as exc:
        sys.stderr.write(f"emailmw {args.command}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `emailmw demo | head`
        sys.stdout = None  # nothing more can be written
        return 141


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from emailmw.demo import run_demo

        return run_demo(sys.stdout, messages=args.messages)
    from emailmw import commands

    if args.command == "check-config":
        return commands.check_config(args.config, sys.stdout)
    if args.command == "ping":
        return commands.ping(
            args.config,
            sys.stdout,
            count=args.count,
            interval=args.interval,
            timeout=args.timeout,
            service=args.service,
            answer=not args.remote,
        )
    if args.command == "send":
        return commands.send_raw(args.config, args.file, sys.stdout)
    if args.command == "receive":
        return commands.receive_raw(args.config, args.count, args.timeout, sys.stdout)
    if args.command == "publish":
        return commands.publish(args.config, args.topic, args.message, sys.stdout)
    if args.command == "echo":
        return commands.echo(
            args.config, args.topic, args.count, args.timeout, sys.stdout, as_json=args.json
        )
    if args.command == "call":
        return commands.call(args.config, args.service, args.request, args.timeout, sys.stdout)
    if args.command == "hz":
        return commands.hz(args.config, args.topic, args.window, sys.stdout, clock=args.clock)
    if args.command == "prune":
        return commands.prune(
            args.config,
            sys.stdout,
            older_than=args.older_than,
            topic=args.topic,
            dry_run=args.dry_run,
            progress=sys.stderr,
        )
    if args.command == "topics":
        return commands.topics(args.config, sys.stdout, as_json=args.json)
    if args.command == "history":
        return commands.history(
            args.config, args.topic, args.n, sys.stdout, as_json=args.json, progress=sys.stderr
        )
    raise AssertionError(args.command)
