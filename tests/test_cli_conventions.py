"""The CLI's conventions (docs/cli-conventions.md), checked by running the real ``qwamos`` of every command as a
separate process, as an operator or a script would: data on stdout and messages on stderr; every ``--json``
parses; no decorative symbols off a terminal or with ``NO_COLOR`` (on a terminal they show); ``-q``/``-v`` in
any position; "did you mean"; exit codes; refusals without a terminal.
"""

from __future__ import annotations

import json
import os
import pty
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qwamos.cli.main import build_parser
from qwamos.cli.parser import common_options
from qwamos.keystore import PQCKeystore
from vm_helpers import write_config

# The spec's info block keeps the symbols the spec shows (its contract), terminal or not; the states it does
# not show (disabled, TCG fallback, a mismatch) get symbols only on a terminal.
SPEC_INFO_PHRASES = ("Acceleration: ✅ KVM", "Encryption:   🔒 ENABLED (PQC)")


@dataclass
class World:
    """A keystore with one volume and key, a VM root with a stopped VM (qcow2 disk) and a TLS directory."""

    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    key_id: str = ""

    @property
    def vol(self) -> Path:
        return self.tmp / "disk.qvol"

    def run(
        self, *argv: str, tty: bool = False, env: dict[str, str] | None = None, stdin: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_qwamos(list(argv), {**self.env, **(env or {})}, tty=tty, stdin=stdin)


def run_qwamos(
    argv: list[str], env: dict[str, str], *, tty: bool = False, stdin: int | None = None
) -> subprocess.CompletedProcess[str]:
    """``qwamos ARGV`` in its own process; ``tty``: its stdout and stderr are one terminal (read back as err)."""
    cmd = [sys.executable, "-m", "qwamos.cli.main", *argv]
    stdin = subprocess.DEVNULL if stdin is None else stdin
    if not tty:
        return subprocess.run(cmd, env=env, stdin=stdin, capture_output=True, text=True, timeout=120, check=False)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=stdin, stdout=follower, stderr=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        rc = proc.wait(timeout=120)
    finally:
        os.close(leader)
    return subprocess.CompletedProcess(cmd, rc, "", b"".join(chunks).decode("utf-8", errors="replace"))


def _base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWAMOS_") and k != "NO_COLOR"}
    env.update(QWAMOS_KEYSTORE=str(tmp / "keystore"), QWAMOS_ROOT=str(tmp / "root"))
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("cli")
    w = World(tmp, _base_env(tmp))
    res = w.run("volume", "create", str(w.vol), "--size", "1M", "--json")
    assert res.returncode == 0, res.stderr
    w.key_id = json.loads(res.stdout)["key_id"]
    kernel = tmp / "idle.bin"
    kernel.write_bytes(struct.pack("<II", 0xD503207F, 0x17FFFFFF) + bytes(4088))  # aarch64 "wfi; b ."
    write_config(tmp / "root", "web", kernel=kernel, size="1M")
    write_config(tmp / "root", "sec", kernel=kernel, size="1M", encrypted=True, disk_name="disk.qvol")
    disk = tmp / "root" / "vms" / "web" / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    return w


def _ascii(text: str) -> bool:
    return all(ord(c) < 128 for c in text)


# (argv, what stdout holds: "json", "text" (data), "" (nothing), expected exit status)
def _cases(w: World) -> list[tuple[list[str], str, int]]:
    t, vol, key = w.tmp, str(w.vol), w.key_id
    return [
        (["volume", "create", str(t / "new.qvol"), "--size", "1M"], "", 0),
        (["volume", "create", str(t / "new2.qvol"), "--size", "1M", "--json"], "json", 0),
        (["volume", "info", vol], "text", 0),
        (["volume", "info", vol, "--json"], "json", 0),
        (["volume", "check", vol], "", 0),
        (["volume", "check", vol, "--json", "--progress"], "json", 0),
        (["volume", "repair", vol, "--dry-run"], "text", 0),  # the plan (here: nothing to repair) is data
        (["volume", "repair", vol, "--dry-run", "--json"], "json", 0),
        (["volume", "dump-header", vol], "text", 0),
        (["volume", "reencrypt", vol, "--dry-run"], "text", 0),  # a dry-run plan is data
        (["volume", "dump-header", vol, "--json"], "json", 0),
        (["key", "identity"], "text", 0),
        (["key", "identity", "--json"], "json", 0),
        (["key", "list"], "text", 0),
        (["key", "list", "--json"], "json", 0),
        (["key", "show", key], "text", 0),
        (["key", "show", key, "--json"], "json", 0),
        (["vm", "list"], "text", 0),
        (["vm", "list", "--json"], "json", 0),
        (["vm", "info", "web"], "text", 0),
        (["vm", "info", "web", "--json"], "json", 0),
        (["vm", "info", "sec"], "text", 0),
        (["vm", "status", "web"], "text", 0),
        (["vm", "status", "web", "--json"], "json", 0),
        (["vm", "create", "made", "--kernel", str(t / "idle.bin")], "", 0),
        (["vm", "create", "made2", "--kernel", str(t / "idle.bin"), "--json"], "json", 0),
        (["vm", "autostart", "--json"], "json", 0),
        (["vm", "domxml", "sec"], "text", 0),
        (["vm", "domxml", "web"], "", 2),
        (["vm", "stop", "web"], "", 0),
        (["vm", "resume", "web"], "", 43),
        (["vm", "console", "web"], "", 43),
        (["migrate", "web", "--dry-run"], "text", 0),
        (["migrate", "web", "--dry-run", "--json"], "json", 0),
        (["export", "status", "--socket", str(t / "none.sock")], "", 31),
        (["export", "status", "--socket", str(t / "none.sock"), "--json"], "", 31),
        (["tls", "init", "--host", "localhost", "--dir", str(t / "tls")], "", 0),
        (["tls", "client", "c1", "--dir", str(t / "tls"), "--json"], "json", 0),
    ]


CASE_IDS = [" ".join(a[:3]) + (" --json" if "--json" in a else "") for a, _, _ in _cases(World(Path("/t")))]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_stdout_is_data_and_stderr_messages(world: World, index: int) -> None:
    argv, stdout_kind, code = _cases(world)[index]
    res = world.run(*argv)
    assert res.returncode == code, res.stderr
    if stdout_kind == "json":
        json.loads(res.stdout)  # one JSON document, nothing else on stdout
    elif stdout_kind == "text":
        assert res.stdout.strip(), "no data on stdout"
        with pytest.raises(json.JSONDecodeError):
            json.loads(res.stdout)  # text unless --json
    else:
        assert res.stdout == "", f"messages on stdout: {res.stdout!r}"
    # Off a terminal: no decorative symbols anywhere (the spec's info block keeps its own).
    out = res.stdout
    for phrase in SPEC_INFO_PHRASES:
        out = out.replace(phrase, "") if argv[:2] == ["vm", "info"] else out
    assert _ascii(res.stderr), f"non-ASCII on stderr: {res.stderr!r}"
    assert _ascii(out), f"non-ASCII on stdout: {out!r}"


def test_a_change_reports_on_stderr(world: World) -> None:
    res = world.run("volume", "create", str(world.tmp / "msg.qvol"), "--size", "1M")
    assert res.stdout == "" and "Created encrypted volume: " in res.stderr and "Key ID: vm-" in res.stderr
    assert "✅" not in res.stderr


def test_symbols_only_on_a_terminal_without_no_color(world: World) -> None:
    res = world.run("volume", "create", str(world.tmp / "tty.qvol"), "--size", "1M", tty=True)
    assert res.returncode == 0 and "✅ Created encrypted volume" in res.stderr
    res = world.run(
        "volume", "create", str(world.tmp / "nc.qvol"), "--size", "1M", tty=True, env={"NO_COLOR": "1"}
    )
    assert res.returncode == 0 and "Created encrypted volume" in res.stderr and _ascii(res.stderr)


def test_info_block_keeps_the_spec_symbols_and_the_others_only_on_a_terminal(world: World) -> None:
    res = world.run("vm", "info", "sec")
    assert "Encryption:   🔒 ENABLED (PQC)" in res.stdout
    res = world.run("vm", "info", "web")
    assert "Encryption:   DISABLED" in res.stdout and _ascii(res.stdout)
    res = world.run("vm", "info", "web", tty=True)
    assert "Encryption:   🔓 DISABLED" in res.stderr  # (on the terminal: stdout and stderr are one)


def test_progress_with_rate_and_eta_only_on_a_terminal(world: World) -> None:
    res = world.run("volume", "check", str(world.vol), "--progress", tty=True)
    assert res.returncode == 0 and "Checking: 100.0%" in res.stderr and "/s" in res.stderr
    res = world.run("volume", "check", str(world.vol), "--progress")
    assert "Checking" not in res.stderr


# --- -q/-v in any position --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["-q", "volume", "info", "X"],
        ["volume", "-q", "info", "X"],
        ["volume", "info", "-q", "X"],
        ["volume", "info", "X", "-q"],
        ["--quiet", "vm", "list"],
        ["vm", "--root", "/r", "list", "--quiet"],
        ["key", "list", "-q"],
        ["migrate", "web", "-q"],
    ],
)
def test_quiet_in_any_position(argv: list[str]) -> None:
    assert common_options(build_parser(argv).parse_args(argv)) == (True, 0)
    verbose = [{"-q": "-v", "--quiet": "--verbose"}.get(w, w) for w in argv]
    assert common_options(build_parser(verbose).parse_args(verbose)) == (False, 1)


