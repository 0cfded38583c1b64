"""Key rotation of a volume with snapshots (qwamos.volume.chain_rotation): every layer of the chain --
frozen layers included, branches after a revert included -- re-encrypted under the new key; every view
byte for byte as a model says; the old key opens no slot, header or sealed entry of any layer file; kill -9
anywhere in a chain rotation then the same call resumes; a chain cut short between layers is refused by a
VM start or an export with the command that finishes it; ``volume reencrypt`` and ``key rotate`` (stopped
VM) through the CLI; a served chain refused with nothing changed; links still refuse swapped layers."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qwamos import crypto
from qwamos.errors import HeaderCorruptError, KeyNotFoundError, RotationError, SnapshotChainError, SnapshotError
from qwamos.volume import PQCVolume, read_header, reencrypt_volume
from qwamos.volume import header as hdr
from qwamos.volume import metadata as md
from qwamos.volume.chain_rotation import chain_state
from qwamos.volume.header import BLOCK_SIZE, HEADER_SIZE, SLOT_SIZE
from qwamos.volume.keys import data_key, header_mac_key, metadata_key
from qwamos.volume.snapshots import chain_files, layer_dir, open_chain
from qwamos.volume.unlock import unlock_key

BLOCKS = 48
SIZE = BLOCKS * BLOCK_SIZE


def _write(chain, model: bytearray, rng: random.Random, n: int = 6) -> None:
    for _ in range(n):
        off = rng.randrange(SIZE - 1)
        ln = rng.randrange(1, min(3 * BLOCK_SIZE, SIZE - off) + 1)
        if rng.random() < 0.8:
            data = rng.randbytes(ln)
            chain.pwrite(off, data)
            model[off : off + ln] = data
        else:
            chain.zero(off, ln)
            model[off : off + ln] = bytes(ln)


def build(path: Path, keys, seed: int = 1) -> dict[str | None, bytes]:
    """A chain with three snapshots and a branch: s1, s2, revert to s1, s3 on the branch, more writes.
    Returns the model of every view (None: the volume itself)."""
    rng = random.Random(seed)
    PQCVolume(path, keystore=keys).create("disk", "vm", size_bytes=SIZE)
    model = bytearray(SIZE)
    views: dict[str | None, bytes] = {}
    with open_chain(path, keys) as c:
        _write(c, model, rng, 10)
        c.create("s1")
        views["s1"] = bytes(model)
        _write(c, model, rng)
        c.create("s2")
        views["s2"] = bytes(model)
        _write(c, model, rng)
        c.revert("s1")  # a branch: s2's layer stays, off the current path
        model[:] = views["s1"]
        _write(c, model, rng)
        c.create("s3")
        views["s3"] = bytes(model)
        _write(c, model, rng)
    views[None] = bytes(model)
    return views


def read_views(path: Path, keys) -> dict[str | None, bytes]:
    with open_chain(path, keys, read_only=True) as c:
        names = [s["name"] for s in c.list()]
        out: dict[str | None, bytes] = {None: c.pread(0, c.size)}
    for n in names:
        with open_chain(path, keys, read_only=True, snapshot=n) as c:
            out[n] = c.pread(0, c.size)
    return out


def layer_keys(path: Path) -> dict[str, str]:
    """key_id of every layer file (unverified headers)."""
    files = [path, *sorted(layer_dir(path).glob("*.qvol"))]
    return {str(f): read_header(f)["key_id"] for f in files}


def old_key_opens_nothing(path: Path, old_key: bytes) -> int:
    """The old key against every slot (every epoch up to the header's), both header copies and every sealed
    metadata entry of one layer file; returns how many slots were tried."""
    raw = path.read_bytes()
    header = hdr.parse_unverified(str(path), raw[:HEADER_SIZE])
    uuid, alg = bytes.fromhex(header["volume_uuid"]), header["algorithm"]
    tried = 0
    for i in range(header["total_blocks"]):
        slot = raw[HEADER_SIZE + i * SLOT_SIZE : HEADER_SIZE + (i + 1) * SLOT_SIZE]
        if slot == bytes(SLOT_SIZE):
            continue
        epoch, length = struct.unpack_from(">HH", slot)
        aad = uuid + struct.pack(">QHHB", i, epoch, length, crypto.ALGORITHM_IDS[alg])
        for e in {epoch, *range(header["epoch"] + 1)}:
            with pytest.raises(crypto.AuthenticationFailed):
                crypto.Aead(alg, data_key(old_key, uuid, e)).open(slot[4:16], slot[16:], aad)
            tried += 1
    for off in (0, header["header_b_offset"]):
        with pytest.raises(HeaderCorruptError):
            hdr.verify(str(path), raw[off : off + HEADER_SIZE], header_mac_key(old_key, uuid, 2))
    return tried


def sealed_entries_refuse(path: Path, keys, old_key: bytes) -> int:
    """Every sealed metadata entry of the layer file fails to open under the old key."""
    with PQCVolume(path, keystore=keys, read_only=True, layer=True) as v:
        header = v.header
        entries = md.entries(str(path), v._storage, header)
    raw = path.read_bytes()
    n = 0
    for name, e in entries.items():
        if e.sealed:
            with pytest.raises(HeaderCorruptError):
                md.open_sealed(
                    str(path), metadata_key(old_key, header.uuid_bytes), header, name, raw[e.offset :][: e.length]
                )
            n += 1
    return n


# --- the whole chain -----------------------------------------------------------------------------------------


def test_every_layer_and_every_view_under_the_new_key(tmp_path, keys):
    """Three snapshots and a branch: after reencrypt_volume every layer file names the new key, carries no
    rotation, keeps its UUID and snapshot links, and every view reads exactly what the model says."""
    path = tmp_path / "disk.qvol"
    want = build(path, keys)
    old_id = read_header(path)["key_id"]
    before = {f["path"]: f["volume_uuid"] for f in chain_files(path, keys)}
    assert len(before) == 4  # the top and the layers of s1, s2 (off the current path) and s3
    new_id, _ = keys.new_volume_key("vm", "disk")
    out = reencrypt_volume(path, keys, new_id, batch=8)
    assert out["finished"] and out["layers"] == len(before) and out["old_key_id"] == old_id
    assert set(layer_keys(path).values()) == {new_id}
    after = {f["path"]: f["volume_uuid"] for f in chain_files(path, keys)}
    assert after == before  # each layer keeps its UUID (the links name UUIDs and freeze ids)
    for f in after:
        with PQCVolume(f, keystore=keys, read_only=True, layer=True) as v:
            assert v.rotation_state() is None and v.key_id == new_id
    del keys.keys[old_id]  # the old key is not needed for any view any more
    assert read_views(path, keys) == want
    assert chain_state(path, keys)["new_key_id"] is None
    # and the chain takes writes and new snapshots under the new key
    with open_chain(path, keys) as c:
        c.pwrite(0, b"n" * BLOCK_SIZE)
        c.create("s4")
    assert set(layer_keys(path).values()) == {new_id}


def test_forward_secrecy_in_every_layer_file(tmp_path):
    """Through the keystore (key commitments): the old key, as exported before, opens no slot at any epoch,
    no header copy and no sealed entry (the snapshot tables) of ANY file of the chain afterwards; each
    layer's commitment is to the new key, so the links verify under it."""
    from qwamos.keystore import PQCKeystore

    ks = PQCKeystore(tmp_path / "ks")
    path = tmp_path / "disk.qvol"
    want = build(path, ks, seed=2)
    old_id = read_header(path)["key_id"]
    old_key = bytes(ks.volume_key(old_id))
    new_id = ks.rotate_key(old_id)
    reencrypt_volume(path, ks, new_id, batch=8)
    files = [Path(f["path"]) for f in chain_files(path, ks)]
    assert len(files) == 4
    tried = sealed = 0
    for f in files:
        tried += old_key_opens_nothing(f, old_key)
        sealed += sealed_entries_refuse(f, ks, old_key)
        assert read_header(f)["features"][hdr.KEY_COMMITMENT]
    assert tried > 100 and sealed >= 3  # tables of the top and of the layers that were tops once
    assert read_views(path, ks) == want
    # the usage records of every layer moved to the new key
    live_new = {u["path"] for u in ks.key_users(new_id) if u["state"] == "live"}
    assert {str(f) for f in files} <= live_new
    assert not [u for u in ks.key_users(old_id) if u["state"] == "live"]
    assert {u["path"] for u in ks.key_users(old_id)} & {str(f) for f in files} == set()
    ks.destroy_key(old_id)  # nothing uses it: allowed
    assert read_views(path, PQCKeystore(tmp_path / "ks")) == want


def test_links_still_refuse_swapped_layers_after_rotation(tmp_path, keys):
    path = tmp_path / "disk.qvol"
    build(path, keys, seed=3)
    old_id = read_header(path)["key_id"]
    pre = tmp_path / "pre"
    shutil.copytree(layer_dir(path), pre)  # the layers as they were before the rotation
    new_id, _ = keys.new_volume_key("vm", "disk")
    reencrypt_volume(path, keys, new_id, batch=8)
    layers = sorted(layer_dir(path).glob("*.qvol"))
    a, b = layers[0], layers[1]
    saved_a, saved_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(saved_b)
    b.write_bytes(saved_a)
    with pytest.raises(SnapshotChainError):
        for name in ("s1", "s2", "s3", None):
            with open_chain(path, keys, read_only=True, snapshot=name):
                pass
    a.write_bytes(saved_a)
    b.write_bytes(saved_b)
    # a layer put back as it was before the rotation: under a key that is gone, it opens nothing
    del keys.keys[old_id]
    shutil.copyfile(pre / a.name, a)
    with pytest.raises(KeyNotFoundError):
        read_views(path, keys)


def test_a_different_target_is_refused_mid_chain_and_served_chains_are_refused(tmp_path, keys):
    """A chain cut short between layers: the top still under the old key, frozen layers under the new one.
    Reads stay exact; VM start / export (unlock_key) refuse naming the command; another target key is
    refused; the same call finishes it."""
    path = tmp_path / "disk.qvol"
    want = build(path, keys, seed=4)
    new_id, _ = keys.new_volume_key("vm", "disk")
    other, _ = keys.new_volume_key("vm", "disk")
    # only the layer of s2 done, the one off the current path (the branch left by the revert): the view's
    # layers all agree, and still the chain is refused to an export
    with open_chain(path, keys, read_only=True) as c:
        s2 = layer_dir(path) / f"{c.table.snapshots['s2'].layer}.qvol"
        assert str(s2) not in {v.path for v in c.layers}
    with PQCVolume(s2, keystore=keys, layer=True) as v:
        assert v.reencrypt(new_id, batch=8)["finished"]
    with pytest.raises(SnapshotError, match=f"qwamos volume reencrypt {path}"):
        unlock_key(path, keys)
    # what a kill between layers leaves: every frozen layer done, the top not begun
    for f in chain_files(path, keys)[1:]:
        if f["path"] == str(s2):
            continue
        with PQCVolume(f["path"], keystore=keys, layer=True) as v:
            assert v.reencrypt(new_id, batch=8)["finished"]
    st = chain_state(path, keys)
    assert st["old_key_id"] != new_id and st["new_key_id"] == new_id and st["key_id"] == st["old_key_id"]
    assert len(set(layer_keys(path).values())) == 2
    assert read_views(path, keys) == want
    with pytest.raises(SnapshotError, match=f"qwamos volume reencrypt {path}"):
        unlock_key(path, keys)
    with pytest.raises(RotationError, match=f"resume it with key {new_id}"):
        reencrypt_volume(path, keys, other, batch=8)
    assert reencrypt_volume(path, keys, new_id, batch=8)["finished"]
    assert set(layer_keys(path).values()) == {new_id}
    assert unlock_key(path, keys)[0] == new_id
    assert read_views(path, keys) == want


# --- kill -9 ------------------------------------------------------------------------------------------------

CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import MemoryKeys
from qwamos.storage.file import FileStorage
from qwamos.volume import reencrypt_volume

real = FileStorage.write
n = [0]
def write(self, offset, bufs):
    n[0] += 1
    if n[0] == {kill_at}:
        data = b"".join(bytes(b) for b in bufs)
        real(self, offset, (data[: {part} * len(data) // 4],))  # a kill mid-write: part of it landed
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, offset, bufs)
FileStorage.write = write
k = MemoryKeys()
for _ in range({nkeys}):
    k.new_volume_key("vm", "disk")
print(reencrypt_volume({path!r}, k, {new_id!r}, batch=8)["finished"])
"""


def test_kill_9_at_random_points_of_chain_rotations_then_resume(tmp_path, keys):
    """At least 12 kills at random writes (some mid-write) of chain rotations, chained: after each, every
    view read-only is exact (layers under two keys), a mixed chain is refused to an export, and the next run
    resumes; a finished rotation is followed by another to the next key."""
    path = tmp_path / "disk.qvol"
    want = build(path, keys, seed=5)
    rng = random.Random(7)
    kills = rotations = mixed = 0
    new_id, _ = keys.new_volume_key("vm", "disk")
    while kills < 12 or rotations < 1:
        code = CHILD.format(
            tests=str(Path(__file__).parent),
            kill_at=rng.randint(1, 120),
            part=rng.randint(0, 4),
            nkeys=len(keys.keys),
            path=str(path),
            new_id=new_id,
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        if proc.returncode == -9:
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.strip() == "True"
        assert read_views(path, keys) == want, f"after kill {kills}"
        st = chain_state(path, keys)
        if st["new_key_id"] is not None and len(set(layer_keys(path).values())) > 1:
            mixed += 1
            with pytest.raises(SnapshotError, match="volume reencrypt"):
                unlock_key(path, keys)
        if st["new_key_id"] is None and st["key_id"] == new_id:
            rotations += 1
            assert set(layer_keys(path).values()) == {new_id}
            new_id, _ = keys.new_volume_key("vm", "disk")
    assert mixed >= 1
    assert reencrypt_volume(path, keys, new_id, batch=8)["finished"]
    assert read_views(path, keys) == want
    for f in chain_files(path, keys):
        with PQCVolume(f["path"], keystore=keys, layer=True) as v:
            assert v.check() == [] and v.key_id == new_id


# --- the CLI ----------------------------------------------------------------------------------------------------


def _cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwamos.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_volume_reencrypt_cli_on_a_chain(tmp_path):
    from qwamos.keystore import PQCKeystore

    ksdir = tmp_path / "ks"
    ks = PQCKeystore(ksdir)
    path = tmp_path / "disk.qvol"
    want = build(path, ks, seed=6)
    old_id = read_header(path)["key_id"]
    res = _cli("volume", "reencrypt", str(path), "--dry-run", "--json", "--keystore", str(ksdir))
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["dry_run"] and len(plan["layers"]) == 4
    assert set(layer_keys(path).values()) == {old_id}
    res = _cli("volume", "reencrypt", str(path), "--json", "--keystore", str(ksdir))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["finished"] and out["layers"] == 4 and "every layer of its snapshot chain" in res.stderr
    assert set(layer_keys(path).values()) == {out["key_id"]} != {old_id}
    assert read_views(path, PQCKeystore(ksdir)) == want


def test_key_rotate_on_a_stopped_vm_with_snapshots_and_a_served_chain_is_refused(tmp_path, short_dir):
    """``key rotate`` over a VM's disk with snapshots (records of every layer folded into the chain):
    every layer re-encrypted, the config repointed, the old key destroyed, the exported old key opens
    nothing in any layer file.  While the chain is served, the rotation is refused with nothing changed."""
    from nbd_helpers import serving
    from qwamos.hypervisor.config import VMConfig
    from qwamos.keystore import Argon2Params, PQCKeystore, recovery
    from vm_helpers import write_config

    ksdir, root = tmp_path / "ks", tmp_path / "root"
    env = {"QWAMOS_KEYSTORE": str(ksdir), "QWAMOS_ROOT": str(root)}
    ks = PQCKeystore(ksdir, argon2_params=Argon2Params(memory_kib=8, iterations=1, lanes=1))
    cfg_path = write_config(root, "web", kernel="/nonexistent", encrypted=True, disk_name="disk.qvol")
    disk = cfg_path.parent / "disk.qvol"
    want = build(disk, ks, seed=8)
    key_id = read_header(disk)["key_id"]
    cfg = VMConfig.load(cfg_path)
    cfg.set_encryption(key_id=key_id, algorithm="chacha20-poly1305")
    cfg.set_volume_binding(volume_uuid=chain_state(disk, ks)["volume_uuid"], key_id=key_id)
    cfg.set_identity_fingerprint(ks.identity_info()["fingerprint"])
    cfg.save()
    layers = {f["path"] for f in chain_files(disk, ks)}
    assert layers - {str(disk)} <= {u["path"] for u in ks.key_users(key_id)}  # frozen layers are recorded
    r, w = os.pipe()
    os.write(w, b"recovery passphrase")
    os.close(w)
    export = tmp_path / "old.recovery"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwamos.cli.main",
            "key",
            "export",
            key_id,
            "-o",
            str(export),
            "--recovery-passphrase-fd",
            str(r),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        pass_fds=(r,),
    )
    os.close(r)
    assert res.returncode == 0, res.stderr
    # served: refused before anything changes (no successor made)
    sock = short_dir / "s"
    with serving(disk, ksdir, sock):
        res = _cli("key", "rotate", key_id, env=env)
        assert res.returncode == 10 and "has snapshots" in res.stderr and "nothing was changed" in res.stderr
        res = _cli("volume", "reencrypt", str(disk), env=env)
        assert res.returncode != 0 and "stop the VM" in res.stderr
    assert PQCKeystore(ksdir).key_state(key_id) == ("active", None)
    res = _cli("key", "rotate", key_id, "--dry-run", "--json", env=env)
    assert res.returncode == 0, res.stderr
    dry = json.loads(res.stdout.splitlines()[-1])
    assert [v["path"] for v in dry["volumes"]] == [str(disk)] and not dry["problems"]
    res = _cli("key", "rotate", key_id, "--json", env=env)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout.splitlines()[-1])
    new_id = result["new_key_id"]
    assert result["destroyed"]["key_id"] == key_id
    fresh = PQCKeystore(ksdir)
    assert set(layer_keys(disk).values()) == {new_id}
    assert VMConfig.load(cfg_path).key_id == new_id
    assert read_views(disk, fresh) == want
    assert layers <= {u["path"] for u in fresh.key_users(new_id) if u["state"] == "live"}
    _, old_key, *_ = recovery.import_document(export.read_bytes(), b"recovery passphrase")
    for f in layers:
        old_key_opens_nothing(Path(f), old_key)
        sealed_entries_refuse(Path(f), fresh, old_key)
    assert unlock_key(disk, fresh)[0] == new_id  # a VM start would be allowed


def test_a_layer_file_the_table_does_not_list_is_removed(tmp_path, keys):
    """Garbage of a merge cut short (a layer file no longer listed) would keep data under the old key: the
    chain rotation removes it, and says so."""
    path = tmp_path / "disk.qvol"
    want = build(path, keys, seed=9)
    listed = sorted(layer_dir(path).glob("*.qvol"))
    orphan = layer_dir(path) / ("ab" * 16 + ".qvol")
    shutil.copyfile(listed[0], orphan)
    new_id, _ = keys.new_volume_key("vm", "disk")
    out = reencrypt_volume(path, keys, new_id, batch=8)
    assert out["orphans_removed"] == [str(orphan)] and not orphan.exists()
    assert sorted(layer_dir(path).glob("*.qvol")) == listed
    assert read_views(path, keys) == want


def test_a_layer_put_back_from_before_a_keep_old_rotation_is_refused_by_every_read_path(tmp_path):
    """The attack: a storage tamperer kept a copy of a frozen layer from before ``key rotate --keep-old``
    (old key retired, still in the keystore, so the copy's header, commitment and slots -- forgeable by
    whoever leaked that key -- all open) and puts it back after the rotation.  Its UUID, freeze id and chain
    are the genuine ones; its key generation is not: every way of reading the chain refuses it (exit 12),
    the library opens of every view (volume info, clone, backup, snapshot operations), a VM start or
    ``volume serve --snapshot``, ``backup create``, and another rotation.  Put the genuine file back and
    every view reads as before."""
    from qwamos.keystore import PQCKeystore
    from qwamos.volume.snapshots import layer_path

    ksdir = tmp_path / "ks"
    env = {
        "QWAMOS_KEYSTORE": str(ksdir),
        "QWAMOS_ROOT": str(tmp_path / "root"),
        "QWAMOS_BACKUP_STATE": str(tmp_path / "state"),
    }
    ks = PQCKeystore(ksdir)
    path = tmp_path / "disk.qvol"
    want = build(path, ks, seed=11)
    old_id = read_header(path)["key_id"]
    with open_chain(path, ks, read_only=True) as c:
        s1 = c.table.snapshots["s1"].layer  # on the volume's path and on every snapshot's
    victim = layer_path(path, s1)
    saved = victim.read_bytes()
    res = _cli("key", "rotate", old_id, "--keep-old", "--json", env=env)
    assert res.returncode == 0, res.stderr
    new_id = json.loads(res.stdout.splitlines()[-1])["new_key_id"]
    ks = PQCKeystore(ksdir)
    assert ks.key_state(old_id)[0] == "retired" and ks.volume_key(old_id)  # kept: it still opens the copy
    assert set(layer_keys(path).values()) == {new_id}
    assert read_views(path, ks) == want
    genuine = victim.read_bytes()
    victim.write_bytes(saved)
    with PQCVolume(victim, keystore=ks, read_only=True, layer=True) as v:
        assert v.key_id == old_id  # the copy authenticates on its own: only the chain can tell
    for name in (None, "s1", "s2", "s3"):
        with pytest.raises(SnapshotChainError, match="before a key rotation"):
            open_chain(path, ks, read_only=True, snapshot=name)
    with pytest.raises(SnapshotChainError, match="before a key rotation"):
        open_chain(path, ks)  # writable: backup, snapshot create/revert/delete
    with pytest.raises(SnapshotChainError, match="before a key rotation"):
        unlock_key(path, ks, snapshot="s1")  # vm start, volume serve
    # the copy makes the chain look like a rotation back to the old key cut short: "resuming" it is refused
    with pytest.raises(SnapshotChainError, match="before a key rotation"):
        reencrypt_volume(path, ks, old_id)
    for argv in (
        ("volume", "serve", str(path), "--snapshot", "s1", "--read-only", "--socket", str(tmp_path / "s")),
        ("volume", "info", str(path)),
        ("backup", "create", str(path), "--repo", str(tmp_path / "repo"), "--name", "a"),
    ):
        res = _cli(*argv, env=env)
        assert res.returncode == 12 and "before a key rotation" in res.stderr, (argv, res.stderr)
    assert set(layer_keys(path).values()) == {new_id, old_id}  # nothing was changed by any of them
    victim.write_bytes(genuine)
    assert read_views(path, ks) == want


def _table_doc(path: Path, keys) -> dict:
    with open_chain(path, keys, read_only=True) as c:
        return json.loads(c.layers[0].read_metadata("snapshots/table"))


def test_key_generations_byte_format_and_upgrade_of_older_chains(tmp_path, keys):
    """qvol-format 2.5.4 "Key rotation": a chain never rotated keeps the bytes an older qwamos wrote (no
    ``key_gen`` member, table version 1), so older chains open unchanged; each chain rotation raises every
    layer's ``key_gen`` by one and the table's floor to it (version 2); a new overlay and a layer frozen
    afterwards carry the floor; malformed values are refused."""
    from qwamos.volume.snapshots import Table

    path = tmp_path / "disk.qvol"
    build(path, keys, seed=12)
    files = [Path(f["path"]) for f in chain_files(path, keys)]

    def gens() -> set:
        return {read_header(f)["features"]["snapshots"].get("key_gen") for f in files}

    assert gens() == {None} and _table_doc(path, keys)["version"] == 1 and "key_gen" not in _table_doc(path, keys)
    for n in (1, 2):
        new_id, _ = keys.new_volume_key("vm", "disk")
        assert reencrypt_volume(path, keys, new_id, batch=8)["finished"]
        assert gens() == {n}
        doc = _table_doc(path, keys)
        assert doc["version"] == 2 and doc["key_gen"] == n
    with open_chain(path, keys) as c:
        c.create("s4")  # the old top frozen at the floor, the new overlay made at it
        c.revert("s4")
    assert read_header(path)["features"]["snapshots"]["key_gen"] == 2
    assert {read_header(f)["features"]["snapshots"]["key_gen"] for f in layer_dir(path).glob("*.qvol")} == {2}
    # malformed: the header member and the table's
    base = {"compat": "incompat", "chain": "ab" * 16, "parent": None, "parent_freeze": None, "frozen": None}
    hdr._snapshots_feature({**base, "key_gen": 1})
    for bad in (0, -1, True, 1.0, "1", None, 2**53):
        with pytest.raises(ValueError):
            hdr._snapshots_feature({**base, "key_gen": bad})
    good = {"version": 2, "chain": "ab" * 16, "layers": {}, "snapshots": {}, "key_gen": 3}
    assert Table.parse("t", json.dumps(good).encode()).key_gen == 3
    v1 = {k: v for k, v in good.items() if k != "key_gen"} | {"version": 1}
    assert Table.parse("t", json.dumps(v1).encode()).key_gen == 0
    for doc in (
        {**good, "version": 1},  # key_gen only in version 2
        {k: v for k, v in good.items() if k != "key_gen"},  # version 2 needs it
        {**good, "key_gen": 0},
        {**good, "key_gen": True},
        {**good, "version": 3},
    ):
        with pytest.raises(SnapshotChainError):
            Table.parse("t", json.dumps(doc).encode())


@pytest.mark.parametrize("top_blocks_done", [0, 1])
def test_mid_rotation_after_the_floor_every_view_opens_old_copies_do_not_and_it_resumes(
    tmp_path, keys, top_blocks_done
):
    """Paused once every frozen layer is done and the floor raised (the top's own rotation just begun, or
    part way): every view reads exactly, a layer's pre-rotation copy is already refused, and the same call
    finishes the rotation."""
    from qwamos.volume.snapshots import layer_path

    path = tmp_path / "disk.qvol"
    want = build(path, keys, seed=13)
    with open_chain(path, keys, read_only=True) as c:
        victim = layer_path(path, c.table.snapshots["s1"].layer)
        frozen_blocks = len(c.table.layers) * c.layers[0].total_blocks
    saved = victim.read_bytes()
    new_id, _ = keys.new_volume_key("vm", "disk")
    seen = [0]

    def progress(done: int, _total: int) -> None:
        seen[0] = done

    out = reencrypt_volume(
        path, keys, new_id, batch=2, progress=progress, stop=lambda: seen[0] >= frozen_blocks + top_blocks_done
    )
    assert not out["finished"]
    assert _table_doc(path, keys)["key_gen"] == 1  # the floor is raised before the top's turn
    st = chain_state(path, keys)
    assert st["new_key_id"] == new_id and st["layers_done"] == st["layers"] - 1
    top = read_header(path)
    assert top["key_id"] == new_id and (top["features"]["rotation"]["progress"] > 0) == bool(top_blocks_done)
    assert read_views(path, keys) == want
    genuine = victim.read_bytes()
    victim.write_bytes(saved)
    with pytest.raises(SnapshotChainError, match="before a key rotation"):
        read_views(path, keys)
    victim.write_bytes(genuine)
    assert reencrypt_volume(path, keys, new_id, batch=8)["finished"]
    assert set(layer_keys(path).values()) == {new_id}
    assert read_views(path, keys) == want
