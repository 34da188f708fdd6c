"""Intraprocess benchmark: latency, throughput, service round trip, idle CPU, memory.

No mail server is involved: this measures the middleware itself (entities,
dispatch, queues, waiting), with the intraprocess transport.

    python benchmarks/intraprocess.py            # readable table
    python benchmarks/intraprocess.py --json     # machine-readable
    python benchmarks/intraprocess.py --n 50000 --rounds 5000
    python benchmarks/intraprocess.py --plot intraprocess.png   # also draw the results

What is measured (all times from ``time.perf_counter_ns``):

* same-thread latency: ``publish()`` then ``wait_for_message()`` in one thread.
  The intraprocess transport dispatches in the publisher's thread when nothing
  is queued, so this is a chain of function calls.
* cross-thread latency: a publisher thread publishes, a subscriber thread
  blocked in ``wait_for_message()`` wakes up and takes it (one way, publish
  start to message in hand). The publisher waits for an acknowledgement (a
  bare lock) before the next round, so messages never queue up.
* thread-hop floor: the same protocol with a bare ``threading.Lock`` in place
  of emailmw: the cost of waking a blocked thread on this machine and Python.
* typed round trip: as same-thread latency, with a pydantic model as the
  message type (JSON encoding and validation on both ends); printed with its
  ratio to the string round trip of the same run.
* asyncio round trip: ``await apublish()`` then ``await aget()`` in one task
  (the publish runs in the loop's default executor; the message comes back to
  the loop through ``call_soon_threadsafe``), next to the same-thread round trip
  of the same run, with their ratio.
* throughput: publish N messages, then drain them all; one thread.
* service round trip: ``send_request()`` → a server thread blocked in
  ``wait_for_request()`` answers → ``wait_for_response()`` (two thread hops).
* callback dispatch: the cross-thread protocol with an ``Executor`` spinning in
  the other thread: publish start to the subscription's callback invoked. Its
  p50 is printed as a ratio of the cross-thread (string) p50 of the same run.
* idle CPU: process CPU time while a subscriber waits 2 s for nothing.
* peak RSS growth: the process's peak RSS before and after the throughput run
  (run first, so that earlier phases cannot hide it). On Linux the peak is
  ``VmHWM`` from ``/proc/self/status``; ``ru_maxrss`` is only the fallback,
  because Linux carries it across fork and exec (a child of a large process
  would report its parent's peak).

Which phase it is in goes to stderr (a bar on a terminal). The benchmark only
prints; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

import emailmw
from emailmw._progress import ProgressReporter

TARGET_P50_US = 50.0
TARGET_THROUGHPUT = 50_000.0
TARGET_IDLE_CPU_PERCENT = 1.0
WARMUP = 1_000


@dataclass
class Row:
    """One line of the results table."""

    key: str
    label: str
    value: float
    unit: str
    target: str = ""
    passed: bool | None = None  # None: no target


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def summarize_ns(samples_ns: list[int]) -> dict[str, float]:
    """p50/p99/mean in microseconds."""
    values = sorted(s / 1_000 for s in samples_ns)
    return {
        "p50_us": percentile(values, 0.50),
        "p99_us": percentile(values, 0.99),
        "mean_us": statistics.fmean(values),
    }


def intra_context() -> emailmw.Context:
    return emailmw.Context(emailmw.Options(intraprocess=True))


# -- phases --------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set size, in bytes."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss: KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def bench_throughput(n: int) -> dict[str, float]:
    """Publish ``n`` messages, then drain them; also the peak RSS growth."""
    rss_before = peak_rss_bytes()
    with intra_context() as ctx:
        sub = emailmw.Subscription("/throughput", depth=n, context=ctx)
        pub = emailmw.Publisher("/throughput", context=ctx)
        message = "x" * 64
        start = time.perf_counter_ns()
        for _ in range(n):
            pub.publish(message)
        published = time.perf_counter_ns()
        received = 0
        while received < n:
            if sub.get_message() is None:
                emailmw.wait_for_message(sub, timeout=5.0)
            received += 1
        end = time.perf_counter_ns()
        dropped = ctx.stats().dropped_total
    rss_after = peak_rss_bytes()
    growth_bytes = rss_after - rss_before
    return {
        "n": n,
        "msgs_per_s": n / ((end - start) / 1e9),
        "publish_msgs_per_s": n / ((published - start) / 1e9),
        "drain_msgs_per_s": n / ((end - published) / 1e9),
        "dropped": dropped,
        "rss_growth_mib": growth_bytes / 2**20,
        "rss_growth_bytes_per_msg": growth_bytes / n,
        "peak_rss_mib": rss_after / 2**20,
    }


def bench_same_thread(rounds: int) -> dict[str, float]:
    """publish() then wait_for_message() in the same thread."""
    with intra_context() as ctx:
        sub = emailmw.Subscription("/latency", context=ctx)
        pub = emailmw.Publisher("/latency", context=ctx)
        clock = time.perf_counter_ns
        wait = emailmw.wait_for_message
        for _ in range(WARMUP):
            pub.publish("ping")
            wait(sub, 1.0)
        samples = []
        for _ in range(rounds):
            start = clock()
            pub.publish("ping")
            wait(sub, 1.0)
            samples.append(clock() - start)
    return summarize_ns(samples)


class Reading(BaseModel):
    """The typed round trip's message: a small pydantic model."""

    sensor: str
    value: float
    sequence: int


