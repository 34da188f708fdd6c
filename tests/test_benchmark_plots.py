"""``--plot PATH.png`` of every benchmark under benchmarks/ (benchmarks/_plot.py).

Each benchmark runs as a script (as a reader runs it) with the smallest arguments
that finish in a few seconds, with ``--plot``: the file must be a real PNG of a
real size, and what the benchmark prints (the table or the JSON) must keep its
form: the same as without ``--plot`` where a second run is cheap, and the known
keys and sections for the mail-server ones. Without matplotlib, ``--plot`` stops
a benchmark before it measures anything, with an error naming the extra.

The mail-server benchmarks start their own Dovecot + Postfix (DevServer), so they
need the mail stack like the ``dev_server`` fixture does (skipped without it,
failing on CI).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mailstack import require_mailstack
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: the smallest arguments that measure every part a plot draws, in a few seconds
QUICK: dict[str, list[str]] = {
    "admission": ["--n", "5000", "--memory-n", "5000"],
    "codec": ["--sizes", "0.02", "0.04", "--repeat", "1", "--shapes", "to_lines", "body_qp"],
    "history_depth": ["--blocks", "4", "--rounds", "100", "--n", "200", "--depths", "0", "100"],
    "intraprocess": ["--n", "500", "--rounds", "100", "--idle", "0.1"],
    "retention": ["--emails", "600", "--topics", "3", "--foreign", "2"],
    "faults": ["--messages", "30", "--only", "kick", "--only", "silent-init"],
    "mailbox": [
        "--messages", "10", "--rate", "50", "--modes", "auto,poll-10ms",
        "--idle-seconds", "0.5", "--burst", "20",
        "--late-joins", "1", "--late-joiner-modes", "poll-10ms",
        "--history-emails", "200",
    ],
    "federation": [
        "--messages", "10", "--rate", "50", "--burst", "20", "--modes", "poll-10ms,auto",
        "--outage-seconds", "1", "--outage-messages", "5",
    ],
    "readers": ["--readers", "1,2", "--messages", "10", "--rate", "20"],
}  # fmt: skip
ALL = sorted(QUICK)


def run_python(tmp_path: Path, *argv: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run this Python with ``argv``; (exit code, stdout, stderr). Output goes through
    files, not pipes (Dovecot keeps its caller's stderr open)."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        code = subprocess.run(
            [sys.executable, *argv], stdout=stdout, stderr=stderr, timeout=timeout, check=False
        ).returncode
    return code, out.read_text(), err.read_text()


def run(tmp_path: Path, name: str, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run ``benchmarks/<name>.py`` as a script, as a reader does."""
    return run_python(tmp_path, str(BENCHMARKS / f"{name}.py"), *args, timeout=timeout)


