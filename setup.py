"""Build hook: the batch-AEAD C extension, and the man page and bash/zsh completions as data files.

``qwamos._aead_runs`` (src/qwamos/_aead_runs.c, Python's stable ABI from 3.11, so one build serves every
supported Python) links the system's OpenSSL (libcrypto).  It is optional: where it cannot be built (no C
compiler, no OpenSSL or Python headers) the install goes on and ``qwamos.crypto`` uses its Python loop.
``make venv`` insists on it, since the Makefile installs the compiler and headers (scripts/install-deps.sh).


They are generated at build time from the argument parser (``qwamos.cli.main.full_parser``) by the same tools
and arguments as ``make man completion`` (argparse-manpage, shtab), into ``build/share/``, and installed under
the environment's ``share/`` (``share/man/man1``, ``share/bash-completion/completions``,
``share/zsh/site-functions``): pip into a venv, and pipx >= 1.4 (which links a venv's man pages into
``~/.local/share/man``).  Everything else is in pyproject.toml.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

from setuptools import Command, Extension, setup
from setuptools.command.build import build

HERE = Path(__file__).resolve().parent
GEN = Path("build") / "share"
MAN_PAGE = GEN / "man" / "qwamos.1"
BASH = GEN / "completion" / "qwamos"
ZSH = GEN / "completion" / "_qwamos"
PARSER = "qwamos.cli.main.full_parser"
# What the wheel installs under the environment's prefix: (directory, [file relative to this directory]).
DATA_FILES = [
    ("share/man/man1", [str(MAN_PAGE)]),
    ("share/bash-completion/completions", [str(BASH)]),
    ("share/zsh/site-functions", [str(ZSH)]),
]


def _version() -> str:
    namespace: dict[str, str] = {}
    exec((HERE / "src/qwamos/__init__.py").read_text(encoding="utf-8"), namespace)  # noqa: S102 (our own file)
    return namespace["__version__"]


def _run(code: str, *argv: str) -> None:
    """Run a generator in a child Python that imports the parser from this tree's src/ (the child, not this
    process, so the build backend's own state is untouched)."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE / "src"), os.environ.get("PYTHONPATH")]))
    )
    subprocess.run([sys.executable, "-c", code, *argv], check=True, cwd=HERE, env=env)


class GenerateShellFiles(Command):
    """``build_shell_files``: write the man page and completions (a sub-command of ``build``)."""

    description = "generate the man page and shell completions from the argument parser"
    user_options: ClassVar[list[tuple[str, str | None, str]]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        for path in (MAN_PAGE, BASH, ZSH):
            (HERE / path).parent.mkdir(parents=True, exist_ok=True)
        manpage = "import sys; from argparse_manpage.cli import main; sys.argv[0] = 'argparse-manpage'; main()"
        _run(
            manpage,
            *("--module", "qwamos.cli.main", "--function", "full_parser", "--prog", "qwamos"),
            *("--project-name", "qwamos", "--version", _version(), "--manual-title", "QWAMOS manual"),
            *("--description", "encrypted VM storage and encrypted VMs", "--output", str(MAN_PAGE)),
        )
        completion = "import sys; from shtab.main import main; sys.exit(main(sys.argv[1:]))"
        for shell, path in (("bash", BASH), ("zsh", ZSH)):
            _run(
                completion,
                *("--error-unimportable", f"--shell={shell}", "--prog=qwamos", PARSER, "--output", str(path)),
            )


class Build(build):
    """``build`` that generates the shell files first, so ``install_data`` finds them."""

    sub_commands: ClassVar[list] = [("build_shell_files", None), *build.sub_commands]


AEAD_RUNS = Extension(
    "qwamos._aead_runs",
    sources=["src/qwamos/_aead_runs.c"],
    libraries=["crypto"],
    py_limited_api=True,  # the source defines Py_LIMITED_API (3.11)
    optional=True,
)

setup(
    cmdclass={"build": Build, "build_shell_files": GenerateShellFiles},
    data_files=DATA_FILES,
    ext_modules=[AEAD_RUNS],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
