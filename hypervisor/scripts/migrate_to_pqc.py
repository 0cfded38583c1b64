#!/usr/bin/env python3
"""The spec's ``./migrate_to_pqc.py <vm-name> [--no-backup]``: the same as ``qwamos migrate``.

Runs with any python3: when ``qwamos`` cannot be imported (system python outside the venv), it re-executes
itself with the repository's ``.venv`` interpreter.
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

try:
    from qwamos.cli.main import main
except ImportError:
    venv_python = REPO / ".venv" / "bin" / "python"
    if venv_python.exists() and os.environ.get("QWAMOS_SHIM_REEXEC") != "1":
        os.environ["QWAMOS_SHIM_REEXEC"] = "1"  # never loop if the venv cannot import it either
        os.execv(str(venv_python), [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])  # noqa: S606
    sys.path.insert(0, str(REPO / "src"))
    from qwamos.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["migrate", *sys.argv[1:]], spec_transcript=True))  # the spec's transcript, on stdout
