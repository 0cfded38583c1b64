"""``rotate_identity`` and ``change_passphrase``: every key survives, and a kill -9 at any file-system step
leaves the keystore wholly old or wholly new (qwamos.keystore.switch).

The kill tests run the switch in a child process (``crasher.crash_at``, tests/crash_helpers.py) that counts
its file-system mutations (rename, link, unlink, write, fsync, mkdir, rmdir) and SIGKILLs itself just before
the N-th one, for every N until a run completes; after each kill a fresh ``PQCKeystore`` (whose constructor
recovers) must open with exactly the old or the new identity (and passphrase), unwrap every key to the same
bytes, and leave no staged file behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from crash_helpers import Crasher
from qwamos import crypto
from qwamos.errors import KeystoreError, PassphraseRequiredError, WrongPassphraseError
from qwamos.keystore import Argon2Params, PQCKeystore, rewrap, switch
from qwamos.keystore.files import dump_document, write_private
from qwamos.keystore.identity import Identity, private_document

CHEAP = Argon2Params(memory_kib=8, iterations=1, lanes=1)
OLD_PASS, NEW_PASS = b"old passphrase", b"new passphrase"
_MUTATIONS = ("replace", "rename", "link", "unlink", "write", "fsync", "mkdir", "rmdir")


def seed(path: Path, passphrase: bytes | None, n: int = 3) -> dict[str, bytes]:
    ks = PQCKeystore(path, passphrase=passphrase, argon2_params=CHEAP)
    ids = [ks.generate_key(f"vm{i}") for i in range(n)]
    return {i: ks.volume_key(i) for i in ids}


def check_whole(path: Path, keys: dict[str, bytes], states: list[tuple[str, bytes | None]]) -> str:
    """The keystore at ``path`` is one of ``states`` (fingerprint, passphrase): it opens with that
    passphrase, every key unwraps to its old bytes, nothing staged is left (but a switched journal).
    Returns the fingerprint found."""
    ks = PQCKeystore(path, argon2_params=CHEAP)  # recovers
    stage = path / switch.DIR_NAME
    if stage.exists():
        assert sorted(os.listdir(stage)) == [switch.JOURNAL]
        assert switch.read_journal(path)["phase"] == switch.SWITCHED
    fp = ks.identity_info()["fingerprint"]
    ks.check_pin()
    matching = [pp for f, pp in states if f == fp]
    assert matching, f"fingerprint {fp} is neither the old nor the new identity"
    opened, got = None, None
    for pp in matching:
        try:
            k = PQCKeystore(path, passphrase=pp, argon2_params=CHEAP)
            got = {i: k.volume_key(i) for i in keys}
        except (WrongPassphraseError, PassphraseRequiredError):
            continue
        opened = pp
        assert got == keys
        break
        assert opened is not None or pp is None
    assert got == keys, "no passphrase of the old or new state opens the identity with every key"
    leftovers = [p for p in path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    return fp


def crash_at(crasher: Crasher, n: int, op, *args) -> bool:
    """``Crasher.crash_at`` over the keystore switch's file-system calls."""
    return crasher.crash_at(n, _MUTATIONS, op, *args)


# The operations the kill tests interrupt, at module level so that the child interpreter can import them.
def rotate_identity(d: Path, passphrase: bytes | None, external: list[Path] | None = None) -> None:
    PQCKeystore(d, passphrase=passphrase, argon2_params=CHEAP).rotate_identity(external=external or ())


def change_passphrase(d: Path, start: bytes | None, new: bytes | None) -> None:
    PQCKeystore(d, passphrase=start, argon2_params=CHEAP).change_passphrase(new)


def kill_everywhere(
    crasher: Crasher, tmp_path: Path, template: Path, op, args, states_of, keys, *, stride: int = 1
) -> int:
    """Kill ``op(run dir, *args)`` at every stride-th mutation; check each result; return how many kills were
    tried."""
    kills = 0
    n = 1
    seen = set()
    while True:
        ks_dir = tmp_path / f"run{n}"
        shutil.copytree(template, ks_dir)
        killed = crash_at(crasher, n, op, ks_dir, *args)
        fp = check_whole(ks_dir, keys, states_of(template))
        seen.add(fp)
        if not killed:
            break
        kills += 1
        n += stride
        shutil.rmtree(ks_dir)
    assert len(seen) == 2 or states_of(template)[0][0] == states_of(template)[1][0]
    return kills


