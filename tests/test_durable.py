"""Durable subscriptions: ``Subscription(..., durable=NAME)`` resumes after a restart.

Intraprocess: the name lock, the state store and its errors, what counts as
handled. Over the dev server (real Dovecot + Postfix): a clean restart receives
exactly what was published while it was down; a recreated folder is read again
and counted; ``kill -9`` in the middle of a 1 000-message stream loses nothing
and repeats at most the message in flight.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from imapclient import IMAPClient

import emailmw
from emailmw.devserver import DevServer
from emailmw.state_store import HANDLED_KEPT, StateStore, default_state_dir

pytestmark = pytest.mark.timeout(120)

TOPIC = "/durable/t"
HERE = Path(__file__).parent
CHILD = HERE / "durable_child.py"


def handled_ids(state_dir: Path, name: str) -> list[str]:
    with contextlib.closing(sqlite3.connect(state_dir / "state.sqlite3")) as db:
        rows = db.execute(
            "SELECT message_id FROM handled WHERE name = ? ORDER BY seq", (name,)
        ).fetchall()
    return [row[0] for row in rows]


def take_all(sub: emailmw.Subscription[str], count: int, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with contextlib.suppress(emailmw.WaitTimeoutError):
            got.append(emailmw.wait_for_message(sub, left))
    return got


def nothing_more(sub: emailmw.Subscription[str], seconds: float) -> None:
    with pytest.raises(emailmw.WaitTimeoutError):
        extra = emailmw.wait_for_message(sub, seconds)
        pytest.fail(f"unexpected extra message {extra!r}")


# -- intraprocess: names, the store, what is handled ------------------------------------


def test_the_state_store_defaults_to_xdg_state_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "emailmw"
    assert emailmw.Options(intraprocess=True).resolved_state_dir() == tmp_path / "xdg" / "emailmw"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "emailmw"
    with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:
        emailmw.Subscription(TOPIC, durable="home", context=ctx)
    assert (tmp_path / "home" / ".local" / "state" / "emailmw" / "state.sqlite3").is_file()


def test_state_dir_from_the_config_file_is_relative_to_the_file(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "email.yml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"email": {"intraprocess": True, "state-dir": "state"}}))
    options = emailmw.Options.from_file(config)
    assert options.resolved_state_dir() == tmp_path / "conf" / "state"
    with emailmw.Context(options) as ctx:
        sub = emailmw.Subscription(TOPIC, durable="rel", context=ctx)
        emailmw.Publisher(TOPIC, context=ctx).publish("one")
        assert emailmw.wait_for_message(sub, 5) == "one"
    store = tmp_path / "conf" / "state"
    assert len(handled_ids(store, "rel")) == 1
    assert store.stat().st_mode & 0o077 == 0  # only its owner reads the state


def test_a_name_is_used_by_one_subscription_at_a_time(tmp_path: Path) -> None:
    options = emailmw.Options(intraprocess=True, state_dir=tmp_path)
    with emailmw.Context(options) as ctx:
        first = emailmw.Subscription(TOPIC, durable="worker", context=ctx)
        with pytest.raises(emailmw.DurableNameInUseError, match="'worker' is in use"):
            emailmw.Subscription(TOPIC, durable="worker", context=ctx)
        first.close()  # lets the name go
        second = emailmw.Subscription(TOPIC, durable="worker", context=ctx)
        assert second.durable == "worker"
    # the context's shutdown let it go too
    with emailmw.Context(options) as ctx:
        emailmw.Subscription(TOPIC, durable="worker", context=ctx)


def test_a_name_held_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, emailmw\n"
            f"o = emailmw.Options(intraprocess=True, state_dir={str(tmp_path)!r})\n"
            "with emailmw.Context(o) as c:\n"
            f"    s = emailmw.Subscription({TOPIC!r}, durable='shared', context=c)\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.readline()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with emailmw.Context(emailmw.Options(intraprocess=True, state_dir=tmp_path)) as ctx:
            with pytest.raises(emailmw.DurableNameInUseError) as caught:
                emailmw.Subscription(TOPIC, durable="shared", context=ctx)
            assert f"process {holder.pid}" in str(caught.value)
            # once that process is gone (even killed), the name is free
            holder.kill()
            holder.wait(10)
            emailmw.Subscription(TOPIC, durable="shared", context=ctx)
    finally:
        holder.kill()
        holder.wait(10)
        for pipe in (holder.stdin, holder.stdout):
            if pipe is not None:
                pipe.close()


def test_a_name_belongs_to_one_topic(tmp_path: Path) -> None:
    with emailmw.Context(emailmw.Options(intraprocess=True, state_dir=tmp_path)) as ctx:
        emailmw.Subscription(TOPIC, durable="mine", context=ctx).close()
        with pytest.raises(ValueError, match="is on topic '/durable/t', not '/other'"):
            emailmw.Subscription("/other", durable="mine", context=ctx)
        # the failed attempt did not keep the name
        emailmw.Subscription(TOPIC, durable="mine", context=ctx)


@pytest.mark.parametrize("bad", ["", "x" * 201, "tab\there", 5])
def test_bad_durable_names_are_refused_before_anything_is_stored(tmp_path: Path, bad: Any) -> None:
    with emailmw.Context(emailmw.Options(intraprocess=True, state_dir=tmp_path)) as ctx:
        with pytest.raises(ValueError, match="durable"):
            emailmw.Subscription(TOPIC, durable=bad, context=ctx)
    assert not (tmp_path / "state.sqlite3").exists()


def test_durable_and_history_do_not_combine(tmp_path: Path) -> None:
    with emailmw.Context(emailmw.Options(intraprocess=True, state_dir=tmp_path)) as ctx:
        with pytest.raises(ValueError, match="history and durable"):
            emailmw.Subscription(TOPIC, durable="n", history=5, context=ctx)


def test_an_unusable_state_dir_names_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    options = emailmw.Options(intraprocess=True, state_dir=blocker / "state")
    with emailmw.Context(options) as ctx:
        with pytest.raises(emailmw.StateStoreError, match="not-a-dir"):
            emailmw.Subscription(TOPIC, durable="n", context=ctx)
        # nothing else is affected
        plain = emailmw.Subscription(TOPIC, context=ctx)
        emailmw.Publisher(TOPIC, context=ctx).publish("still works")
        assert emailmw.wait_for_message(plain, 5) == "still works"


def test_a_message_is_handled_when_get_message_returns_it(tmp_path: Path) -> None:
    with emailmw.Context(emailmw.Options(intraprocess=True, state_dir=tmp_path)) as ctx:
        sub = emailmw.Subscription(TOPIC, durable="get", context=ctx)
        pub = emailmw.Publisher(TOPIC, context=ctx)
        for i in range(3):
            pub.publish(f"m{i}")
        assert emailmw.wait_for_message(sub, 5) == "m0"
        assert len(handled_ids(tmp_path, "get")) == 1  # committed at once
        taken = sub.get_message_with_info()
        assert taken is not None and taken[0] == "m1"
        assert len(handled_ids(tmp_path, "get")) == 2
        assert sub.has_message()  # m2 waits: not handled
        sub.close()
        assert len(handled_ids(tmp_path, "get")) == 2


def test_a_callback_message_is_handled_only_once_the_callback_returned(tmp_path: Path) -> None:
    seen: list[str] = []

    def callback(message: str) -> None:
        seen.append(message)
        if message == "boom":
            raise RuntimeError("the callback failed")

    with emailmw.Context(emailmw.Options(intraprocess=True, state_dir=tmp_path)) as ctx:
        sub = emailmw.Subscription(TOPIC, durable="cb", callback=callback, context=ctx)
        executor = emailmw.Executor(context=ctx)
        executor.add(sub)
        pub = emailmw.Publisher(TOPIC, context=ctx)
        pub.publish("fine")
        pub.publish("boom")
        pub.publish("after")
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            executor.spin_once(0.5)
        assert seen == ["fine", "boom", "after"]
        # "boom" raised: not handled (after a restart it would come again)
        assert len(handled_ids(tmp_path, "cb")) == 2
        assert ctx.stats().callback_errors == 1


def test_the_store_keeps_the_newest_handled_ids_only(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    try:
        claim, record = store.claim("many", TOPIC)
        assert record.uidvalidity is None and record.handled == []
        for i in range(HANDLED_KEPT + 1500):
            store.add_handled("many", TOPIC, f"<{i}@x>", 7, i)
        claim.release()
        claim, record = store.claim("many", TOPIC)
        assert len(record.handled) == HANDLED_KEPT
        assert record.handled[-1] == f"<{HANDLED_KEPT + 1499}@x>"  # oldest first
        assert (record.uidvalidity, record.position) == (7, HANDLED_KEPT + 1499)
        # pruned on disk too (every 1 000 inserts), not only on reading
        assert len(handled_ids(tmp_path, "many")) <= HANDLED_KEPT + 1000
        claim.release()
    finally:
        store.close()


# -- over the dev server -------------------------------------------------------------------


@pytest.fixture
def mailbox(dev_server: DevServer, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A fresh folder of alice's and a config for it with its own state-dir."""
    folder, address = dev_server.new_mailbox("alice")
    config = dev_server.config("alice", mailbox=folder, to=address)
    config["email"]["state-dir"] = str(tmp_path / "state")
    yield {"config": config, "folder": folder, "state": tmp_path / "state"}


