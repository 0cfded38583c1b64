"""Every error the library raises, each with the exit code the CLI turns it into.

As in BorgBackup, an error class's docstring is its message template (``str.format`` over the keyword
arguments given to the constructor) and ``exit_code`` says how ``qwamos`` exits.  Library code raises;
:func:`run_main` is the one place an exception becomes a message and an exit status, called only by the
two process entry points (``qwamos.cli.main`` and the block export's ``python -m qwamos.nbd.export``).

Exit code ranges (documented in the README):
  0 ok, 1 warning, 2 generic error / bad usage,
  10-19 volume format, 20-29 keystore, 30-39 block export, 40-49 VM manager, 50-59 migration,
  60-69 storage (the byte store beneath the volume format; 10-19 were all taken), 70-79 backups.

Messages never contain key material or passphrases: constructors take names, paths and indices only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class QwamosError(Exception):
    """Error: {msg}"""

    exit_code = 2

    def __init__(self, msg: str = "", **kwargs: Any) -> None:
        self.kwargs = dict(kwargs, msg=msg)
        super().__init__(self.render())

    # The message in the CLI's words when the docstring's names a Python API argument (``overwrite=True``):
    # the CLI never shows Python-API wording (:func:`run_main` prints :meth:`cli_message`).
    cli_text: str | None = None

    def cli_message(self) -> str:
        """The message as the command line should say it."""
        return self.render(self.cli_text) if self.cli_text else str(self)

    def render(self, template: str | None = None) -> str:
        template = template or (type(self).__doc__ or "{msg}").strip().splitlines()[0]
        try:
            text = template.format(**self.kwargs)
        except (KeyError, IndexError):
            text = template
        msg = self.kwargs.get("msg")
        if msg and "{msg}" not in template:
            text = f"{text} {msg}".strip()
        return text


class InvalidArgument(QwamosError, ValueError):
    """Invalid argument: {msg}"""

    exit_code = 2


class NotATerminalError(QwamosError):
    """{what} needs a terminal, and stdin is not one: {msg}"""

    exit_code = 2


class ConfirmationRequired(QwamosError):
    """Refusing to {action} without confirmation: stdin is not a terminal, so no one can answer; pass --yes."""

    exit_code = 2


# --- crypto -------------------------------------------------------------------------------------------


class AuthenticationFailed(QwamosError):
    """Authentication failed: the data was modified, or the key is wrong."""

    exit_code = 14


# --- volume format (10-19) ----------------------------------------------------------------------------


class VolumeError(QwamosError):
    """Volume error: {msg}"""

    exit_code = 10


class NotAQvolError(VolumeError):
    """{path} is not a qvol volume (bad magic)."""

    exit_code = 10


class VolumeNotFoundError(VolumeError):
    """{path}: no such file (no volume there)."""

    exit_code = 10


class NotARegularFileError(VolumeError):
    """{path} is {kind}, not a regular file; a volume must be one (refused without reading or waiting on it)."""

    exit_code = 10


class UnsupportedVersionError(VolumeError):
    """{path}: unsupported qvol format version {version!r}; this qwamos reads format versions {supported}."""

    exit_code = 11


class UnsupportedFeatureError(UnsupportedVersionError):
    """{path} uses format features this qwamos does not implement ({features}); writable={writable}."""

    exit_code = 11


class HeaderCorruptError(VolumeError):
    """{path}: the volume header is malformed or failed authentication ({msg})."""

    exit_code = 12


class TruncatedVolumeError(VolumeError):
    """{path} is truncated: {msg}"""

    exit_code = 13


class BlockAuthError(VolumeError):
    """{path}: block {index} failed authentication (tampered, corrupted or torn write)."""

    exit_code = 14


class SnapshotChainError(HeaderCorruptError):
    """{path}: the snapshot chain failed authentication: {msg}"""

    exit_code = 12


class ChainResizeError(VolumeError):
    """{path} has snapshots{detail}, and a volume with snapshots is not resized: {msg}

    Every layer of its chain would have to change size with it; the message says the way out.
    """

    exit_code = 11


class SnapshotError(InvalidArgument):
    """{path}: {msg}"""

    exit_code = 2


class VolumeLockedError(VolumeError):
    """{path} is already open for writing by another process"""

    exit_code = 15


class VolumeExistsError(VolumeError):
    """{path} already exists; refusing to overwrite it (pass overwrite=True to replace it)."""

    exit_code = 16
    cli_text = "{path} already exists; refusing to overwrite it (--force replaces it)."


class BlockRangeError(VolumeError, IndexError):
    """{path}: {msg}"""

    exit_code = 17


class BlocksInUseError(BlockRangeError):
    """{path}: cannot shrink to {size} bytes: {msg}"""

    exit_code = 17


class NonceLimitError(VolumeError):
    """{path}: the key's encryption limit is reached; rotate the volume key before writing more."""

    exit_code = 18


