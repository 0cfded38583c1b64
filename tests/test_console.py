"""``qwamos.hypervisor.console``: the relay between stdin/stdout and a VM's console socket, with a real UNIX
socket standing in for QEMU's chardev and a pipe as stdin (the terminal-only Ctrl-] path needs a tty)."""

from __future__ import annotations

import io
import os
import socket
import threading

from qwamos.hypervisor import console


def test_relay_forwards_both_ways_until_the_vm_closes(short_dir):
    path = short_dir / "console.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    got: list[bytes] = []

    def vm() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"login: ")
            data = b""
            while not data.endswith(b"\n"):
                data += conn.recv(100)
            got.append(data)
            conn.sendall(b"bye\r\n")  # then the VM "exits": the socket closes

    t = threading.Thread(target=vm)
    t.start()
    r, w = os.pipe()
    os.write(w, b"root\n")
    os.close(w)  # stdin ends: the relay keeps showing output until the VM exits
    out = io.BytesIO()
    notices: list[str] = []
    try:
        how = console.relay(path, stdin_fd=r, out=out, notice=notices.append)
    finally:
        os.close(r)
        t.join(10)
        srv.close()
    assert how == "closed"
    assert got == [b"root\n"]
    assert out.getvalue() == b"login: bye\r\n"
    assert notices == []  # no terminal: no Ctrl-] hint
