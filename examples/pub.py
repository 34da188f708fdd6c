"""Publish messages on a topic over a real mailbox (SMTP).

Each message is one email: the subject is the topic, the body the message.
Start ``sub.py`` first (a subscriber only sees what arrives after it started),
then::

    EMAIL_CONFIG_FILE=/tmp/emailmw-dev/alice.yml python examples/pub.py --count 5

``--config`` names the config file; without it, ``$EMAIL_CONFIG_FILE``,
``./email.yml`` and ``~/email.yml`` are tried in that order (``emailmw
dev-server`` writes one per account).
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
    parser.add_argument("--count", type=int, default=5, help="messages to publish (default 5)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between messages")
    args = parser.parse_args()

    try:
        # 1. Read the config: an explicit file, or the usual search path.
        options = emailmw.Options.from_file(args.config) if args.config else emailmw.Options.load()
        # 2. A context connects to the SMTP and IMAP servers (errors surface here:
        #    wrong password, untrusted certificate, server down...).
        with emailmw.Context(options) as ctx:
            publisher = emailmw.Publisher(args.topic, context=ctx)
            gid = publisher.gid.value
            print(f"publishing {args.count} messages on {args.topic!r} as GID {gid}")
            for i in range(1, args.count + 1):
                if i > 1:
                    time.sleep(args.interval)  # pacing the demo, nothing else
                text = f"hello #{i}"
                # 3. publish() returns once the SMTP server accepted the email.
                publisher.publish(text)
                print(f"published {text!r}", flush=True)
            stats = ctx.stats()
            print(f"done: {stats.sent} sent, {stats.send_retries} retries")
    except emailmw.EmailmwError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
