"""qwamos.crypto, the only module that touches the crypto library: AEAD wrappers, HKDF, HMAC and its
constant-time compare, the KEMs, and the known-answer vectors of docs/keystore-format.md ("Test vectors").

Published vectors (RFC 8439, the GCM specification, RFC 5869, RFC 4231) pin the primitives; the KEM and
key-file vectors are read out of the document itself, so the spec and the code cannot drift apart, and are
recomputed here with the crypto library and hashlib directly (not through qwamos.crypto).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qwamos import crypto
from qwamos.errors import AuthenticationFailed, InvalidArgument, KeyFileCorruptError

DOC = Path(__file__).resolve().parents[1] / "docs" / "keystore-format.md"

# --- the document's vectors -------------------------------------------------------------------------------


def _vector_section() -> str:
    text = DOC.read_text()
    start = text.index("\n## Test vectors\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def doc_values() -> dict[str, bytes]:
    """Every ``name = hex`` line of the section, as bytes."""
    values = {}
    for m in re.finditer(r"^([a-zA-Z][^=\n]*?)\s+= ([0-9a-f]+)$", _vector_section(), re.M):
        values[m.group(1)] = bytes.fromhex(m.group(2))
    return values


def doc_key_files() -> list[dict]:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", _vector_section(), re.S)]


V = doc_values()
HYBRID_DOC, LEGACY_DOC, V2_DOC, PIN_DOC, SEALED_IDENTITY_DOC = doc_key_files()
HYBRID_CT = base64.b64decode(HYBRID_DOC["kem_ciphertext"])
LABEL = b"QWAMOS-KEM-v1/x25519-mlkem1024"
LEGACY_LABEL = b"QWAMOS-KEM-v1/ecdh-curve25519"


def test_the_document_holds_every_vector_this_module_checks():
    expected = {
        "combiner output",
        "identity private key",
        "SHA3-256(public key)",
        "pk_X",
        "fingerprint",
        "ephemeral scalar e",
        "ct_X",
        "SHA3-256(ct_M)",
        "ss_M",
        "ss_X",
        "hybrid shared secret",
        "wrap key (hybrid)",
        "volume key (hybrid)",
        "legacy shared secret",
        "wrap key (legacy)",
        "volume key (legacy)",
        "auth key",
        "commit secret",
        "mac (version 2)",
        "volume uuid",
        "key commitment",
        "argon2id output (identity seal)",
        "seal key (identity)",
        "signing seed",
        "SHA3-256(signing public key)",
        "fingerprint (version 2)",
    }
    assert set(V) == expected
    assert V["identity private key"] == bytes(range(96))
    assert (HYBRID_DOC["kem"], LEGACY_DOC["kem"]) == (crypto.HYBRID_KEM, crypto.LEGACY_KEM)


# --- AEAD -------------------------------------------------------------------------------------------------

RFC8439_KEY = bytes(range(0x80, 0xA0))
RFC8439_NONCE = bytes.fromhex("070000004041424344454647")
RFC8439_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
RFC8439_PT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
    b"sunscreen would be it."
)
RFC8439_CT_HEAD = bytes.fromhex("d31a8d34648e60db7b86afbc53ef7ec2")
RFC8439_TAG = bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")


def test_chacha20_poly1305_matches_rfc8439_section_2_8_2():
    out = crypto.Aead(crypto.CHACHA20_POLY1305, RFC8439_KEY).seal(RFC8439_NONCE, RFC8439_PT, RFC8439_AAD)
    assert out[:16] == RFC8439_CT_HEAD and out[-16:] == RFC8439_TAG and len(out) == len(RFC8439_PT) + 16
    assert crypto.Aead(crypto.CHACHA20_POLY1305, RFC8439_KEY).open(RFC8439_NONCE, out, RFC8439_AAD) == RFC8439_PT


def test_aes_256_gcm_matches_the_gcm_specification_test_cases_13_and_14():
    a = crypto.Aead(crypto.AES_256_GCM, bytes(32))
    assert a.seal(bytes(12), b"", b"") == bytes.fromhex("530f8afbc74536b9a963b4f1c4cb738b")
    assert a.seal(bytes(12), bytes(16), b"") == bytes.fromhex(
        "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"
    )


@pytest.mark.parametrize("alg", crypto.ALGORITHMS)
def test_aead_open_refuses_any_change_with_authentication_failed_only(alg):
    key, nonce, aad = bytes(range(32)), bytes(range(12)), b"associated"
    a = crypto.Aead(alg, key)
    sealed = a.seal(nonce, b"plaintext" * 10, aad)
    assert a.open(nonce, sealed, aad) == b"plaintext" * 10
    tampered = [
        (nonce, sealed, aad + b"x"),
        (nonce, sealed, aad[:-1]),
        (bytes(12), sealed, aad),
        (nonce, sealed[:-1], aad),
        (nonce, b"", aad),
    ]
    for i in range(len(sealed)):
        tampered.append((nonce, sealed[:i] + bytes([sealed[i] ^ 1]) + sealed[i + 1 :], aad))
    for n, ct, ad in tampered:
        with pytest.raises(AuthenticationFailed):
            a.open(n, ct, ad)
    with pytest.raises(AuthenticationFailed):
        crypto.Aead(alg, bytes(32)).open(nonce, sealed, aad)  # another key


@pytest.mark.parametrize("alg", crypto.ALGORITHMS)
def test_seal_into_and_open_into_give_the_same_bytes_as_seal_and_open(alg):
    a = crypto.Aead(alg, bytes(range(32)))
    nonce, pt, aad = bytes(range(12)), bytes(range(256)) * 16, b"aad"
    out = bytearray(len(pt) + 16)
    a.seal_into(nonce, memoryview(pt), memoryview(aad), memoryview(out))
    assert bytes(out) == a.seal(nonce, pt, aad)
    back = bytearray(len(pt))
    a.open_into(memoryview(nonce), memoryview(out), aad, memoryview(back))
    assert bytes(back) == pt
    out[100] ^= 1
    with pytest.raises(AuthenticationFailed):
        a.open_into(nonce, out, aad, memoryview(back))


def test_aead_refuses_bad_keys_and_unknown_algorithms():
    with pytest.raises(ValueError):
        crypto.Aead(crypto.CHACHA20_POLY1305, bytes(16))
    with pytest.raises(TypeError):
        crypto.Aead(crypto.CHACHA20_POLY1305, "k" * 32)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        crypto.Aead("rot13", bytes(32))


def test_algorithm_ids_are_frozen_and_resolve_algorithm_accepts_spellings():
    assert crypto.ALGORITHM_IDS == {"chacha20-poly1305": 1, "aes-256-gcm": 2}
    assert crypto.resolve_algorithm(" AES_256_GCM ") == crypto.AES_256_GCM
    assert crypto.resolve_algorithm("auto") in crypto.ALGORITHMS
    with pytest.raises(InvalidArgument):
        crypto.resolve_algorithm("des")


# --- hashes, HKDF, HMAC -----------------------------------------------------------------------------------


def test_hkdf_sha256_matches_rfc5869_test_case_1():
    okm = crypto.hkdf_sha256(b"\x0b" * 22, salt=bytes(range(13)), info=bytes(range(0xF0, 0xFA)), length=42)
    assert okm == bytes.fromhex(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )
    assert len(crypto.hkdf_sha256(b"k", salt=b"", info=b"i")) == crypto.KEY_SIZE


def test_hmac_sha256_matches_rfc4231_test_case_2_and_verify_refuses_every_wrong_tag():
    tag = bytes.fromhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    assert crypto.hmac_sha256(b"Jefe", b"what do ya want for nothing?") == tag
    crypto.verify_hmac_sha256(b"Jefe", b"what do ya want for nothing?", tag)
    for bad in (tag[:-1], tag + b"\0", b"", bytes(32), bytes([tag[0] ^ 0x80]) + tag[1:], tag[:-1] + b"\x00"):
        with pytest.raises(AuthenticationFailed):
            crypto.verify_hmac_sha256(b"Jefe", b"what do ya want for nothing?", bad)
    with pytest.raises(AuthenticationFailed):
        crypto.verify_hmac_sha256(b"Jefe", b"what do ya want for nothing!", tag)


def test_mac_and_secret_comparisons_are_constant_time(monkeypatch):
    """A timing assertion would be flaky, so check the mechanism: every comparison of a MAC or a secret
    goes through ``hmac.compare_digest`` (``==`` stops at the first differing byte)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(crypto.hmac, "compare_digest", spy)
    tag = crypto.hmac_sha256(b"k", b"data")
    crypto.verify_hmac_sha256(b"k", b"data", tag)
    assert calls == [(tag, tag)]
    with pytest.raises(AuthenticationFailed):
        crypto.verify_hmac_sha256(b"k", b"data", bytes(32))
    assert calls[-1] == (tag, bytes(32))
    assert crypto.constant_time_eq(b"abc", b"abc") and not crypto.constant_time_eq(b"abc", b"abd")
    assert calls[-2:] == [(b"abc", b"abc"), (b"abc", b"abd")]


