"""Serve ``/add`` over a real mailbox: each request is "A B", the response A + B.

A request is an email whose subject is the service name; the response is a
reply to it (In-Reply-To), so it reaches only the client that asked. Start the
server first, then ``service_client.py``::

    EMAIL_CONFIG_FILE=/tmp/emailmw-dev/alice.yml python examples/service_server.py

Stops after ``--count`` requests (0: never), or after ``--timeout`` seconds
without a request (exit status 1 if ``--count`` was not reached).
"""

from __future__ import annotations

import argparse
import sys

import emailmw


def answer(request: str) -> str:
    """The service itself: add two integers."""
    try:
        a, b = (int(word) for word in request.split())
    except ValueError:
        return f"error: expected two integers, got {request!r}"
    return str(a + b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file (default: $EMAIL_CONFIG_FILE, ./email.yml)")
    parser.add_argument("--service", default="/add", help="service name (default /add)")
    parser.add_argument("--count", type=int, default=0, help="stop after N requests (0: never)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="stop after this many seconds without a request (default: never)",
    )
    args = parser.parse_args()

    try:
        options = emailmw.Options.from_file(args.config) if args.config else emailmw.Options.load()
        with emailmw.Context(options) as ctx:
            server = emailmw.ServiceServer(args.service, context=ctx)
            print(f"serving {args.service!r} in mailbox {options.mailbox!r}", flush=True)
            served = 0
            while args.count <= 0 or served < args.count:
                try:
                    request = emailmw.wait_for_request(server, args.timeout)
                except emailmw.WaitTimeoutError:
                    print(f"no request within {args.timeout:g} s; stopping", flush=True)
                    return 1 if args.count > 0 else 0
                response = answer(request.content)
                # request.id = (client GID, sequence number): what the reply carries
                # so that the right client files it under the right request.
                server.send_response(request.id, response)
                served += 1
                print(
                    f"request #{request.id.sequence_number} from client "
                    f"{request.id.client_gid.value}: {request.content!r} -> {response!r}",
                    flush=True,
                )
    except emailmw.EmailmwError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
