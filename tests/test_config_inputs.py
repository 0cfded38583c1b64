"""Config files that must not hang or explode: a FIFO or device as ``config.yaml``, an alias bomb, a huge or
deeply nested file.  Each is refused with exit 41 (ConfigError) at once, and ``vm list`` marks the bad VM and
lists the others.

Every command runs in a subprocess under a timeout (and, for the alias bomb, an address-space limit), so a
regression fails the test instead of hanging or swapping the machine.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from qwamos.errors import ConfigError
from qwamos.hypervisor import layout
from qwamos.hypervisor.config import VMConfig
from qwamos.hypervisor.yamldoc import MAX_CONFIG_BYTES, MAX_NODES
from vm_helpers import write_config

TIMEOUT = 60  # generous for a loaded machine; the fixed code answers in well under a second
MEMORY_LIMIT = 1 << 30  # address space for the CLI child: the unbounded alias bomb needed 2.2 GB


def _alias_bomb() -> str:
    """Nine levels of nine aliases: 9**9 (387 million) strings once expanded, about 400 bytes of text."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    lines.append("vm:\n  description: *a8")
    return "\n".join(lines) + "\n"


def _qwamos(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    env = {k: v for k, v in os.environ.items() if not k.startswith("QWAMOS_")}
    env["QWAMOS_KEYSTORE"] = str(root.parent / "keystore")
    return subprocess.run(
        [sys.executable, "-m", "qwamos.cli.main", "vm", "--root", str(root), *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        preexec_fn=limit,
        check=False,
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    write_config(r, "good", kernel=tmp_path / "kernel")
    (r / "vms" / "bad").mkdir(parents=True)
    return r


def _fifo(root: Path) -> Path:
    path = layout.config_path(root, "bad")
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("action", ["info", "start", "status"])
def test_a_fifo_config_never_blocks(root, action):
    _fifo(root)
    out = _qwamos(root, action, "bad")
    if action == "status":  # status reads pidfiles, not the config
        assert out.returncode == 0 and out.stdout.startswith("bad: stopped"), out
        return
    assert out.returncode == 41, out
    assert "is a FIFO (named pipe), not a config file" in out.stderr
    assert "Traceback" not in out.stderr


def test_vm_list_marks_the_fifo_vm_and_lists_the_rest(root):
    _fifo(root)
    out = _qwamos(root, "list")
    assert out.returncode == 0, out
    rows = [line.split()[:3] for line in out.stdout.splitlines()[1:]]
    assert rows == [["bad", "stopped", "(config"], ["good", "stopped", "virt"]]
    assert "bad:" in out.stderr and "is a FIFO (named pipe)" in out.stderr
    listed = json.loads(_qwamos(root, "list", "--json").stdout)
    assert [(r["name"], bool(r["error"])) for r in listed] == [("bad", True), ("good", False)]


def test_a_device_config_is_refused_without_reading_it(root):
    os.symlink("/dev/zero", layout.config_path(root, "bad"))
    out = _qwamos(root, "info", "bad")
    assert out.returncode == 41, out
    assert "is a character device, not a config file" in out.stderr


def test_an_alias_bomb_is_refused_in_bounded_time_and_memory(root):
    text = _alias_bomb()
    assert len(text) < 500
    layout.config_path(root, "bad").write_text(text)
    for argv in (("info", "bad"), ("info", "bad", "--json"), ("start", "bad")):
        out = _qwamos(root, *argv)
        assert out.returncode == 41, out
        assert "counting each alias expanded" in out.stderr and "Traceback" not in out.stderr
    out = _qwamos(root, "list")
    assert out.returncode == 0 and "good" in out.stdout and "counting each alias expanded" in out.stderr


def test_modest_aliases_still_load(tmp_path):
    path = layout.config_path(tmp_path, "vm1")
    path.parent.mkdir(parents=True)
    path.write_text("x-defaults: &k /boot/vmlinuz\nboot:\n  kernel: *k\nhardware:\n  cpu: &c {cores: 2}\n")
    cfg = VMConfig.load(path)
    assert str(cfg.kernel) == "/boot/vmlinuz" and cfg.cpu_cores == 2


def test_expansion_is_counted_exactly_at_the_limit(tmp_path):
    """Nodes: the top mapping, two keys, ``x``'s list of 83 scalars (84), ``y``'s list (1) holding k aliases
    of 84 each: 4 + 84 (k + 1).  MAX_NODES loads; one alias more is refused."""
    path = layout.config_path(tmp_path, "vm1")
    path.parent.mkdir(parents=True)
    k = (MAX_NODES - 4) // 84 - 1
    assert 4 + 84 * (k + 1) == MAX_NODES  # the test is exact for the documented limit

    def text(aliases: int) -> str:
        return "x: &a [" + ",".join(["1"] * 83) + "]\ny: [" + ",".join(["*a"] * aliases) + "]\n"

    path.write_text(text(k))
    VMConfig.load(path)
    path.write_text(text(k + 1))
    with pytest.raises(ConfigError, match="counting each alias expanded"):
        VMConfig.load(path)


def test_huge_and_deeply_nested_configs_are_refused(root):
    bad = layout.config_path(root, "bad")
    bad.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    out = _qwamos(root, "info", "bad")
    assert out.returncode == 41 and "larger than 64 KiB" in out.stderr, out
    bad.write_text("x: " + "[" * 5000 + "]" * 5000 + "\n")
    out = _qwamos(root, "info", "bad")
    assert out.returncode == 41 and "nested more than" in out.stderr, out
    bad.write_text("x: [" + ",".join(["1"] * 30000) + "]\n")  # under the byte limit, over the node limit
    out = _qwamos(root, "info", "bad")
    assert out.returncode == 41 and str(MAX_NODES) in out.stderr, out


def test_saving_onto_a_fifo_swapped_in_refuses_instead_of_blocking(tmp_path):
    """``save`` re-reads the file (to replay onto a user's edit): a FIFO swapped in meanwhile is refused."""
    path = layout.config_path(tmp_path, "vm1")
    path.parent.mkdir(parents=True)
    path.write_text("vm:\n  name: vm1\n")
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from qwamos.errors import ConfigError\n"
        "from qwamos.hypervisor.config import VMConfig\n"
        "path = Path(sys.argv[1])\n"
        "cfg = VMConfig.load(path)\n"
        "cfg.set_encryption_enabled(True)\n"
        "path.unlink()\n"
        "os.mkfifo(path)\n"
        "try:\n"
        "    cfg.save()\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert out.returncode == 0 and "is a FIFO (named pipe), not a config file" in out.stdout, out


def test_error_messages_quote_an_aliased_value_cheaply():
    """Even past the bound check (a value built in Python), quoting a huge shared structure stays short."""
    from qwamos.hypervisor.schema import show

    level: object = ["lol"] * 9
    for _ in range(30):  # 9**30 elements if expanded
        level = [level] * 9
    text = show(level)
    assert len(text) <= 60 and text.startswith("[[[")
    assert show({"a": 1, "b": [1, 2, 3, 4, 5]}) == "{'a': 1, 'b': [1, 2, 3, 4, ...]}"
