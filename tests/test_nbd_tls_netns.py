"""Two hosts on one machine: a storage host serves a qvol over NBD + mutual TLS, a VM host boots the test
guest from it with QEMU (tls-creds-x509) — and clients without a valid certificate are refused there.

The hosts are two network namespaces joined by a veth pair, made by the test (as root) with link-local
addresses (169.254.0.0/16) that only these namespaces hold: nothing leaves the machine, and every link,
namespace and process is torn down in the fixture's finalizer, also when the test fails.  Skipped with the
reason where namespaces cannot be created (not root, no `ip`, no CAP_SYS_ADMIN in a container)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from guestlib import DEFAULT_OFFSET, PAYLOAD_SIZE, RECORD_SIZE, guest_paths, parse_markers, run_guest
from tls_helpers import make_certs, nbds_uri, qemu_tls_opts, serving_tcp

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

ARCH = "x86_64"
SIZE = 64 << 20
PORT = 10809


@dataclass
class Hosts:
    storage: str  # namespace names
    vmhost: str
    storage_addr: str
    vmhost_addr: str

    def on(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    tag = f"{os.getpid() % 100000}"
    h = Hosts(f"qwtls-st-{tag}", f"qwtls-vm-{tag}", "169.254.77.1", "169.254.77.2")
    veth_s, veth_v = f"qwts{tag}", f"qwtv{tag}"
    made: list[str] = []
    try:
        try:
            for ns in (h.storage, h.vmhost):
                _ip("netns", "add", ns)
                made.append(ns)
        except RuntimeError as e:
            pytest.skip(f"cannot create network namespaces here: {e}")
        _ip("link", "add", veth_s, "type", "veth", "peer", "name", veth_v)
        _ip("link", "set", veth_s, "netns", h.storage)
        _ip("link", "set", veth_v, "netns", h.vmhost)
        for ns, dev, addr in ((h.storage, veth_s, h.storage_addr), (h.vmhost, veth_v, h.vmhost_addr)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield h
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and with it the pair
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", ns)


def run_in(ns: list[str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ns, *argv], capture_output=True, text=True, timeout=120)


def test_vm_host_boots_the_guest_from_a_qvol_served_by_the_storage_host_over_mutual_tls(hosts, qvol, tmp_path):
    guest_paths(ARCH)
    vol, ks = qvol
    certs = make_certs(tmp_path / "pki", hosts=(hosts.storage_addr,))
    vmhost = hosts.on(hosts.vmhost)
    marker = f"tls-{os.getpid()}"
    with serving_tcp(
        ["--keystore", str(ks)],
        vol,
        "--tcp",
        f"{hosts.storage_addr}:{PORT}",
        "--tls-dir",
        str(certs.server),
        popen_prefix=tuple(hosts.on(hosts.storage)),
    ) as (server, port, text, log):
        assert f"tls:{hosts.storage_addr}:{PORT}" in text and "WARNING" not in text
        # the VM host: libnbd with our client certificate sees the export; without one, or with a certificate
        # of another CA, it is refused; plain NBD is refused
        res = run_in(vmhost, "nbdinfo", "--size", nbds_uri(hosts.storage_addr, port, certs.client))
        assert res.returncode == 0 and res.stdout.strip() == str(SIZE), res.stderr
        for bad in (certs.no_cert, certs.foreign):
            res = run_in(vmhost, "nbdinfo", "--size", nbds_uri(hosts.storage_addr, port, bad))
            assert res.returncode != 0 and not res.stdout
            obj, bd = qemu_tls_opts(hosts.storage_addr, port, bad)
            res = run_in(vmhost, "qemu-img", "info", *obj, "--image-opts", bd)
            assert res.returncode != 0 and "virtual size" not in res.stdout
        res = run_in(vmhost, "nbdinfo", "--size", f"nbd://{hosts.storage_addr}:{port}")
        assert res.returncode != 0 and not res.stdout

        # QEMU on the VM host boots the guest from the qvol over TLS: it writes its marker ...
        obj, bd = qemu_tls_opts(hosts.storage_addr, port, certs.client)
        disk_args = [*obj, "-blockdev", bd, "-device", "virtio-blk-pci,drive=d0"]
        wrote = parse_markers(
            run_guest(
                ARCH,
                disk_args=disk_args,
                append=f"quiet qwamos.mode=write qwamos.marker={marker}",
                serial_log=tmp_path / "write.log",
                prefix=vmhost,
            )
        )
        assert wrote.get("BOOTED") == ARCH and "ERROR" not in wrote and "DONE" in wrote, wrote
        # ... and, booted again, reads it back
        read = parse_markers(
            run_guest(
                ARCH,
                disk_args=disk_args,
                append="quiet qwamos.mode=read",
                serial_log=tmp_path / "read.log",
                prefix=vmhost,
            )
        )
        assert read.get("MARKER") == marker and read.get("READ") == wrote["WROTE"], read
        assert server.poll() is None
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in log[0] and "CERTIFICATE_VERIFY_FAILED" in log[0], log[0]

    # what the guest wrote is in the encrypted volume (read back here with the volume key)
    from qwamos.keystore import PQCKeystore
    from qwamos.volume import PQCVolume

    v = PQCVolume(vol, keystore=PQCKeystore(ks)).open()
    try:
        record = v.pread(DEFAULT_OFFSET, RECORD_SIZE)
        payload = v.pread(DEFAULT_OFFSET + RECORD_SIZE, PAYLOAD_SIZE)
    finally:
        v.close()
    assert record.startswith(f"QWAMOS-MARKER {marker}\n".encode())
    assert hashlib.sha256(payload).hexdigest() == wrote["WROTE"]
    assert marker.encode() not in vol.read_bytes()  # and on disk it is ciphertext
