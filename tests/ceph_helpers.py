"""The test Ceph cluster: ``scripts/ceph-cluster.sh`` started once per run, only when a test asks for it.

The ``ceph_cluster`` fixture (session scope, in conftest) starts a one-node cluster (mon, mgr, memstore OSD on
127.0.0.1) in a fresh directory under /tmp, points ``CEPH_CONF`` at it for the whole process and its children
(the export, qemu-img, the ``rbd`` tool), and stops it at the end of the run, failed tests or not.  Where Ceph
is not installed, or the cluster does not come up, the RBD tests skip and say why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ceph-cluster.sh"
TOOLS = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rbd")


class Cluster:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.conf = directory / "ceph.conf"

    def rbd(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run the ``rbd`` tool against this cluster."""
        return subprocess.run(
            ["rbd", "--conf", str(self.conf), *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
            **kw,
        )

    def mon_address(self) -> tuple[str, int]:
        """(address, port) of the monitor, as the conf names it (``mon host = [v2:ADDR:PORT]``)."""
        import re

        m = re.search(r"^mon host = \[v2:([0-9.]+):([0-9]+)\]$", self.conf.read_text(), re.MULTILINE)
        assert m, f"no mon host in {self.conf}"
        return m.group(1), int(m.group(2))

    def used_bytes(self, image: str) -> int:
        """``rbd du``'s USED for ``rbd/IMAGE``."""
        import json

        out = json.loads(self.rbd("du", "--format", "json", f"rbd/{image}").stdout)
        return sum(i["used_size"] for i in out["images"] if i["name"] == image)


@contextlib.contextmanager
def running_cluster(addr: str | None = None, store: str | None = None) -> Iterator[Cluster]:
    """A cluster of its own, started in a fresh directory and stopped on leaving, failed test or not; bound to
    ``addr`` (``CEPH_CLUSTER_ADDR``, which must already be assigned to an interface) instead of 127.0.0.1; its
    OSD on ``store`` (``CEPH_CLUSTER_STORE``) instead of memstore.  ``CEPH_CONF`` is left alone: callers point
    clients at ``cluster.conf`` themselves.  Skips the test where Ceph is not installed or the cluster does
    not come up."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"Ceph is not installed ({', '.join(missing)} missing; `make deps` installs it)")
    directory = Path(tempfile.mkdtemp(prefix="qwceph", dir="/tmp"))
    env = {**os.environ}
    if addr:
        env["CEPH_CLUSTER_ADDR"] = addr
    if store:
        env["CEPH_CLUSTER_STORE"] = store
    try:
        proc = subprocess.run(
            ["bash", str(SCRIPT), "start", str(directory)], capture_output=True, text=True, timeout=300, env=env
        )
        if proc.returncode != 0:
            pytest.skip(f"the test Ceph cluster did not start: {proc.stderr.strip()[-2000:]}")
        yield Cluster(directory)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(directory)], timeout=120, check=False)
        shutil.rmtree(directory, ignore_errors=True)


def start_cluster() -> Iterator[Cluster]:
    """The session's cluster on 127.0.0.1, with ``CEPH_CONF`` pointing at it until the end of the session."""
    with running_cluster() as cluster:
        old = os.environ.get("CEPH_CONF")
        os.environ["CEPH_CONF"] = str(cluster.conf)
        try:
            yield cluster
        finally:
            if old is None:
                os.environ.pop("CEPH_CONF", None)
            else:
                os.environ["CEPH_CONF"] = old
