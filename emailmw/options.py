"""Configuration: the ``email:`` section of an ``email.yml`` file, validated.

The file format is the reference design's, plus documented additions::

    email:
      user:
        url-smtp: smtp://127.0.0.1:10025     # or smtps://, or a bare host (implicit TLS, 465)
        url-imap: imaps://imap.example.com   # or imap://, or a bare host (implicit TLS, 993)
        username: me@example.com
        password: my-password              # or password-file, or $EMAILMW_PASSWORD
        auth: password                      # or xoauth2 / oauthbearer with token-command
      recipients:
        to: me@example.com                  # a string or a list; cc and bcc likewise
      polling-period: 100000000             # nanoseconds
      intraprocess: false
      receive-mode: auto                    # auto | idle | poll
      mailbox: INBOX
      tls: {ca-file: /path/ca.pem, verify: true, allow-insecure: false}

See ``docs/config.md`` for every key.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from emailmw.errors import ConfigError
from emailmw.state_store import default_state_dir
from emailmw.transport.data import EmailRecipients
from emailmw.transport.oauth import AuthMethod, TokenSource, command_argv, command_provider
from emailmw.transport.settings import (
    ImapSettings,
    ServerAddress,
    SmtpSettings,
    TlsSettings,
    parse_server_url,
)

__all__ = [
    "CONFIG_FILE_ENV",
    "MIN_SIGNING_KEY_BYTES",
    "PASSWORD_ENV",
    "SIGNING_KEY_ENV",
    "Options",
    "RecipientsOptions",
    "RetentionOptions",
    "ServerAddress",
    "TlsOptions",
    "UserOptions",
    "parse_server_url",
]

logger = logging.getLogger(__name__)

CONFIG_FILE_ENV = "EMAIL_CONFIG_FILE"
PASSWORD_ENV = "EMAILMW_PASSWORD"
SIGNING_KEY_ENV = "EMAILMW_SIGNING_KEY"
_CONFIG_FILE_NAME = "email.yml"

# Upper bounds of the numeric keys (docs/config.md lists them): beyond them a value is a
# mistake, and some would overflow the timers and sockets they feed.
_MAX_TIMEOUT = 24 * 3600.0  # timeout, send-timeout: one day
_MAX_POLLING_PERIOD_NS = 3600 * 10**9  # one hour
_MAX_REORDER_WINDOW = 3600.0  # one hour
_MAX_QUEUE_DEPTH = 10_000_000
_MAX_SMTP_CONNECTIONS = 64
_MAX_MESSAGE_SIZE_LIMIT = 1 << 30  # 1 GiB
_MAX_MAX_AGE = 365 * 24 * 3600.0  # one year
_MAX_RETENTION_AGE = 100 * 365 * 24 * 3600.0  # retention.max-age: a hundred years
_MAX_RETENTION_COUNT = 1_000_000_000  # retention.max-count
#: The shortest signing key accepted, in bytes (an empty HMAC key lets anyone sign).
MIN_SIGNING_KEY_BYTES = 16
#: Secret files larger than this are refused (a key or password is a few bytes).
_MAX_SECRET_FILE = 64 * 1024

#: The local part of an address: RFC 5322 ``dot-atom`` characters (no quoted local parts).
_ADDRESS_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")
#: The domain of an address: host name labels, or an address literal such as ``[127.0.0.1]``.
_ADDRESS_DOMAIN = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[!-Z^-~]+\]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_ASCII_ADDRESS = (
    "internationalized email addresses (SMTPUTF8, IDNA) are not supported; "
    "use the ASCII form of the address (a domain in punycode: xn--...)"
)


def _check_address(address: str) -> None:
    """Raise :class:`ValueError` unless ``address`` is a bare ASCII ``local@domain``."""
    if not address.isascii():
        raise ValueError(f"{address!r} is not ASCII: {_NOT_ASCII_ADDRESS}")
    local, _, domain = address.rpartition("@")
    if not _ADDRESS_LOCAL.fullmatch(local) or not _ADDRESS_DOMAIN.fullmatch(domain):
        raise ValueError(f"not an email address: {address!r}")


def _as_list(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return value


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, hide_input_in_errors=True
    )


class UserOptions(_Model):
    """The account: server URLs and credentials (``email.user``)."""

    url_smtp: str = Field(alias="url-smtp")
    url_imap: str = Field(alias="url-imap")
    username: str = ""
    password: SecretStr | None = None
    auth: AuthMethod = "password"
    token_command: str | list[str] | None = Field(default=None, alias="token-command")

    @field_validator("token_command")
    @classmethod
    def _check_token_command(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None:
            command_argv(value)
        return value

    @field_validator("url_smtp")
    @classmethod
    def _check_smtp(cls, value: str) -> str:
        parse_server_url(value, "smtp")
        return value

    @field_validator("url_imap")
    @classmethod
    def _check_imap(cls, value: str) -> str:
        parse_server_url(value, "imap")
        return value

    @property
    def smtp(self) -> ServerAddress:
        """The parsed SMTP server address."""
        return parse_server_url(self.url_smtp, "smtp")

    @property
    def imap(self) -> ServerAddress:
        """The parsed IMAP server address."""
        return parse_server_url(self.url_imap, "imap")


class RecipientsOptions(_Model):
    """Who published messages and requests go to (``email.recipients``)."""

    to: list[str] = Field(default_factory=list)
    cc: list[str] = Field(default_factory=list)
    bcc: list[str] = Field(default_factory=list)

    @field_validator("to", "cc", "bcc", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("to", "cc", "bcc")
    @classmethod
    def _check_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            _check_address(address)
        return value


class TlsOptions(_Model):
    """TLS settings (``email.tls``)."""

    ca_file: Path | None = Field(default=None, alias="ca-file")
    verify: bool = True
    allow_insecure: bool = Field(default=False, alias="allow-insecure")


class RetentionOptions(_Model):
    """How long emailmw emails stay in the folder (``email.retention``), applied by
    ``emailmw prune`` and :meth:`~emailmw.Context.prune`: ``max-age`` in seconds
    (by ``Source-Timestamp``) and/or ``max-count`` (the newest N per topic)."""

    max_age: float | None = Field(
        default=None, alias="max-age", gt=0, le=_MAX_RETENTION_AGE, allow_inf_nan=False
    )
    max_count: int | None = Field(
        default=None, alias="max-count", ge=1, le=_MAX_RETENTION_COUNT, strict=True
    )


class Options(_Model):
    """emailmw configuration: the ``email:`` section of ``email.yml``.

    ``Options(intraprocess=True)`` is a complete configuration for one process
    with no mail server. Field names are the YAML keys with ``-`` turned into
    ``_``; both spellings are accepted. An invalid value raises
    :class:`~emailmw.ConfigError` whose message and ``key`` name the key.
    """

    user: UserOptions | None = None
    recipients: RecipientsOptions = Field(default_factory=RecipientsOptions)
    polling_period: int = Field(
        default=100_000_000, alias="polling-period", ge=0, le=_MAX_POLLING_PERIOD_NS, strict=True
    )
    intraprocess: bool = False
    receive_mode: Literal["auto", "idle", "poll"] = Field(default="auto", alias="receive-mode")
    mailbox: str = "INBOX"
    tls: TlsOptions = Field(default_factory=TlsOptions)
    password_file: Path | None = Field(default=None, alias="password-file")
    from_address: str | None = Field(default=None, alias="from")
    timeout: float = Field(default=10.0, gt=0, le=_MAX_TIMEOUT, allow_inf_nan=False)
    send_timeout: float = Field(
        default=30.0, alias="send-timeout", gt=0, le=_MAX_TIMEOUT, allow_inf_nan=False
    )
    #: how many SMTP connections carry the sends (see :mod:`emailmw.transport.smtp_pool`)
    smtp_connections: int = Field(
        default=1, alias="smtp-connections", ge=1, le=_MAX_SMTP_CONNECTIONS, strict=True
    )
    reorder_window: float = Field(
        default=5.0, alias="reorder-window", ge=0, le=_MAX_REORDER_WINDOW, allow_inf_nan=False
    )
    queue_depth: int = Field(
        default=10_000, alias="queue-depth", ge=1, le=_MAX_QUEUE_DEPTH, strict=True
    )
    history_depth: int = Field(
        default=100, alias="history-depth", ge=0, le=_MAX_QUEUE_DEPTH, strict=True
    )
    #: where durable subscriptions keep their state (None: :func:`default_state_dir`)
    state_dir: Path | None = Field(default=None, alias="state-dir")
    max_message_size: int = Field(
        default=25 * 1024 * 1024,
        alias="max-message-size",
        ge=1,
        le=_MAX_MESSAGE_SIZE_LIMIT,
        strict=True,
    )
    signing_key: SecretStr | None = Field(default=None, alias="signing-key")
    signing_key_file: Path | None = Field(default=None, alias="signing-key-file")
    max_age: float = Field(
        default=24 * 3600.0, alias="max-age", gt=0, le=_MAX_MAX_AGE, allow_inf_nan=False
    )
    allowed_senders: list[str] = Field(default_factory=list, alias="allowed-senders")
    retention: RetentionOptions = Field(default_factory=RetentionOptions)
    wire_format: Literal["emailmw", "rmw-email"] = Field(default="emailmw", alias="wire-format")
    token_provider: Callable[[], str] | None = Field(
        default=None, alias="token-provider", exclude=True, repr=False
    )
    #: serve the metrics over HTTP on this port (needs ``emailmw[metrics]``; 0: any free port)
    metrics_port: int | None = Field(
        default=None, alias="metrics-port", ge=0, le=65535, strict=True
    )
    metrics_address: str = Field(default="127.0.0.1", alias="metrics-address", min_length=1)

    def __init__(self, /, **data: Any) -> None:
        """Validate the keyword arguments; a bad value raises :class:`ConfigError`
        naming its key, as a bad config file does."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(exc, _SOURCE.get()) from None
        self._check_from_fallback()

    def _check_from_fallback(self) -> None:
        """Without ``from``, the SMTP sender writes ``From`` from the username (or
        ``username@smtp-host``): that address must then be ASCII."""
        if self.intraprocess or self.user is None or self.from_address is not None:
            return
        username = self.user.username
        fallback = username if "@" in username else f"{username or 'emailmw'}@{self.user.smtp.host}"
        if not fallback.isascii():
            source = _SOURCE.get()
            raise ConfigError(
                f"email.user.username: {fallback!r} is the From address because email.from "
                f"is not set, and it is not ASCII: {_NOT_ASCII_ADDRESS}; set email.from "
                f"(in {source})",
                key="email.user.username",
                path=None if source == _KEYWORDS else source,
            )

    @field_validator("allowed_senders", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("allowed_senders")
    @classmethod
    def _check_senders(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not entry.isascii():
                raise ValueError(f"{entry!r} is not ASCII: {_NOT_ASCII_ADDRESS}")
            if not entry.strip().lstrip("@"):
                raise ValueError(f"{entry!r} is neither an address nor a domain")
        return value

    @field_validator("from_address")
    @classmethod
    def _check_from(cls, value: str | None) -> str | None:
        if value is not None:
            _check_address(value)
        return value

    @field_validator("mailbox")
    @classmethod
    def _check_mailbox(cls, value: str) -> str:
        if not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("mailbox must be a non-empty name without control characters")
        return value

    @model_validator(mode="after")
    def _check_user(self) -> Options:
        if not self.intraprocess and self.user is None:
            raise ValueError("user: field required unless intraprocess is true")
        return self

    @model_validator(mode="after")
    def _check_auth(self) -> Options:
        user = self.user
        auth = "password" if user is None else user.auth
        command = None if user is None else user.token_command
        if auth == "password":
            if command is not None:
                raise ValueError(
                    "user.token-command: only used with user.auth: xoauth2 or oauthbearer "
                    "(user.auth is password)"
                )
            if self.token_provider is not None:
                raise ValueError(
                    "token_provider: only used with user.auth: xoauth2 or oauthbearer "
                    "(user.auth is password)"
                )
            return self
        assert user is not None
        if command is None and self.token_provider is None:
            raise ValueError(
                f"user.auth: {auth} needs user.token-command (a command that prints an "
                "access token) or Options(token_provider=...)"
            )
        if command is not None and self.token_provider is not None:
            raise ValueError(
                "user.token-command: give either user.token-command or token_provider, not both"
            )
        if user.password is not None or self.password_file is not None:
            key = "user.password" if user.password is not None else "password-file"
            raise ValueError(f"{key}: not used with user.auth: {auth} (remove it)")
        return self

    # -- secrets -----------------------------------------------------------------

    def resolve_password(self) -> str | None:
        """The password: ``user.password``, else ``password-file``, else ``$EMAILMW_PASSWORD``.

        Raises :class:`ConfigError` naming the source (never quoting the content)
        when the password is not valid UTF-8 text or its file cannot be read.
        """
        if self.user is not None and self.user.password is not None:
            value = self.user.password.get_secret_value()
            key = "email.user.password"
        elif self.password_file is not None:
            text = _text_secret(_read_secret_file(self.password_file, "email.password-file"))
            if text is None:
                raise ConfigError(
                    f"email.password-file: {self.password_file} is not UTF-8 text",
                    key="email.password-file",
                )
            value = text.strip()
            key = "email.password-file"
        else:
            env = os.environ.get(PASSWORD_ENV)
            if env is None:
                return None
            value, key = env, f"${PASSWORD_ENV}"
            del env
        if _SURROGATE.search(value) is not None:
            del value  # the traceback keeps this frame's variables
            raise ConfigError(f"{key}: the password is not valid UTF-8 text", key=key)
        return value

    def resolve_signing_key(self) -> bytes | None:
        """The signing key: ``signing-key``, else ``signing-key-file``, else
        ``$EMAILMW_SIGNING_KEY``; ``None`` when none is set.

        A key file that is UTF-8 text is stripped of surrounding white space (so
        ``echo key > file`` works); any other file is the key as it is, byte for
        byte (``head -c 32 /dev/urandom > file``). Raises :class:`ConfigError`,
        naming the source and never quoting the key, for an unreadable file, a key
        shorter than :data:`MIN_SIGNING_KEY_BYTES` bytes, or an empty
        ``$EMAILMW_SIGNING_KEY``.
        """
        if self.signing_key is not None:
            text = self.signing_key.get_secret_value()
            key = "email.signing-key"
            if _SURROGATE.search(text) is not None:
                del text  # the traceback keeps this frame's variables
                raise ConfigError(f"{key}: the signing key is not valid UTF-8 text", key=key)
            value, text = text.encode("utf-8"), ""
        elif self.signing_key_file is not None:
            key = "email.signing-key-file"
            value = _key_from_file_content(_read_secret_file(self.signing_key_file, key))
        else:
            key = f"${SIGNING_KEY_ENV}"
            if os.supports_bytes_environ:
                env = os.environb.get(os.fsencode(SIGNING_KEY_ENV))
            else:  # pragma: no cover - Windows
                text_env = os.environ.get(SIGNING_KEY_ENV)
                env = None if text_env is None else text_env.encode("utf-8", "surrogatepass")
                del text_env
            if env is None:
                return None
            if not env:
                raise ConfigError(
                    f"{key} is set but empty: unset it to run without signing", key=key
                )
            value = env
            del env
        if len(value) < MIN_SIGNING_KEY_BYTES:
            del value  # the traceback keeps this frame's variables
            raise ConfigError(
                f"{key}: the signing key is shorter than {MIN_SIGNING_KEY_BYTES} bytes "
                "(make one with: head -c 32 /dev/urandom > signing.key)",
                key=key,
            )
        return value

    def token_source(self) -> TokenSource | None:
        """Where OAuth2 access tokens come from (``token_provider``, else
        ``user.token-command``); None with ``user.auth: password``."""
        if self.user is None or self.user.auth == "password":
            return None
        if self.token_provider is not None:
            return TokenSource(self.token_provider, "token_provider")
        assert self.user.token_command is not None  # checked by _check_auth
        return TokenSource(command_provider(self.user.token_command), "user.token-command")

    # -- what each transport gets ------------------------------------------------------

    def smtp_settings(self) -> SmtpSettings:
        """The settings of the SMTP sender (requires ``user``)."""
        user = self._require_user()
        return SmtpSettings(
            server=user.smtp,
            username=user.username,
            password=self.resolve_password,
            auth=user.auth,
            token=self.token_source(),
            from_address=self.from_address,
            recipients=EmailRecipients(
                to=list(self.recipients.to),
                cc=list(self.recipients.cc),
                bcc=list(self.recipients.bcc),
            ),
            tls=self._tls_settings(),
            timeout=self.timeout,
            send_timeout=self.send_timeout,
            max_message_size=self.max_message_size,
            wire_format=self.wire_format,
        )

    def imap_settings(self) -> ImapSettings:
        """The settings of the IMAP receiver (requires ``user``)."""
        user = self._require_user()
        return ImapSettings(
            server=user.imap,
            username=user.username,
            password=self.resolve_password,
            auth=user.auth,
            token=self.token_source(),
            mailbox=self.mailbox,
            receive_mode=self.receive_mode,
            polling_period=self.polling_period / 1e9,
            tls=self._tls_settings(),
            timeout=self.timeout,
            max_message_size=self.max_message_size,
        )

    def _tls_settings(self) -> TlsSettings:
        return TlsSettings(self.tls.ca_file, self.tls.verify, self.tls.allow_insecure)

    def _require_user(self) -> UserOptions:
        if self.user is None:
            raise ConfigError("email.user: field required for SMTP/IMAP", key="email.user")
        return self.user

    # -- loading -----------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>") -> Options:
        """Build from the parsed YAML document (a mapping with an ``email`` key)."""
        if not isinstance(data, dict) or "email" not in data:
            raise ConfigError(
                f"{source}: email: field required (top-level key)", key="email", path=source
            )
        section = data["email"]
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: email: must be a mapping", key="email", path=source)
        extra = sorted(set(data) - {"email"})
        if extra:
            raise ConfigError(
                f"{source}: {extra[0]}: unknown top-level key", key=extra[0], path=source
            )
        # model_validate() runs __init__ above, which names the source in its error.
        token = _SOURCE.set(source)
        try:
            return cls.model_validate(section)
        finally:
            _SOURCE.reset(token)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Options:
        """Read and validate a YAML config file."""
        source = os.fspath(path)
        problem = None
        try:
            with open(source, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except FileNotFoundError:
            problem = f"config file not found: {source}"
        except UnicodeDecodeError as exc:
            # Not raised here: the decoding error (it holds the file's bytes, secrets
            # included) would be the new error's __context__.
            problem = f"config file {source} is not UTF-8 text (at byte {exc.start})"
        except OSError as exc:
            problem = f"cannot read config file {source}: {exc}"
        except yaml.YAMLError as exc:
            problem = f"{source}: not valid YAML: {exc}"
        except RecursionError:
            problem = f"{source}: not valid YAML: nested too deeply"
        if problem is not None:
            raise ConfigError(problem, path=source)
        logger.debug("loaded config from %s", source)
        return cls.from_dict(data, source=source)._relative_to(Path(source).parent)

    def _relative_to(self, base: Path) -> Options:
        """Resolve relative file paths in the config against ``base`` (the file's folder)."""

        def fix(path: Path | None) -> Path | None:
            return path if path is None or path.is_absolute() else base / path

        return self.model_copy(
            update={
                "password_file": fix(self.password_file),
                "signing_key_file": fix(self.signing_key_file),
                "state_dir": fix(self.state_dir),
                "tls": self.tls.model_copy(update={"ca_file": fix(self.tls.ca_file)}),
            }
        )

    def resolved_state_dir(self) -> Path:
        """``state-dir``, else ``$XDG_STATE_HOME/emailmw``, else ``~/.local/state/emailmw``."""
        return self.state_dir if self.state_dir is not None else default_state_dir()

    @classmethod
    def find_file(cls) -> Path | None:
        """The config file :meth:`load` uses: ``$EMAIL_CONFIG_FILE``, else ``./email.yml``,
        else ``~/email.yml``."""
        env = os.environ.get(CONFIG_FILE_ENV)
        if env:
            return Path(env)
        for candidate in (Path.cwd() / _CONFIG_FILE_NAME, Path.home() / _CONFIG_FILE_NAME):
            if candidate.is_file():
                return candidate
        return None

    @classmethod
    def load(cls) -> Options:
        """Find the config file (see :meth:`find_file`) and read it."""
        path = cls.find_file()
        if path is None:
            raise ConfigError(
                f"no config file: set {CONFIG_FILE_ENV}, or create ./{_CONFIG_FILE_NAME} "
                f"or ~/{_CONFIG_FILE_NAME}"
            )
        return cls.from_file(path)


def _read_secret_file(path: Path, key: str) -> bytes:
    """The bytes of a secret file; :class:`ConfigError` naming ``key`` and the file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_SECRET_FILE + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{key}: cannot read {path}: {reason}", key=key) from None
    if len(data) > _MAX_SECRET_FILE:
        del data  # the traceback keeps this frame's variables
        raise ConfigError(
            f"{key}: {path} is larger than {_MAX_SECRET_FILE // 1024} KiB: not a secret file",
            key=key,
        )
    return data


def _text_secret(data: bytes) -> str | None:
    """``data`` decoded as UTF-8, or ``None``. Never raises: an exception raised while
    handling a decoding error would carry that error, and it holds ``data``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _key_from_file_content(data: bytes) -> bytes:
    """A signing key file's key: text (UTF-8 without control characters inside) is
    stripped of surrounding white space; anything else is taken byte for byte."""
    text = _text_secret(data)
    if text is None:
        return data
    text = text.strip()
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return data
    return text.encode("utf-8")


#: Where the values being validated come from, for error messages.
_KEYWORDS = "Options(...)"
#: "user.token-command: message": a model check's message that starts with its key
_NAMED_PROBLEM = re.compile(r"(?P<key>[a-z][a-z_.-]*): (?P<message>.+)\Z", re.DOTALL)
_SOURCE: ContextVar[str] = ContextVar("emailmw_options_source", default=_KEYWORDS)


def _config_error(exc: ValidationError, source: str) -> ConfigError:
    problems = []
    first_key = None
    for err in exc.errors(include_url=False, include_input=False):
        key = ".".join(["email", *(str(p) for p in err["loc"])])
        first_key = first_key or key
        message = str(err["msg"])
        if err["type"] == "missing":
            message = "field required"
        elif err["type"] == "extra_forbidden":
            message = "unknown key"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if not err["loc"]:  # a check of several keys names the one at fault first
            named = _NAMED_PROBLEM.match(message)
            if named is not None:
                key, message = f"email.{named['key']}", named["message"]
                first_key = key if first_key == "email" else first_key
        if "user: field required" in message:
            key, message = "email.user", "field required unless intraprocess is true"
            first_key = key if first_key == "email" else first_key
        problems.append(f"{key}: {message}")
    text = "; ".join(problems)
    path = None if source == _KEYWORDS else source
    return ConfigError(f"{text} (in {source})", key=first_key, path=path)
