"""``emailmw dev-server`` (also ``python -m emailmw.devserver``): run a local mail
stack until SIGINT or SIGTERM, printing its ports and writing a config per account."""

from __future__ import annotations

import argparse
import pathlib
import signal
import sys
import threading
from collections.abc import Sequence

from emailmw.devserver.errors import DevServerError
from emailmw.devserver.server import DevServer

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``emailmw dev-server``: run a local mail stack until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="emailmw dev-server",
        description="Run a real Dovecot + Postfix for emailmw on free loopback ports (as root).",
    )
    parser.add_argument("--accounts", default="alice,bob", help="comma-separated names")
    parser.add_argument("--domain", default="example.test", help="mail domain")
    parser.add_argument("--root", help="state directory (default: temporary, removed at exit)")
    parser.add_argument("--config-dir", help="where to write <account>.yml (default: the root)")
    parser.add_argument("--tls", choices=("starttls", "implicit"), default="starttls")
    parser.add_argument(
        "--rmw-email-compat",
        action="store_true",
        help="share the server with rmw_email (C++ reference) nodes: Postfix header checks "
        "they need, IMAPS on 127.0.0.1:993 and SMTPS on 127.0.0.1:465, and configs with "
        "wire-format: rmw-email (see docs/interop.md)",
    )
    parser.add_argument(
        "--auth",
        choices=("password", "oauth2"),
        default="password",
        help="oauth2: also XOAUTH2/OAUTHBEARER; the configs use a token command",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.accounts.split(",") if n.strip()]
    if not names:
        parser.error("--accounts needs at least one name")

    stop = threading.Event()
    handlers = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    server: DevServer | None = None
    try:
        compat = args.rmw_email_compat
        server = DevServer(
            args.root,
            accounts=names,
            domain=args.domain,
            rmw_email_compat=compat,
            rmw_email_ports=compat,
            auth=args.auth,
        )
        server.start()
        config_dir = pathlib.Path(args.config_dir) if args.config_dir else server.root
        paths = [
            server.write_config(
                a,
                config_dir / f"{a.name}.yml",
                tls=args.tls,
                auth="xoauth2" if args.auth == "oauth2" else "password",
            )
            for a in server.accounts
        ]
        h = server.host
        lines = [
            f"emailmw dev mail server running; root {server.root}",
            f"  SMTP {h}:{server.smtp_port} (STARTTLS)  SMTPS {h}:{server.smtps_port}",
            f"  IMAP {h}:{server.imap_port} (STARTTLS)  IMAPS {h}:{server.imaps_port}",
            f"  CA   {server.ca_file}",
            *(
                f"  {a.address}  password {a.password}  config {p}"
                for a, p in zip(server.accounts, paths, strict=True)
            ),
            *(
                [
                    "  rmw_email compat: Message-ID and Bcc fixed up for reference nodes; "
                    "configs use wire-format: rmw-email",
                    f"  reference nodes: url-imap {h}, url-smtp {h} (ports 993, 465); "
                    f"trust the CA: see docs/interop.md (CA file {server.ca_file})",
                ]
                if compat
                else []
            ),
            f"try:  EMAIL_CONFIG_FILE={paths[0]} python examples/sub.py",
            "Ctrl-C stops it.",
        ]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        stop.wait()
        sys.stdout.write("stopping\n")
        return 0
    except (DevServerError, ValueError) as exc:
        sys.stderr.write(f"emailmw dev-server: {exc}\n")
        return 1
    finally:
        if server is not None:
            server.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
