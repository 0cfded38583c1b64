"""Snapshots of ``rbd:`` volumes (docs/qvol-format.md 2.5.4, "RBD"): layers are sibling images
``IMAGE.snap.<uuid>``; create and revert switch images by two renames (RBD cannot rename over an image), and a
kill -9 before any librbd call that changes the pool leaves, after the next writable open, exactly the pre- or
the post-state with the chain authenticated; a second opener during the switch is refused naming the holder;
swapped or old layer images are detected as on files.  Against the real one-node cluster."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys

import pytest

from nbd_helpers import SERVE, serving, uri
from qwamos.errors import SnapshotChainError, VolumeLockedError
from qwamos.storage import storage_exists, suffixed_images
from qwamos.volume import PQCVolume
from qwamos.volume.header import BLOCK_SIZE
from qwamos.volume.snapshots import break_chain_locks, layer_path, open_chain
from volume_helpers import random_chain_ops

SIZE = 48 * BLOCK_SIZE + 1000  # an odd size: the last block is partial
_names = iter(range(1, 1 << 30))


def _loc(tag: str) -> str:
    return f"rbd:rbd/snap-{tag}-{os.getpid()}-{next(_names)}"


def _new(loc: str, keys) -> str:
    PQCVolume(loc, keystore=keys).create("disk", "vm", size_bytes=SIZE)
    return loc


def _view(loc: str, keys, name: str | None = None) -> bytes:
    with open_chain(loc, keys, read_only=True, snapshot=name) as c:
        return c.pread(0, c.size)


def _snapshots(loc: str, keys) -> list[str]:
    with open_chain(loc, keys, read_only=True) as c:
        return sorted(s["name"] for s in c.list())


def _chain_images(loc: str) -> set[str]:
    return set(suffixed_images(loc, ".snap."))


def _assert_clean(loc: str, keys, *, crashed: bool = False, orphans: bool = False) -> None:
    """The pool holds exactly the chain's listed layers beside the volume: nothing pending, no garbage (after
    a crash, garbage images the dead client still had open may wait for a later open: never a layer name or a
    pending one; ``orphans``: a merge killed between its table update and the removal leaves the merged
    layer's image, unlisted, as on files: qvol-format 2.5.4)."""
    with open_chain(loc, keys, read_only=True) as c:
        listed = set(c.table.layers) if c.table else set()
    images = _chain_images(loc)
    if crashed:
        images = {i for i in images if not i.startswith("old-") and not i.endswith(".tmp")}
    if orphans:
        images = {i for i in images if i in listed or not re.fullmatch("[0-9a-f]{32}", i)}
    assert images == listed


def _write_or_zero(chain, model: bytearray, rnd: random.Random) -> None:
    off = rnd.randrange(SIZE)
    n = rnd.randrange(1, min(3 * BLOCK_SIZE, SIZE - off) + 1)
    if rnd.random() < 0.7:
        data = rnd.randbytes(n)
        chain.pwrite(off, data)
        model[off : off + n] = data
    else:
        chain.zero(off, n)
        model[off : off + n] = bytes(n)


@pytest.mark.parametrize("seed", range(2))
def test_every_view_matches_a_model_through_random_operations_on_rbd(ceph_cluster, keys, seed):
    """Create, write, zero, revert and delete (merge) on RBD: the volume and every snapshot read exactly
    what a byte model says, and no image is left behind."""
    rnd = random.Random(seed)
    loc = _new(_loc("model"), keys)
    model = bytearray(SIZE)
    with open_chain(loc, keys) as chain:
        snaps = random_chain_ops(chain, model, rnd, 30, 0.55, _write_or_zero)
    assert _view(loc, keys) == model
    for name, want in snaps.items():
        assert _view(loc, keys, name) == want, name
    assert _snapshots(loc, keys) == sorted(snaps)
    _assert_clean(loc, keys)


