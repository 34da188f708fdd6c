"""The local mail stack itself: a real Dovecot + Postfix on loopback.

The module shares one server (``server``); tests that stop it for good or
need a second one start their own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
import yaml
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError
from mailstack import mailstack_problem, require_mailstack

from emailmw import devserver
from emailmw.devserver import (
    DevAccount,
    DevServer,
    DevServerError,
    MailStackMissingError,
    install,
    processes,
)
from emailmw.devserver import server as server_module
from emailmw.devserver.processes import wait_until

pytestmark = [pytest.mark.timeout(60), pytest.mark.mailstack]


@pytest.fixture(scope="module")
def server() -> Iterator[DevServer]:
    require_mailstack()
    with DevServer(accounts=("alice", "bob")) as srv:
        yield srv


# ----------------------------------------------------------------------------- helpers


def tls_context(server: DevServer) -> ssl.SSLContext:
    """Trust only the server's test CA; strict X.509 checks (Python 3.13's default)."""
    context = ssl.create_default_context(cafile=str(server.ca_file))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def send(
    server: DevServer,
    sender: DevAccount,
    to: str,
    subject: str,
    *,
    implicit: bool = False,
    login: bool = True,
) -> None:
    message = EmailMessage()
    message["From"] = sender.address
    message["To"] = to
    message["Subject"] = subject
    message.set_content(f"body of {subject}\n")
    if implicit:
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(
            server.host, server.smtps_port, context=tls_context(server), timeout=10
        )
    else:
        smtp = smtplib.SMTP(server.host, server.smtp_port, timeout=10)
    with smtp:
        if not implicit:
            smtp.starttls(context=tls_context(server))
        if login:
            smtp.login(sender.address, sender.password)
        smtp.send_message(message)


@contextlib.contextmanager
def imap(server: DevServer, account: DevAccount, *, implicit: bool = False) -> Iterator[IMAPClient]:
    if implicit:
        client = IMAPClient(
            server.host, server.imaps_port, ssl=True, ssl_context=tls_context(server), timeout=10
        )
    else:
        client = IMAPClient(server.host, server.imap_port, ssl=False, timeout=10)
        client.starttls(tls_context(server))
    with client:
        client.login(account.address, account.password)
        yield client


def wait_for(client: IMAPClient, folder: str, subject: str, timeout: float = 15.0) -> bytes:
    """The raw message with ``subject`` in ``folder``, once it has arrived."""
    client.select_folder(folder, readonly=True)
    deadline = time.monotonic() + timeout
    while True:
        uids = client.search(["SUBJECT", subject])
        if uids:
            body: bytes = client.fetch(uids[:1], ["BODY.PEEK[]"])[uids[0]][b"BODY[]"]
            return body
        assert time.monotonic() < deadline, f"{subject!r} did not arrive in {folder}"
        client.noop()
        time.sleep(0.02)


def subjects(client: IMAPClient, folder: str) -> set[str]:
    client.select_folder(folder, readonly=True)
    uids = client.search(["ALL"])
    if not uids:
        return set()
    fetched = client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])
    headers = [d[b"BODY[HEADER.FIELDS (SUBJECT)]"].decode() for d in fetched.values()]
    return {h.split(":", 1)[1].strip() for h in headers}


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def processes_of(server: DevServer) -> set[processes.Proc]:
    masters = [p for p in (server._dovecot, server._postfix) if p is not None]
    assert masters, "not running"
    found = set(masters)
    for master in masters:
        found |= processes.descendants(master.pid)
    return found


def unique(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ----------------------------------------------------------------------------- delivery


def test_starttls_smtp_to_starttls_imap(server: DevServer) -> None:
    alice = server.account("alice")
    folder, address = server.new_mailbox(alice)
    subject = unique()
    send(server, server.account("bob"), address, subject)
    with imap(server, alice) as client:
        raw = wait_for(client, folder, subject)
    assert f"body of {subject}".encode() in raw
    assert b"\nMessage-Id:" in raw or b"\nMessage-ID:" in raw


def test_smtps_to_imaps(server: DevServer) -> None:
    bob = server.account("bob")
    folder, address = server.new_mailbox("bob", prefix="imps")
    assert folder.startswith("imps")
    subject = unique()
    send(server, server.account("alice"), address, subject, implicit=True)
    with imap(server, bob, implicit=True) as client:
        assert f"body of {subject}".encode() in wait_for(client, folder, subject)


def test_the_certificate_is_for_localhost_and_127_0_0_1(server: DevServer) -> None:
    for host in ("localhost", "127.0.0.1"):
        with socket.create_connection((server.host, server.imaps_port), timeout=10) as raw:
            with tls_context(server).wrap_socket(raw, server_hostname=host) as tls:
                assert tls.version() in {"TLSv1.2", "TLSv1.3"}
    with pytest.raises(ssl.SSLCertVerificationError):  # and only for them
        with socket.create_connection((server.host, server.imaps_port), timeout=10) as raw:
            tls_context(server).wrap_socket(raw, server_hostname="example.com")


def test_new_mailbox_routes_plus_address_into_its_folder(server: DevServer) -> None:
    alice = server.account("alice")
    first, first_address = server.new_mailbox(alice)
    second, _ = server.new_mailbox("alice@example.test")
    assert first != second
    assert first_address == f"alice+{first}@example.test"
    with imap(server, alice) as client:
        folders = {name for _flags, _sep, name in client.list_folders()}
        assert {first, second} <= folders  # exist before any mail arrives
        subject = unique()
        send(server, alice, first_address, subject)
        wait_for(client, first, subject)
        assert subject not in subjects(client, second)
        assert subject not in subjects(client, "INBOX")


def test_plain_address_lands_in_inbox(server: DevServer) -> None:
    bob = server.account("bob")
    subject = unique()
    send(server, bob, bob.address, subject)
    with imap(server, bob) as client:
        wait_for(client, "INBOX", subject)


def test_unknown_recipient_is_refused(server: DevServer) -> None:
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail("")
        code, _ = smtp.rcpt("nobody@example.test")
        assert code == 550
        code, _ = smtp.rcpt("someone@elsewhere.invalid")  # no open relay
        assert code >= 450


def test_wrong_password_is_refused_without_delay(server: DevServer) -> None:
    alice = server.account("alice")
    for _ in range(2):  # no growing penalty after failures either
        started = time.monotonic()
        with pytest.raises(LoginError), imap(server, DevAccount("alice", alice.address, "wrong")):
            pass
        assert time.monotonic() - started < 1.5
    with pytest.raises(smtplib.SMTPAuthenticationError):
        with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
            smtp.starttls(context=tls_context(server))
            smtp.login(alice.address, "wrong")


def test_append_puts_raw_bytes_into_the_mailbox(server: DevServer) -> None:
    alice = server.account("alice")
    folder, _ = server.new_mailbox(alice)
    subject = unique()
    raw = f"From: x@example.test\r\nSubject: {subject}\r\n\r\nappended \xe9\r\n".encode("latin-1")
    server.append(alice, raw, mailbox=folder)
    server.append("alice", raw)  # INBOX
    with imap(server, alice) as client:
        assert wait_for(client, folder, subject, timeout=1) == raw
        assert wait_for(client, "INBOX", subject, timeout=1) == raw


# ----------------------------------------------------------------------------- accounts


def test_accounts_and_lookup(server: DevServer) -> None:
    alice = server.account("alice")
    assert alice == DevAccount("alice", "alice@example.test", alice.password)
    assert server.account("alice@example.test") is alice
    assert [a.name for a in server.accounts][:2] == ["alice", "bob"]
    assert len(alice.password) >= 12
    with pytest.raises(KeyError):
        server.account("mallory")
    with pytest.raises(ValueError, match="exists"):
        server.add_account("alice")
    with pytest.raises(ValueError, match="invalid account name"):
        server.add_account("Eve+x")


def test_add_account_while_running(server: DevServer) -> None:
    started = time.monotonic()
    carol = server.add_account(f"carol{uuid.uuid4().hex[:6]}")
    elapsed = time.monotonic() - started
    assert carol in server.accounts
    subject = unique()
    send(server, carol, carol.address, subject)  # SMTP AUTH as the new account works
    folder, address = server.new_mailbox(carol)
    send(server, server.account("alice"), address, subject)
    with imap(server, carol) as client:
        wait_for(client, "INBOX", subject)
        wait_for(client, folder, subject)
    assert elapsed < 5, f"add_account took {elapsed:.2f} s"


# ----------------------------------------------------------------------------- config


def test_config_has_the_email_yml_shape(server: DevServer) -> None:
    alice = server.account("alice")
    config = server.config("alice", mailbox="box", to="bob@example.test", polling_period_ns=5)
    assert config == {
        "email": {
            "user": {
                "url-smtp": f"smtp://127.0.0.1:{server.smtp_port}",
                "url-imap": f"imap://127.0.0.1:{server.imap_port}",
                "username": alice.address,
                "password": alice.password,
            },
            # a folder's config sends from the folder's address: replies land in it
            "from": "alice+box@example.test",
            "recipients": {"to": "bob@example.test"},
            "polling-period": 5,
            "receive-mode": "auto",
            "mailbox": "box",
            "tls": {"ca-file": str(server.ca_file)},
        }
    }
    implicit = server.config(alice, tls="implicit")["email"]
    assert implicit["user"]["url-smtp"] == f"smtps://127.0.0.1:{server.smtps_port}"
    assert implicit["user"]["url-imap"] == f"imaps://127.0.0.1:{server.imaps_port}"
    assert implicit["recipients"] == {"to": alice.address}
    assert implicit["mailbox"] == "INBOX"
    assert "from" not in implicit
    folder = server.config(alice, mailbox="box")["email"]
    assert folder["recipients"] == {"to": "alice+box@example.test"}
    with pytest.raises(ValueError, match="tls"):
        server.config(alice, tls="plain")


def test_write_config_writes_yaml(server: DevServer, tmp_path: Path) -> None:
    default = server.write_config("bob")
    assert default == server.root / "bob.yml"
    assert yaml.safe_load(default.read_text()) == server.config("bob")
    assert default.stat().st_mode & 0o077 == 0  # it holds a password
    path = server.write_config("alice", tmp_path / "sub" / "email.yml", receive_mode="poll")
    assert yaml.safe_load(path.read_text())["email"]["receive-mode"] == "poll"


# ----------------------------------------------------------------------------- faults


def test_kick_drops_the_accounts_connections(server: DevServer) -> None:
    alice, bob = server.account("alice"), server.account("bob")
    with imap(server, alice) as kicked, imap(server, bob) as other:
        kicked.select_folder("INBOX")
        other.select_folder("INBOX")
        server.kick(alice)
        with pytest.raises((IMAPClientError, OSError)):
            kicked.noop()
        other.noop()  # only alice was kicked
    server.kick("alice")  # nobody connected: fine


def test_kick_returns_when_the_client_reconnects_at_once(server: DevServer) -> None:
    # emailmw's receiver logs in again the moment it is kicked; kick() waits for
    # the connections it dropped, not for the account to have none at all
    alice = server.account("alice")
    reconnected = threading.Event()
    release = threading.Event()

    def reconnecting_client() -> None:
        with contextlib.ExitStack() as stack:
            client = stack.enter_context(imap(server, alice))
            client.select_folder("INBOX")
            client.idle()
            deadline = time.monotonic() + 30
            with contextlib.suppress(IMAPClientError, OSError):
                while time.monotonic() < deadline:  # until the kick ends this connection
                    responses = client.idle_check(timeout=0.2)
                    if any(b"BYE" in response for response in responses):
                        break
            stack.enter_context(imap(server, alice))  # straight back in
            reconnected.set()
            release.wait(30)

    thread = threading.Thread(target=reconnecting_client, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server_has_connection(server, alice), 10)
        server.kick(alice)  # returns although alice is connected again
        assert reconnected.wait(10)
        assert server_has_connection(server, alice)
    finally:
        release.set()
        thread.join(10)


def server_has_connection(server: DevServer, account: DevAccount) -> bool:
    who = server._doveadm("who", "-1").splitlines()[1:]
    return any(line.split()[:1] == [account.address] for line in who)


def test_restart_dovecot_keeps_ports_and_mail(server: DevServer) -> None:
    alice = server.account("alice")
    folder, address = server.new_mailbox(alice)
    subject = unique()
    send(server, alice, address, subject)
    with imap(server, alice) as client:
        wait_for(client, folder, subject)
    ports = (server.imap_port, server.imaps_port, server.smtp_port, server.smtps_port)
    with imap(server, alice) as client:
        client.select_folder("INBOX")
        server.restart_dovecot()
        with pytest.raises((IMAPClientError, OSError)):
            client.noop()
    assert (server.imap_port, server.imaps_port, server.smtp_port, server.smtps_port) == ports
    with imap(server, alice, implicit=True) as client:
        wait_for(client, folder, subject, timeout=1)


def test_mail_sent_while_dovecot_is_down_arrives_after_its_start(server: DevServer) -> None:
    alice = server.account("alice")
    folder, address = server.new_mailbox(alice)
    subject = unique()
    server.stop_dovecot()
    try:
        assert not listening(server.imap_port)
        send(server, alice, address, subject, login=False)  # SASL needs Dovecot; mynetworks
    finally:
        server.start_dovecot()
    with imap(server, alice) as client:
        wait_for(client, folder, subject, timeout=20)


def test_restart_postfix_keeps_ports_and_queue(server: DevServer) -> None:
    alice = server.account("alice")
    port = server.smtp_port
    with smtplib.SMTP(server.host, port, timeout=10) as smtp:
        smtp.ehlo()
        server.restart_postfix()
        with pytest.raises((smtplib.SMTPException, OSError)):
            smtp.noop()
            smtp.noop()
    assert server.smtp_port == port
    folder, address = server.new_mailbox(alice)
    subject = unique()
    send(server, alice, address, subject)
    send(server, alice, address, subject + "-tls", implicit=True)
    with imap(server, alice) as client:
        wait_for(client, folder, subject)
        wait_for(client, folder, subject + "-tls")


def test_stop_start_postfix_refuses_then_accepts(server: DevServer) -> None:
    server.stop_postfix()
    try:
        assert not listening(server.smtp_port)
        assert not listening(server.smtps_port)
        assert listening(server.imap_port)
    finally:
        server.start_postfix()
    assert listening(server.smtp_port)
    assert server.running


def test_log_tail_shows_both_logs(server: DevServer) -> None:
    tail = server.log_tail(200)
    assert "dovecot.log" in tail
    assert "postfix.log" in tail
    assert "starting the Postfix mail system" in tail


# ----------------------------------------------------------------------------- lifecycle


def test_stop_leaves_nothing_behind_and_is_idempotent() -> None:
    require_mailstack()
    started = time.monotonic()
    srv = DevServer(accounts=("zed",))
    srv.start()
    start_time = time.monotonic() - started
    root = srv.root
    ports = (srv.smtp_port, srv.smtps_port, srv.imap_port, srv.imaps_port)
    with imap(srv, srv.account("zed")) as client:  # a live client process too
        client.select_folder("INBOX")
        procs = processes_of(srv)
        assert len(procs) >= 6
        started = time.monotonic()
        srv.stop()
        stop_time = time.monotonic() - started
        with contextlib.suppress(IMAPClientError, OSError):
            client.logout()
    assert not [p for p in procs if p.alive()]
    assert not any(listening(port) for port in ports)
    assert not root.exists()
    assert not srv.running
    srv.stop()  # idempotent
    with pytest.raises(DevServerError):
        srv.start()  # its temporary root is gone
    assert start_time < 10, f"start took {start_time:.2f} s"
    assert stop_time < 10, f"stop took {stop_time:.2f} s"


def test_two_servers_at_once(server: DevServer) -> None:
    with DevServer(accounts=("alice",), domain="other.test") as other:
        assert {other.smtp_port, other.smtps_port, other.imap_port, other.imaps_port}.isdisjoint(
            {server.smtp_port, server.smtps_port, server.imap_port, server.imaps_port}
        )
        assert other.ca_file != server.ca_file
        mine, theirs = server.account("alice"), other.account("alice")
        assert theirs.address == "alice@other.test"
        subject = unique()
        send(other, theirs, theirs.address, subject)
        send(server, mine, mine.address, subject + "-first")
        with imap(other, theirs) as client:
            wait_for(client, "INBOX", subject)
            assert subject + "-first" not in subjects(client, "INBOX")
        with imap(server, mine) as client:
            wait_for(client, "INBOX", subject + "-first")
            assert subject not in subjects(client, "INBOX")
    assert server.running  # stopping one leaves the other alone
    with imap(server, server.account("alice")) as client:
        client.noop()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the daemons' users can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="emailmw-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_given_root_is_kept_and_a_crashed_run_is_cleaned_up(open_dir: Path) -> None:
    require_mailstack()
    root = open_dir / "stack"
    first = DevServer(root, accounts=("alice",))
    first.start()
    try:
        ca = first.ca_file.read_bytes()
        crashed = processes_of(first)
        # A new object on the same root (as after a crash) stops what the old one left.
        second = DevServer(root, accounts=("alice",))
        second.start()
        try:
            assert not [p for p in crashed if p.alive()]
            assert second.ca_file.read_bytes() == ca  # certificates are reused
            with imap(second, second.account("alice")) as client:
                client.noop()
        finally:
            second.stop()
    finally:
        first.stop()
    assert root.is_dir()
    assert (root / "tls" / "ca.pem").exists()
    assert not any(p.alive() for p in crashed)


def test_start_after_stop_keeps_ports_on_a_given_root(open_dir: Path) -> None:
    require_mailstack()
    srv = DevServer(open_dir / "stack", accounts=("alice",))
    srv.start()
    try:
        ports = (srv.smtp_port, srv.smtps_port, srv.imap_port, srv.imaps_port)
        srv.stop()
        assert not srv.running
        srv.start()
        assert (srv.smtp_port, srv.smtps_port, srv.imap_port, srv.imaps_port) == ports
        subject = unique()
        alice = srv.account("alice")
        send(srv, alice, alice.address, subject)
        with imap(srv, alice) as client:
            wait_for(client, "INBOX", subject)
    finally:
        srv.stop()


def test_stop_after_the_daemons_were_killed_from_outside() -> None:
    require_mailstack()
    srv = DevServer(accounts=("alice",))
    srv.start()
    procs = processes_of(srv)
    for master in (srv._dovecot, srv._postfix):
        assert master is not None
        os.kill(master.pid, signal.SIGKILL)
    srv.stop()
    deadline = time.monotonic() + 20  # orphaned children notice their master's death
    while any(p.alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.alive() for p in procs)


def test_a_port_taken_meanwhile_is_retried_with_new_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    require_mailstack()
    real = processes.free_ports
    with socket.socket() as smtp_taken, socket.socket() as imap_taken:
        for sock in (smtp_taken, imap_taken):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        taken = [smtp_taken.getsockname()[1], imap_taken.getsockname()[1]]
        calls = []

        def racy(count: int, host: str = "127.0.0.1") -> list[int]:
            ports = real(count, host)
            calls.append(ports)
            if len(calls) == 1:  # smtp, smtps, imap, imaps: another process took two
                ports[0], ports[2] = taken
            elif len(calls) == 2:
                ports[0] = taken[0]  # Postfix's turn to fail
            return ports

        monkeypatch.setattr(server_module, "free_ports", racy)
        with DevServer(accounts=("alice",)) as srv:
            assert len(calls) == 3
            assert not set(taken) & {srv.smtp_port, srv.imap_port}
            with imap(srv, srv.account("alice")) as client:
                client.noop()


def test_unreachable_root_is_a_clear_error(tmp_path: Path) -> None:
    require_mailstack()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(DevServerError, match=r"not searchable by other users"):
        DevServer(private / "stack").start()


def test_cli_runs_until_sigint(open_dir: Path) -> None:
    require_mailstack()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "emailmw.devserver", "--accounts", "ann,ben"]
    argv += ["--root", str(open_dir / "root"), "--config-dir", str(open_dir / "cfg")]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    try:
        output = []
        for line in proc.stdout:
            output.append(line)
            if line.startswith("Ctrl-C"):
                break
        text = "".join(output)
        assert f"EMAIL_CONFIG_FILE={open_dir / 'cfg' / 'ann.yml'}" in text, text
        config = yaml.safe_load((open_dir / "cfg" / "ben.yml").read_text())["email"]
        assert config["user"]["username"] == "ben@example.test"
        port = int(config["user"]["url-imap"].rsplit(":", 1)[1])
        assert listening(port)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# ----------------------------------------------------------------------------- no mail stack


def test_missing_mail_stack_skips_or_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise MailStackMissingError("not installed: apt-get install -y dovecot-imapd ...")

    monkeypatch.setattr(devserver, "ensure_installed", missing)
    import mailstack

    monkeypatch.setattr(mailstack, "ensure_installed", missing)
    assert mailstack_problem() is not None
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install"):
        require_mailstack()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install"):
        require_mailstack()


def test_install_hint_names_the_packages_and_root() -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(install, "DOVECOT", "/nonexistent/dovecot")
        with pytest.raises(MailStackMissingError) as info:
            devserver.ensure_installed()
    message = str(info.value)
    assert "apt-get install -y dovecot-imapd dovecot-lmtpd postfix" in message
    assert "root" in message
    assert isinstance(info.value, RuntimeError)


def test_mailstack_problem_is_none_here_when_installed() -> None:
    if mailstack_problem() is not None:
        require_mailstack()  # skips, or fails on CI
    devserver.ensure_installed()


# ----------------------------------------------------------------------------- host and relays


def test_a_server_on_another_loopback_address_listens_and_is_certified_there_only() -> None:
    require_mailstack()
    with DevServer(accounts=("alice",), domain="nine.test", host="127.0.0.9") as other:
        assert other.host == "127.0.0.9"
        ports = (other.smtp_port, other.smtps_port, other.imap_port, other.imaps_port)
        for port in ports:
            socket.create_connection(("127.0.0.9", port), timeout=5).close()
        on_host: set[int] = set()
        for pid_file in ("postfix-spool/pid/master.pid", "dovecot/run/master.pid"):
            master = processes.read_pid_file(other.root / pid_file)
            assert master is not None  # bound to 127.0.0.9 only: not 127.0.0.1, no wildcard
            on_host |= processes.listening_ports(master.pid, "127.0.0.9")
            assert not set(ports) & processes.listening_ports(master.pid, "127.0.0.1")
        assert set(ports) <= on_host
        for name in ("127.0.0.9", "127.0.0.1", "localhost"):  # the certificate names its address
            with socket.create_connection((other.host, other.imaps_port), timeout=10) as raw:
                with tls_context(other).wrap_socket(raw, server_hostname=name) as tls:
                    assert tls.version() in {"TLSv1.2", "TLSv1.3"}
        for name in ("127.0.0.2", "mail.nine.test"):  # and no other
            with socket.create_connection((other.host, other.imaps_port), timeout=10) as raw:
                with pytest.raises(ssl.SSLCertVerificationError):
                    tls_context(other).wrap_socket(raw, server_hostname=name)
        alice = other.account("alice")
        config = other.config(alice)
        assert config["email"]["user"]["url-smtp"] == f"smtp://127.0.0.9:{other.smtp_port}"
        subject = unique()
        send(other, alice, alice.address, subject)
        with imap(other, alice) as client:
            wait_for(client, "INBOX", subject)
        other.stop_postfix()
        assert not other.postfix_running and not other.running
        other.start_postfix()
        assert other.postfix_running and other.running


def test_host_must_be_an_ipv4_loopback_address() -> None:
    for host in ("192.0.2.1", "::1", "0.0.0.0", "localhost", "127.0.0.256"):
        with pytest.raises(ValueError, match=f"{host}"):
            DevServer(host=host)


def test_relay_refuses_bad_routes_with_clear_errors(server: DevServer) -> None:
    with pytest.raises(ValueError, match="own domain"):
        server.relay("example.test", "127.0.0.2", 25)
    with pytest.raises(ValueError, match="invalid mail domain 'nodots'"):
        server.relay("nodots", "127.0.0.2", 25)
    with pytest.raises(ValueError, match="invalid SMTP port 0"):
        server.relay("b.test", "127.0.0.2", 0)
    with pytest.raises(ValueError, match="not an IPv4 loopback address"):
        server.relay("b.test", "192.0.2.1", 25)
    assert server.relays == {}


def test_relay_routes_a_domain_to_its_server_and_other_domains_are_refused() -> None:
    require_mailstack()
    with (
        DevServer(accounts=("alice",), domain="one.test", host="127.0.0.7") as one,
        DevServer(accounts=("bob",), domain="two.test", host="127.0.0.8") as two,
    ):
        alice, bob = one.account("alice"), two.account("bob")
        one.relay("two.test", two.host, two.smtp_port)  # while running: Postfix restarts
        assert one.relays == {"two.test": ("127.0.0.8", two.smtp_port)}
        assert one.postfix_running
        subject = unique()
        send(one, alice, bob.address, subject)
        with imap(two, bob) as client:
            raw = wait_for(client, "INBOX", subject)
        # two.test's Postfix got it from one.test's, which sent from its own address
        assert b"from mail.one.test (unknown [127.0.0.7])" in raw
        assert b"by mail.two.test (Postfix) with ESMTPS" in raw
        # a domain with no route is never sent anywhere: refused at RCPT TO
        with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
            send(one, alice, "carol@nowhere.test", subject + "-nowhere")
        code, text = info.value.recipients["carol@nowhere.test"]
        assert code == 550 and b"outbound mail is disabled" in text
