"""TCP exports over mutual TLS, judged by the real clients (nbdinfo, nbdcopy, qemu-img over libnbd/QEMU's
GnuTLS) and our own client: certificates from `qwamos tls`, a client without a valid certificate refused,
options before STARTTLS refused, plain TCP only with --insecure-no-tls, and the TLS reply path byte-identical
under pipelining.  The two-host proof (QEMU booting the guest across network namespaces) is
tests/test_nbd_tls_netns.py."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
from pathlib import Path

import pytest

from nbd_helpers import serving, uri
from qwamos.nbd import constants as c
from qwamos.nbd import tls
from qwamos.nbd.client import NBDClient, NBDClientError
from tls_helpers import make_certs, nbds_uri, qemu_tls_opts, serving_tcp

pytestmark = pytest.mark.qemu

SIZE = 64 << 20


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path / "pki")


def run(*argv: str, ok: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if ok:
        assert res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"
    return res


def mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


# --- the certificate directory ------------------------------------------------------------------------------


def test_tls_init_and_client_lay_out_qemu_x509_dirs_private_whatever_the_umask(tmp_path):
    import sys

    d = tmp_path / "a" / "tls"
    cli = [sys.executable, "-m", "qwamos.cli.main", "tls"]
    res = subprocess.run(
        ["sh", "-c", 'umask 000 && exec "$@"', "sh", *cli, "init", "--dir", str(d), "--host", "storage.example"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    res = subprocess.run(
        ["sh", "-c", 'umask 000 && exec "$@"', "sh", *cli, "client", "vmhost1", "--dir", str(d), "--json"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    out = Path(info["dir"])
    assert out == d / "clients" / "vmhost1" and info["subject"] == "vmhost1"
    assert {p.name for p in d.iterdir()} == {
        "ca-cert.pem",
        "ca-key.pem",
        "server-cert.pem",
        "server-key.pem",
        "clients",
    }
    assert {p.name for p in out.iterdir()} == {"ca-cert.pem", "client-cert.pem", "client-key.pem"}
    for p in (tmp_path / "a", d, d / "clients", out):
        assert mode(p) == 0o700, p
    for p in (d / "ca-key.pem", d / "server-key.pem", out / "client-key.pem"):
        assert mode(p) == 0o600, p
    # again: refused, nothing replaced (a new CA would orphan every client certificate issued)
    before = (d / "ca-key.pem").read_bytes()
    res = subprocess.run([*cli, "init", "--dir", str(d), "--host", "x"], capture_output=True, text=True)
    assert res.returncode == 30 and "already holds a CA" in res.stderr
    res = subprocess.run([*cli, "client", "vmhost1", "--dir", str(d)], capture_output=True, text=True)
    assert res.returncode == 30 and "already holds a client certificate" in res.stderr
    assert (d / "ca-key.pem").read_bytes() == before


def test_server_key_readable_by_others_is_refused(certs):
    os.chmod(certs.server / tls.SERVER_KEY, 0o644)
    with pytest.raises(Exception, match="chmod 600"):
        tls.server_tls(certs.server)


# --- plain TCP only on explicit request ---------------------------------------------------------------------


def test_tcp_without_tls_is_refused_before_the_volume_is_opened(qvol):
    vol, ks = qvol
    from nbd_helpers import SERVE, SERVE_CLI

    for entry in (SERVE, SERVE_CLI):
        res = subprocess.run(
            [*entry, str(vol), "--keystore", str(ks), "--tcp", "0"], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 2 and "--tls-dir" in res.stderr and "--insecure-no-tls" in res.stderr


def test_the_library_refuses_a_plain_tcp_export_unless_told(tmp_path):
    from qwamos.blockdev import FileBackend
    from qwamos.errors import ExportError
    from qwamos.nbd.server import ExportServer

    img = tmp_path / "raw.img"
    img.write_bytes(bytes(1 << 20))
    backend = FileBackend(str(img))
    try:
        with pytest.raises(ExportError, match="needs TLS"):
            ExportServer(backend, tcp=("127.0.0.1", 0))
        ExportServer(backend, tcp=("127.0.0.1", 0), insecure_tcp=True)  # told: allowed (and warned by the CLI)
    finally:
        backend.close()


def test_insecure_no_tls_serves_plain_tcp_with_a_loud_warning_even_on_loopback(qvol):
    vol, ks = qvol
    for addr in ("0", "0.0.0.0:0"):
        with serving_tcp(["--keystore", str(ks)], vol, "--tcp", addr, "--read-only", "--insecure-no-tls") as (
            _proc,
            port,
            text,
            _log,
        ):
            assert "WARNING" in text and "without TLS" in text and "every local user" in text
            with NBDClient.connect_tcp("127.0.0.1", port) as cl:
                assert cl.info.size == SIZE


# --- mutual TLS --------------------------------------------------------------------------------------------


def test_tls_export_admits_only_clients_of_our_ca(qvol, certs):
    vol, ks = qvol
    with serving_tcp(["--keystore", str(ks)], vol, "--tcp", "127.0.0.1:0", "--tls-dir", str(certs.server)) as (
        proc,
        port,
        text,
        log,
    ):
        assert "WARNING" not in text and f"tls:127.0.0.1:{port}" in text
        # libnbd (GnuTLS) with our client certificate
        info = json.loads(run("nbdinfo", "--json", nbds_uri("127.0.0.1", port, certs.client)).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == SIZE
        # QEMU (GnuTLS, tls-creds-x509)
        obj, bd = qemu_tls_opts("127.0.0.1", port, certs.client)
        assert f"virtual size: 64 MiB ({SIZE} bytes)" in run("qemu-img", "info", *obj, "--image-opts", bd).stdout
        # refused: no certificate at all, a certificate from another CA, plain NBD, plain libnbd
        for bad in (certs.no_cert, certs.foreign):
            res = run("nbdinfo", "--size", nbds_uri("127.0.0.1", port, bad), ok=False)
            assert res.returncode != 0 and not res.stdout
            obj, bd = qemu_tls_opts("127.0.0.1", port, bad)
            res = run("qemu-img", "info", *obj, "--image-opts", bd, ok=False)
            assert res.returncode != 0 and "virtual size" not in res.stdout
        res = run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}", ok=False)
        assert res.returncode != 0 and not res.stdout
        with pytest.raises(NBDClientError) as e:
            NBDClient.connect_tcp("127.0.0.1", port)
        assert f"0x{c.REP_ERR_TLS_REQD:x}" in str(e.value)
        # our own client, a write and read back through TLS
        ctx = tls.client_context(certs.client)
        with NBDClient.connect_tcp("127.0.0.1", port, tls=ctx) as cl:
            cl.write(8192, b"\x5a" * 4096)
            assert cl.read(8192, 4096) == b"\x5a" * 4096
        for bad in (certs.no_cert, certs.foreign):
            with (
                pytest.raises((ssl.SSLError, OSError, NBDClientError)),
                NBDClient.connect_tcp("127.0.0.1", port, tls=tls.client_context(bad)) as cl,
            ):
                cl.read(0, 4096)  # TLS 1.3: the server's verdict on our certificate comes after the handshake
        # a client checking the server against another CA refuses it (the server proves itself too)
        evil = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        evil.load_verify_locations(cafile=certs.foreign.parent / "evil-ca" / tls.CA_CERT)
        with pytest.raises(ssl.SSLCertVerificationError):
            NBDClient.connect_tcp("127.0.0.1", port, tls=evil)
        assert proc.poll() is None  # refusals never hurt the server
    # refused by the TLS handshake itself (CERT_REQUIRED against our CA), not only by a later check
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in log[0] and "CERTIFICATE_VERIFY_FAILED" in log[0], log[0]
    assert "not allowed" not in log[0]


def test_tls_allow_admits_only_named_clients(qvol, certs):
    vol, ks = qvol
    with serving_tcp(
        ["--keystore", str(ks)],
        vol,
        "--tcp",
        "127.0.0.1:0",
        "--tls-dir",
        str(certs.server),
        "--tls-allow",
        "qemu1",
    ) as (_proc, port, _text, log):
        assert run("nbdinfo", "--size", nbds_uri("127.0.0.1", port, certs.client)).stdout.strip() == str(SIZE)
        res = run("nbdinfo", "--size", nbds_uri("127.0.0.1", port, certs.other), ok=False)
        assert res.returncode != 0 and not res.stdout
    assert "not allowed on this export" in log[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tls_reply_path_is_byte_identical_under_pipelining(qvol, certs, short_dir, tmp_path):
    """nbdcopy (4 connections x 64 requests in flight) and qemu-img convert read the disk over TLS while the
    same export serves it over its UNIX socket in plaintext: every copy equals the data written."""
    vol, ks = qvol
    src = tmp_path / "src.img"
    # every 4 KiB block distinct, so that a reply carrying another request's data cannot match by accident
    pattern = hashlib.shake_256(b"qwamos-tls").digest(1 << 20)
    with open(src, "wb") as f:
        for mib in range(SIZE >> 20):
            block = bytearray(pattern)
            for off in range(0, 1 << 20, 4096):
                block[off : off + 8] = ((mib << 20) + off).to_bytes(8, "little")
            f.write(block)
    sock = short_dir / "s"
    with serving(vol, ks, sock, "--tcp", "127.0.0.1:0", "--tls-dir", str(certs.server)):
        port = _port_of(sock)
        run("nbdcopy", str(src), uri(sock))  # write in plaintext over the UNIX socket
        tls_uri = nbds_uri("127.0.0.1", port, certs.client)
        out1, out2, out3 = tmp_path / "o1.img", tmp_path / "o2.img", tmp_path / "o3.img"
        run("nbdcopy", "--connections=4", "--requests=64", "--request-size=1048576", tls_uri, str(out1))
        run("nbdcopy", "--connections=1", "--requests=64", "--request-size=65536", tls_uri, str(out2))
        obj, bd = qemu_tls_opts("127.0.0.1", port, certs.client)
        run("qemu-img", "convert", *obj, "-m", "16", "-W", "-O", "raw", "--image-opts", bd, str(out3))
        # and over TLS in the other direction: write through TLS, read back in plaintext
        run("nbdcopy", "--connections=4", "--requests=64", str(src), tls_uri)
        out4 = tmp_path / "o4.img"
        run("nbdcopy", uri(sock), str(out4))
    want = _sha(src)
    assert [_sha(p) for p in (out1, out2, out3, out4)] == [want] * 4


def test_export_status_says_whether_tcp_is_tls():
    from qwamos.cli.export_cmd import render_status

    st = {
        "export": {"socket": "/r/s", "tcp": "192.0.2.1:10809", "tls": True, "size": 4096, "read_only": False},
        **{"pid": 1, "uid": 0, "uptime_s": 1.0, "connections": 0, "max_connections": 8, "requests_served": 0},
        **{"quiesced": False, "quiesce_holds": 0},
    }
    assert "tcp:          192.0.2.1:10809  (mutual TLS)" in render_status(st).splitlines()
    st["export"]["tls"] = False
    assert "PLAINTEXT" in render_status(st)
    st["export"]["tcp"] = None
    assert "tcp:" not in render_status(st)


def _port_of(sock: Path) -> int:
    from qwamos.nbd.control_client import ControlClient

    with ControlClient.for_export(sock) as cc:
        ex = cc.status()["export"]
    assert ex["tls"] is True  # the status says the TCP listener is TLS-only
    return int(ex["tcp"].rsplit(":", 1)[1])
