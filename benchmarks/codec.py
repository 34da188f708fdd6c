"""Codec benchmark: decode time per megabyte, for header-heavy and body-heavy emails.

No mail server is involved: this times :func:`emailmw.transport.codec.decode_email`
on emails built in memory, at growing sizes, so that anything worse than linear
shows as a growing time per MB.

    python benchmarks/codec.py                   # readable table
    python benchmarks/codec.py --json            # machine-readable
    python benchmarks/codec.py --sizes 1 4 16 --repeat 5
    python benchmarks/codec.py --plot codec.png  # also draw seconds per MB against size

Shapes (each email is ``size`` MB of the one thing named):

* ``to_lines``: ``To:`` fields of about 350 bytes (plain addresses, display
  names, quoted display names holding commas), as many as fit;
* ``to_cc_lines``: the same, alternating ``To:`` and ``Cc:``;
* ``one_folded_to``: one ``To:`` field folded over many lines;
* ``dense_addresses``: ``To:`` fields of 40 tiny addresses (``a1.2@b``);
* ``comments_and_groups``: ``To:`` fields with comments, groups and quoted
  pairs inside quoted display names (still the fast path);
* ``nested_comments``: ``To:`` fields with nested comments, which only the
  general tokenizer reads (the slowest path, one Python step per token);
* ``user_headers``: ``X-A:`` fields of the same text (no address parsing);
* ``body_qp`` / ``body_base64``: a body of that size, as emailmw encodes it
  (quoted-printable for text without CR, base64 for text with CRLF).

Each number is the CPU time (``time.process_time``) of the fastest of
``--repeat`` decodes: CPU time rather than wall time, so that other processes
on a shared machine disturb it less. How far it got goes to stderr (a bar on a
terminal). The benchmark only prints; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

from emailmw._progress import ProgressReporter
from emailmw.transport.codec import decode_email, encode_email
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients

MB = 1_000_000
HEAD = (
    b"From: alice@example.test\r\nSubject: /bench\r\nMessage-ID: <bench@example.test>\r\n"
    b"Source-Timestamp: 1700000000000000000\r\nPublisher-GID: 7\r\n"
)


def _address_line(index: int) -> str:
    return (
        f"user{index}@example.test, Some Body <some.body{index}@example.test>, "
        f'"Doe, Jane" <jane.doe+{index}@mail.example.test>, other{index}@example.test, '
        f"Another Long Display Name <another.long.name{index}@example.test>, "
        f'"Smith, John (Sales)" <john.smith{index}@sales.example.test>, last{index}@x.test, '
        f"O'Brien <obrien{index}@example.test>, very.last.one{index}@long-domain.example.test"
    )


def _fields(size: int, line: Callable[[int], str]) -> bytes:
    parts: list[bytes] = []
    total = 0
    index = 0
    while total < size:
        part = line(index).encode() + b"\r\n"
        parts.append(part)
        total += len(part)
        index += 1
    return b"".join(parts)


def _header_email(size: int, line: Callable[[int], str]) -> bytes:
    return HEAD + _fields(size, line) + b"\r\nbody\r\n"


def _one_folded_to(size: int) -> bytes:
    folded = _fields(size, lambda i: f" {_address_line(i)},")
    return HEAD + b"To: first@example.test," + b"\r\n" + folded.rstrip(b",\r\n") + b"\r\n\r\nx"


def _body_email(size: int, crlf: bool) -> bytes:
    line = "The quick brown fox jumps over the lazy dog. Ünïcödé. 12345" + (
        "\r\n" if crlf else "\n"
    )
    body = (line * (size // len(line) + 1))[:size]
    headers = EmailHeaders({"Source-Timestamp": "1700000000000000000", "Publisher-GID": "7"})
    return encode_email(
        EmailData(
            EmailContent("/bench", body),
            headers,
            message_id="<bench@example.test>",
            from_="alice@example.test",
            recipients=EmailRecipients(to=["bob@example.test"]),
        )
    )


SHAPES: dict[str, Callable[[int], bytes]] = {
    "to_lines": lambda size: _header_email(size, lambda i: f"To: {_address_line(i)}"),
    "to_cc_lines": lambda size: _header_email(
        size, lambda i: f"{('To', 'Cc')[i % 2]}: {_address_line(i)}"
    ),
    "one_folded_to": _one_folded_to,
    "dense_addresses": lambda size: _header_email(
        size, lambda i: "To: " + ",".join(f"a{i}.{n}@b" for n in range(40))
    ),
    "comments_and_groups": lambda size: _header_email(
        size,
        lambda i: f'To: a{i}@x (c, d), team: "q\\" x" <b{i}@y>, c@z;, (n) d@w, e{i}@v',
    ),
    "nested_comments": lambda size: _header_email(
        size, lambda i: f"To: a{i}@x (c, (d)), (n (m)) d@w, <e{i}@v (f (g))>"
    ),
    "user_headers": lambda size: _header_email(size, lambda i: f"X-A: {_address_line(i)}"),
    "body_qp": lambda size: _body_email(size, crlf=False),
    "body_base64": lambda size: _body_email(size, crlf=True),
}


def measure(shape: str, size_mb: float, repeat: int) -> dict[str, float | str]:
    """Build one email of ``shape`` and time its decoding."""
    raw = SHAPES[shape](int(size_mb * MB))
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        email = decode_email(raw)
        best = min(best, time.process_time() - start)
        assert email is not None
    megabytes = len(raw) / MB
    return {
        "shape": shape,
        "mb": round(megabytes, 2),
        "seconds": round(best, 4),
        "seconds_per_mb": round(best / megabytes, 4),
    }


def plot(pyplot: Any, path: str, rows: list[dict[str, float | str]], repeat: int) -> None:
    """Seconds per MB against the email's size, one line per shape: flat is linear."""
    import _plot

    fig, (ax,) = _plot.figure(pyplot, 1, size=(8.0, 4.5))
    for shape in dict.fromkeys(str(row["shape"]) for row in rows):
        mine = [row for row in rows if row["shape"] == shape]
        ax.plot([r["mb"] for r in mine], [r["seconds_per_mb"] for r in mine], "o-", label=shape)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("email size (MB)")
    ax.set_ylabel("decode CPU seconds per MB")
    ax.set_title(f"decode_email, fastest of {repeat}; a flat line is linear in the size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    _plot.save(pyplot, fig, path, "codec: decode time per MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.875, 1.75, 3.5, 7.0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--json", action="store_true")
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
    progress = ProgressReporter(sys.stderr, "codec")
    cases = [(shape, size) for shape in args.shapes for size in args.sizes]
    rows = []
    for done, (shape, size) in enumerate(cases):
        progress("decode", done, len(cases))
        rows.append(measure(shape, size, args.repeat))
    progress("decode", len(cases), len(cases))
    if pyplot is not None:
        plot(pyplot, args.plot, rows, args.repeat)
    if args.json:
        json.dump({"python": sys.version.split()[0], "rows": rows}, sys.stdout, indent=2)
        print()
        return
    print(
        f"decode_email CPU time, fastest of {args.repeat}; Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}"
    )
    print(f"{'shape':<22}{'MB':>8}{'seconds':>10}{'s per MB':>10}")
    for row in rows:
        print(
            f"{row['shape']:<22}{row['mb']:>8.2f}{row['seconds']:>10.3f}"
            f"{row['seconds_per_mb']:>10.3f}"
        )


if __name__ == "__main__":
    main()
