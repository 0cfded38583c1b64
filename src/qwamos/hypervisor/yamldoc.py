"""The comment-preserving YAML editor under ``config.yaml``: parse within fixed bounds, change a few keys, write
back only the lines of the keys that changed.

Read and written as YAML 1.2 with ruamel.yaml's round-trip mode, so comments, key order and quoting survive
when the manager records ``key_id``, ``algorithm``, ``key_encapsulation`` or a new disk path.  YAML 1.2 also
keeps an unquoted ``mac: 52:54:00:12:34:56`` a string: a YAML 1.1 loader reads it as a base-60 integer,
which is how the public implementation corrupted its own example config.

A config is a small file a user (or anyone who can write the VM directory) controls, read by commands that
must answer: ``vm list`` reads every VM's.  So reading it is bounded before any YAML is built:

* :func:`read_config_file` never blocks: the file type is checked with ``stat`` and again with ``fstat`` on a
  descriptor opened ``O_NONBLOCK`` (a FIFO, device or socket is refused, not read); at most
  :data:`MAX_CONFIG_BYTES` are read.
* :func:`parse` walks the parser's event stream first and refuses a document whose nodes, counted with every
  alias expanded, exceed :data:`MAX_NODES` (a "billion laughs" alias bomb is a few hundred bytes), or nest
  deeper than :data:`MAX_DEPTH` — before the composer or anything downstream sees it.
"""

from __future__ import annotations

import difflib
import io
import os
import stat
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    ScalarEvent,
)
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString
from ruamel.yaml.tokens import CommentToken

from qwamos.errors import ConfigError

# A full config is about 40 nodes and 1-2 KiB; these bounds leave room and keep the worst case under a second.
MAX_CONFIG_BYTES = 64 * 1024
MAX_NODES = 10_000  # nodes of the document with every alias expanded
MAX_DEPTH = 64  # nesting of mappings and sequences

_SPECIAL = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def _refuse_unless_regular(st: os.stat_result, path: Path) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    kind = _SPECIAL.get(stat.S_IFMT(st.st_mode), "not a regular file")
    raise ConfigError(f"is {kind}, not a config file", path=str(path))