def context(config: dict[str, Any]) -> emailmw.Context:
    return emailmw.Context(emailmw.Options.from_dict(config))


@pytest.mark.mailstack
def test_a_clean_restart_gets_what_was_published_while_down_exactly_once(
    mailbox: dict[str, Any],
) -> None:
    config = mailbox["config"]
    with context(config) as publisher_ctx:
        pub = emailmw.Publisher(TOPIC, context=publisher_ctx)
        with context(config) as ctx:
            sub = emailmw.Subscription(TOPIC, durable="restart", context=ctx)
            for i in range(3):
                pub.publish(f"before{i}")
            assert take_all(sub, 3, 30) == [f"before{i}" for i in range(3)]
            # two more arrive; one is taken, one is left in the queue at the stop
            pub.publish("queued0")
            pub.publish("queued1")
            got = take_all(sub, 1, 30)
            assert got == ["queued0"]
            deadline = time.monotonic() + 30
            while not sub.has_message() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sub.has_message()  # queued1 is queued, not taken
        # down: five more, and another topic's
        for i in range(5):
            pub.publish(f"down{i}")
        emailmw.Publisher("/durable/other", context=publisher_ctx).publish("not mine")
        time.sleep(1.0)  # let them land in the folder
        with context(config) as ctx:
            sub = emailmw.Subscription(TOPIC, durable="restart", context=ctx)
            expected = ["queued1"] + [f"down{i}" for i in range(5)]
            assert take_all(sub, len(expected), 30) == expected
            pub.publish("live")  # then it continues live
            assert take_all(sub, 1, 30) == ["live"]
            nothing_more(sub, 1.5)
            assert ctx.stats().dropped.get("duplicate", 0) == 0


