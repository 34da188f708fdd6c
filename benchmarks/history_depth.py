"""What the intraprocess history costs: publish with ``history-depth`` 0, 100, 1000.

The intraprocess receiver keeps the last ``history-depth`` messages of each
topic for ``Subscription(..., history=N)``. Keeping them alive costs the hot
path memory traffic (an email is freed ``history-depth`` publishes later, no
longer in cache). This benchmark measures it in one process, alternating the
depths block by block so that a busy machine slows them all alike:

* round trip: ``publish()`` then ``get_message()`` in one thread;
* publish into a deep queue: ``publish()`` N times, then drain.

    python benchmarks/history_depth.py
    python benchmarks/history_depth.py --blocks 20 --depths 0 10 100 1000
    python benchmarks/history_depth.py --plot history_depth.png   # also draw the ratios

It prints the fastest and the lower-quartile block of each depth (µs per
message), and their ratios to depth 0; how far it got goes to stderr (a bar on a
terminal). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import Any

import emailmw
from emailmw._progress import ProgressReporter
from emailmw.transport.intra import IntraEmailReceiver


def round_trip(pub: emailmw.Publisher[str], sub: emailmw.Subscription[str], n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        pub.publish("x")
        sub.get_message()
    return (time.perf_counter_ns() - start) / n / 1000


def publish_deep(pub: emailmw.Publisher[str], sub: emailmw.Subscription[str], n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        pub.publish("x")
    elapsed = time.perf_counter_ns() - start
    while sub.get_message() is not None:
        pass
    return elapsed / n / 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 100, 1000])
    parser.add_argument("--blocks", type=int, default=12, help="blocks per depth")
    parser.add_argument("--rounds", type=int, default=4000, help="round trips per block")
    parser.add_argument("--n", type=int, default=10_000, help="publishes per deep-queue block")
    parser.add_argument(
        "--plot",
        metavar="PATH.png",
        help="also draw the results into PATH.png (needs emailmw[plot])",
    )
    args = parser.parse_args(argv)
    if args.blocks < 4 or min(args.depths) < 0:
        parser.error("--blocks must be >= 4 and every depth >= 0")
    pyplot = None
    if args.plot:
        import _plot

        pyplot = _plot.start(parser, args.plot)
    progress = ProgressReporter(sys.stderr, "history_depth")

    results: dict[int, tuple[list[float], list[float]]] = {d: ([], []) for d in args.depths}
    with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:
        pub = emailmw.Publisher("/bench/history", context=ctx)
        sub = emailmw.Subscription("/bench/history", depth=args.n + 1, context=ctx)
        receiver = ctx._receiver
        assert isinstance(receiver, IntraEmailReceiver)
        for block in range(args.blocks):
            progress("blocks", block, args.blocks)
            for depth in args.depths:
                receiver._history_depth = depth  # the depth as if configured
                receiver._history.clear()
                round_trip(pub, sub, max(depth, 100) + 100)  # fill the history first
                results[depth][0].append(round_trip(pub, sub, args.rounds))
                results[depth][1].append(publish_deep(pub, sub, args.n))
        progress("blocks", args.blocks, args.blocks)

    print(f"python {platform.python_version()} on {platform.machine()}, {args.blocks} blocks")
    base = args.depths[0]
    header = f"{'history-depth':>13}  {'round trip µs (min / q1)':>26}"
    print(f"{header}  {'deep publish µs (min / q1)':>27}")
    for depth, (trips, deep) in results.items():
        trips.sort()
        deep.sort()
        q = len(trips) // 4
        ratio = ""
        if depth != base:
            b_trips, b_deep = sorted(results[base][0]), sorted(results[base][1])
            ratio = f"   {trips[0] / b_trips[0]:.2f}x / {deep[0] / b_deep[0]:.2f}x of depth {base}"
        trip = f"{trips[0]:>12.2f} / {trips[q]:<11.2f}"
        print(f"{depth:>13}  {trip}  {deep[0]:>13.2f} / {deep[q]:<11.2f}{ratio}")
    if pyplot is not None:
        plot(pyplot, args.plot, results, args.blocks)
    return 0


def plot(
    pyplot: Any, path: str, results: dict[int, tuple[list[float], list[float]]], blocks: int
) -> None:
    """The fastest block of each depth in µs per message, and as a ratio to the first depth."""
    import _plot

    depths = list(results)
    base = depths[0]
    trips = [min(results[d][0]) for d in depths]
    deep = [min(results[d][1]) for d in depths]
    fig, (absolute, ratio) = _plot.figure(pyplot, 2)
    groups = [str(d) for d in depths]
    _plot.grouped_bars(
        absolute,
        groups,
        {"round trip": trips, "publish into a deep queue": deep},
        unit="µs per message (fastest block)",
        fmt="{:.2f}",
    )
    absolute.set_xlabel("history-depth")
    absolute.set_title(f"fastest of {blocks} blocks per depth")
    _plot.grouped_bars(
        ratio,
        groups,
        {
            "round trip": [t / trips[0] for t in trips],
            "publish into a deep queue": [d / deep[0] for d in deep],
        },
        unit=f"x depth {base}",
        fmt="{:.2f}x",
    )
    ratio.axhline(1.0, color="k", linewidth=0.8)
    ratio.set_xlabel("history-depth")
    ratio.set_title(f"ratio to history-depth {base}")
    _plot.save(pyplot, fig, path, "history_depth: what the intraprocess history costs")


if __name__ == "__main__":
    raise SystemExit(main())
