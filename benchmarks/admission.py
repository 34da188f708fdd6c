"""Admission benchmark: what the replay memory costs per email and per remembered id.

No mail server is involved: signed emails go straight into
:class:`emailmw.security.AdmissionPolicy` with a fake clock that advances 2 ms
per email (500 emails/s), so the memory fills as it would under that load.

    python benchmarks/admission.py                 # readable table
    python benchmarks/admission.py --json          # machine-readable
    python benchmarks/admission.py --n 2000000     # fill the memory to its capacity
    python benchmarks/admission.py --journal       # the memory kept in a state store
    python benchmarks/admission.py --plot admission.png   # also draw the results

What is measured:

* check cost: the time of ``AdmissionPolicy.check()`` per email (HMAC-SHA256
  verification included), while the memory holds ``n`` ids, in slices of 10 %;
  and ``verify_signature()`` alone, so that the replay memory's share shows.
* replay memory per id: ``tracemalloc`` bytes held by a replay memory of
  ``--memory-n`` ids (default 2 000 000, the capacity), divided by the ids,
  and the peak while filling it (filled through the memory's own methods: with
  tracing on, signing and verifying that many emails would take minutes).
* frozen slices searched per lookup at the end (at most about 33).
* with ``--journal``: the same, with the replay memory kept in a state store's
  replay slot (a temporary directory), as a context on a mail server keeps it;
  then the time to load those ids into a new policy (a restart), and the file's
  size.

The emails are re-stamped and re-signed copies of one email: the policy keeps
only a digest of each Message-ID. How far it got goes to stderr (a bar on a
terminal). The benchmark only prints; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from emailmw._progress import ProgressReporter
from emailmw.info import HEADER_PUBLISHER_GID, HEADER_SOURCE_TIMESTAMP
from emailmw.security import AdmissionPolicy, sign_email, verify_signature
from emailmw.state_store import StateStore
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients

KEY = b"benchmark signing key, 32 bytes!"
RATE = 500.0  # emails per second of fake time


class FakeClock:
    """Wall-clock seconds that move only when told."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def make_email() -> EmailData:
    headers = EmailHeaders()
    headers[HEADER_SOURCE_TIMESTAMP] = "0"
    headers[HEADER_PUBLISHER_GID] = "7"
    return EmailData(
        content=EmailContent("/bench", "x" * 100),
        headers=headers,
        message_id="<0@bench.example>",
        from_="bench@bench.example",
        recipients=EmailRecipients(to=["bench@bench.example"]),
    )


