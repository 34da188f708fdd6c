"""Typed publish/subscribe: the messages are a pydantic model.

A ``Publisher`` and a ``Subscription`` created with a message type carry values
of that type: the body is the model's JSON (``Content-Type: application/json``)
and the ``Message-Type`` header names the type. ``get_message()`` and the
``wait_for_*`` helpers return model instances; publishing anything else raises
``emailmw.MessageTypeError`` before anything is sent.

Intraprocess (no mail server) by default::

    python examples/typed_pubsub.py

Over a real mailbox when ``$EMAIL_CONFIG_FILE`` names a config file (the
subscription here receives what the publisher here sends)::

    EMAIL_CONFIG_FILE=/tmp/emailmw-dev/alice.yml python examples/typed_pubsub.py
"""

from __future__ import annotations

import os
import sys

from pydantic import BaseModel, Field

import emailmw

TOPIC = "/weather"


class Reading(BaseModel):
    """One weather station reading."""

    station: str
    temperature_c: float
    humidity_percent: int = Field(ge=0, le=100)
    tags: list[str] = []


def options() -> emailmw.Options:
    """The config file named by ``$EMAIL_CONFIG_FILE``, else intraprocess."""
    if os.environ.get("EMAIL_CONFIG_FILE"):
        return emailmw.Options.load()
    return emailmw.Options(intraprocess=True)


def main() -> int:
    readings = [
        Reading(station="north", temperature_c=21.5, humidity_percent=40),
        Reading(station="south", temperature_c=-3.25, humidity_percent=85, tags=["frost"]),
    ]
    try:
        with emailmw.Context(options()) as ctx:
            # 1. Both ends name the type; subscribe before publishing.
            subscription = emailmw.Subscription(TOPIC, Reading, context=ctx)
            publisher = emailmw.Publisher(TOPIC, Reading, context=ctx)

            # 2. Publish model instances, with an additional header on one.
            publisher.publish(readings[0])
            publisher.publish(readings[1], additional_headers={"Station-Firmware": "2.1"})

            # 3. What arrives is a Reading again (validated on arrival), with its info.
            for expected in readings:
                reading, info = emailmw.wait_for_message_with_info(subscription, timeout=30.0)
                assert isinstance(reading, Reading) and reading == expected
                print(
                    f"{reading.station}: {reading.temperature_c} C, "
                    f"{reading.humidity_percent} % {reading.tags} "
                    f"headers={dict(info.headers)}"
                )

            # 4. A value of another type is refused before anything is sent.
            try:
                publisher.publish({"station": "east"})  # type: ignore[arg-type]
            except emailmw.MessageTypeError as exc:
                print(f"refused: {exc}")
            stats = ctx.stats()
            counts = f"sent={stats.sent} delivered={stats.delivered}"
            print(f"stats: {counts} dropped={stats.dropped_total}")
    except emailmw.EmailmwError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
