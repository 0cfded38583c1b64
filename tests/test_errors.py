"""``qwamos.errors``: messages from docstrings, exit codes, and ``run_main`` — the one place an exception
becomes a message and an exit status (used by ``qwamos.cli.main`` and ``python -m qwamos.nbd.export``)."""

from __future__ import annotations

import re
from pathlib import Path

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
        assert cls.exit_code == 2 or 10 <= cls.exit_code <= 79, cls  # 60-69 storage, 70-79 backups (README)
        assert cls.exit_code in errors.EXIT_CODES, cls


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


# --- the exit-code table the README shows ---------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_table() -> str:
    text = README.read_text(encoding="utf-8")
    _, _, rest = text.partition("<!-- exit-codes:begin -->\n")
    table, found, _ = rest.partition("<!-- exit-codes:end -->")
    assert found, "README.md has no exit-codes block"
    return table.strip()


def test_readme_shows_the_exit_code_table_of_the_code():
    assert _readme_table() == errors.exit_code_table_markdown(), (
        "README.md's exit-code table differs from qwamos.errors.EXIT_CODES; regenerate it with "
        "`python -m qwamos.errors` and paste it between the exit-codes markers"
    )


def test_readme_table_parses_to_the_code_table():
    """Parsed back (code and meaning per row), the README's table is EXIT_CODES, code for code."""
    rows = [line.strip("|").split("|") for line in _readme_table().splitlines()[2:]]
    assert {int(code): meaning.strip() for code, _area, meaning in rows} == errors.EXIT_CODES


def test_every_error_class_exit_code_is_in_the_table():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, QwamosError)]
    for cls in classes:
        assert cls.exit_code in errors.EXIT_CODES, f"{cls.__name__}: exit {cls.exit_code} is not in EXIT_CODES"
    for code in errors.EXIT_CODES:
        errors.exit_area(code)  # inside a range


def test_cli_messages_never_show_python_api_wording():
    """The message the CLI prints (cli_message) names options, never ``name=True`` keyword arguments."""
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, QwamosError)]
    for cls in classes:
        template = cls.cli_text or (cls.__doc__ or "").strip().splitlines()[0]
        assert not re.search(r"\b[a-z_]+=(True|False|None)\b", template), (cls.__name__, template)
    assert "overwrite=True" not in errors.VolumeExistsError(path="x").cli_message()
    assert "--force" in errors.VolumeExistsError(path="x").cli_message()
