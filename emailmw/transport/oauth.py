"""OAuth2 access tokens for SASL ``XOAUTH2`` and ``OAUTHBEARER`` (IMAP and SMTP).

A token comes from a :class:`TokenSource`: a Python callable
(``Options(..., token_provider=...)``) or a command whose standard output is
the token (``user.token-command``, see :func:`command_provider`), asked again
on every (re)connect and once more when the server rejects a token (the way
mail clients do it: the first token may have expired since it was cached).

Tokens are secrets: they never go into a log line, a ``repr``, an error message
or an exception's arguments. A failing command is reported with its exit
status and the end of its standard error, never with its standard output.

:func:`sasl_initial_response` builds the client's first message of either
mechanism; :class:`SaslExchange` is the callable that ``smtplib`` and
IMAPClient drive through the exchange, and keeps the server's error challenge
(a JSON object such as ``{"status":"401",...}``) for the error message.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Literal

from emailmw.errors import AuthenticationError

__all__ = [
    "AUTH_METHODS",
    "TOKEN_COMMAND_TIMEOUT",
    "AuthMethod",
    "SaslExchange",
    "TokenSource",
    "command_argv",
    "command_provider",
    "expiry_hint",
    "sasl_initial_response",
    "sasl_mechanism",
]

logger = logging.getLogger(__name__)

#: ``user.auth``: how to log in.
AuthMethod = Literal["password", "xoauth2", "oauthbearer"]
AUTH_METHODS: tuple[AuthMethod, ...] = ("password", "xoauth2", "oauthbearer")
#: How long a token command may run (s): some tools refresh over the network first.
TOKEN_COMMAND_TIMEOUT = 60.0
_STDERR_SHOWN = 500  # characters of a failing command's standard error in its error
_MAX_TOKEN = 16 * 1024  # real tokens are a few KiB at most


def sasl_mechanism(auth: AuthMethod) -> str:
    """The SASL mechanism name of ``auth`` (``XOAUTH2`` or ``OAUTHBEARER``)."""
    if auth == "password":
        raise ValueError("auth 'password' has no OAuth2 SASL mechanism")
    return auth.upper()


def command_argv(command: str | Sequence[str]) -> list[str]:
    """The argument vector of a token command: a string is split the way a POSIX
    shell splits words (:func:`shlex.split`, no shell runs), a list is taken as
    it is. Raises :class:`ValueError` for an empty command or a bad quote."""
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ValueError(f"cannot split the command into words: {exc}") from None
    else:
        argv = list(command)
        if not all(isinstance(word, str) for word in argv):
            raise ValueError("every word of the command must be a string")
    if not argv or not argv[0]:
        raise ValueError("the command is empty")
    return argv


def command_provider(
    command: str | Sequence[str], *, timeout: float = TOKEN_COMMAND_TIMEOUT
) -> Callable[[], str]:
    """A token provider that runs ``command`` (no shell) and returns its standard
    output, stripped of surrounding white space.

    The command gets no standard input and runs for at most ``timeout`` seconds.
    It fails with :class:`~emailmw.AuthenticationError` (exit status and the end
    of its standard error, never its standard output) when it cannot start,
    times out or exits with a status other than 0.
    """
    argv = command_argv(command)
    name = os.path.basename(argv[0])

    def run() -> str:
        what = f"user.token-command ({name})"
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            raise AuthenticationError(f"{what}: no such program: {argv[0]}") from None
        except PermissionError:
            raise AuthenticationError(f"{what}: not allowed to run {argv[0]}") from None
        except subprocess.TimeoutExpired:
            # TimeoutExpired holds what the command printed: it must not be chained
            raise AuthenticationError(
                f"{what}: gave no token within {timeout:g} s; stopped it"
            ) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise AuthenticationError(f"{what}: cannot run {argv[0]}: {reason}") from None
        if done.returncode != 0:
            status = (
                f"killed by signal {-done.returncode}"
                if done.returncode < 0
                else f"exit status {done.returncode}"
            )
            stderr = done.stderr.decode("utf-8", "replace").strip()
            del done  # its stdout may hold a token: out of this frame before raising
            if len(stderr) > _STDERR_SHOWN:
                stderr = "..." + stderr[-_STDERR_SHOWN:]
            detail = f": {stderr}" if stderr else " and printed nothing on standard error"
            raise AuthenticationError(f"{what} failed ({status}){detail}")
        output = done.stdout
        del done
        text = _decode(output)
        del output
        if text is None:
            raise AuthenticationError(f"{what}: its output is not UTF-8 text")
        return text

    return run


def _decode(data: bytes) -> str | None:
    """``data`` as UTF-8 text, or None; never raises (a decoding error holds ``data``)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class TokenSource:
    """Where access tokens come from: ``provider`` (a callable returning one),
    described for error messages as ``origin`` (``user.token-command``,
    ``token_provider``). :meth:`token` checks what it returns."""

    __slots__ = ("_origin", "_provider")

    def __init__(self, provider: Callable[[], str], origin: str) -> None:
        self._provider = provider
        self._origin = origin

    def __repr__(self) -> str:
        return f"<TokenSource from {self._origin}>"

    @property
    def origin(self) -> str:
        """Where the tokens come from, for messages."""
        return self._origin

    def token(self) -> str:
        """A token, fresh from the provider. Raises :class:`~emailmw.AuthenticationError`
        naming the origin (never quoting what it returned) when the provider fails
        or returns something that cannot be a token."""
        try:
            value = self._provider()
        except AuthenticationError:
            raise
        except Exception as exc:
            # the exception is the provider's: name its type only (its text may quote a secret)
            raise AuthenticationError(
                f"{self._origin} failed: {type(exc).__name__} (see the cause)"
            ) from exc
        if isinstance(value, bytes):
            value = _decode(value)
        if not isinstance(value, str):
            kind = type(value).__name__
            del value
            raise AuthenticationError(f"{self._origin} returned a {kind}, not a token (str)")
        value = value.strip()
        problem = _token_problem(value)
        if problem is not None:
            del value  # the traceback keeps this frame's variables
            raise AuthenticationError(f"{self._origin} gave no usable token: {problem}")
        logger.debug("got an access token from %s (%d characters)", self._origin, len(value))
        return value