def test_the_volume_header_mac_is_checked_with_the_constant_time_compare(tmp_path, monkeypatch):
    from conftest import MemoryKeys
    from qwamos.volume import PQCVolume
    from qwamos.volume.header import HEADER_SIZE, MAC_OFFSET

    keys = MemoryKeys()
    vol = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    vol.create("v", "vm", size_bytes=4096)
    mac = (tmp_path / "v.qvol").read_bytes()[MAC_OFFSET:HEADER_SIZE]
    seen: list[bytes] = []
    real = hmac.compare_digest
    monkeypatch.setattr(crypto.hmac, "compare_digest", lambda a, b: seen.append(bytes(b)) or real(a, b))
    with PQCVolume(tmp_path / "v.qvol", keystore=keys, read_only=True).open():
        pass
    assert mac in seen


def test_sha3_256_and_random_bytes():
    assert crypto.sha3_256(b"").hex() == "a7ffc6f8bf1ed76651c14756a061d662f580ff4de43b49fa82d80a4b80f8434a"
    assert crypto.sha256(b"abc").hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    r = [crypto.random_bytes(16) for _ in range(64)]
    assert all(len(x) == 16 for x in r) and len(set(r)) == 64 and crypto.random_bytes(0) == b""


def test_argon2id_is_deterministic_in_its_inputs_and_refuses_short_salts():
    params = dict(iterations=1, memory_kib=64, lanes=1)
    a = crypto.argon2id(b"pw", b"s" * 16, **params)
    assert a == crypto.argon2id(b"pw", b"s" * 16, **params) and len(a) == 32
    assert a != crypto.argon2id(b"pw", b"t" * 16, **params) != crypto.argon2id(b"pX", b"s" * 16, **params)
    assert a != crypto.argon2id(b"pw", b"s" * 16, iterations=2, memory_kib=64, lanes=1)
    with pytest.raises(InvalidArgument):
        crypto.argon2id(b"pw", b"s" * 15, **params)


