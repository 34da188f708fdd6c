"""Publish/subscribe with asyncio: ``async with Context``, ``apublish``, ``async for``,
``aget`` with a timeout, and a service called with ``acall``.

Intraprocess by default (no mail server)::

    python examples/asyncio_pubsub.py

Against a real mailbox: set ``EMAIL_CONFIG_FILE`` to its config file (the
mailbox must receive what it sends, as the dev server's ``alice.yml`` does)::

    EMAIL_CONFIG_FILE=/tmp/emailmw-dev/alice.yml python examples/asyncio_pubsub.py
"""

from __future__ import annotations

import asyncio
import os

import emailmw

TOPIC = "/chatter"
COUNT = 3


def options() -> emailmw.Options:
    if os.environ.get("EMAIL_CONFIG_FILE"):
        return emailmw.Options.load()  # reads $EMAIL_CONFIG_FILE
    return emailmw.Options(intraprocess=True)


async def listen(subscription: emailmw.Subscription[str]) -> list[str]:
    """Collect messages until the subscription is closed."""
    received = []
    # The loop ends when the subscription is closed (or the context shuts down).
    # While it waits, no thread is held: the event loop is free for other tasks.
    async for message in subscription:
        print(f"received: {message!r}")
        received.append(message)
        if len(received) == COUNT:
            subscription.close()
    return received


async def serve(server: emailmw.ServiceServer[str, str]) -> None:
    """Answer one request: the text, upper-cased."""
    request = await server.aget_request(timeout=30)
    await server.asend_response(request.id, request.content.upper())


async def main() -> int:
    wait = 30.0
    # init() and shutdown() run in a worker thread: the loop is never blocked.
    async with emailmw.Context(options()) as ctx:
        subscription = emailmw.Subscription(TOPIC, context=ctx)
        publisher = emailmw.Publisher(TOPIC, context=ctx)
        listener = asyncio.create_task(listen(subscription))
        for i in range(1, COUNT + 1):
            # publish() can block on SMTP: apublish() runs it in a worker thread.
            await publisher.apublish(f"hello #{i}")
        received = await asyncio.wait_for(listener, wait)
        print(f"async for ended after {len(received)} messages")

        # aget() with a timeout: nothing more was published, so it times out.
        quiet = emailmw.Subscription("/quiet", context=ctx)
        try:
            await quiet.aget(timeout=0.1)
        except emailmw.WaitTimeoutError as exc:
            print(f"aget timed out: {exc}")

        # One-call request/reply: acall() sends and awaits the response.
        server = emailmw.ServiceServer("/upper", context=ctx)
        client = emailmw.ServiceClient("/upper", context=ctx)
        serving = asyncio.create_task(serve(server))
        response = await client.acall("make me loud", timeout=wait)
        await serving
        print(f"acall: 'make me loud' -> {response!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