def test_verbose_counts_across_positions() -> None:
    argv = ["-v", "volume", "info", "X", "-vv"]
    assert common_options(build_parser(argv).parse_args(argv))[1] >= 2


@pytest.mark.parametrize("where", [0, 1, 2, 5])
def test_quiet_silences_messages_wherever_it_is(world: World, where: int) -> None:
    argv = ["volume", "create", str(world.tmp / f"q{where}.qvol"), "--size", "1M"]
    argv.insert(where, "-q")
    res = world.run(*argv)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""


# --- usage errors: did you mean ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["volme", "list"], "'volume'"),
        (["vm", "strat", "web"], "'start'"),
        (["volume", "dump-heder", "x"], "'dump-header'"),
        (["key", "lst"], "'list'"),
        (["volume", "create", "x", "--size", "1M", "--algorithm", "chacha20-poly"], "'chacha20-poly1305'"),
        (["vm", "list", "--jsno"], "'--json'"),
        (["volume", "create", "x", "--size", "1M", "--forse"], "'--force'"),
    ],
)
def test_did_you_mean(world: World, argv: list[str], suggestion: str) -> None:
    res = world.run(*argv)
    assert res.returncode == 2 and res.stdout == ""
    assert f"did you mean {suggestion}" in res.stderr


def test_no_suggestion_for_nonsense(world: World) -> None:
    res = world.run("zzzzqqq")
    assert res.returncode == 2 and "did you mean" not in res.stderr and "invalid choice" in res.stderr


