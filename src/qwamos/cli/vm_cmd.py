"""``qwamos vm [--root DIR] list|info|start|stop|status|console|create`` — thin over VMManager.

Data goes to stdout (``--json`` where it is data), messages and warnings to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qwamos.cli import vm_ops_cmd
from qwamos.cli.keystore_args import add_keystore_args, open_keystore
from qwamos.cli.output import (
    add_json_option,
    add_yes_option,
    confirm,
    emit_json,
    fancy,
    message,
    print_data,
    strip_symbols,
    warn,
)
from qwamos.errors import InvalidArgument, NotATerminalError, VMStateError
from qwamos.hypervisor import console, lifecycle
from qwamos.hypervisor.manager import DEFAULT_STOP_TIMEOUT, VMManager
from qwamos.hypervisor.process import live_process
from qwamos.hypervisor.sizes import format_size
from qwamos.hypervisor.vocab import ACCELS, ARCHES, DEFAULT_MACHINE_FOR_ARCH, MACHINES, NETWORK_MODES


def _common(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    p.add_argument(
        "--root", type=Path, default=default, metavar="DIR", help="VM root (default: $QWAMOS_ROOT or ~/QWAMOS)"
    )
    p.add_argument(
        "--keystore",
        type=Path,
        default=default,
        metavar="DIR",
        help="keystore (default: $QWAMOS_KEYSTORE or ~/.qwamos/keystore)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "vm",
        help="create, start, stop, inspect, clone, resize and delete VMs (and autostart, libvirt XML)",
        examples=["qwamos vm list", "qwamos vm --root /srv/qwamos start web"],
    )
    _common(p, suppress=False)
    vsub = p.add_subparsers(dest="vm_command", metavar="ACTION", required=True)

    def add(
        name: str, help_text: str, func: Any, *, vm: bool = True, examples: list[str] | None = None, **kw: Any
    ) -> argparse.ArgumentParser:
        """An action under ``qwamos vm`` with --root/--keystore and (``vm=True``) the VM name; ``examples``
        default to ``qwamos vm NAME web``."""
        sp = vsub.add_parser(
            name, help=help_text, examples=examples or [f"qwamos vm {name}" + (" web" if vm else "")], **kw
        )
        _common(sp, suppress=True)
        if vm:
            sp.add_argument("vm", help="VM name (a directory under ROOT/vms/)")
        sp.set_defaults(func=func)
        return sp

    sp = add("list", "table of VMs and their state", cmd_list, vm=False, examples=["qwamos vm list --json"])
    add_json_option(sp, "the VMs")
    sp = add(
        "info",
        "the VM's configuration, accelerator and encryption",
        cmd_info,
        examples=["qwamos vm info web", "qwamos vm info web --json"],
    )
    add_json_option(sp, "the VM's details")
    sp = add(
        "start",
        "start the VM (in the background)",
        cmd_start,
        examples=[
            "qwamos vm start web --foreground",
            "qwamos vm start web --passphrase-file /etc/qwamos/passphrase --json",
            "qwamos vm start web --break-lock   # rbd: disk whose lock a crashed host still holds",
        ],
    )
    add_keystore_args(sp, keystore=False)  # the volume key is unwrapped here, never in the VM's processes
    sp.add_argument(
        "--foreground",
        action="store_true",
        help="attach the serial console until the VM exits (off a terminal: its output on stdout, for scripts)",
    )
    add_json_option(sp, "what was started (pids, serial log, created disk)")
    sp.add_argument(
        "--break-lock",
        action="store_true",
        help="an rbd: disk whose writer lock a dead host still holds: break it first (as `rbd lock rm`; the "
        "holder is blocklisted). Only when that host is gone for good",
    )
    sp = add(
        "stop",
        "stop the VM: ACPI powerdown, hard stop after --timeout",
        cmd_stop,
        examples=["qwamos vm stop web", "qwamos vm stop web --timeout 10", "qwamos vm stop web --force"],
    )
    sp.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_STOP_TIMEOUT,
        metavar="SECONDS",
        help="seconds to wait for the guest",
    )
    sp.add_argument("--force", action="store_true", help="skip the ACPI powerdown; stop QEMU now")
    sp = add(
        "status",
        "running, paused (e.g. disk full), stopped, starting or crashed",
        cmd_status,
        examples=["qwamos vm status web", "qwamos vm status web --json"],
    )
    add_json_option(sp, "the state, its reason and the export's counters")
    add("resume", "continue a VM that QEMU paused on a full disk (after freeing space)", cmd_resume)
    add(
        "console",
        "attach to the serial console (detach with Ctrl-]; needs a terminal)",
        cmd_console,
        examples=["qwamos vm console web", "tail -f ~/QWAMOS/vms/web/run/serial.log   # without a terminal"],
    )

    sp = add(
        "create",
        "write a new VM config",
        cmd_create,
        examples=[
            "qwamos vm create web --arch aarch64 --disk-size 10G --encrypted --kernel vmlinuz --initrd initrd.img",
            "qwamos vm create web --machine q35 --memory 1024 --kernel /boot/vmlinuz --json",
            "qwamos vm create db --encrypted --disk-path rbd:vms/db.qvol --kernel vmlinuz   # disk on Ceph RBD",
        ],
    )
    sp.add_argument(
        "--machine", default=None, choices=list(MACHINES), help="machine type (must fit --arch; default: --arch's)"
    )
    sp.add_argument(
        "--arch",
        default=None,
        choices=ARCHES,
        help="guest architecture (default: "
        + ", ".join(f"{m} for {a}" for a, m in DEFAULT_MACHINE_FOR_ARCH.items())
        + ", unless --machine says)",
    )
    sp.add_argument(
        "--cpu",
        default=None,
        dest="cpu_model",
        help="CPU model (e.g. cortex-a76; default: the machine's usual CPU)",
    )
    sp.add_argument("--cpus", type=int, default=1, dest="cpu_cores", metavar="N", help="virtual CPUs")
    sp.add_argument(
        "--memory", default="512", dest="memory_mb", help="MB (2048), or a size in whole MB (2G); default 512"
    )
    sp.add_argument("--disk-size", default="10G", metavar="SIZE", help="disk size, with K/M/G/T suffix")
    sp.add_argument(
        "--disk-path",
        default=None,
        metavar="PATH",
        help="the disk image, or rbd:POOL/IMAGE for an encrypted disk on Ceph (docs/vm-config.md) (default: a "
        "disk file in the VM's directory)",
    )
    sp.add_argument(
        "--kernel",
        required=True,
        metavar="PATH",
        help="guest kernel (required: the VM boots it directly; relative to the current directory)",
    )
    sp.add_argument(
        "--initrd",
        default=None,
        metavar="PATH",
        help="initrd (relative to the current directory; default: none)",
    )
    sp.add_argument("--cmdline", default=None, help="kernel command line (default: none)")
    sp.add_argument(
        "--accel", default=None, choices=ACCELS, help="default: kvm where it runs this guest here, else tcg"
    )
    sp.add_argument("--network", default="nat", dest="network_mode", choices=NETWORK_MODES, help="network mode")
    sp.add_argument("--mac", default=None, help="MAC address of the NIC (default: none, QEMU picks one)")
    sp.add_argument("--encrypted", action="store_true", help="storage.encryption.enabled: true (default: off)")
    add_json_option(sp, "the new VM's name and config path")

    sp = add(
        "delete",
        "delete a stopped VM: its disk, its config, and its key when nothing else uses it",
        cmd_delete,
        examples=[
            "qwamos vm delete web",
            "qwamos vm delete web --keep-disk --yes",
            "qwamos vm delete web --yes --json",
        ],
    )
    sp.add_argument(
        "--keep-disk", action="store_true", help="keep the disk files and their keys; remove the config"
    )
    add_yes_option(sp)
    add_json_option(sp, "what was deleted and kept")

    sp = add(
        "resize",
        "grow or shrink the VM's disk (a shrink asks, and only over unused blocks)",
        cmd_resize,
        examples=[
            "qwamos vm resize web 20G",
            "qwamos vm resize web +5G",
            "qwamos vm resize web 8G --yes   # shrink: refused if blocks past 8G hold data",
        ],
    )
    sp.add_argument("size", help="new disk size (20G), or +SIZE to grow by that much")
    add_keystore_args(sp, keystore=False)
    add_yes_option(sp)
    add_json_option(sp, "the old and new size")

    sp = add(
        "clone",
        "a new VM from a stopped one: same config, new MAC, its disk copied under a new key",
        cmd_clone,
        examples=[
            "qwamos vm clone web web2",
            "qwamos vm clone web web2 --disk rbd:vms/web2.qvol --json",
        ],
    )
    sp.add_argument("new_name", metavar="NEW", help="the new VM's name")
    sp.add_argument(
        "--disk",
        metavar="LOCATION",
        help="where the encrypted disk's copy goes, a new file or rbd:POOL/IMAGE (default: disk.qvol in the "
        "new VM's directory; for an rbd: disk, the image NEW.qvol in the same pool)",
    )
    add_keystore_args(sp, keystore=False)
    add_json_option(sp, "the new VM's config, disk and key")

    vm_ops_cmd.register(add)
    from qwamos.cli.snapshot_cmd import register_vm

    register_vm(add)


# What the spec's info block shows with a symbol: printed as the spec shows it, terminal or not.
SPEC_INFO_PHRASES = ("Acceleration: ✅ KVM", "Encryption:   🔒 ENABLED (PQC)")


def _manager(args: argparse.Namespace) -> VMManager:
    """The manager; its keystore (opened only by a start that needs a volume key) asks for the passphrase
    through the shared options: --passphrase-fd/--passphrase-file, systemd credentials, the environment
    or a prompt."""
    keystore = getattr(args, "keystore", None)

    def factory() -> Any:
        return open_keystore(args)

    return VMManager(getattr(args, "root", None), keystore=keystore, keystore_factory=factory)


def cmd_list(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    rows = mgr.list_vms()
    if args.json:
        emit_json(rows)
        return 0
    if not rows:
        message(f"no VMs under {mgr.root} (each is a directory ROOT/vms/NAME with a config.yaml)")
        return 0
    header = ("NAME", "STATE", "MACHINE", "CPUS", "MEMORY", "DISK", "ENCRYPTED")
    table = [header]
    for r in rows:
        if r.get("error"):
            table.append((r["name"], r["state"], "(config error)", "-", "-", "-", "-"))
            continue
        table.append(
            (
                r["name"],
                r["state"],
                f"{r['machine']} ({r['arch']})",
                str(r["cpus"]),
                f"{r['memory_mb']} MB",
                str(r["disk"]),
                "yes" if r["encrypted"] else "no",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print_data("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for r in rows:
        if r.get("error"):
            warn(f"{r['name']}: {r['error']}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from qwamos.cli.snapshot_cmd import snapshot_lines
    from qwamos.hypervisor import snapshots

    mgr = _manager(args)
    snaps = snapshots.describe(mgr, args.vm)
    if args.json:
        emit_json({**mgr.info(args.vm), "snapshots": snaps})
    else:
        text = mgr.info_text(args.vm)
        # The spec's block keeps the symbols the spec shows (its contract); the others only on a terminal.
        print_data(text if fancy(sys.stdout) else strip_symbols(text, keep=SPEC_INFO_PHRASES))
        if snaps is not None and "error" in snaps:
            print_data(f"Snapshots:    (cannot list: {snaps['error']})")
        elif snaps is not None and snaps["snapshots"]:
            print_data("Snapshots:\n  " + "\n  ".join(snapshot_lines(snaps["snapshots"])))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    st = mgr.status(args.vm)
    export = mgr.export_status(args.vm) if st.state in ("running", "paused", "crashed") else None
    if args.json:
        emit_json({**st.to_dict(), "export": export})
    else:
        pids = ", ".join(f"{k} {v}" for k, v in sorted(st.pids.items()))
        extra = "; ".join(x for x in (st.reason, f"pids: {pids}" if pids else "") if x)
        print_data(f"{st.name}: {st.state}" + (f" ({extra})" if extra else ""))
        if export is not None:
            print_data(_export_line(export))
    return 0


def _export_line(export: dict[str, Any]) -> str:
    """One line about the VM's block export, from its control channel."""
    if "error" in export:
        return f"  export: not answering ({export['error']})"
    parts = [
        f"{export['connections']} connection(s)",
        f"{export['requests_served']} requests",
        "quiesced" if export["quiesced"] else "serving",
    ]
    for op in export.get("operations", []):
        eta = f" ETA {op['eta_s']:.0f} s" if op.get("eta_s") is not None and op["state"] == "running" else ""
        parts.append(f"{op['kind']} {op['state']} {op['percent']}%{eta}")
    rot = (export.get("volume") or {}).get("rotation")
    if rot is not None and not any(
        o["kind"] == "rotation" and o["state"] == "running" for o in export.get("operations", [])
    ):
        parts.append(f"key rotation to {rot['new_key_id']} interrupted at {rot['progress']}/{rot['total']} blocks")
    return "  export: " + ", ".join(parts)


