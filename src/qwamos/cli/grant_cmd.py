"""``qwamos key grant|import-grant|revoke|grants``: share one volume key with another keystore (host).

Thin over :mod:`qwamos.keystore.grants`.  ``grant`` writes the grant document (encapsulated to the other
host's identity; not secret to anyone else) to ``-o FILE`` or stdout; ``import-grant`` shows the granting
keystore's fingerprint and stores the key only once the operator confirmed it (``--expect-fingerprint FP``,
or ``--yes`` after reading it, or typing it at the prompt).  A grant from an identity without a signing key
(version 1, classical-only authenticity) is made and imported only with ``--allow-classical``, with a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qwamos.cli.keystore_args import open_keystore
from qwamos.cli.output import emit_json, message, warn
from qwamos.errors import InvalidArgument, KeyExistsError
from qwamos.keystore import grants
from qwamos.keystore.files import read_bounded, write_private

REVOKE_CAVEAT = (
    "the other host imported the key and keeps it: revoking stops this keystore listing the grant, it cannot "
    "make that host forget the key. To cut it off, take away its cluster access (ceph auth) and re-encrypt "
    "the volume under a new key"
)


CLASSICAL_WARNING = (
    "this grant is authenticated classically only (X25519, version 1): the granting identity has no signing "
    "key, and someone able to break X25519 could have forged it. 'qwamos key rotate-identity' on the granting "
    "host adds a signing key"
)


def register_grant_actions(action: Any) -> None:
    """Add the grant actions to ``qwamos key`` (``action`` is key_cmd's sub-command factory)."""
    g = action(
        "grant",
        "give a key to another keystore (host): a grant document for its identity.pub",
        cmd_grant,
        [
            "qwamos key grant vm-web-1a2b --to hostb-identity.pub -o web.grant",
            "qwamos key grant vm-web-1a2b --to hostb-identity.pub > web.grant",
        ],
    )
    g.add_argument("key_id", metavar="KEY_ID", help="the key to give")
    g.add_argument(
        "--to", type=Path, required=True, metavar="IDENTITY.pub", help="the other keystore's identity.pub"
    )
    g.add_argument(
        "-o", "--output", type=Path, default=None, metavar="FILE", help="write the grant here (default: stdout)"
    )
    g.add_argument("--force", action="store_true", help="replace FILE if it exists (refused by default)")
    g.add_argument(
        "--allow-classical",
        action="store_true",
        help="this keystore's identity has no signing key: grant anyway, authenticated classically only "
        "(better: 'qwamos key rotate-identity' first)",
    )
    i = action(
        "import-grant",
        "store a key granted by another keystore, after confirming the granting fingerprint",
        cmd_import_grant,
        [
            "qwamos key import-grant web.grant --expect-fingerprint 0123456789abcdef   # or all 64 hex digits",
            "qwamos key import-grant web.grant   # shows the fingerprint and asks",
            "qwamos key import-grant old.grant --expect-fingerprint 0123456789abcdef --allow-classical",
        ],
    )
    i.add_argument("file", type=Path, metavar="FILE", help="the grant document")
    i.add_argument(
        "--expect-fingerprint",
        metavar="FP",
        default=None,
        help="the granting keystore's fingerprint, as 'qwamos key identity' shows it there: 16 hex digits, or "
        "the 64 of fingerprint_full (a second identity with the same 16 is a 2^64 search; default: show it and "
        "ask)",
    )
    i.add_argument(
        "--yes", action="store_true", help="accept the fingerprint shown without asking (check it first)"
    )
    i.add_argument("--force", action="store_true", help="replace a key with the same id (refused by default)")
    i.add_argument(
        "--allow-classical",
        action="store_true",
        help="accept a version 1 grant (from an identity without a signing key), authenticated classically only",
    )
    r = action(
        "revoke",
        "undo a grant: to FP (granting side: recorded) or from FP (receiving side: the key is deleted)",
        cmd_revoke,
        ["qwamos key revoke vm-web-1a2b --from 0123456789abcdef"],
    )
    r.add_argument("key_id", metavar="KEY_ID", help="the granted key")
    r.add_argument(
        "--from",
        dest="fingerprint",
        required=True,
        metavar="FP",
        help="the other keystore's fingerprint (16 hex digits, or the 64 of fingerprint_full)",
    )
    r.add_argument("--force", action="store_true", help="receiving side: delete the key even while volumes use it")
    s = action(
        "grants",
        "list a key's grants (to whom, and where it came from)",
        cmd_grants,
        ["qwamos key grants vm-web-1a2b", "qwamos key grants vm-web-1a2b --all --json"],
    )
    s.add_argument("key_id", metavar="KEY_ID", help="the key")
    s.add_argument("--all", action="store_true", help="also the revoked grants")


def cmd_grant(args: argparse.Namespace) -> int:
    try:
        pub = read_bounded(args.to)
    except FileNotFoundError:
        raise InvalidArgument(f"{args.to}: no such file") from None
    ks = open_keystore(args)
    data = grants.grant_key(ks, args.key_id, pub, str(args.to), allow_classical=args.allow_classical)
    info = grants.describe_grant(data)
    if info["version"] == grants.VERSION_1:
        warn(CLASSICAL_WARNING)
    if args.output is not None:
        try:
            write_private(args.output, data, replace=args.force)
        except KeyExistsError:
            raise InvalidArgument(f"{args.output} exists; pass --force to replace it") from None
    else:
        sys.stdout.write(data.decode("ascii"))
    if args.json and args.output is not None:
        emit_json({**info, "file": str(args.output)})
    message(
        f"granted key {args.key_id} to identity {info['recipient_fingerprint']}; the receiving operator must "
        f"confirm this keystore's fingerprint {info['grantor_fingerprint']}"
    )
    return 0


def cmd_import_grant(args: argparse.Namespace) -> int:
    try:
        data = read_bounded(args.file)
    except FileNotFoundError:
        raise InvalidArgument(f"{args.file}: no such file") from None
    info = grants.describe_grant(data)
    claimed = info["grantor_fingerprint"]
    message(
        f"grant of key {info['key_id']} (VM {info['vm_name'] or '-'}) from the keystore with fingerprint "
        f"{claimed} (full: {info['grantor_fingerprint_full']})"
    )
    expect = args.expect_fingerprint
    if expect is None:
        if args.yes:
            expect = info["grantor_fingerprint_full"]
        elif sys.stdin.isatty():
            expect = input(
                "Compare with the granting host's 'qwamos key identity'; type its fingerprint (16 or, better, "
                "all 64 hex digits) to accept: "
            ).strip()
        else:
            raise InvalidArgument(
                "refusing to import a grant without confirming the granting keystore's fingerprint: pass "
                "--expect-fingerprint FP (or --yes after checking the fingerprint above)"
            )
    ks = open_keystore(args)
    key_id = grants.import_grant(
        ks, data, expect_fingerprint=expect, overwrite=args.force, allow_classical=args.allow_classical
    )
    if info["version"] == grants.VERSION_1:
        warn(CLASSICAL_WARNING)
    if args.json:
        emit_json({**ks.get_metadata(key_id), "granted_by": claimed})
    else:
        print(key_id)
    message(f"imported key {key_id} granted by {claimed}; it is now wrapped to this keystore's own identity")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    side = grants.revoke_grant(ks, args.key_id, args.fingerprint, force=args.force)
    if args.json:
        emit_json({"key_id": args.key_id, "fingerprint": args.fingerprint, "side": side})
    if side == "granted":
        message(f"revoked the grant of {args.key_id} to {args.fingerprint}")
        warn(REVOKE_CAVEAT)
    else:
        message(f"deleted key {args.key_id} (it was granted by {args.fingerprint})")
    return 0


def cmd_grants(args: argparse.Namespace) -> int:
    ks = open_keystore(args)
    out = grants.list_grants(ks, args.key_id, include_revoked=args.all)
    if args.json:
        emit_json(out)
        return 0
    if out["received_from"]:
        print(f"received from {out['received_from']['fingerprint']}")
    for g in out["granted"]:
        state = " (revoked)" if g.get("revoked_at") else ""
        print(f"granted to {g['recipient_fingerprint']}{state}")
    return 0
