"""``qwamos backup``: encrypted, compressed, incremental backups of volumes and VMs (docs/backup-format.md).

Thin over :mod:`qwamos.backup` (the repository, the engine, the running-VM source): data on stdout (text or
``--json``), messages and progress on stderr.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from qwamos.backup import engine
from qwamos.backup.repo import COMPACT_THRESHOLD, Repository
from qwamos.cli.keystore_args import add_keystore_args, open_keystore
from qwamos.cli.output import Progress, add_json_option, add_yes_option, confirm, emit_json, message, print_data
from qwamos.errors import BackupError, InvalidArgument, RepositoryCorruptError

REPO_ENV = "QWAMOS_BACKUP_REPO"
RECOVERY_ENV = ("QWAMOS_RECOVERY_PASSPHRASE", "QWAMOS_PASSPHRASE")
BLOCK = 4096


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backup",
        help="encrypted, compressed, incremental backups of volumes and VMs into a repository directory",
        description="Back volumes up into a repository: zstd-compressed, then encrypted and authenticated in "
        "chunks; a second backup of the same volume reads only the blocks changed since (changed-block "
        "tracking).  docs/backup-format.md has the format.",
        examples=[
            "qwamos backup create disk.qvol --repo /srv/backups",
            "qwamos backup create --vm web --repo /srv/backups",
            "qwamos backup restore web-20261201T120000Z -o web-restored.qvol --repo /srv/backups",
        ],
    )
    bsub = p.add_subparsers(dest="backup_command", metavar="ACTION", required=True)

    def action(name: str, help_: str, func: Any, examples: list[str], *, json_out: bool = True) -> Any:
        a = bsub.add_parser(name, help=help_, description=help_, examples=examples)
        a.add_argument(
            "--repo",
            type=Path,
            default=None,
            metavar="DIR",
            help=f"repository directory (default: ${REPO_ENV})",
        )
        if json_out:
            add_json_option(a)
        add_keystore_args(a)
        a.set_defaults(func=func)
        return a

    action(
        "init",
        "create an empty repository with a new key wrapped to the keystore identity",
        cmd_init,
        ["qwamos backup init --repo /srv/backups"],
    )
    c = action(
        "create",
        "back up a volume, or a VM (running or not), as a new archive",
        cmd_create,
        [
            "qwamos backup create disk.qvol --repo /srv/backups --name before-upgrade",
            "qwamos backup create --vm web",
        ],
    )
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("volume", nargs="?", metavar="VOL", help="the .qvol (or rbd:POOL/IMAGE) to back up")
    which.add_argument("--vm", metavar="VM", help="back up this VM's volume; a running VM is paused meanwhile")
    c.add_argument(
        "--root", type=Path, default=None, help="QWAMOS root for --vm (default: $QWAMOS_ROOT or ~/QWAMOS)"
    )
    c.add_argument("--name", default=None, help="archive name (default: <volume>-<UTC time>)")
    c.add_argument(
        "--full", action="store_true", help="read every block even when an incremental backup is possible"
    )
    action("list", "list the archives", cmd_list, ["qwamos backup list --repo /srv/backups --json"])
    action(
        "verify",
        "authenticate every pack, archive and chunk (exit 71 if anything fails)",
        cmd_verify,
        ["qwamos backup verify --repo /srv/backups"],
    )
    r = action(
        "restore",
        "restore an archive into a NEW volume under a new key",
        cmd_restore,
        ["qwamos backup restore web-20261201T120000Z -o web.qvol --repo /srv/backups"],
    )
    r.add_argument("archive", metavar="ARCHIVE", help="archive name or id (as backup list shows it)")
    r.add_argument(
        "-o", "--output", required=True, metavar="NEW.qvol", help="the volume to create (a file or rbd:POOL/IMAGE)"
    )
    d = action(
        "delete",
        "delete archives (chunks other archives use are kept)",
        cmd_delete,
        ["qwamos backup delete old-archive --repo /srv/backups --yes"],
    )
    d.add_argument("archives", nargs="+", metavar="ARCHIVE", help="archive names or ids")
    add_yes_option(d)
    pr = action(
        "prune",
        "keep the newest N archives of each volume, delete the rest",
        cmd_prune,
        ["qwamos backup prune --keep-last 7 --repo /srv/backups --yes"],
    )
    pr.add_argument("--keep-last", type=int, required=True, metavar="N", help="archives to keep per volume")
    pr.add_argument(
        "--compact",
        action="store_true",
        help="then reclaim the space of the chunks it freed, as 'backup compact' does (default: keep the packs)",
    )
    _add_threshold(pr, " (with --compact)")
    add_yes_option(pr)
    co = action(
        "compact",
        "reclaim the space of chunks no archive uses any more (left in packs by delete and prune)",
        cmd_compact,
        [
            "qwamos backup compact --repo /srv/backups",
            "qwamos backup compact --repo /srv/backups --dry-run --threshold 0",
        ],
    )
    _add_threshold(co)
    co.add_argument(
        "--dry-run", action="store_true", help="print what would be rewritten and removed; change nothing"
    )
    k = action(
        "key",
        "export the repository key sealed with a passphrase, or import it",
        cmd_key,
        [
            "qwamos backup key export --repo /srv/backups -o repo-key.json",
            "qwamos backup key import repo-key.json --repo /srv/backups",
        ],
        json_out=False,
    )
    k.add_argument("key_action", choices=("export", "import"), help="export the key, or import it")
    k.add_argument("file", nargs="?", type=Path, metavar="FILE", help="the key file to import (default: none)")
    k.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="FILE",
        help="where export writes the key (default: none; export needs it)",
    )
    k.add_argument(
        "--recovery-passphrase-fd",
        type=int,
        default=None,
        metavar="N",
        help="read the key file's passphrase from file descriptor N "
        "(default: $QWAMOS_RECOVERY_PASSPHRASE, $QWAMOS_PASSPHRASE, or a prompt)",
    )


def _repo_path(args: argparse.Namespace) -> Path:
    path = args.repo or (Path(os.environ[REPO_ENV]) if os.environ.get(REPO_ENV) else None)
    if path is None:
        raise InvalidArgument(f"name the repository with --repo DIR (or set ${REPO_ENV})")
    return path


def _open(args: argparse.Namespace, *, exclusive: bool = False) -> Repository:
    return Repository(_repo_path(args), open_keystore(args)).open(exclusive=exclusive)


class _Progress:
    """Progress callback ``(done, total)`` in bytes, drawn as blocks with rate and ETA on a terminal."""

    def __init__(self, label: str, json_lines: bool) -> None:
        self.label = label
        self.json_lines = json_lines
        self.bar: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(
                total // BLOCK, label=self.label, unit="blocks", unit_bytes=BLOCK, enabled=not self.json_lines
            )
        self.bar.update(done // BLOCK)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.finish()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cmd_init(args: argparse.Namespace) -> int:
    repo = Repository.init(_repo_path(args), open_keystore(args))
    if args.json:
        emit_json({"repository": str(repo.path), "repo_id": repo.keys.repo_id.hex()})
    message(f"initialised backup repository {repo.path} (keep its key safe: 'qwamos backup key export')")
    return 0


def _needs_init(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def cmd_create(args: argparse.Namespace) -> int:
    path = _repo_path(args)
    ks = open_keystore(args)
    if _needs_init(path):
        Repository.init(path, ks)
        message(f"initialised backup repository {path}")
    repo = Repository(path, ks).open(exclusive=True)
    progress = _Progress("Backing up", args.json)
    try:
        if args.vm is not None:
            from qwamos.backup import online

            result = online.backup_vm(
                repo, args.vm, ks, root=args.root, name=args.name, full=args.full, progress=progress, say=message
            )
        else:
            src = engine.VolumeSource.open(args.volume, ks)
            try:
                result = engine.create(repo, src, name=args.name, full=args.full, progress=progress)
            finally:
                src.close()
    finally:
        progress.finish()
        repo.close()
    if args.json:
        emit_json(result)
    else:
        kind = "incremental" if result["incremental"] else "full"
        print_data(result["name"])
        note = "" if result["incremental"] or result["tracking_complete"] else " (every allocated block was read)"
        message(
            f"{kind} backup {result['name']}{note}: read {_size(result['read_bytes'])}, "
            f"stored {_size(result['stored_bytes'])} ({result['new_chunks']} new chunks), "
            f"{result['seconds']:.1f} s"
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    repo = _open(args)
    try:
        archives = repo.archives()
    finally:
        repo.close()
    if args.json:
        emit_json(archives)
        return 0
    for a in archives:
        kind = "incr" if a.get("incremental") else "full"
        print_data(
            f"{a['name']:<40} {a['created_at']}  {kind}  {a.get('volume_name', ''):<16} "
            f"data {_size(a.get('data_bytes', 0))}, stored {_size(a.get('stored_bytes', 0))}  {a['id']}"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    repo = _open(args)
    progress = _Progress("Verifying", args.json)
    try:
        report = engine.verify(repo, progress=progress)
    finally:
        progress.finish()
        repo.close()
    if args.json:
        emit_json(report)
    else:
        for p in report["problems"]:
            print_data(f"problem: {p}")
        if report["unreferenced_files"]:
            message(
                f"{len(report['unreferenced_files'])} unreferenced file(s) (left by an interrupted command; "
                "removed by the next compact, delete or prune)"
            )
        message(
            f"{report['archives']} archive(s), {report['chunks']} chunk(s), {report['packs']} pack(s): "
            + ("ok" if report["ok"] else f"{len(report['problems'])} problem(s)")
        )
    return 0 if report["ok"] else RepositoryCorruptError.exit_code


def cmd_restore(args: argparse.Namespace) -> int:
    from qwamos.storage import storage_exists

    if storage_exists(args.output):
        raise BackupError(msg=f"{args.output} exists: restore creates a new volume")
    ks = open_keystore(args)
    repo = Repository(_repo_path(args), ks).open()
    progress = _Progress("Restoring", args.json)
    try:
        result = engine.restore(repo, repo.find(args.archive), args.output, ks, progress=progress)
    finally:
        progress.finish()
        repo.close()
    if args.json:
        emit_json(result)
    else:
        print_data(result["volume"])
        message(
            f"restored {result['archive']} into {result['volume']} (new key {result['key_id']}) "
            f"in {result['seconds']:.1f} s"
        )
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    repo = _open(args, exclusive=True)
    try:
        entries = [repo.find(a) for a in args.archives]
        names = ", ".join(e["name"] for e in entries)
        if not confirm(f"Delete {names} from {repo.path}?", yes=args.yes, action=f"delete archives {names}"):
            message("nothing deleted")
            return 1
        freed = repo.delete(entries)
    finally:
        repo.close()
    result = {"deleted": [e["name"] for e in entries], **freed}
    if args.json:
        emit_json(result)
    message(f"deleted {', '.join(result['deleted'])}; {_unused(freed['chunks_freed'], compacted=False)}")
    return 0


def _unused(chunks: int, *, compacted: bool) -> str:
    """What a delete or prune did to the chunks: dropped from the index, their bytes still in their packs
    until ``backup compact`` (docs/backup-format.md section 6) -- not "freed", which they are not yet."""
    if not chunks or compacted:
        return f"{chunks} chunk(s) no longer used"
    return f"{chunks} chunk(s) no longer used ('qwamos backup compact' reclaims their space)"


def cmd_prune(args: argparse.Namespace) -> int:
    if args.threshold is not None and not args.compact:
        raise InvalidArgument("--threshold goes with --compact")
    repo = _open(args, exclusive=True)
    try:
        question = f"Delete all but the newest {args.keep_last} archive(s) of each volume in {repo.path}?"
        if not confirm(question, yes=args.yes, action=f"prune {repo.path}"):
            message("nothing deleted")
            return 1
        result = engine.prune(repo, args.keep_last)
        if args.compact:  # under the same exclusive lock: nothing can come between
            result["compact"] = repo.compact(_threshold(args))
    finally:
        repo.close()
    if args.json:
        emit_json(result)
    message(
        f"pruned {len(result['deleted'])} archive(s); {_unused(result['chunks_freed'], compacted=args.compact)}"
    )
    if args.compact:
        message(_compact_summary(result["compact"]))
    return 0


def _add_threshold(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="PERCENT",
        help=f"rewrite a pack when more than PERCENT of its bytes are unused{note} "
        f"(default: {COMPACT_THRESHOLD:g})",
    )


def _threshold(args: argparse.Namespace) -> float:
    return COMPACT_THRESHOLD if args.threshold is None else args.threshold


def _compact_summary(result: dict[str, Any]) -> str:
    return (
        f"compacted: {len(result['packs_rewritten'])} pack(s) rewritten ({_size(result['bytes_copied'])} copied), "
        f"{len(result['packs_removed'])} removed, {result['files_removed']} file(s) deleted; "
        f"{_size(result['bytes_freed'])} freed"
    )


def cmd_compact(args: argparse.Namespace) -> int:
    repo = _open(args, exclusive=not args.dry_run)
    progress = _Progress("Compacting", args.json)
    try:
        if args.dry_run:
            plan = repo.plan_compact(_threshold(args))
        else:
            result = repo.compact(_threshold(args), progress=progress)
    finally:
        progress.finish()
        repo.close()
    if args.dry_run:
        if args.json:
            emit_json(plan)
        else:
            for p in plan["packs"]:
                if p["action"] != "keep":
                    print_data(
                        f"{p['action']:<8} packs/{p['id']}  {_size(p['size'])}, {p['unused_percent']:g} % unused"
                    )
            for x in plan["leftovers"]:
                print_data(f"remove   {x['path']}  {_size(x['size'])}, left by an interrupted command")
            message(f"dry run: would copy {_size(plan['bytes_to_copy'])} and free {_size(plan['bytes_freed'])}")
        return 0
    if args.json:
        emit_json(result)
    message(_compact_summary(result))
    return 0


def _recovery_passphrase(args: argparse.Namespace, *, confirm: bool) -> bytes:
    from qwamos.keystore import read_passphrase

    pp = read_passphrase(
        fd=args.recovery_passphrase_fd, env=RECOVERY_ENV, prompt="Backup key passphrase: ", confirm=confirm
    )
    if not pp:
        raise InvalidArgument(
            "a passphrase is needed: pass --recovery-passphrase-fd N, set "
            "QWAMOS_RECOVERY_PASSPHRASE, or run on a terminal"
        )
    return pp


def cmd_key(args: argparse.Namespace) -> int:
    from qwamos.keystore.files import read_bounded, write_private

    ks = open_keystore(args)
    repo = Repository(_repo_path(args), ks)
    if args.key_action == "export":
        if args.output is None:
            raise InvalidArgument("backup key export needs -o FILE")
        pp = _recovery_passphrase(args, confirm=True)
        write_private(args.output, repo.export_key(pp, ks.argon2_params), replace=False)
        message(f"wrote the key of {repo.path} to {args.output}, sealed with the passphrase (keep them apart)")
        return 0
    if args.file is None:
        raise InvalidArgument("backup key import needs FILE")
    data = read_bounded(args.file)
    pp = _recovery_passphrase(args, confirm=False)
    repo.import_key(data, pp)
    message(f"imported the key of {repo.path}, wrapped to this keystore's identity")
    return 0