class VolumeClosedError(VolumeError):
    """The volume is not open."""

    exit_code = 19


class ReadOnlyVolumeError(VolumeError):
    """{path} is open read-only."""

    exit_code = 19


class RotationError(VolumeError):
    """{path}: key rotation: {msg}"""

    exit_code = 10


# --- storage (60-69): the byte store beneath the volume format -----------------------------------------


class VolumeFullError(VolumeError):
    """{path}: I/O error: {msg} (out of space); every block keeps its old or new data: free space, retry."""

    exit_code = 60


# --- keystore (20-29) ---------------------------------------------------------------------------------


class KeystoreError(QwamosError):
    """Keystore error: {msg}"""

    exit_code = 20


class KeyNotFoundError(KeystoreError):
    """Key {key_id!r} is not in the keystore {keystore}."""

    exit_code = 21


class WrongPassphraseError(KeystoreError):
    """Wrong passphrase for {what}."""

    exit_code = 22


class PassphraseRequiredError(KeystoreError):
    """{what} is sealed with a passphrase: set QWAMOS_PASSPHRASE, pass --passphrase-fd, or run on a terminal."""

    exit_code = 22


class KeyFileCorruptError(KeystoreError):
    """{path}: key file is malformed or failed authentication ({msg})."""

    exit_code = 23


class GrantNotForUsError(KeyFileCorruptError):
    """{path}: not imported: {msg}."""

    # A sound grant for another keystore, or from another grantor than the one the operator confirmed: nothing is
    # malformed, so the message says what does not match (a subclass: callers and tests that catch the
    # corrupt-or-forged error, exit 23, still do).


class KeystorePermissionError(KeystoreError):
    """{path}: unsafe permissions {mode}; expected {expected} (fix with: chmod {expected} {path})."""

    exit_code = 24


class CopyDestinationExists(VolumeExistsError):
    """{path} already exists; volume copy never replaces a volume."""

    cli_text = None


class KeyExistsError(KeystoreError):
    """Key {key_id!r} already exists in the keystore."""

    exit_code = 25
    cli_text = "Key {key_id!r} already exists in the keystore (--force replaces it)."


class IdentityNotFoundError(KeystoreError):
    """The keystore {keystore} has no usable identity: {msg}"""

    exit_code = 26


class IdentityChangedError(KeystoreError):
    """Keystore {keystore} is pinned to identity {pinned}, but its identity.key is now {found}: {msg}"""

    exit_code = 27


class IdentityUnsealedError(IdentityChangedError):
    """Keystore {keystore}: identity {pinned} was sealed with a passphrase, identity.key is now unsealed: {msg}"""

    exit_code = 27


class KeyInUseError(KeystoreError):
    """Key {key_id!r} is in use by {users}; not deleted (forcing it makes unreadable: {consequence})."""

    exit_code = 28


class KeyStateError(KeystoreError):
    """Key {key_id!r} is {state}: {msg}"""

    exit_code = 29


# --- block export (30-39) -----------------------------------------------------------------------------


class ExportError(QwamosError):
    """Block export error: {msg}"""

    exit_code = 30


class ControlChannelError(ExportError):
    """Export control channel: {msg}"""

    exit_code = 31

    @property
    def code(self) -> str:
        """The reply's error code (docs/control-channel.md), or "unreachable" / "protocol" on the client side."""
        return str(self.kwargs.get("code", ""))


# --- VM manager (40-49) -------------------------------------------------------------------------------


class VMError(QwamosError):
    """VM error: {msg}"""

    exit_code = 40


class ConfigError(VMError):
    """{path}: {msg}"""

    exit_code = 41


class VMNotFoundError(VMError):
    """No VM named {name!r} under {root} (expected {path})."""

    exit_code = 42


class VMStateError(VMError):
    """VM {name!r} is {state}: {msg}"""

    exit_code = 43


class QemuError(VMError):
    """QEMU failed: {msg}"""

    exit_code = 44


class VolumeBindingError(VMError):
    """VM {name!r} is bound to another volume: {msg}"""

    exit_code = 45


class UnsafePathError(ConfigError):
    """{path}: {msg}"""

    exit_code = 46


# --- migration (50-59) --------------------------------------------------------------------------------


class MigrationError(QwamosError):
    """Migration failed: {msg}"""

    exit_code = 50


class SizeMismatchError(MigrationError):
    """disk size mismatch: {msg}"""

    exit_code = 51


# --- backups (70-79) ----------------------------------------------------------------------------------


class BackupError(QwamosError):
    """Backup failed: {msg}"""

    exit_code = 70


class RepositoryCorruptError(BackupError):
    """Backup repository {repo}: {msg}"""

    exit_code = 71


