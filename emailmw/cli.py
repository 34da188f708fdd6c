"""The ``emailmw`` command.

Subcommands:

``demo``          intraprocess pub/sub + service demo (no server needed)
``dev-server``    run a local Dovecot + Postfix and write ready config files
``check-config``  load the config, log in to both servers, report capabilities
``send``          send a raw email (RFC 5322 bytes from a file or stdin) via SMTP
``receive``       print raw emails as they arrive in the mailbox
``publish``       publish a message on a topic
``echo``          print the messages published on a topic
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

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
    return parser


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
    if args.command == "send":
        return commands.send_raw(args.config, args.file, sys.stdout)
    if args.command == "receive":
        return commands.receive_raw(args.config, args.count, args.timeout, sys.stdout)
    if args.command == "publish":
        return commands.publish(args.config, args.topic, args.message, sys.stdout)
    if args.command == "echo":
        return commands.echo(args.config, args.topic, args.count, args.timeout, sys.stdout)
    raise AssertionError(args.command)