def _token_problem(token: str) -> str | None:
    """Why ``token`` cannot go into a SASL exchange (described, never quoted), or None."""
    if not token:
        return "the output is empty"
    if len(token) > _MAX_TOKEN:
        return f"{len(token)} characters, more than {_MAX_TOKEN}"
    if not token.isascii() or not token.isprintable():
        return "it holds characters other than printable ASCII"
    if any(c.isspace() for c in token):
        return "it holds white space (print the access token alone, on one line)"
    return None


def sasl_initial_response(mechanism: str, username: str, token: str) -> str:
    """The client's first SASL message: ``XOAUTH2`` (Google's and Microsoft's
    format) or ``OAUTHBEARER`` (RFC 7628, with the username as authzid)."""
    if mechanism == "XOAUTH2":
        return f"user={username}\x01auth=Bearer {token}\x01\x01"
    if mechanism == "OAUTHBEARER":
        authzid = username.replace("=", "=3D").replace(",", "=2C")
        gs2 = f"n,a={authzid}," if authzid else "n,,"
        return f"{gs2}\x01auth=Bearer {token}\x01\x01"
    raise ValueError(f"unknown OAuth2 SASL mechanism {mechanism!r}")


class SaslExchange:
    """The client side of one XOAUTH2/OAUTHBEARER exchange, as the callable that
    :meth:`smtplib.SMTP.auth` and :meth:`imapclient.IMAPClient.sasl_login` drive.

    The first call (no challenge, or an empty one) returns the initial response;
    a later challenge is the server's error report (JSON): it is kept in
    :attr:`error` and answered as the mechanism requires (empty for XOAUTH2,
    ``%x01`` for OAUTHBEARER), after which the server fails the exchange.
    """

    __slots__ = ("_answered", "_initial", "error", "mechanism")

    def __init__(self, mechanism: str, username: str, token: str) -> None:
        self.mechanism = mechanism
        self._initial: str | None = sasl_initial_response(mechanism, username, token)
        self._answered = False
        self.error = ""  #: the server's error challenge, as text

    def __repr__(self) -> str:
        return f"<SaslExchange {self.mechanism}>"

    def __call__(self, challenge: bytes | None = None) -> str:
        """The response to ``challenge`` (see the class docstring)."""
        if not self._answered and not challenge:
            self._answered = True
            initial, self._initial = self._initial or "", None
            return initial
        self._initial = None
        if challenge:
            self.error = " ".join(challenge.decode("utf-8", "replace").split())[:300]
        return "\x01" if self.mechanism == "OAUTHBEARER" else ""

    def describe(self) -> str:
        """What the server said about the token (its error challenge, else nothing)."""
        return f"; the server said {self.error}" if self.error else ""


def expiry_hint(token: str) -> str:
    """`` (it expired N s ago)`` if ``token`` is a JWT whose ``exp`` has passed, else
    ``""``. Reads the claim only (no signature check): it helps explain a refusal."""
    parts = token.split(".")
    if len(parts) != 3:
        return ""
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
        exp = float(claims["exp"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        return ""
    ago = time.time() - exp
    return f" (it expired {ago:.0f} s ago)" if ago > 0 else ""
