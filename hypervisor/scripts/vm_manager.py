#!/usr/bin/env python3
"""The spec's ``./vm_manager.py <command> <vm>``: a shim over ``qwamos vm``.

Runs from a clone without activating anything: if ``qwamos`` cannot be imported with this interpreter, it
re-executes itself with the repository's ``.venv/bin/python``.
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
        os.environ["QWAMOS_SHIM_REEXEC"] = "1"
        os.execv(str(venv_python), [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])  # noqa: S606
    sys.path.insert(0, str(REPO / "src"))
    from qwamos.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["vm", *sys.argv[1:]]))