# --- KEMs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kem", crypto.KEMS)
def test_kem_round_trip_and_a_wrong_identity_gets_an_unrelated_secret(kem):
    private, public = crypto.kem_generate()
    assert len(private) == 96 and len(public) == 1600
    assert crypto.kem_public_from_private(private) == public
    ss, ct = crypto.kem_encapsulate(kem, public)
    assert len(ss) == 32 and len(ct) == (1600 if kem == crypto.HYBRID_KEM else 32)
    assert crypto.kem_decapsulate(kem, private, ct) == ss
    ss2, ct2 = crypto.kem_encapsulate(kem, public)
    assert ss2 != ss and ct2 != ct  # fresh randomness per encapsulation
    other, _ = crypto.kem_generate()
    assert crypto.kem_decapsulate(kem, other, ct) != ss


def test_kem_refuses_malformed_inputs():
    private, public = crypto.kem_generate()
    with pytest.raises(InvalidArgument):
        crypto.kem_encapsulate("rsa", public)
    with pytest.raises(InvalidArgument):
        crypto.kem_encapsulate(crypto.HYBRID_KEM, public[:-1])
    with pytest.raises(InvalidArgument):
        crypto.kem_decapsulate(crypto.HYBRID_KEM, private[:-1], bytes(1600))
    with pytest.raises(InvalidArgument):
        crypto.kem_decapsulate(crypto.HYBRID_KEM, private, bytes(1599))
    with pytest.raises(InvalidArgument):
        crypto.kem_decapsulate(crypto.LEGACY_KEM, private, bytes(33))