def _fp(path: Path) -> str:
    return PQCKeystore(path).identity_info()["fingerprint"]


def test_rotate_identity_rewraps_every_key_and_destroys_the_old_identity(tmp_path: Path) -> None:
    ks_dir = tmp_path / "ks"
    keys = seed(ks_dir, OLD_PASS)
    old_key_bytes = (ks_dir / "identity.key").read_bytes()
    peek = tmp_path / "peek"
    os.link(ks_dir / "identity.key", peek)  # keeps the old inode reachable to see what happened to its bytes
    ks = PQCKeystore(ks_dir, passphrase=OLD_PASS, argon2_params=CHEAP)
    old_fp = ks.identity_info()["fingerprint"]
    result = ks.rotate_identity()
    assert result["old_fingerprint"] == old_fp != result["new_fingerprint"]
    assert sorted(result["rewrapped"]) == sorted(f"{k}.key" for k in keys)
    assert peek.read_bytes() != old_key_bytes and len(peek.read_bytes()) == len(old_key_bytes)  # overwritten
    fresh = PQCKeystore(ks_dir, passphrase=OLD_PASS, argon2_params=CHEAP)
    assert fresh.identity_info()["fingerprint"] == result["new_fingerprint"]
    assert {k: fresh.volume_key(k) for k in keys} == keys
    assert fresh.pending_identity_switch()["old_fingerprint"] == old_fp
    with pytest.raises(KeystoreError, match="not finished"):
        fresh.rotate_identity()
    fresh.finish_identity_switch()
    assert fresh.pending_identity_switch() is None and not (ks_dir / switch.DIR_NAME).exists()
    # new keys made afterwards are wrapped to the new identity
    new_id = fresh.generate_key("later")
    assert (
        PQCKeystore(ks_dir, passphrase=OLD_PASS).get_metadata(new_id)["public_key_fingerprint"]
        == (result["new_fingerprint"])
    )


def test_rotate_identity_refuses_an_unclaimed_bound_document(tmp_path: Path) -> None:
    """A document naming the identity that no registered kind re-wraps would become unreadable: refused."""
    ks_dir = tmp_path / "ks"
    keys = seed(ks_dir, None, 1)
    ks = PQCKeystore(ks_dir, argon2_params=CHEAP)
    fp = ks.identity_info()["fingerprint"]
    (ks_dir / "grants").mkdir(mode=0o700)
    grant = ks_dir / "grants" / "g1.json"
    grant.write_text(f'{{"format": "x-grant", "identity_fingerprint": "{fp}"}}')
    with pytest.raises(KeystoreError, match="no re-wrapper is registered"):
        ks.rotate_identity()
    assert _fp(ks_dir) == fp and not (ks_dir / switch.DIR_NAME).exists()

    # A registered kind is re-wrapped in the same switch.
    def files(d: Path) -> list[Path]:
        return sorted((d / "grants").glob("*.json"))

    def rewrap_grant(data, path, old, new, sealed):
        assert old.fingerprint == fp
        return data.replace(old.fingerprint.encode(), new.fingerprint.encode())

    rewrap.register(rewrap.WrappedKind("test-grant", files, rewrap_grant))
    try:
        result = ks.rotate_identity()
    finally:
        rewrap._KINDS.pop("test-grant")
    assert "grants/g1.json" in result["rewrapped"]
    assert result["new_fingerprint"] in grant.read_text()
    assert {k: PQCKeystore(ks_dir).volume_key(k) for k in keys} == keys


