"""The one way this project runs an external program (qemu-img, qemu-nbd, nbdcopy, cp, QEMU itself, the KVM
smoke test).

Every such child gets :func:`environment`: the few variables on :data:`ENV_ALLOW` and nothing else.  An
allow-list rather than a deny-list because a deny-list has to guess every name a secret may hide under
(``QWAMOS_PASSPHRASE``, ``AWS_SECRET_ACCESS_KEY``, ``MY_PASSWORD``, ...) and fails open on the first miss;
QEMU and its tools need none of our variables.  Two runners used to exist (the VM manager's passed the whole
environment, ``QWAMOS_PASSPHRASE`` included; the migration's scrubbed it), which is why there is one now.

Argument lists only, never a shell string.  A tool's path can be overridden for tests and odd installs by
``QWAMOS_QEMU_IMG``, ``QWAMOS_QEMU_NBD`` and ``QWAMOS_NBDCOPY`` (read at each call).

The module lives in the hypervisor layer because the hypervisor (qcow2 disks, QEMU) and the migration above
it are its only users; nothing below the hypervisor starts a program.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qwamos.errors import QemuError, QwamosError

# Locale and search path for the tool, a temp dir for qemu-img's scratch files, HOME for nothing in
# particular but some tools complain without it.  Nothing else of the caller's environment is passed.
ENV_ALLOW = ("PATH", "LANG", "LC_ALL", "TMPDIR", "HOME")
# A Python child of our own (the KVM smoke test, the export) also needs to find this package when it is not
# installed, and keeps the choice of the crypto module's record-run loop (qwamos.crypto.runs_implementation).
PYTHON_ENV_ALLOW = ("PYTHONPATH", "QWAMOS_AEAD_RUNS")

# Tool name -> (environment variable overriding its path, Debian package that has it).
TOOLS = {
    "qemu-img": ("QWAMOS_QEMU_IMG", "qemu-utils"),
    "qemu-nbd": ("QWAMOS_QEMU_NBD", "qemu-utils"),
    "nbdcopy": ("QWAMOS_NBDCOPY", "libnbd-bin"),
}

ErrorFactory = Callable[[str], QwamosError]


def environment(environ: Mapping[str, str] | None = None, *, python: bool = False) -> dict[str, str]:
    """The environment every child program gets: the :data:`ENV_ALLOW` subset of ``environ`` (default ours),
    plus :data:`PYTHON_ENV_ALLOW` for a ``python`` child of this package."""
    env = os.environ if environ is None else environ
    allow = ENV_ALLOW + (PYTHON_ENV_ALLOW if python else ())
    return {k: env[k] for k in allow if k in env}


def tool_path(name: str) -> str:
    """What to execute for tool ``name``: its override variable's value if set, else the bare name (PATH)."""
    var = TOOLS.get(name, (None, None))[0]
    return os.environ.get(var, name) if var else name


def not_installed(name: str) -> str:
    package = TOOLS.get(name, (None, None))[1]
    return f"{name} is not installed" + (f" (Debian: apt-get install {package})" if package else "")


def _qemu_error(msg: str) -> QwamosError:
    return QemuError(msg)


def _argv(argv: Sequence[str]) -> list[str]:
    if isinstance(argv, str | bytes):
        raise TypeError("argv must be a list of arguments, never a shell string")
    args = [os.fspath(a) for a in argv]
    return [tool_path(args[0]), *args[1:]]


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = 120,
    error: ErrorFactory = _qemu_error,
    input: bytes | None = None,
    python: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool to completion with :func:`environment`, capturing stdout and stderr (bytes).

    A tool that is missing or does not finish within ``timeout`` s raises ``error(message)`` (the caller's
    layer decides the error class and so the exit code); a non-zero exit status is returned for the caller
    to judge, with :func:`stderr_text` for its message.
    """
    args = _argv(argv)
    try:
        return subprocess.run(
            args, capture_output=True, timeout=timeout, check=False, env=environment(python=python), input=input
        )
    except FileNotFoundError:
        raise error(not_installed(os.path.basename(argv[0]))) from None
    except subprocess.TimeoutExpired:
        raise error(f"{' '.join(args[:2])} did not finish within {timeout:g} s") from None


def popen(argv: Sequence[str], *, error: ErrorFactory = _qemu_error, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a tool with :func:`environment` (``env`` cannot be overridden); other Popen arguments pass."""
    if "env" in kwargs or "shell" in kwargs:
        raise TypeError("tools.popen sets the environment itself and never uses a shell")
    try:
        return subprocess.Popen(_argv(argv), env=environment(), **kwargs)
    except FileNotFoundError:
        raise error(not_installed(os.path.basename(argv[0]))) from None


def stderr_text(raw: bytes | str, tool: str = "qemu-img") -> str:
    """A tool's stderr as one short message: decoded, the ``tool: `` prefixes dropped, the last 600 chars."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text.strip().replace(f"{tool}: ", "")
    return text[-600:] or "no message"