def bench_typed(rounds: int) -> dict[str, float]:
    """publish() then wait_for_message() in the same thread, the message a pydantic model."""
    with intra_context() as ctx:
        sub = emailmw.Subscription("/typed", Reading, context=ctx)
        pub = emailmw.Publisher("/typed", Reading, context=ctx)
        message = Reading(sensor="ping", value=20.5, sequence=1)
        clock = time.perf_counter_ns
        wait = emailmw.wait_for_message
        for _ in range(WARMUP):
            pub.publish(message)
            wait(sub, 1.0)
        samples = []
        for _ in range(rounds):
            start = clock()
            pub.publish(message)
            wait(sub, 1.0)
            samples.append(clock() - start)
    return summarize_ns(samples)


def bench_asyncio(rounds: int) -> dict[str, float]:
    """``await apublish()`` then ``await aget()`` in one task, one message at a time."""

    async def run() -> list[int]:
        async with intra_context() as ctx:
            sub = emailmw.Subscription("/latency", context=ctx)
            pub = emailmw.Publisher("/latency", context=ctx)
            clock = time.perf_counter_ns
            samples = []
            for i in range(WARMUP + rounds):
                start = clock()
                await pub.apublish("ping")
                await sub.aget(1.0)
                if i >= WARMUP:
                    samples.append(clock() - start)
            return samples

    return summarize_ns(asyncio.run(run()))


def one_way(rounds: int, send: Callable[[], None], receive: Callable[[], None]) -> list[int]:
    """One-way latency from ``send()`` in this thread to ``receive()`` returning in
    another thread, one message at a time (acknowledged by a bare lock)."""
    clock = time.perf_counter_ns
    total = WARMUP + rounds
    sent_at = [0] * total
    received_at = [0] * total
    ack = threading.Lock()
    ack.acquire()
    failure: list[BaseException] = []

    def receiver() -> None:
        try:
            for i in range(total):
                receive()
                received_at[i] = clock()
                ack.release()
        except BaseException as exc:  # report it instead of hanging the sender
            failure.append(exc)
            ack.release()

    thread = threading.Thread(target=receiver, name="bench-receiver")
    thread.start()
    time.sleep(0.05)  # let the receiver block first
    for i in range(total):
        sent_at[i] = clock()
        send()
        if not ack.acquire(timeout=5.0):
            raise RuntimeError(f"no acknowledgement for round {i}")
        if failure:
            raise RuntimeError("receiver failed") from failure[0]
    thread.join()
    return [r - s for s, r in zip(sent_at[WARMUP:], received_at[WARMUP:], strict=True)]


def bench_cross_thread(rounds: int) -> dict[str, float]:
    """Publisher thread → subscriber thread blocked in wait_for_message()."""
    with intra_context() as ctx:
        sub = emailmw.Subscription("/latency", context=ctx)
        pub = emailmw.Publisher("/latency", context=ctx)
        samples = one_way(
            rounds,
            lambda: pub.publish("ping"),
            lambda: emailmw.wait_for_message(sub, timeout=5.0),
        )
    return summarize_ns(samples)