def cmd_start(args: argparse.Namespace) -> int:
    if args.foreground and args.json:
        raise InvalidArgument("--json and --foreground exclude each other (the console is on stdout)")
    mgr = _manager(args)
    result = mgr.start(args.vm, on_warning=warn, break_lock=args.break_lock)
    serial_log = mgr.run_dir(args.vm).serial_log
    if result.created_disk:
        message(f"created disk {result.created_disk}" + (f" (key {result.key_id})" if result.key_id else ""))
    message(f"started {args.vm} ({result.accel.accel.upper()}); serial log: {serial_log}")
    if args.json:
        st = mgr.status(args.vm)
        emit_json(
            {
                "name": args.vm,
                "state": st.state,
                "accel": result.accel.accel,
                "pids": st.pids,
                "serial_log": str(serial_log),
                "created_disk": result.created_disk,
                "key_id": result.key_id,
                "warnings": result.warnings,
            }
        )
    if not args.foreground:
        return 0
    if _attach(mgr, args.vm, detach_ok=True) == "detached":
        message(f"detached; {args.vm} keeps running")
        return 0
    # The console closed because QEMU exited: let the supervisor finish (export flush) before reporting.
    sup = live_process(mgr.run_dir(args.vm).supervisor_pid)
    if sup is not None:
        sup.wait(60.0)
    st = mgr.status(args.vm)
    message(f"{args.vm}: {st.state}" + (f" ({st.reason})" if st.reason else ""))
    return 0 if st.state == "stopped" else 1


