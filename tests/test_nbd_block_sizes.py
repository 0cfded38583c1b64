"""The block sizes the export advertises, read back by real clients (nbdinfo, qemu-img) through a real
`qwamos volume serve`: 4096 minimum and preferred for a volume that is whole 4 KiB blocks, a 512-byte
minimum for one that is not (a migrated disk keeps its exact size, and QEMU refuses a disk whose size is
not a multiple of the minimum block size), 1 MiB maximum payload in both cases."""

from __future__ import annotations

import json
import subprocess

import pytest

from nbd_helpers import serving, uri
from qwamos.nbd import constants as c

pytestmark = pytest.mark.qemu


def run(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"
    return res.stdout


@pytest.mark.parametrize(
    ("size", "minimum"),
    [(4 << 20, 4096), ((4 << 20) + 512, 512), ((4 << 20) + 3 * 512, 512), (8192 + 1024, 512)],
    ids=["whole-blocks", "plus-512", "plus-1536", "small-odd"],
)
def test_nbdinfo_and_qemu_read_back_the_advertised_block_sizes(tmp_path, short_dir, size, minimum):
    from qwamos.keystore import PQCKeystore
    from qwamos.volume import PQCVolume

    ks, vol, sock = tmp_path / "ks", tmp_path / "v.qvol", short_dir / "s"
    PQCVolume(vol, keystore=PQCKeystore(ks)).create("v", "vm", size_bytes=size)
    with serving(vol, ks, sock):
        info = json.loads(run("nbdinfo", "--json", uri(sock)))["exports"][0]
        assert info["export-size"] == size
        assert (info["block_size_minimum"], info["block_size_preferred"], info["block_size_maximum"]) == (
            minimum,
            4096,
            c.MAX_PAYLOAD,
        )
        # QEMU accepts the export at its exact size (it refuses one that is not a multiple of the minimum)
        assert f"({size} bytes)" in run("qemu-img", "info", "-f", "raw", uri(sock))
        # and a client honouring the minimum can write the last minimum-sized piece and read it back
        run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a {size - minimum} {minimum}", uri(sock))
        run("qemu-io", "-f", "raw", "-c", f"read -P 0x5a {size - minimum} {minimum}", uri(sock))
