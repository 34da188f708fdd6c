"""A WaitSet over two subscriptions, stopped by a GuardCondition.

One thread waits on a WaitSet holding two subscriptions and a guard
condition. A sensor thread publishes on two topics, then triggers the guard
condition to tell the waiting thread to stop. Waiting is event-driven: the
waiting thread sleeps (no CPU) until a message arrives or the guard condition
is triggered.

Run it with::

    python examples/waitset_guard_condition.py
"""

from __future__ import annotations

import threading
import time

import emailmw


def sensor(ctx: emailmw.Context, stop: emailmw.GuardCondition) -> None:
    """Publish a few readings on two topics, then ask the waiting thread to stop."""
    temperature = emailmw.Publisher("/temperature", context=ctx)
    humidity = emailmw.Publisher("/humidity", context=ctx)
    for i in range(3):
        temperature.publish(f"{20.5 + i:.1f} C")
        humidity.publish(f"{40 + 5 * i} %")
        time.sleep(0.01)
    # trigger() is thread-safe: it sets the flag and wakes the wait set.
    stop.trigger()


def main() -> int:
    with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:
        # 1. Two subscriptions and a guard condition...
        temperature = emailmw.Subscription("/temperature", context=ctx)
        humidity = emailmw.Subscription("/humidity", context=ctx)
        stop = emailmw.GuardCondition()

        # 2. ...all in one wait set. Passing the context makes its shutdown end
        #    a wait too (wait() then raises ContextError).
        wait_set = emailmw.WaitSet(context=ctx)
        wait_set.add_subscription(temperature)
        wait_set.add_subscription(humidity)
        wait_set.add_guard_condition(stop)

        # 3. Something else triggers the guard condition: here, the sensor thread
        #    once it has published everything.
        sensor_thread = threading.Thread(target=sensor, args=(ctx, stop), name="sensor")
        sensor_thread.start()

        received = 0
        while True:
            # 4. Block until at least one entity is ready (False on timeout).
            if not wait_set.wait(timeout=2.0):
                print("timed out waiting")
                break
            # 5. wait_set.subscriptions lists the subscriptions that have
            #    messages; take everything that is waiting on each.
            for subscription in wait_set.subscriptions:
                while (message := subscription.get_message()) is not None:
                    received += 1
                    print(f"{subscription.topic_name}: {message}")
            # 6. wait_set.guard_conditions lists the triggered guard conditions
            #    (the wait set has reset them: triggering again wakes it again).
            if stop in wait_set.guard_conditions:
                print(f"stop requested by the guard condition after {received} messages")
                break

        sensor_thread.join()
        wait_set.clear()  # releases the guard condition for another wait set
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
