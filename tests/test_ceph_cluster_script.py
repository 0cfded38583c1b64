"""``scripts/ceph-cluster.sh`` documents in its header every environment variable it reads (an outside check
of issue 14 needed ``CEPH_CLUSTER_OSD_BYTES`` to fill a cluster and found it only in the code)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from ceph_helpers import running_cluster

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ceph-cluster.sh"


def test_every_variable_the_script_reads_is_in_its_header():
    text = SCRIPT.read_text()
    header = text.split("set -euo pipefail", 1)[0]
    body = text[len(header) :]
    read = set(re.findall(r"\$\{?(CEPH_CLUSTER_[A-Z_]+)", body))
    assert read, "the script reads no CEPH_CLUSTER_* variable any more: update this test"
    undocumented = sorted(v for v in read if f"{v}=" not in header)
    assert not undocumented, f"not described in the header of {SCRIPT.name}: {undocumented}"


def test_an_unknown_object_store_is_refused_before_anything_is_made(tmp_path):
    target = tmp_path / "cluster"
    try:
        proc = subprocess.run(
            ["bash", str(SCRIPT), "start", str(target)],
            env={**os.environ, "CEPH_CLUSTER_STORE": "tape"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:  # a script that went on anyway must not leave its daemons to the rest of the run
        subprocess.run(["bash", str(SCRIPT), "stop", str(target)], timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "memstore, memstore-pages or bluestore, not 'tape'" in proc.stderr
    assert not target.exists()


def _json(*argv: str) -> object:
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout)


@pytest.mark.parametrize(
    ("store", "objectstore", "page_set"),
    [("memstore-pages", "memstore", "true"), ("bluestore", "bluestore", None)],
)
def test_the_osd_runs_on_the_object_store_asked_for_and_keeps_an_image(store, objectstore, page_set):
    """``CEPH_CLUSTER_STORE`` (bench/rbd.py's ``--store``) reaches the OSD, and the cluster keeps data."""
    with running_cluster(store=store) as cluster:
        meta = _json("ceph", "--conf", str(cluster.conf), "osd", "metadata", "0", "--format", "json")
        assert meta["osd_objectstore"] == objectstore
        if page_set is not None:
            asok = str(cluster.dir / "run" / "osd.0.asok")
            assert _json("ceph", "--admin-daemon", asok, "config", "get", "memstore_page_set") == {
                "memstore_page_set": page_set
            }
        data = os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(12345)
        src, out = cluster.dir / "in.raw", cluster.dir / "out.raw"
        src.write_bytes(data)
        cluster.rbd("import", "--no-progress", str(src), "rbd/keep")
        cluster.rbd("export", "--no-progress", "rbd/keep", str(out))
        assert out.read_bytes() == data
