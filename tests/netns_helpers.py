"""A network namespace of the test's own, joined to the root namespace by a veth pair: a second "host".

:func:`network_namespace` creates a namespace and a veth pair with unique names (``qwamos-<hex>``,
``qwv<hex>r``/``qwv<hex>n``), gives the root end an address of a /30 picked at random in 198.18.0.0/15
(RFC 2544's benchmarking range: never routed, and not used on this machine; a /30 already present on any
interface is skipped, under a lock shared with other test runs) and moves the other end into the namespace,
down and without an address until :meth:`NetNS.link_up`.  On leaving, failed test or not, it kills whatever
still runs inside *that* namespace (``ip netns pids``: only processes the test started there), deletes the
namespace (which destroys the veth pair) and the root end if it survived.  Nothing else is ever touched:
the only targets are the names made here.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for ``ip netns``); without it the test skips and says why.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

RANGE = ipaddress.ip_network("198.18.0.0/15")
LOCK = "/tmp/qwamos-netns.lock"  # serialises address picking between concurrent test runs


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass
class NetNS:
    name: str
    veth_root: str  # in the root namespace, holds root_addr
    veth_ns: str  # inside the namespace, holds ns_addr once link_up() ran
    root_addr: str
    ns_addr: str
    prefix: int = 30

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the namespace to completion (text output captured)."""
        kw.setdefault("timeout", 300)
        return subprocess.run(self.argv(argv), capture_output=True, text=True, **kw)

    def link_up(self) -> None:
        """Give the namespace's end of the veth its address and bring it up: the root end becomes reachable."""
        self.run(["ip", "addr", "add", f"{self.ns_addr}/{self.prefix}", "dev", self.veth_ns], check=True)
        self.run(["ip", "link", "set", self.veth_ns, "up"], check=True)

    def connect_errno(self, host: str, port: int) -> int:
        """The errno of a TCP connect to ``host:port`` from inside the namespace (0: connected)."""
        return connect_errno(host, port, self)


def connect_errno(host: str, port: int, ns: NetNS | None = None) -> int:
    """The errno of a TCP connect to ``host:port`` (0: connected), from ``ns`` or the root namespace."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(); s.settimeout(10)\n"
        "try:\n    print(s.connect_ex((sys.argv[1], int(sys.argv[2]))))\n"
        "except TimeoutError:\n    print(110)\n"
    )
    argv = [sys.executable, "-c", code, host, str(port)]
    out = ns.run(argv, check=True) if ns else subprocess.run(argv, capture_output=True, text=True, check=True)
    return int(out.stdout)


def _pick_subnet() -> ipaddress.IPv4Network:
    """A /30 of :data:`RANGE` that no interface of the root namespace has an address in."""
    used = []
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            used.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    for _ in range(100):
        net = ipaddress.ip_network(
            (int(RANGE.network_address) + 4 * secrets.randbelow(RANGE.num_addresses // 4), 30)
        )
        if not any(net.overlaps(u) for u in used):
            return net
    raise AssertionError(f"no free /30 in {RANGE}")


def _kill_inside(name: str) -> None:
    """SIGKILL every process still inside namespace ``name`` (ours: started there by the test) and wait."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@contextlib.contextmanager
def network_namespace() -> Iterator[NetNS]:
    """A namespace with loopback up and a veth pair to the root namespace (see the module docstring)."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip is not installed: no network namespace for the second host")
    tag = secrets.token_hex(4)
    ns = NetNS(name=f"qwamos-{tag}", veth_root=f"qwv{tag}r", veth_ns=f"qwv{tag}n", root_addr="", ns_addr="")
    made = _ip("netns", "add", ns.name, check=False)
    if made.returncode != 0:
        pytest.skip(
            f"cannot create a network namespace (needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN): "
            f"{made.stderr.strip()}"
        )
    try:
        ns.run(["ip", "link", "set", "lo", "up"], check=True)
        _ip("link", "add", ns.veth_root, "type", "veth", "peer", "name", ns.veth_ns)
        _ip("link", "set", ns.veth_ns, "netns", ns.name)
        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            net = _pick_subnet()
            ns.root_addr, ns.ns_addr = (str(h) for h in net.hosts())
            _ip("addr", "add", f"{ns.root_addr}/{ns.prefix}", "dev", ns.veth_root)
        _ip("link", "set", ns.veth_root, "up")
        yield ns
    finally:
        _kill_inside(ns.name)
        _ip("netns", "delete", ns.name, check=False)
        if ns.veth_root in _ip("-o", "link", "show", check=False).stdout:
            _ip("link", "delete", ns.veth_root, check=False)
