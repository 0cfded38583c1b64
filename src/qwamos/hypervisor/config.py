"""A VM's ``config.yaml``: the spec's schema, validated, and written back without disturbing the user's file.

Read and written as YAML 1.2 with ruamel.yaml's round-trip mode, so comments, key order and quoting survive
when the manager records ``key_id``, ``algorithm``, ``key_encapsulation`` or a new disk path.  YAML 1.2 also
keeps an unquoted ``mac: 52:54:00:12:34:56`` a string: a YAML 1.1 loader reads it as a base-60 integer,
which is how the public implementation corrupted its own example config.

Validation errors name the file, the key path and the reason; unknown keys are warnings, not errors, so a
config written for a newer version still starts.  The schema reference is ``docs/vm-config.md``.
"""

from __future__ import annotations

import difflib
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString
from ruamel.yaml.tokens import CommentToken

from qwamos.crypto import random_bytes
from qwamos.errors import ConfigError, InvalidArgument
from qwamos.fsutil import atomic_write, fsync_dir
from qwamos.hypervisor import layout
from qwamos.hypervisor.sizes import parse_size

MACHINE_ARCH = {"virt": "aarch64", "q35": "x86_64", "pc": "x86_64"}
ACCELS = ("kvm", "tcg")
NETWORK_MODES = ("nat", "none")
ALGORITHMS = ("chacha20-poly1305", "aes-256-gcm", "auto")
KEY_ENCAPSULATIONS = ("x25519-mlkem1024", "ecdh-curve25519")
DEFAULT_ALGORITHM = "chacha20-poly1305"
DEFAULT_KEM = "x25519-mlkem1024"
DEFAULT_DISK_SIZE = "10G"
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")  # fullmatch
_MAX_CONFIG_BYTES = 1 << 20

# The schema: each leaf is a checker ``(value) -> str | None`` returning an error reason, or None if fine.
Checker = Callable[[Any], str | None]


def _str(value: Any) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {_show(value)}"


