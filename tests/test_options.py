"""Configuration: the reference email.yml format, the search order, secrets, errors."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
from pydantic import SecretStr

from emailmw import ConfigError, Options
from emailmw.options import ServerAddress, parse_server_url

pytestmark = pytest.mark.timeout(30)

PASSWORD = "hunter2-Sup3rS3cret"

REFERENCE_YAML = f"""\
email:
  user:
    url-smtp: smtp.example.com
    url-imap: imap.example.com
    username: me@example.com
    password: {PASSWORD}
  recipients:
    to: me@example.com
    cc:
      - a@example.com
      - b@example.com
    bcc: hidden@example.com
  polling-period: 250000000
  intraprocess: false
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No config file or secret leaks in from the environment running the tests."""
    monkeypatch.delenv("EMAIL_CONFIG_FILE", raising=False)
    monkeypatch.delenv("EMAILMW_PASSWORD", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


# -- constructing --------------------------------------------------------------------


def test_intraprocess_options_need_nothing_else() -> None:
    options = Options(intraprocess=True)
    assert options.intraprocess
    assert options.user is None
    assert options.recipients.to == []
    assert options.polling_period == 100_000_000
    assert options.queue_depth >= 1


def test_options_are_frozen() -> None:
    options = Options(intraprocess=True)
    with pytest.raises(ValueError):
        options.intraprocess = False  # type: ignore[misc]


# -- the reference format ------------------------------------------------------------


def test_reference_file(tmp_path: Path) -> None:
    options = Options.from_file(write(tmp_path / "email.yml", REFERENCE_YAML))
    assert options.user is not None
    assert options.user.username == "me@example.com"
    assert options.user.password is not None
    assert options.user.password.get_secret_value() == PASSWORD
    assert options.resolve_password() == PASSWORD
    assert options.recipients.to == ["me@example.com"]
    assert options.recipients.cc == ["a@example.com", "b@example.com"]
    assert options.recipients.bcc == ["hidden@example.com"]
    assert options.polling_period == 250_000_000
    assert options.intraprocess is False
    # The reference's bare hosts mean implicit TLS.
    assert options.user.smtp == ServerAddress("smtps", "smtp.example.com", 465, "implicit")
    assert options.user.imap == ServerAddress("imaps", "imap.example.com", 993, "implicit")


def test_our_additional_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path / "email.yml",
        """\
        email:
          user:
            url-smtp: smtp://127.0.0.1:10025
            url-imap: imap://127.0.0.1:10143
          receive-mode: poll
          mailbox: Robots
          queue-depth: 7
          tls: {ca-file: /tmp/ca.pem, verify: false, allow-insecure: true}
        """,
    )
    options = Options.from_file(path)
    assert options.receive_mode == "poll"
    assert options.mailbox == "Robots"
    assert options.queue_depth == 7
    assert options.tls.ca_file == Path("/tmp/ca.pem")
    assert options.tls.verify is False
    assert options.tls.allow_insecure is True


def test_intraprocess_file(tmp_path: Path) -> None:
    options = Options.from_file(write(tmp_path / "c.yml", "email:\n  intraprocess: true\n"))
    assert options.intraprocess
    assert options.user is None


def test_from_file_accepts_str_and_pathlike(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yml", "email:\n  intraprocess: true\n")
    assert Options.from_file(str(path)) == Options.from_file(path)


# -- the search order ----------------------------------------------------------------


INTRA = "email:\n  intraprocess: true\n  mailbox: {}\n"


def test_load_prefers_env_then_cwd_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home_file = write(Path.home() / "email.yml", INTRA.format("FromHome"))
    assert Options.find_file() == home_file
    assert Options.load().mailbox == "FromHome"

    write(Path.cwd() / "email.yml", INTRA.format("FromCwd"))
    assert Options.load().mailbox == "FromCwd"

    env_file = write(tmp_path / "elsewhere.yml", INTRA.format("FromEnv"))
    monkeypatch.setenv("EMAIL_CONFIG_FILE", str(env_file))
    assert Options.find_file() == env_file
    assert Options.load().mailbox == "FromEnv"


def test_load_with_no_file_anywhere() -> None:
    assert Options.find_file() is None
    with pytest.raises(ConfigError, match="EMAIL_CONFIG_FILE"):
        Options.load()


def test_load_env_pointing_to_a_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(Path.cwd() / "email.yml", INTRA.format("FromCwd"))
    missing = tmp_path / "nope.yml"
    monkeypatch.setenv("EMAIL_CONFIG_FILE", str(missing))
    with pytest.raises(ConfigError, match="not found") as info:
        Options.load()
    assert str(missing) in str(info.value)
    assert info.value.path == str(missing)


def test_load_ignores_a_directory_named_email_yml() -> None:
    (Path.cwd() / "email.yml").mkdir()
    write(Path.home() / "email.yml", INTRA.format("FromHome"))
    assert Options.load().mailbox == "FromHome"


# -- errors name the key and the file ------------------------------------------------


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path / "bad.yml", text)
    with pytest.raises(ConfigError) as info:
        Options.from_file(path)
    err = info.value
    assert str(path) in str(err), str(err)
    assert err.path == str(path)
    assert "Traceback" not in str(err)
    assert PASSWORD not in str(err)
    return err


def test_missing_imap_url(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        f"""\
        email:
          user:
            url-smtp: smtp.example.com
            password: {PASSWORD}
        """,
    )
    assert "email.user.url-imap: field required" in str(err)
    assert err.key == "email.user.url-imap"


def test_missing_user_section(tmp_path: Path) -> None:
    err = load_error(tmp_path, "email:\n  polling-period: 5\n")
    assert "email.user" in str(err)
    assert "required" in str(err)


def test_missing_email_section(tmp_path: Path) -> None:
    err = load_error(tmp_path, "mail:\n  intraprocess: true\n")
    assert "email" in str(err)
    assert err.key == "email"


def test_empty_file(tmp_path: Path) -> None:
    err = load_error(tmp_path, "")
    assert "email: field required" in str(err)


def test_email_section_not_a_mapping(tmp_path: Path) -> None:
    err = load_error(tmp_path, "email: [1, 2]\n")
    assert "must be a mapping" in str(err)


def test_unknown_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, "email:\n  intraprocess: true\n  polling-periode: 5\n")
    assert "email.polling-periode: unknown key" in str(err)
    assert err.key == "email.polling-periode"


def test_unknown_nested_key(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        f"""\
        email:
          user:
            url-smtp: smtp.example.com
            url-imap: imap.example.com
            password: {PASSWORD}
            pasword: typo
        """,
    )
    assert "email.user.pasword: unknown key" in str(err)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, "email:\n  intraprocess: true\nother: 1\n")
    assert "other" in str(err)


def test_wrong_type(tmp_path: Path) -> None:
    err = load_error(tmp_path, 'email:\n  intraprocess: true\n  polling-period: "abc"\n')
    assert str(err).startswith("email.polling-period: ")
    assert err.key == "email.polling-period"


def test_negative_polling_period(tmp_path: Path) -> None:
    err = load_error(tmp_path, "email:\n  intraprocess: true\n  polling-period: -1\n")
    assert err.key == "email.polling-period"


def test_bad_url_scheme(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        f"""\
        email:
          user:
            url-smtp: http://smtp.example.com
            url-imap: imap.example.com
            password: {PASSWORD}
        """,
    )
    assert "email.user.url-smtp" in str(err)
    assert "smtp://" in str(err)


def test_imap_url_given_for_smtp(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        """\
        email:
          user:
            url-smtp: imaps://mail.example.com
            url-imap: imaps://mail.example.com
        """,
    )
    assert err.key == "email.user.url-smtp"


@pytest.mark.parametrize("field", ["to", "cc", "bcc"])
@pytest.mark.parametrize(
    "address", ["not-an-address", "a@b, c@d", "Name <a@b>", "a@b\r\nBcc: x@y", "a @b"]
)
def test_bad_recipient_address(tmp_path: Path, field: str, address: str) -> None:
    err = load_error(
        tmp_path,
        f"email:\n  intraprocess: true\n  recipients:\n    {field}: {json.dumps(address)}\n",
    )
    assert f"email.recipients.{field}" in str(err)


def test_bad_recipient_in_a_list(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        "email:\n  intraprocess: true\n  recipients:\n    to: [ok@example.com, nope]\n",
    )
    assert "email.recipients.to" in str(err)
    assert "nope" in str(err)


def test_bad_yaml(tmp_path: Path) -> None:
    err = load_error(tmp_path, f"email:\n  user:\n    password: {PASSWORD}\n   bad: [\n")
    assert "YAML" in str(err)


def test_bad_yaml_next_to_the_password(tmp_path: Path) -> None:
    err = load_error(tmp_path, f'email:\n  user:\n    password: "{PASSWORD}\n')
    assert "YAML" in str(err)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yml"
    path.write_bytes(b"email:\n  mailbox: \xe9t\xe9\n")
    with pytest.raises(ConfigError) as info:
        Options.from_file(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yml"
    with pytest.raises(ConfigError, match="not found") as info:
        Options.from_file(missing)
    assert str(missing) in str(info.value)


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        "email:\n  intraprocess: maybe\n  polling-period: abc\n  queue-depth: 0\n",
    )
    text = str(err)
    for key in ("email.intraprocess", "email.polling-period", "email.queue-depth"):
        assert key in text


# -- secrets -------------------------------------------------------------------------


def test_password_is_never_shown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = write(tmp_path / "email.yml", REFERENCE_YAML)
    options = Options.from_file(path)
    Options.from_file(path)
    assert PASSWORD not in repr(options)
    assert PASSWORD not in str(options)
    assert options.user is not None
    assert PASSWORD not in repr(options.user)
    assert PASSWORD not in str(options.user)
    assert PASSWORD not in options.model_dump_json()
    assert PASSWORD not in caplog.text
    for record in caplog.records:
        assert PASSWORD not in record.getMessage()


def test_password_not_in_any_validation_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # A password of the wrong type (a YAML list) makes pydantic complain about it.
    for text in (
        f"email:\n  user:\n    url-smtp: a\n    url-imap: b\n    password: [{PASSWORD}]\n",
        f"email:\n  user:\n    url-smtp: a\n    password: {PASSWORD}\n",
        f"email:\n  user:\n    url-smtp: a\n    url-imap: b\n    password: {PASSWORD}\n  x: 1\n",
    ):
        load_error(tmp_path, text)
    assert PASSWORD not in caplog.text


def test_credentials_in_a_url_are_refused_without_being_echoed(tmp_path: Path) -> None:
    for url in (
        f"imaps://me:{PASSWORD}@imap.example.com",
        f"imaps://me:{PASSWORD}@imap.example.com:993",
        # A path makes the parser complain about the path: it must not quote the URL's secret.
        f"imaps://me:{PASSWORD}@imap.example.com/INBOX",
        f"imaps://me:{PASSWORD}@imap.example.com?x=1",
    ):
        err = load_error(
            tmp_path, f"email:\n  user:\n    url-smtp: smtp.example.com\n    url-imap: {url}\n"
        )
        assert err.key == "email.user.url-imap"


def test_password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    monkeypatch.setenv("EMAILMW_PASSWORD", "from-env")
    path = write(
        tmp_path / "email.yml",
        f"""\
        email:
          user:
            url-smtp: smtp.example.com
            url-imap: imap.example.com
          password-file: {secret}
        """,
    )
    options = Options.from_file(path)
    assert options.resolve_password() == PASSWORD  # stripped, and preferred to the env
    assert PASSWORD not in repr(options)


def test_password_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path / "email.yml",
        "email:\n  user:\n    url-smtp: smtp.example.com\n    url-imap: imap.example.com\n",
    )
    options = Options.from_file(path)
    assert options.resolve_password() is None
    monkeypatch.setenv("EMAILMW_PASSWORD", PASSWORD)
    assert options.resolve_password() == PASSWORD


def test_password_in_file_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("from-file", encoding="utf-8")
    monkeypatch.setenv("EMAILMW_PASSWORD", "from-env")
    options = Options(
        user={"url-smtp": "a", "url-imap": "b", "password": SecretStr(PASSWORD)},  # type: ignore[arg-type]
        password_file=secret,
    )
    assert options.resolve_password() == PASSWORD


def test_unreadable_password_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-secret.txt"
    path = write(
        tmp_path / "email.yml",
        f"email:\n  user:\n    url-smtp: a\n    url-imap: b\n  password-file: {missing}\n",
    )
    options = Options.from_file(path)
    with pytest.raises(ConfigError, match="password-file") as info:
        options.resolve_password()
    assert info.value.key == "email.password-file"


# -- server URLs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "protocol", "expected"),
    [
        ("imap://mail.example.com", "imap", ("imap", "mail.example.com", 143, "starttls")),
        ("imaps://mail.example.com", "imap", ("imaps", "mail.example.com", 993, "implicit")),
        ("smtp://mail.example.com", "smtp", ("smtp", "mail.example.com", 587, "starttls")),
        ("smtps://mail.example.com", "smtp", ("smtps", "mail.example.com", 465, "implicit")),
        ("imap://127.0.0.1:10143", "imap", ("imap", "127.0.0.1", 10143, "starttls")),
        ("smtp://127.0.0.1:25", "smtp", ("smtp", "127.0.0.1", 25, "starttls")),
        ("smtps://h:2465/", "smtp", ("smtps", "h", 2465, "implicit")),
        ("mail.example.com", "imap", ("imaps", "mail.example.com", 993, "implicit")),
        ("mail.example.com", "smtp", ("smtps", "mail.example.com", 465, "implicit")),
        ("  mail.example.com  ", "smtp", ("smtps", "mail.example.com", 465, "implicit")),
        ("IMAPS://Mail.Example.com", "imap", ("imaps", "mail.example.com", 993, "implicit")),
        ("imap://[::1]:1143", "imap", ("imap", "::1", 1143, "starttls")),
        ("imaps://[::1]", "imap", ("imaps", "::1", 993, "implicit")),
        ("[::1]", "smtp", ("smtps", "::1", 465, "implicit")),
    ],
)
def test_parse_server_url(url: str, protocol: str, expected: tuple[str, str, int, str]) -> None:
    assert parse_server_url(url, protocol) == ServerAddress(*expected)  # type: ignore[arg-type]


def test_server_address_str() -> None:
    assert str(parse_server_url("imap://[::1]:1143", "imap")) == "imap://[::1]:1143"
    assert str(parse_server_url("mail.example.com", "smtp")) == "smtps://mail.example.com:465"


@pytest.mark.parametrize(
    ("url", "protocol"),
    [
        ("", "imap"),
        ("   ", "imap"),
        ("http://mail.example.com", "imap"),
        ("smtp://mail.example.com", "imap"),
        ("imap://mail.example.com", "smtp"),
        ("imap://", "imap"),
        ("imap://mail.example.com:notaport", "imap"),
        ("imap://mail.example.com:70000", "imap"),
        ("imap://mail.example.com/INBOX", "imap"),
        ("imap://mail.example.com?x=1", "imap"),
        ("imap://user:pw@mail.example.com", "imap"),
    ],
)
def test_bad_server_urls(url: str, protocol: str) -> None:
    with pytest.raises(ValueError):
        parse_server_url(url, protocol)  # type: ignore[arg-type]


def test_port_zero_is_refused() -> None:
    # Port 0 is not a port a client can connect to; it must not silently become 143.
    with pytest.raises(ValueError):
        parse_server_url("imap://mail.example.com:0", "imap")


@pytest.mark.parametrize(
    "line", ["polling-period: true", "queue-depth: yes", "max-message-size: false"]
)
def test_a_boolean_is_not_a_number(tmp_path: Path, line: str) -> None:
    # YAML turns `yes`/`true` into booleans; a count or a period must not silently become 1 or 0.
    key = "email." + line.split(":", maxsplit=1)[0]
    err = load_error(tmp_path, f"email:\n  intraprocess: true\n  {line}\n")
    assert err.key == key


@pytest.mark.parametrize("address", ["not-an-address", "me@example.com\r\nBcc: x@evil.example"])
def test_from_address_is_validated_like_recipients(tmp_path: Path, address: str) -> None:
    err = load_error(tmp_path, f"email:\n  intraprocess: true\n  from: {json.dumps(address)}\n")
    assert err.key == "email.from"


# -- Options(...) in Python ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"intraprocess": True, "timeout": -1}, "email.timeout"),
        ({"intraprocess": True, "queue-depth": 0}, "email.queue-depth"),
        ({"intraprocess": True, "smtp-connections": 0}, "email.smtp-connections"),
        ({"intraprocess": True, "smtp_connections": "4"}, "email.smtp_connections"),
        ({"intraprocess": True, "reorder_window": "soon"}, "email.reorder_window"),
        ({"intraprocess": True, "receive_mode": "push"}, "email.receive_mode"),
        ({"intraprocess": True, "no_such_key": 1}, "email.no_such_key"),
        ({}, "email.user"),
    ],
)
def test_bad_keyword_arguments_raise_config_error_naming_the_key(
    kwargs: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Options(**kwargs)  # type: ignore[arg-type]
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert "Options(...)" in str(info.value)
    assert info.value.path is None


def test_a_bad_keyword_argument_does_not_echo_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        Options(
            user={  # type: ignore[arg-type]
                "url-smtp": "smtp://127.0.0.1:25",
                "url-imap": "ftp://127.0.0.1",
                "username": "u",
                "password": "hunter2-secret",
            }
        )
    assert info.value.key == "email.user.url-imap"
    assert "hunter2-secret" not in str(info.value)
    assert "hunter2-secret" not in repr(info.value)


# -- bounds of the numeric keys (docs/config.md lists them) -----------------------------

# key: (largest accepted value, a value just beyond it, whether it is a float)
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "polling-period": (3_600_000_000_000, 3_600_000_000_001, False),
    "timeout": (86_400, 86_400.001, True),
    "send-timeout": (86_400, 86_400.001, True),
    "smtp-connections": (64, 65, False),
    "reorder-window": (3_600, 3_600.001, True),
    "queue-depth": (10_000_000, 10_000_001, False),
    "history-depth": (10_000_000, 10_000_001, False),
    "max-message-size": (1 << 30, (1 << 30) + 1, False),
    "max-age": (31_536_000, 31_536_000.001, True),
}


def test_every_numeric_key_has_a_bound() -> None:
    numeric = {
        field.alias or name
        for name, field in Options.model_fields.items()
        if field.annotation in (int, float)
    }
    assert numeric == set(BOUNDS)


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_the_largest_value_of_a_numeric_key_is_accepted(tmp_path: Path, key: str) -> None:
    largest = BOUNDS[key][0]
    path = write(tmp_path / "email.yml", f"email:\n  intraprocess: true\n  {key}: {largest}\n")
    options = Options.from_file(path)
    assert getattr(options, key.replace("-", "_")) == largest


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_a_numeric_key_beyond_its_bound_is_refused(tmp_path: Path, key: str) -> None:
    beyond = BOUNDS[key][1]
    err = load_error(tmp_path, f"email:\n  intraprocess: true\n  {key}: {beyond!r}\n")
    assert err.key == f"email.{key}"
    assert "less than or equal to" in str(err)


@pytest.mark.parametrize("value", ["1e10", "1e300", ".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("key", sorted(k for k, (_, _, is_float) in BOUNDS.items() if is_float))
def test_huge_infinite_and_nan_durations_are_refused(tmp_path: Path, key: str, value: str) -> None:
    """``timeout: 1e10`` used to load and then raise OverflowError in every wait."""
    err = load_error(tmp_path, f"email:\n  intraprocess: true\n  {key}: {value}\n")
    assert err.key == f"email.{key}"


@pytest.mark.parametrize("key", sorted(k for k, (_, _, is_float) in BOUNDS.items() if not is_float))
def test_huge_counts_are_refused(tmp_path: Path, key: str) -> None:
    err = load_error(tmp_path, f"email:\n  intraprocess: true\n  {key}: {10**30}\n")
    assert err.key == f"email.{key}"


# -- addresses are ASCII ------------------------------------------------------------------

NON_ASCII = ["jürgen@example.com", "user@bücher.example", "пользователь@пример.рф"]


@pytest.mark.parametrize("address", NON_ASCII)
@pytest.mark.parametrize("field", ["to", "cc", "bcc"])
def test_a_non_ascii_recipient_is_refused_at_load(tmp_path: Path, field: str, address: str) -> None:
    err = load_error(
        tmp_path,
        f"email:\n  intraprocess: true\n  recipients:\n    {field}: {json.dumps(address)}\n",
    )
    assert err.key == f"email.recipients.{field}"
    assert "not ASCII" in str(err) and "not supported" in str(err)


@pytest.mark.parametrize("address", NON_ASCII)
def test_a_non_ascii_from_or_allowed_sender_is_refused_at_load(
    tmp_path: Path, address: str
) -> None:
    err = load_error(tmp_path, f"email:\n  intraprocess: true\n  from: {json.dumps(address)}\n")
    assert err.key == "email.from"
    assert "internationalized email addresses" in str(err)
    domain = address.rpartition("@")[2]
    for entry in [address] + ([] if domain.isascii() else [domain, "@" + domain]):
        err = load_error(
            tmp_path, f"email:\n  intraprocess: true\n  allowed-senders: [{json.dumps(entry)}]\n"
        )
        assert err.key == "email.allowed-senders"
        assert "not supported" in str(err)


@pytest.mark.parametrize("username", ["jürgen@example.com", "jürgen"])
def test_a_non_ascii_username_used_as_from_is_refused_at_load(
    tmp_path: Path, username: str
) -> None:
    """Without ``from``, the username (or ``username@smtp-host``) is the From address."""
    user = (
        f"  user:\n    url-smtp: smtp://127.0.0.1:25\n    url-imap: imap://127.0.0.1:143\n"
        f"    username: {json.dumps(username)}\n"
    )
    err = load_error(tmp_path, f"email:\n{user}")
    assert err.key == "email.user.username"
    assert "email.from" in str(err) and "not supported" in str(err)
    assert err.path is not None
    # with an ASCII `from`, a non-ASCII login name is fine (it is sent with AUTH PLAIN)
    path = write(tmp_path / "ok.yml", f"email:\n{user}  from: me@example.com\n")
    assert Options.from_file(path).user is not None


@pytest.mark.parametrize(
    "address",
    ["a@b@c.example", "a@b(c", "a@", "@example.com", 'a"b@example.com', "a@.example", "a@ex;ample"],
)
def test_addresses_that_could_not_be_sent_are_refused(tmp_path: Path, address: str) -> None:
    err = load_error(
        tmp_path, f"email:\n  intraprocess: true\n  recipients:\n    to: {json.dumps(address)}\n"
    )
    assert err.key == "email.recipients.to"


@pytest.mark.parametrize(
    "address",
    ["a.b+tag@example.com", "x_y@mail-1.example.test", "user@[127.0.0.1]", "o'neil@ex.io"],
)
def test_ordinary_addresses_load(address: str) -> None:
    options = Options.from_dict({"email": {"intraprocess": True, "recipients": {"to": address}}})
    assert options.recipients.to == [address]


def test_a_config_file_that_is_not_utf8_quotes_none_of_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yml"
    path.write_bytes(b"email:\n  user:\n    password: s\xe9cret\n")
    with pytest.raises(ConfigError) as info:
        Options.from_file(path)
    assert "not UTF-8" in str(info.value)
    assert "xe9" not in str(info.value).lower() and "\xe9" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None
