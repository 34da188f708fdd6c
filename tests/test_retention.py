"""Retention (``Context.prune``, ``emailmw prune``) and the mailbox tools
(``emailmw topics``, ``emailmw history``) against the real dev server.

Folders are filled with IMAP APPEND (emailmw emails encoded by emailmw's own
codec, see benchmarks/retention.py), plus foreign mail that must survive."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mailstack import load_benchmark

import emailmw
from emailmw import commands
from emailmw.devserver import DevServer
from emailmw.errors import ConfigError, ImapError
from emailmw.options import Options
from emailmw.transport.mailbox import list_emailmw, open_admin_session, prune

bench = load_benchmark("retention")

pytestmark = [pytest.mark.timeout(120)]

HOUR_NS = 3600 * 10**9


def options_for(server: DevServer, folder: str, **email: Any) -> Options:
    config = server.config("alice", mailbox=folder)
    config["email"].update(email)
    return Options.from_dict(config)


def folder_state(server: DevServer, folder: str) -> dict[str, set[bytes]]:
    """Message-ID of every email in ``folder`` -> its flags (a fresh connection)."""
    with bench.imap_login(server) as imap:
        imap.select_folder(folder, readonly=True)
        uids = imap.search("ALL")
        found = imap.fetch(uids, ["FLAGS", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]) if uids else {}
    state: dict[str, set[bytes]] = {}
    for item in found.values():
        header = item[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].decode().strip()
        state[header.split(":", 1)[1].strip()] = set(item[b"FLAGS"]) - {b"\\Recent"}
    return state


def mid(gid: int, number: int, stamp: int) -> str:
    return f"<{gid}.{number}.{stamp}@bench.test>"


@pytest.fixture
def filled(dev_server: DevServer) -> tuple[str, dict[str, list[str]]]:
    """A folder with, on /a and /b, 4 old emails (2 h ago) and 3 new ones (now)
    each, from two publishers, plus 3 foreign emails. Returns the folder and the
    Message-IDs by group ("old /a", "new /a", ..., "foreign")."""
    folder, _ = dev_server.new_mailbox("alice")
    now = time.time_ns()
    groups: dict[str, list[str]] = {"foreign": []}
    raws = []
    number = 0
    for topic in ("/a", "/b"):
        for age, count in (("old", 4), ("new", 3)):
            for i in range(count):
                stamp = now - 2 * HOUR_NS + i * 10**6 if age == "old" else now - 60 * 10**9 + i
                gid = 7 + i % 2
                raws.append(bench.publication(topic, stamp, gid, number))
                groups.setdefault(f"{age} {topic}", []).append(mid(gid, number, stamp))
                number += 1
    for i in range(3):
        raws.append(bench.foreign(i))
        groups["foreign"].append(f"<foreign.{i}@example.test>")
    bench.fill(dev_server, folder, raws)
    return folder, groups


def ids(groups: dict[str, list[str]], *names: str) -> set[str]:
    return {m for name in names for m in groups[name]}


def test_prune_by_age_deletes_only_old_emailmw_emails(
    dev_server: DevServer, filled: tuple[str, dict[str, list[str]]]
) -> None:
    folder, groups = filled
    ctx = emailmw.Context(options_for(dev_server, folder, retention={"max-age": 3600}))
    result = ctx.prune()
    assert (result.examined, result.deleted, result.kept) == (14, 8, 6)
    assert {n: (t.examined, t.deleted, t.kept) for n, t in result.topics.items()} == {
        "/a": (7, 4, 3),
        "/b": (7, 4, 3),
    }
    assert set(folder_state(dev_server, folder)) == ids(groups, "new /a", "new /b", "foreign")


def test_prune_by_count_keeps_the_newest_per_topic(
    dev_server: DevServer, filled: tuple[str, dict[str, list[str]]]
) -> None:
    folder, groups = filled
    ctx = emailmw.Context(options_for(dev_server, folder, retention={"max-count": 2}))
    result = ctx.prune()
    assert (result.examined, result.deleted, result.kept) == (14, 10, 4)
    newest = set(groups["new /a"][-2:]) | set(groups["new /b"][-2:])
    assert set(folder_state(dev_server, folder)) == newest | ids(groups, "foreign")


def test_dry_run_deletes_nothing(
    dev_server: DevServer, filled: tuple[str, dict[str, list[str]]]
) -> None:
    folder, _ = filled
    before = folder_state(dev_server, folder)
    result = emailmw.Context(options_for(dev_server, folder)).prune(3600, dry_run=True)
    assert result.dry_run and (result.examined, result.deleted, result.kept) == (14, 8, 6)
    assert folder_state(dev_server, folder) == before
    assert len(before) == 17


def test_prune_one_topic(dev_server: DevServer, filled: tuple[str, dict[str, list[str]]]) -> None:
    folder, groups = filled
    result = emailmw.Context(options_for(dev_server, folder)).prune(3600, topic="/a")
    assert set(result.topics) == {"/a"} and result.deleted == 4
    assert set(folder_state(dev_server, folder)) == ids(
        groups, "new /a", "old /b", "new /b", "foreign"
    )


def test_another_clients_deleted_email_is_not_expunged(
    dev_server: DevServer, filled: tuple[str, dict[str, list[str]]]
) -> None:
    folder, groups = filled
    with bench.imap_login(dev_server) as other:  # a mail client, flagging without expunging
        other.select_folder(folder)
        uid = other.search(["HEADER", "Message-ID", "foreign.1@example.test"])
        assert len(uid) == 1
        other.add_flags(uid, [b"\\Deleted"], silent=True)
        result = emailmw.Context(options_for(dev_server, folder)).prune(0)
        assert result.deleted == 14
        state = folder_state(dev_server, folder)
        assert set(state) == ids(groups, "foreign")
        assert b"\\Deleted" in state["<foreign.1@example.test>"]
        assert b"\\Deleted" not in state["<foreign.0@example.test>"]


def test_server_without_uidplus_is_refused(
    dev_server: DevServer, filled: tuple[str, dict[str, list[str]]]
) -> None:
    folder, _ = filled
    session = open_admin_session(options_for(dev_server, folder).imap_settings())
    try:
        assert "UIDPLUS" in session.capabilities
        session.capabilities = session.capabilities - {"UIDPLUS"}  # as a server without it
        with pytest.raises(ImapError, match="UIDPLUS"):
            prune(session, older_than=0)
        assert prune(session, older_than=0, dry_run=True).deleted == 14  # counting is fine
    finally:
        session.close(polite=True)
    assert len(folder_state(dev_server, folder)) == 17


def test_headers_only_listing_ignores_foreign_and_forged_mail(dev_server: DevServer) -> None:
    folder, _ = dev_server.new_mailbox("alice")
    bad_stamp = bench.publication("/x", 1, 5, 1).replace(
        b"Source-Timestamp: 1", b"Source-Timestamp: yesterday"
    )
    bench.fill(
        dev_server,
        folder,
        [bench.foreign(0, subject="/x"), bad_stamp, bench.publication("/x", 5, 5, 2)],
    )
    session = open_admin_session(options_for(dev_server, folder).imap_settings(), writable=False)
    try:
        found = list_emailmw(session)
    finally:
        session.close(polite=True)
    assert [(e.topic, e.source_timestamp.nanoseconds, e.publisher_gid) for e in found] == [
        ("/x", 5, emailmw.Gid(5))
    ]
    emailmw.Context(options_for(dev_server, folder)).prune(0)
    assert len(folder_state(dev_server, folder)) == 2  # the foreign and the malformed one


def test_nothing_to_prune_is_a_config_error(dev_server: DevServer, dev_mailbox: Any) -> None:
    ctx = emailmw.Context(options_for(dev_server, dev_mailbox[0]))
    with pytest.raises(ConfigError, match=r"email\.retention") as caught:
        ctx.prune()
    assert caught.value.key == "email.retention"


def test_retention_config_bounds() -> None:
    ok = Options(intraprocess=True, retention={"max-age": 86400, "max-count": 1000})
    assert (ok.retention.max_age, ok.retention.max_count) == (86400.0, 1000)
    for bad, key in [
        ({"max-age": 0}, "email.retention.max-age"),
        ({"max-age": float("nan")}, "email.retention.max-age"),
        ({"max-age": 4e9}, "email.retention.max-age"),
        ({"max-count": 0}, "email.retention.max-count"),
        ({"max-count": "ten"}, "email.retention.max-count"),
        ({"max-count": 2_000_000_000}, "email.retention.max-count"),
        ({"max_size": 1}, "email.retention.max_size"),
    ]:
        with pytest.raises(ConfigError) as caught:
            Options(intraprocess=True, retention=bad)
        assert caught.value.key == key, bad
    assert emailmw.Context(Options(intraprocess=True)).prune(10).topics == {}


@pytest.mark.timeout(180)
def test_reader_keeps_working_while_prune_deletes(
    dev_server: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber context (read-only EXAMINE) on the folder while prune deletes
    old emails around the live stream: every new message arrives, none is
    deleted, and the subscriber logs no warning or error."""
    folder, _ = dev_server.new_mailbox("alice")
    old = time.time_ns() - 2 * HOUR_NS
    bench.fill(dev_server, folder, (bench.publication("/old", old + i, 9, i) for i in range(600)))
    options = options_for(dev_server, folder)
    total = 40
    got: list[str] = []
    caplog.set_level(logging.WARNING, logger="emailmw")
    with emailmw.Context(options) as reader, emailmw.Context(options) as writer:
        sub = emailmw.Subscription("/live", context=reader)
        pub = emailmw.Publisher("/live", context=writer)
        results: list[Any] = []
        stop = threading.Event()

        def pruner() -> None:
            while not stop.is_set():
                results.append(emailmw.Context(options).prune(3600))
                # also feed old emails back in, so that every round deletes some
                bench.fill(
                    dev_server,
                    folder,
                    (bench.publication("/old", old + i, 9, 1000 + i) for i in range(50)),
                )

        thread = threading.Thread(target=pruner)
        thread.start()
        try:
            for i in range(total):
                pub.publish(f"live {i}")
                time.sleep(0.05)  # a 20 Hz stream
            deadline = time.monotonic() + 60
            while len(got) < total and time.monotonic() < deadline:
                got.append(emailmw.wait_for_message(sub, deadline - time.monotonic()))
        finally:
            stop.set()
            thread.join(60)
        closing = time.time()
    assert got == [f"live {i}" for i in range(total)]
    assert sum(r.deleted for r in results) >= 600 and len(results) >= 2
    assert all(r.kept <= total for r in results)  # never a new one deleted
    # Only while the stream and prune ran: a receiver shut down in the middle of a
    # NOOP may log "connection lost" as the context closes, prune or not.
    problems = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.created < closing
    ]
    assert problems == []
    remaining = folder_state(dev_server, folder)
    assert sum("@" in m and not m.startswith("<9.") for m in remaining) == total


