"""Print the messages published on a topic, read from a real mailbox (IMAP).

Start it before the publisher (``pub.py``): a subscriber receives what arrives
in the mailbox after it connected. Then::

    EMAIL_CONFIG_FILE=/tmp/emailmw-dev/alice.yml python examples/sub.py --count 5

Exits 0 once ``--count`` messages arrived (0: run until Ctrl-C), 1 if
``--timeout`` seconds pass without a message.
"""

from __future__ import annotations

import argparse
import sys
import time

import emailmw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file (default: $EMAIL_CONFIG_FILE, ./email.yml)")
    parser.add_argument("--topic", default="/chatter", help="topic (default /chatter)")
    parser.add_argument("--count", type=int, default=5, help="stop after N messages (0: never)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="give up after this many seconds without a message (default 60)",
    )
    args = parser.parse_args()

    try:
        options = emailmw.Options.from_file(args.config) if args.config else emailmw.Options.load()
        # The context logs in to IMAP and starts its polling thread (IDLE push where
        # the server offers it). Messages on other topics in the mailbox are ignored.
        with emailmw.Context(options) as ctx:
            subscription = emailmw.Subscription(args.topic, context=ctx)
            print(f"listening on {args.topic!r} in mailbox {options.mailbox!r}", flush=True)
            received = 0
            while args.count <= 0 or received < args.count:
                try:
                    message, info = emailmw.wait_for_message_with_info(subscription, args.timeout)
                except emailmw.WaitTimeoutError:
                    print(f"timeout: no message within {args.timeout:g} s", file=sys.stderr)
                    return 1
                received += 1
                # Source-Timestamp is when publish() was called; the latency is the
                # whole trip through SMTP, the mail server and IMAP.
                latency_ms = (time.time_ns() - info.source_timestamp.nanoseconds) / 1e6
                print(
                    f"received {message!r} from publisher {info.publisher_gid.value} "
                    f"after {latency_ms:.1f} ms",
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
