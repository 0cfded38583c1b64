"""The control channel in the export's event loop, against live sockets: status counters, quiesce semantics
(in-flight requests finish, new ones wait, resume runs them), leases that end with their connection, clients
that vanish mid-request, oversized and garbage frames, keys, and the peer-uid check."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from qwamos.blockdev import MemoryBackend
from qwamos.errors import ControlChannelError
from qwamos.nbd import constants as c
from qwamos.nbd import control_protocol as cp
from qwamos.nbd.client import NBDClient
from qwamos.nbd.control_client import ControlClient
from qwamos.nbd.control_server import ControlServer, control_path_for
from qwamos.nbd.server import ExportServer

SIZE = 16 << 20
KEY = bytes(range(100, 132))


class CountingBackend(MemoryBackend):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.writes = 0

    def pwrite(self, offset, data, fua=False):
        self.writes += 1
        super().pwrite(offset, data, fua)


@dataclass
class Export:
    srv: ExportServer
    ctl: ControlServer
    path: str  # the NBD socket
    cpath: str  # the control socket


@contextlib.contextmanager
def running(backend, *, allowed_uids=None, frame_timeout=10.0, **kw) -> Iterator[Export]:
    """An export with its control channel, its loop in a thread; stopped (and joined) on exit."""
    d = tempfile.mkdtemp(prefix="ctlt", dir="/tmp")
    path = os.path.join(d, "s")
    ready = threading.Event()
    box: dict = {}

    def target() -> None:
        async def main() -> None:
            srv = ExportServer(backend, unix_path=path, **kw)
            ctl = ControlServer(
                srv, control_path_for(path), allowed_uids=allowed_uids, frame_timeout=frame_timeout
            )
            box.update(srv=srv, ctl=ctl, loop=asyncio.get_running_loop(), stop=asyncio.Event())
            await srv.serve_until(box["stop"], ready.set)

        try:
            asyncio.run(main())
        except BaseException as e:
            box["error"] = e
            ready.set()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    assert ready.wait(10)
    assert "error" not in box, box.get("error")
    try:
        yield Export(box["srv"], box["ctl"], path, str(control_path_for(path)))
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        t.join(10)
        assert not t.is_alive()
        shutil.rmtree(d, ignore_errors=True)
    assert "error" not in box, box.get("error")


def wait_for(cond, what: str, timeout: float = 30.0) -> None:
    """Poll a condition the server reaches by itself (no assertion about how fast)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def write_header(nbd: NBDClient, offset: int, length: int) -> int:
    nbd._cookie += 1
    nbd.sock.sendall(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_WRITE, nbd._cookie, offset, length))
    return nbd._cookie


# --- status ---------------------------------------------------------------------------------------------------


def test_status_reports_the_export_and_counts_requests():
    with running(MemoryBackend(SIZE), name="disk0") as ex, ControlClient.connect(ex.cpath) as cc:
        st = cc.status()
        assert st["export"]["size"] == SIZE and st["export"]["name"] == "disk0"
        assert st["export"]["read_only"] is False
        assert st["export"]["socket"] == ex.path and st["export"]["control_socket"] == ex.cpath
        assert st["pid"] == os.getpid() and st["uid"] == os.geteuid()
        assert st["connections"] == 0 and st["requests_served"] == 0
        assert st["quiesced"] is False and st["operations"] == [] and st["keys"] == []
        assert st["volume"] is None  # a MemoryBackend has no file
        with NBDClient.connect_unix(ex.path) as nbd:
            nbd.write(0, b"a" * 4096)
            nbd.read(0, 4096)
            nbd.flush()
            st = cc.status()
            assert st["connections"] == 1 and st["requests_served"] == 3
        wait_for(lambda: cc.status()["connections"] == 0, "the NBD connection is gone")
        assert cc.status()["requests_served"] == 3  # closed connections still count
        hello = cc.hello()
        assert hello["protocol"] == cp.VERSION and "quiesce" in hello["commands"]


def test_operations_show_progress():
    with running(MemoryBackend(SIZE)) as ex:
        op = ex.ctl.operations.start("rotation", 1000, "blocks")
        op.done = 250
        with ControlClient.connect(ex.cpath) as cc:
            (row,) = cc.status()["operations"]
            assert row["kind"] == "rotation" and row["done"] == 250 and row["total"] == 1000
            assert row["percent"] == 25.0 and row["state"] == "running" and row["unit"] == "blocks"
            ex.ctl.operations.finish(op)
            assert cc.status()["operations"][0]["state"] == "done"