def _prepare(keys, tag: str, *, second: bool = False) -> tuple[str, bytes, bytes]:
    """A volume with snapshot ``s0`` (state A) and later writes (state B, the current one; with ``second``
    also snapshot ``s1`` of it, whose layer is then the only child of ``s0``'s)."""
    loc = _new(_loc(tag), keys)
    rnd = random.Random(tag)
    with open_chain(loc, keys) as c:
        c.pwrite(0, rnd.randbytes(20 * BLOCK_SIZE))
        c.create("s0")
        c.pwrite(10 * BLOCK_SIZE, rnd.randbytes(20 * BLOCK_SIZE))
        c.zero(2 * BLOCK_SIZE, BLOCK_SIZE)
        if second:
            c.create("s1")
    return loc, _view(loc, keys, "s0"), _view(loc, keys)


def _recover(loc: str, keys) -> None:
    """What an operator does after a crashed holder: break its locks (``--break-lock``), then open writable
    (which finishes or undoes the interrupted operation)."""
    break_chain_locks(loc)
    with open_chain(loc, keys):
        pass


# A fresh interpreter, not a fork: librados draws its client address's nonce from a random engine a fork
# would copy, so the parent's next client would get the killed child's address, and breaking the child's
# lock (which blocklists that address) would shut the parent out.
# Crash points: every librbd call that changes the pool's directory or an image's lock, and every flush (each
# durable step: a header commit writes a copy and flushes it, so a kill before a flush leaves the writes
# since the last one landed or not).  Not every single write, which would take minutes per operation.
STEP_CALLS = ("rbd_create", "rbd_remove", "rbd_rename", "rbd_flush", "rbd_lock_acquire", "rbd_write_zeroes")
_CHILD = """
import json, os, signal, sys
from qwamos.storage.librbd import lib
spec = json.loads(sys.stdin.readline())
count = [0]
L = lib()
for name in spec["calls"]:
    def wrapped(*a, _real=getattr(L, name)):
        count[0] += 1
        if count[0] == spec["n"]:
            os.kill(os.getpid(), spec.get("sig", signal.SIGKILL))
        return _real(*a)
    setattr(L, name, wrapped)
keys = {k: bytes.fromhex(v) for k, v in spec.get("keys", {}).items()}
class Keys:
    def volume_key(self, key_id):
        return keys[key_id]
if "keystore" in spec:
    from qwamos.keystore import PQCKeystore
    provider = PQCKeystore(spec["keystore"])
else:
    provider = Keys()
from qwamos.volume.snapshots import open_chain
with open_chain(spec["loc"], provider) as c:
    for op, arg in spec["ops"]:
        getattr(c, op)(arg)
"""


def crash_rbd_at(n: int, loc: str, keys, ops: list[tuple[str, str]], calls: tuple[str, ...] = STEP_CALLS) -> bool:
    """Run the chain operations ``ops`` (``(method, argument)``) on ``loc`` in a child killed (SIGKILL) before
    its ``n``-th librbd call of :data:`STEP_CALLS`; True if it was killed, False if it finished.  The keys go
    through the child's stdin (``keys`` a keystore directory: the child opens that keystore)."""
    spec: dict = {"n": n, "calls": calls, "loc": loc, "ops": ops}
    if isinstance(keys, os.PathLike):
        spec["keystore"] = os.fspath(keys)
    else:
        spec["keys"] = {k: v.hex() for k, v in keys.keys.items()}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], input=json.dumps(spec) + "\n", capture_output=True, text=True, timeout=120
    )
    if proc.returncode == -signal.SIGKILL:
        return True
    assert proc.returncode == 0, proc.stderr
    return False


def _crash_loop(
    keys, tag: str, ops: list[tuple[str, str]], check, *, merge: bool = False, calls: tuple[str, ...] = STEP_CALLS
) -> int:
    """Kill -9 before every librbd call of ``ops`` in turn (a fresh volume each time); ``check`` judges the
    state after recovery.  Returns the number of crash points."""
    n = 1
    while True:
        loc, a, b = _prepare(keys, f"{tag}{n}", second=merge)
        killed = crash_rbd_at(n, loc, keys, ops, calls)
        _recover(loc, keys)
        check(loc, a, b, killed)
        _assert_clean(loc, keys, crashed=killed, orphans=merge and killed)
        if not killed:
            return n
        n += 1