class RepositoryRollbackError(BackupError):
    """Backup repository {repo}: {msg}"""

    exit_code = 72


class ArchiveNotFoundError(BackupError):
    """Backup repository {repo}: no archive {archive!r}"""

    exit_code = 73


# --- the exit-code table: the README's "Exit codes" section is rendered from it ------------------------

# Ranges, lowest first: (first, last, area).  New codes go inside their area's range.
EXIT_RANGES: tuple[tuple[int, int, str], ...] = (
    (0, 9, "general"),
    (10, 19, "volume format"),
    (20, 29, "keystore"),
    (30, 39, "block export"),
    (40, 49, "VM manager"),
    (50, 59, "migration"),
    (60, 69, "storage (beneath the volume format)"),
    (70, 79, "backups"),
    (130, 130, "signal"),
)

# Every exit status qwamos uses and what it means.  tests/test_errors.py checks that every error class's
# exit_code is here and that README.md shows exactly :func:`exit_code_table_markdown` (regenerate it with
# ``python -m qwamos.errors``).
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "warning: nothing (more) done, e.g. a confirmation declined, or the output pipe closed",
    2: "error, bad usage (unknown command or option, invalid argument, a confirmation needed: --yes)",
    10: "no volume there: no such file, not a qvol (bad magic), or a FIFO/device/socket/directory given as one",
    11: "unsupported format version or feature",
    12: "header corrupt or unauthenticated (both copies; `repair`: a copy still damaged)",
    13: "truncated (blocks lost)",
    14: "a block failed authentication (or a wrong key)",
    15: "locked: open for writing by another process",
    16: "exists (--force replaces it)",
    17: "block out of range (or a shrink over blocks in use: they are named)",
    18: "nonce limit reached (rotate the key)",
    19: "volume closed or read-only",
    20: "keystore error",
    21: "key not found",
    22: "passphrase wrong or missing",
    23: "key file corrupt or forged",
    24: "unsafe permissions",
    25: "key exists",
    26: "identity missing (no keystore, or no identity in it yet)",
    27: "identity changed or unsealed (the pin)",
    28: "key in use (`key delete` without `--force`)",
    29: "wrong key state for the operation (rotating a retired or destroyed key; an unverifiable rotation record)",
    30: "cannot serve (e.g. the pidfile is held by a running export)",
    31: "control channel error (e.g. no export answers)",
    40: "VM error",
    41: "config error",
    42: "no such VM",
    43: "wrong state (e.g. running, stopped)",
    44: "QEMU failed",
    45: "the disk is not the volume the VM is bound to (swapped or replaced `.qvol`)",
    46: "unsafe ownership or mode (a VM directory or config owned by another user, or writable by others)",
    50: "migration failed",
    51: "disk size mismatch",
    60: "out of space (ENOSPC, EDQUOT, EFBIG; every block kept its old or new data: free space and retry)",
    70: "backup failed (e.g. the repository is in use, or an archive name is taken)",
    71: "backup repository damaged or tampered with (a chunk, archive, manifest or config fails to authenticate)",
    72: "backup repository rolled back (its manifest is older than one this machine has seen)",
    73: "no such backup archive",
    130: "interrupted (Ctrl-C)",
}


def exit_area(code: int) -> str:
    """The area (range) an exit code belongs to."""
    for first, last, area in EXIT_RANGES:
        if first <= code <= last:
            return area
    raise ValueError(f"exit code {code} is outside every range")


def exit_code_table_markdown() -> str:
    """The README's exit-code table, generated from :data:`EXIT_CODES`."""
    rows = ["| code | area | meaning |", "|---|---|---|"]
    rows += [f"| {code} | {exit_area(code)} | {text} |" for code, text in sorted(EXIT_CODES.items())]
    return "\n".join(rows)


def exit_ranges_text() -> str:
    """One line of the ranges, for ``qwamos --help``."""
    return ", ".join(
        f"{first}-{last} {area}" if first != last else f"{first} {area}" for first, last, area in EXIT_RANGES[1:]
    )


# --- the one mapping from exceptions to exit statuses -------------------------------------------------


def run_main(body: Callable[[], int | None]) -> int:
    """Run a program's body and turn how it ended into an exit status: its return value (None is 0), a
    :class:`QwamosError`'s ``exit_code`` with ``qwamos: error: <message>`` on stderr, 130 for Ctrl-C, 1 for a
    closed stdout.  Anything else is a bug and keeps its traceback."""
    try:
        rc = body()
    except QwamosError as e:
        sys.stderr.write(f"qwamos: error: {e.cli_message()}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("qwamos: interrupted\n")
        return 130
    except BrokenPipeError:
        return 1
    return 0 if rc is None else int(rc)


if __name__ == "__main__":  # python -m qwamos.errors: the README's exit-code table
    print(exit_code_table_markdown())
