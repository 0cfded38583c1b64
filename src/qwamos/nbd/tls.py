"""Mutual TLS for TCP exports: the certificate directory (``qwamos tls init`` / ``qwamos tls client``) and the
``ssl`` contexts built from it.  See docs/nbd-export.md "TLS".

A TCP export is reachable by every local user (loopback is not a boundary) and by the network, so it
speaks NBD only inside TLS 1.3 and only to clients holding a certificate issued by our CA (``CERT_REQUIRED``),
optionally narrowed to an allow-list of client names (the certificate's CN, as QEMU's ``tls-authz``).

Directory layout, the one QEMU's ``tls-creds-x509,dir=`` and libnbd's ``--tls-certificates`` read::

    DIR/ca-cert.pem       the CA certificate (0644)           both ends
    DIR/ca-key.pem        the CA private key (0600)           only ``qwamos tls client`` (issuing)
    DIR/server-cert.pem   the server certificate (0644)       the export
    DIR/server-key.pem    its key (0600)                      the export
    DIR/clients/NAME/{ca-cert,client-cert,client-key}.pem     one ready-made client directory per name

Directories are 0700 and key files 0600 whatever the umask; the export refuses a server key that others
can read.  Certificates and keys are made by :mod:`qwamos.crypto` (the only module touching the crypto
library); this module only lays the files out and loads them into Python's ``ssl``.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from qwamos import crypto
from qwamos.errors import ExportError, InvalidArgument
from qwamos.fsutil import atomic_write

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
CLIENTS = "clients"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def default_dir() -> Path:
    """``$QWAMOS_TLS_DIR`` or ``~/.qwamos/tls``."""
    env = os.environ.get("QWAMOS_TLS_DIR")
    return Path(env) if env else Path.home() / ".qwamos" / "tls"


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise InvalidArgument(f"{what} {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return name


def _private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) 0700 whatever the umask; tighten an existing one we own."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(exist_ok=True)
        os.chmod(p, 0o700)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise ExportError(f"{path} belongs to another user; refusing to keep keys there")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _write(path: Path, data: bytes, mode: int) -> None:
    atomic_write(path, data, mode=mode, replace=False)


def init_dir(directory: Path, hosts: tuple[str, ...], *, ca_name: str = "QWAMOS NBD CA") -> dict[str, object]:
    """Make the CA and the server certificate (``hosts`` in its subjectAltName) in ``directory``.

    Refuses a directory that already holds a CA: replacing it would silently orphan every client
    certificate issued so far."""
    if not hosts:
        raise InvalidArgument("give at least one --host (the name or address clients connect to)")
    for h in hosts:
        if not h or "," in h or "/" in h:
            raise InvalidArgument(f"--host {h!r}: expected a host name or an IP address")
    directory = Path(directory)
    _private_dir(directory)
    if (directory / CA_CERT).exists() or (directory / CA_KEY).exists():
        raise ExportError(f"{directory} already holds a CA ({CA_CERT}); use another --dir or remove it first")
    ca_cert, ca_key = crypto.x509_new_ca(ca_name)
    srv_cert, srv_key = crypto.x509_issue(ca_cert, ca_key, hosts[0], server=True, hosts=hosts)
    _write(directory / CA_KEY, ca_key, 0o600)
    _write(directory / SERVER_KEY, srv_key, 0o600)
    _write(directory / CA_CERT, ca_cert, 0o644)
    _write(directory / SERVER_CERT, srv_cert, 0o644)
    return crypto.x509_describe(srv_cert)


def issue_client(directory: Path, name: str, out: Path | None = None) -> tuple[Path, dict[str, object]]:
    """A client certificate with CN ``name``, signed by the CA in ``directory``, written with a copy of the CA
    certificate into ``out`` (default ``directory/clients/NAME``): a directory QEMU and libnbd use as is."""
    _check_name(name, "client name")
    directory = Path(directory)
    try:
        ca_cert = (directory / CA_CERT).read_bytes()
        ca_key = (directory / CA_KEY).read_bytes()
    except FileNotFoundError:
        raise ExportError(f"{directory} holds no CA: run `qwamos tls init --dir {directory}` first") from None
    out = Path(out) if out is not None else directory / CLIENTS / name
    _private_dir(out)
    if (out / CLIENT_KEY).exists() or (out / CLIENT_CERT).exists():
        raise ExportError(f"{out} already holds a client certificate; remove it first to issue a new one")
    cert, key = crypto.x509_issue(ca_cert, ca_key, name, server=False)
    _write(out / CLIENT_KEY, key, 0o600)
    _write(out / CLIENT_CERT, cert, 0o644)
    if not (out / CA_CERT).exists():
        _write(out / CA_CERT, ca_cert, 0o644)
    return out, crypto.x509_describe(cert)


# --- ssl contexts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTLS:
    """What a TCP export needs for TLS: the context (our CA, our certificate, client certificates required)
    and, if given, the client names (certificate CN) allowed in; ``None`` admits any certificate of the CA."""

    context: ssl.SSLContext
    allowed_clients: frozenset[str] | None = None

    def admits(self, peercert: dict | None) -> str | None:
        """The client's name if this certificate may use the export, else None."""
        if not peercert:
            return None
        names = [v for rdn in peercert.get("subject", ()) for k, v in rdn if k == "commonName"]
        name = names[0] if len(names) == 1 else None
        if name is None:
            return None
        if self.allowed_clients is not None and name not in self.allowed_clients:
            return None
        return name


def _readable(path: Path) -> Path:
    if not path.is_file():
        raise ExportError(f"{path} is missing (see `qwamos tls init`)")
    return path


def server_tls(directory: Path, allowed_clients: tuple[str, ...] | None = None) -> ServerTLS:
    """The TLS settings of an export from a directory made by :func:`init_dir`."""
    directory = Path(directory)
    ca, cert, key = (_readable(directory / n) for n in (CA_CERT, SERVER_CERT, SERVER_KEY))
    st = key.stat()
    if stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != os.getuid():
        raise ExportError(f"{key} must belong to you and be readable by you alone (chmod 600)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no client certificate, no connection
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as e:
        raise ExportError(f"cannot load the TLS files in {directory}: {e}") from None
    allowed = None
    if allowed_clients:
        allowed = frozenset(_check_name(n, "--tls-allow") for n in allowed_clients)
    return ServerTLS(ctx, allowed)


def client_context(directory: Path) -> ssl.SSLContext:
    """A client context from a client directory (ca-cert, client-cert, client-key): what QEMU and libnbd do,
    for our own tests and tools.  The server's name is checked against ``server_hostname`` at wrap time."""
    directory = Path(directory)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=_readable(directory / CA_CERT))
    cert, key = directory / CLIENT_CERT, directory / CLIENT_KEY
    if cert.exists():
        ctx.load_cert_chain(cert, key)
    return ctx