def test_kill_at_every_step_of_a_create_leaves_the_pre_or_post_state(ceph_cluster, keys):
    states = set()

    def check(loc: str, a: bytes, b: bytes, killed: bool) -> None:
        assert _view(loc, keys) == b and _view(loc, keys, "s0") == a
        names = _snapshots(loc, keys)
        assert names in (["s0"], ["s0", "s1"]), names
        if names == ["s0", "s1"]:
            assert _view(loc, keys, "s1") == b
        else:
            assert killed
        states.add(len(names))

    # every write too: the freeze (a header commit) must come before the renames, with no crash point between
    # a rename and the freeze's first write left out
    points = _crash_loop(keys, "kc", [("create", "s1")], check, calls=(*STEP_CALLS, "rbd_aio_write"))
    assert points > 5 and states == {1, 2}  # both outcomes were reached


def test_kill_at_every_step_of_a_revert_leaves_the_pre_or_post_state(ceph_cluster, keys):
    seen = set()

    def check(loc: str, a: bytes, b: bytes, killed: bool) -> None:
        now = _view(loc, keys)
        assert now in (a, b)
        assert now == a or killed
        assert _view(loc, keys, "s0") == a and _snapshots(loc, keys) == ["s0"]
        seen.add(now == a)

    _crash_loop(keys, "kr", [("revert", "s0")], check)
    assert seen == {True, False}


def test_kill_at_every_step_of_a_merge_keeps_every_view(ceph_cluster, keys):
    """``delete`` of a snapshot whose layer has one child merges it into that child (writes into a frozen
    layer, a relink, the table, the removal): every view reads the same at every crash point."""
    seen = set()

    def check(loc: str, a: bytes, b: bytes, killed: bool) -> None:
        assert _view(loc, keys) == b
        names = _snapshots(loc, keys)
        assert names in (["s0", "s1"], ["s1"]), names
        if "s0" in names:
            assert _view(loc, keys, "s0") == a
        if "s1" in names:
            assert _view(loc, keys, "s1") == b
        seen.add(tuple(names))
        assert names == ["s1"] or killed

    _crash_loop(keys, "km", [("delete", "s0")], check, merge=True)
    assert ("s1",) in seen and ("s0", "s1") in seen


