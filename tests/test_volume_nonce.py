"""The nonce budget: reservations persisted before use, automatic rekey, refusal at the last epoch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import MemoryKeys
from qwamos.errors import NonceLimitError
from qwamos.volume import PQCVolume, read_header
from qwamos.volume import header as hdr
from qwamos.volume.keys import MAX_EPOCH, header_mac_key
from volume_helpers import file_digest, read_slot, write_header_copies


def slot_epoch(path, index) -> int:
    return int.from_bytes(read_slot(path, index)[:2], "big")


def test_lowered_limit_rekeys_automatically(tmp_path, keys):
    vol = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    vol.create("vol", "vm", size_bytes=32 * 4096, epoch_limit=4)
    with vol.open():
        for i in range(10):
            vol.write_block(i, f"block {i}".encode())
        assert vol.header.epoch == 2
        assert [slot_epoch(vol.path, i) for i in range(10)] == [0] * 4 + [1] * 4 + [2] * 2
        # one batched write of 8 blocks is split across epochs, still one key per slot
        vol.write(16 * 4096, os.urandom(8 * 4096))
        assert vol.header.epoch == 4
        assert sorted({slot_epoch(vol.path, i) for i in range(16, 24)}) == [2, 3, 4]
    fields = read_header(vol.path)
    assert fields["epoch"] == 4 and fields["epoch_limit"] == 4
    with vol.open():  # old and new blocks read back under their own epochs' keys
        assert [vol.read_block(i) for i in range(10)] == [f"block {i}".encode() for i in range(10)]
        assert vol.check() == []


def _rewrite_budget(path: Path, keys: MemoryKeys, epoch: int, reserved: int) -> None:
    data = path.read_bytes()[:4096]
    fields = hdr.parse_unverified(str(path), data)
    header = hdr.validate(str(path), fields)
    key = keys.volume_key(header.key_id)
    blob = hdr.encode(header.with_budget(epoch, reserved), header_mac_key(key, header.uuid_bytes, 2))
    write_header_copies(path, 0, blob)


def test_last_epoch_refuses_with_nonce_limit_error(tmp_path, keys):
    path = tmp_path / "v.qvol"
    vol = PQCVolume(path, keystore=keys)
    vol.create("vol", "vm", size_bytes=8 * 4096, epoch_limit=2)
    with vol.open():
        vol.write_block(0, b"early")
    _rewrite_budget(path, keys, MAX_EPOCH, 1)
    with vol.open():
        vol.write_block(1, b"the last encryption allowed")
        before = file_digest(path)
        with pytest.raises(NonceLimitError):
            vol.write_block(2, b"one too many")
        with pytest.raises(NonceLimitError):
            vol.write(0, bytes(8192))
        assert file_digest(path) == before  # nothing changed
        assert vol.read_block(0) == b"early" and vol.read_block(1) == b"the last encryption allowed"
        vol.discard(0, 4096)  # zeroing needs no nonce and still works
        assert vol.read_block(0) == bytes(4096)


def test_reservation_is_persisted_before_use_and_never_goes_back(tmp_path, keys):
    vol = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    vol.create("vol", "vm", size_bytes=8 * 4096)
    assert read_header(vol.path)["epoch_reserved"] == 0
    with vol.open():
        vol.write_block(0, b"a")
        assert read_header(vol.path)["epoch_reserved"] == 2**20  # on disk before the slot was written
        vol.write_block(1, b"b")
        assert read_header(vol.path)["epoch_reserved"] == 2**20  # within the reservation: no rewrite
    with vol.open():  # the new session counts the old reservation as used
        vol.write_block(2, b"c")
        assert read_header(vol.path)["epoch_reserved"] == 2**21


def test_small_limit_reopen_starts_a_new_epoch(tmp_path, keys):
    vol = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    vol.create("vol", "vm", size_bytes=8 * 4096, epoch_limit=100)
    with vol.open():
        vol.write_block(0, b"a")
    assert read_header(vol.path)["epoch_reserved"] == 100  # chunk clipped to the limit
    with vol.open():
        vol.write_block(1, b"b")
        assert vol.header.epoch == 1
        assert vol.read_block(0) == b"a" and vol.read_block(1) == b"b"


def test_crash_after_writes_then_reopen_continues_with_fresh_reservation(tmp_path, keys):
    """A writer killed without close(): its reservation stays counted; the next session reserves anew."""
    path = tmp_path / "v.qvol"
    vol = PQCVolume(path, keystore=keys)
    vol.create("vol", "vm", size_bytes=64 * 4096, epoch_limit=2**21)
    key_hex = keys.keys[vol_key := read_header(path)["key_id"]].hex()
    child = textwrap.dedent(
        f"""
        import os, sys
        from qwamos.volume import PQCVolume
        class K:
            def volume_key(self, key_id):
                return bytes.fromhex({key_hex!r})
        v = PQCVolume({str(path)!r}, keystore=K()).open()
        for i in range(40):
            v.write_block(i, b"x%d" % i)
        os._exit(0)  # crash: no close, no flush
        """
    )
    subprocess.run([sys.executable, "-c", child], check=True, timeout=60)
    assert read_header(path)["epoch_reserved"] == 2**20
    assert vol_key in keys.keys
    with vol.open():
        assert vol.read_block(39) == b"x39"
        vol.write_block(40, b"after the crash")
        assert read_header(path)["epoch_reserved"] == 2**21
        assert vol.header.epoch == 0


# --- nonce uniqueness, read back from the slots on disk (docs/qvol-format.md section 4: nonce = slot[4:16]) ---


def slot_key_and_nonce(path, index) -> tuple[int, bytes]:
    """(epoch, nonce) of a written slot: the epoch names the data key the nonce was used under."""
    slot = read_slot(path, index)
    assert slot != bytes(len(slot)), f"slot {index} was never written"
    return int.from_bytes(slot[:2], "big"), slot[4:16]


def assert_no_repeat(nonces: list[tuple[int, bytes]]) -> None:
    """No (epoch key, nonce) pair twice: a repeat under one key breaks ChaCha20-Poly1305 and AES-GCM."""
    seen: dict[tuple[int, bytes], int] = {}
    for i, key_nonce in enumerate(nonces):
        assert key_nonce not in seen, (
            f"nonce {key_nonce[1].hex()} (epoch {key_nonce[0]}) used twice: #{seen[key_nonce]} and #{i}"
        )
        seen[key_nonce] = i


def test_rewrites_of_one_block_never_repeat_a_nonce_through_every_write_path(tmp_path, keys):
    vol = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    vol.create("vol", "vm", size_bytes=64 * 4096)
    used = []
    with vol.open():
        for i in range(20):  # the one-block fast path, full and short blocks
            vol.write_block(0, bytes([i]) * (4096 if i % 2 else 17))
            used.append(slot_key_and_nonce(vol.path, 0))
        for i in range(10):  # the byte-range API: aligned runs, then an unaligned read-modify-write
            vol.write(0, bytes([i]) * (8 * 4096))
            used += [slot_key_and_nonce(vol.path, b) for b in range(8)]
            vol.write(100, b"patch %d" % i)
            used.append(slot_key_and_nonce(vol.path, 0))
    assert_no_repeat(used)
    assert {epoch for epoch, _ in used} == {0}  # all under one key: the repeats would have counted


def test_no_nonce_repeats_across_close_reopen_new_objects_and_new_processes(tmp_path, keys):
    path = tmp_path / "v.qvol"
    PQCVolume(path, keystore=keys).create("vol", "vm", size_bytes=16 * 4096)
    used = []
    for session in range(4):
        vol = PQCVolume(path, keystore=keys)  # a new object each time: no pool state carried over
        for _ in range(2):  # and the same object closed and reopened
            with vol.open():
                vol.write_block(0, b"session %d" % session)
                vol.write(4096, bytes([session]) * 3 * 4096)
            used += [slot_key_and_nonce(path, b) for b in range(4)]
    key_hex = keys.keys[read_header(path)["key_id"]].hex()
    child = textwrap.dedent(
        f"""
        from qwamos.volume import PQCVolume
        class K:
            def volume_key(self, key_id):
                return bytes.fromhex({key_hex!r})
        with PQCVolume({str(path)!r}, keystore=K()).open() as v:
            v.write_block(0, b"another process")
            v.write(4096, bytes(3 * 4096))
        """
    )
    for _ in range(2):
        subprocess.run([sys.executable, "-c", child], check=True, timeout=60)
        used += [slot_key_and_nonce(path, b) for b in range(4)]
    assert_no_repeat(used)
    assert {epoch for epoch, _ in used} == {0}


def test_a_forked_child_never_reuses_its_parent_s_nonces(tmp_path, keys):
    """The parent's pool holds thousands of unused nonces when it forks; the child must not hand them out
    while the parent goes on drawing the same ones (``os.register_at_fork`` empties every pool in the child).

    The fork happens in a fresh interpreter, not in the test process: that one may have other tests' threads
    by now, and a fork of a multi-threaded process may deadlock in the child (tests/crash_helpers.py)."""
    vol = PQCVolume(tmp_path / "v.qvol", keystore=keys)
    vol.create("vol", "vm", size_bytes=64 * 4096)
    n = 8
    key_hex = keys.keys[read_header(vol.path)["key_id"]].hex()
    scenario = textwrap.dedent(
        f"""
        import os
        from qwamos.volume import PQCVolume
        class K:
            def volume_key(self, key_id):
                return bytes.fromhex({key_hex!r})
        vol = PQCVolume({str(vol.path)!r}, keystore=K())
        with vol.open():
            vol.write_block(0, b"fills the pool")  # one refill: 4096 nonces, 4095 still unused
            pid = os.fork()
            if pid == 0:  # the child writes blocks 1..n with the inherited volume (and its inherited lock)
                code = 1
                try:
                    for i in range(1, {n} + 1):
                        vol.write_block(i, b"child %d" % i)
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            for i in range({n} + 1, 2 * {n} + 1):  # the parent's next nonces
                vol.write_block(i, b"parent %d" % i)
        """
    )
    subprocess.run([sys.executable, "-c", scenario], check=True)
    child = [slot_key_and_nonce(vol.path, i) for i in range(1, n + 1)]
    parent = [slot_key_and_nonce(vol.path, i) for i in range(0, 1)] + [
        slot_key_and_nonce(vol.path, i) for i in range(n + 1, 2 * n + 1)
    ]
    assert_no_repeat(parent + child)
    assert {epoch for epoch, _ in parent + child} == {0}
    with vol.open():
        assert [vol.read_block(i) for i in range(1, n + 1)] == [b"child %d" % i for i in range(1, n + 1)]
        assert [vol.read_block(i) for i in range(n + 1, 2 * n + 1)] == [
            b"parent %d" % i for i in range(n + 1, 2 * n + 1)
        ]
