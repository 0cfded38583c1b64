"""The block export's lifecycle, and its process entry point ``python -m qwamos.nbd.export``.

One export is: claim the pidfile (refuse one naming a live process), open the volume (the keystore asks for
the passphrase here), bind the sockets, print where it serves, detach if asked, record the pidfile, serve
until SIGTERM/SIGINT, then flush, close the volume and remove the pidfile and socket.  Every refusal happens
before the fork, so it reaches the caller with its exit code.  :func:`serve` is that sequence; the VM
supervisor launches :func:`command`'s argv (this module as a program) and ``qwamos volume serve`` is a thin
CLI over the same :func:`add_arguments` / :func:`spec_from_args` / :func:`serve`.

Keys: a VM start (and ``qwamos volume serve``) unwraps the volume key in the starting process and hands it
over with ``--key-fd N --key-id ID`` (the key pipe, :mod:`qwamos.nbd.keypipe`), so that this long-running
process never holds a passphrase and is started with a scrubbed environment.  Run by hand without
``--key-fd``, it opens the keystore itself (passphrase from ``--passphrase-fd``, ``--passphrase-file``,
systemd credentials, ``QWAMOS_PASSPHRASE`` or a prompt; never from argv).  Either way it marks itself
non-dumpable (:mod:`qwamos.nodump`) before it reads a key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwamos import logs, pidfile
from qwamos.blockdev import BlockBackend
from qwamos.errors import ExportError, InvalidArgument, run_main

log = logging.getLogger("qwamos.nbd")

TCP_WARNING = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! WARNING: serving the DECRYPTED volume on {addr} without TLS or authentication (--insecure-no-tls).
!! Anyone who can reach this address -- on loopback, every local user -- can read and overwrite the
!! plaintext disk.  Use --socket, or --tls-dir with client certificates (qwamos tls init).
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""

Announce = Callable[[str], None]
KeystoreFactory = Callable[[], Any]


@dataclass(frozen=True)
class ExportSpec:
    """What to export and how: everything :func:`serve` needs except the keystore."""

    path: Path
    unix_path: Path | None = None
    tcp: tuple[str, int] | None = None
    name: str = ""
    read_only: bool = False
    socket_mode: int = 0o600
    max_connections: int = 8
    daemon: bool = False
    pidfile: Path | None = None
    log_file: Path | None = None
    raw: bool = False
    control: Path | None = None  # the control socket (docs/control-channel.md); None: no control channel
    control_required: bool = True  # False for the default <socket>.ctl: a taken path only warns
    tls_dir: Path | None = None  # TCP over mutual TLS: the directory of `qwamos tls init` (qwamos.nbd.tls)
    tls_allow: tuple[str, ...] = ()  # client certificate names admitted (empty: any client of our CA)
    insecure_no_tls: bool = False  # plain TCP, on explicit request only
    # The volume this export must be (a VM's binding, docs/vm-config.md): checked against the header after the
    # volume has authenticated it, so a swapped or re-labelled disk is refused before anything is served.
    expect_uuid: str | None = None
    expect_key_id: str | None = None
    snapshot: str | None = None  # serve this snapshot's view (read-only) instead of the volume

    def check(self) -> None:
        if self.unix_path is None and self.tcp is None:
            raise InvalidArgument("give --socket PATH and/or --tcp [HOST:]PORT")
        if self.tcp is not None and self.tls_dir is None and not self.insecure_no_tls:
            raise InvalidArgument(
                "--tcp needs --tls-dir DIR (mutual TLS; make one with `qwamos tls init`): plain TCP lets "
                "anyone who can connect, every local user included, read and overwrite the decrypted disk; "
                "--insecure-no-tls overrides"
            )
        if self.tls_dir is not None and self.insecure_no_tls:
            raise InvalidArgument("--tls-dir and --insecure-no-tls contradict each other")
        if (self.tls_dir is not None or self.tls_allow) and self.tcp is None:
            raise InvalidArgument(
                "--tls-dir/--tls-allow apply to --tcp only (a UNIX socket is guarded by its mode)"
            )
        if self.tls_allow and self.tls_dir is None:
            raise InvalidArgument("--tls-allow needs --tls-dir")
        if self.snapshot is not None and not self.read_only:
            raise InvalidArgument("--snapshot NAME is served read-only: add --read-only")
        if self.daemon and self.pidfile is None:
            raise InvalidArgument("--daemon needs --pidfile FILE (so that the server can be found and stopped)")


def parse_tcp(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (IPv6 in brackets) -> (host, port); the host defaults to 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        num = int(port)
    except ValueError:
        raise InvalidArgument(f"--tcp {text!r}: expected [HOST:]PORT") from None
    if not 0 <= num <= 65535:
        raise InvalidArgument(f"--tcp {text!r}: port out of range")
    return host, num


# --- the lifecycle ---------------------------------------------------------------------------------------


def open_backend(spec: ExportSpec, keystore: KeystoreFactory | None) -> BlockBackend:
    """The volume (or, with ``raw``, a plain file for tests) opened for serving."""
    if spec.raw:
        from qwamos.blockdev import FileBackend

        try:
            return FileBackend(str(spec.path), read_only=spec.read_only)
        except OSError as e:
            raise ExportError(f"{spec.path}: {e.strerror or e}") from None
    from qwamos.volume.snapshots import open_chain

    provider = keystore() if keystore is not None else _default_keystore()
    # The volume with its snapshot chain (a volume without snapshots is its one layer): every layer's
    # header and link authenticated before anything is served (docs/qvol-format.md 2.5.4).
    vol = open_chain(spec.path, provider, read_only=spec.read_only, snapshot=spec.snapshot)
    try:
        check_binding(spec, vol.chain, vol.key_id)
    except BaseException:
        vol.close()
        raise
    return vol


def check_binding(spec: ExportSpec, uuid: str, key_id: str) -> None:
    """Refuse a volume whose authenticated UUID or key ID is not the expected one (a swapped disk)."""
    wrong = []
    if spec.expect_uuid is not None and uuid != spec.expect_uuid:
        wrong.append(f"it is volume {uuid}, expected {spec.expect_uuid}")
    if spec.expect_key_id is not None and key_id != spec.expect_key_id:
        wrong.append(f"it uses key {key_id!r}, expected {spec.expect_key_id!r}")
    if wrong:
        raise ExportError(f"{spec.path} is not the volume this VM is bound to: {'; '.join(wrong)}")


def _default_keystore() -> Any:
    from qwamos.keystore import PQCKeystore

    return PQCKeystore()


def pidfile_busy(message: str) -> ExportError:
    return ExportError(f"{message}; is the export already served?")


def serve(spec: ExportSpec, *, keystore: KeystoreFactory | None = None, announce: Announce | None = None) -> None:
    """Run one export from start to clean exit (see the module docstring); raises before detaching.

    ``announce`` receives the human lines (where it serves, the TCP warning); default: the log.
    """
    from qwamos.nbd import daemon
    from qwamos.nbd.server import ExportServer

    say = announce or log.warning
    spec.check()
    pid_path = spec.pidfile.absolute() if spec.pidfile is not None else None
    tls = None
    if spec.tls_dir is not None:
        from qwamos.nbd.tls import server_tls

        tls = server_tls(spec.tls_dir, spec.tls_allow or None)  # refused before the volume is opened
    # Fork before anything is opened (a cluster client's threads do not survive a fork: qwamos.nbd.daemon);
    # the original process waits there until the daemon answers, or exits with its error status.
    detach = daemon.fork_daemon() if spec.daemon else None
    if pid_path is not None:
        pidfile.claim_pidfile(pid_path, pidfile_busy)
    backend = open_backend(spec, keystore)
    try:
        server = ExportServer(
            backend,
            unix_path=spec.unix_path,
            tcp=spec.tcp,
            name=spec.name,
            read_only=spec.read_only,
            socket_mode=spec.socket_mode,
            max_connections=spec.max_connections,
            tls=tls,
            insecure_tcp=spec.insecure_no_tls,
        )
        ctl = None
        if spec.control is not None:
            from qwamos.nbd.control_server import ControlServer

            # Bound, started and stopped with the export.
            ctl = ControlServer(server, spec.control, required=spec.control_required)
            if not spec.raw and not spec.read_only:
                from qwamos.nbd.rotation import OnlineRotation

                OnlineRotation(ctl)  # the reencrypt commands: online key rotation (qwamos.nbd.rotation)
                from qwamos.nbd.resize import OnlineResize

                OnlineResize(ctl)  # the resize command: grow the served volume (qwamos.nbd.resize)
            from qwamos.nbd import snapshot_ctl

            snapshot_ctl.install(ctl)  # snapshots of the served volume (docs/control-channel.md)
            from qwamos.nbd import backup_control

            backup_control.install(ctl)  # cbt-rotate, cbt-bitmap, allocation (backups of a running VM)
        server.bind()
        where = []
        if spec.unix_path is not None:
            where.append(f"unix:{spec.unix_path}")
        if server.tcp_address is not None:
            host, port = server.tcp_address
            where.append(f"{'tls' if tls is not None else 'tcp'}:{host}:{port}")
            if tls is None:
                say(TCP_WARNING.format(addr=f"{host}:{port}"))
        ro = " (read-only)" if server.export.read_only else ""
        say(f"Serving {spec.path}{ro} ({server.export.size} bytes) on {', '.join(where)}")
        if ctl is not None and ctl.enabled:
            say(f"Control socket: {spec.control}")
        notify = None
        if detach is not None:
            log_path = spec.log_file.absolute() if spec.log_file else None
            notify = detach(log_path)
            if log_path is not None:
                logging.getLogger().handlers[:] = [logs.handler()]  # the new stderr
        if pid_path is not None:
            pidfile.write_pidfile(pid_path)

        def ready() -> None:
            log.info("ready (pid %d)", os.getpid())
            if notify is not None:
                notify()

        server.run(ready)
    finally:
        try:
            backend.close()
        finally:
            # Last of all: a supervisor takes "pidfile gone" to mean "stopped", so the volume must be flushed,
            # closed and unlocked by then (removed only if it names this process: a refused start never does).
            if pid_path is not None:
                pidfile.remove_pidfile(pid_path)


# --- arguments, shared by this entry point and `qwamos volume serve` ------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The export's options (not the keystore's, which every key-using command shares)."""
    p.add_argument("path", type=Path, help="the .qvol volume (or a raw image with --raw)")
    p.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="UNIX socket to listen on (default: none; --socket or --tcp is needed)",
    )
    p.add_argument(
        "--tcp",
        metavar="[HOST:]PORT",
        help="also/instead listen on TCP (default: no TCP; host 127.0.0.1 when only a port is given); needs "
        "--tls-dir (or --insecure-no-tls)",
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help="serve --tcp over mutual TLS with the CA and server certificate of `qwamos tls init --dir DIR` "
        "(default: none)",
    )
    p.add_argument(
        "--tls-allow",
        action="append",
        default=[],
        metavar="NAME",
        help="admit only client certificates with this name (repeatable; default: any client of the CA)",
    )
    p.add_argument(
        "--insecure-no-tls",
        action="store_true",
        help="serve --tcp in plaintext without authentication: anyone who can connect owns the disk",
    )
    p.add_argument("--read-only", action="store_true", help="open the volume read-only; writes answer EPERM")
    p.add_argument("--socket-mode", default="0600", help="permissions of the UNIX socket (default 0600)")
    p.add_argument(
        "--max-connections", type=int, default=8, help="concurrent clients (more are refused; default: 8)"
    )
    p.add_argument("--name", default="", help="export name (default: empty; the empty name is always accepted)")
    p.add_argument("--daemon", action="store_true", help="detach once the socket answers")
    p.add_argument("--pidfile", type=Path, help="write the server's pid here (removed at exit; default: none)")
    p.add_argument("--log-file", type=Path, help="with --daemon: append log messages here (default: discarded)")
    p.add_argument("--raw", action="store_true", help="serve a plain raw image instead of a .qvol (testing)")
    p.add_argument(
        "--control",
        type=Path,
        metavar="PATH",
        help="control socket (status, quiesce, flush, keys; always 0600; default: the --socket path + .ctl)",
    )
    p.add_argument("--no-control", action="store_true", help="run without a control socket")
    p.add_argument(
        "--expect-uuid", metavar="UUID", help="refuse to serve unless the volume's UUID is this one (default: any)"
    )
    p.add_argument(
        "--expect-key-id", metavar="ID", help="refuse to serve unless the volume uses this key ID (default: any)"
    )
    p.add_argument(
        "--snapshot",
        metavar="NAME",
        help="serve this snapshot's view of the volume (with --read-only; default: none)",
    )