# --- exit codes and messages that name the thing ----------------------------------------------------------


def test_key_identity_without_a_keystore_is_26(world: World) -> None:
    res = world.run("key", "identity", env={"QWAMOS_KEYSTORE": str(world.tmp / "no-keystore")})
    assert res.returncode == 26 and res.stdout == ""
    assert str(world.tmp / "no-keystore") in res.stderr and "does not exist" in res.stderr


@pytest.mark.parametrize("action", ["info", "check", "dump-header", "repair"])
def test_a_missing_volume_is_no_such_file(world: World, action: str) -> None:
    missing = world.tmp / "missing.qvol"
    res = world.run("volume", action, str(missing))
    assert res.returncode == 10
    assert f"{missing}: no such file" in res.stderr and "not a qvol" not in res.stderr


@pytest.mark.parametrize("content", [b"hello\n", b"#!/bin/sh\n" * 1000], ids=["short", "long"])
def test_a_file_that_is_not_a_volume_is_not_a_qvol(world: World, content: bytes) -> None:
    """A small text file is not "a truncated volume" (13): what it holds is not the magic, whatever its size."""
    other = world.tmp / "notes.txt"
    other.write_bytes(content)
    res = world.run("volume", "info", str(other))
    assert res.returncode == 10 and "not a qvol" in res.stderr and "truncated" not in res.stderr


@pytest.mark.parametrize(
    "argv", [["volume", "info", "{vol}"], ["key", "show", "{key}"], ["volume", "dump-header", "{vol}"]]
)
def test_text_records_show_no_python_reprs(world: World, argv: list[str]) -> None:
    """The text form of a record is for people: nested fields as dotted keys, absent ones as "-", never a
    Python repr (``{'key_commitment': ...}``, ``None``)."""
    res = world.run(*[a.format(vol=world.vol, key=world.key_id) for a in argv])
    assert res.returncode == 0, res.stderr
    assert "{'" not in res.stdout and "None" not in res.stdout, res.stdout
    assert "features.key_commitment.compat:" in res.stdout or argv[0] == "key"