def cmd_stop(args: argparse.Namespace) -> int:
    how = _manager(args).stop(args.vm, timeout=args.timeout, force=args.force)
    message(f"{args.vm}: stopped ({how})")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    before = _manager(args).resume(args.vm)
    message(
        f"{args.vm}: resumed"
        + (" (QEMU retries the write; it pauses again if the disk is still full)" if before.disk_full else "")
    )
    return 0


def _need_terminal(what: str, name: str, mgr: VMManager) -> None:
    """Refuse to attach the console without a terminal, saying why and what to use instead."""
    if sys.stdin.isatty():
        return
    log = mgr.run_dir(name).serial_log
    raise NotATerminalError(
        what=what,
        msg=f"the console relays keystrokes and detaches on Ctrl-], which needs one.  Read the guest's output "
        f"with `tail -f {log}`, or run this from a terminal (ssh -t)",
    )


def cmd_console(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    st = mgr.status(args.vm)
    if st.state not in ("running", "paused"):
        raise VMStateError(name=args.vm, state=st.state, msg="the console is only available while it runs")
    _need_terminal("vm console", args.vm, mgr)
    _attach(mgr, args.vm, detach_ok=True)
    return 0


def _attach(mgr: VMManager, name: str, *, detach_ok: bool) -> str:
    """Relay the terminal to the serial console until the VM exits ("closed") or Ctrl-] ("detached")."""
    return console.relay(
        mgr.run_dir(name).console_sock,
        stdin_fd=sys.stdin.fileno(),
        out=sys.stdout.buffer,
        detach_ok=detach_ok,
        notice=message,
    )


def cmd_clone(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    result = lifecycle.clone(mgr, args.vm, args.new_name, disk_location=args.disk)
    if args.json:
        emit_json(result.to_dict())
    key = f" under the new key {result.key_id}" if result.key_id else ""
    message(f"cloned {args.vm} to {args.new_name}: {result.config}; disk {result.disk}{key}")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    plan = lifecycle.plan_resize(mgr, args.vm, args.size)
    if plan.shrink and not confirm(
        f"Shrink the disk of {args.vm} from {format_size(plan.old_size)} to {format_size(plan.new_size)}?",
        yes=args.yes,
        action=f"shrink the disk of {args.vm}",
    ):
        message("not confirmed; nothing was changed")
        return 1
    lifecycle.resize(mgr, plan)
    if args.json:
        emit_json(plan.to_dict())
    message(f"{args.vm}: disk {plan.disk} {format_size(plan.old_size)} -> {format_size(plan.new_size)}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    plan = lifecycle.plan_delete(mgr, args.vm, keep_disk=args.keep_disk)
    if not confirm(f"Delete VM {args.vm}?", yes=args.yes, action=f"delete VM {args.vm}", details=plan.describe()):
        message("not confirmed; nothing was changed")
        return 1
    result = lifecycle.delete(mgr, plan)
    if args.json:
        emit_json(result.to_dict())
    message(f"deleted VM {args.vm}" + (" (disk kept)" if args.keep_disk else ""))
    for key_id in result.deleted_keys:
        message(f"deleted key {key_id} (no other volume used it)")
    for key_id, users in result.kept_keys.items():
        message(f"kept key {key_id}: still used by {', '.join(users)}")
    for key_id in result.unused_keys:
        message(f"key {key_id} is used by no volume any more; remove it: qwamos key delete {key_id}")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    memory = args.memory_mb.strip()
    path = mgr.create(
        args.vm,
        machine_type=args.machine,
        arch=args.arch,
        cpu_model=args.cpu_model,
        cpu_cores=args.cpu_cores,
        memory_mb=int(memory) if memory.isdigit() else memory,
        disk_size=args.disk_size,
        disk_path=args.disk_path,
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline,
        accel=args.accel,
        network_mode=args.network_mode,
        mac=args.mac,
        encrypted=args.encrypted,
    )
    if args.json:
        emit_json({"name": args.vm, "config": str(path)})
    message(f"created {path}")
    if args.accel is None:
        cfg = mgr.load(args.vm)
        if cfg.accel == "tcg":
            why = mgr.default_accel(cfg.arch).reason
            message(f"accel: tcg (KVM cannot run this {cfg.arch} guest here: {why})")
    return 0
