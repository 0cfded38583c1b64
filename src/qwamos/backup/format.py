"""The bytes of a backup repository (docs/backup-format.md): keys, chunks, sealed documents.

Everything here is pure: it encodes, seals, opens and checks; :mod:`qwamos.backup.repo` moves the files.

Keys (``R`` the repository's 32-byte master key, ``rid`` its 16-byte id)::

    id_key     = HKDF-SHA256(R, salt=rid, info="qwamos/backup/v1/chunk-id")    chunk ids (keyed MAC: dedup
                                                                               without revealing content hashes)
    chunk_key  = HKDF-SHA256(R, salt=rid, info="qwamos/backup/v1/chunk")       chunk AEAD
    meta_key   = HKDF-SHA256(R, salt=rid, info="qwamos/backup/v1/metadata")    manifest and archive AEAD
    config_key = HKDF-SHA256(R, salt=rid, info="qwamos/backup/v1/config")      the config's MAC

A chunk is a run of up to 256 blocks (1 MiB) of a volume, compressed with zstd when that saves bytes, then
sealed; its id is ``HMAC-SHA256(id_key, plaintext)`` and its AAD binds the repository and the id, so a chunk
moved to another id, another repository or another position (whose manifest entry names another id) fails.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import zstandard

from qwamos import crypto, strictjson
from qwamos.errors import AuthenticationFailed, RepositoryCorruptError
from qwamos.keystore.files import canonical_json

BLOCK = 4096
CHUNK_BLOCKS = 256  # blocks per chunk at most (and the alignment of chunk windows)
MAX_CHUNK = CHUNK_BLOCKS * BLOCK
ZSTD_LEVEL = 3
MAGIC_CHUNK = b"QWAMOS-BKP-CHNK1"
MAGIC_ARCHIVE = b"QWAMOS-BKP-ARCH1"
MAGIC_MANIFEST = b"QWAMOS-BKP-MANI1"
MAGIC_PACK = b"QWAMOS-BKP-PACK1"
PACK_HEADER = len(MAGIC_PACK) + 16  # magic || repo id
COMP_NONE, COMP_ZSTD = 0, 1
_PAYLOAD_HEAD = struct.Struct(">BI")  # compression, plaintext length
CHUNK_OVERHEAD = crypto.NONCE_SIZE + _PAYLOAD_HEAD.size + crypto.TAG_SIZE
MAX_DOCUMENT = 256 * 1024 * 1024  # a sealed manifest or archive, decompressed
ID_SIZE = 32


@dataclass(frozen=True)
class RepoKeys:
    """The subkeys of one repository."""

    repo_id: bytes
    algorithm: str
    id_key: bytes = field(repr=False)
    chunk_key: bytes = field(repr=False)
    meta_key: bytes = field(repr=False)
    config_key: bytes = field(repr=False)

    @classmethod
    def derive(cls, master: bytes, repo_id: bytes, algorithm: str) -> RepoKeys:
        def sub(label: str) -> bytes:
            return crypto.hkdf_sha256(master, salt=repo_id, info=f"qwamos/backup/v1/{label}".encode())

        return cls(repo_id, algorithm, sub("chunk-id"), sub("chunk"), sub("metadata"), sub("config"))

    def chunk_id(self, plaintext: bytes | memoryview) -> bytes:
        return crypto.hmac_sha256(self.id_key, plaintext)


class Codec:
    """Compression and sealing of chunks under one repository's keys (not thread-safe: one per thread)."""

    def __init__(self, keys: RepoKeys, level: int = ZSTD_LEVEL) -> None:
        self.keys = keys
        self._aead = crypto.Aead(keys.algorithm, keys.chunk_key)
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._dctx = zstandard.ZstdDecompressor()

    def _aad(self, chunk_id: bytes) -> bytes:
        return MAGIC_CHUNK + self.keys.repo_id + chunk_id

    def seal(self, chunk_id: bytes, plaintext: bytes | memoryview) -> bytes:
        """``nonce || AEAD(chunk_key, nonce, u8 comp || u32 len || data, AAD)``: zstd unless it saves nothing."""
        packed = self._cctx.compress(plaintext)
        if len(packed) < len(plaintext):
            payload = _PAYLOAD_HEAD.pack(COMP_ZSTD, len(plaintext)) + packed
        else:
            payload = _PAYLOAD_HEAD.pack(COMP_NONE, len(plaintext)) + bytes(plaintext)
        nonce = crypto.new_nonce()
        return nonce + self._aead.seal(nonce, payload, self._aad(chunk_id))

    def open(self, chunk_id: bytes, record: bytes, expected_len: int, repo: str) -> bytes:
        """The plaintext of a chunk record, checked: AEAD (repository and id bound), declared and actual length,
        and the id recomputed over the plaintext."""
        if len(record) < CHUNK_OVERHEAD:
            raise RepositoryCorruptError(repo=repo, msg=f"chunk {chunk_id.hex()[:16]} is cut short")
        try:
            payload = self._aead.open(
                record[: crypto.NONCE_SIZE], record[crypto.NONCE_SIZE :], self._aad(chunk_id)
            )
        except AuthenticationFailed:
            raise RepositoryCorruptError(
                repo=repo, msg=f"chunk {chunk_id.hex()[:16]} failed authentication (modified, moved or foreign)"
            ) from None
        comp, length = _PAYLOAD_HEAD.unpack_from(payload)
        if length != expected_len or length > MAX_CHUNK or comp not in (COMP_NONE, COMP_ZSTD):
            raise RepositoryCorruptError(repo=repo, msg=f"chunk {chunk_id.hex()[:16]} has the wrong length")
        data = payload[_PAYLOAD_HEAD.size :]
        if comp == COMP_ZSTD:
            try:
                data = self._dctx.decompress(data, max_output_size=length)
            except zstandard.ZstdError:
                raise RepositoryCorruptError(
                    repo=repo, msg=f"chunk {chunk_id.hex()[:16]} does not decompress"
                ) from None
        if len(data) != length or not crypto.constant_time_eq(self.keys.chunk_id(data), chunk_id):
            raise RepositoryCorruptError(repo=repo, msg=f"chunk {chunk_id.hex()[:16]} does not match its id")
        return data


