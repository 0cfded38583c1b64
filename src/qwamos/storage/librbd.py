"""A thin ctypes binding to the C APIs of librados (``librados.so.2``) and librbd (``librbd.so.1``).

Why ctypes and not Debian's ``python3-rbd``: that binding is a Cython extension built for the system Python
3.11 only (``/usr/lib/python3/dist-packages``), while the project runs on pyenv's 3.11 and on 3.12 and 3.13; a
C extension is tied to one interpreter's ABI, so it would import in one of our environments at best.  The C
libraries' ABI is stable across Ceph releases (the soname versions say so) and ctypes reaches it from every
Python.  ctypes releases the GIL for the length of each call, so a blocking librbd call in one thread does not
stop the others.  Only the calls the storage layer uses are declared; each returns a negative errno on failure,
which :func:`check` turns into ``OSError``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

RBD_LOCK_MODE_EXCLUSIVE = 0
RBD_FEATURE_EXCLUSIVE_LOCK = 1 << 2

c_void_p, c_char_p, c_int, c_uint64, c_size_t = (
    ctypes.c_void_p,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_uint64,
    ctypes.c_size_t,
)
c_ssize_t = ctypes.c_ssize_t

# int (*cb)(uint64_t offset, size_t length, int exists, void *arg)
DIFF_CB = ctypes.CFUNCTYPE(c_int, c_uint64, c_size_t, c_int, c_void_p)

_SIGNATURES: dict[str, tuple[str, Any, list[Any]]] = {
    # librados
    "rados_create2": ("rados", c_int, [ctypes.POINTER(c_void_p), c_char_p, c_char_p, c_uint64]),
    "rados_conf_read_file": ("rados", c_int, [c_void_p, c_char_p]),
    "rados_conf_parse_env": ("rados", c_int, [c_void_p, c_char_p]),
    "rados_conf_set": ("rados", c_int, [c_void_p, c_char_p, c_char_p]),
    "rados_conf_get": ("rados", c_int, [c_void_p, c_char_p, c_char_p, c_size_t]),
    "rados_connect": ("rados", c_int, [c_void_p]),
    "rados_shutdown": ("rados", None, [c_void_p]),
    "rados_ioctx_create": ("rados", c_int, [c_void_p, c_char_p, ctypes.POINTER(c_void_p)]),
    "rados_ioctx_destroy": ("rados", None, [c_void_p]),
    "rados_set_pool_full_try": ("rados", None, [c_void_p]),
    # librbd
    "rbd_create": ("rbd", c_int, [c_void_p, c_char_p, c_uint64, ctypes.POINTER(c_int)]),
    "rbd_remove": ("rbd", c_int, [c_void_p, c_char_p]),
    "rbd_rename": ("rbd", c_int, [c_void_p, c_char_p, c_char_p]),
    "rbd_list": ("rbd", c_int, [c_void_p, c_char_p, ctypes.POINTER(c_size_t)]),
    "rbd_open": ("rbd", c_int, [c_void_p, c_char_p, ctypes.POINTER(c_void_p), c_char_p]),
    "rbd_open_read_only": ("rbd", c_int, [c_void_p, c_char_p, ctypes.POINTER(c_void_p), c_char_p]),
    "rbd_close": ("rbd", c_int, [c_void_p]),
    "rbd_get_size": ("rbd", c_int, [c_void_p, ctypes.POINTER(c_uint64)]),
    "rbd_resize": ("rbd", c_int, [c_void_p, c_uint64]),
    "rbd_read": ("rbd", c_ssize_t, [c_void_p, c_uint64, c_size_t, c_void_p]),
    "rbd_write": ("rbd", c_ssize_t, [c_void_p, c_uint64, c_size_t, c_void_p]),
    "rbd_write_zeroes": ("rbd", c_int, [c_void_p, c_uint64, c_size_t, c_int, c_int]),
    "rbd_flush": ("rbd", c_int, [c_void_p]),
    # asynchronous reads and writes: rbd_aio_create_completion(cb_arg, cb, &c) with no callback, waited for by us
    "rbd_aio_create_completion": ("rbd", c_int, [c_void_p, c_void_p, ctypes.POINTER(c_void_p)]),
    "rbd_aio_write": ("rbd", c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p]),
    "rbd_aio_read": ("rbd", c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p]),
    "rbd_aio_writev": ("rbd", c_int, [c_void_p, c_void_p, c_int, c_uint64, c_void_p]),  # (image, iov, n, off, c)
    "rbd_aio_is_complete": ("rbd", c_int, [c_void_p]),
    "rbd_aio_wait_for_complete": ("rbd", c_int, [c_void_p]),
    "rbd_aio_get_return_value": ("rbd", c_ssize_t, [c_void_p]),
    "rbd_aio_release": ("rbd", None, [c_void_p]),
    "rbd_diff_iterate2": (
        "rbd",
        c_int,
        [c_void_p, c_char_p, c_uint64, c_uint64, ctypes.c_uint8, ctypes.c_uint8, DIFF_CB, c_void_p],
    ),
    "rbd_get_features": ("rbd", c_int, [c_void_p, ctypes.POINTER(c_uint64)]),
    "rbd_lock_acquire": ("rbd", c_int, [c_void_p, c_int]),
    "rbd_lock_release": ("rbd", c_int, [c_void_p]),
    "rbd_lock_get_owners": (
        "rbd",
        c_int,
        [c_void_p, ctypes.POINTER(c_int), ctypes.POINTER(c_char_p), ctypes.POINTER(c_size_t)],
    ),
    "rbd_lock_get_owners_cleanup": ("rbd", None, [ctypes.POINTER(c_char_p), c_size_t]),
    "rbd_lock_exclusive": ("rbd", c_int, [c_void_p, c_char_p]),
    "rbd_unlock": ("rbd", c_int, [c_void_p, c_char_p]),
    "rbd_break_lock": ("rbd", c_int, [c_void_p, c_char_p, c_char_p]),
    "rbd_metadata_get": ("rbd", c_int, [c_void_p, c_char_p, c_char_p, ctypes.POINTER(c_size_t)]),
    "rbd_metadata_set": ("rbd", c_int, [c_void_p, c_char_p, c_char_p]),
    "rbd_metadata_remove": ("rbd", c_int, [c_void_p, c_char_p]),
    "rbd_list_lockers": (
        "rbd",
        c_ssize_t,
        [
            c_void_p,
            ctypes.POINTER(c_int),
            c_char_p,
            ctypes.POINTER(c_size_t),
            c_char_p,
            ctypes.POINTER(c_size_t),
            c_char_p,
            ctypes.POINTER(c_size_t),
            c_char_p,
            ctypes.POINTER(c_size_t),
        ],
    ),
}


class Lib:
    """The two libraries with their functions declared; attributes are the C functions."""

    def __init__(self) -> None:
        libs = {"rados": _load("rados", "librados.so.2"), "rbd": _load("rbd", "librbd.so.1")}
        for name, (lib, restype, argtypes) in _SIGNATURES.items():
            fn = getattr(libs[lib], name)
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)

    def __getattr__(self, name: str) -> Any:  # for type checkers: every declared function is set in __init__
        raise AttributeError(name)


def _load(short: str, soname: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(soname)
    except OSError:
        found = ctypes.util.find_library(short)
        if found is None:
            raise
        return ctypes.CDLL(found)


_lib: Lib | None = None


def lib() -> Lib:
    """The loaded libraries (loaded on first use); ``OSError`` when librbd/librados are not installed."""
    global _lib
    if _lib is None:
        _lib = Lib()
    return _lib


def check(ret: int, what: str) -> int:
    """``ret`` if not negative, else ``OSError(-ret)`` saying which call failed."""
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret
