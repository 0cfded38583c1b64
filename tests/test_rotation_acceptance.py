"""Issue 11 acceptance, as a reviewer checks it from outside: the real CLI on a standalone volume, the old
key taken from its ``key export`` document and tried by code written from the docs alone (no qwamos import:
docs/keystore-format.md "Recovery documents" and "Sealed documents", docs/qvol-format.md 2.1, 2.5.3, 3, 4),
``kill -9`` of the rotating command at random points then the same command again, every block compared.

The project's own tests check the same properties through its helpers (tests/test_key_rotate.py); this
module is the independent reading: if the format docs and the code drift apart, the checker here stops
finding the old key even in the copy taken before the rotation (its positive control) and fails.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qwamos.cli.main import main
from qwamos.keystore import PQCKeystore
from qwamos.volume import PQCVolume

SIZE = 40 << 20  # three journalled batches of 4096 slots: a kill can land between and inside them
RECOVERY_PASS = b"reviewer recovery passphrase"
CLI = [sys.executable, "-m", "qwamos.cli.main"]
MAGIC = b"QWAMOS-PQC-VOL-v1" + bytes(15)
SLOT, DATA_OFFSET, PAGE = 4128, 4096, 4096


# --- the independent reader (from the docs only) ----------------------------------------------------------


def _canon(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, info).derive(ikm)


def key_from_recovery_document(path: Path, passphrase: bytes) -> bytes:
    """The 32-byte volume key sealed in a ``qwamos key export`` document (Argon2id, HKDF, ChaCha20-Poly1305
    with the document's other fields as AAD; the plaintext starts with the key)."""
    doc = json.loads(path.read_bytes())
    assert doc["format"] == "qwamos-key-recovery" and doc["kdf"] == "argon2id"
    p, salt = doc["kdf_params"], base64.b64decode(doc["salt"])
    stretched = Argon2id(
        salt=salt, length=32, iterations=p["iterations"], lanes=p["lanes"], memory_cost=p["memory_kib"]
    ).derive(passphrase)
    aead_key = _hkdf(stretched, b"", b"qwamos/keystore/v1/recovery-seal")
    aad = _canon({k: v for k, v in doc.items() if k != "ciphertext"})
    plain = ChaCha20Poly1305(aead_key).decrypt(
        base64.b64decode(doc["nonce"]), base64.b64decode(doc["ciphertext"]), aad
    )
    return plain[:32]


def what_the_key_opens(vol: Path, key: bytes) -> list[tuple[str, int]]:
    """Everything in the file that authenticates under ``key``: any page holding a header copy (v1 or v2
    MAC key), any slot under its own epoch or any epoch up to the header's, a rotation journal descriptor
    anywhere in the metadata area."""
    raw = vol.read_bytes()
    (length,) = struct.unpack(">I", raw[32:36])
    header = json.loads(raw[36 : 36 + length])
    uuid = bytes.fromhex(header["volume_uuid"])
    cipher, alg_id = (ChaCha20Poly1305, 1) if header["algorithm"] == "chacha20-poly1305" else (AESGCM, 2)
    found: list[tuple[str, int]] = []
    mac_keys = [_hkdf(key, uuid, f"qwamos/qvol/v{v}/header-mac".encode()) for v in (1, 2)]
    for off in range(0, len(raw) - PAGE + 1, PAGE):
        page = raw[off : off + PAGE]
        if page[:32] == MAGIC and any(
            hmac.compare_digest(hmac.new(k, page[:4064], hashlib.sha256).digest(), page[4064:]) for k in mac_keys
        ):
            found.append(("header", off))
    data_keys: dict[int, object] = {}
    for i in range(header["total_blocks"]):
        slot = raw[DATA_OFFSET + i * SLOT : DATA_OFFSET + (i + 1) * SLOT]
        if slot == bytes(SLOT):
            continue
        (epoch,) = struct.unpack(">H", slot[:2])
        aad = uuid + struct.pack(">Q", i) + slot[:4] + bytes([alg_id])
        for e in {epoch, *range(header["epoch"] + 1)}:
            if e not in data_keys:
                data_keys[e] = cipher(_hkdf(key, uuid, b"qwamos/qvol/v1/data-epoch" + struct.pack(">H", e)))
            try:
                data_keys[e].decrypt(slot[4:16], slot[16:], aad)  # type: ignore[attr-defined]
            except InvalidTag:
                continue
            found.append(("slot", i))
    journal_key = _hkdf(key, uuid, b"qwamos/qvol/v2/rotation-journal")
    area = -(-(DATA_OFFSET + header["total_blocks"] * SLOT) // PAGE) * PAGE
    for off in range(area, len(raw) - PAGE + 1, PAGE):
        mac = hmac.new(journal_key, raw[off : off + 32] + struct.pack(">Q", off), hashlib.sha256).digest()
        if hmac.compare_digest(mac, raw[off + 32 : off + 64]):
            found.append(("journal", off))
    return found


# --- the walkthrough ---------------------------------------------------------------------------------------


@pytest.fixture
def standalone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A volume made by ``qwamos volume create`` (no VM), every 16th block written with random bytes (data in
    every journalled batch, little to check)."""
    ks_dir = tmp_path / "keystore"
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(ks_dir))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    monkeypatch.setenv("QWAMOS_ROOT", str(tmp_path / "root"))
    vol = tmp_path / "disk.qvol"
    assert main(["volume", "create", str(vol), "--size", str(SIZE)]) == 0
    rng = random.Random(11)
    blocks = {i: rng.randbytes(4096) for i in range(0, SIZE // 4096, 16)}
    with PQCVolume(vol, keystore=PQCKeystore(ks_dir)).open() as v:
        for i, data in blocks.items():
            v.write(i * 4096, data)
        key_id = v.key_id
    return {"vol": vol, "ks": ks_dir, "key_id": key_id, "blocks": blocks, "tmp": tmp_path}


def export_key(key_id: str, out: Path) -> None:
    r, w = os.pipe()
    os.write(w, RECOVERY_PASS + b"\n")
    os.close(w)
    try:
        assert main(["key", "export", key_id, "-o", str(out), "--recovery-passphrase-fd", str(r)]) == 0
    finally:
        os.close(r)


def assert_every_block(env: dict) -> None:
    with PQCVolume(env["vol"], keystore=PQCKeystore(env["ks"]), read_only=True).open() as v:
        step = 256  # blocks per read: 1 MiB
        for first in range(0, SIZE // 4096, step):
            got = v.read(first * 4096, step * 4096)
            want = b"".join(env["blocks"].get(i, bytes(4096)) for i in range(first, first + step))
            assert got == want, f"blocks {first}..{first + step - 1}"


def test_rotating_twice_the_exported_keys_open_nothing_and_their_files_are_gone(standalone, capsys) -> None:
    env, tmp = standalone, standalone["tmp"]
    before = tmp / "before.qvol"
    before.write_bytes(env["vol"].read_bytes())  # a copy made before the rotation (threat-model: stays readable)
    keys = [env["key_id"]]
    for n in range(2):  # rotating twice in a row: the successor is rotated in turn
        export_key(keys[-1], tmp / f"old{n}.json")
        capsys.readouterr()
        assert main(["key", "rotate", keys[-1], "--json"]) == 0
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # every line parses
        kinds = [e["event"] for e in events]
        assert kinds[0] == "successor" and kinds[-1] == "result" and "volume-done" in kinds
        assert kinds.index("volume-done") < kinds.index("destroyed") < kinds.index("result")
        new_id = events[-1]["new_key_id"]
        assert new_id.startswith("vm-disk-") and len(new_id) == len(keys[-1])  # named as its volume, not vm-vm-...
        destroyed = next(e for e in events if e["event"] == "destroyed")
        assert destroyed["key_id"] == keys[-1]
        for f in destroyed["files"]:
            assert not Path(f).exists()
        assert not any((env["ks"] / f"{keys[-1]}.{ext}").exists() for ext in ("key", "meta", "users"))
        assert (env["ks"] / f"{keys[-1]}.destroyed").exists()
        keys.append(new_id)
    assert_every_block(env)
    for n in range(2):
        old_key = key_from_recovery_document(tmp / f"old{n}.json", RECOVERY_PASS)
        assert what_the_key_opens(env["vol"], old_key) == [], f"old key {n} still opens something"
    # the checker is not vacuous: the first key opens both header copies and every written slot of the copy
    opened = what_the_key_opens(before, key_from_recovery_document(tmp / "old0.json", RECOVERY_PASS))
    assert sum(1 for kind, _ in opened if kind == "header") == 2
    assert {i for kind, i in opened if kind == "slot"} == set(env["blocks"])
    assert main(["key", "rotate", keys[0]]) == 29  # nothing left to do, and it says so
    assert "destroyed" in capsys.readouterr().err


def _kill_after_progress(argv: list[str], events_before_kill: int, rng: random.Random) -> int | None:
    """Run the CLI, SIGKILL it once it has reported ``events_before_kill`` progress events (plus a random
    moment of up to 0.3 s: where in the batch the kill lands); the exit status if it finished first."""
    proc = subprocess.Popen([*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        seen = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line)["event"] == "progress":
                seen += 1
                if seen >= events_before_kill:
                    time.sleep(rng.uniform(0, 0.3))  # a random kill point, not a synchronisation
                    proc.send_signal(signal.SIGKILL)
                    break
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_9_of_key_rotate_at_random_points_then_the_same_command_finishes(standalone) -> None:
    env, tmp = standalone, standalone["tmp"]
    export_key(env["key_id"], tmp / "old.json")
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    argv = ["key", "rotate", env["key_id"], "--json", "--rate", "48M"]
    statuses = [_kill_after_progress(argv, rng.randint(1, 3), rng) for _ in range(3)]
    assert -signal.SIGKILL in statuses, statuses  # at least one kill landed before the end
    done = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=300)
    if done.returncode == 29:  # an earlier run was killed after the very end: nothing left to do
        assert "nothing left to do" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
    ks = PQCKeystore(env["ks"])
    state, successor = ks.key_state(env["key_id"])
    assert state == "destroyed" and not (env["ks"] / f"{env['key_id']}.key").exists()
    assert PQCVolume(env["vol"], keystore=ks, read_only=True).open().key_id == successor
    assert_every_block(env)
    assert what_the_key_opens(env["vol"], key_from_recovery_document(tmp / "old.json", RECOVERY_PASS)) == []
    assert len(ks.list_keys()) == 1  # the kills made no second successor
