"""TLS fixtures for the export's tests: a CA with server and client certificates (qwamos.nbd.tls), a second
CA standing for an outsider, and the export served over TCP + TLS as a subprocess."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import processes
from nbd_helpers import SERVE
from qwamos.nbd import tls


@dataclass
class Certs:
    server: Path  # the `qwamos tls init` directory (CA key, server certificate)
    client: Path  # a client directory of our CA (name "qemu1")
    other: Path  # a client of our CA with another name ("intruder")
    foreign: Path  # a client certificate from another CA, with our CA's name for the server check
    no_cert: Path  # only our CA certificate: a client that verifies the server but has no certificate


def make_certs(root: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Certs:
    srv = root / "tls"
    tls.init_dir(srv, hosts)
    client, _ = tls.issue_client(srv, "qemu1")
    other, _ = tls.issue_client(srv, "intruder")
    evil = root / "evil-ca"
    tls.init_dir(evil, hosts)
    foreign, _ = tls.issue_client(evil, "qemu1", root / "foreign")
    (foreign / tls.CA_CERT).write_bytes((srv / tls.CA_CERT).read_bytes())  # trusts our server all the same
    no_cert = root / "no-cert"
    no_cert.mkdir(mode=0o700)
    (no_cert / tls.CA_CERT).write_bytes((srv / tls.CA_CERT).read_bytes())
    return Certs(srv, client, other, foreign, no_cert)


def nbds_uri(host: str, port: int, certs: Path) -> str:
    """libnbd's URI for NBD over TLS with the client files in ``certs`` (nbdinfo, nbdcopy)."""
    h = f"[{host}]" if ":" in host else host
    return f"nbds://{h}:{port}/?tls-certificates={certs}"


def qemu_tls_opts(host: str, port: int, certs: Path, node: str = "d0") -> tuple[list[str], str]:
    """QEMU's ``--object tls-creds-x509`` for ``certs`` and the nbd blockdev options that use it."""
    obj = ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}"]
    blockdev = f"driver=nbd,node-name={node},server.type=inet,server.host={host},server.port={port},tls-creds=tls0"
    return obj, blockdev


@contextlib.contextmanager
def serving_tcp(argv_prefix: list[str], vol: Path, *extra: str, popen_prefix: tuple[str, ...] = ()):
    """Serve ``vol`` (``argv_prefix`` = the keystore options) with ``extra`` options; yields (proc, port,
    announce text, log): ``log`` (a list) receives the rest of the server's stderr once it has stopped.
    ``popen_prefix`` runs the export under a wrapper (``ip netns exec NS``)."""
    proc = processes.spawn(
        [*popen_prefix, *SERVE, str(vol), *argv_prefix, *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    try:
        lines = [proc.stderr.readline()]
        while "Serving" not in lines[-1]:
            assert lines[-1] or proc.poll() is None, f"server exited: {''.join(lines)}"
            lines.append(proc.stderr.readline())
        port = int(lines[-1].rsplit(":", 1)[1])
        yield proc, port, "".join(lines), log
    finally:
        processes.stop(proc, signal.SIGTERM, grace=20)
        log.append(proc.stderr.read())
        proc.stderr.close()