def test_hybrid_combiner_known_answer_binds_both_ciphertexts_and_both_public_keys():
    parts = [b"\x11" * 32, b"\x22" * 32, b"\x33" * 1568, b"\x44" * 32, b"\x55" * 1568, b"\x66" * 32]
    out = crypto._combine(*parts)
    assert out == V["combiner output"]
    assert out == hashlib.sha3_256(LABEL + b"".join(parts)).digest()
    for i in range(len(parts)):  # every input changes the output
        changed = list(parts)
        changed[i] = bytes([changed[i][0] ^ 1]) + changed[i][1:]
        assert crypto._combine(*changed) != out, f"input {i} is not bound"


def test_identity_known_answer():
    private = V["identity private key"]
    public = crypto.kem_public_from_private(private)
    assert hashlib.sha3_256(public).digest() == V["SHA3-256(public key)"]
    assert public[crypto.MLKEM_PK_SIZE :] == V["pk_X"]
    # independently of qwamos.crypto: FIPS 203 key generation from the seed, RFC 7748 X25519
    ek = mlkem.MLKEM1024PrivateKey.from_seed_bytes(private[:64]).public_key().public_bytes_raw()
    pk_x = x25519.X25519PrivateKey.from_private_bytes(private[64:]).public_key().public_bytes_raw()
    assert public == ek + pk_x
    from qwamos.keystore.identity import fingerprint

    assert fingerprint(public) == V["fingerprint"].hex() == HYBRID_DOC["identity_fingerprint"]


def test_signing_key_known_answer_and_the_version_2_fingerprint_covers_it():
    seed = V["signing seed"]
    public = crypto.sign_public_from_seed(seed)
    assert len(public) == crypto.MLDSA_PK_SIZE
    assert hashlib.sha3_256(public).digest() == V["SHA3-256(signing public key)"]
    # independently of qwamos.crypto: FIPS 204 key generation from the seed
    assert public == mldsa.MLDSA87PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw()
    from qwamos.keystore.identity import fingerprint

    kem_public = crypto.kem_public_from_private(V["identity private key"])
    assert fingerprint(kem_public, public) == V["fingerprint (version 2)"].hex()
    assert V["fingerprint (version 2)"] == hashlib.sha3_256(kem_public + public).digest()[:8]
    assert fingerprint(kem_public) == V["fingerprint"].hex()  # version 1 identities keep theirs


