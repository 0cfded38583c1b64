"""Property test: any sequence of writes, block writes, discards and zeroings matches a plain bytearray."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MemoryKeys
from qwamos.volume import PQCVolume

SIZE = 9 * 4096 + 1000  # odd-sized: the last block is partial
BLOCKS = 10


def _cap(i: int) -> int:
    return min(4096, SIZE - i * 4096)


@st.composite
def operations(draw):
    kind = draw(st.sampled_from(["write", "write_block", "discard", "zero", "reopen"]))
    if kind == "write_block":
        i = draw(st.integers(0, BLOCKS - 1))
        return kind, i, draw(st.binary(min_size=1, max_size=_cap(i)))
    if kind == "reopen":
        return (kind,)
    off = draw(st.integers(0, SIZE - 1))
    n = draw(st.integers(0, min(SIZE - off, 3 * 4096 + 7)))
    if kind == "write":
        return kind, off, draw(st.binary(min_size=n, max_size=n))
    return kind, off, n


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operations(), min_size=1, max_size=12))
def test_volume_matches_a_bytearray(ops):
    with tempfile.TemporaryDirectory(prefix="qvol-model-") as d:
        keys = MemoryKeys()
        vol = PQCVolume(Path(d) / "m.qvol", keystore=keys)
        vol.create("m", "vm", size_bytes=SIZE, epoch_limit=5)  # tiny limit: rekeys happen along the way
        model = bytearray(SIZE)
        blen: dict[int, int] = {}  # blocks last written by write_block, with their lengths
        vol.open()
        try:
            for op in ops:
                kind = op[0]
                if kind == "reopen":
                    vol.close()
                    vol.open()
                    continue
                if kind == "write_block":
                    _, i, data = op
                    vol.write_block(i, data)
                    model[i * 4096 : i * 4096 + _cap(i)] = data + bytes(_cap(i) - len(data))
                    blen[i] = len(data)
                    continue
                _, off, arg = op
                n = len(arg) if kind == "write" else arg
                if kind == "write":
                    vol.write(off, arg)
                    model[off : off + n] = arg
                elif kind == "discard":
                    vol.discard(off, n)
                    model[off : off + n] = bytes(n)
                else:
                    vol.write_zeroes(off, n, may_trim=False)
                    model[off : off + n] = bytes(n)
                for i in range(off // 4096, (off + n + 4095) // 4096) if n else ():
                    blen.pop(i, None)
            assert vol.read(0, SIZE) == bytes(model)
            for i in range(BLOCKS):
                expect = model[i * 4096 : i * 4096 + blen.get(i, _cap(i))]
                assert vol.read_block(i) == expect
            assert vol.check() == []
        finally:
            vol.close()
