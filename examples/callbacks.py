"""Callbacks and an executor: a subscription with a callback, a service server
with a handler, both run by one ``Executor``.

The callback gets each message (and its info, because it takes two arguments);
the handler's return value is the response. User code runs in the executor's
thread, never under an emailmw lock, so a callback may publish or call a service.

Intraprocess (no mail server) by default::

    python examples/callbacks.py

Over a real mailbox when ``$EMAIL_CONFIG_FILE`` names a config file (the mailbox
must receive what it sends, as the dev server's ``alice.yml`` does)::

    EMAIL_CONFIG_FILE=/tmp/emailmw-dev/alice.yml python examples/callbacks.py
"""

from __future__ import annotations

import os
import sys
import threading

import emailmw

COUNT = 3


def options() -> emailmw.Options:
    """The config file named by ``$EMAIL_CONFIG_FILE``, else intraprocess."""
    if os.environ.get("EMAIL_CONFIG_FILE"):
        return emailmw.Options.load()
    return emailmw.Options(intraprocess=True)


def main() -> int:
    received: list[str] = []
    done = threading.Event()
    try:
        with emailmw.Context(options()) as ctx:
            executor = emailmw.Executor(context=ctx)

            def on_message(message: str, info: emailmw.MessageInfo) -> None:
                print(f"callback: {message!r} from publisher {info.publisher_gid.value}")
                received.append(message)
                if len(received) == COUNT:
                    executor.shutdown()  # ends spin() below
                    done.set()

            def shout(request: str) -> str:
                return request.upper()

            # Keep references to the entities: routes hold them weakly.
            subscription = emailmw.Subscription("/chatter", callback=on_message, context=ctx)
            server = emailmw.ServiceServer("/shout", handler=shout, context=ctx)
            executor.add(server)

            # The handler answers while the executor spins in another thread.
            spinner = threading.Thread(target=executor.spin, name="spinner")
            spinner.start()
            client = emailmw.ServiceClient("/shout", context=ctx)
            print(f"call: {client.call('make me loud', timeout=30.0)!r}")

            executor.add(subscription)
            publisher = emailmw.Publisher("/chatter", context=ctx)
            for i in range(COUNT):
                publisher.publish(f"hello #{i + 1}")
            if not done.wait(30.0):
                print("the callbacks did not run in time", file=sys.stderr)
                return 1
            spinner.join(10.0)
            print(f"executor stopped after {len(received)} messages")
            stats = ctx.stats()
            print(f"callback errors: {stats.callback_errors}")
    except emailmw.EmailmwError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