def test_signatures_verify_only_under_their_key_message_and_context():
    seed, public = crypto.sign_generate()
    assert (len(seed), len(public)) == (crypto.MLDSA_SEED_SIZE, crypto.MLDSA_PK_SIZE)
    assert crypto.sign_public_from_seed(seed) == public
    sig = crypto.sign(seed, b"grant", context=b"qwamos/test")
    assert len(sig) == crypto.MLDSA_SIG_SIZE
    crypto.verify_signature(public, b"grant", sig, context=b"qwamos/test")
    # the library itself agrees
    mldsa.MLDSA87PublicKey.from_public_bytes(public).verify(sig, b"grant", b"qwamos/test")
    _other_seed, other_public = crypto.sign_generate()
    flipped = bytearray(sig)
    flipped[len(sig) // 2] ^= 1
    for pk, msg, s, ctx in (
        (other_public, b"grant", sig, b"qwamos/test"),  # another key
        (public, b"grant!", sig, b"qwamos/test"),  # another message
        (public, b"grant", sig, b"qwamos/other"),  # another purpose
        (public, b"grant", bytes(flipped), b"qwamos/test"),  # a changed signature
        (public, b"grant", sig[:-1], b"qwamos/test"),  # truncated
        (public[:-1], b"grant", sig, b"qwamos/test"),  # malformed key
        (bytes(crypto.MLDSA_PK_SIZE), b"grant", sig, b"qwamos/test"),
    ):
        with pytest.raises(AuthenticationFailed):
            crypto.verify_signature(pk, msg, s, context=ctx)
    with pytest.raises(InvalidArgument):
        crypto.sign(seed, b"grant", context=b"")  # a signature always names its purpose
    with pytest.raises(InvalidArgument):
        crypto.sign(seed[:-1], b"grant", context=b"qwamos/test")


def test_hybrid_decapsulation_known_answer():
    private = V["identity private key"]
    ct_m, ct_x = HYBRID_CT[: crypto.MLKEM_CT_SIZE], HYBRID_CT[crypto.MLKEM_CT_SIZE :]
    assert hashlib.sha3_256(ct_m).digest() == V["SHA3-256(ct_M)"]
    e = x25519.X25519PrivateKey.from_private_bytes(V["ephemeral scalar e"])
    assert ct_x == V["ct_X"] == e.public_key().public_bytes_raw()
    assert crypto.kem_decapsulate(crypto.HYBRID_KEM, private, HYBRID_CT) == V["hybrid shared secret"]
    # the same secret from the components and the documented formula
    m = mlkem.MLKEM1024PrivateKey.from_seed_bytes(private[:64])
    x = x25519.X25519PrivateKey.from_private_bytes(private[64:])
    ss_m, ss_x = m.decapsulate(ct_m), x.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
    assert (ss_m, ss_x) == (V["ss_M"], V["ss_X"])
    assert ss_x == e.exchange(x.public_key())
    ek, pk_x = m.public_key().public_bytes_raw(), x.public_key().public_bytes_raw()
    formula = hashlib.sha3_256(LABEL + ss_m + ss_x + ct_m + ct_x + ek + pk_x).digest()
    assert formula == V["hybrid shared secret"]


def test_legacy_decapsulation_known_answer():
    private = V["identity private key"]
    ss = crypto.kem_decapsulate(crypto.LEGACY_KEM, private, V["ct_X"])
    assert ss == V["legacy shared secret"]
    ct = base64.b64decode(LEGACY_DOC["kem_ciphertext"])
    assert ct == V["ct_X"]
    formula = hashlib.sha3_256(LEGACY_LABEL + V["ss_X"] + V["ct_X"] + V["pk_X"]).digest()
    assert formula == ss


# --- the key-file format ----------------------------------------------------------------------------------


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@pytest.mark.parametrize(
    ("doc", "kind"), [(HYBRID_DOC, "hybrid"), (LEGACY_DOC, "legacy")], ids=["hybrid", "legacy"]
)
def test_key_file_known_answer(doc, kind, tmp_path, monkeypatch):
    from qwamos.keystore import keyfile
    from qwamos.keystore.identity import Identity

    ident = Identity.from_private(V["identity private key"])
    path = tmp_path / f"{doc['key_id']}.key"
    data = json.dumps(doc, indent=2).encode()
    parsed = keyfile.parse(data, path, doc["key_id"])
    assert keyfile.unwrap_v1(parsed, path, ident) == V[f"volume key ({kind})"]
    with pytest.raises(KeyFileCorruptError, match="no MAC"):
        keyfile.unwrap(parsed, path, ident)  # version 1 is read only by the upgrade
    # the documented recipe, recomputed with the crypto library directly
    ss = V[f"{kind} shared secret"]
    wrap_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"", info=b"qwamos/keystore/v1/wrap").derive(ss)
    assert wrap_key == V[f"wrap key ({kind})"]
    aad = _canonical({k: v for k, v in doc.items() if k != "wrapped_key"})
    nonce = base64.b64decode(doc["nonce"])
    sealed = ChaCha20Poly1305(wrap_key).encrypt(nonce, V[f"volume key ({kind})"], aad)
    assert base64.b64encode(sealed).decode() == doc["wrapped_key"]


