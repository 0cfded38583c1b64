"""The man page and the bash/zsh completions, generated from the argument parser by argparse-manpage and shtab
through the Makefile's own rules, mention every command; the bash completion really completes in bash; and
``make install`` puts them where man, bash-completion and zsh look.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwamos.cli.main import COMMAND_GROUPS, full_parser

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make missing")


def _subcommands(parser) -> dict[str, object]:
    """{name: parser} of a parser's subcommands (argparse keeps them in the _SubParsersAction)."""
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return dict(action.choices)
    return {}


TOP = list(COMMAND_GROUPS)
# Every second-level command too: "vm domxml", "volume create", ...
PAIRS = [(top, sub) for top, p in _subcommands(full_parser()).items() for sub in _subcommands(p)]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gen")
    files = {
        "man": out / "man/qwamos.1",
        "bash": out / "completion/qwamos.bash",
        "zsh": out / "completion/_qwamos",
    }
    proc = subprocess.run(
        ["make", "-s", "-C", str(REPO), f"GEN_DIR={out}", *map(str, files.values())],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return files


def test_parser_has_every_group():
    assert set(_subcommands(full_parser())) == set(TOP)
    assert ("vm", "domxml") in PAIRS and ("volume", "create") in PAIRS


@pytest.mark.parametrize("kind", ["man", "bash", "zsh"])
def test_generated_files_mention_every_command(generated, kind):
    text = generated[kind].read_text(encoding="utf-8").replace("\\-", "-")  # roff escapes hyphens
    for top in TOP:
        assert top in text, f"{top} missing from the {kind} file"
    for top, sub in PAIRS:
        assert sub in text, f"{top} {sub} missing from the {kind} file"


def test_man_page_has_a_section_per_command(generated):
    text = generated["man"].read_text(encoding="utf-8").replace("\\-", "-")
    assert text.startswith(".TH QWAMOS") or "\n.TH QWAMOS" in text
    for top, sub in PAIRS:
        assert f"qwamos {top} {sub}" in text, f"no section for qwamos {top} {sub}"


def test_man_page_renders(generated):
    if shutil.which("man") is None:
        pytest.skip("man missing")
    proc = subprocess.run(
        ["man", "-l", "-P", "cat", str(generated["man"])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "MANWIDTH": "100", "LANG": "C.UTF-8"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "qwamos vm autostart" in proc.stdout


def _bash_complete(script: Path, words: list[str]) -> list[str]:
    """Complete the last word of ``words`` in a real bash with the generated script loaded."""
    line = " ".join(words)
    program = f"""
source {script}
COMP_WORDS=({" ".join(f"'{w}'" for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE='{line}'
COMP_POINT={len(line)}
_shtab_qwamos qwamos '{words[-1]}' '{words[-2]}'
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    proc = subprocess.run(
        ["bash", "--norc", "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_completion_completes_commands(generated):
    if shutil.which("bash") is None:
        pytest.skip("bash missing")
    assert set(_bash_complete(generated["bash"], ["qwamos", ""])) >= set(TOP)
    assert "domxml" in _bash_complete(generated["bash"], ["qwamos", "vm", "dom"])
    assert set(_bash_complete(generated["bash"], ["qwamos", "vm", "a"])) == {"autostart"}


def test_zsh_completion_parses(generated):
    if shutil.which("zsh") is None:
        pytest.skip("zsh missing (Debian: zsh); the file is still checked for every command above")
    proc = subprocess.run(
        ["zsh", "-n", str(generated["zsh"])], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_make_install_places_man_page_and_completions(tmp_path):
    dest = tmp_path / "dest"
    gen = tmp_path / "gen"
    proc = subprocess.run(
        ["make", "-s", "-C", str(REPO), "install", f"DESTDIR={dest}", "PREFIX=/opt/qw", f"GEN_DIR={gen}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    share = dest / "opt/qw/share"
    for path in ("man/man1/qwamos.1", "bash-completion/completions/qwamos", "zsh/site-functions/_qwamos"):
        installed = share / path
        assert installed.is_file(), path
        assert installed.stat().st_mode & 0o777 == 0o644
        assert "domxml" in installed.read_text(encoding="utf-8")


# --- `qwamos completion SHELL`: the same script, for installs without a source tree (pipx) ---------------


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_command_prints_the_generated_script(generated, shell):
    proc = subprocess.run(
        [sys.executable, "-m", "qwamos.cli.main", "completion", shell],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout == generated[shell].read_text(encoding="utf-8")


def test_completion_command_script_completes_in_bash(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("bash missing")
    script = tmp_path / "qwamos"
    with script.open("w", encoding="utf-8") as f:
        subprocess.run(
            [sys.executable, "-m", "qwamos.cli.main", "completion", "bash"], stdout=f, check=True, timeout=120
        )
    # Every group, even though this run of qwamos only imported the `completion` group's module.
    assert set(_bash_complete(script, ["qwamos", ""])) >= set(TOP)
    assert "domxml" in _bash_complete(script, ["qwamos", "vm", "dom"])
