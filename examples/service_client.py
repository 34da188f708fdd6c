"""Call the ``/add`` service (``service_server.py``) over a real mailbox.

Sends ``--count`` requests at once, then waits for each response by its
sequence number: responses may arrive in any order. Start the server first::

    EMAIL_CONFIG_FILE=/tmp/emailmw-dev/alice.yml python examples/service_client.py

Exits 1 if a response does not come within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import sys

import emailmw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file (default: $EMAIL_CONFIG_FILE, ./email.yml)")
    parser.add_argument("--service", default="/add", help="service name (default /add)")
    parser.add_argument("--count", type=int, default=3, help="requests to send (default 3)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for each response (default 30)",
    )
    args = parser.parse_args()

    try:
        options = emailmw.Options.from_file(args.config) if args.config else emailmw.Options.load()
        with emailmw.Context(options) as ctx:
            client = emailmw.ServiceClient(args.service, context=ctx)
            # 1. Send every request first: each gets a sequence number (1, 2, 3, ...).
            pending: dict[int, tuple[int, int]] = {}
            for i in range(1, args.count + 1):
                a, b = i, i * 10
                pending[client.send_request(f"{a} {b}")] = (a, b)
                print(f"sent request: {a} + {b} ?", flush=True)
            # 2. Then collect the responses by sequence number, whatever their order.
            for seq, (a, b) in pending.items():
                try:
                    response = emailmw.wait_for_response(seq, client, args.timeout)
                except emailmw.WaitTimeoutError:
                    print(
                        f"timeout: no response to request #{seq} within {args.timeout:g} s",
                        file=sys.stderr,
                    )
                    return 1
                print(f"{a} + {b} = {response} (request #{seq})", flush=True)
    except emailmw.EmailmwError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
