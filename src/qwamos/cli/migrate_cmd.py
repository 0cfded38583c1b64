"""``qwamos migrate <vm>``: move a VM's disk onto encrypted storage (``--to-qcow2``: and back).

Thin over :mod:`qwamos.migrate`: the library does the work and reports events; this module draws them as
a transcript on stderr (it reports progress; the data of a migration is its ``--json`` event stream, one JSON
object per line on stdout).  Run as the spec's ``hypervisor/scripts/migrate_to_pqc.py`` it prints the spec's
transcript as the spec shows it, symbols and all, on stdout (``output.settings.spec_transcript``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qwamos.cli.keystore_args import add_keystore_args, open_keystore
from qwamos.cli.output import (
    Progress,
    add_json_option,
    emit_json,
    emit_json_line,
    fancy,
    print_data,
    settings,
    strip_symbols,
    warn,
)
from qwamos.hypervisor.vocab import ALGORITHM_LABELS, ALGORITHMS, DEFAULT_ALGORITHM
from qwamos.migrate import TO_QCOW2, TO_QVOL, make_plan, migrate
from qwamos.migrate.journal import Journal
from qwamos.migrate.plan import journal_path_for

RULE = "=" * 70
MIB = 1024 * 1024


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "migrate",
        help="move a VM's disk onto an encrypted .qvol (or back with --to-qcow2), verified before the switch",
        description="Copy a VM's disk (qcow2 or raw, as its config names it: never probed) into a new encrypted "
        "volume through QEMU "
        "without any plaintext temporary file, compare every byte, and only then switch the config. On any "
        "failure or Ctrl-C nothing is changed.",
        examples=[
            "qwamos migrate web --dry-run",
            "qwamos migrate web --to rbd:vms/web.qvol   # the encrypted volume on Ceph RBD",
            "qwamos migrate --to-qcow2 web --json",
        ],
    )
    p.add_argument("vm", help="VM name (a directory under <root>/vms/)")
    p.add_argument(
        "--root", type=Path, default=None, metavar="DIR", help="QWAMOS root (default: $QWAMOS_ROOT or ~/QWAMOS)"
    )
    p.add_argument(
        "--no-backup",
        action="store_true",
        help="delete the original after the verified switch instead of keeping it as <disk>.backup",
    )
    p.add_argument("--dry-run", action="store_true", help="check everything and say what would happen")
    add_json_option(p, "the events (plan, progress, results), one JSON object a line,")
    p.add_argument("--to-qcow2", action="store_true", help="decrypt the VM's volume back to a qcow2 disk")
    p.add_argument(
        "--to",
        metavar="rbd:POOL/IMAGE",
        default=None,
        help="put the new encrypted volume on Ceph RBD (default: a .qvol file beside the disk); the config's "
        "disk becomes that location",
    )
    p.add_argument(
        "--allow-backing",
        action="store_true",
        help="read the backing file a qcow2 source names (refused without this: a guest can write such a "
        "header into a disk); its format comes from the config's hardware.disk.primary.backing, else the header",
    )
    p.add_argument(
        "--algorithm",
        default=None,
        choices=ALGORITHMS,
        help="cipher of the new volume (default: the config's storage.encryption.algorithm, "
        f"else {DEFAULT_ALGORITHM})",
    )
    add_keystore_args(p)
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    direction = TO_QCOW2 if args.to_qcow2 else TO_QVOL
    if args.dry_run:
        return _dry_run(args, ks, direction)
    view = _JsonView() if args.json else _TextView(args.vm, direction)
    migrate(
        args.vm,
        root=args.root,
        direction=direction,
        backup=not args.no_backup,
        keystore=ks,
        algorithm=args.algorithm,
        report=view.event,
        allow_backing=args.allow_backing,
        to=args.to,
    )
    return 0


def _dry_run(args: argparse.Namespace, ks: Any, direction: str) -> int:
    plan = make_plan(
        args.vm,
        root=args.root,
        direction=direction,
        backup=not args.no_backup,
        keystore=ks,
        allow_backing=args.allow_backing,
        to=args.to,
    )
    leftover = Journal.read(journal_path_for(plan.vm))
    doc = plan.to_dict()
    doc["interrupted_run"] = leftover
    if args.json:
        emit_json({"type": "dry_run", **doc})
        return 0
    print_data(f"Dry run: migrating VM {args.vm!r} would (nothing is changed now):")
    if leftover:
        print_data("0. clean up after the interrupted migration recorded in " + str(journal_path_for(plan.vm)))
    for i, step in enumerate(plan.steps(), 1):
        print_data(f"{i}. {step}")
    for w in plan.warnings:
        warn(w)
    return 0


def _size_text(n: int) -> str:
    if n % MIB == 0:
        return f"{n // MIB} MB"
    return f"{n / MIB:.2f} MB ({n} bytes)"


def _alg_text(alg: str | None) -> str:
    return ALGORITHM_LABELS.get(alg or "", alg or "?")


class _JsonView:
    """One JSON object per line on stdout; progress lines rate-limited by :class:`Progress`."""

    def __init__(self) -> None:
        self.progress: Progress | None = None

    def event(self, ev: dict[str, Any]) -> None:
        if ev["type"] == "progress":
            if self.progress is None or self.progress.label != ev["phase"]:
                self.progress = Progress(ev["total"], label=ev["phase"], json_lines=True, stream=sys.stdout)
            if ev.get("end"):
                self.progress.finish()
                self.progress = None
            else:
                self.progress.update(ev["done"])
            return
        emit_json_line(ev)


class _TextView:
    """The spec's transcript: on stderr, with its symbols only where they may be drawn (a terminal without
    ``NO_COLOR``), and no progress lines off a terminal; as the spec shows it, on stdout, for the spec's script."""

    def __init__(self, vm: str, direction: str) -> None:
        self.vm = vm
        self.direction = direction
        self.progress: Progress | None = None
        self.spec = settings.spec_transcript
        self.stream = sys.stdout if self.spec else sys.stderr
        self.symbols = self.spec or fancy(self.stream)
        self.quiet = settings.quiet and not self.spec

    def out(self, text: str = "") -> None:
        if self.quiet:
            return
        if not self.symbols:  # "✓ Backup created" -> "Backup created"
            text = strip_symbols(text)
        self.stream.write(text + "\n")
        self.stream.flush()

    def _progress(self, blocks: int, label: str) -> Progress:
        return Progress(blocks, label=label, stream=self.stream, unit_bytes=4096, final_line=self.spec)

    def event(self, ev: dict[str, Any]) -> None:
        handler = getattr(self, "on_" + ev["type"], None)
        if handler is not None:
            handler(ev)

    def on_plan(self, ev: dict[str, Any]) -> None:
        src = ev["source"]
        self.out()
        self.out(RULE)
        self.out(
            f"QWAMOS Storage Migration: {self.vm}" + (" (back to qcow2)" if self.direction == TO_QCOW2 else "")
        )
        self.out(RULE)
        self.out()
        self.out(f"Current disk: {src['path']}")
        if self.direction == TO_QVOL:
            self.out(f"Format:       {src['format'].upper()} (unencrypted)")
        else:
            self.out("Format:       QVOL (encrypted)")
        self.out(f"Size:         {_size_text(ev['size_bytes'])}")

    def on_warning(self, ev: dict[str, Any]) -> None:
        warn(ev["message"])

    def on_recovered(self, ev: dict[str, Any]) -> None:
        what = "finished" if ev["action"] == "finished" else "rolled back"
        sys.stderr.write(f"note: an interrupted earlier migration of this VM was {what}\n")

    def on_backup_start(self, ev: dict[str, Any]) -> None:
        self.out()
        self.out("Creating backup...")

    def on_backup(self, ev: dict[str, Any]) -> None:
        self.out(f"✓ Backup created: {ev['path']}")

    def on_volume_start(self, ev: dict[str, Any]) -> None:
        self.out()
        self.out("Creating encrypted PQC volume...")

    def on_volume_created(self, ev: dict[str, Any]) -> None:
        self.out(f"✅ Created encrypted volume: {ev['path']}")
        self.out(f"   Size: {_size_text(ev['size_bytes'])} ({ev['blocks']} blocks)")
        self.out(f"   Key ID: {ev['key_id']}")

    def on_qcow2_start(self, ev: dict[str, Any]) -> None:
        self.out()
        self.out(f"Creating qcow2 disk: {ev['path']}")

    def on_copy_start(self, ev: dict[str, Any]) -> None:
        self.out()
        if self.direction == TO_QVOL:
            self.out("Migrating data to encrypted volume...")
            self.out("   Reading the source through QEMU straight into the encrypted volume (no plaintext copy)")
        else:
            self.out("Migrating data back to qcow2...")
        self.out(f"   Copying {ev['blocks']} blocks ({_size_text(ev['size_bytes'])})...")
        self.progress = self._progress(ev["blocks"], "Progress")

    def on_verify_start(self, ev: dict[str, Any]) -> None:
        self.out("   Verifying every byte against the source...")
        self.progress = self._progress(ev["blocks"], "Verified")

    def on_progress(self, ev: dict[str, Any]) -> None:
        if self.progress is None:
            return
        if ev.get("end"):
            self.progress.finish()
            self.progress = None
        else:
            self.progress.update(ev["done"])

    def on_copy_done(self, ev: dict[str, Any]) -> None:
        self.out("   ✓ Data migration complete")

    def on_verified(self, ev: dict[str, Any]) -> None:
        self.out("   ✓ Verified: the copy is identical to the source")

    def on_config_start(self, ev: dict[str, Any]) -> None:
        self.out()
        self.out("Updating VM configuration...")

    def on_config_updated(self, ev: dict[str, Any]) -> None:
        self.out("✓ Configuration updated")

    def on_deleted(self, ev: dict[str, Any]) -> None:
        self.out(f"✓ Original deleted: {ev['path']}")

    def on_rolled_back(self, ev: dict[str, Any]) -> None:
        sys.stderr.write("Rolled back: the original disk and config are unchanged; the partial copy is gone.\n")

    def on_rollback_incomplete(self, ev: dict[str, Any]) -> None:
        sys.stderr.write("Rollback incomplete (the next run retries it):\n")
        for p in ev["problems"]:
            sys.stderr.write(f"  - {p}\n")

    def on_complete(self, ev: dict[str, Any]) -> None:
        self.out()
        self.out(RULE)
        self.out("✅ Migration Complete!")
        self.out(RULE)
        if self.direction == TO_QVOL:
            self.out(f"New encrypted disk: {ev['target']}")
            self.out(f"Encryption key ID:  {ev['key_id']}")
            self.out(f"Algorithm:          {_alg_text(ev['algorithm'])}")
        else:
            self.out(f"New qcow2 disk:     {ev['target']} (unencrypted)")
        self.out()
        self.out("Next steps:")
        start = "./vm_manager.py start" if self.spec else "qwamos vm start"
        self.out(f"1. Test the VM: {start} {self.vm}")
        self.out("2. Verify data integrity")
        if ev.get("backup"):
            then = f"; then its key: qwamos key delete {ev['backup_key_id']}" if ev.get("backup_key_id") else ""
            backup = str(ev["backup"])
            rm = f"rbd rm {backup[len('rbd:') :].split(':')[0]}" if backup.startswith("rbd:") else f"rm {backup}"
            self.out(f"3. Delete backup: {rm}{then}")
        for key_id in ev.get("unused_keys") or ():
            self.out(f"Key {key_id} is used by no volume any more; remove it: qwamos key delete {key_id}")
        self.out(RULE)
