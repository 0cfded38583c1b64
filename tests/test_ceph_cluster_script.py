"""``scripts/ceph-cluster.sh`` documents in its header every environment variable it reads (an outside check
of issue 14 needed ``CEPH_CLUSTER_OSD_BYTES`` to fill a cluster and found it only in the code)."""

from __future__ import annotations

import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ceph-cluster.sh"


def test_every_variable_the_script_reads_is_in_its_header():
    text = SCRIPT.read_text()
    header = text.split("set -euo pipefail", 1)[0]
    body = text[len(header) :]
    read = set(re.findall(r"\$\{?(CEPH_CLUSTER_[A-Z_]+)", body))
    assert read, "the script reads no CEPH_CLUSTER_* variable any more: update this test"
    undocumented = sorted(v for v in read if f"{v}=" not in header)
    assert not undocumented, f"not described in the header of {SCRIPT.name}: {undocumented}"
