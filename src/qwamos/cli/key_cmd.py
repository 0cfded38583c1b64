"""``qwamos key [--keystore DIR] init|identity|list|show|delete|rotate|rotate-identity|passphrase|export|import``.

Thin over :class:`qwamos.keystore.PQCKeystore`.  Passphrases never come from argv: the keystore one from
``--passphrase-fd N``, ``--passphrase-file PATH``, systemd credentials, ``$QWAMOS_PASSPHRASE`` or a prompt
(every action accepts the options, :mod:`qwamos.cli.keystore_args`); the recovery-file one from
``--recovery-passphrase-fd N``, ``$QWAMOS_RECOVERY_PASSPHRASE``, ``$QWAMOS_PASSPHRASE`` or a prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qwamos.cli.keystore_args import add_keystore_args, open_keystore
from qwamos.cli.output import (
    Progress,
    add_json_option,
    add_yes_option,
    confirm,
    emit_json,
    emit_json_line,
    message,
    print_data,
    print_fields,
    symbol,
    warn,
)
from qwamos.errors import (
    IdentityNotFoundError,
    InvalidArgument,
    KeyExistsError,
    KeyNotFoundError,
    KeyStateError,
    QwamosError,
)
from qwamos.keystore import PQCKeystore, read_passphrase
from qwamos.keystore.files import read_bounded, write_private

RECOVERY_ENV = ("QWAMOS_RECOVERY_PASSPHRASE", "QWAMOS_PASSPHRASE")
_KEYSTORE_HELP = "keystore directory (default: $QWAMOS_KEYSTORE or ~/.qwamos/keystore)"
_KEY_ID_HELP = "the key's id (as `qwamos key list` shows it)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "key",
        help="manage the keystore: list, show, rotate, delete, export/import and grant keys",
        examples=["qwamos key list", "qwamos key --keystore /srv/keys show vm-web-1a2b"],
    )
    p.add_argument("--keystore", type=Path, default=None, metavar="DIR", help=_KEYSTORE_HELP)
    ksub = p.add_subparsers(dest="key_command", metavar="ACTION", required=True)

    def action(
        name: str,
        help_: str,
        func: Any,
        examples: list[str],
        *,
        json_out: bool = True,
        passphrase: bool = True,
    ) -> Any:
        a = ksub.add_parser(name, help=help_, examples=examples)
        # Also accepted after the action; SUPPRESS keeps it from overriding the group-level value.
        a.add_argument("--keystore", type=Path, default=argparse.SUPPRESS, metavar="DIR", help=_KEYSTORE_HELP)
        if json_out:
            add_json_option(a)
        if passphrase:
            add_keystore_args(a, keystore=False)
        a.set_defaults(func=func)
        return a

    action(
        "init",
        "create the keystore identity now (sealed if a passphrase is given)",
        cmd_init,
        ["qwamos key init", "qwamos key init --passphrase-file /etc/qwamos/passphrase"],
    )
    action(
        "identity",
        "show the identity's fingerprint and whether it is sealed",
        cmd_identity,
        ["qwamos key identity", "qwamos key identity --json"],
    )
    lst = action(
        "list",
        "list keys: state, users, when next due for rotation, destroyed keys",
        cmd_list,
        ["qwamos key list", "qwamos key list --json"],
    )
    lst.add_argument(
        "--root",
        type=Path,
        default=None,
        metavar="DIR",
        help="VM root (rotation ages in configs; default: $QWAMOS_ROOT or ~/QWAMOS)",
    )
    po = action(
        "policy",
        "show or set the keystore-wide rotation age (the default for VMs without rotation.max_age)",
        cmd_policy,
        ["qwamos key policy", "qwamos key policy --max-age 90d", "qwamos key policy --clear"],
    )
    g = po.add_mutually_exclusive_group()
    g.add_argument(
        "--max-age",
        default=None,
        metavar="AGE",
        help="rotate keys older than AGE (90d, 12w, 36h; default: show only)",
    )
    g.add_argument("--clear", action="store_true", help="no keystore-wide rotation age")
    s = action(
        "show",
        "show one key's metadata, state and users",
        cmd_show,
        ["qwamos key show vm-web-1a2b", "qwamos key show vm-web-1a2b --verify --json"],
    )
    s.add_argument("key_id", metavar="KEY_ID", help=_KEY_ID_HELP)
    s.add_argument(
        "--verify", action="store_true", help="also check the key file completely (MAC, pin; opens the identity)"
    )
    d = action(
        "delete",
        "overwrite and remove a key (irreversible without an export)",
        cmd_delete,
        ["qwamos key delete vm-old-1a2b", "qwamos key delete vm-old-1a2b --yes --force"],
        json_out=False,
    )
    d.add_argument("key_id", metavar="KEY_ID", help=_KEY_ID_HELP)
    add_yes_option(d)
    d.add_argument(
        "--force",
        action="store_true",
        help="delete even when volumes use it (they become unreadable; refused by default)",
    )
    r = action(
        "rotate",
        "re-encrypt every volume using KEY_ID under a new key, update VM configs, destroy KEY_ID",
        cmd_rotate,
        [
            "qwamos key rotate vm-web-1a2b3c4d5e6f7890",
            "qwamos key rotate vm-web-1a2b3c4d5e6f7890 --keep-old --rate 100M --json",
            "qwamos key rotate --due --dry-run",
        ],
    )
    r.add_argument("key_id", metavar="KEY_ID", nargs="?", help=_KEY_ID_HELP + "; or --due")
    r.add_argument(
        "--due", action="store_true", help="rotate every key that is due (rotation.max_age, key policy)"
    )
    r.add_argument("--keep-old", action="store_true", help="retire the old key instead of destroying it")
    r.add_argument("--dry-run", action="store_true", help="show what would be done; change nothing")
    r.add_argument(
        "--rate",
        default=None,
        metavar="R",
        help="limit re-encryption to R bytes/s of the file (50M, 1G; default: none offline, 64M online)",
    )
    add_yes_option(r)
    r.add_argument(
        "--detach", action="store_true", help="start online re-encryptions and return; run again to finish"
    )
    r.add_argument(
        "--root", type=Path, default=None, metavar="DIR", help="VM root (default: $QWAMOS_ROOT or ~/QWAMOS)"
    )
    r.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="SOCKET",
        help="control socket of a running 'volume serve' export using the key (it re-encrypts online); "
        "repeatable (default: none; a running VM's export is found by itself)",
    )
    r.add_argument(
        "--volume",
        action="append",
        default=[],
        metavar="PATH",
        help="also re-encrypt this volume (one the records do not know, or a moved one); repeatable "
        "(default: the volumes the records and VM configs name)",
    )
    ri = action(
        "rotate-identity",
        "new identity key pair; re-wrap every key to it, update VM configs, destroy the old identity",
        cmd_rotate_identity,
        ["qwamos key rotate-identity --yes", "qwamos key rotate-identity --passphrase-file /etc/qwamos/pp --yes"],
    )
    ri.add_argument(
        "--root",
        type=Path,
        default=None,
        metavar="DIR",
        help="VM root whose configs name the identity (default: $QWAMOS_ROOT or ~/QWAMOS)",
    )
    add_yes_option(ri)
    _also(ri)
    pp = action(
        "passphrase",
        "seal the identity, change its passphrase, or unseal it",
        cmd_passphrase,
        [
            "qwamos key passphrase                      (asks the current and the new one)",
            "qwamos key passphrase --passphrase-fd 3 --new-passphrase-fd 4",
            "qwamos key passphrase --unseal --yes",
        ],
    )
    pp.add_argument(
        "--new-passphrase-fd",
        type=int,
        default=None,
        metavar="N",
        help="read the new passphrase from fd N (default: --new-passphrase-file, else a prompt)",
    )
    pp.add_argument(
        "--new-passphrase-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="read the new passphrase from PATH (0600; default: a prompt)",
    )
    pp.add_argument("--unseal", action="store_true", help="store the identity unsealed (file permissions only)")
    _also(pp)
    add_yes_option(pp)
    e = action(
        "export",
        "write a passphrase-sealed recovery copy of a key",
        cmd_export,
        ["qwamos key export vm-web-1a2b -o recovery.json", "qwamos key export vm-web-1a2b -o r.json --force"],
    )
    e.add_argument("key_id", metavar="KEY_ID", help=_KEY_ID_HELP)
    e.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="recovery file to write")
    e.add_argument("--force", action="store_true", help="replace FILE if it exists (refused by default)")
    _recovery_fd(e)
    i = action(
        "import",
        "store a key from a recovery file, wrapped to this keystore",
        cmd_import,
        ["qwamos key import recovery.json", "qwamos key import recovery.json --recovery-passphrase-fd 3 3<pw"],
    )
    i.add_argument("file", type=Path, metavar="FILE", help="the recovery file (from key export)")
    i.add_argument("--force", action="store_true", help="replace a key with the same id (refused by default)")
    _recovery_fd(i)
    from qwamos.cli.grant_cmd import register_grant_actions

    register_grant_actions(action)


def _also(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="FILE",
        help="another key document outside the keystore wrapped to its identity, re-wrapped too; repeatable "
        "(default: the key of every backup repository this machine has used)",
    )


def _recovery_fd(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recovery-passphrase-fd",
        type=int,
        default=None,
        metavar="N",
        help="read the recovery file's passphrase from file descriptor N "
        "(default: $QWAMOS_RECOVERY_PASSPHRASE, else $QWAMOS_PASSPHRASE, else a prompt)",
    )


def _recovery_passphrase(args: argparse.Namespace, *, confirm: bool) -> bytes:
    pp = read_passphrase(
        fd=args.recovery_passphrase_fd, env=RECOVERY_ENV, prompt="Recovery passphrase: ", confirm=confirm
    )
    if not pp:
        raise InvalidArgument(
            "a recovery passphrase is needed: pass --recovery-passphrase-fd N, set QWAMOS_RECOVERY_PASSPHRASE, "
            "or run on a terminal"
        )
    return pp


def cmd_init(args: argparse.Namespace) -> int:
    pp = read_passphrase(
        fd=args.passphrase_fd,
        file=args.passphrase_file,
        credentials=True,
        prompt="New keystore passphrase (empty: none): ",
        confirm=True,
    )
    ks = PQCKeystore(args.keystore, passphrase=lambda: pp)
    info = ks.init_identity()
    if args.json:
        emit_json(info)
    else:
        print_fields(info)
        if not info["sealed"]:
            warn("the identity is not sealed with a passphrase; it is protected by file permissions only")
    return 0


SIGNING_KEY_HINT = (
    "this identity has no signing key (it predates ML-DSA): grants from this keystore are authenticated "
    "classically only. 'qwamos key rotate-identity' replaces it with one that has a signing key (the fingerprint "
    "changes: give other hosts the new identity.pub and fingerprint)"
)


def cmd_identity(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    info = ks.identity_info()
    if info is None:
        where = "none yet" if ks.path.is_dir() else "the keystore does not exist"
        raise IdentityNotFoundError(
            keystore=str(ks.path), msg=f"{where} (it is made with the first key, or by `qwamos key init`)"
        )
    emit_json(info) if args.json else print_fields(info)
    if info["signature"] is None:
        warn(SIGNING_KEY_HINT)
    ks.check_pin()  # after printing: say what identity.key and identity.pin each claim, then refuse
    return 0


def _with_usage(ks: PQCKeystore, meta: dict[str, Any]) -> dict[str, Any]:
    """A key's metadata plus ``state``, ``successors``, ``users`` and ``vms`` (PQCKeystore.key_usage)."""
    return {**meta, **ks.key_usage(meta["key_id"])}


