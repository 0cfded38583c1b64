"""The control channel's sans-IO protocol (qwamos.nbd.control_protocol), bytes only: framing, limits,
validation, structured errors, key hygiene, and a fuzzer.  docs/control-channel.md is the spec."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwamos.nbd import control_protocol as cp

KEY = bytes(range(32))


def frame(body: bytes, blob: bytes = b"", *, magic=b"QCTL", version=1, kind=1, flags=0, jlen=None, blen=None):
    jlen = len(body) if jlen is None else jlen
    blen = len(blob) if blen is None else blen
    return struct.pack(">4sBBHII", magic, version, kind, flags, jlen, blen) + body + blob


def req(command: str, args: dict | None = None, blob: bytes = b"") -> bytes:
    return bytes(cp.encode_request(command, args, blob))


def replies(data: bytes) -> list[cp.Reply]:
    rd = cp.ReplyReader()
    rd.receive_data(data)
    out = []
    while (r := rd.next_reply()) is not None:
        out.append(r)
    return out


def one_error(conn: cp.ControlConnection) -> cp.Reply:
    (r,) = replies(conn.data_to_send())
    assert not r.ok
    return r


# --- the wire format, pinned ----------------------------------------------------------------------------------


def test_request_vector():
    """These bytes must not change silently (docs/control-channel.md, "Test vectors")."""
    assert req("status") == bytes.fromhex("5143544c010100000000001400000000") + b'{"command":"status"}'
    data = req("set-key", {"purpose": "rotation-target", "key_id": "k1"}, KEY)
    body = b'{"command":"set-key","args":{"purpose":"rotation-target","key_id":"k1"}}'
    assert data == b"QCTL\x01\x01\x00\x00" + struct.pack(">II", len(body), 32) + body + KEY


def test_reply_vectors():
    assert cp.encode_reply({"flushed": True}) == (
        bytes.fromhex("5143544c010200000000002500000000") + b'{"ok":true,"result":{"flushed":true}}'
    )
    err = cp.encode_error(cp.E_UNKNOWN_COMMAND, "unknown command x")
    body = b'{"ok":false,"error":{"code":"unknown-command","message":"unknown command x"}}'
    assert err == b"QCTL\x01\x02\x00\x00" + struct.pack(">II", len(body), 0) + body


def test_round_trip_request_reply():
    conn = cp.ControlConnection()
    conn.receive_data(req("quiesce", {"timeout": 2.5, "detach": True}))
    ev = conn.next_event()
    assert isinstance(ev, cp.Request) and ev.command == "quiesce" and ev.args == {"timeout": 2.5, "detach": True}
    assert conn.state is cp.State.BUSY
    conn.reply({"quiesced": True})
    (r,) = replies(conn.data_to_send())
    assert r.ok and r.result == {"quiesced": True}
    assert conn.state is cp.State.IDLE


def test_byte_by_byte_delivery():
    conn = cp.ControlConnection()
    data = req("status") + req("flush")
    events = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        ev = conn.next_event()
        if ev is not None:
            events.append(ev)
            conn.reply({})
    assert [e.command for e in events] == ["status", "flush"]


def test_one_request_at_a_time():
    """A second request is not parsed until the first is answered."""
    conn = cp.ControlConnection()
    conn.receive_data(req("status") + req("flush"))
    assert conn.next_event().command == "status"
    assert conn.next_event() is cp.NEED_DATA
    conn.reply({})
    assert conn.next_event().command == "flush"
    with pytest.raises(cp.LocalProtocolError):
        conn.reply({})
        conn.reply({})


# --- malformed frames: structured errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(b"{}", magic=b"HTTP"), cp.E_BAD_FRAME),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", cp.E_BAD_FRAME),
        (frame(b'{"command":"status"}', version=2), cp.E_VERSION),
        (frame(b'{"command":"status"}', version=0), cp.E_VERSION),
        (frame(b'{"command":"status"}', kind=2), cp.E_BAD_FRAME),
        (frame(b'{"command":"status"}', flags=1), cp.E_BAD_FRAME),
        (frame(b"", jlen=cp.MAX_JSON + 1), cp.E_TOO_LARGE),
        (frame(b"", jlen=0xFFFFFFFF), cp.E_TOO_LARGE),
        (frame(b'{"command":"status"}', blen=cp.MAX_BLOB + 1), cp.E_TOO_LARGE),
    ],
    ids=["magic", "http", "version2", "version0", "kind", "flags", "json-too-big", "json-4g", "blob-too-big"],
)
def test_unrecoverable_frames_answer_then_close(data, code):
    conn = cp.ControlConnection()
    conn.receive_data(data)
    ev = conn.next_event()
    assert isinstance(ev, cp.Closed)
    assert one_error(conn).code == code
    assert conn.state is cp.State.CLOSED
    conn.receive_data(req("status"))
    assert conn.next_event() is cp.NEED_DATA


def test_oversized_frame_is_refused_from_its_header_without_buffering():
    conn = cp.ControlConnection()
    conn.receive_data(frame(b"", jlen=cp.MAX_JSON + 1)[: cp.HEADER_SIZE])
    assert isinstance(conn.next_event(), cp.Closed)
    assert one_error(conn).code == cp.E_TOO_LARGE


def test_largest_frame_is_accepted():
    pad = "x" * (cp.MAX_JSON - len('{"command":"status","args":{"p":""}}'))
    body = json.dumps({"command": "status", "args": {"p": pad}}, separators=(",", ":")).encode()
    assert len(body) == cp.MAX_JSON
    conn = cp.ControlConnection()
    conn.receive_data(frame(body))
    assert one_error_or_event(conn).code == cp.E_BAD_ARGUMENT  # parsed (and judged), not refused for size


def one_error_or_event(conn):
    ev = conn.next_event()
    assert ev is None or isinstance(ev, cp.Request)
    return one_error(conn)


def test_client_that_does_not_wait_is_cut_off():
    conn = cp.ControlConnection(max_buffer=1000)
    conn.receive_data(req("status"))
    assert conn.next_event().command == "status"
    for _ in range(100):
        conn.receive_data(req("status"))
    conn.reply({})
    conn.data_to_send()
    assert isinstance(conn.next_event(), cp.Closed)
    assert one_error(conn).code == cp.E_TOO_LARGE


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", cp.E_BAD_REQUEST),
        (b"\xff\xfe", cp.E_BAD_REQUEST),
        (b"[]", cp.E_BAD_REQUEST),
        (b'"status"', cp.E_BAD_REQUEST),
        (b'{"command":"status","command":"flush"}', cp.E_BAD_REQUEST),  # duplicate field
        (b'{"command":"quiesce","args":{"timeout":NaN}}', cp.E_BAD_REQUEST),
        (b'{"command":"status","extra":1}', cp.E_BAD_REQUEST),
        (b'{"command":5}', cp.E_BAD_REQUEST),
        (b'{"args":{}}', cp.E_BAD_REQUEST),
        (b'{"command":"status","args":[]}', cp.E_BAD_REQUEST),
        (b'{"command":"rotate-everything"}', cp.E_UNKNOWN_COMMAND),
        (b'{"command":"\\u0000evil\\n"}', cp.E_UNKNOWN_COMMAND),
        (b'{"command":"status","args":{"x":1}}', cp.E_BAD_ARGUMENT),
        (b'{"command":"quiesce","args":{"timeout":"5"}}', cp.E_BAD_ARGUMENT),
        (b'{"command":"quiesce","args":{"timeout":0}}', cp.E_BAD_ARGUMENT),
        (b'{"command":"quiesce","args":{"timeout":1e9}}', cp.E_BAD_ARGUMENT),
        (b'{"command":"quiesce","args":{"detach":1}}', cp.E_BAD_ARGUMENT),
        (b'{"command":"set-key","args":{"purpose":"rotation-target"}}', cp.E_BAD_ARGUMENT),
        (b'{"command":"forget-key","args":{"purpose":"anything"}}', cp.E_BAD_ARGUMENT),
    ],
)
def test_bad_requests_get_structured_errors_and_the_connection_stays(body, code):
    conn = cp.ControlConnection()
    conn.receive_data(frame(body) + req("status"))
    ev = conn.next_event()  # the bad frame is answered; the next request is parsed
    assert isinstance(ev, cp.Request) and ev.command == "status"
    err, *rest = replies(conn.data_to_send())
    assert not rest and not err.ok and err.code == code and err.message
    assert "\x00" not in err.message  # a peer's raw command name is not echoed back when malformed


def test_unknown_command_lists_the_known_ones():
    conn = cp.ControlConnection()
    conn.receive_data(req("no-such-command"))
    assert conn.next_event() is cp.NEED_DATA
    err = one_error(conn)
    assert err.code == cp.E_UNKNOWN_COMMAND and "status" in err.details["commands"]


def test_attachment_only_where_the_command_takes_one():
    conn = cp.ControlConnection()
    conn.receive_data(req("status", None, b"\x01" * 32))
    assert conn.next_event() is cp.NEED_DATA
    assert one_error(conn).code == cp.E_BAD_ARGUMENT
    for n in (0, 16, 31, 33, 64):
        conn.receive_data(req("set-key", {"purpose": "rotation-target", "key_id": "k"}, b"\x01" * n))
        assert conn.next_event() is cp.NEED_DATA
        assert one_error(conn).code == cp.E_BAD_ARGUMENT
    conn.receive_data(req("set-key", {"purpose": "rotation-target", "key_id": "k"}, KEY))
    assert conn.next_event().blob == KEY


class SpyBuffer(bytearray):
    """A receive buffer that records what each deletion releases (``del b[:n]`` on a bytearray only moves its
    start: the released bytes stay in its memory, which is why the protocol zeroes them first)."""

    def __init__(self) -> None:
        super().__init__()
        self.released: list[bytes] = []

    def __delitem__(self, key) -> None:
        self.released.append(bytes(self[key]))
        super().__delitem__(key)


def test_key_never_in_repr_and_receive_buffer_is_zeroed():
    conn = cp.ControlConnection()
    conn._buf = spy = SpyBuffer()
    conn.receive_data(req("set-key", {"purpose": "rotation-target", "key_id": "key-1"}, KEY))
    ev = conn.next_event()
    assert ev.blob == bytearray(KEY)
    assert KEY not in repr(ev).encode() and KEY.hex() not in repr(ev) and "32 bytes" in repr(ev)
    assert spy.released and all(chunk == bytes(len(chunk)) for chunk in spy.released)
    assert KEY not in bytes(spy)
    cp.wipe(ev.blob)
    assert ev.blob == bytes(32)


def test_incomplete_frame_needs_data_and_truncation_leaves_nothing_half_done():
    data = req("set-key", {"purpose": "rotation-target", "key_id": "k"}, KEY)
    for cut in range(len(data)):
        conn = cp.ControlConnection()
        conn.receive_data(data[:cut])
        assert conn.next_event() is cp.NEED_DATA
        assert conn.data_to_send() == b""


def test_register_command_extends_without_a_protocol_change():
    commands = dict(cp.COMMANDS)
    spec = cp.CommandSpec("snapshot", {"name": cp.Arg("str", required=True)})
    commands[spec.name] = spec
    conn = cp.ControlConnection(commands)
    conn.receive_data(req("snapshot", {"name": "before-upgrade"}))
    assert conn.next_event().args == {"name": "before-upgrade"}
    with pytest.raises(cp.LocalProtocolError):
        cp.register_command(cp.CommandSpec("Bad Name"))
    with pytest.raises(cp.LocalProtocolError):
        cp.register_command(cp.CommandSpec("big", blob=(0, cp.MAX_BLOB + 1)))


def test_encoders_refuse_what_the_peer_would_refuse():
    with pytest.raises(cp.LocalProtocolError):
        cp.encode_request("status", {"p": "x" * cp.MAX_JSON})
    with pytest.raises(cp.LocalProtocolError):
        cp.encode_request("set-key", {}, b"x" * (cp.MAX_BLOB + 1))
    with pytest.raises(cp.LocalProtocolError):
        cp.encode_error("made-up", "x")
    with pytest.raises(cp.LocalProtocolError):
        cp.encode_reply({"x": float("nan")})


# --- the client's reader --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        frame(b'{"ok":true,"result":{}}', kind=1),
        frame(b'{"ok":true,"result":{}}', version=2),
        frame(b'{"ok":true,"result":{}}', blob=b"x"),
        frame(b'{"ok":true}', kind=2),
        frame(b'{"ok":"yes","result":{}}', kind=2),
        frame(b'{"ok":false,"error":"x"}', kind=2),
        frame(b"nope", kind=2),
        frame(b"", kind=2, jlen=cp.MAX_JSON + 1),
    ],
)
def test_reply_reader_rejects_malformed_replies(data):
    rd = cp.ReplyReader()
    with pytest.raises(cp.PeerProtocolError):
        rd.receive_data(data)
        rd.next_reply()


# --- fuzz -----------------------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=80), max_size=12), st.integers(min_value=0, max_value=3))
def test_fuzz_garbage_never_raises_and_every_answer_is_a_valid_reply(chunks, good):
    conn = cp.ControlConnection(max_buffer=4096)
    stream = b"".join(chunks)
    # Sometimes start with valid requests, so the fuzzer also reaches the states after them.
    stream = b"".join(req("status") for _ in range(good)) + stream
    for i in range(0, len(stream), 7):
        conn.receive_data(stream[i : i + 7])
        while True:
            ev = conn.next_event()
            if isinstance(ev, cp.Request):
                assert ev.command in cp.COMMANDS
                conn.reply({"ok": 1})
                continue
            break
        out = conn.data_to_send()
        for r in replies(out):
            assert r.ok or r.code in cp.ERROR_CODES
        if conn.state is cp.State.CLOSED:
            break


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=10),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
            max_leaves=8,
        ),
        max_size=4,
    ),
    st.sampled_from([*sorted(cp.COMMANDS), "bogus"]),
    st.binary(max_size=40),
)
def test_fuzz_arguments_are_judged_never_crash(args, command, blob):
    conn = cp.ControlConnection()
    conn.receive_data(req(command, args, blob))
    ev = conn.next_event()
    if isinstance(ev, cp.Request):
        spec = cp.COMMANDS[ev.command]
        assert spec.check(ev.args, len(ev.blob)) is None
    else:
        assert one_error(conn).code in (cp.E_BAD_ARGUMENT, cp.E_UNKNOWN_COMMAND)


def test_key_size_is_the_volume_key_size():
    from qwamos import crypto

    assert cp.KEY_SIZE == crypto.KEY_SIZE