# --- quiesce --------------------------------------------------------------------------------------------------


def test_quiesce_waits_for_an_in_flight_write_holds_new_requests_and_resume_runs_them():
    backend = CountingBackend(SIZE)
    with running(backend) as ex:
        nbd = NBDClient.connect_unix(ex.path)
        payload = b"\x5a" * (3 << 20)  # 3 MiB: applied in 1 MiB pieces as it arrives
        cookie = write_header(nbd, 0, len(payload))
        nbd.sock.sendall(payload[: 1 << 20])  # the first piece only: the WRITE is in flight
        q = ControlClient.connect(ex.cpath)
        q.sock.sendall(cp.encode_request("quiesce", {"timeout": 60}))
        with ControlClient.connect(ex.cpath) as watcher:
            wait_for(lambda: watcher.status()["quiesced"], "the quiesce hold is taken")
            st = watcher.status()
            assert st["in_flight"] == 1
            assert not readable(q.sock), "quiesce answered while a WRITE was still in flight"
            nbd.sock.sendall(payload[1 << 20 :])  # the WRITE completes...
            assert q._receive().result["quiesced"] is True  # ...and only then is the export quiesced
            assert nbd.recv_reply() == (cookie, 0, b"")
            assert backend.flushes >= 1  # quiesce flushed
            writes = backend.writes
            # A new request is not taken while quiesced: it stays in the socket.
            read_cookie = nbd.send_request(c.CMD_READ, 0, 4096)
            for _ in range(3):
                assert watcher.status()["quiesced"] is True
            assert not readable(nbd.sock), "a request was served while the export was quiesced"
            assert backend.writes == writes
            assert watcher.resume() == {"quiesced": False, "released": 1}
            assert nbd.recv_reply(4096) == (read_cookie, 0, b"\x5a" * 4096)
        q.close()
        nbd.close()


def test_quiesce_lease_ends_when_its_control_connection_closes():
    with (
        running(MemoryBackend(SIZE)) as ex,
        NBDClient.connect_unix(ex.path) as nbd,
        ControlClient.connect(ex.cpath) as watcher,
    ):
        with ControlClient.connect(ex.cpath) as holder:
            assert holder.quiesce()["detached"] is False
            cookie = nbd.send_request(c.CMD_READ, 0, 4096)
            assert watcher.status()["quiesce_holds"] == 1
            assert not readable(nbd.sock)
        # the holder went away: its hold with it, and the waiting READ is served
        assert nbd.recv_reply(4096)[:2] == (cookie, 0)
        assert watcher.status()["quiesced"] is False


def test_detached_quiesce_survives_its_connection_until_resume():
    with running(MemoryBackend(SIZE)) as ex:
        with ControlClient.connect(ex.cpath) as a:
            assert a.quiesce(detach=True)["detached"] is True
        with ControlClient.connect(ex.cpath) as b:
            assert b.status()["quiesced"] is True
            with NBDClient.connect_unix(ex.path) as nbd:  # the handshake works while quiesced
                cookie = nbd.send_request(c.CMD_FLUSH)
                assert b.status()["quiesced"] is True
                assert not readable(nbd.sock)
                b.resume()
                assert nbd.recv_reply() == (cookie, 0, b"")


def test_quiesce_times_out_on_a_stalled_client_and_leaves_the_export_running():
    with running(MemoryBackend(SIZE)) as ex:
        nbd = NBDClient.connect_unix(ex.path)
        cookie = write_header(nbd, 0, 8192)
        nbd.sock.sendall(b"x" * 4096)  # half the payload, then nothing
        with ControlClient.connect(ex.cpath) as cc:
            with pytest.raises(ControlChannelError) as ei:
                cc.quiesce(timeout=0.2)
            assert ei.value.code == cp.E_TIMEOUT and "in flight" in str(ei.value)
            st = cc.status()
            assert st["quiesced"] is False and st["in_flight"] == 1
        nbd.sock.sendall(b"y" * 4096)
        assert nbd.recv_reply() == (cookie, 0, b"")
        nbd.close()


