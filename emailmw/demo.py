"""The ``emailmw demo`` command: pub/sub and a service, intraprocess, narrated.

No mail server is needed. It is also the quickest way to see the API work.
"""

from __future__ import annotations

from typing import TextIO

from emailmw.context import Context
from emailmw.options import Options
from emailmw.pubsub import Publisher, Subscription
from emailmw.service import ServiceClient, ServiceServer
from emailmw.wait import wait_for_message_with_info, wait_for_request, wait_for_response

__all__ = ["run_demo"]


def run_demo(out: TextIO, messages: int = 3) -> int:
    """Run the demo, writing what happens to ``out``; return an exit status."""

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    say("emailmw demo (intraprocess: no mail server needed)")
    with Context(Options(intraprocess=True)) as ctx:
        say("\n-- publish/subscribe on topic '/chatter' --")
        subscription = Subscription("/chatter", context=ctx)
        publisher = Publisher("/chatter", context=ctx)
        for i in range(1, messages + 1):
            text = f"hello #{i}"
            publisher.publish(text)
            say(f"published   {text!r}")
            received, info = wait_for_message_with_info(subscription, timeout=5.0)
            elapsed_ns = info.received_timestamp.nanoseconds - info.source_timestamp.nanoseconds
            latency_us = elapsed_ns / 1e3
            say(
                f"received    {received!r} from publisher {info.publisher_gid.value} "
                f"({latency_us:.0f} us after it was sent)"
            )

        say("\n-- service '/add_two_ints' --")
        server = ServiceServer("/add_two_ints", context=ctx)
        client = ServiceClient("/add_two_ints", context=ctx)
        pairs = [(2, 3), (40, 2)]
        sequence_numbers = []
        for a, b in pairs:
            seq = client.send_request(f"{a} {b}")
            sequence_numbers.append(seq)
            say(f"client sent request #{seq}: '{a} {b}'")
        for _ in pairs:
            request = wait_for_request(server, timeout=5.0)
            a, b = (int(x) for x in request.content.split())
            server.send_response(request.id, str(a + b))
            say(
                f"server answered request #{request.id.sequence_number} of client "
                f"{request.id.client_gid.value}: {a + b}"
            )
        for seq in reversed(sequence_numbers):
            response = wait_for_response(seq, client, timeout=5.0)
            say(f"client got response to #{seq}: {response}")

        stats = ctx.stats()
        say(
            f"\nstats: sent={stats.sent} received={stats.received} delivered={stats.delivered} "
            f"dropped={stats.dropped_total}"
        )
    say("done")
    return 0
