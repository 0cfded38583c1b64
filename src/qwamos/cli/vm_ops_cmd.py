"""``qwamos vm domxml`` (and the other operator verbs that plug QWAMOS VMs into the tools around them):
registered under ``qwamos vm`` by :mod:`qwamos.cli.vm_cmd`, kept in their own module so that the lifecycle
commands there stay as they are.

Data on stdout (the domain XML), messages on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOMXML_EPILOG = """examples:
  qwamos vm domxml web > web.xml && virsh -c qemu:///session define web.xml
  qwamos vm domxml web --socket /run/qwamos/web.sock

The disk is read through the block export: start it first (qwamos volume serve DISK.qvol --socket SOCK),
then virsh start.  See docs/vm-manager.md, "Running a VM under libvirt"."""


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add this module's actions with ``vm_cmd``'s ``add(name, help, func)`` (which adds --root/--keystore
    and the VM name)."""
    sp = add("domxml", "print a libvirt domain XML for the VM (for virsh define)", cmd_domxml)
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.epilog = DOMXML_EPILOG
    sp.add_argument(
        "--socket",
        type=Path,
        default=None,
        metavar="PATH",
        help="the block export's UNIX socket the disk is attached from (default: the VM's run/export.sock)",
    )


def cmd_domxml(args: argparse.Namespace) -> int:
    from qwamos.cli.vm_cmd import _manager
    from qwamos.hypervisor.libvirt import vm_domain_xml

    mgr: Any = _manager(args)
    sys.stdout.write(vm_domain_xml(mgr, args.vm, socket=args.socket))
    return 0
