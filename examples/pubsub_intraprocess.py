"""Publish/subscribe in one process, with message info.

Intraprocess mode swaps SMTP/IMAP for in-memory queues: same API, no mail
server. This example uses the *global* context (``emailmw.init()`` /
``emailmw.shutdown()``); see ``service_intraprocess.py`` for the
``with emailmw.Context(...)`` style.

Run it with::

    python examples/pubsub_intraprocess.py
"""

from __future__ import annotations

import emailmw

TOPIC = "/chatter"


def main() -> int:
    # 1. Start the global context in intraprocess mode. Every entity created
    #    below without an explicit ``context=`` uses it.
    emailmw.init(emailmw.Options(intraprocess=True))
    try:
        # 2. Subscribe before publishing: a subscription only receives the
        #    messages published after it exists (as with a real mailbox).
        subscription = emailmw.Subscription(TOPIC)
        publisher = emailmw.Publisher(TOPIC)
        print(f"publisher on {publisher.topic_name!r} has GID {publisher.gid.value}")

        for i in range(1, 4):
            text = f"hello #{i}"
            # 3. Publish: over email this would be one email whose subject is the
            #    topic and whose body is the message.
            publisher.publish(text)

            # 4. Wait (at most 1 s) for the message and its metadata. The
            #    MessageInfo carries the Source-Timestamp and Publisher-GID
            #    headers, plus the time the message was received.
            message, info = emailmw.wait_for_message_with_info(subscription, timeout=1.0)
            source_ns = info.source_timestamp.nanoseconds
            received_ns = info.received_timestamp.nanoseconds
            latency_us = (received_ns - source_ns) / 1_000
            print(f"message:            {message!r}")
            print(f"  publisher GID:    {info.publisher_gid.value}")
            print(f"  source timestamp: {source_ns} ns since the epoch")
            print(f"  received at:      {received_ns} ns since the epoch")
            print(f"  latency:          {latency_us:.1f} us")
            assert message == text
            assert info.publisher_gid == publisher.gid

        # 5. get_message() never blocks: nothing is left, so it returns None.
        assert subscription.get_message() is None

        # 6. The context counts what it sent, received and delivered.
        stats = emailmw.stats()
        print(f"stats: sent={stats.sent} delivered={stats.delivered} dropped={stats.dropped_total}")
    finally:
        # 7. Stop the polling thread and release everything.
        emailmw.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
