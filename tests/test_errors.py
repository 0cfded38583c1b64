"""``qwamos.errors``: messages from docstrings, exit codes, and ``run_main`` — the one place an exception
becomes a message and an exit status (used by ``qwamos.cli.main`` and ``python -m qwamos.nbd.export``)."""

from __future__ import annotations

import pytest

from qwamos import errors
from qwamos.errors import ExportError, InvalidArgument, QwamosError, VMNotFoundError, run_main


def test_messages_come_from_the_docstring():
    assert str(VMNotFoundError(name="a", root="/r", path="/r/vms/a")) == (
        "No VM named 'a' under /r (expected /r/vms/a)."
    )
    assert str(ExportError("socket busy")) == "Block export error: socket busy"


def test_every_error_has_an_exit_code_in_its_range():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, QwamosError)]
    assert len(classes) > 20
    for cls in classes:
        assert cls.exit_code == 2 or 10 <= cls.exit_code <= 69, cls  # 60-69: storage (README's table)


@pytest.mark.parametrize(
    ("body", "code", "stderr"),
    [
        (lambda: None, 0, ""),
        (lambda: 3, 3, ""),
        (lambda: (_ for _ in ()).throw(ExportError("busy")), 30, "qwamos: error: Block export error: busy\n"),
        (lambda: (_ for _ in ()).throw(InvalidArgument("bad")), 2, "qwamos: error: Invalid argument: bad\n"),
        (lambda: (_ for _ in ()).throw(KeyboardInterrupt()), 130, "qwamos: interrupted\n"),
        (lambda: (_ for _ in ()).throw(BrokenPipeError()), 1, ""),
    ],
)
def test_run_main(body, code, stderr, capsys):
    assert run_main(body) == code
    assert capsys.readouterr().err == stderr


def test_run_main_lets_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_main(lambda: 1 // 0)