# -- the commands ------------------------------------------------------------------------


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emailmw", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write_config(server: DevServer, folder: str, path: Path, **email: Any) -> Path:
    config = server.config("alice", mailbox=folder)
    config["email"].update(email)
    path.write_text(yaml.safe_dump(config))
    return path


def test_prune_command(
    dev_server: DevServer, filled: tuple[str, dict[str, list[str]]], tmp_path: Path
) -> None:
    folder, groups = filled
    config = write_config(dev_server, folder, tmp_path / "email.yml")
    done = cli(config, "prune")
    assert done.returncode == 1 and "email.retention" in done.stderr
    done = cli(config, "prune", "--dry-run", "--older-than", "3600", "--topic", "/b")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "/b: examined 7, would delete 4, kept 3",
        "total: examined 7, would delete 4, kept 3 (dry run: nothing deleted)",
    ]
    assert len(folder_state(dev_server, folder)) == 17
    config = write_config(dev_server, folder, config, retention={"max-count": 1})
    done = cli(config, "prune")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "total: examined 14, deleted 12, kept 2"
    assert set(folder_state(dev_server, folder)) == {
        groups["new /a"][-1],
        groups["new /b"][-1],
    } | ids(groups, "foreign")
    done = cli(config, "prune", "--older-than", "-1")
    assert done.returncode == 2 and "--older-than" in done.stderr


