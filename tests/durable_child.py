"""A durable subscriber process for tests/test_durable.py (run as a script).

    python durable_child.py CONFIG NAME TOPIC OUT

Subscribes to TOPIC with ``durable=NAME`` and a callback that appends each
message to OUT (one line each, flushed before the callback returns: a message
is in the file before it is marked handled). Writes ``ready`` to OUT once the
subscription exists. Runs until killed, or until it reads a line ``stop`` on
standard input (then it shuts down cleanly).
"""

from __future__ import annotations

import logging
import sys
import threading

import emailmw


def main(config: str, name: str, topic: str, out_path: str) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s"
    )
    with open(out_path, "a", encoding="utf-8") as out:
        lock = threading.Lock()

        def write(line: str) -> None:
            with lock:
                out.write(line + "\n")
                out.flush()

        with emailmw.Context(emailmw.Options.from_file(config)) as ctx:
            sub = emailmw.Subscription(topic, durable=name, callback=write, context=ctx)
            executor = emailmw.Executor(context=ctx)
            executor.add(sub)
            worker = threading.Thread(target=executor.spin, daemon=True)
            worker.start()
            write("ready")
            for line in sys.stdin:  # until "stop" or end of input
                if line.strip() == "stop":
                    break
            executor.shutdown()
            worker.join(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:5]))