def run(
    n: int,
    max_age: float,
    state_dir: Path | None = None,
    progress: ProgressReporter | None = None,
) -> dict[str, float]:
    """Admit ``n`` signed emails through ``check()``, timing each call (with the
    replay memory kept in a state store in ``state_dir`` if given)."""
    clock = FakeClock()
    email = make_email()
    store = StateStore(state_dir) if state_dir is not None else None
    slot = store.claim_replay("benchmark") if store is not None else None
    policy = AdmissionPolicy(KEY, max_age=max_age, clock=clock, journal=slot)
    check_ns = 0
    slice_ns: list[float] = []
    slice_size = max(n // 10, 1)
    in_slice = 0
    for index in range(n):
        clock.now += 1.0 / RATE
        email.message_id = f"<{index}.{time.time_ns()}@bench.example>"
        email.headers[HEADER_SOURCE_TIMESTAMP] = str(int(clock.now * 1e9))
        sign_email(email, KEY)
        start = time.perf_counter_ns()
        reason = policy.check(email)
        elapsed = time.perf_counter_ns() - start
        check_ns += elapsed
        in_slice += elapsed
        if reason is not None:
            raise SystemExit(f"email {index} refused: {reason.value}")
        if (index + 1) % slice_size == 0:
            slice_ns.append(in_slice / slice_size)
            in_slice = 0
            if progress is not None:
                progress("check", index + 1, n)
    extra: dict[str, float] = {}
    if store is not None and state_dir is not None:
        start = time.perf_counter_ns()
        policy.close()  # the last batch written, the slot released
        extra["close_ms"] = (time.perf_counter_ns() - start) / 1e6
        start = time.perf_counter_ns()
        slot = store.claim_replay("benchmark")
        loaded = AdmissionPolicy(KEY, max_age=max_age, clock=clock, journal=slot)
        extra["load_s"] = (time.perf_counter_ns() - start) / 1e9
        extra["loaded"] = loaded.remembered
        loaded.close()
        store.close()
        extra["state_file_mb"] = (
            sum(f.stat().st_size for f in state_dir.glob("state.sqlite3*")) / 2**20
        )
    verify_ns = []
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(10_000):
            verify_signature(email, KEY)
        verify_ns.append((time.perf_counter_ns() - start) / 10_000)
    return {
        "emails": n,
        "remembered": policy.remembered,
        "check_us_mean": check_ns / n / 1000,
        "check_us_first_10pct": slice_ns[0] / 1000 if slice_ns else 0.0,
        "check_us_last_10pct": slice_ns[-1] / 1000 if slice_ns else 0.0,
        "verify_signature_us": min(verify_ns) / 1000,
        "frozen_slices": policy._memory.slices,
    } | extra


def measure_memory(
    n: int, max_age: float, progress: ProgressReporter | None = None
) -> dict[str, float]:
    """``tracemalloc`` bytes held by a replay memory of ``n`` ids. Filled through the
    memory's own ``expire()``/``add()``, as ``check()`` does (tracing would make
    signing and verifying ``n`` emails take minutes)."""
    clock = FakeClock()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    policy = AdmissionPolicy(KEY, max_age=max_age, clock=clock, capacity=max(n, 1))
    memory = policy._memory
    peak_held = 0
    step = max(n // 100, 1)
    for index in range(n):
        clock.now += 1.0 / RATE
        memory.expire(clock.now)
        memory.add(memory.digest(f"<{index}.{index * 7919}@bench.example>"))
        if progress is not None and (index + 1) % step == 0:
            progress("memory", index + 1, n)
    held = tracemalloc.get_traced_memory()[0] - before
    peak_held = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    return {
        "memory_ids": len(memory),
        "replay_memory_bytes": held,
        "replay_memory_peak_bytes": peak_held,
        "bytes_per_id": held / max(len(memory), 1),
    }


def plot(pyplot: Any, path: str, result: dict[str, float], n: int) -> None:
    """The cost of ``check()`` next to the signature check alone, and the memory held."""
    import _plot

    fig, (cost, memory) = _plot.figure(pyplot, 2)
    _plot.bars(
        cost,
        ["check(), mean", "check(), first 10 %", "check(), last 10 %", "verify_signature() alone"],
        [
            result["check_us_mean"],
            result["check_us_first_10pct"],
            result["check_us_last_10pct"],
            result["verify_signature_us"],
        ],
        unit="µs",
        fmt="{:.2f}",
        colors=["C0", "C0", "C0", "C7"],
    )
    cost.set_title(f"per email, {n:,} signed emails at {RATE:g}/s (fake clock)")
    _plot.bars(
        memory,
        ["held", "peak while filling"],
        [result["replay_memory_bytes"] / 2**20, result["replay_memory_peak_bytes"] / 2**20],
        unit="MiB",
    )
    memory.set_title(
        f"replay memory of {result['memory_ids']:,.0f} ids: "
        f"{result['bytes_per_id']:.1f} bytes per id"
    )
    _plot.save(pyplot, fig, path, "admission: what the replay memory costs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="emails to admit")
    parser.add_argument("--memory-n", type=int, default=2_000_000, help="ids to hold")
    parser.add_argument("--max-age", type=float, default=24 * 3600.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--journal", action="store_true", help="keep the replay memory in a state store"
    )
    parser.add_argument(
        "--plot",
        metavar="PATH.png",
        help="also draw the results into PATH.png (needs emailmw[plot])",
    )
    args = parser.parse_args()
    pyplot = None
    if args.plot:
        import _plot

        pyplot = _plot.start(parser, args.plot)
    progress = ProgressReporter(sys.stderr, "admission")
    with tempfile.TemporaryDirectory(prefix="emailmw-bench-") as tmp:
        state_dir = Path(tmp) if args.journal else None
        result = run(args.n, args.max_age, state_dir, progress) | measure_memory(
            args.memory_n, args.max_age, progress
        )
    progress.close()
    if pyplot is not None:
        plot(pyplot, args.plot, result, args.n)
    if args.json:
        result["python"] = platform.python_version()  # type: ignore[assignment]
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print(
        f"admission, {args.n} signed emails at {RATE:g}/s (fake clock), max-age {args.max_age:g} s"
    )
    print(f"  check() per email, mean        {result['check_us_mean']:8.2f} us")
    print(
        f"    first 10 % / last 10 %        {result['check_us_first_10pct']:8.2f} / "
        f"{result['check_us_last_10pct']:.2f} us"
    )
    print(f"  verify_signature() alone       {result['verify_signature_us']:8.2f} us")
    print(f"  ids remembered                 {result['remembered']:8d}")
    print(f"  replay memory holding {result['memory_ids']:.0f} ids")
    print(f"    held                         {result['replay_memory_bytes'] / 2**20:8.1f} MiB")
    print(f"    peak while filling           {result['replay_memory_peak_bytes'] / 2**20:8.1f} MiB")
    print(f"    per remembered id            {result['bytes_per_id']:8.1f} bytes")
    print(f"  frozen slices searched         {result['frozen_slices']:8d}")
    if args.journal:
        print(f"  state store: close (last write) {result['close_ms']:7.1f} ms")
        print(f"    restart: load {result['loaded']:.0f} ids     {result['load_s']:8.2f} s")
        print(f"    file size                    {result['state_file_mb']:8.1f} MiB")


if __name__ == "__main__":
    main()