def test_nbd_client_vanishing_mid_write_lets_a_pending_quiesce_finish():
    with running(MemoryBackend(SIZE)) as ex:
        nbd = NBDClient.connect_unix(ex.path)
        write_header(nbd, 0, 8192)
        nbd.sock.sendall(b"x" * 4096)
        with ControlClient.connect(ex.cpath) as q, ControlClient.connect(ex.cpath) as watcher:
            q.sock.sendall(cp.encode_request("quiesce", {"timeout": 60}))
            wait_for(lambda: watcher.status()["quiesced"], "the quiesce hold is taken")
            assert not readable(q.sock)
            nbd.close()  # the client vanishes with its WRITE half sent
            assert q._receive().result["quiesced"] is True
            assert watcher.status()["connections"] == 0


def test_control_client_vanishing_mid_quiesce_releases_its_hold():
    with running(MemoryBackend(SIZE)) as ex:
        nbd = NBDClient.connect_unix(ex.path)
        cookie = write_header(nbd, 0, 8192)
        nbd.sock.sendall(b"x" * 4096)
        with ControlClient.connect(ex.cpath) as watcher:
            q = ControlClient.connect(ex.cpath)
            q.sock.sendall(cp.encode_request("quiesce", {"timeout": 60}))
            wait_for(lambda: watcher.status()["quiesced"], "the quiesce hold is taken")
            q.close()  # gone while its quiesce waits
            wait_for(lambda: not watcher.status()["quiesced"], "the hold is released")
            nbd.sock.sendall(b"y" * 4096)
            assert nbd.recv_reply() == (cookie, 0, b"")
            assert nbd.read(0, 8192) == b"x" * 4096 + b"y" * 4096  # and the export serves on
        nbd.close()


def test_shutdown_while_quiesced_flushes_and_exits():
    backend = MemoryBackend(SIZE)
    with running(backend) as ex, ControlClient.connect(ex.cpath) as cc:
        cc.quiesce(detach=True)
        nbd = NBDClient.connect_unix(ex.path)
        nbd.send_request(c.CMD_READ, 0, 4096)
    nbd.close()
    assert not os.path.exists(ex.cpath)


# --- hostile or broken control clients ------------------------------------------------------------------------


def test_control_client_vanishing_mid_frame_and_garbage_leave_the_export_serving():
    with running(MemoryBackend(SIZE)) as ex:
        frame = bytes(cp.encode_request("set-key", {"purpose": "rotation-target", "key_id": "k"}, KEY))
        for cut in (1, cp.HEADER_SIZE - 1, cp.HEADER_SIZE, len(frame) - 1):
            s = socket.socket(socket.AF_UNIX)
            s.connect(ex.cpath)
            s.sendall(frame[:cut])
            s.close()
        s = socket.socket(socket.AF_UNIX)
        s.connect(ex.cpath)
        s.sendall(b"\x00" * 64)
        assert s.recv(65536)[:4] == b"QCTL"  # a bad-frame reply...
        assert s.recv(65536) == b""  # ...then closed
        s.close()
        with ControlClient.connect(ex.cpath) as cc:
            st = cc.status()
            assert st["keys"] == [] and st["control_connections"] == 1


def test_oversized_frame_is_refused_without_reading_it():
    with running(MemoryBackend(SIZE)) as ex:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)  # a server that waits for the announced gigabyte fails this test instead of hanging it
        s.connect(ex.cpath)
        s.sendall(struct.pack(">4sBBHII", b"QCTL", 1, 1, 0, 1 << 30, 0))
        reply = ControlClient(s, ex.cpath)._receive()
        assert not reply.ok and reply.code == cp.E_TOO_LARGE
        assert s.recv(1) == b""
        s.close()
        with ControlClient.connect(ex.cpath) as cc:
            assert cc.status()["control_connections"] == 1


def test_unknown_command_and_bad_arguments_answer_and_the_connection_stays():
    with running(MemoryBackend(SIZE)) as ex, ControlClient.connect(ex.cpath) as cc:
        with pytest.raises(ControlChannelError) as ei:
            cc.request("rotate-now")
        assert ei.value.code == cp.E_UNKNOWN_COMMAND
        with pytest.raises(ControlChannelError) as ei:
            cc.request("quiesce", {"timeout": "soon"})
        assert ei.value.code == cp.E_BAD_ARGUMENT
        assert cc.status()["quiesced"] is False


