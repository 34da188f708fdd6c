"""The dev server's TLS files: a test CA and a server certificate it signed.

:func:`make_certs` runs ``openssl`` once per directory; the files are reused
by every later start on the same root.
"""

from __future__ import annotations

import logging
import pathlib
import secrets
import subprocess
import time
from collections.abc import Sequence

from emailmw.devserver.errors import DevServerError

__all__ = ["make_certs"]

logger = logging.getLogger(__name__)

_SERVER_EXTENSIONS = (
    "basicConstraints = critical, CA:FALSE\n"
    "keyUsage = critical, digitalSignature, keyEncipherment\n"
    "extendedKeyUsage = serverAuth\n"
    "subjectKeyIdentifier = hash\n"
    "authorityKeyIdentifier = keyid, issuer\n"
)


def make_certs(
    directory: pathlib.Path,
    *,
    ca_name: str,
    hosts: Sequence[str] = (),
) -> None:
    """Make a test CA and a server certificate in ``directory`` (which must exist).

    Writes ``ca.pem`` (what clients should trust), ``ca.key``, ``cert.pem`` and
    ``key.pem`` (the server's, for ``localhost``, ``127.0.0.1`` and the IP
    addresses ``hosts``); the keys
    are mode 0600. ``ca_name`` is the CA's common name. Does nothing if
    ``ca.pem``, ``cert.pem`` and ``key.pem`` exist already. Raises
    :class:`DevServerError` with ``openssl``'s error output if it fails.
    """
    if all((directory / name).exists() for name in ("ca.pem", "cert.pem", "key.pem")):
        return
    started = time.monotonic()
    ips = dict.fromkeys(["127.0.0.1", *hosts])  # in order, once each
    alt_names = ", ".join(["DNS:localhost", *(f"IP:{ip}" for ip in ips)])
    (directory / "server.ext").write_text(f"{_SERVER_EXTENSIONS}subjectAltName = {alt_names}\n")
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        ["openssl", "req", "-x509", *new_key, "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "3650", "-subj", f"/CN={ca_name}",
         "-addext", "basicConstraints = critical, CA:TRUE",
         "-addext", "keyUsage = critical, keyCertSign, cRLSign"],
        ["openssl", "req", *new_key, "-keyout", "key.pem", "-out", "server.csr",
         "-subj", "/CN=localhost"],
        ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-set_serial", str(secrets.randbits(63)), "-days", "825",
         "-extfile", "server.ext", "-out", "cert.pem"],
    ]  # fmt: skip
    for argv in commands:
        done = subprocess.run(
            argv, cwd=directory, stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
        if done.returncode != 0:
            raise DevServerError(
                f"{' '.join(argv[:3])} failed", done.stderr.decode("utf-8", "replace")
            )
    for name in ("ca.key", "key.pem"):
        (directory / name).chmod(0o600)
    logger.debug("test CA and server certificate made in %.3f s", time.monotonic() - started)