def assert_png(path: Path) -> None:
    """A real PNG of a real size: the magic bytes, a few kB at least, and Pillow reads
    it whole as a picture of at least 400 x 250 pixels."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG: {data[:8]!r}"
    assert len(data) > 8_000, f"{path} is only {len(data)} bytes"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 400 and image.height >= 250, image.size
        # more than a blank page: the plot has many colours of ink
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 8


_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
#: a verdict on a target (intraprocess.py): it may differ between two runs
_VERDICT = re.compile(r"\b(?:PASS|MISS)\b|^(?:all targets met|MISSED: .*)(?= \(ran in)")


_RULE = re.compile(r"-{3,}")


def text_form(text: str) -> list[str]:
    """The printed lines with every number replaced by ``N``, every verdict by
    ``VERDICT``, table rules (runs of ``-`` sized to the widest value) by ``---``,
    and spacing collapsed."""
    return [
        " ".join(_RULE.sub("---", _VERDICT.sub("VERDICT", _NUMBER.sub("N", line))).split())
        for line in text.splitlines()
    ]


def json_form(value: Any) -> Any:
    """The shape of a JSON value: dict keys, list element shapes, scalar types."""
    if isinstance(value, dict):
        return {key: json_form(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_form(item) for item in value[:1]]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "number"
    return type(value).__name__


# ----------------------------------------------------------------------- without a mail server


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["admission", "codec", "history_depth", "intraprocess"])
def test_plot_of_an_in_process_benchmark(tmp_path: Path, name: str) -> None:
    png = tmp_path / f"{name}.png"
    code, plotted, progress = run(tmp_path, name, *QUICK[name], "--plot", str(png))
    assert code == 0, progress
    assert_png(png)
    assert f"plot: wrote {png}" in progress
    code, plain, _ = run(tmp_path, name, *QUICK[name])
    assert code == 0
    assert text_form(plotted) == text_form(plain)
    assert "plot: wrote" not in plotted


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["admission", "codec", "intraprocess"])
def test_plot_keeps_the_json(tmp_path: Path, name: str) -> None:
    png = tmp_path / f"{name}.png"
    code, plotted, progress = run(tmp_path, name, *QUICK[name], "--json", "--plot", str(png))
    assert code == 0, progress
    assert_png(png)
    code, plain, _ = run(tmp_path, name, *QUICK[name], "--json")
    assert code == 0
    assert json_form(json.loads(plotted)) == json_form(json.loads(plain))


def test_progress_goes_to_stderr_as_plain_lines(tmp_path: Path) -> None:
    """Not a terminal: one line per tenth of a phase, on stderr; stdout keeps the table."""
    code, out, err = run(tmp_path, "history_depth", *QUICK["history_depth"])
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("history_depth: blocks")]
    assert lines[0] == "history_depth: blocks 0/4 (0%)"
    assert lines[-1] == "history_depth: blocks 4/4 (100%)"
    assert "\r" not in err
    assert "history_depth:" not in out


# ----------------------------------------------------------------------- with the mail stack


@pytest.mark.mailstack
@pytest.mark.timeout(240)
def test_plot_of_retention(tmp_path: Path) -> None:
    require_mailstack()
    png = tmp_path / "retention.png"
    code, plotted, progress = run(tmp_path, "retention", *QUICK["retention"], "--plot", str(png))
    assert code == 0, progress
    assert_png(png)
    assert "retention: fill 600/600 (100%)" in progress
    code, plain, _ = run(tmp_path, "retention", *QUICK["retention"])
    assert code == 0
    assert text_form(plotted) == text_form(plain)


@pytest.mark.mailstack
@pytest.mark.timeout(180)
def test_mailbox_prune_only_runs_the_prune_row(tmp_path: Path) -> None:
    require_mailstack()
    code, out, progress = run(tmp_path, "mailbox", "--prune-only", "--prune-emails", "300")
    assert code == 0, progress
    assert re.search(r"^prune --older-than 0 \(300 emails\) +\d+\.\d+ s$", out, re.M), out
    assert "left in the folder: 10 (the 10 foreign emails)" in out
    code, _, err = run(tmp_path, "mailbox", "--prune-only", "--prune-emails", "0")
    assert code == 2 and "--prune-emails must be >= 1" in err


#: the keys of one fault in ``faults.py --json`` (the timeline is for the plot only)
FAULT_KEYS = {
    "fault", "messages", "sent", "publish_errors", "delivered", "duplicated", "lost",
    "lost_in_mailbox", "server_notes", "errored_but_delivered", "unexpected",
    "fault_duration", "recovery", "longest_gap", "max_publish", "publisher_finished",
    "elapsed", "subscriber_stats", "publisher_stats", "notes", "ok",
}  # fmt: skip


@pytest.mark.mailstack
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_plot_of_faults(tmp_path: Path) -> None:
    require_mailstack()
    png = tmp_path / "faults.png"
    code, out, progress = run(tmp_path, "faults", *QUICK["faults"], "--json", "--plot", str(png))
    assert code == 0, progress
    assert_png(png)
    result = json.loads(out)
    assert set(result) == {"faults", "silent_init"}
    (kick,) = result["faults"]
    assert set(kick) == FAULT_KEYS
    assert kick["fault"] == "kick" and kick["ok"] and kick["delivered"] == 30
    assert [row["server"] for row in result["silent_init"]] == ["smtp", "imap"]
    assert "faults: faults 2/2 (100%)" in progress


@pytest.mark.mailstack
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plot_of_mailbox(tmp_path: Path) -> None:
    require_mailstack()
    png, saved = tmp_path / "mailbox.png", tmp_path / "mailbox.json"
    code, out, progress = run(
        tmp_path, "mailbox", *QUICK["mailbox"], "--save", str(saved), "--plot", str(png),
        timeout=280,
    )  # fmt: skip
    assert code == 0, progress
    assert_png(png)
    results = json.loads(saved.read_text())
    assert set(results) == {
        "machine", "settings", "modes", "idle", "history", "floor", "late_joiner",
        "paired", "throughput", "elapsed_s", "targets",
    }  # fmt: skip
    assert set(results["modes"]) == {"auto", "poll-10ms"}
    for stream in (results["floor"], *results["modes"].values()):
        assert {"p50_ms", "p99_ms", "commands_per_message", "latency_by_seq_ms"} <= set(stream)
        assert "seqs" not in stream and "recv_ns" not in stream  # still stripped
    assert set(results["late_joiner"]["modes"]) == {"poll-10ms"}
    # the table: every section, in order, and no word of the plot on stdout
    sections = [
        "latency, send -> message in hand",
        "late joiner: first message",
        "ratios to the floor",
        "IMAP commands per message, by command",
        "paired: auto subscriber and floor poller",
        "idle subscriber, 0.5 s waiting for nothing",
        "throughput, 20 messages from one sender",
        "targets:",
        "history: last 100 of 200 emails",
        "(run took",
    ]
    places = [out.find(section) for section in sections]
    assert -1 not in places, dict(zip(sections, places, strict=True))
    assert places == sorted(places)
    assert "plot: wrote" not in out
    assert "mailbox: floor 10/10 (100%)" in progress
    assert "mailbox: stream poll-10ms 10/10 (100%)" in progress
    assert "mailbox: burst auto 20/20 (100%)" in progress


#: the keys of one row of each section of ``federation.py --json`` (the latency samples
#: and the outage's timeline are for the plot only)
FEDERATION_KEYS = {
    "latency": {
        "mode", "path", "messages", "received", "in_order", "p50_ms", "p90_ms", "p99_ms",
        "max_ms", "dropped",
    },
    "throughput": {
        "path", "messages", "received", "in_order", "publish_per_s", "end_to_end_per_s",
        "end_to_end_99pct_per_s", "seconds",
    },
    "store_and_forward": {
        "messages", "outage_s", "received", "in_order", "queued_on_a_after_publishing",
        "publish_p50_ms", "publish_max_ms", "first_after_up_s", "last_after_up_s",
    },
}  # fmt: skip


@pytest.mark.mailstack
@pytest.mark.timeout(180)
def test_plot_of_federation(tmp_path: Path) -> None:
    require_mailstack()
    png = tmp_path / "federation.png"
    code, out, progress = run(
        tmp_path, "federation", *QUICK["federation"], "--json", "--plot", str(png), timeout=150
    )
    assert code == 0, progress
    assert_png(png)
    result = json.loads(out)
    assert set(result) == {"machine", "args", "start_s", *FEDERATION_KEYS}
    assert "plot" not in result["args"]  # the JSON is the same without --plot
    assert [(row["mode"], row["path"]) for row in result["latency"]] == [
        ("poll-10ms", "one domain"),
        ("poll-10ms", "one relay"),
        ("auto", "one domain"),
        ("auto", "one relay"),
    ]
    for section, keys in FEDERATION_KEYS.items():
        rows = result[section] if isinstance(result[section], list) else [result[section]]
        for row in rows:
            assert set(row) == keys, (section, row)
            assert row["received"] == row["messages"] and row["in_order"], (section, row)
    assert "federation: latency auto one relay 10/10 (100%)" in progress
    assert "federation: burst one relay 1/1 (100%)" in progress
    assert "federation: store and forward 5/5 (100%)" in progress
    assert "\r" not in progress
    code, plain, _ = run(tmp_path, "federation", *QUICK["federation"], "--json", timeout=150)
    assert code == 0
    assert json_form(json.loads(plain)) == json_form(result)


@pytest.mark.mailstack
@pytest.mark.timeout(180)
def test_plot_of_readers(tmp_path: Path) -> None:
    require_mailstack()
    png = tmp_path / "readers.png"
    code, plotted, progress = run(
        tmp_path, "readers", *QUICK["readers"], "--plot", str(png), timeout=150
    )
    assert code == 0, progress
    assert_png(png)
    table = text_form(plotted)
    assert table[0].startswith("machine: N CPUs,")
    assert table[1] == "N messages at N Hz, receive-mode auto"
    assert plotted.splitlines()[3].startswith("| readers | p50 ms | p90 ms | p99 ms | max ms |")
    rows = [line for line in plotted.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2"]
    assert all(row.split("|")[6].strip() == "0" for row in rows), rows  # none lost
    assert "plot: wrote" not in plotted
    for k in (1, 2):
        assert f"readers: connect K={k} {k}/{k} (100%)" in progress
        assert f"readers: stream K={k} 10/10 (100%)" in progress
    code, plain, _ = run(tmp_path, "readers", *QUICK["readers"], timeout=150)
    assert code == 0
    assert text_form(plotted) == text_form(plain)


# ----------------------------------------------------------------------- bad --plot


@pytest.mark.parametrize("name", ALL)
def test_plot_without_matplotlib_names_the_extra(tmp_path: Path, name: str) -> None:
    """``import matplotlib`` fails (a None entry in sys.modules): the benchmark stops
    before it measures anything, saying which extra to install."""
    png = tmp_path / "x.png"
    script = (
        "import runpy, sys\n"
        "sys.modules['matplotlib'] = None\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        f"sys.argv = [{name!r}, *{[*QUICK[name], '--plot', str(png)]!r}]\n"
        f"runpy.run_path({str(BENCHMARKS / f'{name}.py')!r}, run_name='__main__')\n"
    )
    code, out, err = run_python(tmp_path, "-c", script, timeout=60)
    assert code == 1, err
    assert "--plot needs matplotlib" in err
    assert "pip install 'emailmw[plot]'" in err
    assert "Traceback" not in err
    assert out == ""  # nothing measured, nothing printed
    assert not png.exists()


@pytest.mark.parametrize("name", ALL)
def test_plot_path_must_be_a_png_in_an_existing_folder(tmp_path: Path, name: str) -> None:
    code, out, err = run(tmp_path, name, "--plot", str(tmp_path / "x.svg"))
    assert code == 2
    assert "--plot" in err and "must end in .png" in err
    assert out == ""
    missing = tmp_path / "no such folder" / "x.png"
    code, out, err = run(tmp_path, name, "--plot", str(missing))
    assert code == 2
    assert f"folder {missing.parent} does not exist" in err
    assert out == ""