def bench_thread_hop_floor(rounds: int) -> dict[str, float]:
    """The same protocol with a bare lock: the cheapest wake-up of another thread."""
    signal = threading.Lock()
    signal.acquire()

    def receive() -> None:
        if not signal.acquire(timeout=5.0):
            raise RuntimeError("lock ping-pong timed out")

    return summarize_ns(one_way(rounds, signal.release, receive))


def bench_service(rounds: int) -> dict[str, float]:
    """send_request() → server thread → wait_for_response(), one request at a time."""
    samples = []
    with intra_context() as ctx:
        server = emailmw.ServiceServer("/echo", context=ctx)
        client = emailmw.ServiceClient("/echo", context=ctx)

        def serve() -> None:
            try:
                while True:
                    request = emailmw.wait_for_request(server)
                    server.send_response(request.id, request.content)
            except emailmw.ContextError:
                pass  # the context shut down: the benchmark is over

        thread = threading.Thread(target=serve, name="bench-server")
        thread.start()
        clock = time.perf_counter_ns
        for i in range(WARMUP + rounds):
            start = clock()
            seq = client.send_request("ping")
            emailmw.wait_for_response(seq, client, timeout=5.0)
            if i >= WARMUP:
                samples.append(clock() - start)
    thread.join(timeout=5.0)
    return summarize_ns(samples)


def bench_callback_dispatch(rounds: int) -> dict[str, float]:
    """Publisher thread → callback run by an executor spinning in another thread."""
    clock = time.perf_counter_ns
    total = WARMUP + rounds
    invoked_at = [0] * total
    index = 0
    ack = threading.Lock()
    ack.acquire()

    def callback(message: str) -> None:
        nonlocal index
        invoked_at[index] = clock()
        index += 1
        ack.release()

    with intra_context() as ctx:
        sub = emailmw.Subscription("/latency", callback=callback, context=ctx)
        pub = emailmw.Publisher("/latency", context=ctx)
        executor = emailmw.Executor(context=ctx)
        executor.add(sub)
        thread = threading.Thread(target=executor.spin, name="bench-executor")
        thread.start()
        time.sleep(0.05)  # let the executor block first
        sent_at = [0] * total
        try:
            for i in range(total):
                sent_at[i] = clock()
                pub.publish("ping")
                if not ack.acquire(timeout=5.0):
                    raise RuntimeError(f"no callback for round {i}")
        finally:
            executor.shutdown()
            thread.join(timeout=5.0)
    samples = [r - s for s, r in zip(sent_at[WARMUP:], invoked_at[WARMUP:], strict=True)]
    return summarize_ns(samples)


def bench_idle_cpu(seconds: float) -> dict[str, float]:
    """Process CPU time while a subscriber waits ``seconds`` for a message that never comes."""
    with intra_context() as ctx:
        sub = emailmw.Subscription("/idle", context=ctx)
        before = resource.getrusage(resource.RUSAGE_SELF)
        wall_start = time.perf_counter()
        try:
            emailmw.wait_for_message(sub, timeout=seconds)
        except emailmw.WaitTimeoutError:
            pass  # expected: nothing is published
        else:
            raise RuntimeError("a message arrived during the idle measurement")
        wall = time.perf_counter() - wall_start
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "cpu_percent": 100.0 * cpu / wall}


# -- report --------------------------------------------------------------------------


def machine() -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "switch_interval_s": sys.getswitchinterval(),
    }


