"""Shared pieces for the volume tests: file surgery helpers (the in-memory key provider is conftest's)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from qwamos.volume.header import HEADER_SIZE, SLOT_SIZE


def slot_offset(index: int) -> int:
    return HEADER_SIZE + index * SLOT_SIZE


def read_slot(path: Path, index: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(slot_offset(index))
        return f.read(SLOT_SIZE)


def read_head(path: Path | str) -> bytes:
    """The 4096 header bytes."""
    with open(path, "rb") as f:
        return f.read(HEADER_SIZE)


def header_copy_offsets(path: Path | str) -> list[int]:
    """Where the header copies of a complete v2 file are: copy A at 0, copy B in the last 4096 bytes."""
    return [0, os.path.getsize(path) - HEADER_SIZE]


def write_header_copies(path: Path | str, pos: int, data: bytes, offsets: list[int] | None = None) -> None:
    """Write ``data`` at ``pos`` inside every header copy (to damage or replace both, as one copy alone no
    longer stops a volume from opening)."""
    for off in offsets if offsets is not None else header_copy_offsets(path):
        write_at(path, off + pos, data)


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def flip_byte(path: Path | str, offset: int) -> None:
    """Damage one byte for certain: XOR it with 0xFF.  (Writing a constant instead leaves the byte as it was
    one time in 256 when it already held that value, and the test that expected damage then fails at random.)"""
    fd = os.open(path, os.O_RDWR)
    try:
        (old,) = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([old ^ 0xFF]), offset)
    finally:
        os.close(fd)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def random_chain_ops(chain, model: bytearray, rnd, steps: int, write_share: float, write) -> dict[str, bytes]:
    """``steps`` random operations on a snapshot chain and on a byte ``model`` of it: ``write(chain, model, rnd)``
    (a share ``write_share`` of them), then create, revert and delete (merge) of snapshots; after each one
    the chain must read exactly the model.  The snapshots left, name -> the model when each was taken."""
    snaps: dict[str, bytes] = {}
    counter = 0
    for _ in range(steps):
        op = rnd.random()
        if op < write_share:
            write(chain, model, rnd)
        elif op < 0.8 or not snaps:
            counter += 1
            chain.create(f"s{counter}")
            snaps[f"s{counter}"] = bytes(model)
        elif op < 0.9:
            name = rnd.choice(sorted(snaps))
            chain.revert(name)
            model[:] = snaps[name]
        else:
            name = rnd.choice(sorted(snaps))
            chain.delete(name)
            del snaps[name]
        assert chain.pread(0, len(model)) == model
    return snaps