def _int(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    return None if ok else f"expected an integer, got {_show(value)}"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {_show(value)}"


def _choice(*choices: str) -> Checker:
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or value.lower() not in choices:
            return f"expected one of {', '.join(choices)}, got {_show(value)}"
        return None

    return check


def _size(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return f"expected a size such as 10G, 512M or a whole number of bytes, got {_show(value)}"
    try:
        parse_size(value, what="size")
    except InvalidArgument as e:
        return str(e.kwargs.get("msg", "")).removeprefix("size: ") or "not a size"
    return None


MIN_MEMORY_MB = 16  # below this QEMU's machines do not boot a kernel; refused here rather than at start


def _memory(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        mb = value
    elif isinstance(value, str) and _size(value) is None and parse_size(value) % (1 << 20) == 0:
        mb = parse_size(value) >> 20
    else:
        return f"expected an integer (MB) such as 2048, or a size in whole MB such as 2G, got {_show(value)}"
    return None if mb >= MIN_MEMORY_MB else f"expected at least {MIN_MEMORY_MB} (MB), got {_show(value)}"


def _vm_name(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {_show(value)}"
    try:
        layout.validate_vm_name(value)
    except InvalidArgument:
        return f"{value!r} is not a usable VM name (1-64 letters, digits, '.', '_' or '-'; no '/' or '..')"
    return None


def _positive_int(value: Any) -> str | None:
    return _int(value) or (None if value >= 1 else f"expected at least 1, got {value}")


def _gic(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value in (2, 3, 4):
        return None
    if isinstance(value, str) and value in ("2", "3", "4", "max", "host"):
        return None
    return f"expected 2, 3, 4, max or host, got {_show(value)}"


def _mac(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return f'a MAC address was read as the number {value} (YAML 1.1 base-60?); quote it: "52:54:00:12:34:56"'
    if not isinstance(value, str) or not _MAC.fullmatch(value):
        return f"expected a MAC address such as 52:54:00:12:34:56, got {_show(value)}"
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


SCHEMA: dict[str, Any] = {
    "vm": {"name": _vm_name, "type": _str, "description": _str},
    "machine": {"type": _choice(*MACHINE_ARCH), "accel": _choice(*ACCELS), "gic_version": _gic},
    "hardware": {
        "cpu": {"model": _str, "cores": _positive_int},
        "memory": {"size": _memory},
        "disk": {"primary": {"path": _str, "size": _size}},
    },
    "boot": {"kernel": _str, "initrd": _str, "cmdline": _str},
    "network": {"mode": _choice(*NETWORK_MODES), "device": _str, "mac": _mac},
    "storage": {
        "encryption": {
            "enabled": _bool,
            "algorithm": _choice(*ALGORITHMS),
            "key_encapsulation": _choice(*KEY_ENCAPSULATIONS),
            "key_id": _str,
        }
    },
    "autostart": _bool,
}


def _yaml(indent: tuple[int, int, int] = (2, 4, 2)) -> YAML:
    """A YAML 1.2 round-trip loader/dumper; ``indent`` = (mapping, sequence, dash offset) as the file uses."""
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.indent(mapping=indent[0], sequence=indent[1], offset=indent[2])
    y.width = 4096
    return y


def _guess_indent(text: str) -> tuple[int, int, int]:
    """The file's own indentation, so that lines the manager adds line up with the user's.

    Mapping indent: the first step in from a ``key:`` line.  Sequences: where the first block ``-`` under a
    ``key:`` sits (``offset``) and where its item starts (``sequence``).  Defaults are the spec's 2 spaces.
    """
    mapping: int | None = None
    seq: tuple[int, int] | None = None
    parent: int | None = None  # indentation of the last "key:" line that opens a block
    for line in text.splitlines():
        body = line.lstrip(" ")
        if not body or body.startswith("#"):
            continue
        col = len(line) - len(body)
        if parent is not None and col > parent:
            if body.startswith("- ") or body == "-":
                if seq is None:
                    item = col + 1 + (len(body[1:]) - len(body[1:].lstrip(" ")) if body != "-" else 1)
                    seq = (item - parent, col - parent)
            elif mapping is None:
                mapping = col - parent
        code = body.split(" #", 1)[0].rstrip()
        parent = col if code.endswith(":") and not body.startswith("- ") else None
        if mapping is not None and seq is not None:
            break
    m = mapping if mapping and mapping <= 8 else 2
    sequence, offset = seq if seq and 0 <= seq[1] < seq[0] <= 10 else (m + 2, m)
    return (m, sequence, offset)


class VMConfig:
    """One VM's validated config.  Properties give typed values with defaults applied; setters change the
    underlying round-trip document, and :meth:`save` writes it back atomically, changing only the lines of
    the keys that were set."""

    def __init__(self, path: Path, doc: CommentedMap, warnings: list[str], *, text: str = "") -> None:
        self.path = path
        self._doc = doc
        self.warnings = warnings
        self._text = text  # as read (BOM and line endings removed), the base that save() patches
        self._bom = ""
        self._newline = "\n"
        self._indent = _guess_indent(text)
        self._ops: list[tuple[str, tuple[str, ...], Any]] = []  # changes since load, replayed if the file moved

    # --- loading --------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VMConfig:
        p = Path(path)
        try:
            with p.open("rb") as f:
                raw = f.read(_MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError("no such file", path=str(p)) from None
        except IsADirectoryError:
            raise ConfigError("is a directory, not a config file", path=str(p)) from None
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", path=str(p)) from None
        if len(raw) > _MAX_CONFIG_BYTES:
            raise ConfigError("larger than 1 MiB; not a VM config", path=str(p))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"not UTF-8 text (byte {e.start})", path=str(p)) from None
        return cls.from_text(text, p)

    @classmethod
    def from_text(cls, text: str, path: Path) -> VMConfig:
        bom = "\ufeff" if text.startswith("\ufeff") else ""
        body = text[len(bom) :]
        newline = "\r\n" if "\r\n" in body and "\n" not in body.replace("\r\n", "") else "\n"
        if newline == "\r\n":
            body = body.replace("\r\n", "\n")
        if "\0" in body:
            raise ConfigError("contains a NUL byte; not a YAML text file", path=str(path))
        try:
            doc = _yaml().load(body)
        except YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"invalid YAML{where}: {problem}", path=str(path)) from None
        except RecursionError:
            raise ConfigError("invalid YAML: nested too deeply", path=str(path)) from None
        if doc is None:
            doc = CommentedMap()
        if not isinstance(doc, CommentedMap):
            raise ConfigError(
                "expected a mapping of sections (vm, machine, hardware, ...) at the top", path=str(path)
            )
        warnings: list[str] = []
        _validate(doc, SCHEMA, "", path, warnings)
        cfg = cls(path, doc, warnings, text=body)
        cfg._bom, cfg._newline = bom, newline
        cfg._check_semantics()
        return cfg

    def _check_semantics(self) -> None:
        where = str(self.path)
        dirname = self.path.parent.name
        if self._get("vm", "name") is not None and self.name != dirname and self.path.name == layout.CONFIG_NAME:
            self.warnings.append(f"{where}: vm.name {self.name!r} differs from the directory name {dirname!r}")
        if self._get("machine", "gic_version") is not None and self.machine_type != "virt":
            self.warnings.append(
                f"{where}: machine.gic_version is ignored: machine.type {self.machine_type!r} has no GIC"
            )
        if self.key_encapsulation == "ecdh-curve25519":
            self.warnings.append(
                f"{where}: storage.encryption.key_encapsulation: ecdh-curve25519 (as the spec's example writes "
                f"it) is accepted; new volume keys are wrapped with {DEFAULT_KEM} (X25519 + ML-KEM-1024)"
            )
        disk = self.disk_path
        if "," in str(disk):
            raise ConfigError(
                f"hardware.disk.primary.path: QEMU cannot take a path with a comma: {disk}", path=where
            )

    def _get(self, *keys: str, default: Any = None) -> Any:
        node: Any = self._doc
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return default
            node = node[k]
        return default if node is None else node

    def _set(self, keys: tuple[str, ...], value: Any) -> None:
        self._ops.append(("set", keys, value))
        self._apply_set(keys, value)

    def _delete(self, keys: tuple[str, ...]) -> None:
        self._ops.append(("del", keys, None))
        self._apply_delete(keys)

    def _apply_delete(self, keys: tuple[str, ...]) -> None:
        """Remove a leaf; comment lines that followed it (when it was its block's last) stay in place."""
        parent = self._get(*keys[:-1])
        if not isinstance(parent, CommentedMap) or keys[-1] not in parent:
            return
        was_last = next(reversed(parent)) == keys[-1]
        entry = parent.ca.items.get(keys[-1])
        token = entry[2] if entry and len(entry) > 2 else None
        del parent[keys[-1]]
        parent.ca.items.pop(keys[-1], None)
        after = _last_leaf(parent)
        if was_last and isinstance(token, CommentToken) and after is not None:
            holder = CommentedMap()
            holder["_"] = None
            holder.ca.items["_"] = [None, None, token, None]
            _move_trailing_comment((holder, "_"), after)

    def _apply_set(self, keys: tuple[str, ...], value: Any) -> None:
        """Set a leaf, creating missing sections at the end of their parent.

        ruamel.yaml keeps the comment lines that follow a block on the block's last leaf; when keys are
        appended after that leaf, those lines are moved to the new last leaf so that they stay below the
        block (where the user wrote them) instead of ending up in the middle of it.
        """
        node = self._doc
        for i, k in enumerate(keys):
            last = i == len(keys) - 1
            if k in node and (last or isinstance(node[k], CommentedMap)):
                if last:
                    _replace_scalar(node, k, value)
                else:
                    node = node[k]
                continue
            if k in node:  # present but empty ("encryption:"): a new section in its place, comments stay
                node[k] = _chain(keys[i + 1 :], value)
                return
            before = _last_leaf(node)
            node[k] = _chain(keys[i + 1 :], value)
            after = _last_leaf(node)
            if before is not None and after is not None:
                _move_trailing_comment(before, after)
            return

    def _path_value(self, value: str | None) -> Path | None:
        if not value:
            return None
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else self.path.parent / p

    # --- typed values ---------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self._get("vm", "name", default=self.path.parent.name))

    @property
    def vm_type(self) -> str:
        return str(self._get("vm", "type", default=""))

    @property
    def description(self) -> str:
        return str(self._get("vm", "description", default=""))

    @property
    def machine_type(self) -> str:
        return str(self._get("machine", "type", default="virt")).lower()

    @property
    def arch(self) -> str:
        return MACHINE_ARCH[self.machine_type]

    @property
    def accel(self) -> str:
        return str(self._get("machine", "accel", default="tcg")).lower()

    @property
    def gic_version(self) -> int | str | None:
        value = self._get("machine", "gic_version")
        if value is None:
            return 3 if self.machine_type == "virt" else None
        return int(value) if str(value).isdigit() else str(value)

    @property
    def cpu_model(self) -> str:
        return str(
            self._get("hardware", "cpu", "model", default="cortex-a76" if self.arch == "aarch64" else "max")
        )

    @property
    def cpu_cores(self) -> int:
        return int(self._get("hardware", "cpu", "cores", default=1))

    @property
    def memory_mb(self) -> int:
        value = self._get("hardware", "memory", "size", default=512)
        return value if isinstance(value, int) else parse_size(value) >> 20

    @property
    def disk_path(self) -> Path:
        p = self._path_value(self._get("hardware", "disk", "primary", "path"))
        return (
            p if p is not None else self.path.parent / ("disk.qvol" if self.encryption_enabled else "disk.qcow2")
        )

    @property
    def disk_size_text(self) -> str:
        return str(self._get("hardware", "disk", "primary", "size", default=DEFAULT_DISK_SIZE))

    @property
    def disk_size_bytes(self) -> int:
        return parse_size(self._get("hardware", "disk", "primary", "size", default=DEFAULT_DISK_SIZE))

    @property
    def kernel(self) -> Path | None:
        return self._path_value(self._get("boot", "kernel"))

    @property
    def initrd(self) -> Path | None:
        return self._path_value(self._get("boot", "initrd"))

    @property
    def cmdline(self) -> str:
        return str(self._get("boot", "cmdline", default=""))

    @property
    def network_mode(self) -> str:
        return str(self._get("network", "mode", default="none")).lower()

    @property
    def network_device(self) -> str:
        return str(self._get("network", "device", default="virtio-net-pci"))

    @property
    def mac(self) -> str | None:
        value = self._get("network", "mac")
        return None if value is None else str(value)

    @property
    def autostart(self) -> bool:
        return bool(self._get("autostart", default=False))

    @property
    def encryption_enabled(self) -> bool:
        return bool(self._get("storage", "encryption", "enabled", default=False))

    @property
    def encryption_algorithm(self) -> str | None:
        value = self._get("storage", "encryption", "algorithm")
        return None if value is None else str(value).lower()

    @property
    def key_encapsulation(self) -> str | None:
        value = self._get("storage", "encryption", "key_encapsulation")
        return None if value is None else str(value).lower()

    @property
    def key_id(self) -> str | None:
        value = self._get("storage", "encryption", "key_id")
        return None if value in (None, "") else str(value)

    def encrypted_disk_path(self) -> Path:
        """Where the encrypted volume lives: beside the configured disk, with a ``.qvol`` suffix."""
        return self.disk_path.with_suffix(".qvol")

    # --- changes --------------------------------------------------------------------------------------

    def set_encryption(self, *, key_id: str, algorithm: str, key_encapsulation: str = DEFAULT_KEM) -> None:
        """Record the key in use (keys the user did not write are appended to ``storage.encryption``)."""
        self._set(("storage", "encryption", "enabled"), True)
        self._set(("storage", "encryption", "algorithm"), algorithm)
        self._set(("storage", "encryption", "key_encapsulation"), key_encapsulation)
        self._set(("storage", "encryption", "key_id"), key_id)

    def set_encryption_enabled(self, enabled: bool) -> None:
        self._set(("storage", "encryption", "enabled"), enabled)

    def clear_key(self) -> None:
        """Forget the recorded key (used when a VM is migrated back to an unencrypted disk)."""
        for k in ("key_id", "algorithm", "key_encapsulation"):
            self._delete(("storage", "encryption", k))

    def set_disk_path(self, path: str | os.PathLike[str]) -> None:
        """Point ``hardware.disk.primary.path`` at ``path``, keeping the user's spelling (``~/...``, relative)
        when only the file name changes; a disk in the VM directory is written as a bare (relative) name."""
        new = Path(path)
        old_text = self._get("hardware", "disk", "primary", "path")
        text = new.name if new.parent == self.path.parent else str(new)
        if isinstance(old_text, str) and old_text:
            old = self._path_value(old_text)
            if old is not None and old.parent == new.parent:
                head, sep, _ = old_text.rpartition("/")
                text = f"{head}{sep}{new.name}"
        self._set(("hardware", "disk", "primary", "path"), text)

    def dump(self) -> str:
        """The file's new text: the user's text with only the lines of the changed keys replaced or added.

        ruamel.yaml's own rendering is not byte-identical for every file (``True``, ``---``, CRLF, odd
        indentation, a missing final newline), so the text is patched instead: the line differences between
        ruamel's rendering of the document as loaded and as changed are applied to the original text.  The
        result is re-parsed and must equal the changed document; if not, ruamel's full rendering is used.
        """
        return self._encode(self._body())

    def _body(self) -> str:
        changed = _render_doc(self._doc, self._indent)
        if self._text:
            base = _render_doc(_yaml().load(self._text), self._indent)
            patched = _patch_lines(self._text, base, changed)
            try:
                if patched is not None and _same_data(_yaml().load(patched), self._doc):
                    return patched
            except YAMLError:
                pass
        return changed

    def save(self) -> None:
        """Write atomically (temp file in the same directory, fsync, rename) with the file's mode kept.

        If the file changed on disk since it was read (the user edited it while a VM was starting), the
        changes made through this object are replayed onto the new content instead of overwriting it; a new
        content that no longer validates is a ``ConfigError`` and nothing is written.
        """
        try:
            mode = self.path.stat().st_mode & 0o777
            current: str | None = self.path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            mode, current = 0o644, None
        if current is not None and self._ops and current != self._encode(self._text):
            fresh = VMConfig.from_text(current, self.path)
            for op, keys, value in self._ops:
                if op == "set":
                    fresh._apply_set(keys, value)
                else:
                    fresh._apply_delete(keys)
            self._doc, self._text, self.warnings = fresh._doc, fresh._text, fresh.warnings
            self._bom, self._newline, self._indent = fresh._bom, fresh._newline, fresh._indent
        body = self._body()
        atomic_write(self.path, self._encode(body).encode("utf-8"), mode=mode)
        self._text = body  # the next save patches what is now on disk
        self._ops.clear()

    def _encode(self, body: str) -> str:
        return self._bom + (body.replace("\n", "\r\n") if self._newline == "\r\n" else body)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.vm_type,
            "description": self.description,
            "config": str(self.path),
            "machine": {
                "type": self.machine_type,
                "arch": self.arch,
                "accel": self.accel,
                "gic_version": self.gic_version,
            },
            "cpu": {"model": self.cpu_model, "cores": self.cpu_cores},
            "memory_mb": self.memory_mb,
            "disk": {"path": str(self.disk_path), "size": self.disk_size_text, "size_bytes": self.disk_size_bytes},
            "boot": {
                "kernel": str(self.kernel) if self.kernel else None,
                "initrd": str(self.initrd) if self.initrd else None,
                "cmdline": self.cmdline,
            },
            "network": {"mode": self.network_mode, "device": self.network_device, "mac": self.mac},
            "encryption": {
                "enabled": self.encryption_enabled,
                "algorithm": self.encryption_algorithm,
                "key_encapsulation": self.key_encapsulation,
                "key_id": self.key_id,
            },
            "autostart": self.autostart,
            "warnings": list(self.warnings),
        }


def _validate(node: Any, schema: dict[str, Any], prefix: str, path: Path, warnings: list[str]) -> None:
    for key, value in node.items():
        where = f"{prefix}{key}"
        if key not in schema:
            warnings.append(f"{path}: unknown key {where!r} (ignored)")
            continue
        rule = schema[key]
        if value is None:
            continue  # an empty key means "use the default"
        if isinstance(rule, dict):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}: expected a mapping of {', '.join(rule)}, got {_show(value)}", path=str(path)
                )
            _validate(value, rule, where + ".", path, warnings)
        else:
            reason = rule(value)
            if reason:
                raise ConfigError(f"{where}: {reason}", path=str(path))


# --- round-trip helpers -----------------------------------------------------------------------------------


def _render_doc(doc: Any, indent: tuple[int, int, int]) -> str:
    buf = io.StringIO()
    _yaml(indent).dump(doc, buf)
    return buf.getvalue()


def _chain(keys: tuple[str, ...], value: Any) -> Any:
    """``value`` nested under new mappings for ``keys`` (``("a", "b"), 1`` -> ``{a: {b: 1}}``)."""
    for k in reversed(keys):
        m = CommentedMap()
        m[k] = value
        value = m
    return value


def _last_leaf(node: CommentedMap) -> tuple[CommentedMap, Any] | None:
    """The (mapping, key) of the last key in document order under ``node``, descending into mappings."""
    if not node:
        return None
    while True:
        key = next(reversed(node))
        child = node[key]
        if isinstance(child, CommentedMap) and child:
            node = child
            continue
        return node, key


def _move_trailing_comment(src: tuple[CommentedMap, Any], dst: tuple[CommentedMap, Any]) -> None:
    """Move the lines after ``src``'s own line (blank lines, comments) to after ``dst``'s line."""
    smap, skey = src
    if isinstance(smap[skey], CommentedSeq):
        return  # a trailing list keeps its comments inside the list; leave them be
    entry = smap.ca.items.get(skey)
    token = entry[2] if entry and len(entry) > 2 else None
    if not isinstance(token, CommentToken):
        return
    text = token.value
    own, sep, rest = text.partition("\n")
    if not sep or not rest:
        return
    if own.strip():
        token.value = own + "\n"
    else:
        entry[2] = None
    dmap, dkey = dst
    dentry = dmap.ca.items.setdefault(dkey, [None, None, None, None])
    if isinstance(dentry[2], CommentToken) and dentry[2].value.endswith("\n"):
        dentry[2].value = dentry[2].value + rest  # dst's own end-of-line comment stays first
    else:
        dentry[2] = CommentToken("\n" + rest, CommentMark(0), None)


def _scalar_width(value: Any) -> int:
    """Characters a scalar takes on its line after ``key: `` (-1 for an empty value: no space either)."""
    if value is None:
        return -1
    if isinstance(value, bool):
        return 4 if value else 5
    if isinstance(value, (SingleQuotedScalarString, DoubleQuotedScalarString)):
        return len(str(value)) + 2
    return len(str(value))


def _replace_scalar(node: CommentedMap, key: Any, value: Any) -> None:
    """Replace a value in place, keeping its quoting style and the gap before its end-of-line comment."""
    old = node[key]
    if old == value and type(old) is type(value):
        return
    if isinstance(value, str) and isinstance(old, (SingleQuotedScalarString, DoubleQuotedScalarString)):
        value = type(old)(value)
    entry = node.ca.items.get(key)
    token = entry[2] if entry and len(entry) > 2 else None
    if isinstance(token, CommentToken) and token.value.startswith("#") and token.start_mark is not None:
        token.start_mark.column = max(0, token.start_mark.column + _scalar_width(value) - _scalar_width(old))
    node[key] = value


def _patch_lines(original: str, base: str, changed: str) -> str | None:
    """Apply the ``base`` -> ``changed`` line edits to ``original`` (``base`` = ruamel's rendering of
    ``original``'s document).  None when an edit touches a line that cannot be matched to the original."""
    if base == original:
        return changed
    orig = original.splitlines(keepends=True)
    if orig and not orig[-1].endswith("\n"):
        orig[-1] += "\n"
    b = base.splitlines(keepends=True)
    c = changed.splitlines(keepends=True)
    # base line -> original line, matching lines that differ only in indentation or spacing
    align = difflib.SequenceMatcher(None, [" ".join(x.split()) for x in b], [" ".join(x.split()) for x in orig])
    where: dict[int, int] = {}
    for tag, i1, i2, j1, _j2 in align.get_opcodes():
        if tag == "equal":
            for k in range(i2 - i1):
                where[i1 + k] = j1 + k
    out = list(orig)
    edits = [op for op in difflib.SequenceMatcher(None, b, c, autojunk=False).get_opcodes() if op[0] != "equal"]
    for tag, i1, i2, j1, j2 in reversed(edits):  # from the end, so earlier positions stay valid
        if tag == "insert":
            if i1 > 0 and (i1 - 1) in where:
                pos = where[i1 - 1] + 1
            elif i1 in where:
                pos = where[i1]
            else:
                return None
            out[pos:pos] = c[j1:j2]
        else:
            rows = [where.get(i) for i in range(i1, i2)]
            if None in rows or rows != list(range(rows[0], rows[0] + len(rows))):  # type: ignore[operator]
                return None
            out[rows[0] : rows[-1] + 1] = c[j1:j2]  # type: ignore[index]
    text = "".join(out)
    if not original.endswith("\n") and text.endswith("\n") and out[-1:] == orig[-1:]:
        text = text[:-1]
    return text


def _same_data(a: Any, b: Any) -> bool:
    """Equal as data, including key order (a patched text must read back as the changed document)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same_data(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_data(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


# --- new configs (``qwamos vm create``) -------------------------------------------------------------------

_NEW_CONFIG = """\
# QWAMOS VM config (schema: docs/vm-config.md)
vm:
  name: {name}
  type: {vm_type}
  description: {description}

machine:
  type: {machine}  # virt = arm64 (qemu-system-aarch64); q35/pc = x86_64
  accel: {accel}  # kvm is used only where it really works; else TCG with a warning
{gic}
hardware:
  cpu:
    model: {cpu}
    cores: {cores}
  memory:
    size: {memory}  # MB
  disk:
    primary:
      path: {disk_path}
      size: {disk_size}

boot:
  kernel: {kernel}
  initrd: {initrd}
  cmdline: {cmdline}

network:
  mode: {network}
  device: virtio-net-pci
  mac: {mac}

storage:
  encryption:
    enabled: {encrypted}

autostart: false
"""


def _yaml_scalar(value: str) -> str:
    """``value`` as a one-line YAML 1.2 scalar: plain when it reads back as the same string, else a
    double-quoted (JSON) string, which YAML 1.2 reads back exactly and which cannot span lines."""
    if value and "\n" not in value and "\r" not in value:
        try:
            if YAML(typ="safe").load(f"k: {value}\n") == {"k": value}:
                return value
        except YAMLError:
            pass
    return json.dumps(value, ensure_ascii=False)


def new_config_text(
    name: str,
    *,
    machine_type: str | None = None,
    arch: str | None = None,
    cpu_model: str | None = None,
    cpu_cores: int = 1,
    memory_mb: int = 512,
    disk_size: str | int = DEFAULT_DISK_SIZE,
    disk_path: str | None = None,
    kernel: str | None = None,
    initrd: str | None = None,
    cmdline: str | None = None,
    accel: str = "kvm",
    network_mode: str = "nat",
    mac: str | None = None,
    encrypted: bool = False,
    vm_type: str = "standard",
    description: str = "",
) -> str:
    """A commented ``config.yaml`` in the spec's schema for ``qwamos vm create``.

    ``arch`` (``aarch64``/``x86_64``) picks ``virt``/``q35`` when ``machine_type`` is not given.  A new VM
    asks for KVM (used only where it really works, else TCG) and user-mode networking with a random
    locally administered MAC under QEMU's ``52:54:00`` prefix.  The disk path defaults to ``disk.qcow2`` in
    the VM directory even when encrypted: the manager creates ``disk.qvol`` beside it on the first start
    and writes that path back, as in the spec.
    """
    layout.validate_vm_name(name)
    if machine_type is None:
        by_arch = {"aarch64": "virt", "arm64": "virt", "x86_64": "q35", "amd64": "q35"}
        if arch is not None and arch not in by_arch:
            raise InvalidArgument(f"architecture {arch!r}: use aarch64 or x86_64")
        machine_type = by_arch[arch or "aarch64"]
    if machine_type not in MACHINE_ARCH:
        raise InvalidArgument(f"machine type {machine_type!r}: use one of {', '.join(MACHINE_ARCH)}")
    if arch is not None and MACHINE_ARCH[machine_type] != {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch):
        raise InvalidArgument(f"machine type {machine_type!r} is not an {arch} machine")
    if accel not in ACCELS:
        raise InvalidArgument(f"accelerator {accel!r}: use one of {', '.join(ACCELS)}")
    if network_mode not in NETWORK_MODES:
        raise InvalidArgument(f"network mode {network_mode!r}: use one of {', '.join(NETWORK_MODES)}")
    if _positive_int(cpu_cores):
        raise InvalidArgument(f"CPU count {cpu_cores!r}: expected an integer of at least 1")
    if _memory(memory_mb):
        raise InvalidArgument(f"memory {memory_mb!r}: expected an integer number of MB, at least {MIN_MEMORY_MB}")
    parse_size(disk_size, what="disk size")
    arch = MACHINE_ARCH[machine_type]
    console = "ttyAMA0" if arch == "aarch64" else "ttyS0"
    mac = mac or "52:54:00:" + ":".join(f"{b:02x}" for b in random_bytes(3))
    if _mac(mac):
        raise InvalidArgument(f"MAC address {mac!r} is not of the form 52:54:00:12:34:56")
    return _NEW_CONFIG.format(
        name=name,
        vm_type=_yaml_scalar(vm_type),
        description=_yaml_scalar(description or f"{name} VM"),
        machine=machine_type,
        accel=accel,
        gic="  gic_version: 3\n" if machine_type == "virt" else "",
        cpu=_yaml_scalar(cpu_model or ("cortex-a76" if arch == "aarch64" else "max")),
        cores=int(cpu_cores),
        memory=int(memory_mb),
        disk_path=_yaml_scalar(disk_path or "disk.qcow2"),
        disk_size=_yaml_scalar(str(disk_size)),
        kernel=_yaml_scalar(kernel or ""),
        initrd=_yaml_scalar(initrd or ""),
        cmdline=_yaml_scalar(cmdline or f"console={console}"),
        network=network_mode,
        mac=mac,
        encrypted="true" if encrypted else "false",
    )


def write_new_config(root: str | os.PathLike[str], name: str, text: str | None = None, **fields: Any) -> Path:
    """Create ``<root>/vms/<name>/config.yaml`` from ``text`` (or from ``fields`` via :func:`new_config_text`).

    Refuses to overwrite (``O_EXCL``, so two concurrent creates cannot both win); the text is validated
    first, so a config is never written that ``load`` would refuse.  The VM directory is created 0700.
    """
    if text is None:
        text = new_config_text(name, **fields)
    elif fields:
        raise InvalidArgument("write_new_config: pass either the config text or fields, not both")
    path = layout.config_path(root, name)
    VMConfig.from_text(text, path)  # never write a config we would refuse to load
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ConfigError("already exists; refusing to overwrite it", path=str(path)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
