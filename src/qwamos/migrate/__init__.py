"""Moving a VM's disk onto encrypted storage and back, without a plaintext copy and without a half-switch.

``make_plan(vm)`` checks and describes (``--dry-run``); ``migrate(vm)`` does it, verified, with rollback.
See docs/migration.md.
"""

from qwamos.migrate.plan import TO_QCOW2, TO_QVOL, MigrationPlan, check_size, make_plan
from qwamos.migrate.run import Hooks, MigrationResult, migrate

__all__ = [
    "TO_QCOW2",
    "TO_QVOL",
    "Hooks",
    "MigrationPlan",
    "MigrationResult",
    "check_size",
    "make_plan",
    "migrate",
]