# --- keys -----------------------------------------------------------------------------------------------------


def test_set_key_stores_without_revealing_and_forget_wipes(caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    with running(MemoryBackend(SIZE)) as ex, ControlClient.connect(ex.cpath) as cc:
        r = cc.set_key("rotation-target", "k-new", KEY)
        assert r == {"purpose": "rotation-target", "key_id": "k-new", "stored": True}
        assert cc.status()["keys"] == [{"purpose": "rotation-target", "key_id": "k-new", "length": 32}]
        key_id, held = ex.ctl.keys.get("rotation-target")
        assert key_id == "k-new" and bytes(held) == KEY
        assert cc.forget_key("rotation-target")["forgotten"] is True
        assert held == bytes(32)  # wiped in place
        with pytest.raises(ControlChannelError) as ei:
            cc.forget_key("rotation-target")
        assert ei.value.code == cp.E_STATE
        with pytest.raises(ControlChannelError) as ei:
            cc.set_key("rotation-target", "k", KEY[:16])
        assert ei.value.code == cp.E_BAD_ARGUMENT
        cc.set_key("rotation-target", "k2", KEY)
        _, held = ex.ctl.keys.get("rotation-target")
    assert held == bytes(32)  # wiped at shutdown
    text = caplog.text
    assert KEY.hex() not in text and repr(KEY)[2:-1] not in text and "k-new" not in text


# --- who may connect ------------------------------------------------------------------------------------------


def test_control_socket_is_0600_whatever_the_nbd_socket_mode():
    old = os.umask(0)
    try:
        with running(MemoryBackend(SIZE), socket_mode=0o666) as ex:
            assert os.stat(ex.path).st_mode & 0o777 == 0o666
            assert os.stat(ex.cpath).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


# Another uid against a served export (0600 refuses connect(); SO_PEERCRED refuses it even through a 0666
# socket) is tests/test_nbd_control_live.py::test_another_uid_is_refused_by_a_served_export: it forks a child
# that switches uid, which this module's exports (a thread of the test process) would make unsafe.


def test_a_uid_not_in_the_allowed_set_is_refused():
    """Without root: an export that allows only another uid refuses us (the same check, other side)."""
    with running(MemoryBackend(SIZE), allowed_uids=(os.geteuid() + 12345,)) as ex:
        with pytest.raises(ControlChannelError) as ei:
            ControlClient.connect(ex.cpath).status()
        assert ei.value.code == cp.E_FORBIDDEN


def test_a_second_export_on_the_same_control_path_is_refused_and_leaves_the_first_alone():
    from qwamos.errors import ExportError

    with running(MemoryBackend(SIZE)) as ex:
        other = ExportServer(MemoryBackend(SIZE), unix_path=ex.path + "2")
        ControlServer(other, ex.cpath)
        with pytest.raises(ExportError, match="already listening"):
            other.bind()
        assert not os.path.exists(ex.path + "2")
        with ControlClient.connect(ex.cpath) as cc:
            assert cc.status()["export"]["socket"] == ex.path


def test_requests_held_at_shutdown_are_dropped_not_run():
    backend = CountingBackend(SIZE)
    with running(backend) as ex:
        with ControlClient.connect(ex.cpath) as cc:
            cc.quiesce(detach=True)
        nbd = NBDClient.connect_unix(ex.path)
        nbd.send_request(c.CMD_WRITE, 0, 4096, data=b"w" * 4096)
        with ControlClient.connect(ex.cpath) as cc:
            assert cc.status()["quiesced"] is True
    assert backend.writes == 0  # the export stopped without running the WRITE that waited behind the gate
    try:
        reply = nbd.sock.recv(16)
    except ConnectionResetError:  # closed with the unread WRITE in its buffer
        reply = b""
    assert reply == b""  # and without acknowledging it
    nbd.close()


def test_the_request_attachment_is_wiped_once_the_handler_ran():
    seen: list[bytearray] = []

    def keep(session, req):
        seen.append(req.blob)
        return {"kept": bytes(req.blob) == KEY}

    with running(MemoryBackend(SIZE)) as ex, ControlClient.connect(ex.cpath) as cc:
        ex.ctl.add_handler("set-key", keep)
        assert cc.set_key("rotation-target", "k", KEY) == {"kept": True}
    assert seen == [bytearray(32)]


def test_fuzz_garbage_on_live_control_connections_never_hurts_the_export():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    frames = st.one_of(
        st.binary(max_size=64),
        st.builds(lambda c, b: bytes(cp.encode_request(c, None, b)), st.sampled_from(["status", "flush", "x"]),
                  st.binary(max_size=40)),
        st.builds(lambda n: struct.pack(">4sBBHII", b"QCTL", 1, 1, 0, n, 0), st.integers(0, (1 << 32) - 1)),
    )  # fmt: skip
    with running(MemoryBackend(SIZE)) as ex, NBDClient.connect_unix(ex.path) as nbd:
        nbd.write(0, b"k" * 4096)

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(frames, max_size=4), st.booleans())
        def poke(chunks, wait):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(ex.cpath)
            with contextlib.suppress(OSError):
                for chunk in chunks:
                    s.sendall(chunk)
                if wait:
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(65536):
                        pass
            s.close()

        poke()
        with ControlClient.connect(ex.cpath) as cc:
            st_ = cc.status()
            assert st_["quiesced"] is False and st_["keys"] == []
        assert nbd.read(0, 4096) == b"k" * 4096


