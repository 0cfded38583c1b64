"""``qwamos.crypto``'s named draws — the only places the library gets nonces, keys, salts and identifiers
(``tests/test_layering.py`` forbids every other source): sizes, shapes, and that draws differ."""

from __future__ import annotations

import re
import uuid

import pytest

from qwamos import crypto
from qwamos.errors import InvalidArgument


def test_sizes():
    assert len(crypto.new_volume_key()) == crypto.KEY_SIZE == 32
    assert len(crypto.new_nonce()) == crypto.NONCE_SIZE == 12
    assert len(crypto.new_nonces(4096)) == 4096 * 12
    assert len(crypto.new_salt()) == 16 and len(crypto.new_salt(32)) == 32
    assert len(crypto.new_scrub_bytes(100)) == 100
    assert re.fullmatch(r"[0-9a-f]{16}", crypto.new_id_hex(8))


def test_draws_differ():
    for draw in (crypto.new_volume_key, crypto.new_nonce, crypto.new_salt, crypto.new_uuid):
        assert len({draw() for _ in range(64)}) == 64
    block = crypto.new_nonces(1024)
    assert len({block[i : i + 12] for i in range(0, len(block), 12)}) == 1024


def test_uuid_is_version_4_rfc_variant():
    for _ in range(64):
        u = uuid.UUID(bytes=crypto.new_uuid())
        assert u.version == 4 and u.variant == uuid.RFC_4122


def test_mac_address_keeps_the_prefix():
    mac = crypto.new_mac_address("52:54:00")
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac)


def test_refuses_weak_requests():
    with pytest.raises(InvalidArgument):
        crypto.new_salt(8)
    with pytest.raises(InvalidArgument):
        crypto.new_nonces(0)
