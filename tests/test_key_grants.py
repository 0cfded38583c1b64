"""Key grants (``qwamos key grant|import-grant|revoke|grants``, docs/keystore-format.md "Key grants"):
one volume key handed from keystore A to keystore B without copying an identity.

Attacks, performed as the attacker would: a grant made by another identity claiming A's fingerprint (the
forger holds A's identity.pub only), a grant for another keystore replayed to B, a grant whose granting
fingerprint the operator did not confirm, every byte of a grant flipped, records edited.
docs/threat-model.md names these tests in its "cannot" rows.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from qwamos import crypto
from qwamos.cli.main import main
from qwamos.errors import InvalidArgument, KeyFileCorruptError
from qwamos.keystore import PQCKeystore, grants
from qwamos.keystore.files import b64encode, dump_document
from qwamos.keystore.identity import Identity, PublicIdentity, fingerprint, parse_public
from qwamos.keystore.keyfile import Unwrapped
from qwamos.volume import PQCVolume


def _fp(ks: PQCKeystore) -> str:
    info = ks.identity_info()
    assert info is not None
    return str(info["fingerprint"])


@pytest.fixture
def hosts(tmp_path: Path, no_ambient_env) -> dict:
    """Keystores A (with a key and a volume under it) and B (an identity, no keys)."""
    a, b = PQCKeystore(tmp_path / "a"), PQCKeystore(tmp_path / "b")
    vol = tmp_path / "disk.qvol"
    key_id = PQCVolume(vol, keystore=a).create("disk", "web", size_bytes=1 << 20)
    with PQCVolume(vol, keystore=a) as v:
        v.write(0, b"A's data" * 512)
    b.init_identity()
    return {"a": a, "b": b, "key_id": key_id, "vol": vol, "tmp": tmp_path, "a_fp": _fp(a), "b_fp": _fp(b)}


CHOSEN = Unwrapped(bytes(range(32)), bytes(32), True)  # the key a forger wants B to import


def _grant(h: dict, to: PQCKeystore | None = None) -> bytes:
    to = to or h["b"]
    return grants.grant_key(h["a"], h["key_id"], (to.path / "identity.pub").read_bytes())


def test_grant_round_trip_gives_an_ordinary_key_of_the_receiver(hosts):
    a, b, key_id = hosts["a"], hosts["b"], hosts["key_id"]
    doc = _grant(hosts)
    assert grants.describe_grant(doc)["grantor_fingerprint"] == _fp(a)
    assert grants.import_grant(b, doc, expect_fingerprint=_fp(a)) == key_id
    # The key and its commitment secret travelled: B opens A's volume (the header's key commitment checked).
    with PQCVolume(hosts["vol"], keystore=PQCKeystore(b.path), read_only=True) as v:
        assert v.read(0, 8) == b"A's data"
    # B's key file is wrapped to and MACed by B's own identity, like any key B made.
    kf = json.loads((b.path / f"{key_id}.key").read_text())
    assert kf["identity_fingerprint"] == _fp(b) and kf["version"] == 2
    PQCKeystore(b.path).verify_key(key_id)
    assert grants.list_grants(b, key_id)["received_from"]["fingerprint"] == _fp(a)
    assert [g["recipient_fingerprint"] for g in grants.list_grants(a, key_id)["granted"]] == [_fp(b)]


def test_unconfirmed_grantor_fingerprint_is_refused(hosts):
    doc = _grant(hosts)
    with pytest.raises(KeyFileCorruptError, match="not by the expected"):
        grants.import_grant(hosts["b"], doc, expect_fingerprint="0123456789abcdef")
    assert not hosts["b"].has_key(hosts["key_id"])


def test_grant_forged_by_another_identity_claiming_the_grantor(hosts):
    """The forger M holds A's identity.pub (public) and makes a grant to B of a key of its choice, claiming
    A's public keys and fingerprint: B, expecting A, refuses it (the signature; and were ML-DSA broken, the
    MAC still refuses it: both must verify)."""
    a, b = hosts["a"], hosts["b"]
    a_pub = parse_public((a.path / "identity.pub").read_bytes(), a.path / "identity.pub")
    m = Identity.generate()
    b_pub = parse_public((b.path / "identity.pub").read_bytes(), b.path / "identity.pub")
    # The grant as M can make it: A's public keys and fingerprint in every field, M's private keys wherever a
    # private key is needed (the signature, the static secret for the MAC).
    posing = Identity(m.private, a_pub.public, _fp(a), m.signing_seed, a_pub.signing_public)
    doc = grants.make_grant(hosts["key_id"], CHOSEN, "web", posing, b_pub)
    with pytest.raises(KeyFileCorruptError, match="signature check failed"):
        grants.import_grant(b, dump_document(doc), expect_fingerprint=_fp(a))
    assert not b.has_key(hosts["key_id"])
    # A forger who broke ML-DSA (holds A's signing key) but not X25519: the signature verifies, the MAC,
    # which needs A's (or B's) X25519 private key, does not.
    a_ident = a._open_identity(create=False)
    pq_broken = Identity(m.private, a_pub.public, _fp(a), a_ident.signing_seed, a_pub.signing_public)
    doc = grants.make_grant(hosts["key_id"], CHOSEN, "web", pq_broken, b_pub)
    with pytest.raises(KeyFileCorruptError, match="MAC check failed"):
        grants.import_grant(b, dump_document(doc), expect_fingerprint=_fp(a))
    assert not b.has_key(hosts["key_id"])
    # Or M's own public keys (so that M can sign and MAC) labelled with A's fingerprint: the fingerprint is
    # the public keys' hash, checked before anything else.
    labelled = Identity(m.private, m.public, _fp(a), m.signing_seed, m.signing_public)
    doc = grants.make_grant(hosts["key_id"], CHOSEN, "web", labelled, b_pub)
    with pytest.raises(KeyFileCorruptError, match="not the fingerprint of the granting public keys"):
        grants.import_grant(b, dump_document(doc), expect_fingerprint=_fp(a))
    assert not b.has_key(hosts["key_id"])


def test_grant_for_another_identity_is_refused(hosts):
    c = PQCKeystore(hosts["tmp"] / "c")
    c.init_identity()
    doc = _grant(hosts, to=c)
    with pytest.raises(KeyFileCorruptError, match="granted to identity"):
        grants.import_grant(hosts["b"], doc, expect_fingerprint=_fp(hosts["a"]))
    # and with the recipient field edited to claim B: the MAC (and the KEM) refuse it
    edited = json.loads(doc)
    edited["recipient_fingerprint"] = _fp(hosts["b"])
    with pytest.raises(KeyFileCorruptError):
        grants.import_grant(hosts["b"], dump_document(edited), expect_fingerprint=_fp(hosts["a"]))
    assert not hosts["b"].has_key(hosts["key_id"])


def test_every_field_of_a_grant_is_authenticated(hosts):
    a, b = hosts["a"], hosts["b"]
    good = json.loads(_grant(hosts))
    for name, value in good.items():
        if name in ("format", "version", "kem"):
            continue
        doc = dict(good)
        if isinstance(value, bool):
            doc[name] = not value
        elif isinstance(value, int):
            doc[name] = value + 1
        elif name in (
            "grantor_public_key",
            "grantor_signing_key",
            "kem_ciphertext",
            "nonce",
            "wrapped_key",
            "mac",
            "signature",
        ):
            raw = bytearray(base64.b64decode(value))
            raw[len(raw) // 2] ^= 1
            doc[name] = b64encode(bytes(raw))
        else:
            doc[name] = value[:-1] + ("0" if value[-1] != "0" else "1")
        with pytest.raises((KeyFileCorruptError, InvalidArgument)):
            grants.import_grant(b, dump_document(doc), expect_fingerprint=_fp(a))
        assert not b.has_key(good["key_id"]), name


def test_revoke_on_both_sides(hosts):
    a, b, key_id = hosts["a"], hosts["b"], hosts["key_id"]
    grants.import_grant(b, _grant(hosts), expect_fingerprint=_fp(a))
    assert grants.revoke_grant(a, key_id, _fp(b)) == "granted"
    assert grants.list_grants(a, key_id)["granted"] == []
    assert grants.list_grants(a, key_id, include_revoked=True)["granted"][0]["revoked_at"] is not None
    with pytest.raises(InvalidArgument):
        grants.revoke_grant(a, key_id, _fp(b))  # nothing active any more
    assert a.has_key(key_id)  # the grantor keeps its key
    assert grants.revoke_grant(b, key_id, _fp(a)) == "received"
    assert not b.has_key(key_id) and not (b.path / f"{key_id}.grants").exists()


def test_edited_grant_records_are_refused(hosts):
    a, key_id = hosts["a"], hosts["key_id"]
    _grant(hosts)
    path = a.path / f"{key_id}.grants"
    doc = json.loads(path.read_text())
    doc["granted"] = []  # hide the grant from the operator
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileCorruptError, match="MAC"):
        grants.list_grants(PQCKeystore(a.path), key_id)


def test_cli_grant_import_confirm_revoke(hosts, tmp_path, capsys):
    a, b, key_id = hosts["a"], hosts["b"], hosts["key_id"]
    out = tmp_path / "web.grant"
    pub = b.path / "identity.pub"
    assert main(["key", "--keystore", str(a.path), "grant", key_id, "--to", str(pub), "-o", str(out)]) == 0
    assert _fp(a) in capsys.readouterr().err
    # Without a confirmation (no terminal): refused, nothing stored.
    assert main(["key", "--keystore", str(b.path), "import-grant", str(out)]) != 0
    assert "--expect-fingerprint" in capsys.readouterr().err
    assert (
        main(["key", "--keystore", str(b.path), "import-grant", str(out), "--expect-fingerprint", "0" * 16]) != 0
    )
    assert not b.has_key(key_id)
    assert main(["key", "--keystore", str(b.path), "import-grant", str(out), "--expect-fingerprint", _fp(a)]) == 0
    assert capsys.readouterr().out.strip() == key_id
    assert main(["key", "--keystore", str(a.path), "grants", key_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["granted"][0]["recipient_fingerprint"] == _fp(b)
    assert main(["key", "--keystore", str(a.path), "revoke", key_id, "--from", _fp(b)]) == 0
    assert "cannot make that host forget" in capsys.readouterr().err
    assert main(["key", "--keystore", str(b.path), "revoke", key_id, "--from", _fp(a)]) == 0
    assert not PQCKeystore(b.path).has_key(key_id)


def test_identity_rotation_rewraps_the_grant_records(hosts):
    """``key rotate-identity`` re-MACs ``<key_id>.grants`` with the key files (the rewrap registry)."""
    a, b, key_id = hosts["a"], hosts["b"], hosts["key_id"]
    grants.import_grant(b, _grant(hosts), expect_fingerprint=_fp(a))
    for ks in (a, b):
        result = ks.rotate_identity()
        assert f"{key_id}.grants" in result["rewrapped"]
        ks.finish_identity_switch()
    fresh_a, fresh_b = PQCKeystore(a.path), PQCKeystore(b.path)
    assert [g["recipient_fingerprint"] for g in grants.list_grants(fresh_a, key_id)["granted"]] == [hosts["b_fp"]]
    assert grants.list_grants(fresh_b, key_id)["received_from"]["fingerprint"] == hosts["a_fp"]


# --- post-quantum authenticity (version 2: ML-DSA-87 signature + X25519 MAC) ---------------------------------
#
# The adversary of these tests has a quantum computer: it broke X25519, so it holds the granting identity A's
# X25519 private key and can make the MAC (the static secret) for any document.  It holds no ML-DSA key of A.
# Each test checks that the signature alone stops it; docs/threat-model.md names them.


def _opened(ks: PQCKeystore) -> Identity:
    return ks._open_identity(create=False)


def _x25519_broken(a: Identity, m: Identity, *, signing_public: bytes | None = None) -> Identity:
    """What the quantum adversary can sign and MAC with: A's X25519 private key (broken), its own ML-KEM seed
    (the grant never uses the grantor's ML-KEM private key) and its own ML-DSA key, presented under A's public
    keys and fingerprint."""
    private = m.private[: crypto.MLKEM_SEED_SIZE] + a.private[crypto.MLKEM_SEED_SIZE :]
    return Identity(private, a.public, a.fingerprint, m.signing_seed, signing_public or a.signing_public)


def _b_public(h: dict) -> PublicIdentity:
    path = h["b"].path / "identity.pub"
    return parse_public(path.read_bytes(), path)


def _refused(
    h: dict,
    doc: dict | bytes,
    *,
    allow_classical: bool = False,
    match: str | None = None,
    expect: str | None = None,
) -> None:
    data = doc if isinstance(doc, bytes) else dump_document(doc)
    expect = h["a_fp"] if expect is None else expect
    with pytest.raises(KeyFileCorruptError, match=match):
        grants.import_grant(h["b"], data, expect_fingerprint=expect, allow_classical=allow_classical)
    assert not h["b"].has_key(h["key_id"])


def test_grant_signed_by_another_identity_is_refused_even_with_x25519_broken(hosts):
    """The adversary makes a grant of a key of its choice that claims A's keys and fingerprint and carries a
    valid MAC (X25519 broken), signed with its own ML-DSA key: the signature under A's signing key fails."""
    m = Identity.generate()
    forger = _x25519_broken(_opened(hosts["a"]), m)
    doc = grants.make_grant(hosts["key_id"], CHOSEN, "web", forger, _b_public(hosts))
    _refused(hosts, doc, match="signature check failed")
    _refused(hosts, doc, allow_classical=True, match="signature check failed")  # the flag is for version 1 only
    # Control: the same document is accepted once the signature is A's (which is what the adversary lacks),
    # so the MAC passed and only the signature stopped it.
    genuine = Identity(
        forger.private, forger.public, forger.fingerprint, _opened(hosts["a"]).signing_seed, forger.signing_public
    )
    doc = grants.make_grant(hosts["key_id"], CHOSEN, "web", genuine, _b_public(hosts))
    assert grants.import_grant(hosts["b"], dump_document(doc), expect_fingerprint=hosts["a_fp"]) == hosts["key_id"]


def test_grant_with_its_signature_stripped_is_refused(hosts):
    m = Identity.generate()
    forger = _x25519_broken(_opened(hosts["a"]), m)
    doc = grants.make_grant(hosts["key_id"], CHOSEN, "web", forger, _b_public(hosts))
    for stripped in (
        {k: v for k, v in doc.items() if k != "signature"},  # removed
        {**doc, "signature": ""},  # emptied
        {**doc, "signature": b64encode(bytes(crypto.MLDSA_SIG_SIZE))},  # zeroed
    ):
        _refused(hosts, stripped)
        _refused(hosts, stripped, allow_classical=True)


def test_downgrade_of_a_version_2_grant_to_version_1_is_refused(hosts):
    """The adversary turns its forged grant into a version 1 (MAC-only) document, which it can authenticate
    completely with X25519 broken: signature and signing key removed, version 1, MAC recomputed.  A's
    confirmed fingerprint covers A's signing key, so no version 1 document is A's: refused, with or without
    --allow-classical."""
    a = _opened(hosts["a"])
    m = Identity.generate()
    # make_grant writes version 1 for an identity without a signing key: exactly the downgraded document,
    # MAC included, claiming A's KEM key and A's fingerprint.
    classical = Identity(_x25519_broken(a, m).private, a.public, a.fingerprint)
    doc = grants.make_grant(hosts["key_id"], CHOSEN, "web", classical, _b_public(hosts), allow_classical=True)
    assert doc["version"] == grants.VERSION_1 and "signature" not in doc
    _refused(hosts, doc, match="not the fingerprint of the granting public keys")
    _refused(hosts, doc, allow_classical=True)
    # ... claiming the fingerprint its keys do hash to (A's KEM key alone): not the fingerprint the operator
    # confirmed.
    relabelled = Identity(classical.private, a.public, fingerprint(a.public))
    doc = grants.make_grant(hosts["key_id"], CHOSEN, "web", relabelled, _b_public(hosts), allow_classical=True)
    _refused(hosts, doc, allow_classical=True, match="not by the expected")
    # ... or a genuine version 2 grant of A's with version set to 1 and the signature fields dropped.
    good = json.loads(_grant(hosts))
    down = {k: v for k, v in good.items() if k not in ("signature", "grantor_signing_key")}
    down["version"] = grants.VERSION_1
    _refused(hosts, down, allow_classical=True)
    # ... or with version 1 but the signature fields kept: not a version 1 document.
    _refused(hosts, {**good, "version": grants.VERSION_1}, allow_classical=True, match="unknown field")


def test_signature_over_a_different_document_is_refused(hosts, monkeypatch):
    """A genuine signature of A (over A's real grant to B of the same key id) pasted onto the adversary's
    document: its own key, KEM ciphertext, nonce and wrapped key, a MAC valid with X25519 broken, every other
    field the same as the genuine grant's."""
    good = json.loads(_grant(hosts))
    forger = _x25519_broken(_opened(hosts["a"]), Identity.generate())
    monkeypatch.setattr(grants.time, "time", lambda: good["granted_at"])
    forged = grants.make_grant(hosts["key_id"], CHOSEN, "web", forger, _b_public(hosts))
    monkeypatch.undo()
    differ = {k for k in good if good[k] != forged[k]}
    assert differ == {"kem_ciphertext", "nonce", "wrapped_key", "mac", "signature"}, differ
    forged["signature"] = good["signature"]
    _refused(hosts, forged, match="signature check failed")
    # and a signature A made for another purpose's document of the same bytes would carry another context:
    # a signature over the grant's bytes under a different context string does not verify either
    other_context = crypto.sign(
        _opened(hosts["a"]).signing_seed, grants._signed_input(good), context=b"qwamos/keystore/v2/other"
    )
    _refused(hosts, {**good, "signature": b64encode(other_context)}, match="signature check failed")
    # control: A's genuine grant imports
    assert grants.import_grant(hosts["b"], dump_document(good), expect_fingerprint=hosts["a_fp"])


def test_identity_pub_with_a_swapped_signing_key_is_refused(hosts):
    """identity.pub is public and travels between hosts: one whose signing key was replaced by the
    adversary's (fingerprint field left as it was) is refused wherever it is read, because the fingerprint
    covers the signing key."""
    a, b = hosts["a"], hosts["b"]
    a_ident = _opened(a)
    m = Identity.generate()
    for ks in (a, b):
        path = ks.path / "identity.pub"
        doc = json.loads(path.read_text())
        doc["signing_public_key"] = b64encode(m.signing_public)
        swapped = dump_document(doc)
        with pytest.raises(KeyFileCorruptError, match="fingerprint does not match the public keys"):
            parse_public(swapped, path)
        if ks is b:  # A granting to the swapped B.pub refuses before anything is made
            with pytest.raises(KeyFileCorruptError, match="fingerprint does not match"):
                grants.grant_key(a, hosts["key_id"], swapped)
        else:  # A's own keystore refuses its swapped identity.pub when it opens the identity
            path.write_bytes(swapped)
            with pytest.raises(KeyFileCorruptError, match="fingerprint does not match"):
                PQCKeystore(a.path).volume_key(hosts["key_id"])
    # In a grant: the adversary signs with its own key and puts its signing key in grantor_signing_key,
    # keeping A's fingerprint: the fingerprint is not the hash of those keys.
    forger = _x25519_broken(a_ident, m, signing_public=m.signing_public)
    doc = grants.make_grant(hosts["key_id"], CHOSEN, "web", forger, _b_public(hosts))
    _refused(hosts, doc, match="not the fingerprint of the granting public keys")


# --- identities made before signing keys (version 1) and their upgrade ----------------------------------------


def _legacy_keystore(path: Path) -> PQCKeystore:
    """A keystore as this project made them before signing keys: a version 1 identity (KEM only), unsealed."""
    from qwamos.keystore.files import write_private
    from qwamos.keystore.identity import private_document
    from qwamos.keystore.sealing import Argon2Params

    path.mkdir(mode=0o700)
    ident = Identity.generate(signing=False)
    doc = private_document(ident, None, Argon2Params(memory_kib=8, iterations=1, lanes=1))
    write_private(path / "identity.key", dump_document(doc))
    ks = PQCKeystore(path)
    assert ks.identity_info()["signature"] is None
    return ks


def test_a_legacy_identity_keeps_working_and_grants_only_classically_with_the_flag(hosts):
    old = _legacy_keystore(hosts["tmp"] / "old")
    key_id, key = old.new_volume_key("web", "disk")  # keys, unwrap, identity.pub: all as before
    assert PQCKeystore(old.path).volume_key(key_id) == key
    assert json.loads((old.path / "identity.pub").read_text())["version"] == 1
    b_pub = (hosts["b"].path / "identity.pub").read_bytes()
    with pytest.raises(InvalidArgument, match="no signing key"):
        grants.grant_key(old, key_id, b_pub)
    data = grants.grant_key(old, key_id, b_pub, allow_classical=True)
    assert grants.describe_grant(data)["version"] == grants.VERSION_1
    with pytest.raises(KeyFileCorruptError, match="allow-classical"):
        grants.import_grant(hosts["b"], data, expect_fingerprint=_fp(old))
    assert not hosts["b"].has_key(key_id)
    assert grants.import_grant(hosts["b"], data, expect_fingerprint=_fp(old), allow_classical=True) == key_id
    assert PQCKeystore(hosts["b"].path).volume_key(key_id) == key


def test_rotate_identity_upgrades_a_legacy_identity_to_one_with_a_signing_key(hosts):
    """The upgrade path: 'key rotate-identity' replaces a version 1 identity with a version 2 one (new
    fingerprint, covering the signing key), through the journalled switch; grants are then version 2."""
    old = _legacy_keystore(hosts["tmp"] / "old")
    key_id, key = old.new_volume_key("web", "disk")
    old_fp = _fp(old)
    result = old.rotate_identity()
    old.finish_identity_switch()
    fresh = PQCKeystore(old.path)
    info = fresh.identity_info()
    assert info["signature"] == crypto.SIGNATURE and info["fingerprint"] == result["new_fingerprint"] != old_fp
    assert fresh.volume_key(key_id) == key
    pub = parse_public((old.path / "identity.pub").read_bytes(), old.path / "identity.pub")
    assert pub.signing_public is not None and pub.fingerprint == info["fingerprint"]
    data = grants.grant_key(fresh, key_id, (hosts["b"].path / "identity.pub").read_bytes())
    assert grants.describe_grant(data)["version"] == grants.VERSION
    assert grants.import_grant(hosts["b"], data, expect_fingerprint=info["fingerprint"]) == key_id


def test_cli_allow_classical_on_both_sides_warns(hosts, tmp_path, capsys):
    old = _legacy_keystore(hosts["tmp"] / "old")
    key_id, _ = old.new_volume_key("web", "disk")
    out, pub, b = tmp_path / "old.grant", hosts["b"].path / "identity.pub", hosts["b"]
    assert main(["key", "--keystore", str(old.path), "identity"]) == 0
    assert "rotate-identity" in capsys.readouterr().err
    assert main(["key", "--keystore", str(old.path), "grant", key_id, "--to", str(pub), "-o", str(out)]) != 0
    assert "no signing key" in capsys.readouterr().err and not out.exists()
    argv = ["key", "--keystore", str(old.path), "grant", key_id, "--to", str(pub), "-o", str(out)]
    assert main([*argv, "--allow-classical"]) == 0
    assert "classically only" in capsys.readouterr().err
    imp = ["key", "--keystore", str(b.path), "import-grant", str(out), "--expect-fingerprint", _fp(old)]
    assert main(imp) != 0
    assert "--allow-classical" in capsys.readouterr().err and not b.has_key(key_id)
    assert main([*imp, "--allow-classical"]) == 0
    assert "classically only" in capsys.readouterr().err and PQCKeystore(b.path).has_key(key_id)


def test_the_full_fingerprint_is_checked_in_full(hosts, tmp_path, capsys):
    """The short fingerprint is 64 bits (a 2^64 search finds a second identity with it); the full one, 256
    bits, is what `key identity` shows as fingerprint_full and import accepts instead.  Every digit of it is
    checked: the short prefix right and any later digit wrong is refused."""
    a, b, key_id = hosts["a"], hosts["b"], hosts["key_id"]
    full = a.identity_info()["fingerprint_full"]
    assert len(full) == 64 and full.startswith(hosts["a_fp"])
    data = _grant(hosts)
    assert grants.describe_grant(data)["grantor_fingerprint_full"] == full
    for i in (16, 40, 63):  # a second identity that shares the short fingerprint differs further on
        wrong = full[:i] + ("0" if full[i] != "0" else "1") + full[i + 1 :]
        _refused(hosts, data, expect=wrong, match="not those of identity")
    for malformed in (full[:20], full + "0", ""):
        _refused(hosts, data, expect=malformed)
    out = tmp_path / "web.grant"
    out.write_bytes(data)
    argv = ["key", "--keystore", str(b.path), "import-grant", str(out), "--expect-fingerprint", full.upper()]
    assert main(argv) == 0
    assert full in capsys.readouterr().err and PQCKeystore(b.path).has_key(key_id)


def test_a_grant_from_an_unconfirmed_grantor_says_what_does_not_match(hosts, tmp_path, capsys):
    """An operator who pasted the wrong fingerprint (their own, say) is told which fingerprints differ, not that
    the grant is "malformed or failed authentication" (found by an outside check of issue 14); exit 23 still."""
    a, b, key_id = hosts["a"], hosts["b"], hosts["key_id"]
    out = tmp_path / "web.grant"
    assert main(["key", "--keystore", str(a.path), "grant", key_id, "--to", str(b.path / "identity.pub"),
                 "-o", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    code = main(["key", "--keystore", str(b.path), "import-grant", str(out), "--expect-fingerprint", _fp(b)])
    err = capsys.readouterr().err
    assert code == 23
    assert f"granted by identity {_fp(a)}, not by the expected {_fp(b)}" in err
    assert "malformed" not in err and "qwamos key identity" in err
    assert not b.has_key(key_id)


def test_revoke_takes_the_full_fingerprint_too(hosts, tmp_path, capsys):
    """`key identity` shows fingerprint_full and import-grant takes it; so does revoke, on both sides (it said
    "no active grant to or from identity <64 digits>": the records name an identity by its short fingerprint).
    A second import of the same key says --force replaces it, not `key import --force`."""
    a, b, key_id = hosts["a"], hosts["b"], hosts["key_id"]
    out = tmp_path / "web.grant"
    out.write_bytes(_grant(hosts))
    a_full, b_full = a.identity_info()["fingerprint_full"], b.identity_info()["fingerprint_full"]
    argv = ["key", "--keystore", str(b.path), "import-grant", str(out), "--expect-fingerprint", a_full]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 25
    err = capsys.readouterr().err
    assert "(--force replaces it)" in err and "key import --force" not in err
    assert main(["key", "--keystore", str(a.path), "revoke", key_id, "--from", b_full]) == 0
    assert grants.list_grants(a, key_id)["granted"] == []
    assert main(["key", "--keystore", str(b.path), "revoke", key_id, "--from", f" {a_full.upper()}\n"]) == 0
    assert not PQCKeystore(b.path).has_key(key_id)