@pytest.mark.parametrize("op", ["create", "revert"])
def test_a_second_opener_during_the_switch_is_refused_naming_the_holder(ceph_cluster, keys, op):
    """A create or revert stopped between its two renames (IMAGE missing; in a revert only the new overlay's
    lock and the renamed old top's say so): another writable or read-only open is refused as busy, naming
    the lock holder, and changes nothing; the operation then finishes."""
    loc, a, b = _prepare(keys, f"busy-{op}")
    spec = {
        "n": 3,  # renames: tmp -> pending, IMAGE -> layer (old-), pending -> IMAGE: stopped before the last
        "calls": ["rbd_rename"],
        "sig": signal.SIGSTOP,
        "loc": loc,
        "ops": [["create", "s1"] if op == "create" else ["revert", "s0"]],
        "keys": {k: v.hex() for k, v in keys.keys.items()},
    }
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(spec) + "\n")
    proc.stdin.close()
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        assert not storage_exists(loc)
        for read_only in (False, True):
            with pytest.raises(
                VolumeLockedError, match="busy: a snapshot operation is in progress, RBD lock held by"
            ):
                open_chain(loc, keys, read_only=read_only)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        _, status = os.waitpid(proc.pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    if op == "create":
        assert _snapshots(loc, keys) == ["s0", "s1"] and _view(loc, keys, "s1") == b and _view(loc, keys) == b
    else:
        assert _snapshots(loc, keys) == ["s0"] and _view(loc, keys) == a
    _assert_clean(loc, keys)


def test_a_crashed_holder_is_refused_until_its_locks_are_broken(ceph_cluster, keys):
    """Killed between the renames: the next opener is refused naming the dead holder (its lock stays on the
    cluster), never recovers silently; after break_chain_locks it finishes the create."""
    loc, _a, b = _prepare(keys, "dead")
    # renames: tmp -> pending, IMAGE -> layer, pending -> IMAGE: killed right before the last
    assert crash_rbd_at(3, loc, keys, [("create", "s1")], calls=("rbd_rename",))
    with pytest.raises(VolumeLockedError, match="busy"):
        open_chain(loc, keys)
    assert not storage_exists(loc)
    assert break_chain_locks(loc)
    with pytest.raises(SnapshotChainError, match="interrupted"):  # read-only: finished by a writable open
        open_chain(loc, keys, read_only=True)
    with open_chain(loc, keys):
        pass
    assert storage_exists(loc) and _snapshots(loc, keys) == ["s0", "s1"] and _view(loc, keys, "s1") == b


def test_swapped_and_old_layer_images_are_detected(ceph_cluster, keys):
    """Tampering by renaming images in the pool: two layers swapped, a layer replaced by a copy taken before
    it was frozen, another chain's layer put in: each is refused by the authenticated links."""
    loc = _new(_loc("tamper"), keys)
    image = loc.split("/", 1)[1]
    with open_chain(loc, keys) as c:
        c.pwrite(0, b"1" * BLOCK_SIZE)
    ceph_cluster.rbd("cp", f"rbd/{image}", f"rbd/{image}.before")  # the top before it is frozen
    with open_chain(loc, keys) as c:
        one = c.create("s1")["layer"]
        c.pwrite(0, b"2" * BLOCK_SIZE)
        two = c.create("s2")["layer"]
    l1, l2 = (layer_path(loc, u).split("/", 1)[1] for u in (one, two))
    # 1. swap the two layer images
    ceph_cluster.rbd("rename", f"rbd/{l1}", f"rbd/{l1}.x")
    ceph_cluster.rbd("rename", f"rbd/{l2}", f"rbd/{l1}")
    ceph_cluster.rbd("rename", f"rbd/{l1}.x", f"rbd/{l2}")
    with pytest.raises(SnapshotChainError, match="swapped or replaced"):
        open_chain(loc, keys, read_only=True)
    ceph_cluster.rbd("rename", f"rbd/{l1}", f"rbd/{l1}.x")
    ceph_cluster.rbd("rename", f"rbd/{l2}", f"rbd/{l1}")
    ceph_cluster.rbd("rename", f"rbd/{l1}.x", f"rbd/{l2}")
    assert _view(loc, keys)[:BLOCK_SIZE] == b"2" * BLOCK_SIZE
    # 2. the old copy of layer one (from before its freeze) in its place
    ceph_cluster.rbd("rename", f"rbd/{l1}", f"rbd/{l1}.real")
    ceph_cluster.rbd("rename", f"rbd/{image}.before", f"rbd/{l1}")
    with pytest.raises(SnapshotChainError, match="not frozen"):
        open_chain(loc, keys, read_only=True, snapshot="s1")
    ceph_cluster.rbd("rm", f"rbd/{l1}")
    ceph_cluster.rbd("rename", f"rbd/{l1}.real", f"rbd/{l1}")
    # 3. another chain's layer
    other = _new(_loc("tamper-other"), keys)
    with open_chain(other, keys) as c:
        theirs = c.create("x")["layer"]
    ceph_cluster.rbd("rename", f"rbd/{l1}", f"rbd/{l1}.real")
    ceph_cluster.rbd("cp", layer_path(other, theirs)[4:], f"rbd/{l1}")
    with pytest.raises(SnapshotChainError):
        open_chain(loc, keys, read_only=True, snapshot="s1")
    ceph_cluster.rbd("rm", f"rbd/{l1}")
    ceph_cluster.rbd("rename", f"rbd/{l1}.real", f"rbd/{l1}")
    assert _view(loc, keys, "s1")[:BLOCK_SIZE] == b"1" * BLOCK_SIZE


def _cli(*argv: str, ks) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwamos.cli.main", *argv, "--keystore", str(ks)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_round_trip_and_served_snapshot_read_only(ceph_cluster, tmp_path, short_dir):
    """The CLI on an rbd: volume (create, list, revert, delete), and `volume serve --snapshot NAME
    --read-only` compared byte for byte with nbdcopy; a write to it is refused."""
    from qwamos.keystore import PQCKeystore

    ksdir = tmp_path / "ks"
    ks = PQCKeystore(ksdir)
    loc = _loc("cli")
    PQCVolume(loc, keystore=ks).create("disk", "", size_bytes=1 << 20)
    rnd = random.Random(3)
    with open_chain(loc, ks) as c:
        c.pwrite(0, rnd.randbytes(300000))
    assert _cli("volume", "snapshot", "create", loc, "first", ks=ksdir).returncode == 0
    with open_chain(loc, ks) as c:
        c.pwrite(100000, rnd.randbytes(200000))
    res = _cli("volume", "snapshot", "create", loc, "second", "--json", ks=ksdir)
    assert res.returncode == 0, res.stderr
    res = _cli("volume", "snapshot", "list", loc, "--json", ks=ksdir)
    listed = json.loads(res.stdout)
    assert [s["name"] for s in listed["snapshots"]] == ["first", "second"]
    assert all(isinstance(s["allocated_bytes"], int) for s in listed["snapshots"])
    assert {f["path"] for f in listed["files"]} == {
        loc,
        *(layer_path(loc, s["layer"]) for s in listed["snapshots"]),
    }
    expected = _view(loc, ks, "first")
    sock = short_dir / "s"
    with serving(loc, ksdir, sock, "--snapshot", "first", "--read-only"):
        out = tmp_path / "out.raw"
        subprocess.run(["nbdcopy", uri(sock), str(out)], check=True, timeout=120)
        assert out.read_bytes() == expected
        w = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 4096", uri(sock)], capture_output=True, timeout=60
        )
        assert b"Operation not permitted" in w.stdout + w.stderr or w.returncode != 0
    res = subprocess.run(
        [*SERVE, loc, "--socket", str(sock), "--keystore", str(ksdir), "--snapshot", "first"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "--read-only" in res.stderr
    assert _cli("volume", "snapshot", "revert", loc, "first", "--yes", ks=ksdir).returncode == 0
    assert _view(loc, ks) == expected
    assert _cli("volume", "snapshot", "delete", loc, "first", "--yes", ks=ksdir).returncode == 0
    assert _cli("volume", "check", loc, ks=ksdir).returncode == 0
    assert _view(loc, ks) == expected
    _assert_clean(loc, ks)


def test_key_rotation_of_an_rbd_chain_moves_every_layer_image(ceph_cluster, tmp_path):
    """``volume reencrypt`` of an rbd: volume with snapshots (and a branch) rewrites every layer image, the top
    last: every view reads as before, and the old key opens nothing in any image (each exported with ``rbd
    export`` and checked as a file)."""
    from qwamos.keystore import PQCKeystore
    from qwamos.volume import read_header, reencrypt_volume
    from qwamos.volume.snapshots import chain_files
    from test_volume_chain_rotation import build, old_key_opens_nothing, read_views

    ks = PQCKeystore(tmp_path / "ks")
    loc = _loc("rot")
    want = build(loc, ks, seed=4)
    old_id = read_header(loc)["key_id"]
    old_key = bytes(ks.volume_key(old_id))
    new_id = ks.rotate_key(old_id)
    out = reencrypt_volume(loc, ks, new_id, batch=8)
    assert out["finished"] and out["layers"] == 4
    files = [f["path"] for f in chain_files(loc, ks)]
    assert len(files) == 4 and all(f.startswith("rbd:rbd/") for f in files)
    tried = 0
    for i, f in enumerate(files):
        assert read_header(f)["key_id"] == new_id
        dest = tmp_path / f"layer{i}.qvol"
        ceph_cluster.rbd("export", f[4:], str(dest))
        tried += old_key_opens_nothing(dest, old_key)
    assert tried > 50
    assert read_views(loc, ks) == want


def test_serve_break_lock_finishes_a_create_killed_between_its_renames(ceph_cluster, tmp_path, short_dir):
    """`volume serve --break-lock` on an rbd: volume whose snapshot create was killed with the image missing:
    it breaks the dead holder's locks on the chain's images, finishes the create and serves the post-state."""
    import processes
    from nbd_helpers import SERVE_CLI, wait_answers
    from qwamos.keystore import PQCKeystore

    ksdir = tmp_path / "ks"
    ks = PQCKeystore(ksdir)
    loc = _loc("serve-break")
    PQCVolume(loc, keystore=ks).create("disk", "", size_bytes=1 << 20)
    with open_chain(loc, ks) as c:
        c.pwrite(0, random.Random(7).randbytes(200000))
    want = _view(loc, ks)
    assert crash_rbd_at(3, loc, ksdir, [("create", "s1")], calls=("rbd_rename",))
    assert not storage_exists(loc)
    sock = short_dir / "s"
    proc = processes.spawn(
        [*SERVE_CLI, loc, "--socket", str(sock), "--keystore", str(ksdir), "--break-lock"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_answers(sock, proc)
        out = tmp_path / "out.raw"
        subprocess.run(["nbdcopy", uri(sock), str(out)], check=True, timeout=120)
        assert out.read_bytes() == want
    finally:
        processes.stop(proc)
        proc.stderr.close()
    assert _snapshots(loc, ks) == ["s1"] and _view(loc, ks, "s1") == want
    _assert_clean(loc, ks, crashed=True)


def test_recovery_trusts_only_authenticated_links(ceph_cluster, keys):
    """A revert killed between its renames, then the snapshot's layer image replaced by its copy from before it
    was frozen: the recovery finds no overlay linking to a frozen layer with its freeze id, refuses and changes
    nothing (the overlay is not put in place); with the real layer back it finishes the revert."""
    loc = _new(_loc("rec-tamper"), keys)
    image = loc.split("/", 1)[1]
    with open_chain(loc, keys) as c:
        c.pwrite(0, b"A" * BLOCK_SIZE)
    ceph_cluster.rbd("cp", f"rbd/{image}", f"rbd/{image}-before")  # the top, not yet frozen
    with open_chain(loc, keys) as c:
        layer = c.create("s0")["layer"]
        c.pwrite(0, b"B" * BLOCK_SIZE)
    assert crash_rbd_at(3, loc, keys, [("revert", "s0")], calls=("rbd_rename",))
    break_chain_locks(loc)
    real = layer_path(loc, layer)[4:]
    ceph_cluster.rbd("rename", real, f"{real}-real")
    ceph_cluster.rbd("rename", f"rbd/{image}-before", real)
    pending = {i for i in _chain_images(loc) if i.startswith("pending-")}
    with pytest.raises(SnapshotChainError, match="no pending overlay links to a frozen layer"):
        open_chain(loc, keys)
    assert not storage_exists(loc) and {i for i in _chain_images(loc) if i.startswith("pending-")} == pending
    ceph_cluster.rbd("rm", real)
    ceph_cluster.rbd("rename", f"{real}-real", real)
    with open_chain(loc, keys):
        pass
    assert _view(loc, keys)[:BLOCK_SIZE] == b"A" * BLOCK_SIZE and _snapshots(loc, keys) == ["s0"]


def test_rotation_removes_only_its_own_chains_unlisted_layer_images(ceph_cluster, tmp_path):
    """A key rotation removes the layer images its table does not list (a merge's leftover), found by name
    ``IMAGE.snap.<uuid>``; but a pool is shared, and another volume may carry such a name: it is removed only
    when its header names this chain, so the other volume survives, whole."""
    from qwamos.keystore import PQCKeystore
    from qwamos.volume import read_header, reencrypt_volume

    ks = PQCKeystore(tmp_path / "ks")
    loc = _new(_loc("own"), ks)
    with open_chain(loc, ks) as c:
        c.create("s1")
    layer = next(iter(_chain_images(loc)))
    leftover = f"{loc}.snap.{'a' * 32}"  # a copy of a listed layer: this chain's, listed nowhere
    ceph_cluster.rbd("cp", layer_path(loc, layer)[4:], leftover[4:])
    other = _new(f"{loc}.snap.{'b' * 32}", ks)  # another volume, named as a layer of this one would be
    with PQCVolume(other, keystore=ks) as v:
        v.write(0, b"another volume's data")
    new_id = ks.rotate_key(read_header(loc)["key_id"])
    assert reencrypt_volume(loc, ks, new_id, batch=8)["finished"]
    assert not storage_exists(leftover)
    with PQCVolume(other, keystore=ks, read_only=True) as v:
        assert v.read(0, 21) == b"another volume's data"


def test_break_chain_locks_leaves_another_volume_named_like_a_layer(ceph_cluster, tmp_path):
    """``--break-lock`` breaks the dead holder's locks on the chain's images, found by name; an image of
    another volume that carries such a name (its header names another chain) keeps its holder's lock: breaking
    it would blocklist a client of a volume the operator never named."""
    from qwamos.keystore import PQCKeystore
    from qwamos.storage import break_lock

    ks = PQCKeystore(tmp_path / "ks")
    loc = _new(_loc("brk"), ks)
    with open_chain(loc, ks) as c:
        c.create("s1")
    other = _new(f"{loc}.snap.{'d' * 32}", ks)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, other, str(tmp_path / "ks")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait()
        assert break_chain_locks(loc) == []  # nothing of this chain was held
        with pytest.raises(VolumeLockedError):
            PQCVolume(other, keystore=ks).open()  # the other volume's lock is still its holder's
    finally:
        holder.stdout.close()
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert break_lock(other)  # the operator's word for that volume, by its own name


HOLD = """
import sys, time
from qwamos.keystore import PQCKeystore
from qwamos.volume import PQCVolume
v = PQCVolume(sys.argv[1], keystore=PQCKeystore(sys.argv[2])).open()
print("held", flush=True)
time.sleep(600)
"""


def test_recovery_leaves_another_volume_named_like_a_pending_or_discarded_image(ceph_cluster, tmp_path):
    """Every writable open of an rbd: chain looks for a create or revert to finish and removes the losing
    overlays and discarded tops it finds by name.  The pool is shared: another volume called
    ``IMAGE.snap.pending-<hex>`` or ``IMAGE.snap.old-<hex>`` (its header names another chain) is not garbage
    and keeps its data."""
    from qwamos.keystore import PQCKeystore

    ks = PQCKeystore(tmp_path / "ks")
    loc = _new(_loc("names"), ks)
    with open_chain(loc, ks) as c:
        c.create("s1")
    others = [_new(f"{loc}.snap.pending-{'e' * 32}", ks), _new(f"{loc}.snap.old-{'f' * 32}", ks)]
    for other in others:
        with PQCVolume(other, keystore=ks) as v:
            v.write(0, b"other" * 800)
    with open_chain(loc, ks) as c:  # the open that finishes (and cleans up after) an interrupted operation
        c.pwrite(0, b"\x01" * BLOCK_SIZE)
    for other in others:
        with PQCVolume(other, keystore=ks, read_only=True) as v:
            assert v.read(0, 4000) == b"other" * 800
    assert _snapshots(loc, ks) == ["s1"] and _view(loc, ks)[:BLOCK_SIZE] == b"\x01" * BLOCK_SIZE