def _users_text(usage: dict[str, Any]) -> str:
    live = [u for u in usage["users"] if u["state"] == "live"]
    stale = len(usage["users"]) - len(live)
    parts = [u["path"] + (f" ({u['vm_name']})" if u["vm_name"] else "") for u in live]
    if stale:
        parts.append(f"{stale} stale")
    return ", ".join(parts) or "-"


def _schedule(ks: PQCKeystore, root: Path | None) -> dict[str, dict[str, Any]]:
    """Each key's rotation schedule row (qwamos.hypervisor.keyrotation.rotation_schedule), now."""
    from qwamos.hypervisor.keyrotation import rotation_schedule
    from qwamos.hypervisor.manager import VMManager

    now = datetime.now(UTC)
    return {r["key_id"]: r for r in rotation_schedule(ks, VMManager(root, keystore=ks.path), now)}


def _due_text(row: dict[str, Any] | None) -> str:
    if row is None or row["next_due"] is None:
        return "-"
    return f"{row['next_due']} (due)" if row["due"] else row["next_due"]


def cmd_list(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    schedule = _schedule(ks, args.root)
    keys = [k if "error" in k else _with_usage(ks, k) for k in ks.list_keys()]
    for k in keys:
        row = schedule.get(k["key_id"])
        if row is not None:
            k.update({f: row[f] for f in ("next_due", "due", "max_age", "max_age_from")})
    destroyed = [{**t, "state": "destroyed"} for t in ks.destroyed_keys() if not ks.has_key(t["key_id"])]
    if args.json:
        emit_json(keys + destroyed)
        return 0
    if not keys and not destroyed:
        message(f"no keys in {ks.path}")
        return 0
    rows = [("KEY ID", "VM", "TYPE", "STATE", "CREATED", "ROTATIONS", "NEXT DUE", "USED BY")]
    for k in keys:
        if "error" in k:
            rows.append((k["key_id"], "-", "ERROR", "-", k["error"], "-", "-", "-"))
        else:
            state = k["state"] + (f" by {k['successor']}" if k.get("successor") else "")
            rows.append(
                (
                    k["key_id"],
                    k["vm_name"] or "-",
                    k["key_type"],
                    state,
                    k["created_at"] or "-",
                    str(k["rotation_count"]),
                    _due_text(k),
                    _users_text(k),
                )
            )
    for t in destroyed:
        by = f" (succeeded by {t['successor']})" if t["successor"] else ""
        rows.append(
            (t["key_id"], t["vm_name"] or "-", "-", f"destroyed at {t['destroyed_at']}{by}", "-", "-", "-", "-")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print_data("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    if args.max_age is not None or args.clear:
        ks.set_rotation_policy(None if args.clear else args.max_age)
        message(f"keystore rotation age: {args.max_age or 'none'}")
    current = ks.rotation_policy()
    if args.json:
        emit_json(current)
    else:
        print_data(current["rotation_max_age"] or "none")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    meta = _with_usage(ks, ks.get_metadata(args.key_id))
    # Check the key file completely whenever that needs no prompt (unsealed identity, or a passphrase given):
    # a forged file is refused here too.  A sealed identity without a passphrase only with --verify.
    ident = ks.identity_info()
    quiet = ident is not None and (
        not ident["sealed"]
        or args.passphrase_fd is not None
        or args.passphrase_file is not None
        or bool(os.environ.get("QWAMOS_PASSPHRASE"))
    )
    verify = args.verify or quiet
    if verify:
        ks.verify_key(args.key_id)
    meta["verified"] = verify
    if args.json:
        emit_json(meta)
        return 0
    shown = {k: v for k, v in meta.items() if k not in ("users", "successors", "vms")}
    shown["successors"] = ", ".join(meta["successors"]) or "-"
    shown["vms"] = ", ".join(meta["vms"]) or "-"
    shown["verified"] = "yes (pin, MAC, AEAD)" if verify else "no (sealed identity: pass --verify to check)"
    print_fields(shown)
    for u in meta["users"]:
        extra = f" ({u['reason']})" if u["state"] == "stale" else ""
        vm = f" VM {u['vm_name']}" if u["vm_name"] else ""
        print_data(f"user:  {u['state']}: {u['path']} uuid {u['volume_uuid']}{vm}{extra}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    if not ks.has_key(args.key_id):  # before asking anything; a damaged key can still be deleted
        raise KeyNotFoundError(key_id=args.key_id, keystore=str(ks.path))
    if not args.force:
        ks.check_not_in_use(args.key_id)  # refuse before asking for a confirmation
    if not confirm(
        f"Delete key {args.key_id}? Volumes using it become unreadable.",
        yes=args.yes,
        action=f"delete key {args.key_id}",
    ):
        message("not deleted")
        return 1
    lost = ks.delete_key(args.key_id, force=args.force)
    message(f"deleted key {args.key_id}")
    for u in lost:
        vm = f" (VM {u['vm_name']})" if u["vm_name"] else ""
        warn(f"volume {u['path']}{vm} is now unreadable (unless a 'key export' copy of the key exists)")
    return 0


class _RotateReporter:
    """Events of a rotation: JSON lines on stdout with ``--json``; otherwise messages on stderr and, on a
    terminal, a progress line with rate and ETA."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines
        self._bars: dict[str, Progress] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        if self.json_lines:  # "type" as every --json event stream has it (migrate, progress); "event" kept
            emit_json_line({"type": event["event"], **event})
            return
        kind = event["event"]
        if kind == "progress":
            self._progress(event)
        elif kind == "volume":
            where = f" (VM {event['vm']})" if event.get("vm") else ""
            verb = "resuming" if event["status"] == "resume" else "re-encrypting"
            message(f"{verb} {event['path']}{where} {event['mode']}")
            # the bar's clock starts with the work: made at the first progress event (after a whole batch),
            # its rate was that batch over ~0 s ("477276.3 MB/s")
            self._bars[event["path"]] = Progress(0, label=Path(event["path"]).name, unit_bytes=4096)
        elif kind == "volume-done":
            bar = self._bars.pop(event["path"], None)
            if bar is not None and bar.total:
                bar.finish()
            message(f"  done: {event['path']}")
        elif kind == "successor":
            message(f"{event['old_key_id']} {symbol('arrow', sys.stderr)} {event['new_key_id']}")
        elif kind == "record-dropped":
            warn(f"dropped the record of {event['path']} ({event['reason']})")
        elif kind == "vm-config":
            message(f"VM {event['vm']}: storage.encryption.key_id is now {event['key_id']}")
        elif kind == "detached":
            message("online re-encryption continues in: " + ", ".join(event["volumes"]))

    def _progress(self, e: dict[str, Any]) -> None:
        bar = self._bars.get(e["path"])
        if bar is None:
            bar = self._bars[e["path"]] = Progress(e["total"], label=Path(e["path"]).name, unit_bytes=4096)
        bar.total = e["total"]
        bar.update(e["done"])


def _exports(args: argparse.Namespace) -> dict[str, str]:
    """``--export SOCKET`` -> {volume path: control socket}, asked from each export's status."""
    from qwamos.nbd.control_client import control_path_for, read_status

    out = {}
    for sock in args.export:
        ctl = sock if str(sock).endswith(".ctl") else str(control_path_for(sock))
        status = read_status(ctl)
        vol = (status.get("volume") or {}).get("path")
        if not vol:
            raise InvalidArgument(f"the export at {sock} serves no volume file")
        out[vol] = ctl
    return out


def _print_plan(plan: Any) -> None:
    new = plan.new_key_id or "(a new key)"
    message(
        f"rotate {plan.old_key_id} -> {new}, then {'retire' if plan.keep_old else 'destroy'} {plan.old_key_id}"
    )
    for t in plan.targets:
        vm = f" (VM {t.vm})" if t.vm else ""
        how = {"pending": f"re-encrypt {t.mode}", "resume": f"resume {t.mode}", "done": "already re-encrypted"}
        message(f"  {t.path}{vm}: {how.get(t.status, t.status)}" + (f": {t.problem}" if t.problem else ""))
    for name in plan.configs:
        message(f"  VM config {name}: key_id -> {new}")


def _rotate_one(args: argparse.Namespace, ks: PQCKeystore, manager: Any, key_id: str, report: Any) -> dict:
    from qwamos.hypervisor.keyrotation import KeyRotation
    from qwamos.hypervisor.sizes import parse_size

    rate = parse_size(args.rate, what="--rate") if args.rate else None
    rot = KeyRotation(
        ks,
        manager,
        key_id,
        keep_old=args.keep_old,
        rate=rate,
        exports=_exports(args),
        volumes=args.volume,
        events=report,
    )
    plan = rot.plan()
    if args.dry_run:
        return {"dry_run": True, **plan.to_dict()}
    if plan.unused:  # nothing to re-encrypt: no successor is made; the key is only ended, after asking
        end = "retire" if args.keep_old else "destroy"
        message(f"{key_id}: no volume uses it: nothing to re-encrypt, no successor is made")
        ks.verify_key(key_id)  # a wrong or missing passphrase fails before anything is asked
        files = [str(p) for p in ks.key_files(key_id)]
        if not confirm(
            f"{end.capitalize()} key {key_id}?",
            yes=args.yes,
            action=f"{end} the unused key {key_id}",
            details=[f"would overwrite and remove {f}" for f in files] if end == "destroy" else None,
        ):
            raise KeyStateError(key_id=key_id, state=plan.state, msg="not confirmed; nothing was changed")
        return rot.run(plan)
    if not args.json:
        _print_plan(plan)
    accept = False
    if plan.problems and (args.yes or sys.stdin.isatty()):
        accept = confirm(
            "Drop the records of these volumes and rotate anyway (a copy of one elsewhere becomes unreadable)?",
            yes=args.yes,
            action=f"rotate {key_id}",
            details=[f"- {t.problem}\n    fix: {t.fix}" for t in plan.problems],
        )
    return rot.run(plan, accept_problems=accept, detach=args.detach)


def cmd_rotate(args: argparse.Namespace) -> int:
    from qwamos.hypervisor.keyrotation import rotation_schedule
    from qwamos.hypervisor.manager import VMManager

    if bool(args.key_id) == bool(args.due):
        raise InvalidArgument("name one KEY_ID, or pass --due")
    ks = open_keystore(args)
    manager = VMManager(args.root, keystore=ks.path, keystore_factory=lambda: ks)
    report = _RotateReporter(args.json)
    if args.key_id:
        result = _rotate_one(args, ks, manager, args.key_id, report)
        results = [result]
    else:
        due = [r for r in rotation_schedule(ks, manager, datetime.now(UTC)) if r["due"]]
        results = []
        failed = 0
        for row in due:
            if _unused(ks, manager, row):  # rotating it would only make a spare key: `key delete` ends it
                results.append({"key_id": row["key_id"], "unused": True, "skipped": True, "dry_run": args.dry_run})
                continue
            if args.dry_run:
                results.append({"dry_run": True, "key_id": row["key_id"], "next_due": row["next_due"]})
                continue
            try:
                results.append(_rotate_one(args, ks, manager, row["key_id"], report))
            except QwamosError as e:  # one key's trouble does not stop the others
                failed += 1
                results.append({"key_id": row["key_id"], "error": str(e)})
                warn(f"{row['key_id']}: not rotated: {e}")
        if not due:
            message("no key is due for rotation")
    if args.json:
        report({"event": "result", "results": results} if args.due else {"event": "result", **results[0]})
    else:
        for r in results:
            _print_rotate_result(r)
    if args.due and any("error" in r for r in results):
        return 1
    return 0


def _unused(ks: PQCKeystore, manager: Any, row: dict[str, Any]) -> bool:
    """True when the due key ``row`` is active and no volume uses it (``--due`` skips it)."""
    from qwamos.hypervisor.keyrotation import KeyRotation

    if row["state"] != "active":
        return False
    try:
        return KeyRotation(ks, manager, row["key_id"]).plan().unused
    except QwamosError:
        return False  # rotating it says what is wrong


def _print_rotate_result(r: dict[str, Any]) -> None:
    if r.get("skipped"):
        key = r["key_id"]
        print_data(f"{key}: unused (no volume uses it): not rotated; end it with: qwamos key delete {key}")
        return
    if r.get("dry_run"):
        if r.get("unused"):
            then = "retire" if r["then"] == "retire" else "destroy"
            print_data(f"{r['old_key_id']}: unused (no volume uses it): no successor; would {then} it")
            return
        if "volumes" in r:
            print_data(f"{r['old_key_id']} -> {r['new_key_id'] or '(new)'}: {len(r['volumes'])} volume(s)")
            for t in r["volumes"]:
                print_data(
                    f"  {t['path']}: {t['status']} {t['mode']}" + (f" ({t['problem']})" if t["problem"] else "")
                )
        else:
            print_data(f"{r['key_id']}: due since {r['next_due']}")
        return
    if "error" in r:
        return
    if r.get("new_key_id"):
        print_data(r["new_key_id"])
    if "destroyed" in r:
        d = r["destroyed"]
        message(
            f"destroyed key {d['key_id']} at {d['destroyed_at']}: overwrote and removed " + ", ".join(d["files"])
        )
    elif "retired" in r:
        message(f"retired key {r['retired']} (kept for copies made before; never used again)")
    elif r.get("waiting"):
        message(f"{r['old_key_id']} is kept until the online re-encryption finishes: run this command again")


def _outside_documents(args: argparse.Namespace, ks: PQCKeystore) -> list[Path]:
    """Key documents kept outside the keystore that are wrapped to its identity: the ``key`` of every backup
    repository this machine has used (qwamos.backup.repo.known_repositories) that names this identity, and
    the files given with ``--also``.  They are re-wrapped in the same switch as the keystore's own files."""
    from qwamos.backup.repo import known_repositories

    info = ks.identity_info()
    fp = info["fingerprint"] if info else None
    out = [Path(p).absolute() for p in args.also]
    for repo in known_repositories():
        key = Path(repo) / "key"
        try:
            doc = json.loads(read_bounded(key))
        except (OSError, ValueError, QwamosError):
            continue
        if isinstance(doc, dict) and doc.get("identity_fingerprint") == fp and key.absolute() not in out:
            out.append(key.absolute())
    return out


def cmd_rotate_identity(args: argparse.Namespace) -> int:
    from qwamos.hypervisor.keyrotation import update_identity_fingerprints
    from qwamos.hypervisor.manager import VMManager

    ks = open_keystore(args)
    manager = VMManager(args.root, keystore=ks.path)
    pending = ks.pending_identity_switch()
    if pending is None:
        if not confirm(
            f"Replace the identity of {ks.path} and destroy the old one?",
            yes=args.yes,
            action=f"rotate the identity of {ks.path}",
        ):
            message("not rotated")
            return 1
        outside = _outside_documents(args, ks)
        result = ks.rotate_identity(external=outside)
        for doc in outside:
            message(f"re-wrapped {doc}")
        message(f"re-wrapped {len(result['rewrapped'])} key file(s) to identity {result['new_fingerprint']}")
        old_fp, new_fp = result["old_fingerprint"], result["new_fingerprint"]
    else:
        old_fp, new_fp = pending["old_fingerprint"], pending["new_fingerprint"]
        message(f"finishing the interrupted rotation of identity {old_fp} to {new_fp}")
        result = {"old_fingerprint": old_fp, "new_fingerprint": new_fp, "rewrapped": None, "resumed": True}
    upd = update_identity_fingerprints(manager, old_fp, new_fp)
    for name, err in upd.errors.items():
        warn(f"VM {name}: config not updated ({err}); fix it, then run 'qwamos key rotate-identity' again")
    if upd.errors:
        return 1
    ks.finish_identity_switch()
    result = {**result, "vm_configs_updated": upd.updated, "destroyed": f"identity {old_fp}"}
    if args.json:
        emit_json(result)
    else:
        print_data(new_fp)
    for name in upd.updated:
        message(f"VM {name}: storage.encryption.identity_fingerprint is now {new_fp}")
    message(f"destroyed the old identity {old_fp} (identity.key overwritten and removed)")
    return 0


def cmd_passphrase(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    info = ks.identity_info()
    if info is None:
        raise IdentityNotFoundError(keystore=str(ks.path), msg="none yet (create one with `qwamos key init`)")
    if args.unseal:
        if args.new_passphrase_fd is not None or args.new_passphrase_file is not None:
            raise InvalidArgument("--unseal takes no new passphrase")
        if not info["sealed"]:
            message("the identity is not sealed; nothing to do")
            return 0
        if not confirm(
            "Store the identity unsealed (protected by file permissions only)?",
            yes=args.yes,
            action="store the identity unsealed",
        ):
            message("not changed")
            return 1
        new = None
    else:
        new = read_passphrase(
            fd=args.new_passphrase_fd,
            file=args.new_passphrase_file,
            env=None,
            prompt="New keystore passphrase: ",
            confirm=True,
        )
        if not new:
            raise InvalidArgument(
                "a new passphrase is needed (--new-passphrase-fd, --new-passphrase-file or a terminal); to store "
                "the identity unsealed, pass --unseal"
            )
    result = ks.change_passphrase(new, external=_outside_documents(args, ks))
    verb = "unsealed" if not result["sealed"] else ("re-sealed" if result["was_sealed"] else "sealed")
    if args.json:
        emit_json({**result, "action": verb})
    message(f"identity {result['new_fingerprint']} {verb}; {len(result['rewrapped'])} key file(s) rewritten")
    if not result["sealed"]:
        warn("the identity is not sealed with a passphrase; it is protected by file permissions only")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    key_meta = ks.get_metadata(args.key_id)  # fail on a missing key before asking for passphrases
    recovery = _recovery_passphrase(args, confirm=True)
    data = ks.export_key(args.key_id, recovery)
    try:
        write_private(args.output, data, replace=args.force)
    except KeyExistsError:
        raise InvalidArgument(f"{args.output} exists; pass --force to replace it") from None
    if args.json:
        emit_json({"key_id": args.key_id, "vm_name": key_meta["vm_name"], "file": str(args.output)})
    message(f"wrote a recovery copy of {args.key_id} to {args.output} (keep it and its passphrase apart)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    try:
        data = read_bounded(args.file)
    except FileNotFoundError:
        raise InvalidArgument(f"{args.file}: no such file") from None
    recovery = _recovery_passphrase(args, confirm=False)
    ks = open_keystore(args)
    key_id = ks.import_key(data, recovery, overwrite=args.force)
    if args.json:
        emit_json(ks.get_metadata(key_id))
    else:
        print_data(key_id)
    message(f"imported key {key_id} into {ks.path}")
    return 0