def test_every_json_event_stream_has_a_type(world: World) -> None:
    """``key rotate --json`` is an event stream like ``migrate --json``: each line one object with a "type"."""
    vol = world.tmp / "rot.qvol"
    res = world.run("volume", "create", str(vol), "--size", "1M", "--json")
    assert res.returncode == 0, res.stderr
    res = world.run("key", "rotate", json.loads(res.stdout)["key_id"], "--json")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert events and all(isinstance(e.get("type"), str) for e in events), events
    assert {"progress", "result"} <= {e["type"] for e in events}


def test_tls_commands_take_the_serve_spelling_of_the_directory(world: World) -> None:
    """``volume serve --tls-dir DIR`` and ``tls init/client``: an operator can use the same option name."""
    tls = world.tmp / "tls-alias"
    res = world.run("tls", "init", "--host", "localhost", "--tls-dir", str(tls))
    assert res.returncode == 0 and (tls / "ca-cert.pem").exists(), res.stderr
    res = world.run("tls", "client", "c1", "--tls-dir", str(tls), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["subject"] == "c1", res.stderr


def test_resize_refusal_with_snapshots_says_why_and_what_to_do(world: World) -> None:
    """A volume with snapshots is not resized: the refusal names them and the way out (exit 11, no Python
    names); once its last snapshot is deleted it resizes (a one-layer chain keeps its identity)."""
    vol = str(world.tmp / "snapped.qvol")
    for argv in (["volume", "create", vol, "--size", "1M"], ["volume", "snapshot", "create", vol, "s"]):
        assert world.run(*argv).returncode == 0
    res = world.run("volume", "resize", vol, "2M")
    assert res.returncode == 11 and "has snapshots (1)" in res.stderr and "vm clone" in res.stderr, res.stderr
    assert "snapshot delete" in res.stderr
    assert "this version" not in res.stderr and "qwamos.volume" not in res.stderr
    assert world.run("volume", "snapshot", "delete", vol, "s", "--yes").returncode == 0
    res = world.run("volume", "resize", vol, "2M")
    assert res.returncode == 0, res.stderr


def test_an_existing_volume_names_the_cli_option(world: World) -> None:
    res = world.run("volume", "create", str(world.vol), "--size", "1M")
    assert res.returncode == 16 and "--force" in res.stderr and "overwrite=True" not in res.stderr


def test_no_vms_names_the_root(world: World) -> None:
    empty = world.tmp / "empty-root"
    res = world.run("vm", "list", env={"QWAMOS_ROOT": str(empty)})
    assert res.returncode == 0 and res.stdout == "" and str(empty) in res.stderr
    res = world.run("vm", "list", "--json", env={"QWAMOS_ROOT": str(empty)})
    assert json.loads(res.stdout) == []


def test_unknown_vm_is_42(world: World) -> None:
    res = world.run("vm", "info", "nope")
    assert res.returncode == 42 and "nope" in res.stderr and str(world.tmp / "root") in res.stderr


def test_confirmation_without_a_terminal_needs_yes(world: World) -> None:
    res = world.run("key", "delete", "vm-no-such-key")
    assert res.returncode == 21  # the key is looked up before anything is asked
    new_id = PQCKeystore(world.env["QWAMOS_KEYSTORE"]).generate_key("spare")  # a key no volume uses
    res = world.run("key", "delete", new_id)
    assert res.returncode == 2 and "--yes" in res.stderr and "not a terminal" in res.stderr
    assert world.run("key", "show", new_id).returncode == 0  # still there
    res = world.run("key", "delete", new_id, "--yes")
    assert res.returncode == 0 and res.stdout == "" and world.run("key", "show", new_id).returncode == 21


def test_console_of_a_stopped_vm_says_so(world: World) -> None:
    res = world.run("vm", "console", "web")
    assert res.returncode == 43 and "only available while it runs" in res.stderr and res.stdout == ""


def test_a_locked_volume_names_the_process_holding_it(world: World) -> None:
    """The holder's pid, command and directory (a VM's processes run in its run directory, which names it)."""
    run_dir = world.tmp / "root" / "vms" / "holder" / "run"
    run_dir.mkdir(parents=True)
    vol = world.tmp / "locked.qvol"
    assert world.run("volume", "create", str(vol), "--size", "1M").returncode == 0
    holder = _hold_lock(vol, run_dir)
    try:
        for argv in (["volume", "repair", str(vol)], ["volume", "create", str(vol), "--size", "1M", "--force"]):
            res = world.run(*argv)
            assert res.returncode == 15, res.stderr
            assert f"pid {holder.pid}: python" in res.stderr and f"(in {run_dir})" in res.stderr
    finally:
        _release(holder)


def _hold_lock(path: Path, cwd: Path) -> subprocess.Popen[str]:
    """A process holding an exclusive flock on ``path`` until its stdin closes (returned once it holds it)."""
    code = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


def _release(holder: subprocess.Popen[str]) -> None:
    """End the holder: its stdin closes, it exits; both pipes closed and the process reaped."""
    holder.communicate(timeout=30)


def test_a_migration_in_progress_names_its_process(world: World) -> None:
    kernel = world.tmp / "idle.bin"
    write_config(world.tmp / "root", "busy", kernel=kernel, size="1M")
    vm_dir = world.tmp / "root" / "vms" / "busy"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(vm_dir / "disk.qcow2"), "1M"], check=True)
    holder = _hold_lock(vm_dir / ".qwamos-migrate.json.lock", world.tmp)
    try:
        res = world.run("migrate", "busy")
        assert res.returncode == 50 and "another migration of this VM is running" in res.stderr
        assert f"pid {holder.pid}: python" in res.stderr
    finally:
        _release(holder)
    assert not (vm_dir / "disk.qvol").exists()