def test_topics_and_history_commands(
    dev_server: DevServer, filled: tuple[str, dict[str, list[str]]], tmp_path: Path
) -> None:
    folder, groups = filled
    config = write_config(dev_server, folder, tmp_path / "email.yml")
    done = cli(config, "topics", "--json")
    assert done.returncode == 0, done.stderr
    listed = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(t["topic"], t["count"], t["publishers"]) for t in listed] == [
        ("/a", 7, [7, 8]),
        ("/b", 7, [7, 8]),
    ]
    last_a = int(groups["new /a"][-1].split(".")[2].split("@")[0])
    assert listed[0]["last_timestamp"] == last_a
    out = io.StringIO()
    commands.run_topics(options_for(dev_server, folder), out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:2] == ["TOPIC", "COUNT"]
    assert lines[1].split()[:2] == ["/a", "7"] and lines[1].split()[-2:] == ["7", "8"]

    done = cli(config, "history", "/a", "-n", "3", "--json")
    assert done.returncode == 0, done.stderr
    shown = [json.loads(line) for line in done.stdout.splitlines()]
    assert [m["message_id"] for m in shown] == groups["new /a"]
    assert [m["message"] for m in shown] == ["message 4 of 7", "message 5 of 8", "message 6 of 7"]
    assert all(m["topic"] == "/a" for m in shown)
    assert [m["publisher_gid"] for m in shown] == [7, 8, 7]
    done = cli(config, "history", "/a", "-n", "2")
    assert done.returncode == 0, done.stderr
    assert [line.split(" ", 1)[1] for line in done.stdout.splitlines()] == [
        "[8] message 5 of 8",
        "[7] message 6 of 7",
    ]
    done = cli(config, "history", "/nothing")
    assert (done.returncode, done.stdout) == (0, "")
