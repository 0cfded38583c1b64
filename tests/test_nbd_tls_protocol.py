"""NBD STARTTLS in the sans-IO protocol (proto.md "TLS support", FORCEDTLS): nothing but STARTTLS and ABORT
is honoured before TLS, and the connection consumes nothing while the I/O layer runs the TLS handshake."""

from __future__ import annotations

import struct

import pytest

from qwamos.nbd import constants as c
from qwamos.nbd.protocol import (
    NEED_DATA,
    Closed,
    Disconnect,
    ExportInfo,
    LocalProtocolError,
    Read,
    Ready,
    ServerConnection,
    StartTLS,
    State,
)
from test_nbd_protocol import events, go_data, opt, parse_opt_replies, req

SIZE = 1 << 20
FLAGS = struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES)


def forced() -> ServerConnection:
    conn = ServerConnection(ExportInfo(size=SIZE, name="vol"), tls_required=True)
    conn.data_to_send()
    return conn


def test_every_option_before_starttls_is_refused_tls_reqd():
    conn = forced()
    conn.receive_data(
        FLAGS
        + opt(c.OPT_LIST)
        + opt(c.OPT_INFO, go_data())
        + opt(c.OPT_GO, go_data())
        + opt(c.OPT_STRUCTURED_REPLY)
        + opt(99, b"abc")
    )
    assert events(conn) == []  # no Ready: nothing entered transmission
    reps = parse_opt_replies(conn.data_to_send())
    assert [r[1] for r in reps] == [c.REP_ERR_TLS_REQD] * 5
    assert conn.state is State.OPTIONS and not conn.tls


def test_export_name_before_tls_disconnects():
    conn = forced()
    conn.receive_data(FLAGS + opt(c.OPT_EXPORT_NAME, b""))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], Closed) and "before TLS" in evs[0].reason
    assert conn.data_to_send() == b""  # in particular, no export size and flags


def test_abort_before_tls_is_honoured():
    conn = forced()
    conn.receive_data(FLAGS + opt(c.OPT_ABORT))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], Disconnect)
    assert [r[1] for r in parse_opt_replies(conn.data_to_send())] == [c.REP_ACK]


def test_oversized_option_before_tls_disconnects():
    conn = forced()
    conn.receive_data(FLAGS + struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, c.MAX_OPTION_DATA + 1))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], Closed)


def test_non_fixed_newstyle_client_is_refused():
    conn = forced()
    conn.receive_data(struct.pack(">I", 0))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], Closed)


def test_starttls_then_options_inside_tls():
    conn = forced()
    conn.receive_data(FLAGS + opt(c.OPT_GO, go_data()) + opt(c.OPT_STARTTLS))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], StartTLS)
    reps = parse_opt_replies(conn.data_to_send())
    assert [(r[0], r[1], r[2]) for r in reps] == [
        (c.OPT_GO, c.REP_ERR_TLS_REQD, reps[0][2]),
        (c.OPT_STARTTLS, c.REP_ACK, b""),
    ]
    assert conn.state is State.STARTTLS
    assert conn.next_event() is NEED_DATA  # nothing is parsed until the handshake is done
    conn.tls_established()
    assert conn.tls and conn.state is State.OPTIONS
    conn.receive_data(opt(c.OPT_STARTTLS) + opt(c.OPT_GO, go_data()) + req(c.CMD_READ, 0, 4096))
    evs = events(conn)
    assert [type(e) for e in evs] == [Ready, Read]
    reps = parse_opt_replies(conn.data_to_send())
    assert reps[0][:2] == (c.OPT_STARTTLS, c.REP_ERR_INVALID)  # TLS already negotiated
    assert reps[-1][1] == c.REP_ACK


def test_starttls_with_data_is_invalid():
    conn = forced()
    conn.receive_data(FLAGS + opt(c.OPT_STARTTLS, b"x"))
    assert events(conn) == []
    assert [r[1] for r in parse_opt_replies(conn.data_to_send())] == [c.REP_ERR_INVALID]
    assert conn.state is State.OPTIONS


def test_bytes_after_starttls_before_the_ack_disconnect():
    """A client that did not wait for the ACK: what follows would be its TLS handshake, read as plaintext."""
    conn = forced()
    conn.receive_data(FLAGS + opt(c.OPT_STARTTLS) + b"\x16\x03\x01")
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], Closed)


def test_tls_established_only_after_starttls():
    conn = forced()
    with pytest.raises(LocalProtocolError):
        conn.tls_established()


def test_without_tls_required_starttls_is_unsupported_and_go_works():
    conn = ServerConnection(ExportInfo(size=SIZE))
    conn.data_to_send()
    conn.receive_data(FLAGS + opt(c.OPT_STARTTLS) + opt(c.OPT_GO, go_data()))
    evs = events(conn)
    assert [type(e) for e in evs] == [Ready]
    assert parse_opt_replies(conn.data_to_send())[0][1] == c.REP_ERR_UNSUP