def seal_document(keys: RepoKeys, magic: bytes, name: bytes, obj: dict[str, Any]) -> bytes:
    """``magic || nonce || AEAD(meta_key, nonce, zstd(canonical JSON), AAD = magic || repo id || name)``."""
    body = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(canonical_json(obj))
    nonce = crypto.new_nonce()
    aead = crypto.Aead(keys.algorithm, keys.meta_key)
    return magic + nonce + aead.seal(nonce, body, magic + keys.repo_id + name)


def open_document(keys: RepoKeys, magic: bytes, name: bytes, data: bytes, repo: str, what: str) -> dict[str, Any]:
    """Open a sealed document; any change, a document of another name or repository: RepositoryCorruptError."""
    head = len(magic) + crypto.NONCE_SIZE
    if len(data) < head + crypto.TAG_SIZE or data[: len(magic)] != magic:
        raise RepositoryCorruptError(repo=repo, msg=f"{what} is not a sealed {magic.decode()} document")
    aead = crypto.Aead(keys.algorithm, keys.meta_key)
    try:
        body = aead.open(data[len(magic) : head], data[head:], magic + keys.repo_id + name)
    except AuthenticationFailed:
        raise RepositoryCorruptError(
            repo=repo, msg=f"{what} failed authentication (modified, renamed, or from another repository)"
        ) from None
    try:
        text = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_DOCUMENT)
        doc = strictjson.loads(text)
    except (zstandard.ZstdError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RepositoryCorruptError(repo=repo, msg=f"{what}: {e}") from None
    if not isinstance(doc, dict):
        raise RepositoryCorruptError(repo=repo, msg=f"{what} is not a JSON object")
    return doc
