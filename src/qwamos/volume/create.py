"""Making a new volume: argument checks and the fresh header.

The bytes go through the storage layer (:func:`qwamos.storage.create_storage`): written under a temporary
name, and made to appear at the volume's path atomically, so a failure leaves no partial file.
"""

from __future__ import annotations

from datetime import UTC, datetime

from qwamos import crypto
from qwamos.errors import InvalidArgument
from qwamos.volume import header as hdr
from qwamos.volume.header import BLOCK_SIZE, Header
from qwamos.volume.keys import key_commitment

MIB = 1024 * 1024


def resolve_size(size_mb: int | None, size_bytes: int | None) -> int:
    """Exactly one of the two sizes, checked, in bytes."""
    if (size_mb is None) == (size_bytes is None):
        raise InvalidArgument("give exactly one of size_mb and size_bytes")
    if size_mb is not None:
        if type(size_mb) is not int or size_mb < 1:
            raise InvalidArgument(f"size_mb must be a positive integer, got {size_mb!r}")
        return size_mb * MIB
    if type(size_bytes) is not int or size_bytes < 1:
        raise InvalidArgument(f"size_bytes must be a positive integer, got {size_bytes!r}")
    return size_bytes


def check_arguments(name: str, vm_name: str, size: int, epoch_limit: int | None) -> tuple[int, int]:
    """Refuse what the header could not hold; return ``(total_blocks, epoch_limit)``."""
    total = -(-size // BLOCK_SIZE)
    if total > hdr.MAX_TOTAL_BLOCKS:
        raise InvalidArgument(f"size {size} bytes exceeds the format's limit of {hdr.MAX_TOTAL_BLOCKS} blocks")
    limit = hdr.DEFAULT_EPOCH_LIMIT if epoch_limit is None else epoch_limit
    if type(limit) is not int or not 1 <= limit <= hdr.MAX_EPOCH_LIMIT:
        raise InvalidArgument(f"epoch_limit must be an integer in [1, 2**32], got {epoch_limit!r}")
    for label, value, empty_ok in (("name", name, False), ("vm_name", vm_name, True)):
        if not isinstance(value, str) or len(value) > hdr.MAX_NAME_LEN or (not value and not empty_ok):
            raise InvalidArgument(f"{label} must be a string of up to {hdr.MAX_NAME_LEN} characters")
    return total, limit


def new_header(
    name: str,
    vm_name: str,
    key_id: str,
    algorithm: str,
    total: int,
    size: int,
    epoch_limit: int,
    *,
    volume_key: bytes | None = None,
    commit_secret: bytes | None = None,
) -> Header:
    """The header of a volume about to be created: a fresh UUID, epoch 0, nothing reserved; with a
    ``commit_secret`` (from the key provider) the ``key_commitment`` feature committing to ``volume_key``."""
    uuid = crypto.new_uuid()  # shaped as a version-4 UUID; 122 random bits
    features: dict = {}
    if commit_secret is not None and volume_key is not None:
        value = key_commitment(commit_secret, volume_key, uuid, key_id).hex()
        features[hdr.KEY_COMMITMENT] = {"compat": hdr.INCOMPAT, "commitment": value}
    return Header(
        volume_uuid=uuid.hex(),
        name=name,
        vm_name=vm_name,
        key_id=key_id,
        algorithm=algorithm,
        total_blocks=total,
        size_bytes=size,
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        epoch_limit=epoch_limit,
        features=features,
    )