def build_rows(results: dict[str, dict[str, float]]) -> list[Row]:
    same, cross, floor = (
        results["same_thread"],
        results["cross_thread"],
        results["thread_hop_floor"],
    )
    service, thr, idle = results["service"], results["throughput"], results["idle_cpu"]
    aio = results["asyncio"]
    aio_ratio = aio["p50_us"] / same["p50_us"]
    p50_target = f"<= {TARGET_P50_US:.0f} us"
    return [
        Row(
            "same_thread_p50",
            "pub->get latency, same thread, p50",
            same["p50_us"],
            "us",
            p50_target,
            same["p50_us"] <= TARGET_P50_US,
        ),
        Row("same_thread_p99", "pub->get latency, same thread, p99", same["p99_us"], "us"),
        Row(
            "typed_p50",
            "  typed (pydantic model) round trip, p50 "
            f"({results['typed']['p50_us'] / same['p50_us']:.1f}x str)",
            results["typed"]["p50_us"],
            "us",
        ),
        Row(
            "asyncio_p50",
            f"asyncio round trip (apublish->aget), p50, {aio_ratio:.1f}x same thread",
            aio["p50_us"],
            "us",
        ),
        Row(
            "cross_thread_p50",
            "pub->get latency, cross thread, p50",
            cross["p50_us"],
            "us",
            p50_target,
            cross["p50_us"] <= TARGET_P50_US,
        ),
        Row("cross_thread_p99", "pub->get latency, cross thread, p99", cross["p99_us"], "us"),
        callback_row(results["callback_dispatch"], cross),
        Row("floor_p50", "thread-hop floor (bare lock), p50", floor["p50_us"], "us"),
        Row("floor_p99", "thread-hop floor (bare lock), p99", floor["p99_us"], "us"),
        Row("service_p50", "service round trip, p50", service["p50_us"], "us"),
        Row("service_p99", "service round trip, p99", service["p99_us"], "us"),
        Row(
            "throughput",
            f"throughput (publish {thr['n']:.0f}, then drain)",
            thr["msgs_per_s"],
            "msg/s",
            f">= {TARGET_THROUGHPUT:,.0f} msg/s",
            thr["msgs_per_s"] >= TARGET_THROUGHPUT,
        ),
        Row("publish_rate", "  publish only", thr["publish_msgs_per_s"], "msg/s"),
        Row("drain_rate", "  drain only", thr["drain_msgs_per_s"], "msg/s"),
        Row(
            "idle_cpu",
            f"idle CPU, subscriber waiting {idle['wall_s']:.1f} s",
            idle["cpu_percent"],
            "% of a core",
            f"< {TARGET_IDLE_CPU_PERCENT:.0f} %",
            idle["cpu_percent"] < TARGET_IDLE_CPU_PERCENT,
        ),
        Row("rss_growth", "peak RSS growth, throughput run", thr["rss_growth_mib"], "MiB"),
        Row("rss_per_msg", "  per queued message", thr["rss_growth_bytes_per_msg"], "bytes"),
    ]


def callback_row(callback: dict[str, float], cross: dict[str, float]) -> Row:
    """Callback dispatch p50, with its ratio to the cross-thread string p50."""
    ratio = callback["p50_us"] / cross["p50_us"]
    return Row(
        "callback_p50",
        f"pub->callback (executor thread), p50: {ratio:.2f}x cross thread",
        callback["p50_us"],
        "us",
    )


def format_value(value: float, unit: str) -> str:
    if unit in ("msg/s", "bytes"):
        return f"{value:,.0f} {unit}"
    if unit == "% of a core":
        return f"{value:.2f} {unit}"
    return f"{value:,.1f} {unit}"