def test_key_file_v2_known_answer(tmp_path, monkeypatch):
    from qwamos.keystore import keyfile
    from qwamos.keystore.identity import Identity, auth_key

    doc = V2_DOC
    ident = Identity.from_private(V["identity private key"])
    path = tmp_path / f"{doc['key_id']}.key"
    got = keyfile.unwrap_full(keyfile.parse(json.dumps(doc, indent=2).encode(), path, doc["key_id"]), path, ident)
    assert (got.key, got.commit_secret, got.commitment_required) == (
        V["volume key (hybrid)"],
        V["commit secret"],
        True,
    )
    # the documented recipe, recomputed with the crypto library and hmac directly
    auth = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"", info=b"qwamos/keystore/v2/auth").derive(
        V["identity private key"]
    )
    assert auth == V["auth key"] == auth_key(ident)
    aad = _canonical({k: v for k, v in doc.items() if k not in ("wrapped_key", "mac")})
    nonce = base64.b64decode(doc["nonce"])
    sealed = ChaCha20Poly1305(V["wrap key (hybrid)"]).encrypt(
        nonce, V["volume key (hybrid)"] + V["commit secret"], aad
    )
    assert base64.b64encode(sealed).decode() == doc["wrapped_key"]
    mac = hmac.new(auth, _canonical({k: v for k, v in doc.items() if k != "mac"}), hashlib.sha256).digest()
    assert mac == V["mac (version 2)"] == base64.b64decode(doc["mac"])
    # the keystore's writer, given the vector's KEM output and nonce, writes the same document
    ct = base64.b64decode(doc["kem_ciphertext"])
    monkeypatch.setattr(crypto, "kem_encapsulate", lambda kem, public: (V["hybrid shared secret"], ct))
    monkeypatch.setattr(crypto, "random_bytes", lambda n: nonce)
    written = keyfile.wrap(
        doc["key_id"], doc["kem"], ident, V["volume key (hybrid)"], sealed=True, commit_secret=V["commit secret"]
    )
    assert written == doc


def test_pin_and_commitment_known_answer(tmp_path):
    from qwamos.keystore import pin
    from qwamos.keystore.identity import Identity
    from qwamos.volume.keys import key_commitment

    ident = Identity.from_private(V["identity private key"])
    assert pin.document(ident, True) == PIN_DOC
    mac = hmac.new(V["auth key"], _canonical({k: v for k, v in PIN_DOC.items() if k != "mac"}), hashlib.sha256)
    assert base64.b64encode(mac.digest()).decode() == PIN_DOC["mac"]
    pin.verify(pin.parse(json.dumps(PIN_DOC).encode(), tmp_path / "identity.pin"), tmp_path, ident)
    label = b"qwamos/qvol/v2/key-commitment"
    K, S, uuid = V["volume key (hybrid)"], V["commit secret"], V["volume uuid"]
    expected = hmac.new(S, label + uuid + hashlib.sha256(K).digest() + V2_DOC["key_id"].encode(), hashlib.sha256)
    assert expected.digest() == V["key commitment"] == key_commitment(S, K, uuid, V2_DOC["key_id"])


