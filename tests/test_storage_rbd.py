"""``.qvol`` volumes on Ceph RBD (``rbd:POOL/IMAGE``), against a real one-node cluster (tests/ceph_helpers.py).

The byte layout is the file's: ``rbd export`` gives a .qvol file and ``rbd import`` of one gives an RBD volume.
Every test uses its own image name; the cluster is shared by the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import processes
from nbd_helpers import serve_cli, serving, uri
from qwamos.cli.main import main
from qwamos.errors import VolumeLockedError
from qwamos.nbd.client import NBDClient
from qwamos.storage import open_storage
from qwamos.volume import PQCVolume

GIB = 1 << 30
MIB = 1 << 20


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "ks"))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    return tmp_path


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


def test_cli_create_info_check_dump_and_sparse(ceph_cluster, env, capsys):
    loc = "rbd:rbd/cli-a"
    conf = str(ceph_cluster.conf)
    assert (
        main(["volume", "create", loc, "--size", "10G", "--json", "--ceph-conf", conf, "--ceph-id", "admin"]) == 0
    )
    created = _json(capsys)
    assert created["size_bytes"] == 10 * GIB
    # An unwritten 10 GiB volume uses its two header objects (first and last 4 MiB object) and nothing else.
    assert ceph_cluster.used_bytes("cli-a") <= 8 * MIB
    assert main(["volume", "info", loc, "--json", "--ceph-conf", conf]) == 0
    info = _json(capsys)
    assert info["key_id"] == created["key_id"] and info["allocated_blocks"] == 0

    from qwamos.keystore import PQCKeystore

    with PQCVolume(loc, keystore=PQCKeystore()) as v:
        v.write(5 * GIB, _pattern(64 * 1024, 1))
    assert main(["volume", "check", loc, "--json"]) == 0  # CEPH_CONF from the environment
    assert _json(capsys)["ok"] is True
    assert ceph_cluster.used_bytes("cli-a") <= 12 * MIB
    assert main(["volume", "dump-header", loc, "--json"]) == 0
    assert _json(capsys)["volume_uuid"] == info["volume_uuid"]
    assert main(["volume", "repair", loc, "--dry-run", "--json"]) == 0
    # An existing image is refused without --force; a missing pool or bad location is a clear error.
    assert main(["volume", "create", loc, "--size", "1M"]) == 16
    assert main(["volume", "info", "rbd:nopool/x"]) != 0
    assert "nopool" in capsys.readouterr().err


def test_api_roundtrip_export_import(ceph_cluster, keys, tmp_path):
    loc = "rbd:rbd/api-a"
    PQCVolume(loc, keystore=keys).create("api", "vm1", size_bytes=64 * MIB)
    writes = {0: _pattern(8192, 3), 10 * MIB + 100: _pattern(40960, 5), 64 * MIB - 4096: _pattern(4096, 9)}
    with PQCVolume(loc, keystore=keys) as v:
        for off, data in writes.items():
            v.write(off, data)
        v.write(20 * MIB, _pattern(4 * MIB, 7))
        v.discard(20 * MIB, 4 * MIB)  # zeros on the image (rbd_write_zeroes), whole objects freed
        writes[20 * MIB] = bytes(4 * MIB)
    with PQCVolume(loc, keystore=keys, read_only=True) as v:
        for off, data in writes.items():
            assert v.read(off, len(data)) == data
        assert v.check() == []

    # rbd export: the image's bytes are a valid .qvol file.
    f = tmp_path / "exported.qvol"
    ceph_cluster.rbd("export", "rbd/api-a", str(f))
    with PQCVolume(f, keystore=keys) as v:
        assert v.check() == []
        for off, data in writes.items():
            assert v.read(off, len(data)) == data
        v.write(30 * MIB, _pattern(4096, 11))
    # rbd import of a .qvol file: a valid RBD volume.
    ceph_cluster.rbd("import", str(f), "rbd/api-imp")
    with PQCVolume("rbd:rbd/api-imp", keystore=keys) as v:
        assert v.check() == []
        assert v.read(30 * MIB, 4096) == _pattern(4096, 11)
        assert v.read(0, 8192) == writes[0]
    # The bytes are the same either way.
    back = tmp_path / "back.qvol"
    ceph_cluster.rbd("export", "rbd/api-imp", str(back))
    assert back.read_bytes() == f.read_bytes()


def test_tampering_on_the_cluster_is_detected_and_repaired(ceph_cluster, env, tmp_path, monkeypatch, capsys):
    """A bit flipped in a block on the cluster fails authentication; ``volume repair --zero-bad`` saves its
    report in the current directory (an image has no directory beside it) and empties that block only."""
    from qwamos.keystore import PQCKeystore

    keys = PQCKeystore()
    loc = "rbd:rbd/tamper-a"
    PQCVolume(loc, keystore=keys).create("t", "", size_bytes=4 * MIB)
    with PQCVolume(loc, keystore=keys) as v:
        v.write(0, _pattern(3 * 4096, 2))
    s = open_storage(loc)
    s.lock(shared=False)
    byte = s.read(4096 + 4128 + 100, 1)
    s.write(4096 + 4128 + 100, (bytes([byte[0] ^ 1]),))
    s.close()
    with PQCVolume(loc, keystore=keys, read_only=True) as v:
        assert v.check() == [1]
    monkeypatch.chdir(tmp_path)
    assert main(["volume", "repair", loc, "--zero-bad", "--json"]) == 0
    report = _json(capsys)
    assert report["bad_blocks"] == [1] and (tmp_path / Path(report["report_file"]).name).exists()
    with PQCVolume(loc, keystore=keys, read_only=True) as v:
        assert v.check() == [] and v.read(0, 3 * 4096) == _pattern(4096, 2) + bytes(4096) + _pattern(4096, 2)


def test_second_writer_refused_naming_the_holder(ceph_cluster, keys):
    loc = "rbd:rbd/lock-a"
    PQCVolume(loc, keystore=keys).create("l", "", size_bytes=4 * MIB)
    with PQCVolume(loc, keystore=keys) as first:
        first.write(0, b"\1" * 4096)
        with pytest.raises(VolumeLockedError, match=r"client\.\d+.*volume serve --break-lock`, or `rbd lock rm`"):
            PQCVolume(loc, keystore=keys).open()  # how to break it, with the commands that can
        with pytest.raises(VolumeLockedError, match=r"client\.\d+"):
            PQCVolume(loc, keystore=keys, read_only=True).open()
        first.write(4096, b"\2" * 4096)  # the refused writer took nothing from the holder
        first.flush()
    with PQCVolume(loc, keystore=keys) as again:  # released on close
        assert again.read(0, 8192) == b"\1" * 4096 + b"\2" * 4096


def test_serve_with_qemu_img_and_nbdcopy(ceph_cluster, env, short_dir, tmp_path):
    loc = "rbd:rbd/serve-a"
    ks = env / "ks"
    assert main(["volume", "create", loc, "--size", "16M", "--keystore", str(ks)]) == 0
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(16 * MIB))
    sock = short_dir / "s.sock"
    with serving(loc, ks, sock):
        subprocess.run(
            ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri(sock)], check=True, timeout=120
        )
        out = tmp_path / "out.raw"
        subprocess.run(["nbdcopy", uri(sock), str(out)], check=True, timeout=120)
    assert out.read_bytes() == src.read_bytes()
    assert main(["volume", "check", loc, "--keystore", str(ks)]) == 0


def test_kill9_of_the_export_loses_no_flushed_write(ceph_cluster, env, short_dir):
    loc = "rbd:rbd/kill-a"
    ks = env / "ks"
    assert main(["volume", "create", loc, "--size", "8M", "--keystore", str(ks)]) == 0
    sock = short_dir / "k.sock"
    proc = serve_cli(loc, ks, sock)
    try:
        c = NBDClient.connect_unix(str(sock))
        c.write(0, _pattern(64 * 1024, 4))
        c.write(1 * MIB, _pattern(4096, 6))
        c.flush()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        processes.stop(proc, signal.SIGKILL)
        proc.stdout.close()
        proc.stderr.close()
    # The dead export still holds the image's lock: refused, naming it, until an operator breaks it.
    from qwamos.keystore import PQCKeystore

    with pytest.raises(VolumeLockedError, match=r"client\.\d+"):
        PQCVolume(loc, keystore=PQCKeystore(ks), read_only=True).open()
    locks = json.loads(ceph_cluster.rbd("lock", "ls", "--format", "json", "rbd/kill-a").stdout)
    for lk in locks:
        ceph_cluster.rbd("lock", "rm", "rbd/kill-a", lk["id"], lk["locker"])
    with PQCVolume(loc, keystore=PQCKeystore(ks), read_only=True) as v:
        assert v.read(0, 64 * 1024) == _pattern(64 * 1024, 4)
        assert v.read(1 * MIB, 4096) == _pattern(4096, 6)
        assert v.check() == []


def _watchers(ceph_cluster, image: str) -> str:
    image_id = json.loads(ceph_cluster.rbd("info", "--format", "json", f"rbd/{image}").stdout)["id"]
    out = subprocess.run(
        ["rados", "--conf", str(ceph_cluster.conf), "-p", "rbd", "listwatchers", f"rbd_header.{image_id}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def test_a_dead_holders_lock_is_broken_only_explicitly(ceph_cluster, env, short_dir):
    """librbd would break a dead writer's lock by itself once the cluster expired the writer's watch (and
    blocklist it): we refuse any holder, dead or not, and break only on --break-lock (storage/rbd.py)."""
    loc, image = "rbd:rbd/dead-a", "dead-a"
    ks = env / "ks"
    assert main(["volume", "create", loc, "--size", "8M", "--keystore", str(ks)]) == 0
    sock = short_dir / "d.sock"
    serve = [sys.executable, "-m", "qwamos.cli.main", "volume", "serve", loc, "--socket", str(sock), "--keystore"]
    # The holder's watch expires 5 s after its death instead of 30 (set only while it registers its watch).
    ceph = ["ceph", "--conf", str(ceph_cluster.conf), "config"]
    subprocess.run([*ceph, "set", "osd", "osd_client_watch_timeout", "5"], check=True, timeout=60)
    proc = processes.spawn([*serve, str(ks)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        from nbd_helpers import wait_answers

        wait_answers(sock, proc)
        subprocess.run([*ceph, "rm", "osd", "osd_client_watch_timeout"], check=True, timeout=60)
        c = NBDClient.connect_unix(str(sock))
        c.write(0, _pattern(8192, 8))
        c.flush()
        assert _watchers(ceph_cluster, image)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        subprocess.run([*ceph, "rm", "osd", "osd_client_watch_timeout"], check=False, timeout=60)
        processes.stop(proc, signal.SIGKILL)
        proc.stdout.close()
        proc.stderr.close()
    from vm_helpers import wait_for

    wait_for(lambda: not _watchers(ceph_cluster, image), 90, "the dead holder's watch to expire")
    # Now librbd's own acquire would break the lock at once; ours refuses, naming the dead holder.
    from qwamos.keystore import PQCKeystore

    with pytest.raises(VolumeLockedError, match=rf"client\.\d+.*pid {proc.pid}\b.*--break-lock"):
        PQCVolume(loc, keystore=PQCKeystore(ks)).open()
    assert json.loads(ceph_cluster.rbd("lock", "ls", "--format", "json", f"rbd/{image}").stdout)
    # volume serve --break-lock: the operator's explicit word; the holder is named and blocklisted.
    breaker = processes.spawn([*serve, str(ks), "--break-lock"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        from nbd_helpers import wait_answers

        wait_answers(sock, breaker)
        c = NBDClient.connect_unix(str(sock))
        assert c.read(0, 8192) == _pattern(8192, 8)
        c.disconnect()
    finally:
        processes.stop(breaker, signal.SIGTERM, grace=20)
        err = breaker.stderr.read().decode()
        breaker.stdout.close()
        breaker.stderr.close()
    assert "broke the lock of client." in err


def test_key_delete_is_refused_while_an_rbd_volume_uses_the_key(ceph_cluster, env, capsys):
    """The keystore's usage records hold rbd: locations too: a record is live while the image holds that
    volume (and while the cluster cannot be asked), so ``key delete`` refuses, naming it."""
    loc = "rbd:rbd/keyuse-a"
    ks = str(env / "ks")
    assert main(["volume", "create", loc, "--size", "4M", "--keystore", ks, "--json"]) == 0
    key_id = _json(capsys)["key_id"]
    assert main(["key", "--keystore", ks, "delete", key_id, "--yes"]) == 28
    assert "rbd:rbd/keyuse-a" in capsys.readouterr().err
    ceph_cluster.rbd("rm", "--no-progress", "rbd/keyuse-a")
    assert main(["key", "--keystore", ks, "delete", key_id, "--yes"]) == 0  # the image is gone: stale


def test_volume_copy_between_a_file_and_the_cluster(ceph_cluster, env, short_dir, capsys):
    """``volume copy``: a file volume to an image and back is the same volume byte for byte (its UUID and key),
    sparse both ways; an existing destination is refused, a served source too (its writer lock), and
    ``--move`` removes the source after the verified copy.  The keystore records where the copies are."""
    from qwamos.keystore import PQCKeystore
    from qwamos.storage import storage_exists

    ks_dir = env / "ks"
    ks = PQCKeystore(ks_dir)
    f = env / "a.qvol"
    PQCVolume(f, keystore=ks).create("a", "", size_bytes=64 * MIB)
    with PQCVolume(f, keystore=ks) as v:
        for off, seed in ((0, 1), (10 * MIB + 4096, 2), (64 * MIB - 8192, 3)):
            v.write(off, _pattern(8192, seed))
        uuid, key_id = v.header.volume_uuid, v.key_id
    loc = "rbd:rbd/copy-a"
    assert main(["volume", "copy", str(f), loc, "--json", "--keystore", str(ks_dir)]) == 0
    out = _json(capsys)
    assert (out["volume_uuid"], out["key_id"], out["moved"]) == (uuid, key_id, False)
    exported = env / "exported.qvol"
    ceph_cluster.rbd("export", "rbd/copy-a", str(exported))
    assert exported.read_bytes() == f.read_bytes()  # every byte, holes included
    assert ceph_cluster.used_bytes("copy-a") <= 5 * 4 * MIB  # the objects holding data and the two headers
    images = set(ceph_cluster.rbd("ls", "rbd").stdout.split())

    # never over an existing volume; a served source is refused (the export holds its writer lock)
    assert main(["volume", "copy", loc, str(f), "--keystore", str(ks_dir)]) == 16
    with serving(loc, ks_dir, short_dir / "s.sock"):
        assert main(["volume", "copy", loc, str(env / "b.qvol"), "--keystore", str(ks_dir)]) == 15
    assert not (env / "b.qvol").exists() and set(ceph_cluster.rbd("ls", "rbd").stdout.split()) == images

    # back to a file, moving: the image goes, the file has the same bytes and stays sparse
    b = env / "b.qvol"
    assert main(["volume", "copy", loc, str(b), "--move", "--keystore", str(ks_dir)]) == 0
    assert not storage_exists(loc) and b.read_bytes() == f.read_bytes()
    assert b.stat().st_blocks * 512 <= MIB
    with PQCVolume(b, keystore=ks, read_only=True) as v:
        assert v.check() == [] and v.read(10 * MIB + 4096, 8192) == _pattern(8192, 2)
    assert sorted(u["path"] for u in ks.key_users(key_id) if u["state"] == "live") == sorted([str(f), str(b)])


def test_volume_copy_holds_the_source_and_leaves_nothing_that_does_not_read_back(
    ceph_cluster, keys, tmp_path, monkeypatch
):
    """While the copy runs, a writer of the source is refused (the copy holds its writer lock).  A destination
    that loses a write (here: a store dropping its second one) fails the comparison: the copy is refused and
    nothing appears at the destination."""
    from qwamos import storage as storage_mod
    from qwamos.errors import VolumeError
    from qwamos.storage import create_storage
    from qwamos.volume.transfer import copy_volume

    def lossy(rest, *, overwrite, random_suffix):
        pending = create_storage(f"rbd:{rest}", overwrite=overwrite, random_suffix=random_suffix)
        store, writes = pending.storage, []
        real = store.write

        def write(offset, bufs):
            writes.append(offset)
            if len(writes) != 2:
                real(offset, bufs)

        store.write = write
        return pending

    monkeypatch.setitem(storage_mod.SCHEMES, "lossy", (storage_mod.SCHEMES["rbd"][0], lossy))
    f = tmp_path / "a.qvol"
    PQCVolume(f, keystore=keys).create("a", "", size_bytes=8 * MIB)
    with PQCVolume(f, keystore=keys) as v:
        v.write(4 * MIB, _pattern(4096, 4))
    seen = []

    def during(done, total):
        with pytest.raises(VolumeLockedError):
            PQCVolume(f, keystore=keys).open()
        seen.append(done)

    copy_volume(f, "rbd:rbd/copy-held", keys, progress=during)
    assert seen
    with pytest.raises(VolumeError, match="differs from the source"):
        copy_volume(f, "lossy:rbd/copy-lossy", keys)
    assert not storage_mod.storage_exists("rbd:rbd/copy-lossy")
    assert not [n for n in ceph_cluster.rbd("ls", "rbd").stdout.split() if n.startswith("copy-lossy")]


def test_cluster_defaults_are_the_rbd_tools(ceph_cluster, env, monkeypatch, capsys):
    """With no ``$CEPH_CONF``, ``--conf`` in ``$CEPH_ARGS`` names the configuration, as for the ``rbd`` tool,
    in this process and in the location pinned for an export (which gets neither variable).  A new volume is
    named after its image, not after its configuration file."""
    from qwamos.keystore import PQCKeystore
    from qwamos.storage import pin_location

    monkeypatch.delenv("CEPH_CONF")
    monkeypatch.setenv("CEPH_ARGS", f"--conf {ceph_cluster.conf} --id admin")
    loc = "rbd:rbd/args-a.qvol"
    assert main(["volume", "create", loc, "--size", "4M", "--json"]) == 0
    assert _json(capsys)["name"] == "args-a"
    with PQCVolume(loc, keystore=PQCKeystore()) as v:
        v.write(0, b"\1" * 4096)
    assert main(["volume", "check", loc, "--json"]) == 0
    assert _json(capsys)["ok"] is True
    assert pin_location(loc) == f"{loc}:conf={ceph_cluster.conf}"
