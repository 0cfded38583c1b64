"""``qwamos key [--keystore DIR] init|identity|list|show|delete|rotate|rotate-identity|passphrase|export|import``.

Thin over :class:`qwamos.keystore.PQCKeystore`.  Passphrases never come from argv: the keystore one from
``--passphrase-fd N``, ``--passphrase-file PATH``, systemd credentials, ``$QWAMOS_PASSPHRASE`` or a prompt
(every action accepts the options, :mod:`qwamos.cli.keystore_args`); the recovery-file one from
``--recovery-passphrase-fd N``, ``$QWAMOS_RECOVERY_PASSPHRASE``, ``$QWAMOS_PASSPHRASE`` or a prompt.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from qwamos.cli.keystore_args import add_keystore_args, open_keystore
from qwamos.cli.output import (
    add_json_option,
    add_yes_option,
    confirm,
    emit_json,
    message,
    print_data,
    print_fields,
    symbol,
    warn,
)
from qwamos.errors import IdentityNotFoundError, InvalidArgument, KeyExistsError, KeyNotFoundError
from qwamos.keystore import PQCKeystore, read_passphrase
from qwamos.keystore.files import read_bounded, write_private

RECOVERY_ENV = ("QWAMOS_RECOVERY_PASSPHRASE", "QWAMOS_PASSPHRASE")
_KEYSTORE_HELP = "keystore directory (default: $QWAMOS_KEYSTORE or ~/.qwamos/keystore)"
_KEY_ID_HELP = "the key's id (as `qwamos key list` shows it)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "key",
        help="manage the keystore: list, show, rotate, delete, export/import keys",
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
    action("list", "list keys with their metadata", cmd_list, ["qwamos key list", "qwamos key list --json"])
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
        "make a new key succeeding KEY_ID (the old key is kept)",
        cmd_rotate,
        ["qwamos key rotate vm-web-1a2b", "qwamos key rotate vm-web-1a2b --json"],
    )
    r.add_argument("key_id", metavar="KEY_ID", help=_KEY_ID_HELP)
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


def cmd_identity(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    info = ks.identity_info()
    if info is None:
        where = "none yet" if ks.path.is_dir() else "the keystore does not exist"
        raise IdentityNotFoundError(
            keystore=str(ks.path), msg=f"{where} (it is made with the first key, or by `qwamos key init`)"
        )
    emit_json(info) if args.json else print_fields(info)
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


def cmd_list(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    keys = [k if "error" in k else _with_usage(ks, k) for k in ks.list_keys()]
    if args.json:
        emit_json(keys)
        return 0
    if not keys:
        message(f"no keys in {ks.path}")
        return 0
    rows = [("KEY ID", "VM", "TYPE", "STATE", "CREATED", "ROTATIONS", "USED BY")]
    for k in keys:
        if "error" in k:
            rows.append((k["key_id"], "-", "ERROR", "-", k["error"], "-", "-"))
        else:
            rows.append(
                (
                    k["key_id"],
                    k["vm_name"] or "-",
                    k["key_type"],
                    k["state"],
                    k["created_at"] or "-",
                    str(k["rotation_count"]),
                    _users_text(k),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print_data("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
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


def cmd_rotate(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    new_id = ks.rotate_key(args.key_id)
    if args.json:
        emit_json({"old_key_id": args.key_id, "new_key_id": new_id})
    else:
        print_data(new_id)
    message(f"Rotated: {args.key_id} {symbol('arrow', sys.stderr)} {new_id}")
    warn(
        f"volumes encrypted under {args.key_id} still use it: keep it until their data is re-encrypted "
        "(re-encryption is not implemented yet)"
    )
    return 0


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
        result = ks.rotate_identity()
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
    result = ks.change_passphrase(new)
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
