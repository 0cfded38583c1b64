"""Runs of AEAD records (``crypto.Aead.open_records`` / ``seal_records``), in both implementations.

The C extension ``qwamos._aead_runs`` (OpenSSL's EVP, without the GIL) and the Python loop over the library's
calls must be interchangeable: every test of the crypto module's API runs on both (the ``aead_runs``
fixture), and each checks the bytes against the library's own single-record ``encrypt``/``decrypt``, so a
record sealed under the wrong nonce, AAD or key, or opened without its tag being checked, fails here.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from qwamos import crypto

LIBRARY = {crypto.CHACHA20_POLY1305: ChaCha20Poly1305, crypto.AES_256_GCM: AESGCM}
KEY = bytes(range(32))
NONCE_OFF = 5  # an odd prefix before the nonce, and slack after the tag: offsets must be honoured
LENGTH = 1000
SLACK = 3
STRIDE = NONCE_OFF + 12 + LENGTH + 16 + SLACK
AAD_LEN = 29
COUNT = 9


def _reference_run(alg: str, count: int = COUNT) -> tuple[bytearray, bytes, bytes, list[bytes]]:
    """(records, plaintexts, aads, nonces): ``count`` records sealed one at a time by the library itself, each
    with its own random nonce, plaintext and AAD."""
    lib = LIBRARY[alg](KEY)
    plain = os.urandom(count * LENGTH)
    aads = os.urandom(count * AAD_LEN)
    nonces = [os.urandom(12) for _ in range(count)]
    records = bytearray(os.urandom(count * STRIDE))  # noise in the prefix and slack, which must not matter
    for i, nonce in enumerate(nonces):
        o = i * STRIDE + NONCE_OFF
        sealed = lib.encrypt(nonce, plain[i * LENGTH : (i + 1) * LENGTH], aads[i * AAD_LEN : (i + 1) * AAD_LEN])
        records[o : o + 12 + LENGTH + 16] = nonce + sealed
    return records, plain, aads, nonces


def _open(alg: str, records, aads, out, count: int = COUNT) -> list[int]:
    return crypto.Aead(alg, KEY).open_records(records, STRIDE, NONCE_OFF, LENGTH, aads, AAD_LEN, out, count)


@pytest.mark.parametrize("alg", crypto.ALGORITHMS)
def test_a_run_opens_what_the_library_sealed_record_by_record(alg, aead_runs):
    records, plain, aads, _ = _reference_run(alg)
    out = bytearray(COUNT * LENGTH)
    assert _open(alg, records, aads, memoryview(out)) == []
    assert out == plain


@pytest.mark.parametrize("alg", crypto.ALGORITHMS)
def test_a_sealed_run_is_what_the_library_seals_record_by_record(alg, aead_runs):
    records, plain, aads, nonces = _reference_run(alg)
    mine = bytearray(os.urandom(COUNT * STRIDE))
    for i, nonce in enumerate(nonces):
        mine[i * STRIDE + NONCE_OFF : i * STRIDE + NONCE_OFF + 12] = nonce
    before = bytes(mine)
    crypto.Aead(alg, KEY).seal_records(plain, LENGTH, memoryview(mine), STRIDE, NONCE_OFF, aads, AAD_LEN, COUNT)
    for i in range(COUNT):
        lo, hi = i * STRIDE + NONCE_OFF, i * STRIDE + NONCE_OFF + 12 + LENGTH + 16
        assert mine[lo:hi] == records[lo:hi], f"record {i} differs from the library's"
        # the bytes around each record are left alone
        assert mine[i * STRIDE : lo] == before[i * STRIDE : lo]
        assert mine[hi : (i + 1) * STRIDE] == before[hi : (i + 1) * STRIDE]


@pytest.mark.parametrize("alg", crypto.ALGORITHMS)
@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag", "aad"])
def test_a_record_that_does_not_authenticate_is_named_and_its_plaintext_zeroed(alg, where, aead_runs):
    records, plain, aads, _ = _reference_run(alg)
    aads = bytearray(aads)
    k = 4
    o = k * STRIDE + NONCE_OFF
    if where == "nonce":
        records[o + 3] ^= 0x01
    elif where == "ciphertext":
        records[o + 12 + LENGTH - 1] ^= 0x80
    elif where == "tag":
        records[o + 12 + LENGTH + 15] ^= 0x01
    else:
        aads[k * AAD_LEN] ^= 0x01
    out = bytearray(b"\xee" * (COUNT * LENGTH))
    assert _open(alg, records, aads, memoryview(out)) == [k]
    assert out[k * LENGTH : (k + 1) * LENGTH] == bytes(LENGTH)  # no unauthenticated byte reaches the caller
    assert out[: k * LENGTH] == plain[: k * LENGTH]
    assert out[(k + 1) * LENGTH :] == plain[(k + 1) * LENGTH :]


@pytest.mark.parametrize("alg", crypto.ALGORITHMS)
def test_records_swapped_between_positions_or_opened_under_another_key_fail(alg, aead_runs):
    records, _, aads, _ = _reference_run(alg)
    r1 = bytes(records[STRIDE : 2 * STRIDE])
    records[STRIDE : 2 * STRIDE] = records[2 * STRIDE : 3 * STRIDE]
    records[2 * STRIDE : 3 * STRIDE] = r1
    out = bytearray(COUNT * LENGTH)
    assert _open(alg, records, aads, memoryview(out)) == [1, 2]
    other = crypto.Aead(alg, bytes(32))
    assert other.open_records(records, STRIDE, NONCE_OFF, LENGTH, aads, AAD_LEN, memoryview(out), COUNT) == list(
        range(COUNT)
    )
    assert out == bytes(COUNT * LENGTH)


def test_an_empty_run_does_nothing(aead_runs):
    out = bytearray(b"\xee" * 8)
    assert _open(crypto.CHACHA20_POLY1305, b"", b"", memoryview(out), count=0) == []
    assert out == b"\xee" * 8


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"count": COUNT + 1}, "src"),  # one record more than the buffer holds
        ({"records_cut": SLACK + 1}, "src"),  # the last tag one byte short (the slack after it cut)
        ({"stride": STRIDE - SLACK - 1}, "src"),  # a stride shorter than a record
        ({"nonce_off": -1}, "src"),
        ({"count": -1}, "src"),
        ({"aads_cut": 1}, "aads"),
        ({"out_cut": 1}, "out"),
    ],
)
def test_a_geometry_that_does_not_fit_its_buffers_is_refused_before_any_byte_is_written(change, what, aead_runs):
    records, _, aads, _ = _reference_run(crypto.CHACHA20_POLY1305)
    records = records[: len(records) - change.get("records_cut", 0)]
    aads = aads[: len(aads) - change.get("aads_cut", 0)]
    out = bytearray(b"\xee" * (COUNT * LENGTH - change.get("out_cut", 0)))
    a = crypto.Aead(crypto.CHACHA20_POLY1305, KEY)
    stride, nonce_off, count = (
        change.get(k, d) for k, d in (("stride", STRIDE), ("nonce_off", NONCE_OFF), ("count", COUNT))
    )
    with pytest.raises(ValueError, match=what):
        a.open_records(records, stride, nonce_off, LENGTH, aads, AAD_LEN, memoryview(out), count)
    assert out == b"\xee" * len(out)
    plain = bytes(COUNT * LENGTH - change.get("out_cut", 0))
    sealed = bytearray(records)
    with pytest.raises(ValueError):
        a.seal_records(plain, LENGTH, memoryview(sealed), stride, nonce_off, aads, AAD_LEN, count)
    assert sealed == records


def test_the_output_must_be_writable(aead_runs):
    records, _, aads, _ = _reference_run(crypto.AES_256_GCM)
    with pytest.raises(TypeError):
        crypto.Aead(crypto.AES_256_GCM, KEY).open_records(
            records, STRIDE, NONCE_OFF, LENGTH, aads, AAD_LEN, bytes(COUNT * LENGTH), COUNT
        )


def test_the_extension_refuses_an_unknown_algorithm_and_a_key_of_the_wrong_size():
    """Its own argument checks (``crypto.Aead`` checks these before either implementation runs)."""
    _aead_runs = pytest.importorskip("qwamos._aead_runs", reason="the C extension is not built here")

    out = bytearray(LENGTH)
    records, _, aads, _ = _reference_run(crypto.CHACHA20_POLY1305, count=1)
    with pytest.raises(ValueError, match="algorithm"):
        _aead_runs.open_records(3, KEY, records, STRIDE, NONCE_OFF, LENGTH, aads, AAD_LEN, out, 1)
    with pytest.raises(ValueError, match="key"):
        _aead_runs.open_records(1, KEY[:31], records, STRIDE, NONCE_OFF, LENGTH, aads, AAD_LEN, out, 1)
    assert _aead_runs.open_records(1, KEY, records, STRIDE, NONCE_OFF, LENGTH, aads, AAD_LEN, out, 1) == []


@pytest.mark.parametrize("alg", crypto.ALGORITHMS)
def test_an_extension_that_cannot_run_openssl_is_set_aside_for_the_python_loop(alg, monkeypatch, caplog):
    """E.g. a system OpenSSL limited to FIPS algorithms (no ChaCha20-Poly1305): the C code raises
    RuntimeError (never for a record that fails to authenticate), and the run, and every later one, is done by
    the Python loop instead, with one warning saying so."""

    class Broken:
        OPENSSL_VERSION = "OpenSSL 0.0.0 (test)"

        @staticmethod
        def open_records(*args):
            args[8][:16] = b"half-done output"  # whatever it left in the output is written again
            raise RuntimeError("OpenSSL failed to set up the AEAD (not an authentication failure)")

        @staticmethod
        def seal_records(*args):
            raise RuntimeError("OpenSSL failed to seal a record")

    monkeypatch.delenv("QWAMOS_AEAD_RUNS", raising=False)
    monkeypatch.setattr(crypto, "_native_runs", Broken)
    monkeypatch.setattr(crypto, "_native_failure", None)
    assert crypto.runs_implementation() == "native (OpenSSL 0.0.0 (test))"
    records, plain, aads, _ = _reference_run(alg)
    records[4 * STRIDE + NONCE_OFF + 12] ^= 0x01
    out = bytearray(b"\xee" * (COUNT * LENGTH))
    with caplog.at_level("WARNING", logger="qwamos.crypto"):
        assert _open(alg, records, aads, memoryview(out)) == [4]
    assert out[: 4 * LENGTH] == plain[: 4 * LENGTH] and out[4 * LENGTH : 5 * LENGTH] == bytes(LENGTH)
    assert out[5 * LENGTH :] == plain[5 * LENGTH :]
    assert crypto.runs_implementation().startswith("python (the C extension failed: OpenSSL failed to set up")
    assert [r.getMessage() for r in caplog.records if r.name == "qwamos.crypto"] == [
        "the C loop for runs of blocks failed (OpenSSL failed to set up the AEAD (not an authentication failure));"
        " using the Python loop from now on"
    ]
    # set aside for good: sealing goes to the Python loop without trying the extension again
    records[4 * STRIDE + NONCE_OFF + 12] ^= 0x01
    mine = bytearray(records)
    crypto.Aead(alg, KEY).seal_records(plain, LENGTH, memoryview(mine), STRIDE, NONCE_OFF, aads, AAD_LEN, COUNT)
    assert mine == records
    monkeypatch.setattr(crypto, "_native_failure", None)  # and a seal that fails in C is redone too
    mine = bytearray(records)
    for i in range(COUNT):
        mine[i * STRIDE + NONCE_OFF + 12 : (i + 1) * STRIDE - SLACK] = bytes(LENGTH + 16)
    crypto.Aead(alg, KEY).seal_records(plain, LENGTH, memoryview(mine), STRIDE, NONCE_OFF, aads, AAD_LEN, COUNT)
    assert mine == records
