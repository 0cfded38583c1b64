"""Where each library module is tested: the map a newcomer reads first, kept true by the tests below.

Every module under ``src/qwamos`` must appear here with the test files that exercise it (a new module
without an entry fails ``test_every_module_is_mapped``), and every file named must exist.  The first file of
each entry is the module's own test module where it has one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src" / "qwamos"

KEYSTORE = ["test_keystore_api.py", "test_keystore_security.py"]
MIGRATE = ["test_migrate_run.py", "test_migrate_stream.py", "test_migrate_guest.py"]

MAP: dict[str, list[str]] = {
    "backup.engine": ["test_backup.py", "test_backup_tamper.py"],
    "backup.online": ["test_backup_vm.py"],
    "backup.format": ["test_backup_tamper.py", "test_backup.py"],
    "backup.repo": ["test_backup.py", "test_backup_tamper.py", "test_backup_compact.py"],
    "cli.backup_cmd": ["test_backup.py", "test_backup_compact.py"],
    "nbd.backup_control": ["test_backup_vm.py"],
    "blockdev": ["test_nbd_server.py", "test_volume_roundtrip.py"],
    "cli.completion_cmd": ["test_shell_files.py"],
    "cli.export_cmd": ["test_nbd_control_live.py"],
    "cli.grant_cmd": ["test_key_grants.py"],
    "cli.key_cmd": ["test_key_cli.py", "test_key_rotate.py", "test_key_rotation_states.py"],
    "cli.keystore_args": ["test_key_cli.py"],
    "cli.main": ["test_volume_cli.py", "test_key_cli.py", "test_errors.py"],
    "cli.migrate_cmd": ["test_migrate_run.py"],
    "cli.output": ["test_cli_conventions.py", "test_volume_cli.py"],
    "cli.parser": ["test_cli_help.py", "test_cli_conventions.py"],
    "cli.reencrypt_cmd": ["test_volume_rotation_cli.py"],
    "cli.serve_cmd": ["test_nbd_qemu.py", "test_nbd_socket_ownership.py"],
    "cli.tls_cmd": ["test_nbd_tls.py"],
    "cli.vm_cmd": ["test_vm_manager.py", "test_vocab.py", "test_vm_lifecycle.py"],
    "cli.vm_ops_cmd": ["test_libvirt_domxml.py", "test_autostart_units.py"],
    "cli.snapshot_cmd": ["test_volume_snapshots.py", "test_vm_snapshots.py"],
    "cli.volume_cmd": ["test_volume_cli.py", "test_volume_repair.py"],
    "crypto": ["test_crypto.py", "test_crypto_draws.py", "test_crypto_runs.py", "test_nbd_tls.py"],
    "errors": ["test_errors.py"],
    "fsutil": ["test_fsutil.py", "test_cli_conventions.py"],
    "pidfile": ["test_pidfile.py"],
    "nodump": ["test_keypipe.py", "test_secrets_env.py"],
    "logs": ["test_cli_conventions.py", "test_nbd_qemu.py"],
    "strictjson": ["test_strictjson.py", "test_keystore_security.py"],
    "hypervisor.autostart": ["test_autostart_units.py"],
    "hypervisor.binding": ["test_volume_binding.py"],
    "hypervisor.snapshots": ["test_vm_snapshots.py"],
    "hypervisor.config": ["test_config.py"],
    "hypervisor.console": ["test_console.py"],
    "hypervisor.guest_state": ["test_vm_disk_full.py"],
    "hypervisor.imagespec": ["test_format_probe.py", "test_qemu_cmdline.py"],
    "hypervisor.info": ["test_info_render.py"],
    "hypervisor.keyrotation": ["test_key_rotate.py", "test_key_rotate_online.py", "test_key_rotation_states.py"],
    "hypervisor.kvm": ["test_qemu_cmdline.py"],
    "hypervisor.libvirt": ["test_libvirt_domxml.py"],
    "hypervisor.lifecycle": ["test_vm_lifecycle.py"],
    "hypervisor.layout": ["test_config.py"],
    "hypervisor.manager": [
        "test_vm_manager.py",
        "test_vm_start_steps.py",
        "test_vm_e2e.py",
        "test_vm_disk_full.py",
        "test_vm_rbd.py",
    ],
    "hypervisor.process": ["test_vm_manager.py", "test_qemu_cmdline.py"],
    "hypervisor.qemu": ["test_qemu_cmdline.py"],
    "hypervisor.schema": ["test_config.py", "test_config_inputs.py"],
    "hypervisor.sizes": ["test_sizes.py"],
    "hypervisor.supervisor": ["test_vm_manager.py", "test_vm_e2e.py"],
    "hypervisor.template": ["test_config.py"],
    "hypervisor.tools": ["test_tools.py"],
    "hypervisor.vocab": ["test_vocab.py"],
    "hypervisor.yamldoc": ["test_config.py", "test_config_inputs.py"],
    "keystore.files": [*KEYSTORE, "test_crypto.py"],
    "keystore.identity": [*KEYSTORE, "test_crypto.py"],
    "keystore.keyfile": [*KEYSTORE, "test_crypto.py"],
    "keystore.keystore": [*KEYSTORE, "test_keystore_attacks.py"],
    "keystore.metadata": KEYSTORE,
    "keystore.grants": ["test_key_grants.py", "test_vm_rbd.py"],
    "keystore.passphrase": ["test_keystore_api.py", "test_key_cli.py", "test_keypipe.py", "test_secrets_env.py"],
    "keystore.pin": ["test_keystore_attacks.py", "test_crypto.py", *KEYSTORE],
    "keystore.users": ["test_keystore_attacks.py", "test_key_cli.py"],
    "keystore.policy": ["test_key_rotate.py"],
    "keystore.recovery": KEYSTORE,
    "keystore.rewrap": ["test_key_identity_switch.py"],
    "keystore.switch": ["test_key_identity_switch.py", "test_key_rotation_states.py"],
    "keystore.tombstone": ["test_key_rotation_states.py"],
    "keystore.sealing": [*KEYSTORE, "test_crypto.py"],
    "migrate.copy": ["test_migrate_stream.py"],
    "migrate.journal": ["test_migrate_run.py", "test_cli_conventions.py"],
    "migrate.plan": ["test_migrate_run.py"],
    "migrate.qemuimg": ["test_migrate_stream.py", "test_tools.py"],
    "migrate.run": MIGRATE,
    "migrate.stream": ["test_migrate_stream.py", "test_tools.py"],
    "migrate.vmview": ["test_migrate_run.py"],
    "nbd.rotation": ["test_volume_rotation_online.py"],
    "nbd.client": ["test_nbd_client.py"],
    "nbd.constants": ["test_nbd_protocol.py"],
    "nbd.control_client": ["test_nbd_control.py", "test_nbd_control_live.py"],
    "nbd.control_protocol": ["test_nbd_control_protocol.py"],
    "nbd.control_server": ["test_nbd_control.py", "test_nbd_control_live.py"],
    "nbd.daemon": ["test_nbd_qemu.py", "test_nbd_socket_ownership.py", "test_storage_rbd_cli.py"],
    "nbd.keypipe": ["test_keypipe.py", "test_secrets_env.py"],
    "nbd.export": ["test_nbd_export.py", "test_nbd_qemu.py", "test_nbd_socket_ownership.py"],
    "nbd.protocol": [
        "test_nbd_protocol.py",
        "test_nbd_pipelining.py",
        "test_nbd_tls_protocol.py",
        "test_nbd_block_status.py",
    ],
    "nbd.resize": ["test_vm_lifecycle.py"],
    "nbd.quiesce": ["test_nbd_control.py", "test_nbd_control_live.py"],
    "nbd.snapshot_ctl": ["test_vm_snapshots.py", "test_volume_snapshots.py"],
    "nbd.tls": ["test_nbd_tls.py", "test_nbd_tls_server.py", "test_nbd_tls_netns.py"],
    "nbd.server": [
        "test_nbd_server.py",
        "test_nbd_pipelining.py",
        "test_nbd_block_sizes.py",
        "test_nbd_tls.py",
        "test_nbd_block_status.py",
    ],
    "storage.base": ["test_storage.py"],
    "storage.bitmap": ["test_storage.py"],
    "storage.file": ["test_storage.py"],
    "storage.librbd": ["test_storage_rbd.py", "test_storage_rbd_prefetch.py"],
    "storage.rbd": [
        "test_storage_rbd.py",
        "test_storage_rbd_prefetch.py",
        "test_vm_rbd.py",
        "test_storage_rbd_cli.py",
    ],
    "storage.sparse": ["test_storage.py"],
    "volume.cbt": ["test_volume_cbt.py"],
    "volume.create": ["test_volume_roundtrip.py", "test_volume_errors.py"],
    "volume.guard": ["test_volume_errors.py", "test_volume_full.py"],
    "volume.header": ["test_volume_vectors.py", "test_volume_header_copies.py"],
    "volume.header_store": ["test_volume_header_copies.py"],
    "volume.allocation": ["test_nbd_block_status.py"],
    "volume.inspection": ["test_volume_cli.py", "test_volume_errors.py"],
    "volume.keys": ["test_volume_vectors.py"],
    "volume.metadata": ["test_volume_metadata.py"],
    "volume.snapshots": ["test_volume_snapshots.py", "test_volume_snapshot_attacks.py", "test_vm_snapshots.py"],
    "volume.repair": ["test_volume_repair.py"],
    "volume.rotation": ["test_volume_rotation.py"],
    "volume.chain_rotation": ["test_volume_chain_rotation.py"],
    "volume.blockcopy": ["test_volume_blockcopy.py"],
    "volume.transfer": ["test_storage_rbd.py"],
    "volume.resize": ["test_volume_resize.py", "test_vm_lifecycle.py"],
    "volume.slotio": ["test_volume_roundtrip.py", "test_volume_failing_slots.py", "test_volume_full.py"],
    "volume.slots": ["test_volume_vectors.py", "test_volume_nonce.py"],
    "volume.unlock": ["test_keypipe.py", "test_secrets_env.py"],
    "volume.volume": ["test_volume_roundtrip.py", "test_volume_model.py", "test_volume_tamper.py"],
}


def _modules() -> set[str]:
    return {
        ".".join(p.relative_to(SRC).with_suffix("").parts)
        for p in SRC.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }


def test_every_module_is_mapped():
    missing = sorted(_modules() - set(MAP))
    assert not missing, f"add these modules and their tests to MAP: {missing}"


def test_no_entry_for_a_module_that_is_gone():
    assert sorted(set(MAP) - _modules()) == []


@pytest.mark.parametrize("module", sorted(MAP))
def test_the_named_test_files_exist(module):
    for name in MAP[module]:
        assert (TESTS / name).is_file(), f"{module}: {name} does not exist"
