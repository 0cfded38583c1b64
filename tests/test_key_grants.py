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

from qwamos.cli.main import main
from qwamos.errors import InvalidArgument, KeyFileCorruptError
from qwamos.keystore import PQCKeystore, grants
from qwamos.keystore.files import b64encode, dump_document
from qwamos.keystore.identity import Identity
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
    A's public key and fingerprint: B, expecting A, refuses it on the MAC."""
    a, b = hosts["a"], hosts["b"]
    a_pub = json.loads((a.path / "identity.pub").read_text())["public_key"]
    m = Identity.generate()
    from qwamos.keystore.keyfile import Unwrapped

    chosen = Unwrapped(bytes(range(32)), bytes(32), True)
    b_pub = base64.b64decode(json.loads((b.path / "identity.pub").read_text())["public_key"])
    # The grant as M can make it: A's public key and fingerprint in every field (sealed under them), M's
    # private key wherever a private key is needed (the static secret for the MAC).
    posing = Identity(m.private, base64.b64decode(a_pub), _fp(a))
    doc = grants.make_grant(hosts["key_id"], chosen, "web", posing, b_pub)
    with pytest.raises(KeyFileCorruptError, match="MAC check failed"):
        grants.import_grant(b, dump_document(doc), expect_fingerprint=_fp(a))
    assert not b.has_key(hosts["key_id"])
    # Or M's own public key (so that M can make the MAC) labelled with A's fingerprint: the fingerprint is
    # the public key's hash, checked before anything else.
    labelled = Identity(m.private, m.public, _fp(a))
    doc = grants.make_grant(hosts["key_id"], chosen, "web", labelled, b_pub)
    with pytest.raises(KeyFileCorruptError, match="not the fingerprint of grantor_public_key"):
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
        elif name in ("grantor_public_key", "kem_ciphertext", "nonce", "wrapped_key", "mac"):
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