class FailingFlushBackend(MemoryBackend):
    def flush(self) -> None:
        raise OSError(5, "Input/output error")


def test_flush_reaches_the_backend_and_its_failure_is_a_structured_error():
    backend = MemoryBackend(SIZE)
    with running(backend) as ex, ControlClient.connect(ex.cpath) as cc:
        before = backend.flushes
        assert cc.flush() == {"flushed": True}
        assert backend.flushes == before + 1
    failing = FailingFlushBackend(SIZE)
    with running(failing) as ex, ControlClient.connect(ex.cpath) as cc:
        with pytest.raises(ControlChannelError) as ei:
            cc.flush()
        assert ei.value.code == cp.E_FAILED and "Input/output error" in str(ei.value)
        with pytest.raises(ControlChannelError) as ei:
            cc.quiesce()
        assert ei.value.code == cp.E_FAILED
        assert cc.status()["quiesced"] is False  # a quiesce whose flush failed holds nothing
        failing.flush = lambda: None  # let the export stop cleanly


def test_quiesce_waits_for_a_long_read_whose_client_is_slow_to_take_it():
    data = bytes(range(256)) * (8 << 12)  # 8 MiB
    backend = MemoryBackend(SIZE)
    backend.pwrite(0, data)
    with running(backend) as ex, ControlClient.connect(ex.cpath) as watcher:
        nbd = NBDClient.connect_unix(ex.path)
        cookie = nbd.send_request(c.CMD_READ, 0, len(data))  # > 1 MiB: produced in pieces as the client reads
        wait_for(lambda: watcher.status()["in_flight"] == 1, "the READ waits for its client")
        with pytest.raises(ControlChannelError) as ei:
            watcher.quiesce(timeout=0.2)
        assert ei.value.code == cp.E_TIMEOUT
        with ControlClient.connect(ex.cpath) as q:
            q.sock.sendall(cp.encode_request("quiesce", {"timeout": 60}))
            assert nbd.recv_reply(len(data)) == (cookie, 0, data)  # the client takes its data...
            assert q._receive().result["quiesced"] is True  # ...and the READ no longer holds up the quiesce
        nbd.close()


def test_a_stalled_partial_frame_is_closed_and_frees_its_slot():
    with running(MemoryBackend(SIZE), frame_timeout=0.2) as ex:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)  # far beyond the frame timeout: the server, not this, ends the wait
        s.connect(ex.cpath)
        s.sendall(bytes(cp.encode_request("status"))[:10])
        reply = ControlClient(s, ex.cpath)._receive()
        assert not reply.ok and reply.code == cp.E_TIMEOUT
        assert s.recv(1) == b""
        s.close()
        with ControlClient.connect(ex.cpath) as cc:  # an idle connection between requests is not cut
            cc.status()
            time.sleep(0.5)  # longer than the frame timeout
            assert cc.status()["control_connections"] == 1
