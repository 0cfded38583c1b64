"""``qwamos vm domxml`` and ``qwamos vm autostart``, the operator verbs that plug QWAMOS VMs into the tools
around them (libvirt, systemd): registered under ``qwamos vm`` by :mod:`qwamos.cli.vm_cmd`, kept in their
own module so that the lifecycle commands there stay as they are.

Data on stdout (the domain XML; ``autostart --json``), messages on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOMXML_EXAMPLES = [
    "qwamos vm domxml web > web.xml && virsh -c qemu:///session define web.xml",
    "qwamos vm domxml web --socket /run/qwamos/web.sock",
]
DOMXML_EPILOG = """The disk is read through the block export: start it first
(qwamos volume serve DISK.qvol --socket SOCK), then virsh start.  See docs/vm-manager.md,
"Running a VM under libvirt"."""


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add this module's actions with ``vm_cmd``'s ``add(name, help, func)`` (which adds --root/--keystore
    and the VM name)."""
    sp = add(
        "domxml",
        "print a libvirt domain XML for the VM (for virsh define)",
        cmd_domxml,
        examples=DOMXML_EXAMPLES,
        epilog=DOMXML_EPILOG,
    )
    sp.add_argument(
        "--socket",
        type=Path,
        default=None,
        metavar="PATH",
        help="the block export's UNIX socket the disk is attached from (default: the VM's run/export.sock)",
    )
    register_autostart(add)


AUTOSTART_EXAMPLES = [
    "qwamos vm autostart                  start every VM whose config says autostart: true",
    "qwamos vm autostart --stop           stop them again (ACPI powerdown first), as the unit's ExecStop does",
    "systemctl enable --now qwamos-autostart.service     (contrib/systemd/, see docs/vm-manager.md)",
]
AUTOSTART_EPILOG = """Each VM is reported on stderr as it goes; one that fails does not keep the others from
starting.  Exit status: 0 when every autostart VM runs (or, with --stop, is stopped), else the first
failure's exit code."""


def register_autostart(add: Callable[..., argparse.ArgumentParser]) -> None:
    sp = add(
        "autostart",
        "start every VM whose config says autostart: true",
        cmd_autostart,
        vm=False,
        examples=AUTOSTART_EXAMPLES,
        epilog=AUTOSTART_EPILOG,
    )
    from qwamos.cli.keystore_args import add_keystore_args

    add_keystore_args(sp, keystore=False)  # encrypted VMs: the passphrase, as for vm start
    sp.add_argument("--stop", action="store_true", help="stop the running autostart VMs instead")
    sp.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --stop: seconds each guest gets to power down (default: vm stop's)",
    )
    sp.add_argument("--json", action="store_true", help="print the outcomes as JSON on stdout (default: text)")


def cmd_autostart(args: argparse.Namespace) -> int:
    from qwamos.cli.output import emit_json, message, warn
    from qwamos.cli.vm_cmd import _manager
    from qwamos.hypervisor import autostart
    from qwamos.hypervisor.manager import DEFAULT_STOP_TIMEOUT

    def report(o: autostart.Outcome) -> None:
        text = {
            autostart.STARTED: f"started ({o.detail.upper()})",
            autostart.STOPPED: f"stopped ({o.detail})",
            autostart.ALREADY_RUNNING: f"already {o.detail}",
            autostart.NOT_RUNNING: "not running",
        }.get(o.result, f"failed: {o.detail}")
        message(f"{o.name}: {text}")

    mgr: Any = _manager(args)
    if args.stop:
        timeout = args.timeout if args.timeout is not None else DEFAULT_STOP_TIMEOUT
        outcomes = autostart.stop_all(mgr, timeout=timeout, on_outcome=report)
    else:
        outcomes = autostart.start_all(mgr, on_outcome=report, on_warning=warn)
    if args.json:
        emit_json([o.to_dict() for o in outcomes])
    elif not outcomes:
        message(f"no VM under {mgr.root} has autostart: true")
    failed = [o for o in outcomes if o.result == autostart.FAILED]
    return failed[0].exit_code if failed else 0


def cmd_domxml(args: argparse.Namespace) -> int:
    from qwamos.cli.vm_cmd import _manager
    from qwamos.hypervisor.libvirt import vm_domain_xml

    mgr: Any = _manager(args)
    sys.stdout.write(vm_domain_xml(mgr, args.vm, socket=args.socket))
    return 0