def print_table(rows: list[Row], info: dict[str, object], elapsed: float) -> None:
    print(
        f"emailmw intraprocess benchmark: Python {info['python']} ({info['implementation']}), "
        f"{info['cpus']} CPUs, {info['platform']}"
    )
    headers = ("metric", "result", "target", "")
    table = [
        (
            row.label,
            format_value(row.value, row.unit),
            row.target or "-",
            "" if row.passed is None else ("PASS" if row.passed else "MISS"),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in (headers, *table)) for i in range(4)]
    rule = "  ".join("-" * w for w in widths)
    print(rule)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    print(rule)
    for label, value, target, status in table:
        print(
            f"{label.ljust(widths[0])}  {value.rjust(widths[1])}  "
            f"{target.ljust(widths[2])}  {status}".rstrip()
        )
    print(rule)
    misses = [row.label for row in rows if row.passed is False]
    verdict = "all targets met" if not misses else f"MISSED: {', '.join(misses)}"
    print(f"{verdict} (ran in {elapsed:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="messages in the throughput run")
    parser.add_argument("--rounds", type=int, default=20_000, help="rounds per latency measurement")
    parser.add_argument(
        "--idle", type=float, default=2.0, help="seconds of idle waiting for the CPU measurement"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--plot",
        metavar="PATH.png",
        help="also draw the results into PATH.png (needs emailmw[plot])",
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.rounds < 1 or args.idle <= 0:
        parser.error("--n and --rounds must be >= 1, --idle > 0")
    pyplot = None
    if args.plot:
        import _plot

        pyplot = _plot.start(parser, args.plot)
    progress = ProgressReporter(sys.stderr, "intraprocess")
    phases: list[tuple[str, Callable[[], dict[str, float]]]] = [
        # Throughput first: its peak RSS growth must not hide behind earlier phases.
        ("throughput", lambda: bench_throughput(args.n)),
        ("same_thread", lambda: bench_same_thread(args.rounds)),
        ("typed", lambda: bench_typed(args.rounds)),
        ("asyncio", lambda: bench_asyncio(args.rounds)),
        ("cross_thread", lambda: bench_cross_thread(args.rounds)),
        ("thread_hop_floor", lambda: bench_thread_hop_floor(args.rounds)),
        ("service", lambda: bench_service(args.rounds)),
        ("callback_dispatch", lambda: bench_callback_dispatch(args.rounds)),
        ("idle_cpu", lambda: bench_idle_cpu(args.idle)),
    ]

    started = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    for done, (name, phase) in enumerate(phases):
        progress("phases", done, len(phases))
        results[name] = phase()
    progress("phases", len(phases), len(phases))
    results["typed"]["p50_ratio_to_str"] = (
        results["typed"]["p50_us"] / results["same_thread"]["p50_us"]
    )
    elapsed = time.perf_counter() - started

    rows = build_rows(results)
    info = machine()
    if args.json:
        out = {
            "machine": info,
            "args": {"n": args.n, "rounds": args.rounds, "idle": args.idle},
            "results": results,
            "targets": {
                row.key: {"value": row.value, "target": row.target, "pass": row.passed}
                for row in rows
                if row.passed is not None
            },
            "elapsed_s": elapsed,
        }
        print(json.dumps(out, indent=2))
    else:
        print_table(rows, info, elapsed)
    if pyplot is not None:
        plot(pyplot, args.plot, results, args)
    return 0


def plot(pyplot: Any, path: str, results: dict[str, dict[str, float]], args: Any) -> None:
    """Latency p50/p99 of each path next to the thread-hop floor, and throughput."""
    import _plot

    fig, (latency, throughput) = _plot.figure(pyplot, 2, size=(6.0, 3.6))
    paths = {
        "same\nthread": "same_thread",
        "typed": "typed",
        "asyncio": "asyncio",
        "cross\nthread": "cross_thread",
        "floor\n(bare lock)": "thread_hop_floor",
        "callback": "callback_dispatch",
        "service": "service",
    }
    _plot.grouped_bars(
        latency,
        list(paths),
        {
            "p50": [results[key]["p50_us"] for key in paths.values()],
            "p99": [results[key]["p99_us"] for key in paths.values()],
        },
        unit="µs",
        fmt="{:.0f}",
    )
    _plot.log_scale(latency, "y")
    latency.axhline(TARGET_P50_US, color="C3", linestyle="--", linewidth=0.8)
    latency.set_title(
        f"latency, {args.rounds:,} rounds each (dashed: p50 target {TARGET_P50_US:g} µs)"
    )
    thr = results["throughput"]
    _plot.bars(
        throughput,
        ["publish, then drain", "publish only", "drain only"],
        [thr["msgs_per_s"], thr["publish_msgs_per_s"], thr["drain_msgs_per_s"]],
        unit="msg/s",
        fmt="{:,.0f}",
    )
    _plot.log_scale(throughput)
    throughput.axvline(TARGET_THROUGHPUT, color="C3", linestyle="--", linewidth=0.8)
    idle = results["idle_cpu"]
    throughput.set_title(
        f"throughput, {args.n:,} messages (dashed: target); idle CPU "
        f"{idle['cpu_percent']:.2f} % of a core"
    )
    _plot.save(pyplot, fig, path, "intraprocess: latency and throughput")


if __name__ == "__main__":
    raise SystemExit(main())