def test_change_passphrase_seal_change_unseal(tmp_path: Path) -> None:
    ks_dir = tmp_path / "ks"
    keys = seed(ks_dir, None)
    ks = PQCKeystore(ks_dir, argon2_params=CHEAP)
    assert ks.change_passphrase(OLD_PASS)["sealed"] is True
    # every key file now binds "sealed" (so an unsealed identity.key swapped in later is refused by each)
    assert all(json.loads((ks_dir / f"{k}.key").read_text())["identity_sealed"] is True for k in keys)
    with pytest.raises(Exception, match="sealed"):
        PQCKeystore(ks_dir).volume_key(next(iter(keys)))
    ks = PQCKeystore(ks_dir, passphrase=OLD_PASS, argon2_params=CHEAP)
    ks.change_passphrase(NEW_PASS)
    with pytest.raises(WrongPassphraseError):
        PQCKeystore(ks_dir, passphrase=OLD_PASS).volume_key(next(iter(keys)))
    ks = PQCKeystore(ks_dir, passphrase=NEW_PASS, argon2_params=CHEAP)
    assert {k: ks.volume_key(k) for k in keys} == keys
    ks.change_passphrase(None)
    ks = PQCKeystore(ks_dir, argon2_params=CHEAP)
    assert ks.identity_info()["sealed"] is False and {k: ks.volume_key(k) for k in keys} == keys
    assert not (ks_dir / switch.DIR_NAME).exists()


def seed_legacy(path: Path, passphrase: bytes | None, n: int = 3) -> dict[str, bytes]:
    """``seed`` over a version 1 identity (no signing key: a keystore made before signing keys)."""
    path.mkdir(mode=0o700)
    doc = private_document(Identity.generate(signing=False), passphrase, CHEAP)
    write_private(path / "identity.key", dump_document(doc))
    return seed(path, passphrase, n)


@pytest.mark.parametrize("legacy", [False, True], ids=["v2", "upgrade-from-v1"])
def test_kill_anywhere_in_rotate_identity(tmp_path: Path, crasher: Crasher, legacy: bool) -> None:
    """Also the upgrade of a version 1 identity (``legacy``): every kill leaves the old identity (no signing
    key) or the new one, whose signing key came through the switch intact (its fingerprint covers it)."""
    template = tmp_path / "template"
    keys = (seed_legacy if legacy else seed)(template, OLD_PASS, 2)
    old_fp = _fp(template)
    old_signature = PQCKeystore(template).identity_info()["signature"]
    assert old_signature == (None if legacy else crypto.SIGNATURE)

    def states(_t: Path) -> list[tuple[str, bytes | None]]:
        # the new fingerprint is not known in advance: any fingerprint but the old one is "new", and then
        # it must open with the (unchanged) passphrase and unwrap every key
        return [(old_fp, OLD_PASS)]

    kills, n, seen = 0, 1, set()
    while True:
        d = tmp_path / f"run{n}"
        shutil.copytree(template, d)
        killed = crash_at(crasher, n, rotate_identity, d, OLD_PASS)
        fp = _fp(d)
        check_whole(d, keys, [(old_fp, OLD_PASS), (fp, OLD_PASS)])
        seen.add("old" if fp == old_fp else "new")
        signature = PQCKeystore(d).identity_info()["signature"]
        assert signature == (old_signature if fp == old_fp else crypto.SIGNATURE)
        if fp != old_fp:  # the new identity opens with its signing key, matching identity.pub's
            ident = PQCKeystore(d, passphrase=OLD_PASS, argon2_params=CHEAP)._open_identity(create=False)
            assert ident.signing_seed is not None and ident.signing_public is not None
        shutil.rmtree(d)
        if not killed:
            break
        kills += 1
        n += 1
    assert seen == {"old", "new"} and kills >= 20, (seen, kills)


@pytest.mark.parametrize(
    ("start", "new"), [(None, OLD_PASS), (OLD_PASS, NEW_PASS), (OLD_PASS, None)], ids=["seal", "change", "unseal"]
)
def test_kill_anywhere_in_change_passphrase(
    tmp_path: Path, crasher: Crasher, start: bytes | None, new: bytes | None
) -> None:
    template = tmp_path / "template"
    keys = seed(template, start, 2)
    fp = _fp(template)
    kills = kill_everywhere(
        crasher,
        tmp_path,
        template,
        change_passphrase,
        (start, new),
        lambda _t: [(fp, start), (fp, new)],
        keys,
        stride=2,
    )
    assert kills >= 10