@pytest.mark.mailstack
def test_a_crash_between_taking_and_stopping_repeats_nothing_handled(
    mailbox: dict[str, Any],
) -> None:
    """The state is committed per message: a context that is never shut down (its
    process would have died) loses nothing committed, and what it handled is not
    given again."""
    config = mailbox["config"]
    with context(config) as publisher_ctx:
        pub = emailmw.Publisher(TOPIC, context=publisher_ctx)
        crashed = context(config).init()
        sub = emailmw.Subscription(TOPIC, durable="crash", context=crashed)
        for i in range(4):
            pub.publish(f"m{i}")
        assert take_all(sub, 2, 30) == ["m0", "m1"]
        # the "crash": the name must be free for the next process, as the OS would
        # make it; the state on disk is whatever was committed
        crashed._close_state()
        crashed.shutdown()
        with context(config) as ctx:
            sub = emailmw.Subscription(TOPIC, durable="crash", context=ctx)
            assert take_all(sub, 2, 30) == ["m2", "m3"]
            nothing_more(sub, 1.5)


@pytest.mark.mailstack
def test_a_recreated_folder_is_read_again_and_counted(
    dev_server: DevServer, mailbox: dict[str, Any]
) -> None:
    config, folder = mailbox["config"], mailbox["folder"]
    with context(config) as publisher_ctx:
        pub = emailmw.Publisher(TOPIC, context=publisher_ctx)
        with context(config) as ctx:
            sub = emailmw.Subscription(TOPIC, durable="resync", context=ctx)
            pub.publish("old0")
            pub.publish("old1")
            assert take_all(sub, 2, 30) == ["old0", "old1"]
        old = _raw_emails(dev_server, folder)
        account = dev_server.account("alice")
        tls = ssl.create_default_context(cafile=str(dev_server.ca_file))
        with IMAPClient(dev_server.host, dev_server.imaps_port, ssl_context=tls) as admin:
            admin.login(account.address, account.password)
            admin.delete_folder(folder)
            admin.create_folder(folder)  # a new UIDVALIDITY, UIDs from 1
            for raw in old:  # the handled ones come back (a restore from backup)
                append_retrying(admin, folder, raw)
        for i in range(3):
            pub.publish(f"new{i}")
        time.sleep(1.0)
        with context(config) as ctx:
            sub = emailmw.Subscription(TOPIC, durable="resync", context=ctx)
            assert take_all(sub, 3, 30) == ["new0", "new1", "new2"]
            nothing_more(sub, 1.5)
            stats = ctx.stats()
            assert stats.resyncs == 1
            assert stats.dropped["duplicate"] == 2  # old0 and old1, handled before


