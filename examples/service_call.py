"""A service called in one line: ``ServiceClient.call()`` and ``call_future()``.

The server answers typed requests (a pydantic model) with a handler run by
``emailmw.spin()`` in a background thread; the client calls it synchronously,
then sends two requests at once with futures and collects both answers.

Intraprocess (no mail server) by default::

    python examples/service_call.py

Over a real mailbox when ``$EMAIL_CONFIG_FILE`` names a config file (the mailbox
must receive what it sends, as the dev server's ``alice.yml`` does)::

    EMAIL_CONFIG_FILE=/tmp/emailmw-dev/alice.yml python examples/service_call.py
"""

from __future__ import annotations

import os
import sys
import threading

from pydantic import BaseModel

import emailmw


class Rectangle(BaseModel):
    width: float
    height: float


def area(rectangle: Rectangle) -> float:
    return rectangle.width * rectangle.height


def options() -> emailmw.Options:
    """The config file named by ``$EMAIL_CONFIG_FILE``, else intraprocess."""
    if os.environ.get("EMAIL_CONFIG_FILE"):
        return emailmw.Options.load()
    return emailmw.Options(intraprocess=True)


def main() -> int:
    try:
        context = emailmw.init(options())
        try:
            server = emailmw.ServiceServer("/area", Rectangle, float, handler=area)
            spinner = threading.Thread(target=emailmw.spin, name="spinner", daemon=True)
            spinner.start()

            client = emailmw.ServiceClient("/area", Rectangle, float)
            print(f"call: {client.call(Rectangle(width=3, height=4), timeout=30.0)}")

            futures = [
                client.call_future(Rectangle(width=2, height=5)),
                client.call_future(Rectangle(width=1.5, height=1.5)),
            ]
            print(f"futures: {[f.result(timeout=30.0) for f in futures]}")
            try:
                client.call("not a rectangle", timeout=1.0)  # type: ignore[arg-type]
            except emailmw.MessageTypeError as exc:
                print(f"refused: {exc}")
            stats = context.stats()
            print(f"{server.service_name}: sent={stats.sent} delivered={stats.delivered}")
        finally:
            emailmw.shutdown()
    except emailmw.EmailmwError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
