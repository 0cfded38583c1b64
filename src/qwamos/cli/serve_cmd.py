"""``qwamos volume serve VOL.qvol --socket PATH``: the volume as an NBD export for QEMU.

Thin over :mod:`qwamos.nbd.export` (the lifecycle and its options live there).  Foreground by default
(SIGTERM/SIGINT flush and exit 0); ``--daemon --pidfile F`` for supervisors.

This command is only the *starting* process: it unwraps the volume key (the keystore passphrase comes from
``--passphrase-fd``, ``--passphrase-file``, systemd credentials, ``QWAMOS_PASSPHRASE`` or a prompt, never
from argv), verifying the header MAC, then replaces itself (``execve``, same pid) with the export program
``python -m qwamos.nbd.export``, which gets the key through the key pipe (:mod:`qwamos.nbd.keypipe`) and the
allow-listed environment: the long-running export holds no passphrase, and ``QWAMOS_PASSPHRASE`` does not
survive into its ``/proc/<pid>/environ``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from qwamos import pidfile
from qwamos.cli.keystore_args import add_keystore_args, open_keystore
from qwamos.cli.volume_cmd import add_ceph_args, volume_location
from qwamos.hypervisor import tools
from qwamos.nbd import export


def register_serve(vsub: argparse._SubParsersAction) -> None:
    s = vsub.add_parser(
        "serve",
        help="serve a volume over NBD (QEMU: -blockdev driver=nbd,server.type=unix,server.path=SOCK)",
        description="Serve a .qvol volume as an NBD export until SIGTERM/SIGINT.  See docs/nbd-export.md.",
        examples=[
            "qwamos volume serve disk.qvol --socket /run/disk.sock",
            "qwamos volume serve disk.qvol --tcp 0.0.0.0:10809 --tls-dir ~/.qwamos/tls",
            "qwamos volume serve disk.qvol --socket /run/disk.sock --daemon --pidfile /run/disk.pid",
        ],
    )
    export.add_arguments(s)
    add_keystore_args(s)
    add_ceph_args(s)
    s.add_argument(
        "--break-lock",
        action="store_true",
        help="an rbd: volume whose writer lock a dead host still holds: break it first (as `rbd lock rm`; the "
        "holder is blocklisted). Only when that host is gone for good",
    )
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    args.path = volume_location(args)
    spec = export.spec_from_args(args)
    argv = export.command_for_spec(spec, verbose=min(getattr(args, "verbose", 0) or 0, 2))
    if spec.pidfile is not None:  # refuse a served export before asking for any key (as the export would)
        pidfile.claim_pidfile(spec.pidfile.absolute(), export.pidfile_busy)
    pass_fd = None
    if getattr(args, "break_lock", False):
        from qwamos.cli.output import warn
        from qwamos.volume.snapshots import break_chain_locks  # the volume's image and its layers'

        for holder in break_chain_locks(spec.path):
            warn(f"{spec.path}: broke the lock of {holder} (blocklisted by the cluster)")
        from qwamos.storage import is_rbd, storage_exists
        from qwamos.volume.snapshots import finish_interrupted, has_snapshots

        if is_rbd(spec.path) and not storage_exists(spec.path) and has_snapshots(spec.path):
            finish_interrupted(str(spec.path), open_keystore(args))  # a snapshot cut between its renames
    if not spec.raw:
        from qwamos.nbd.keypipe import key_pipe
        from qwamos.volume.unlock import unlock_key

        key_id, key = unlock_key(spec.path, open_keystore(args), snapshot=spec.snapshot)
        pass_fd = key_pipe(key)
        os.set_inheritable(pass_fd, True)
        argv += export.key_args(pass_fd, key_id)
    if args.passphrase_fd is not None:  # read already; the export does not inherit it
        with contextlib.suppress(OSError):
            os.close(args.passphrase_fd)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, tools.environment(python=True))  # noqa: S606 (argv list, no shell)
    return 0  # not reached