def spec_from_args(args: argparse.Namespace) -> ExportSpec:
    try:
        mode = int(args.socket_mode, 8)
    except ValueError:
        raise InvalidArgument(f"--socket-mode {args.socket_mode!r}: expected octal, e.g. 0600") from None
    spec = ExportSpec(
        path=args.path,
        unix_path=args.socket,
        tcp=parse_tcp(args.tcp) if args.tcp else None,
        name=args.name,
        read_only=args.read_only,
        socket_mode=mode,
        max_connections=args.max_connections,
        daemon=args.daemon,
        pidfile=args.pidfile,
        log_file=args.log_file,
        raw=args.raw,
        control=_control_path(args),
        control_required=getattr(args, "control", None) is not None,
        tls_dir=args.tls_dir,
        tls_allow=tuple(args.tls_allow),
        insecure_no_tls=args.insecure_no_tls,
        expect_uuid=getattr(args, "expect_uuid", None),
        expect_key_id=getattr(args, "expect_key_id", None),
        snapshot=getattr(args, "snapshot", None),
    )
    spec.check()
    return spec


def _control_path(args: argparse.Namespace) -> Path | None:
    """``--control PATH``, else ``<--socket>.ctl``; none with ``--no-control`` or a TCP-only export."""
    if getattr(args, "no_control", False):
        if getattr(args, "control", None) is not None:
            raise InvalidArgument("--control and --no-control contradict each other")
        return None
    if getattr(args, "control", None) is not None:
        return args.control
    if args.socket is not None:
        from qwamos.nbd.control_server import control_path_for

        return control_path_for(args.socket)
    return None