@pytest.mark.qemu
def test_vm_start_json_and_a_running_vm_named_as_the_lock_holder(world: World) -> None:
    res = world.run("vm", "start", "sec", "--json")
    try:
        assert res.returncode == 0, res.stderr
        started = json.loads(res.stdout)
        assert started["name"] == "sec" and started["state"] == "running" and started["key_id"]
        assert started["created_disk"] and "export" in started["pids"] and "qemu" in started["pids"]
        assert "started sec" in res.stderr and _ascii(res.stderr)
        disk = world.tmp / "root" / "vms" / "sec" / "disk.qvol"
        res = world.run("volume", "repair", str(disk))
        assert res.returncode == 15
        assert f"pid {started['pids']['export']}: " in res.stderr and "vms/sec/run)" in res.stderr
        res = world.run("vm", "console", "sec")  # running, but stdin is not a terminal
        assert res.returncode == 2 and "needs a terminal" in res.stderr and "serial.log" in res.stderr
    finally:
        world.run("vm", "stop", "sec", "--force")
    assert json.loads(world.run("vm", "status", "sec", "--json").stdout)["state"] == "stopped"


@pytest.mark.qemu
def test_migrate_transcript_on_stderr_and_json_lines_on_stdout(world: World) -> None:
    kernel = world.tmp / "idle.bin"
    for name in ("m1", "m2"):
        write_config(world.tmp / "root", name, kernel=kernel, size="1M")
        disk = world.tmp / "root" / "vms" / name / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    res = world.run("migrate", "m1")
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert "Migration Complete!" in res.stderr and "1. Test the VM: qwamos vm start m1" in res.stderr
    assert _ascii(res.stderr) and "Progress:" not in res.stderr  # no progress lines off a terminal
    res = world.run("migrate", "m2", "--json")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert events[0]["type"] == "plan" and events[-1]["type"] == "complete"
    assert "Migration Complete" not in res.stderr


@pytest.mark.qemu
def test_migrate_on_a_terminal_shows_symbols_and_progress_with_rate(world: World) -> None:
    kernel = world.tmp / "idle.bin"
    write_config(world.tmp / "root", "m3", kernel=kernel, size="1M")
    disk = world.tmp / "root" / "vms" / "m3" / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    res = world.run("migrate", "m3", tty=True)
    assert res.returncode == 0, res.stderr
    assert "✅ Migration Complete!" in res.stderr and "✓ Configuration updated" in res.stderr
    assert "Progress: 100.0% (256/256 blocks, " in res.stderr and "MB/s" in res.stderr


def test_logged_and_printed_warnings_have_one_shape(capsys):
    """A warning printed by a command (output.warn) and one logged by the library (a header copy fallback,
    say) look the same on stderr, as the errors do ("qwamos: error: ...")."""
    import logging

    from qwamos import logs
    from qwamos.cli import output

    output.warn("printed")
    record = logging.LogRecord("qwamos.volume", logging.WARNING, __file__, 1, "logged %s", ("here",), None)
    assert capsys.readouterr().err == "qwamos: warning: printed\n"
    assert logs.Formatter().format(record) == "qwamos: warning: logged here"