def test_key_file_known_answer_through_a_real_keystore(tmp_path):
    """The vector files dropped into a keystore whose identity is the vector's: both keys come out."""
    from qwamos.keystore import PQCKeystore
    from qwamos.keystore.files import write_private
    from qwamos.keystore.identity import Identity, private_document, public_document
    from qwamos.keystore.sealing import Argon2Params

    ks_dir = tmp_path / "ks"
    ks_dir.mkdir(mode=0o700)
    ident = Identity.from_private(V["identity private key"])
    write_private(ks_dir / "identity.key", json.dumps(private_document(ident, None, Argon2Params())).encode())
    write_private(ks_dir / "identity.pub", json.dumps(public_document(ident)).encode())
    for doc in (HYBRID_DOC, LEGACY_DOC):
        write_private(ks_dir / f"{doc['key_id']}.key", json.dumps(doc, indent=2).encode())
    ks = PQCKeystore(ks_dir, passphrase=b"")
    assert ks.volume_key(HYBRID_DOC["key_id"]) == V["volume key (hybrid)"]
    assert ks.volume_key(LEGACY_DOC["key_id"]) == V["volume key (legacy)"]
    # the first open pinned the keystore and upgraded both files to version 2 (MACed, same keys)
    for doc in (HYBRID_DOC, LEGACY_DOC):
        upgraded = json.loads((ks_dir / f"{doc['key_id']}.key").read_text())
        assert upgraded["version"] == 2 and upgraded["commitment_required"] is False
    assert json.loads((ks_dir / "identity.pin").read_text())["legacy_key_files"] == {}
    fresh = PQCKeystore(ks_dir, passphrase=b"")
    assert fresh.volume_key(HYBRID_DOC["key_id"]) == V["volume key (hybrid)"]
    # a version 1 file written after the pin (here: the original vector put back) is refused as forged
    write_private(ks_dir / f"{HYBRID_DOC['key_id']}.key", json.dumps(HYBRID_DOC, indent=2).encode())
    with pytest.raises(KeyFileCorruptError, match="did not hold when it was pinned"):
        PQCKeystore(ks_dir, passphrase=b"").volume_key(HYBRID_DOC["key_id"])
    with pytest.raises(KeyFileCorruptError, match="did not hold when it was pinned"):
        PQCKeystore(ks_dir).get_metadata(HYBRID_DOC["key_id"])