def command(
    path: str | os.PathLike[str],
    socket: str,
    *,
    keystore: str | os.PathLike[str] | None = None,
    expect_uuid: str | None = None,
    expect_key_id: str | None = None,
) -> list[str]:
    """The argv that serves ``path`` on the UNIX socket ``socket`` as its own process (for supervisors); with
    ``expect_*`` it refuses any other volume (the VM's binding)."""
    argv = [sys.executable, "-m", "qwamos.nbd.export"]
    argv += [os.fspath(path), "--socket", socket]
    if keystore is not None:
        argv += ["--keystore", os.fspath(keystore)]
    if expect_uuid is not None:
        argv += ["--expect-uuid", expect_uuid]
    if expect_key_id is not None:
        argv += ["--expect-key-id", expect_key_id]
    return argv


def key_args(fd: int, key_id: str) -> list[str]:
    """The options that hand the export its volume key through the key pipe ``fd`` (:mod:`.keypipe`)."""
    return ["--key-fd", str(fd), "--key-id", key_id]


def command_for_spec(spec: ExportSpec, *, verbose: int = 0) -> list[str]:
    """The export program's argv that serves ``spec`` (what ``qwamos volume serve`` execs into).  Every field
    of :class:`ExportSpec` must round-trip through it (tests/test_nbd_export.py checks each one)."""
    argv = [sys.executable, "-m", "qwamos.nbd.export", *(["-" + "v" * verbose] if verbose else [])]
    argv.append(os.fspath(spec.path))
    if spec.unix_path is not None:
        argv += ["--socket", os.fspath(spec.unix_path)]
    if spec.tcp is not None:
        host, port = spec.tcp
        argv += ["--tcp", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if spec.name:
        argv += ["--name", spec.name]
    argv += ["--socket-mode", f"{spec.socket_mode:04o}", "--max-connections", str(spec.max_connections)]
    for flag, on in (("--read-only", spec.read_only), ("--daemon", spec.daemon), ("--raw", spec.raw)):
        if on:
            argv.append(flag)
    if spec.pidfile is not None:
        argv += ["--pidfile", os.fspath(spec.pidfile)]
    if spec.log_file is not None:
        argv += ["--log-file", os.fspath(spec.log_file)]
    if spec.tls_dir is not None:
        argv += ["--tls-dir", os.fspath(spec.tls_dir)]
    for name in spec.tls_allow:
        argv += ["--tls-allow", name]
    if spec.insecure_no_tls:
        argv.append("--insecure-no-tls")
    if spec.control is None:
        argv.append("--no-control")
    elif spec.control_required:
        argv += ["--control", os.fspath(spec.control)]
    if spec.expect_uuid is not None:
        argv += ["--expect-uuid", spec.expect_uuid]
    if spec.expect_key_id is not None:
        argv += ["--expect-key-id", spec.expect_key_id]
    if spec.snapshot is not None:
        argv += ["--snapshot", spec.snapshot]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qwamos.nbd.export VOL --socket S [--keystore DIR] [--passphrase-fd N] ...``: the export as
    a program, without the CLI's other command groups.  Messages and exit codes as ``qwamos volume serve``."""
    from qwamos.keystore.passphrase import add_passphrase_arguments
    from qwamos.nodump import make_non_dumpable

    parser = argparse.ArgumentParser(prog="python -m qwamos.nbd.export", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    add_arguments(parser)
    parser.add_argument("--keystore", type=Path, default=None, metavar="DIR", help="keystore directory")
    add_passphrase_arguments(parser)
    parser.add_argument(
        "--key-fd", type=int, default=None, metavar="N", help="read the 32-byte volume key from this pipe"
    )
    parser.add_argument("--key-id", default=None, metavar="ID", help="with --key-fd: the key's ID")
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logs.configure(level)
    make_non_dumpable()  # before any key or passphrase is read: no core dump, no /proc/<pid>/mem for others

    def body() -> None:
        if (args.key_fd is None) != (args.key_id is None):
            raise InvalidArgument("--key-fd and --key-id go together")
        keystore = _key_from_pipe(args) if args.key_fd is not None else _keystore_from_args(args)
        spec = spec_from_args(args)
        serve(spec, keystore=keystore, announce=lambda text: print(text, file=sys.stderr, flush=True))
        if not spec.daemon:
            print("Export stopped; volume flushed and closed.", file=sys.stderr, flush=True)

    return run_main(body)


def _key_from_pipe(args: argparse.Namespace) -> KeystoreFactory:
    """Read the key pipe now (it is the first thing done, so a failed start never leaves it unread) and
    return a provider of that one key."""
    from qwamos.nbd.keypipe import read_key
    from qwamos.volume.keys import SingleKeyProvider

    key = read_key(args.key_fd)
    try:
        provider = SingleKeyProvider(args.key_id, key[:32])
        if len(key) > 32:  # a key rotation in progress: its old key follows (qwamos.nbd.keypipe)
            provider.set_rotation_old_key(key[32:])
    finally:
        key[:] = bytes(len(key))
    return lambda: provider


def _keystore_from_args(args: argparse.Namespace) -> KeystoreFactory:
    from qwamos.keystore import PQCKeystore
    from qwamos.keystore.passphrase import passphrase_from_args

    passphrase = passphrase_from_args(args, prompt="Keystore passphrase: ")
    return lambda: PQCKeystore(args.keystore, passphrase=passphrase)


if __name__ == "__main__":
    sys.exit(main())