def read_config_file(path: Path, *, missing_ok: bool = False) -> tuple[bytes, int] | None:
    """(content, permission bits) of the regular file ``path``, read without ever blocking; ConfigError for
    anything else (None for a missing file when ``missing_ok``).  Symlinks are followed, to a regular file."""
    try:
        _refuse_unless_regular(os.stat(path), path)
        # O_NONBLOCK: if a FIFO was swapped in after the stat, the open returns at once and fstat refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ConfigError("no such file", path=str(path)) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", path=str(path)) from None
    try:
        st = os.fstat(fd)
        _refuse_unless_regular(st, path)
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"larger than {MAX_CONFIG_BYTES // 1024} KiB; not a VM config", path=str(path))
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:  # the file may grow while it is read
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", path=str(path)) from None
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {MAX_CONFIG_BYTES // 1024} KiB; not a VM config", path=str(path))
    return b"".join(chunks), stat.S_IMODE(st.st_mode)


def _check_bounds(text: str, path: Path) -> None:
    """Refuse, from the event stream alone, a document too large once its aliases are expanded or too deep.

    Each node's expanded size is 1 plus its children's; an alias counts the full size of the node it names.
    So the sizes add up exactly as the constructed data (or anything that walks it, such as ``repr``) would
    grow, while this walk itself stays linear in the text.
    """
    anchored: dict[str, int] = {}
    open_nodes: list[list[Any]] = []  # [anchor, expanded size so far] of each open mapping/sequence
    for event in _yaml().parse(text):
        if isinstance(event, CollectionStartEvent):
            if len(open_nodes) >= MAX_DEPTH:
                raise ConfigError(f"invalid YAML: nested more than {MAX_DEPTH} levels deep", path=str(path))
            open_nodes.append([event.anchor, 1])
            continue
        if isinstance(event, CollectionEndEvent):
            anchor, size = open_nodes.pop()
        elif isinstance(event, ScalarEvent):
            anchor, size = event.anchor, 1
        elif isinstance(event, AliasEvent):
            anchor, size = None, anchored.get(event.anchor, 1)
        else:
            continue
        if anchor is not None:
            anchored[anchor] = size
        total = size + (open_nodes[-1][1] if open_nodes else 0)
        if total > MAX_NODES:
            raise ConfigError(
                f"more than {MAX_NODES} values, counting each alias expanded (an alias bomb?); not a VM config",
                path=str(path),
            )
        if open_nodes:
            open_nodes[-1][1] = total


def parse(text: str, path: Path) -> tuple[CommentedMap, str, str, str]:
    """(document, body, BOM, newline) of a config's text; ConfigError for anything that is not a bounded YAML
    mapping.  ``body`` is the text without BOM and with ``\\n`` line ends: what :class:`Document` patches."""
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    body = text[len(bom) :]
    newline = "\r\n" if "\r\n" in body and "\n" not in body.replace("\r\n", "") else "\n"
    if newline == "\r\n":
        body = body.replace("\r\n", "\n")
    if "\0" in body:
        raise ConfigError("contains a NUL byte; not a YAML text file", path=str(path))
    if len(body.encode("utf-8", errors="replace")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {MAX_CONFIG_BYTES // 1024} KiB; not a VM config", path=str(path))
    try:
        _check_bounds(body, path)
        doc = _yaml().load(body)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML{where}: {problem}", path=str(path)) from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", path=str(path)) from None
    if doc is None:
        doc = CommentedMap()
    if not isinstance(doc, CommentedMap):
        raise ConfigError("expected a mapping of sections (vm, machine, hardware, ...) at the top", path=str(path))
    return doc, body, bom, newline


class Document:
    """A parsed config and the text it came from.  :meth:`set` and :meth:`delete` change the document and are
    recorded, so that they can be replayed onto a file that changed on disk meanwhile; :meth:`body` is the
    original text with only the changed keys' lines replaced or added."""

    def __init__(self, doc: CommentedMap, text: str = "", *, bom: str = "", newline: str = "\n") -> None:
        self.doc = doc
        self.text = text  # as read (BOM and line endings removed), the base that body() patches
        self.bom = bom
        self.newline = newline
        self.indent = _guess_indent(text)
        self.ops: list[tuple[str, tuple[str, ...], Any]] = []  # changes since load, replayed if the file moved

    @classmethod
    def parse(cls, text: str, path: Path) -> Document:
        doc, body, bom, newline = parse(text, path)
        return cls(doc, body, bom=bom, newline=newline)

    def get(self, *keys: str, default: Any = None) -> Any:
        node: Any = self.doc
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return default
            node = node[k]
        return default if node is None else node

    def set(self, keys: tuple[str, ...], value: Any) -> None:
        self.ops.append(("set", keys, value))
        self._apply_set(keys, value)

    def delete(self, keys: tuple[str, ...]) -> None:
        self.ops.append(("del", keys, None))
        self._apply_delete(keys)

    def replay(self, ops: list[tuple[str, tuple[str, ...], Any]]) -> None:
        """Apply another document's recorded changes to this one (without recording them again)."""
        for op, keys, value in ops:
            if op == "set":
                self._apply_set(keys, value)
            else:
                self._apply_delete(keys)

    def _apply_delete(self, keys: tuple[str, ...]) -> None:
        """Remove a leaf; comment lines that followed it (when it was its block's last) stay in place."""
        parent = self.get(*keys[:-1])
        if not isinstance(parent, CommentedMap) or keys[-1] not in parent:
            return
        was_last = next(reversed(parent)) == keys[-1]
        entry = parent.ca.items.get(keys[-1])
        token = entry[2] if entry and len(entry) > 2 else None
        del parent[keys[-1]]
        parent.ca.items.pop(keys[-1], None)
        after = _last_leaf(parent)
        if was_last and isinstance(token, CommentToken) and after is not None:
            holder = CommentedMap()
            holder["_"] = None
            holder.ca.items["_"] = [None, None, token, None]
            _move_trailing_comment((holder, "_"), after)

    def _apply_set(self, keys: tuple[str, ...], value: Any) -> None:
        """Set a leaf, creating missing sections at the end of their parent.

        ruamel.yaml keeps the comment lines that follow a block on the block's last leaf; when keys are
        appended after that leaf, those lines are moved to the new last leaf so that they stay below the
        block (where the user wrote them) instead of ending up in the middle of it.
        """
        node = self.doc
        for i, k in enumerate(keys):
            last = i == len(keys) - 1
            if k in node and (last or isinstance(node[k], CommentedMap)):
                if last:
                    _replace_scalar(node, k, value)
                else:
                    node = node[k]
                continue
            if k in node:  # present but empty ("encryption:"): a new section in its place, comments stay
                node[k] = _chain(keys[i + 1 :], value)
                return
            before = _last_leaf(node)
            node[k] = _chain(keys[i + 1 :], value)
            after = _last_leaf(node)
            if before is not None and after is not None:
                _move_trailing_comment(before, after)
            return

    def body(self) -> str:
        """The new text (BOM and line endings as parsed): the original with only the changed lines patched.

        ruamel.yaml's own rendering is not byte-identical for every file (``True``, ``---``, CRLF, odd
        indentation, a missing final newline), so the text is patched instead: the line differences between
        ruamel's rendering of the document as loaded and as changed are applied to the original text.  The
        result is re-parsed and must equal the changed document; if not, ruamel's full rendering is used.
        """
        changed = _render_doc(self.doc, self.indent)
        if self.text:
            base = _render_doc(_yaml().load(self.text), self.indent)
            patched = _patch_lines(self.text, base, changed)
            try:
                if patched is not None and _same_data(_yaml().load(patched), self.doc):
                    return patched
            except YAMLError:
                pass
        return changed

    def encode(self, body: str) -> str:
        """``body`` with the file's BOM and line endings put back."""
        return self.bom + (body.replace("\n", "\r\n") if self.newline == "\r\n" else body)

    def saved(self, body: str) -> None:
        """``body`` is now on disk: the next :meth:`body` patches it, and there are no pending changes."""
        self.text = body
        self.ops.clear()


def _yaml(indent: tuple[int, int, int] = (2, 4, 2)) -> YAML:
    """A YAML 1.2 round-trip loader/dumper; ``indent`` = (mapping, sequence, dash offset) as the file uses."""
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.indent(mapping=indent[0], sequence=indent[1], offset=indent[2])
    y.width = 4096
    return y


def _guess_indent(text: str) -> tuple[int, int, int]:
    """The file's own indentation, so that lines the manager adds line up with the user's.

    Mapping indent: the first step in from a ``key:`` line.  Sequences: where the first block ``-`` under a
    ``key:`` sits (``offset``) and where its item starts (``sequence``).  Defaults are the spec's 2 spaces.
    """
    mapping: int | None = None
    seq: tuple[int, int] | None = None
    parent: int | None = None  # indentation of the last "key:" line that opens a block
    for line in text.splitlines():
        body = line.lstrip(" ")
        if not body or body.startswith("#"):
            continue
        col = len(line) - len(body)
        if parent is not None and col > parent:
            if body.startswith("- ") or body == "-":
                if seq is None:
                    item = col + 1 + (len(body[1:]) - len(body[1:].lstrip(" ")) if body != "-" else 1)
                    seq = (item - parent, col - parent)
            elif mapping is None:
                mapping = col - parent
        code = body.split(" #", 1)[0].rstrip()
        parent = col if code.endswith(":") and not body.startswith("- ") else None
        if mapping is not None and seq is not None:
            break
    m = mapping if mapping and mapping <= 8 else 2
    sequence, offset = seq if seq and 0 <= seq[1] < seq[0] <= 10 else (m + 2, m)
    return (m, sequence, offset)


def _render_doc(doc: Any, indent: tuple[int, int, int]) -> str:
    buf = io.StringIO()
    _yaml(indent).dump(doc, buf)
    return buf.getvalue()


def _chain(keys: tuple[str, ...], value: Any) -> Any:
    """``value`` nested under new mappings for ``keys`` (``("a", "b"), 1`` -> ``{a: {b: 1}}``)."""
    for k in reversed(keys):
        m = CommentedMap()
        m[k] = value
        value = m
    return value


def _last_leaf(node: CommentedMap) -> tuple[CommentedMap, Any] | None:
    """The (mapping, key) of the last key in document order under ``node``, descending into mappings."""
    if not node:
        return None
    while True:
        key = next(reversed(node))
        child = node[key]
        if isinstance(child, CommentedMap) and child:
            node = child
            continue
        return node, key


def _move_trailing_comment(src: tuple[CommentedMap, Any], dst: tuple[CommentedMap, Any]) -> None:
    """Move the lines after ``src``'s own line (blank lines, comments) to after ``dst``'s line."""
    smap, skey = src
    if isinstance(smap[skey], CommentedSeq):
        return  # a trailing list keeps its comments inside the list; leave them be
    entry = smap.ca.items.get(skey)
    token = entry[2] if entry and len(entry) > 2 else None
    if not isinstance(token, CommentToken):
        return
    text = token.value
    own, sep, rest = text.partition("\n")
    if not sep or not rest:
        return
    if own.strip():
        token.value = own + "\n"
    else:
        entry[2] = None
    dmap, dkey = dst
    dentry = dmap.ca.items.setdefault(dkey, [None, None, None, None])
    if isinstance(dentry[2], CommentToken) and dentry[2].value.endswith("\n"):
        dentry[2].value = dentry[2].value + rest  # dst's own end-of-line comment stays first
    else:
        dentry[2] = CommentToken("\n" + rest, CommentMark(0), None)


def _scalar_width(value: Any) -> int:
    """Characters a scalar takes on its line after ``key: `` (-1 for an empty value: no space either)."""
    if value is None:
        return -1
    if isinstance(value, bool):
        return 4 if value else 5
    if isinstance(value, (SingleQuotedScalarString, DoubleQuotedScalarString)):
        return len(str(value)) + 2
    return len(str(value))


def _replace_scalar(node: CommentedMap, key: Any, value: Any) -> None:
    """Replace a value in place, keeping its quoting style and the gap before its end-of-line comment."""
    old = node[key]
    if old == value and type(old) is type(value):
        return
    if isinstance(value, str) and isinstance(old, (SingleQuotedScalarString, DoubleQuotedScalarString)):
        value = type(old)(value)
    entry = node.ca.items.get(key)
    token = entry[2] if entry and len(entry) > 2 else None
    if isinstance(token, CommentToken) and token.value.startswith("#") and token.start_mark is not None:
        token.start_mark.column = max(0, token.start_mark.column + _scalar_width(value) - _scalar_width(old))
    node[key] = value


def _patch_lines(original: str, base: str, changed: str) -> str | None:
    """Apply the ``base`` -> ``changed`` line edits to ``original`` (``base`` = ruamel's rendering of
    ``original``'s document).  None when an edit touches a line that cannot be matched to the original."""
    if base == original:
        return changed
    orig = original.splitlines(keepends=True)
    if orig and not orig[-1].endswith("\n"):
        orig[-1] += "\n"
    b = base.splitlines(keepends=True)
    c = changed.splitlines(keepends=True)
    # base line -> original line, matching lines that differ only in indentation or spacing
    align = difflib.SequenceMatcher(None, [" ".join(x.split()) for x in b], [" ".join(x.split()) for x in orig])
    where: dict[int, int] = {}
    for tag, i1, i2, j1, _j2 in align.get_opcodes():
        if tag == "equal":
            for k in range(i2 - i1):
                where[i1 + k] = j1 + k
    out = list(orig)
    edits = [op for op in difflib.SequenceMatcher(None, b, c, autojunk=False).get_opcodes() if op[0] != "equal"]
    for tag, i1, i2, j1, j2 in reversed(edits):  # from the end, so earlier positions stay valid
        if tag == "insert":
            if i1 > 0 and (i1 - 1) in where:
                pos = where[i1 - 1] + 1
            elif i1 in where:
                pos = where[i1]
            else:
                return None
            out[pos:pos] = c[j1:j2]
        else:
            rows = [where.get(i) for i in range(i1, i2)]
            if None in rows or rows != list(range(rows[0], rows[0] + len(rows))):  # type: ignore[operator]
                return None
            out[rows[0] : rows[-1] + 1] = c[j1:j2]  # type: ignore[index]
    text = "".join(out)
    if not original.endswith("\n") and text.endswith("\n") and out[-1:] == orig[-1:]:
        text = text[:-1]
    return text


def _same_data(a: Any, b: Any) -> bool:
    """Equal as data, including key order (a patched text must read back as the changed document)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same_data(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_data(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b
