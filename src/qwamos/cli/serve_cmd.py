"""``qwamos volume serve VOL.qvol --socket PATH``: the volume as an NBD export for QEMU.

Foreground by default (SIGTERM/SIGINT flush and exit 0); ``--daemon --pidfile F`` for supervisors.  The
keystore passphrase comes from ``QWAMOS_PASSPHRASE`` or ``--passphrase-fd``, never from argv.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from qwamos.cli.keystore_args import add_keystore_args, open_keystore
from qwamos.cli.output import message
from qwamos.errors import ExportError, InvalidArgument

TCP_WARNING = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! WARNING: serving the DECRYPTED volume on {addr} without TLS or authentication.
!! Anyone who can reach this address can read and overwrite the plaintext disk.
!! Bind 127.0.0.1 (the default) or use --socket unless this network is trusted.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


def register_serve(vsub: argparse._SubParsersAction) -> None:
    s = vsub.add_parser(
        "serve",
        help="serve a volume over NBD (QEMU: -blockdev driver=nbd,server.type=unix,server.path=SOCK)",
        description="Serve a .qvol volume as an NBD export until SIGTERM/SIGINT.  See docs/nbd-export.md.",
    )
    s.add_argument("path", type=Path, help="the .qvol volume (or a raw image with --raw)")
    s.add_argument("--socket", type=Path, metavar="PATH", help="UNIX socket to listen on")
    s.add_argument(
        "--tcp",
        metavar="[HOST:]PORT",
        help="also/instead listen on TCP (default host 127.0.0.1; other addresses are unencrypted: warning)",
    )
    s.add_argument("--read-only", action="store_true", help="open the volume read-only; writes answer EPERM")
    s.add_argument("--socket-mode", default="0600", help="permissions of the UNIX socket (default 0600)")
    s.add_argument("--max-connections", type=int, default=8, help="concurrent clients (more are refused)")
    s.add_argument("--name", default="", help="export name (the empty default name is always accepted)")
    s.add_argument("--daemon", action="store_true", help="detach once the socket answers")
    s.add_argument("--pidfile", type=Path, help="write the server's pid here (removed at exit)")
    s.add_argument("--log-file", type=Path, help="with --daemon: append log messages here")
    s.add_argument("--raw", action="store_true", help="serve a plain raw image instead of a .qvol (testing)")
    add_keystore_args(s)
    s.set_defaults(func=cmd_serve)


def parse_tcp(text: str) -> tuple[str, int]:
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


def _open_backend(args: argparse.Namespace):  # -> BlockBackend
    if args.raw:
        from qwamos.blockdev import FileBackend

        try:
            return FileBackend(str(args.path), read_only=args.read_only)
        except OSError as e:
            raise ExportError(f"{args.path}: {e.strerror or e}") from None
    from qwamos.volume import PQCVolume

    return PQCVolume(args.path, keystore=open_keystore(args), read_only=args.read_only).open()


def cmd_serve(args: argparse.Namespace) -> int:
    from qwamos.nbd import daemon
    from qwamos.nbd.server import ExportServer, is_loopback

    if args.socket is None and args.tcp is None:
        raise InvalidArgument("give --socket PATH and/or --tcp [HOST:]PORT")
    if args.daemon and args.pidfile is None:
        raise InvalidArgument("--daemon needs --pidfile FILE (so that the server can be found and stopped)")
    try:
        mode = int(args.socket_mode, 8)
    except ValueError:
        raise InvalidArgument(f"--socket-mode {args.socket_mode!r}: expected octal, e.g. 0600") from None
    tcp = parse_tcp(args.tcp) if args.tcp else None
    pidfile = args.pidfile.absolute() if args.pidfile else None
    if pidfile is not None:
        daemon.claim_pidfile(pidfile)

    backend = _open_backend(args)
    try:
        server = ExportServer(
            backend,
            unix_path=args.socket,
            tcp=tcp,
            name=args.name,
            read_only=args.read_only,
            socket_mode=mode,
            max_connections=args.max_connections,
        )
        server.bind()
        where = []
        if args.socket is not None:
            where.append(f"unix:{args.socket}")
        if server.tcp_address is not None:
            host, port = server.tcp_address
            where.append(f"tcp:{host}:{port}")
            if not is_loopback(host):
                message(TCP_WARNING.format(addr=f"{host}:{port}"))
        ro = " (read-only)" if server.export.read_only else ""
        message(f"Serving {args.path}{ro} ({server.export.size} bytes) on {', '.join(where)}")
        notify = None
        if args.daemon:
            log_path = args.log_file.absolute() if args.log_file else None
            notify = daemon.daemonize(log_path)
            if log_path is not None:
                logging.getLogger().handlers[:] = [logging.StreamHandler()]  # the new stderr
        if pidfile is not None:
            daemon.write_pidfile(pidfile)

        def ready() -> None:
            logging.getLogger("qwamos.nbd").info("ready (pid %d)", os.getpid())
            if notify is not None:
                notify()

        try:
            server.run(ready)
        finally:
            if pidfile is not None:
                daemon.remove_pidfile(pidfile)
    finally:
        backend.close()
    if not args.daemon:
        message("Export stopped; volume flushed and closed.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m qwamos.cli.serve_cmd VOL --socket S ...``: this command alone, so the export keeps working
    even while another command group of the CLI fails to import.  Errors map to exit codes as in
    :func:`qwamos.cli.main.main`."""
    import sys

    from qwamos.errors import QwamosError

    parser = argparse.ArgumentParser(prog="qwamos")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command")
    register_serve(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="qwamos: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return cmd_serve(args)
    except QwamosError as e:
        sys.stderr.write(f"qwamos: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
