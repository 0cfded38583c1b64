"""The ``config.yaml`` schema: which keys exist, what each may hold, and the walk that checks a document.

Each leaf of :data:`SCHEMA` is a checker ``(value) -> str | None`` returning the reason a value is refused,
or None.  Errors name the file, the key path and the reason; unknown keys are warnings, not errors, so a
config written for a newer version still starts.  The values a key may take come from
:mod:`qwamos.hypervisor.vocab`; the reference for users is ``docs/vm-config.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

from qwamos.errors import ConfigError, InvalidArgument
from qwamos.hypervisor import layout
from qwamos.hypervisor.sizes import parse_size
from qwamos.hypervisor.vocab import (
    ACCELS,
    ALGORITHMS,
    BACKING_FORMATS,
    DISK_FORMATS,
    KEY_ENCAPSULATIONS,
    MAC_EXAMPLE,
    MAC_PATTERN,
    MACHINES,
    NETWORK_MODES,
)

Checker = Callable[[Any], str | None]

MIN_MEMORY_MB = 16  # below this QEMU's machines do not boot a kernel; refused here rather than at start
GIC_VERSIONS = (2, 3, 4, "max", "host")


def show(value: Any) -> str:
    """A value as an error message quotes it: at most 60 characters, and built from at most a few elements of
    a few levels, so quoting a list that aliases expand to billions of elements costs nothing."""
    text = _bounded_repr(value, 3)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounded_repr(value: Any, depth: int) -> str:
    if isinstance(value, dict):
        if depth == 0:
            return "{...}"
        items = [f"{_bounded_repr(k, 0)}: {_bounded_repr(v, depth - 1)}" for k, v in islice(value.items(), 4)]
        return "{" + ", ".join(items + (["..."] if len(value) > 4 else [])) + "}"
    if isinstance(value, (list, tuple)):
        if depth == 0:
            return "[...]"
        items = [_bounded_repr(v, depth - 1) for v in islice(value, 4)]
        return "[" + ", ".join(items + (["..."] if len(value) > 4 else [])) + "]"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _str(value: Any) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {show(value)}"


def _int(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    return None if ok else f"expected an integer, got {show(value)}"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {show(value)}"


def _choice(*choices: str) -> Checker:
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or value.lower() not in choices:
            return f"expected one of {', '.join(choices)}, got {show(value)}"
        return None

    return check


def check_size(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return f"expected a size such as 10G, 512M or a whole number of bytes, got {show(value)}"
    try:
        parse_size(value, what="size")
    except InvalidArgument as e:
        return str(e.kwargs.get("msg", "")).removeprefix("size: ") or "not a size"
    return None


def check_memory(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        mb = value
    elif isinstance(value, str) and check_size(value) is None and parse_size(value) % (1 << 20) == 0:
        mb = parse_size(value) >> 20
    else:
        return f"expected an integer (MB) such as 2048, or a size in whole MB such as 2G, got {show(value)}"
    return None if mb >= MIN_MEMORY_MB else f"expected at least {MIN_MEMORY_MB} (MB), got {show(value)}"


def _vm_name(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {show(value)}"
    try:
        layout.validate_vm_name(value)
    except InvalidArgument:
        return f"{value!r} is not a usable VM name (1-64 letters, digits, '.', '_' or '-'; no '/' or '..')"
    return None


def check_positive_int(value: Any) -> str | None:
    return _int(value) or (None if value >= 1 else f"expected at least 1, got {value}")


def _gic(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value in GIC_VERSIONS:
        return None
    if isinstance(value, str) and value in [str(v) for v in GIC_VERSIONS]:
        return None
    return f"expected {', '.join(map(str, GIC_VERSIONS[:-1]))} or {GIC_VERSIONS[-1]}, got {show(value)}"


def check_mac(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return f'a MAC address was read as the number {value} (YAML 1.1 base-60?); quote it: "{MAC_EXAMPLE}"'
    if not isinstance(value, str) or not MAC_PATTERN.fullmatch(value):
        return f"expected a MAC address such as {MAC_EXAMPLE}, got {show(value)}"
    return None


def check_rotation_age(value: Any) -> str | None:
    from qwamos.keystore.policy import parse_age

    try:
        parse_age(value)
    except InvalidArgument as e:
        return str(e.kwargs.get("msg", "")) or "not a rotation age"
    return None


def check_uuid(value: Any) -> str | None:
    ok = isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)
    return None if ok else f"expected the volume's UUID (32 lowercase hex digits), got {show(value)}"


SCHEMA: dict[str, Any] = {
    "vm": {"name": _vm_name, "type": _str, "description": _str},
    "machine": {"type": _choice(*MACHINES), "accel": _choice(*ACCELS), "gic_version": _gic},
    "hardware": {
        "cpu": {"model": _str, "cores": check_positive_int},
        "memory": {"size": check_memory},
        "disk": {
            "primary": {
                "path": _str,
                "size": check_size,
                "format": _choice(*DISK_FORMATS),
                "backing": {"path": _str, "format": _choice(*BACKING_FORMATS)},
            }
        },
    },
    "boot": {"kernel": _str, "initrd": _str, "cmdline": _str},
    "network": {"mode": _choice(*NETWORK_MODES), "device": _str, "mac": check_mac},
    "storage": {
        "encryption": {
            "enabled": _bool,
            "algorithm": _choice(*ALGORITHMS),
            "key_encapsulation": _choice(*KEY_ENCAPSULATIONS),
            "key_id": _str,
            "identity_fingerprint": _str,
            "volume_uuid": check_uuid,
        }
    },
    "rotation": {"max_age": check_rotation_age},
    "autostart": _bool,
}


def validate(
    node: Any, path: Path, warnings: list[str], schema: dict[str, Any] = SCHEMA, prefix: str = ""
) -> None:
    """Check ``node`` against ``schema``: ConfigError on the first bad value, a warning per unknown key."""
    for key, value in node.items():
        where = f"{prefix}{key}"
        if key not in schema:
            warnings.append(f"{path}: unknown key {show(where)} (ignored)")
            continue
        rule = schema[key]
        if value is None:
            continue  # an empty key means "use the default"
        if isinstance(rule, dict):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}: expected a mapping of {', '.join(rule)}, got {show(value)}", path=str(path)
                )
            validate(value, path, warnings, rule, where + ".")
        else:
            reason = rule(value)
            if reason:
                raise ConfigError(f"{where}: {reason}", path=str(path))