def test_key_file_vector_refuses_a_changed_byte_of_every_field(tmp_path):
    from qwamos.keystore import keyfile
    from qwamos.keystore.identity import Identity

    ident = Identity.from_private(V["identity private key"])
    path = tmp_path / f"{HYBRID_DOC['key_id']}.key"
    for field in ("kem_ciphertext", "nonce", "wrapped_key"):
        raw = bytearray(base64.b64decode(HYBRID_DOC[field]))
        raw[len(raw) // 2] ^= 1
        doc = dict(HYBRID_DOC, **{field: base64.b64encode(raw).decode()})
        with pytest.raises(KeyFileCorruptError):
            keyfile.unwrap_v1(keyfile.parse(json.dumps(doc).encode(), path, doc["key_id"]), path, ident)
    for field in ("kem_ciphertext", "nonce", "wrapped_key", "mac"):
        raw = bytearray(base64.b64decode(V2_DOC[field]))
        raw[len(raw) // 2] ^= 1
        doc = dict(V2_DOC, **{field: base64.b64encode(raw).decode()})
        with pytest.raises(KeyFileCorruptError, match="MAC check failed"):
            keyfile.unwrap(keyfile.parse(json.dumps(doc).encode(), path, doc["key_id"]), path, ident)


# --- sealed documents (Argon2id + ChaCha20-Poly1305) ------------------------------------------------------

PASSPHRASE = b"correct horse battery staple"


def test_sealed_identity_known_answer(tmp_path, monkeypatch):
    from qwamos.keystore import identity as idmod
    from qwamos.keystore import sealing

    doc = SEALED_IDENTITY_DOC
    assert sealing.open_sealed(doc, PASSPHRASE, tmp_path / "identity.key", info=idmod.SEAL_INFO) == bytes(
        range(96)
    )
    # the documented recipe with the crypto library directly
    salt, nonce = base64.b64decode(doc["salt"]), base64.b64decode(doc["nonce"])
    p = doc["kdf_params"]
    stretched = Argon2id(
        salt=salt, length=32, iterations=p["iterations"], lanes=p["lanes"], memory_cost=p["memory_kib"]
    ).derive(PASSPHRASE)
    assert stretched == V["argon2id output (identity seal)"]
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"", info=idmod.SEAL_INFO).derive(stretched)
    assert key == V["seal key (identity)"]
    aad = _canonical({k: v for k, v in doc.items() if k != "ciphertext"})
    sealed = ChaCha20Poly1305(key).encrypt(nonce, V["identity private key"], aad)
    assert base64.b64encode(sealed).decode() == doc["ciphertext"]
    # and the keystore's writer, given the vector's salt and nonce, writes the same document
    monkeypatch.setattr(crypto, "new_salt", lambda size=16: salt)
    monkeypatch.setattr(crypto, "new_nonce", lambda: nonce)
    ident = idmod.Identity.from_private(V["identity private key"])
    params = sealing.Argon2Params(memory_kib=p["memory_kib"], iterations=p["iterations"], lanes=p["lanes"])
    assert idmod.private_document(ident, PASSPHRASE, params) == doc


def test_sealed_identity_vector_refuses_every_changed_field_and_a_wrong_passphrase(tmp_path):
    from qwamos.keystore import identity as idmod
    from qwamos.keystore import sealing

    path = tmp_path / "identity.key"
    doc = SEALED_IDENTITY_DOC
    with pytest.raises(AuthenticationFailed):
        sealing.open_sealed(doc, b"correct horse battery stapler", path, info=idmod.SEAL_INFO)
    variants = [
        dict(doc, fingerprint="0000000000000000"),
        dict(doc, version=2),
        dict(doc, kdf_params=dict(doc["kdf_params"], memory_kib=128)),
        dict(doc, kdf_params=dict(doc["kdf_params"], iterations=1)),
        dict(doc, salt=base64.b64encode(bytes(16)).decode()),
        dict(doc, nonce=base64.b64encode(bytes(12)).decode()),
    ]
    for changed in variants:
        with pytest.raises(AuthenticationFailed):
            sealing.open_sealed(changed, PASSPHRASE, path, info=idmod.SEAL_INFO)
    with pytest.raises(AuthenticationFailed):  # the same passphrase and salt under the other purpose's label
        sealing.open_sealed(doc, PASSPHRASE, path, info=b"qwamos/keystore/v1/recovery-seal")


def test_identity_pub_whose_fingerprint_field_does_not_match_its_key_is_refused(tmp_path):
    from qwamos.keystore import PQCKeystore
    from qwamos.keystore.files import write_private
    from qwamos.keystore.identity import Identity, private_document, public_document
    from qwamos.keystore.sealing import Argon2Params

    ks_dir = tmp_path / "ks"
    ks_dir.mkdir(mode=0o700)
    ident = Identity.from_private(V["identity private key"])
    write_private(ks_dir / "identity.key", json.dumps(private_document(ident, None, Argon2Params())).encode())
    pub = dict(public_document(ident), fingerprint="0123456789abcdef")  # the right key, a wrong label
    write_private(ks_dir / "identity.pub", json.dumps(pub).encode())
    write_private(ks_dir / f"{HYBRID_DOC['key_id']}.key", json.dumps(HYBRID_DOC).encode())
    with pytest.raises(KeyFileCorruptError, match="fingerprint does not match"):
        PQCKeystore(ks_dir, passphrase=b"").volume_key(HYBRID_DOC["key_id"])
