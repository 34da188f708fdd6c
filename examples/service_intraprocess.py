"""A service (request/reply) in one process, with service info.

A server thread answers requests to ``/add_two_ints``; the main thread is the
client. Over email a request is an email to the service and the response is a
reply to it; here, in intraprocess mode, both travel through memory.

This example uses an explicit context (``with emailmw.Context(...) as ctx``);
see ``pubsub_intraprocess.py`` for the global ``emailmw.init()`` style.

Run it with::

    python examples/service_intraprocess.py
"""

from __future__ import annotations

import threading

import emailmw

SERVICE = "/add_two_ints"


def describe(info: emailmw.ServiceInfo) -> str:
    """One line of ServiceInfo: who asked, which request, and how long it took."""
    latency_us = (info.received_timestamp.nanoseconds - info.source_timestamp.nanoseconds) / 1_000
    return (
        f"client GID {info.client_gid.value}, sequence number {info.sequence_number}, "
        f"source timestamp {info.source_timestamp.nanoseconds} ns, "
        f"latency {latency_us:.1f} us"
    )


def serve(server: emailmw.ServiceServer) -> None:
    """Answer requests until the context shuts down.

    ``wait_for_request_with_info`` sleeps without using CPU until a request
    arrives. When the context shuts down it wakes up and raises ContextError,
    which is how this thread learns that it is time to stop.
    """
    try:
        while True:
            request, info = emailmw.wait_for_request_with_info(server)
            a, b = (int(x) for x in request.content.split())
            print(f"server: request {request.content!r} ({describe(info)})")
            # The request id (client GID + sequence number) says whom to answer.
            server.send_response(request.id, str(a + b))
    except emailmw.ContextError:
        print("server: context shut down, stopping")


def main() -> int:
    # 1. An explicit context: initialized on entering the block, shut down on
    #    leaving it (even on an exception). Entities take it as ``context=``.
    with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:
        # 2. The server: requests for SERVICE queue up in it.
        server = emailmw.ServiceServer(SERVICE, context=ctx)
        server_thread = threading.Thread(target=serve, args=(server,), name="server")
        server_thread.start()

        # 3. The client: send_request() returns a sequence number, and
        #    wait_for_response() waits for the response with that number.
        client = emailmw.ServiceClient(SERVICE, context=ctx)
        for a, b in [(2, 3), (40, 2), (-7, 7)]:
            sequence_number = client.send_request(f"{a} {b}")
            response = emailmw.wait_for_response(sequence_number, client, timeout=1.0)
            print(f"client: {a} + {b} = {response} (request #{sequence_number})")

        # 4. The ``_with_info`` variant also returns the response's ServiceInfo.
        sequence_number = client.send_request("1000 337")
        response, info = emailmw.wait_for_response_with_info(sequence_number, client, timeout=1.0)
        print(f"client: 1000 + 337 = {response} ({describe(info)})")
    # 5. Leaving the block shut the context down, which woke the server thread.
    server_thread.join(timeout=5.0)
    return 0 if not server_thread.is_alive() else 1


if __name__ == "__main__":
    raise SystemExit(main())