def append_retrying(admin: IMAPClient, folder: str, raw: bytes) -> None:
    """APPEND, again after a moment if Dovecot answers ``NO [SERVERBUG]`` (it can,
    right after the folder was created again, on a loaded machine)."""
    for attempt in range(5):
        try:
            admin.append(folder, raw)
            return
        except IMAPClient.Error as exc:
            if "SERVERBUG" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.5)


def _raw_emails(server: DevServer, folder: str) -> list[bytes]:
    account = server.account("alice")
    tls = ssl.create_default_context(cafile=str(server.ca_file))
    with IMAPClient(server.host, server.imaps_port, ssl_context=tls) as client:
        client.login(account.address, account.password)
        client.select_folder(folder, readonly=True)
        uids = client.search(["ALL"])
        fetched = client.fetch(uids, ["BODY.PEEK[]"])
        return [fetched[uid][b"BODY[]"] for uid in sorted(fetched)]


@pytest.mark.mailstack
@pytest.mark.timeout(300)
def test_kill_9_in_the_middle_of_a_1000_message_stream(
    dev_server: DevServer, mailbox: dict[str, Any], tmp_path: Path
) -> None:
    """A durable subscriber process is killed with SIGKILL after about 300 of 1 000
    messages (two publishers, 500 each), then started again. Every message arrives,
    in each publisher's order, and at most the one in flight (written by the
    callback, not yet committed as handled) comes twice."""
    config_path = tmp_path / "email.yml"
    config_path.write_text(yaml.safe_dump(mailbox["config"]))
    out = tmp_path / "received.txt"
    out.write_text("")
    log = tmp_path / "child.log"
    log_file = log.open("a")

    def start() -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(config_path), "k9", TOPIC, str(out)],
            stdin=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env={**os.environ, "PYTHONPATH": str(HERE.parent)},
        )
        return child

    def lines() -> list[str]:
        return out.read_text().splitlines()

    def wait_for(predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return False

    child = start()
    try:
        assert wait_for(lambda: "ready" in lines(), 30)
        with context(mailbox["config"]) as ctx:
            pubs = {name: emailmw.Publisher(TOPIC, context=ctx) for name in ("a", "b")}
            killed = False
            for i in range(500):
                for name, pub in pubs.items():
                    pub.publish(f"{name}:{i}")
                if not killed and sum(1 for line in lines() if ":" in line) >= 300:
                    child.kill()  # SIGKILL: no clean-up of any kind
                    child.wait(10)
                    killed_at = sum(1 for line in lines() if ":" in line)
                    killed = True
            if not killed:  # the stream outran the subscriber: kill it now
                child.kill()
                child.wait(10)
                killed_at = sum(1 for line in lines() if ":" in line)
            assert 0 < killed_at < 1000, killed_at
            time.sleep(1.0)
            if child.stdin is not None:
                child.stdin.close()
            child = start()
            everything = {f"{n}:{i}" for n in pubs for i in range(500)}
            missing = lambda: sorted(everything - set(lines()))  # noqa: E731
            assert wait_for(lambda: not missing(), 180), (
                f"{len(missing())} missing: {missing()[:20]}; child log:\n"
                + log.read_text()[-6000:]
            )
        child.stdin.write("stop\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
        child.wait(30)
    finally:
        child.kill()
        child.wait(10)
        if child.stdin is not None:
            child.stdin.close()
        log_file.close()
    received = [line for line in lines() if ":" in line]
    duplicates = len(received) - len(set(received))
    print(f"kill -9 after {killed_at} of 1000 messages: {duplicates} duplicate(s)")
    assert duplicates <= 1, duplicates
    for name in ("a", "b"):
        numbers = [int(m.split(":")[1]) for m in dict.fromkeys(received) if m.startswith(name)]
        assert numbers == list(range(500)), name


def test_the_position_waits_for_a_message_held_back_by_the_order(tmp_path: Path) -> None:
    """UID 11 is read while UID 10 is held back (its predecessor is late): handling
    11 must not move the position past 10, or a crash would lose 10."""
    from emailmw.durable import DurableCursor
    from emailmw.info import Gid, MessageInfo, Timestamp
    from emailmw.stats import StatsCounters
    from emailmw.transport.receiver import Backlog

    def info(uid: int) -> MessageInfo:
        return MessageInfo(Timestamp(uid), Timestamp(uid), Gid(1), {}, f"<{uid}@x>", uid)

    store = StateStore(tmp_path)
    try:
        cursor = DurableCursor(store, "held", TOPIC, StatsCounters())
        cursor.catch_up(Backlog([], uidvalidity=5, position=9))
        assert cursor.position == 9
        cursor.read(10)  # held in the order
        cursor.read(11)
        cursor.handled(info(11))
        assert cursor.position == 9
        cursor.handled(info(10))
        assert cursor.position == 11
        cursor.read(12)
        cursor.dropped(info(12))  # e.g. it did not validate: not waited for
        cursor.read(13)
        cursor.handled(info(13))
        assert cursor.position == 13
        cursor.close()
        claim, record = store.claim("held", TOPIC)
        assert (record.uidvalidity, record.position) == (5, 13)
        assert record.handled == ["<11@x>", "<10@x>", "<13@x>"]
        claim.release()
    finally:
        store.close()


def test_a_subscription_dropped_without_close_lets_its_name_go(tmp_path: Path) -> None:
    import gc

    with emailmw.Context(emailmw.Options(intraprocess=True, state_dir=tmp_path)) as ctx:
        emailmw.Subscription(TOPIC, durable="dropped", context=ctx)  # no reference kept
        gc.collect()
        again = emailmw.Subscription(TOPIC, durable="dropped", context=ctx)
        assert again.durable == "dropped"
