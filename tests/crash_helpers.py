"""Kill -9 at a chosen file-system write: a child process that SIGKILLs itself before its n-th call to one of
the ``os`` functions named, so a test can step a crash through every write of an operation.

The children are forked by a fresh, single-threaded interpreter (:class:`Crasher`, the ``crasher`` fixture),
never by the test process.  By the time a kill test runs, the pytest process is usually multi-threaded (the
NBD tests' servers and clients, asyncio executors, librados' threads once an RBD test connected), and a fork of
a multi-threaded process may deadlock in the child on a lock another thread held at fork time (malloc,
logging, the import lock, the crypto library's); Python 3.12 warns about exactly that.  The crasher starts
with no thread, refuses to fork if it ever has a second one, and runs every operation only in its forked
children, so it stays the clean process it started as.  Forking from it (rather than starting an interpreter
per kill) keeps a kill loop of a hundred steps cheap.

Since the operation crosses a process boundary it is named by reference, not as a closure: a module-level
function of the test module and picklable arguments.  The child gets the test process's current environment
and working directory, as a fork would give it.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable

# The server: sys.path from the test process, then one request (n, names, environ, cwd, function, args) at a
# time from stdin, one exit status per line on stdout.  The named ``os`` functions are wrapped in the child
# only, after the function's module is imported, so the count starts with the operation's first call.
_SERVER = """\
import os, pickle, signal, sys, traceback
sys.path[:] = pickle.load(sys.stdin.buffer)
replies = os.fdopen(os.dup(1), "w")
while True:
    try:
        n, names, environ, cwd, func, args = pickle.load(sys.stdin.buffer)
    except EOFError:
        break
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        sys.exit(f"crash_helpers: the crasher has {threads} threads; it must not fork")
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(2, 1)  # stdout carries the replies: the operation's prints go to stderr
            os.environ.clear()
            os.environ.update(environ)
            os.chdir(cwd)
            count = 0
            def wrap(real):
                def wrapped(*a, **kw):
                    global count
                    count += 1
                    if count == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*a, **kw)
                return wrapped
            for name in names:
                setattr(os, name, wrap(getattr(os, name)))
            func(*args)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    replies.write(f"{os.waitstatus_to_exitcode(status)}\\n")
    replies.flush()
"""


class Crasher:
    """Runs operations in children of one fresh interpreter, each killed before its n-th chosen os call."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def crash_at(self, n: int, calls: Iterable[str], func: Callable[..., object], *args: object) -> bool:
        """Run ``func(*args)`` in a child that SIGKILLs itself before its ``n``-th call to any of ``calls``
        (names of ``os`` functions).  True if the child was killed, False if it finished; a failure in the
        child (any other end) fails the test, its traceback on stderr.

        ``func`` must be importable by name (a module-level function) and ``args`` picklable."""
        if self._proc is None:
            # stderr is the test's (pytest captures the file descriptor, so children's tracebacks show)
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            assert self._proc.stdin is not None
            self._proc.stdin.write(pickle.dumps(list(sys.path)))
        assert self._proc.stdin is not None and self._proc.stdout is not None
        request = (n, tuple(calls), dict(os.environ), os.getcwd(), func, args)
        self._proc.stdin.write(pickle.dumps(request))
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        assert line, f"the crasher died (exit status {self._proc.wait()}; see stderr)"
        code = int(line)
        if code == -signal.SIGKILL:
            return True
        assert code == 0, f"the operation failed in the child (exit status {code}; see stderr)"
        return False

    def run(self, func: Callable[..., object], *args: object) -> None:
        """Run ``func(*args)`` to its end in a child (no kill): for tests of a process that dies without
        closing what it opened, which ends itself with ``os._exit``.  Its exit status must be 0."""
        assert not self.crash_at(0, (), func, *args)

    def close(self) -> None:
        """End the server (end of its stdin) and reap it."""
        if self._proc is not None:
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.close()
            self._proc.wait()
            self._proc.stdout.close()
            self._proc = None