def test_a_keystore_opened_before_a_rotation_refuses_to_wrap_to_the_old_identity(tmp_path: Path) -> None:
    from qwamos.errors import IdentityChangedError

    ks_dir = tmp_path / "ks"
    keys = seed(ks_dir, None, 1)
    stale = PQCKeystore(ks_dir, argon2_params=CHEAP)
    stale.volume_key(next(iter(keys)))  # identity opened (and cached) before the rotation
    PQCKeystore(ks_dir, argon2_params=CHEAP).rotate_identity()
    with pytest.raises(IdentityChangedError, match="switched while this command ran"):
        stale.generate_key("late")
    assert len(PQCKeystore(ks_dir).list_keys()) == 1


def test_the_old_identity_unwraps_none_of_the_rewrapped_key_files(tmp_path: Path) -> None:
    """Someone who copied identity.key (and its passphrase) before rotate-identity learns nothing from the
    key files afterwards: each is encapsulated to the new identity and MACed under its auth key."""
    from qwamos.errors import KeyFileCorruptError
    from qwamos.keystore import keyfile

    ks_dir = tmp_path / "ks"
    keys = seed(ks_dir, OLD_PASS, 2)
    ks = PQCKeystore(ks_dir, passphrase=OLD_PASS, argon2_params=CHEAP)
    stolen = ks._open_identity(create=False)  # what a copy of identity.key + passphrase would give
    ks.rotate_identity()
    for key_id in keys:
        path = ks_dir / f"{key_id}.key"
        doc = keyfile.parse(path.read_bytes(), path, key_id)
        with pytest.raises(KeyFileCorruptError):
            keyfile.unwrap_full(doc, path, stolen)
        # not even with the fingerprint check out of the way: the MAC and the KEM fail under the old identity
        with pytest.raises(KeyFileCorruptError):
            keyfile.unwrap_full({**doc, "identity_fingerprint": stolen.fingerprint}, path, stolen)


def test_documents_outside_the_keystore_are_rewrapped_in_the_same_switch(
    tmp_path: Path, monkeypatch, crasher: Crasher
) -> None:
    """A backup repository's key (wrapped to the identity, kept in the repository) follows rotate-identity and
    passphrase changes — the CLI finds it among the repositories this machine has used — also when the
    switch is killed at any step."""
    from qwamos.backup.repo import Repository
    from qwamos.cli.main import main

    monkeypatch.setenv("QWAMOS_BACKUP_STATE", str(tmp_path / "state"))
    ks_dir = tmp_path / "ks"
    seed(ks_dir, OLD_PASS, 1)
    ks = PQCKeystore(ks_dir, passphrase=OLD_PASS, argon2_params=CHEAP)
    repo = Repository.init(tmp_path / "repo", ks)
    master = repo.read_key()
    fd = os.open(tmp_path / "pp", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, OLD_PASS)
    os.close(fd)
    base = ["key", "--keystore", str(ks_dir)]
    assert (
        main(
            [
                *base,
                "rotate-identity",
                "--yes",
                "--root",
                str(tmp_path / "r"),
                "--passphrase-file",
                str(tmp_path / "pp"),
            ]
        )
        == 0
    )
    fresh = PQCKeystore(ks_dir, passphrase=OLD_PASS)
    assert Repository(tmp_path / "repo", fresh).read_key() == master
    # kill anywhere in a rotation that carries the repository key: old or new, both readable, never neither
    template = tmp_path / "template"
    shutil.copytree(ks_dir, template / "ks")
    shutil.copytree(tmp_path / "repo", template / "repo")
    n, kills = 1, 0
    while True:
        for name in ("ks", "repo"):
            shutil.rmtree(tmp_path / name)
            shutil.copytree(template / name, tmp_path / name)
        key_doc = tmp_path / "repo" / "key"
        killed = crash_at(crasher, n, rotate_identity, ks_dir, OLD_PASS, [key_doc])
        now = PQCKeystore(ks_dir, passphrase=OLD_PASS)  # recovers
        assert Repository(tmp_path / "repo", now).read_key() == master, n
        assert [p.name for p in (tmp_path / "repo").iterdir() if p.name.startswith(".")] == []
        if not killed:
            break
        kills += 1
        n += 2
    assert kills >= 10
